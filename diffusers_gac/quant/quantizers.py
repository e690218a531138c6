"""Fake quantizers: uniform affine weights (with learned AdaRound rounding) and activations (three schemes).

All state lives in named buffers and parameters whose shapes follow from the layer and the config alone, so a
quantized model can be rebuilt from its config before its weights load:

* ``WeightQuantizer``: ``scale`` and ``zero_point`` of shape ``(out_channels, 1, ...)``; ``alpha`` (the AdaRound
  variable, same shape as the weight) exists only while rounding is being learned.
* ``ActQuantizer``: ``scale`` and ``zero_point`` of shape ``(groups,)`` (``groups`` is 1 for the ``static``
  scheme, the number of timestep groups for ``timestep``, and 0 for ``dynamic``, which computes ranges per token).
* ``SplitActQuantizer``: two ``ActQuantizer`` for the two parts of a concatenated input and a ``split`` buffer.

A dynamic ``ActQuantizer`` may compute its ranges per token and per group of ``group_size`` input channels, and
shrink them by a searched ratio ``clip`` (a scalar buffer, present only with clipping; ``levers.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import nn

from ..checks import check_bits, check_choice
from ..config import ACT_SCHEMES, WEIGHT_INITS
from ..denoisers import HALF_DTYPES

WeightInit = Literal["minmax", "mse"]
ActScheme = Literal["static", "timestep", "dynamic"]
RoundingMode = Literal["nearest", "learned", "hard", "hard_ste"]

# AdaRound's rectified sigmoid stretch (Nagel et al. 2020).
ZETA, GAMMA = 1.1, -0.1


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round to nearest with a straight-through gradient."""
    return (x.round() - x).detach() + x


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> torch.Tensor:
    """Uniform affine quantize-dequantize with straight-through rounding; gradients reach ``x`` and ``scale``."""
    qmax = 2**bits - 1
    q = torch.clamp(round_ste(x / scale) + zero_point, 0, qmax)
    return (q - zero_point) * scale


