"""Reconstruction units of a diffusers denoiser, and caching of their inputs and outputs.

A unit is the outermost block of a known kind (ResNet block, attention, transformer block or model, up/down
sampler, timestep embedding) that holds quantized layers; a quantized layer inside no such block is a unit on
its own. Units are returned in the order the model executes them, found by running the model once.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging
from torch import nn

from ..quant.convert import quant_layers
from ..quant.layers import QuantLayerMixin

logger = logging.get_logger(__name__)

UNIT_CLASS_NAMES = {
    "ResnetBlock2D",
    "Attention",
    "QuantAttention",  # an Attention of a converted model (quant/attention.py)
    "BasicTransformerBlock",
    "Transformer2DModel",
    "Downsample2D",
    "Upsample2D",
    "TimestepEmbedding",
}


@dataclass
class Unit:
    name: str
    module: nn.Module
    layers: dict[str, QuantLayerMixin]

    def __repr__(self) -> str:
        return f"Unit({self.name!r}, {type(self.module).__name__}, {len(self.layers)} layers)"


class _StopForward(Exception):
    """Raised from a hook to end a model call once the wanted tensors are captured."""


def _call_model(model: nn.Module, kwargs: dict[str, Any]) -> None:
    try:
        model(**kwargs, return_dict=False)
    except _StopForward:
        pass


def find_units(model: nn.Module, example_call: dict[str, Any]) -> list[Unit]:
    """Units of ``model`` in execution order; ``example_call`` is one denoiser call's keywords."""
    layers = quant_layers(model)
    candidates = [
        (n, m) for n, m in model.named_modules() if n and type(m).__name__ in UNIT_CLASS_NAMES
    ]
    outer: dict[str, nn.Module] = {}
    for n, m in candidates:
        if not any(n.startswith(o + ".") for o in outer):
            outer[n] = m
    units: dict[str, Unit] = {}
    for n, m in outer.items():
        inside = {ln: l for ln, l in layers.items() if ln.startswith(n + ".")}
        if inside:
            units[n] = Unit(n, m, inside)
    for ln, l in layers.items():
        if not any(ln.startswith(u + ".") for u in units):
            units[ln] = Unit(ln, l, {ln: l})

    order: list[str] = []
    handles = [
        u.module.register_forward_pre_hook(lambda mod, args, name=u.name: order.append(name) if name not in order else None)
        for u in units.values()
    ]
    try:
        with torch.no_grad():
            _call_model(model, example_call)
    finally:
        for h in handles:
            h.remove()
    missing = [n for n in units if n not in order]
    if missing:  # never called for this input (e.g. an unused branch): nothing to reconstruct it from
        logger.warning(f"units not executed by the example call are left in full precision: {missing}")
    return [units[n] for n in order]


@dataclass
class UnitCache:
    """Inputs of one unit (positional and keyword) and its full-precision outputs, one row per sample, on CPU."""

    args: list[Any] = field(default_factory=list)
    kwargs: dict[str, Any] = field(default_factory=dict)
    batched_args: list[bool] = field(default_factory=list)
    batched_kwargs: dict[str, bool] = field(default_factory=dict)
    target: torch.Tensor | None = None

    def __len__(self) -> int:
        return 0 if self.target is None else self.target.shape[0]

    def call_inputs(self, idx: torch.Tensor, device, dtype=None) -> tuple[list[Any], dict[str, Any]]:
        def take(v, batched):
            if not batched:
                return v
            t = v[idx]
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            return t.to(device)

        args = [take(v, b) for v, b in zip(self.args, self.batched_args)]
        kwargs = {k: take(v, self.batched_kwargs[k]) for k, v in self.kwargs.items()}
        return args, kwargs


def unit_output(out: Any) -> torch.Tensor:
    """The tensor a unit produces (the first one if it returns several)."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        return unit_output(out[0])
    if hasattr(out, "sample"):
        return out.sample
    raise TypeError(f"cannot find the output tensor of a unit returning {type(out).__name__}")


@torch.no_grad()
def capture_unit_inputs(model: nn.Module, unit: Unit, calls: Iterable[tuple[dict[str, Any], int]]) -> UnitCache:
    """Run ``model`` on every ``(call_kwargs, batch_size)`` and keep ``unit``'s call inputs (stopping right there).

    A tensor whose first dimension is the call's batch size is per-sample and is concatenated across calls;
    anything else is taken from the first call.
    """
    seen: list[tuple[tuple, dict]] = []

    def pre_hook(mod, args, kwargs):
        seen.append((args, kwargs))
        raise _StopForward

    chunks: list[tuple[list[Any], dict[str, Any]]] = []
    handle = unit.module.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        for call, n in calls:
            seen.clear()
            _call_model(model, call)
            if not seen:
                raise RuntimeError(f"unit {unit.name!r} was not called by the model")
            args, kwargs = seen[0]
            chunks.append(([_to_cache(a, n) for a in args], {k: _to_cache(v, n) for k, v in kwargs.items()}))
    finally:
        handle.remove()
    first_args, first_kwargs = chunks[0]
    cache = UnitCache()
    cache.batched_args = [isinstance(a, _Rows) for a in first_args]
    cache.args = [_merge([c[0][i] for c in chunks]) for i in range(len(first_args))]
    cache.batched_kwargs = {k: isinstance(v, _Rows) for k, v in first_kwargs.items()}
    cache.kwargs = {k: _merge([c[1][k] for c in chunks]) for k in first_kwargs}
    return cache


class _Rows:
    """A per-sample tensor of one call, moved to CPU."""

    def __init__(self, t: torch.Tensor):
        self.t = t.detach().cpu()


def _to_cache(value: Any, batch: int) -> Any:
    if torch.is_tensor(value) and value.dim() > 0 and value.shape[0] == batch:
        return _Rows(value)
    return value


def _merge(values: list[Any]) -> Any:
    if isinstance(values[0], _Rows):
        return torch.cat([v.t for v in values])
    return values[0]


@torch.no_grad()
def capture_unit_outputs(model: nn.Module, unit: Unit, calls: Iterable[tuple[dict[str, Any], int]]) -> torch.Tensor:
    """Run ``model`` on every ``(call_kwargs, batch_size)`` and keep ``unit``'s output (stopping right after it)."""
    outs: list[torch.Tensor] = []

    def hook(mod, args, out):
        outs.append(unit_output(out).detach().cpu())
        raise _StopForward

    handle = unit.module.register_forward_hook(hook)
    try:
        for call, _ in calls:
            _call_model(model, call)
    finally:
        handle.remove()
    return torch.cat(outs)
