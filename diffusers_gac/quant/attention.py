"""Quantization of the attention matmuls (q @ k^T and probs @ v) through a diffusers attention processor.

``quantize_attention(model, bits, ...)`` adds four activation quantizers to every diffusers ``Attention`` module,
as submodules so they are saved with the model::

    <attn>.q_quantizer, <attn>.k_quantizer, <attn>.v_quantizer   ActQuantizer (the config's scheme)
    <attn>.probs_quantizer                                         ActQuantizer over [0, 1], fixed step 1/(2^bits-1)

and sets ``QuantAttnProcessor``, which computes the same attention as diffusers' ``AttnProcessor`` with the
queries, keys and values quantized per token (before the head split) and the softmax probabilities quantized.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from .quantizers import ActQuantizer, ActScheme


def _probs_quantizer(bits: int) -> ActQuantizer:
    q = ActQuantizer(bits, "static", groups=1)
    q.scale.fill_(1.0 / (2**bits - 1))  # probabilities live in [0, 1]: nothing to observe or learn
    q.fixed_range = True
    return q


class QuantAttnProcessor:
    """Attention with quantized matmul inputs; reads its quantizers from the ``Attention`` module it serves."""

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

        query = attn.head_to_batch_dim(attn.q_quantizer(attn.to_q(hidden_states)))
        key = attn.head_to_batch_dim(attn.k_quantizer(attn.to_k(context)))
        value = attn.head_to_batch_dim(attn.v_quantizer(attn.to_v(context)))
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
