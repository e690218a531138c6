"""Fused projections: the q/k/v (or k/v) projections of an attention module as one quantized linear layer.

diffusers' ``fuse_qkv_projections()`` concatenates the three projection weights into one ``to_qkv`` Linear (``to_kv``
for cross-attention), so the input is read once and multiplied in one GEMM. For frozen quantized projections the
same holds exactly when all three quantize their shared input the same way: then one quantization of the input and
one integer GEMM over the concatenated codes give, column for column, what the three layers give. That is the case
in the default dynamic per-token scheme (and for static ranges that came out equal); per-layer smoothing, clipping
ratios, static ranges or low-rank branches give each projection its own input and are not fused
(:func:`fusion_refusal` says why).

A ``FusedQuantLinear`` is derived state, like diffusers' fused Linear: the separate projections stay (so unfusing
works) and stay the only thing a checkpoint holds. Its state is not saved, and loading a state dict into the model
rebuilds it from the projections, so a fused model saves and loads exactly what the unfused one does. Its input
quantizer *is* the first projection's (one module, shared: timestep groups reach it as they reach the projection); its
execution settings are the first projection's when it is built or rebuilt, and `set_execution(model, ...)` reaches it.

Per-output tensors of the fused layer, rows in the parts' order (the rest is the parts' common state)::

    packed_weight                  uint8 (sum(out), ceil(k/2) or k)    the parts' packed rows, one after another
    bias                           float (sum(out),)                    the parts' biases
    weight_quantizer.scale         float (sum(out), 1)                  per output channel, as in each part
    weight_quantizer.zero_point    float (sum(out), 1)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from . import intexec
from .layers import QuantLinear
from .packing import pack_codes

PER_OUTPUT = ("packed_weight", "bias", "weight_quantizer.scale", "weight_quantizer.zero_point")


def fusion_refusal(parts: Sequence[nn.Module]) -> str | None:
    """Why ``parts`` cannot run as one fused quantized linear layer exactly, or ``None`` when they can."""
    if not all(isinstance(p, QuantLinear) for p in parts):
        kinds = sorted({type(p).__name__ for p in parts})
        return f"they are not all quantized linear layers ({', '.join(kinds)})"
    if not all(p.frozen for p in parts):
        return "they are not frozen yet (calibrate or freeze_model first)"
    if any(p.lowrank_down is not None for p in parts):
        return "they have low-rank branches (lowrank_rank)"
    for attr in ("in_features", "w_bits", "a_bits"):
        if len({getattr(p, attr) for p in parts}) > 1:
            return f"their {attr} differ"
    if len({p.bias is None for p in parts}) > 1:
        return "some have a bias and some do not"
    states = [p.state_dict() for p in parts]
    shared = [k for k in states[0] if k not in PER_OUTPUT]
    for state in states[1:]:
        if set(state) != set(states[0]):
            return "their quantized state has different tensors"
        for k in shared:
            if state[k].shape != states[0][k].shape or not torch.equal(state[k], states[0][k]):
                return f"each quantizes its input its own way ({k} differs: per-layer ranges or levers)"
    return None


class FusedQuantLinear(QuantLinear):
    """Frozen quantized linear layers that read the same input, as one layer (see the module docstring). Build it
    with :meth:`from_parts`; ``part_features`` are the parts' output widths, to split its output with."""

    part_features: tuple[int, ...]
    derived = True

    @classmethod
    @torch.no_grad()
    def from_parts(cls, parts: Sequence[QuantLinear]) -> "FusedQuantLinear":
        reason = fusion_refusal(parts)
        if reason is not None:
            raise ValueError(f"cannot fuse these layers exactly: {reason}")
        first = parts[0]
        q = first.input_quantizer
        layer = cls.from_module(
            nn.Linear(first.in_features, sum(p.out_features for p in parts), bias=first.bias is not None,
                      device="meta"),
            w_bits=first.w_bits, a_bits=first.a_bits, weight_init=first.weight_quantizer.init,
            act_scheme=q.scheme if q is not None else "static", group_size=getattr(q, "group_size", None),
            clipping=getattr(q, "clip", None) is not None, smoothing=first.smooth is not None)
        layer.make_frozen_placeholder()
        layer._parts = list(parts)  # a plain list: not submodules of the fused layer (the attention module owns them)
        layer.part_features = tuple(p.out_features for p in parts)
        layer.register_state_dict_post_hook(_drop_derived_state)
        layer.register_load_state_dict_post_hook(_rebuild_after_load)
        layer.rebuild()
        return layer

    @torch.no_grad()
    def rebuild(self) -> None:
        """Take the parts' current state again (after they loaded new weights) and their execution settings."""
        parts = self._parts
        reason = fusion_refusal(parts)
        if reason is not None:
            raise ValueError(f"the fused projections no longer fuse exactly ({reason}); unfuse the model's "
                             "projections (or rebuild the model) before changing them")
        first = parts[0]
        intexec.to_fake(self)
        codes = torch.cat([intexec.weight_codes(p) for p in parts])
        self.packed_weight = pack_codes(codes, self.w_bits)
        cat = lambda get: torch.cat([get(p).detach() for p in parts])  # noqa: E731
        self.weight_quantizer.scale = cat(lambda p: p.weight_quantizer.scale)
        self.weight_quantizer.zero_point = cat(lambda p: p.weight_quantizer.zero_point)
        if self.bias is not None:
            self.bias = nn.Parameter(cat(lambda p: p.bias), requires_grad=False)
        self.input_quantizer = first.input_quantizer  # shared: one module, one state
        self.smooth = first.smooth
        self._integer_storage, self._integer_auto = first._integer_storage, first._integer_auto
        self._gpu_path = first._gpu_path
        self._sync_execution()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs) -> None:
        self._load_prefix = prefix  # nothing to load: rebuilt from the parts once they have loaded


def _drop_derived_state(layer: FusedQuantLinear, state_dict: dict, prefix: str, local_metadata) -> None:
    """Derived from the parts, which the checkpoint holds: the fused layer and its children save nothing."""
    for key in [k for k in state_dict if k.startswith(prefix)]:
        del state_dict[key]


def _rebuild_after_load(layer: FusedQuantLinear, incompatible_keys) -> None:
    prefix = layer._load_prefix  # set by _load_from_state_dict, which a load calls before this hook
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not k.startswith(prefix)]
    layer.rebuild()