def affine_params(lo: torch.Tensor, hi: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and (integer-valued) zero point covering ``[lo, hi]``; the range always contains 0."""
    lo, hi = torch.minimum(lo, torch.zeros_like(lo)), torch.maximum(hi, torch.zeros_like(hi))
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-8)
    zero_point = torch.round(-lo / scale)
    return scale, zero_point


def mse_range_search(
    x: torch.Tensor, bits: int, dim: int | None, grid: int = 80, p: float = 2.4
) -> tuple[torch.Tensor, torch.Tensor]:
    """Shrink the min-max range by the factor (per slice along ``dim``) that minimises the L_p quantization error."""
    if dim is None:
        flat = x.reshape(1, -1)
    else:
        flat = x.transpose(0, dim).reshape(x.shape[dim], -1)
    lo, hi = flat.min(1).values, flat.max(1).values
    best_err = torch.full_like(lo, float("inf"))
    best_lo, best_hi = lo.clone(), hi.clone()
    for i in range(grid):
        ratio = 1.0 - i / (grid + 20)
        s, z = affine_params(lo * ratio, hi * ratio, bits)
        err = (fake_quantize(flat, s[:, None], z[:, None], bits) - flat).abs().pow(p).mean(1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_lo = torch.where(better, lo * ratio, best_lo)
        best_hi = torch.where(better, hi * ratio, best_hi)
    return affine_params(best_lo, best_hi, bits)


class WeightQuantizer(nn.Module):
    """Per-output-channel uniform affine weight quantizer with optional learned rounding (AdaRound).

    ``rounding`` is ``"nearest"`` (round-to-nearest), ``"learned"`` (soft rounding ``floor + h(alpha)``, used while
    calibrating), ``"hard"`` (``floor + 1[h(alpha) >= 0.5]``, the choice learned) or ``"hard_ste"`` (the hard choice
    in the forward pass, the soft rounding's gradient in the backward pass: the error reconstruction ends with, with
    gradients to learn from). ``harden()`` bakes the hard choice into integer codes and drops ``alpha``.
    """

    def __init__(self, weight_shape: torch.Size | tuple[int, ...], bits: int, init: WeightInit = "mse"):
        super().__init__()
        check_bits("w_bits", bits)
        check_choice("weight_init", init, WEIGHT_INITS)
        self.bits, self.init = bits, init
        channel_shape = (weight_shape[0],) + (1,) * (len(weight_shape) - 1)
        self.register_buffer("scale", torch.ones(channel_shape))
        self.register_buffer("zero_point", torch.zeros(channel_shape))
        self.alpha: nn.Parameter | None = None
        self.rounding: RoundingMode = "nearest"

    @property
    def qmax(self) -> int:
        return 2**self.bits - 1

    @torch.no_grad()
    def init_range(self, weight: torch.Tensor) -> None:
        w = weight.detach().float()
        if self.init == "mse":
            s, z = mse_range_search(w, self.bits, dim=0)
        else:
            flat = w.reshape(w.shape[0], -1)
            s, z = affine_params(flat.min(1).values, flat.max(1).values, self.bits)
        self.scale.copy_(s.view_as(self.scale))
        self.zero_point.copy_(z.view_as(self.zero_point))

    def init_rounding(self, weight: torch.Tensor) -> None:
        """Start learning the rounding: ``alpha`` is set so that ``h(alpha)`` equals the fractional part."""
        w = weight.detach().float() / self.scale
        rest = (w - w.floor()).clamp(1e-4, 1 - 1e-4)
        alpha = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1)
        self.alpha = nn.Parameter(alpha.to(weight.dtype))
        self.rounding = "learned"

    def soft_rounding(self) -> torch.Tensor:
        return torch.clamp(torch.sigmoid(self.alpha) * (ZETA - GAMMA) + GAMMA, 0, 1)

    def rounding_regularizer(self, beta: float) -> torch.Tensor:
        """AdaRound's ``sum(1 - |2h - 1|^beta)``: zero once every rounding choice is made."""
        return (1 - (2 * self.soft_rounding() - 1).abs().pow(beta)).sum()

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes in ``[0, 2**bits - 1]`` (as float) under the current rounding mode."""
        w = weight / self.scale
        if self.rounding == "nearest":
            q = torch.round(w)
        elif self.rounding == "learned":
            q = torch.floor(w) + self.soft_rounding()
        elif self.rounding == "hard_ste":
            soft = self.soft_rounding()
            q = torch.floor(w) + soft + ((self.alpha >= 0).to(w.dtype) - soft).detach()
        else:
            q = torch.floor(w) + (self.alpha >= 0).to(w.dtype)
        return torch.clamp(q + self.zero_point, 0, self.qmax)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return (self.codes(weight) - self.zero_point) * self.scale

    @torch.no_grad()
    def harden(self, weight: torch.Tensor) -> torch.Tensor:
        """Integer codes (as float) under the hard rounding choice; afterwards ``alpha`` is gone."""
        if self.rounding == "learned":
            self.rounding = "hard"
        codes = self.codes(weight)
        self.alpha = None
        self.rounding = "nearest"
        return codes

    def extra_repr(self) -> str:
        return f"bits={self.bits}, init={self.init}, rounding={self.rounding}"


class ActQuantizer(nn.Module):
    """Uniform affine activation quantizer.

    * ``static``: one range per tensor, initialised from observed data, step size learned (LSQ-style).
    * ``timestep``: one range per timestep group (``groups`` contiguous bands of the training timesteps); the
      group of every sample comes from ``TimestepContext`` which the converted model fills before each call.
    * ``dynamic``: a range per token computed on the fly (per spatial position for convolutions, per row for
      linear layers); nothing to calibrate.
    """

    def __init__(self, bits: int, scheme: ActScheme = "static", groups: int = 1, channel_dim: int = -1,
                 group_size: int | None = None, clipping: bool = False):
        super().__init__()
        check_bits("a_bits", bits)
        check_choice("act_scheme", scheme, ACT_SCHEMES)
        if (group_size or clipping) and scheme != "dynamic":
            raise ValueError("act_group_size and act_clipping need act_scheme='dynamic'")
        self.bits, self.scheme, self.channel_dim = bits, scheme, channel_dim
        self.group_size = group_size
        # the ratio every dynamic range is shrunk by (searched per layer, levers.py); None: no clipping
        self.register_buffer("clip", torch.ones(()) if clipping else None)
        n = {"static": 1, "timestep": groups, "dynamic": 0}[scheme]
        # buffers, not parameters: the reconstruction loop turns on requires_grad for the step sizes it learns; a
        # dynamic quantizer's are empty and not saved (nothing to store)
        self.register_buffer("scale", torch.ones(n), persistent=n > 0)
        self.register_buffer("zero_point", torch.zeros(n), persistent=n > 0)
        self.context: TimestepContext | None = None
        self.enabled = True
        self.fixed_range = False  # a range known in advance (softmax probabilities): never observed or learned
        self._observed: list[list[torch.Tensor]] | None = None

    @property
    def groups(self) -> int:
        return self.scale.numel()

    # -- range initialisation -------------------------------------------------------------------------------
    def start_observing(self) -> None:
        if not self.fixed_range:
            self._observed = [[] for _ in range(max(self.groups, 1))]

    @torch.no_grad()
    def _observe(self, x: torch.Tensor) -> None:
        per_sample = x.detach().float().reshape(x.shape[0], -1)
        # keep a bounded, evenly strided subset of each sample's values (no random draw: the same data gives the
        # same range in any process); the MSE search runs on these and on each sample's extremes
        keep = min(per_sample.shape[1], 512)
        idx = torch.linspace(0, per_sample.shape[1] - 1, keep, device=x.device).round().long()
        values = torch.cat([per_sample[:, idx], per_sample.min(1, keepdim=True).values, per_sample.max(1, keepdim=True).values], 1)
        groups = self._sample_groups(x.shape[0], x.device)
        for g in range(len(self._observed)):
            rows = values if groups is None else values[groups == g]
            if rows.numel():
                self._observed[g].append(rows.cpu())

    @torch.no_grad()
    def finish_observing(self, merge: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        """Set the ranges from the values observed since ``start_observing``; ``merge`` (data-parallel calibration)
        turns this process's observed values of a group into those of every process, in process order."""
        if self._observed is None:
            return
        if self.scheme != "dynamic":
            values = [torch.cat(chunks).flatten() if chunks else torch.zeros(0) for chunks in self._observed]
            if merge is not None:
                values = [merge(v) for v in values]
            fallback = None
            for g, v in enumerate(values):
                if not v.numel():
                    continue
                s, z = mse_range_search(v, self.bits, dim=None)
                self.scale[g], self.zero_point[g] = s[0], z[0]
                fallback = (s[0], z[0]) if fallback is None else fallback
            for g, v in enumerate(values):  # a group no sample fell into borrows a neighbour's range
                if not v.numel() and fallback is not None:
                    self.scale[g], self.zero_point[g] = fallback
        self._observed = None

    # -- forward --------------------------------------------------------------------------------------------
    def _sample_groups(self, batch: int, device) -> torch.Tensor | None:
        if self.scheme != "timestep":
            return None
        if self.context is None or self.context.groups is None:
            raise RuntimeError("act_scheme='timestep' needs the timestep of each sample: call the converted model, not a lone layer, or set TimestepContext")
        g = self.context.groups.to(device)
        if g.numel() == 1:
            g = g.expand(batch)
        if g.numel() != batch:  # e.g. attention reshaping heads into the batch: groups repeat per sample
            g = g.repeat_interleave(batch // g.numel())
        return g

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._observed is not None:
            self._observe(x)
            return x
        if not self.enabled:
            return x
        if x.dtype in HALF_DTYPES:  # ranges and codes in float32: the same codes as a float32 input's
            return self._quantize(x.float()).to(x.dtype)
        return self._quantize(x)

    def _quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.scheme == "dynamic":
            return self._dynamic(x)
        scale, zero_point = self.scale.abs().clamp_min(1e-8), self.zero_point
        groups = self._sample_groups(x.shape[0], x.device)
        if groups is not None:
            view = (-1,) + (1,) * (x.dim() - 1)
            scale, zero_point = scale[groups].view(view), zero_point[groups].view(view)
        return fake_quantize(x, scale.to(x.dtype), zero_point.to(x.dtype), self.bits)

    def channel_groups(self, channels: int) -> int:
        """Channels per range of an input with ``channels`` channels: ``group_size`` where it divides them into
        two groups or more, else all of them (one range per token)."""
        g = self.group_size
        return g if g and channels % g == 0 and channels > g else channels

    def _dynamic(self, x: torch.Tensor) -> torch.Tensor:
        dim = self.channel_dim % x.dim()
        channels = x.shape[dim]
        g = self.channel_groups(channels)
        grouped = x.reshape(*x.shape[:dim], channels // g, g, *x.shape[dim + 1:])
        lo = grouped.detach().amin(dim=dim + 1, keepdim=True)
        hi = grouped.detach().amax(dim=dim + 1, keepdim=True)
        if self.clip is not None:
            lo, hi = lo * self.clip, hi * self.clip
        scale, zero_point = affine_params(lo, hi, self.bits)
        return fake_quantize(grouped, scale, zero_point, self.bits).reshape(x.shape)

    def extra_repr(self) -> str:
        levers = (f", group_size={self.group_size}" if self.group_size else "") + (
            ", clipped" if self.clip is not None else "")
        return f"bits={self.bits}, scheme={self.scheme}, groups={self.groups}{levers}"


class SplitActQuantizer(nn.Module):
    """Two activation quantizers for an input that concatenates two tensors along channels (UNet skip joins).

    ``split`` is the number of channels of the first part (the up-path features); the rest is the skip.
    """

    def __init__(self, split: int, bits: int, scheme: ActScheme = "static", groups: int = 1, channel_dim: int = 1,
                 group_size: int | None = None, clipping: bool = False):
        super().__init__()
        self.register_buffer("split", torch.tensor(int(split)))
        self.channels = int(split)  # the same number, readable on the meta device (checkpoint checks)
        self.first = ActQuantizer(bits, scheme, groups, channel_dim, group_size, clipping)
        self.second = ActQuantizer(bits, scheme, groups, channel_dim, group_size, clipping)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = int(self.split)
        a, b = x.split([k, x.shape[1] - k], dim=1)
        return torch.cat([self.first(a), self.second(b)], dim=1)


def input_parts(q: "ActQuantizer | SplitActQuantizer") -> list[ActQuantizer]:
    """The activation quantizers of one layer input, in channel order: both parts of a split input, else the one."""
    return [q.first, q.second] if isinstance(q, SplitActQuantizer) else [q]


def part_quantizers(layer: nn.Module) -> list[tuple[ActQuantizer, int, int]]:
    """A quantized layer's input parts, each quantized with one range per token: ``(quantizer, first channel, end)``
    in channel order. The two halves of a split input, each cut into groups of ``act_group_size`` channels where that
    applies (``ActQuantizer.channel_groups``): per-group ranges are per-token ranges of each group. Reads no tensor
    (a split's size from ``SplitActQuantizer.channels``), so tracing it costs no graph break."""
    cin = layer.weight_shape[1]
    q = layer.input_quantizer
    base = [(q.first, 0, q.channels), (q.second, q.channels, cin)] if isinstance(q, SplitActQuantizer) else [
        (q, 0, cin)]
    parts = []
    for quantizer, c0, c1 in base:
        g = quantizer.channel_groups(c1 - c0) if quantizer.scheme == "dynamic" else c1 - c0
        parts += [(quantizer, a, a + g) for a in range(c0, c1, g)]
    return parts


class TimestepContext:
    """Holds the timestep group of every sample of the current call (shared by the ``timestep``-scheme quantizers)."""

    def __init__(self, num_groups: int, num_train_timesteps: int = 1000):
        self.num_groups, self.num_train_timesteps = num_groups, num_train_timesteps
        self.groups: torch.Tensor | None = None

    def set_timesteps(self, timestep: torch.Tensor | float | int) -> None:
        t = torch.as_tensor(timestep).reshape(-1).float()
        band = self.num_train_timesteps / self.num_groups
        self.groups = (t / band).floor().long().clamp(0, self.num_groups - 1).cpu()
