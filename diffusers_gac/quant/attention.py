"""Quantization of the attention matmuls (q @ k^T and probs @ v) through a diffusers attention processor.

``quantize_attention(model, bits, ...)`` adds four activation quantizers to every diffusers ``Attention`` module,
as submodules so they are saved with the model::

    <attn>.q_quantizer, <attn>.k_quantizer, <attn>.v_quantizer   ActQuantizer (the config's scheme)
    <attn>.probs_quantizer                                         ActQuantizer over [0, 1], fixed step 1/(2^bits-1)

and sets ``QuantAttnProcessor``, which computes the same attention as diffusers' ``AttnProcessor`` with the
queries, keys and values quantized per token (before the head split) and the softmax probabilities quantized.

``QuantAttention`` is diffusers' ``Attention`` (every one of a converted model, ``adopt_attention_modules``) with
diffusers' projection fusion made to work on quantized projections: ``model.fuse_qkv_projections()`` fuses them
into a ``FusedQuantLinear`` (``fusion.py``) where that is exact, keeps them separate elsewhere (saying why, once),
and keeps a module's quantized matmuls (``QuantAttnProcessor(fused=True)``) where diffusers would set its plain
``FusedAttnProcessor2_0``.
"""

from __future__ import annotations

import functools

import torch
from diffusers.models.attention_processor import Attention, FusedAttnProcessor2_0
from diffusers.utils import logging
from torch import nn

from .fusion import FusedQuantLinear, fusion_refusal
from .quantizers import ActQuantizer, ActScheme

logger = logging.get_logger(__name__)


def _probs_quantizer(bits: int) -> ActQuantizer:
    q = ActQuantizer(bits, "static", groups=1)
    q.scale.fill_(1.0 / (2**bits - 1))  # probabilities live in [0, 1]: nothing to observe or learn
    q.fixed_range = True
    return q


class QuantAttnProcessor:
    """Attention with quantized matmul inputs; reads its quantizers from the ``Attention`` module it serves. With
    ``fused``, the projections are the module's fused ``to_qkv`` (self-attention) or ``to_q`` and ``to_kv``
    (with ``encoder_hidden_states``), as in diffusers' ``FusedAttnProcessor2_0``."""

    def __init__(self, fused: bool = False):
        self.fused = fused

    def __call__(self, attn: Attention, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        image_shape = hidden_states.shape if hidden_states.ndim == 4 else None
        if image_shape is not None:
            b, c, h, w = image_shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        batch_size, sequence_length, _ = context.shape
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)

        if not self.fused:
            query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        elif encoder_hidden_states is None:
            query, key, value = attn.to_qkv(hidden_states).split(attn.to_qkv.part_features, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key, value = attn.to_kv(context).split(attn.to_kv.part_features, dim=-1)
        query = attn.head_to_batch_dim(attn.q_quantizer(query))
        key = attn.head_to_batch_dim(attn.k_quantizer(key))
        value = attn.head_to_batch_dim(attn.v_quantizer(value))
        probs = attn.probs_quantizer(attn.get_attention_scores(query, key, attention_mask))
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))

        if image_shape is not None:
            hidden_states = hidden_states.transpose(-1, -2).reshape(image_shape)
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def quantize_attention(model: nn.Module, bits: int, names: list[str], scheme: ActScheme = "dynamic",
                       groups: int = 1) -> None:
    """Quantize the matmuls of the named ``Attention`` modules."""
    for name in names:
        module = model.get_submodule(name)
        if not isinstance(module, Attention):
            raise ValueError(f"{name!r} is a {type(module).__name__}, not a diffusers Attention module")
        module.q_quantizer = ActQuantizer(bits, scheme, groups)
        module.k_quantizer = ActQuantizer(bits, scheme, groups)
        module.v_quantizer = ActQuantizer(bits, scheme, groups)
        module.probs_quantizer = _probs_quantizer(bits)
        module.set_processor(QuantAttnProcessor())


class QuantAttention(Attention):
    """diffusers' ``Attention`` whose projection fusion knows quantized projections (see the module docstring)."""

    def fuse_projections(self, fuse: bool = True) -> None:
        names = ("to_k", "to_v") if self.is_cross_attention else ("to_q", "to_k", "to_v")
        parts = [getattr(self, n) for n in names]
        if all(type(p) is nn.Linear for p in parts):  # nothing quantized here: diffusers' own fusion
            return super().fuse_projections(fuse)
        reason = fusion_refusal(parts)
        if reason is None and getattr(self, "add_q_proj", None) is not None:
            reason = "added projections (add_q_proj, ...) are not fused"
        if reason is not None:
            _warn_once(f"fuse_qkv_projections: the projections of some attention modules stay separate, as "
                       f"{reason}; their outputs are unchanged")
            self.fused_projections = False
            return
        fused = FusedQuantLinear.from_parts(parts)
        if self.is_cross_attention:
            self.to_kv = fused
        else:
            self.to_qkv = fused
        self.fused_projections = fuse

    def set_processor(self, processor) -> None:
        if isinstance(processor, FusedAttnProcessor2_0):
            if not self.fused_projections:  # kept separate (fuse_projections said why): keep the processor too
                return
            if isinstance(self.processor, QuantAttnProcessor):  # keep the quantized matmuls
                processor = QuantAttnProcessor(fused=True)
        super().set_processor(processor)


def adopt_attention_modules(model: nn.Module) -> None:
    """Make every plain diffusers ``Attention`` module of ``model`` a ``QuantAttention`` (same state, one more
    capability), so that diffusers' ``fuse_qkv_projections()`` works on the quantized model."""
    for module in model.modules():
        if type(module) is Attention:
            module.__class__ = QuantAttention


@functools.lru_cache(maxsize=None)
def _warn_once(message: str) -> None:
    logger.warning(message)
