"""Activation-side levers for 4-bit activations, and the per-layer search that sets them on calibration inputs.

Four options of ``GACConfig`` (all off by default), each keeping the layer's float function exact and each composing
with reconstruction (AdaRound learns the rounding of whatever weight the layer quantizes) and any sample weighting:

* ``act_group_size`` (dynamic activations): a range per token and per group of input channels
  (``ActQuantizer.channel_groups``), so one outlier channel costs its group's resolution only.
* ``act_clipping`` (dynamic activations): every token's range shrunk by a per-layer ratio ``clip`` (searched here).
* ``smoothing``: a per-input-channel scale ``s`` moved from the input into the weight, ``W x = (W s)(x / s)``
  (SmoothQuant), with ``s_j = max|x_j|^a / max|W_:j|^(1-a)`` and the strength ``a`` searched per layer here (or no
  smoothing, ``s = 1``, when that measures best). The division runs before the input is quantized.
* ``lowrank_rank``: ``W s = up @ down + R``, the top singular directions of the smoothed weight kept as a float
  branch ``up(down(x / s))`` (``down`` has the layer's geometry: a kxk convolution, or a linear map; ``up`` is 1x1),
  and only the residual ``R`` quantized (SVDQuant). The factors share the singular values evenly
  (``sqrt(S)`` on each side), so both fit float16. With ``lowrank_bits=8`` they are int8 codes instead, symmetric
  per row with one scale per row of each (``lowrank_down_scale`` ``(r,)``, ``lowrank_up_scale`` ``(out,)``), rounded
  before the residual is taken, so the residual absorbs their rounding and the split stays exact.

The search (:func:`search_levers`) runs once per layer, on the inputs the layer sees during calibration, before its
activation ranges are set and its rounding learned: each candidate (a smoothing strength, then a clipping ratio) is
scored by the layer's output error against the float layer with round-to-nearest weights and per-token (or
per-group) input quantization, and the best is kept. Static and timestep schemes are scored with per-token ranges
as a stand-in, since their ranges are set afterwards on the inputs the chosen smoothing gives.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActQuantizer, input_parts

SMOOTHING_STRENGTHS = (None, 0.2, 0.35, 0.5, 0.65, 0.8)  # None: no smoothing (s = 1)
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.6, 0.5)
EPS = 1e-5
FACTOR_CODE_MAX = 127  # 8-bit factors: symmetric codes in [-127, 127]
FLOAT16_TINY, FLOAT16_MAX = torch.finfo(torch.float16).tiny, torch.finfo(torch.float16).max


def layer_rank(weight_shape: tuple[int, ...], rank: int | float) -> int:
    """The rank of a layer's low-rank branch under ``GACConfig.lowrank_rank``: ``rank`` (an integer) or that fraction
    of the smaller weight dimension, at most half of it (a branch as wide as the weight would keep it all in float)."""
    smaller = min(weight_shape[0], math.prod(weight_shape[1:]))
    wanted = rank if isinstance(rank, int) else round(rank * smaller)
    return max(0, min(wanted, smaller // 2))


def add_buffers(layer: nn.Module, smoothing: bool, rank: int, rank_bits: int = 16) -> None:
    """Give ``layer`` its lever buffers (identity values: the function is unchanged until the search sets them);
    ``rank_bits`` 8 adds the factors' row scales (the factors then hold int8 codes)."""
    device = layer.weight.device
    shape = layer.weight_shape
    coded = rank and rank_bits == 8
    dtype = torch.int8 if coded else None  # int8 codes stay int8 in memory (and through model.to(dtype))
    layer.register_buffer("smooth", torch.ones(shape[1], device=device) if smoothing else None)
    layer.register_buffer("lowrank_down", torch.zeros(rank, *shape[1:], device=device, dtype=dtype) if rank else None)
    layer.register_buffer("lowrank_up", torch.zeros(shape[0], rank, device=device, dtype=dtype) if rank else None)
    layer.register_buffer("lowrank_down_scale", torch.ones(rank, device=device) if coded else None)
    layer.register_buffer("lowrank_up_scale", torch.ones(shape[0], device=device) if coded else None)


