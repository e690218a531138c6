"""Checks of a pre-quantized checkpoint against its config: a checkpoint that loads is the checkpoint that was saved.

A model rebuilt from its config (``convert.requantize``) knows every quantized tensor the checkpoint must hold, with
its dtype, shape and value range (:func:`quantized_tensor_specs`). :func:`check_checkpoint` checks a checkpoint's
tensors against them in one call and names every disagreement; the loading hooks run the same checks in the order
diffusers hands them the data: the layout against the model's modules before anything is rebuilt
(:func:`check_layout`), the tensor names before any weight loads (:func:`check_presence`), each tensor before it is
used (:func:`check_tensor`).

What a tensor must be:

* ``packed_weight``: uint8 of the layer's packed shape; codes below ``2**w_bits`` (see ``packing.py``);
* ``*.scale``: floating point (frozen layers save float16 when it holds them exactly, earlier checkpoints float32),
  finite and > 0, spanning a range (``scale * (2**bits - 1)``) of at most :data:`MAX_RANGE` (a probabilities
  quantizer's scale is fixed at ``1 / (2**bits - 1)``);
* ``*.zero_point``: uint8 (how frozen layers save them) or floating point, integer-valued, in ``[0, 2**bits - 1]``;
* a dynamic quantizer's ``scale``/``zero_point``: empty, and optional (saved by none but the earliest checkpoints);
* ``input_quantizer.split``: an integer scalar equal to the layout's ``split``;
* ``*.clip`` (clipped dynamic ranges): a floating-point scalar in ``(0, 1]``;
* ``smooth`` (smoothing): floating point of shape ``(in_channels,)``, finite and > 0;
* ``lowrank_down`` / ``lowrank_up`` (a branch of the layout's ``rank``): floating point, finite, of the shapes
  ``(rank, in, kh, kw)`` / ``(out, rank)``; with ``lowrank_bits=8``, int8 (or integer-valued floating point) codes in
  ``[-127, 127]``, and ``lowrank_down_scale`` / ``lowrank_up_scale`` of shapes ``(rank,)`` / ``(out,)`` as scales.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from ..config import GACConfig
from .layers import QUANT_LAYERS, QuantLayerMixin
from .packing import unpack_codes
from .quantizers import ActQuantizer, SplitActQuantizer, WeightQuantizer

# Names that only a diffusers-gac checkpoint holds (a plain model has none of them).
QUANTIZED_SUFFIXES = ("packed_weight", "quantizer.scale", "quantizer.zero_point", "quantizer.split",
                      "quantizer.first.scale", "quantizer.first.zero_point", "quantizer.second.scale",
                      "quantizer.second.zero_point", "quantizer.clip", ".smooth", ".lowrank_down", ".lowrank_up",
                      ".lowrank_down_scale", ".lowrank_up_scale")
MAX_LISTED = 8  # problems named in one error; the rest are counted
# The widest range a quantizer may span (scale * (2**bits - 1)): twice float16's largest value. No weight or
# activation of a model that runs in half precision needs more; a scale beyond it is damage (an exponent bit flipped).
MAX_RANGE = 2 * 65504.0


class CheckpointError(ValueError):
    """A checkpoint whose tensors do not match its quantization config, or a layout that does not fit the model."""

    def __init__(self, problems: list[str], lead: str = "the checkpoint does not match its quantization_config"):
        self.problems = problems
        shown = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        super().__init__(f"{lead} (config.json), so it was not loaded: {shown}{more}")


@dataclass(frozen=True)
class TensorSpec:
    """What one quantized tensor of a checkpoint must be."""

    kind: str  # "codes", "scale", "zero_point", "split", "clip", "factor_codes" or "float" (finite floating point)
    shape: tuple[int, ...]
    bits: int | None = None
    num_codes: int | None = None  # codes per row ("codes")
    value: int | None = None  # the layout's split ("split")
    fixed_scale: float | None = None  # a range known in advance ("scale" of a probabilities quantizer)
    optional: bool = False  # may be absent (the empty tensors of a dynamic quantizer)


def _quantizer_specs(prefix: str, q: nn.Module) -> dict[str, TensorSpec]:
    if isinstance(q, SplitActQuantizer):
        specs = {f"{prefix}.split": TensorSpec("split", (), value=q.channels)}
        specs.update(_quantizer_specs(f"{prefix}.first", q.first))
        specs.update(_quantizer_specs(f"{prefix}.second", q.second))
        return specs
    if not isinstance(q, (ActQuantizer, WeightQuantizer)):
        return {}
    fixed = 1.0 / (2**q.bits - 1) if getattr(q, "fixed_range", False) else None
    optional = q.scale.numel() == 0
    specs = {f"{prefix}.scale": TensorSpec("scale", tuple(q.scale.shape), q.bits, fixed_scale=fixed, optional=optional),
             f"{prefix}.zero_point": TensorSpec("zero_point", tuple(q.zero_point.shape), q.bits, optional=optional)}
    if getattr(q, "clip", None) is not None:
        specs[f"{prefix}.clip"] = TensorSpec("clip", ())
    return specs


def quantized_tensor_specs(model: nn.Module) -> dict[str, TensorSpec]:
    """Every quantized tensor a model rebuilt by ``requantize`` expects from its checkpoint, by state-dict name."""
    specs: dict[str, TensorSpec] = {}
    for name, module in model.named_modules():
        if isinstance(module, QuantLayerMixin) and not module.derived:  # fused projections are not saved
            specs[f"{name}.packed_weight"] = TensorSpec("codes", tuple(module.packed_weight.shape), module.w_bits,
                                                        num_codes=module.codes_per_channel)
            specs.update(_quantizer_specs(f"{name}.weight_quantizer", module.weight_quantizer))
            if module.input_quantizer is not None:
                specs.update(_quantizer_specs(f"{name}.input_quantizer", module.input_quantizer))
            if module.smooth is not None:
                specs[f"{name}.smooth"] = TensorSpec("scale", tuple(module.smooth.shape))
            coded = module.lowrank_up_scale is not None
            for t in ("lowrank_down", "lowrank_up"):
                if getattr(module, t) is not None:
                    kind = "factor_codes" if coded else "float"
                    specs[f"{name}.{t}"] = TensorSpec(kind, tuple(getattr(module, t).shape))
                if coded:
                    specs[f"{name}.{t}_scale"] = TensorSpec("scale", tuple(getattr(module, f"{t}_scale").shape))
        elif isinstance(module, Attention):
            for q in ("q_quantizer", "k_quantizer", "v_quantizer", "probs_quantizer"):
                if hasattr(module, q):
                    specs.update(_quantizer_specs(f"{name}.{q}", getattr(module, q)))
    return specs


def looks_quantized(key: str) -> bool:
    return key.endswith(QUANTIZED_SUFFIXES)


def check_layout(model: nn.Module, config: GACConfig) -> None:
    """The layout names modules the model has, of the kinds it says: Conv2d/Linear layers (a split only on a
    convolution, smaller than its input channels) and Attention modules. Run before the model is rebuilt."""
    problems = []
    modules = dict(model.named_modules())
    for name, spec in config.layout.layers.items():
        module = modules.get(name)
        if module is None:
            problems.append(f"layout names layer {name!r}, which {type(model).__name__} does not have")
        elif type(module) not in QUANT_LAYERS:
            problems.append(f"layout names {name!r} as a Conv2d/Linear layer but it is a {type(module).__name__}")
        elif spec["split"] is not None and not (isinstance(module, nn.Conv2d) and spec["split"] < module.in_channels):
            problems.append(f"layout gives {name!r} a split input at channel {spec['split']}, which it cannot have")
        elif spec.get("rank") and (getattr(module, "groups", 1) != 1 or spec["rank"] > min(
                module.weight.shape[0], module.weight[0].numel()) // 2):
            problems.append(f"layout gives {name!r} a low-rank branch of rank {spec['rank']}, more than half its "
                            f"weight's smaller dimension (or a grouped convolution)")
    for name in config.layout.attention:
        if not isinstance(modules.get(name), Attention):
            problems.append(f"layout names {name!r} as an Attention module but it is "
                            f"{type(modules[name]).__name__ if name in modules else 'missing'}")
    if problems:
        raise CheckpointError(problems, f"the layout of the quantization_config does not fit {type(model).__name__}")


def owner(key: str) -> str:
    """The layer or attention module a quantized tensor belongs to."""
    return re.split(r"\.(?:packed_weight|smooth|lowrank_\w+|\w+_quantizer)(?:\.|$)", key)[0]


def check_presence(specs: Mapping[str, TensorSpec], keys: Iterable[str]) -> list[str]:
    """Problems with the tensor names: quantized tensors the config implies but the checkpoint lacks, and quantized
    tensors the checkpoint holds but the config does not know (a layer missing from its layout)."""
    keys = set(keys)
    missing = sorted(k for k, spec in specs.items() if k not in keys and not spec.optional)
    extra = sorted(k for k in keys if k not in specs and looks_quantized(k))
    problems = []
    if missing:
        problems.append(f"{len(missing)} quantized tensors the config implies are missing from the weights: "
                        f"{', '.join(missing[:MAX_LISTED])}{' ...' if len(missing) > MAX_LISTED else ''}")
    if extra:
        layers = sorted({owner(k) for k in extra})
        problems.append(f"{len(extra)} quantized tensors in the weights belong to no layer of the layout: "
                        f"{', '.join(extra[:MAX_LISTED])}{' ...' if len(extra) > MAX_LISTED else ''} "
                        f"(layers: {', '.join(layers[:MAX_LISTED])})")
    return problems


def check_tensor(name: str, tensor: torch.Tensor, spec: TensorSpec) -> list[str]:
    """Problems with one quantized tensor: dtype, shape and values."""
    if spec.kind == "codes":
        if tensor.dtype != torch.uint8:
            return [f"{name} is stored as {tensor.dtype}; packed weight codes are torch.uint8"]
    elif spec.kind == "split":
        if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
            return [f"{name} is stored as {tensor.dtype}; a split is an integer"]
    elif spec.kind == "zero_point" and tensor.dtype == torch.uint8:
        pass  # frozen layers save their zero points as uint8 (exact: integers in [0, 2**bits - 1])
    elif spec.kind == "factor_codes" and tensor.dtype == torch.int8:
        pass  # 8-bit low-rank factors are saved as int8 codes
    elif not tensor.dtype.is_floating_point:
        allowed = {"zero_point": "uint8 or floating point", "factor_codes": "int8 or floating point"}.get(
            spec.kind, "floating point")
        what = {"scale": "a quantizer scale", "zero_point": "a quantizer zero point",
                "factor_codes": "a low-rank factor"}.get(spec.kind, "it")
        return [f"{name} is stored as {tensor.dtype}; {what} is {allowed} "
                "(an integer copy would have lost its fractional part)"]
    if tuple(tensor.shape) != spec.shape:
        return [f"{name} has shape {tuple(tensor.shape)} but the config implies {spec.shape}"]
    values = tensor.detach().to("cpu")
    if spec.kind == "codes":
        if spec.bits not in (4, 8) and values.numel():
            top = int(unpack_codes(values, spec.num_codes, spec.bits).max())
            if top >= 2**spec.bits:
                return [f"{name} holds code {top}, outside the {spec.bits}-bit range [0, {2**spec.bits - 1}]"]
        return []
    if spec.kind == "split":
        return [] if int(values) == spec.value else [f"{name} is {int(values)} but the layout says {spec.value}"]
    values = values.double()
    if not torch.isfinite(values).all():
        return [f"{name} holds {int((~torch.isfinite(values)).sum())} non-finite values (NaN or inf)"]
    if spec.kind == "float":
        return []
    if spec.kind == "factor_codes":
        if (values != values.round()).any() or (values.abs() > 127).any():
            return [f"{name} holds values outside the 8-bit factor codes, the integers -127..127"]
        return []
    if spec.kind == "clip":
        ok = 0 < float(values) <= 1
        return [] if ok else [f"{name} is {float(values):.6g}; a clipping ratio lies in (0, 1]"]
    if spec.kind == "scale":
        if (values <= 0).any():
            return [f"{name} holds {int((values <= 0).sum())} scales <= 0; a scale is positive"]
        if spec.fixed_scale is not None and not torch.allclose(values, torch.full_like(values, spec.fixed_scale)):
            return [f"{name} must be the fixed step {spec.fixed_scale:.6g} of {spec.bits}-bit probabilities"]
        if spec.bits is not None and values.numel() and float(values.max()) * (2**spec.bits - 1) > MAX_RANGE:
            return [f"{name} holds a scale of {float(values.max()):.4g}: a {spec.bits}-bit range of "
                    f"{float(values.max()) * (2**spec.bits - 1):.4g}, wider than any weight or activation needs "
                    f"(at most {MAX_RANGE:g}, twice float16's largest value)"]
        return []
    qmax = 2**spec.bits - 1
    if (values != values.round()).any() or (values < 0).any() or (values > qmax).any():
        return [f"{name} holds zero points outside the integers 0..{qmax} of {spec.bits} bits"]
    return []


def check_checkpoint(model: nn.Module, config: GACConfig, tensors: Mapping[str, torch.Tensor],
                     where: str = "the checkpoint") -> None:
    """Check a checkpoint's tensors against its config in one call; ``model`` is the model rebuilt from the config
    (``requantize``). Raises :class:`CheckpointError` naming every problem. The config's own consistency (top-level
    bits against the layers) is checked when the config is built."""
    specs = quantized_tensor_specs(model)
    problems = check_presence(specs, tensors.keys())
    for name, spec in specs.items():
        if name in tensors:
            problems += check_tensor(name, tensors[name], spec)
    if problems:
        raise CheckpointError(problems, f"{where} does not match its quantization_config")