def _channel_view(layer: nn.Module, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``v`` (one value per input channel) shaped to broadcast over ``x``."""
    dim = layer.channel_dim % x.dim()
    return v.view(-1, *([1] * (x.dim() - dim - 1))).to(x.dtype)


def smooth_input(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return x if layer.smooth is None else x / _channel_view(layer, x, layer.smooth)


def factors(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch's ``down`` and ``up`` factors as float values (8-bit codes times their row scales)."""
    down, up = layer.lowrank_down, layer.lowrank_up
    if layer.lowrank_up_scale is None:
        return down, up
    return down * layer.lowrank_down_scale.view(-1, *([1] * (down.dim() - 1))), up * layer.lowrank_up_scale[:, None]


def branch(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The low-rank branch on the (smoothed) input ``x``."""
    down, up = (f.to(x.dtype) for f in factors(layer))
    if isinstance(layer, nn.Conv2d):
        h = F.conv2d(x, down, None, layer.stride, layer.padding, layer.dilation)
        return F.conv2d(h, up[:, :, None, None])
    return F.linear(F.linear(x, down), up)


def add_branch(layer: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return y if layer.lowrank_up is None else y + branch(layer, x)


def lowrank_weight(layer: nn.Module) -> torch.Tensor:
    """``up @ down`` in the weight's shape (zero without a branch)."""
    if layer.lowrank_up is None:
        return torch.zeros(layer.weight_shape, device=layer.weight_quantizer.scale.device)
    down, up = factors(layer)
    return (up.float() @ down.float().flatten(1)).view(layer.weight_shape)


def float_weight(layer: nn.Module, residual: torch.Tensor) -> torch.Tensor:
    """The plain layer's weight equivalent to ``residual`` with the branch and smoothing folded back in."""
    w = residual.float() + lowrank_weight(layer).to(residual.device)
    if layer.smooth is not None:
        w = w / layer.smooth.float().view(1, -1, *([1] * (w.dim() - 2)))
    return w.to(residual.dtype)


@torch.no_grad()
def set_levers(layer: nn.Module, weight: torch.Tensor, smooth: torch.Tensor | None) -> None:
    """Set the smoothing to ``smooth`` (None: keep 1) and split the smoothed float ``weight`` into the branch and the
    residual the layer quantizes; the weight quantizer's range is set again for the residual."""
    w = weight.float()
    if layer.smooth is not None:
        s = torch.ones_like(layer.smooth) if smooth is None else smooth.float()
        layer.smooth.copy_(s)
        w = w * s.view(1, -1, *([1] * (w.dim() - 2)))
    if layer.lowrank_up is not None:
        rank = layer.lowrank_up.shape[1]
        u, sv, vh = torch.linalg.svd(w.flatten(1), full_matrices=False)
        root = sv[:rank].sqrt()
        up, down = u[:, :rank] * root, root[:, None] * vh[:rank]
        if layer.lowrank_up_scale is not None:
            (down, down_scale), (up, up_scale) = _codes(down), _codes(up)
            layer.lowrank_down_scale.copy_(down_scale)
            layer.lowrank_up_scale.copy_(up_scale)
        layer.lowrank_up.copy_(up)
        layer.lowrank_down.copy_(down.view(layer.lowrank_down.shape))
        w = w - lowrank_weight(layer)
    layer.weight.data.copy_(w.to(layer.weight.dtype))
    layer.weight_quantizer.init_range(layer.weight)


def _codes(factor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric 8-bit codes of each row of ``factor`` and the row scales (float16 values, so a frozen checkpoint
    holds them exactly; at least float16's smallest normal number)."""
    scale = (factor.abs().amax(1) / FACTOR_CODE_MAX).clamp(FLOAT16_TINY, FLOAT16_MAX).half().float()
    return (factor / scale[:, None]).round().clamp(-FACTOR_CODE_MAX, FACTOR_CODE_MAX), scale


def _quantize_tokens(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input quantized as the search scores it: its own dynamic quantizers, or per-token stand-ins."""
    parts = input_parts(layer.input_quantizer)
    if len(parts) == 2:
        k = int(layer.input_quantizer.split)
        pieces = x.split([k, x.shape[1] - k], dim=1)
    else:
        pieces = [x]
    out = []
    for q, piece in zip(parts, pieces):
        if q.scheme != "dynamic":
            q = ActQuantizer(q.bits, "dynamic", channel_dim=q.channel_dim)
        out.append(q._quantize(piece.float() if piece.dtype != torch.float32 else piece).to(piece.dtype))
    return torch.cat(out, dim=1) if len(out) == 2 else out[0]


def _candidate_error(layer: nn.Module, inputs: list[torch.Tensor], targets: list[torch.Tensor],
                     reduce: Callable[[torch.Tensor], torch.Tensor]) -> float:
    total = torch.zeros(1, dtype=torch.float64)
    w = layer.weight_quantizer(layer.weight)
    for x, target in zip(inputs, targets):
        xs = smooth_input(layer, x)
        y = add_branch(layer, xs, layer._float_op(_quantize_tokens(layer, xs), w, layer.bias))
        total += (y.float() - target).pow(2).sum().double().cpu()
    return float(reduce(total))


@torch.no_grad()
def search_levers(layer: nn.Module, inputs: list[torch.Tensor],
                  reduce_sum: Callable[[torch.Tensor], torch.Tensor] = lambda t: t,
                  reduce_max: Callable[[torch.Tensor], torch.Tensor] = lambda t: t) -> dict[str, float | None]:
    """Choose ``layer``'s smoothing strength and clipping ratio on ``inputs`` (the layer's raw inputs, a list of
    batches) and set them; ``reduce_sum``/``reduce_max`` combine a statistic over data-parallel processes. Returns
    what was chosen. A layer without levers to search is left as it is."""
    clipped = [q for q in input_parts(layer.input_quantizer) if q.clip is not None] if layer.input_quantizer else []
    if layer.smooth is None and layer.lowrank_up is None and not clipped:
        return {}
    weight = layer.weight.detach().clone()
    targets = [layer._float_op(x, weight.to(x.dtype), layer.bias).float() for x in inputs]
    chosen: dict[str, float | None] = {}
    candidates: list[torch.Tensor | None] = [None]
    if layer.smooth is not None:
        dims = [d for d in range(inputs[0].dim()) if d != layer.channel_dim % inputs[0].dim()]
        x_max = torch.stack([x.detach().abs().float().amax(dims) for x in inputs]).amax(0)
        x_max = reduce_max(x_max).clamp_min(EPS)
        w_max = weight.abs().float().transpose(0, 1).flatten(1).amax(1).clamp_min(EPS)
        candidates = [None if a is None else (x_max.pow(a) / w_max.pow(1 - a)).clamp(EPS, 1 / EPS)
                      for a in SMOOTHING_STRENGTHS]
    if layer.input_quantizer is None or len(candidates) == 1:
        set_levers(layer, weight, None)
    else:
        errors = []
        for smooth in candidates:
            set_levers(layer, weight, smooth)
            errors.append(_candidate_error(layer, inputs, targets, reduce_sum))
        best = min(range(len(errors)), key=errors.__getitem__)
        set_levers(layer, weight, candidates[best])
        chosen["smoothing"] = SMOOTHING_STRENGTHS[best] if layer.smooth is not None else None
    if clipped:
        errors = []
        for ratio in CLIP_RATIOS:
            for q in clipped:
                q.clip.fill_(ratio)
            errors.append(_candidate_error(layer, inputs, targets, reduce_sum))
        best = CLIP_RATIOS[min(range(len(errors)), key=errors.__getitem__)]
        for q in clipped:
            q.clip.fill_(best)
        chosen["clip"] = best
    return chosen
