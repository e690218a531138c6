"""Quantized Conv2d and Linear: a weight quantizer, an input quantizer and, once frozen, packed integer weights.

A converted layer lives in two states.

*Calibrating* (after ``from_module``): it keeps the original ``weight`` Parameter and fake-quantizes it on the fly,
so rounding and ranges can be learned and quantization can be switched off to recover the float model.

*Frozen* (after ``freeze()``, and what a checkpoint holds): the float weight is gone. State of a layer ``L`` with
``out`` output channels and ``k`` weights per channel (``k = in_channels/groups * kh * kw`` or ``in_features``):

    L.packed_weight                  uint8 (out, ceil(k/2)) for w_bits <= 4, (out, k) otherwise; see packing.py
    L.bias                           float, rounded to float16 values (saved as float16)
    L.weight_quantizer.scale         float (out, 1[, 1, 1])       weight = (code - zero_point) * scale; float16 values
    L.weight_quantizer.zero_point    float (out, 1[, 1, 1])       an integer in [0, 2**w_bits - 1] (saved as uint8)
    L.input_quantizer.scale          float (groups,)               absent when a_bits is None; groups = 0 if dynamic;
                                                                   float16 values
    L.input_quantizer.zero_point     float (groups,)               (saved as uint8; dynamic: empty, not saved)
    L.input_quantizer.split          int64 ()                      split inputs only, with .first/.second quantizers
    L.input_quantizer[.part].clip    float ()                      act_clipping: the ratio dynamic ranges shrink by
    L.smooth                         float (in_channels,)          smoothing: the input is divided by it (float16
                                                                   values); the weight was multiplied by it
    L.lowrank_down / L.lowrank_up    float (r, in, kh, kw) / (out, r)  a rank-r float branch on the smoothed input
                                                                   beside the quantized residual (float16 values)
    L.lowrank_down_scale / _up_scale float (r,) / (out,)           lowrank_bits=8: the factors are int8 codes in
                                                                   [-127, 127] (in memory too), times these row
                                                                   scales (float16 values)

The levers (``levers.py``) keep the float function: ``W x = (W s)(x / s)`` and ``W s = up @ down + residual``, where
``weight`` (then ``packed_weight``) holds the residual.

Freezing rounds the bias and the scales to the nearest float16 values; the buffers stay float (float32 after
calibration) and the checkpoint stores them as float16, so a loaded model computes exactly what the calibrated one
did. A scale needs float16's relative precision, which holds over its normal range [2**-14, 65504]; a bias's error
is absolute, so it need only fit (at most 65504 in magnitude). A tensor with a value outside these keeps its values
and is saved as it is. Checkpoints written before freezing rounded (float32 scales and biases) load unchanged.

*Frozen, integer execution* (``set_execution("integer")``): ``packed_weight`` is replaced by the layout the int8
kernels read (``intexec.py``); ``state_dict`` still writes ``packed_weight``, rebuilt exactly, so checkpoints do not
depend on the execution mode.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..config import check_choice
from . import gpuexec, intexec, intkernels, levers
from .packing import pack_codes, packed_width
from .quantizers import ActQuantizer, ActScheme, SplitActQuantizer, WeightInit, WeightQuantizer

FLOAT16 = torch.finfo(torch.float16)


def round_to_float16_(t: torch.Tensor, smallest: float = 0.0) -> bool:
    """Round ``t`` in place to the nearest float16 values, keeping its dtype, if every magnitude is 0 or lies in
    ``[smallest, 65504]`` (and is finite); returns whether it did. A tensor float16 cannot hold is left as it is."""
    if not t.is_floating_point() or t.numel() == 0 or t.device.type == "meta":
        return False
    nonzero = t.detach().abs()
    nonzero = nonzero[nonzero != 0]  # NaN stays, and fails the range check
    fits = not nonzero.numel() or smallest <= float(nonzero.min()) and float(nonzero.max()) <= FLOAT16.max
    if fits:
        with torch.no_grad():
            t.copy_(t.half())
    return fits


class QuantLayerMixin:
    """What the reconstruction loop and the serializer need from any quantized layer."""

    weight_quantizer: WeightQuantizer
    input_quantizer: ActQuantizer | SplitActQuantizer | None
    quantize_weight: bool
    frozen: bool
    execution: str = "fake"  # frozen layers: "fake" (dequantize, float op) or "integer" (int8 GEMMs; intexec.py)
    _integer_storage: str | None = None  # integer execution asked for, with this int4 storage (set_execution)
    _integer_auto: bool = False  # ... by "auto": decided per device (intexec.integer_pays_off) and, on a GPU, per
    # input shape between the GPU paths that serve the layer (gpuauto.choose_path) ...
    _gpu_path: str | None = None  # ... unless pinned to one of them (gpuauto.pin_path)
    derived: bool = False  # rebuilt from other layers, not saved (fusion.FusedQuantLinear)
    _channels_last: bool = False  # a convolution moved to channels-last answers in channels-last (QuantConv2d)

    def _init_quant(self, w_bits: int, a_bits: int | None, weight_init: WeightInit, act_scheme: ActScheme,
                    act_groups: int, channel_dim: int, split: int | None, group_size: int | None = None,
                    clipping: bool = False, smoothing: bool = False, rank: int = 0, rank_bits: int = 16) -> None:
        self.w_bits, self.a_bits = w_bits, a_bits
        self.channel_dim = channel_dim
        self.weight_quantizer = WeightQuantizer(self.weight_shape, w_bits, weight_init)
        if self.weight.device.type != "meta":
            self.weight_quantizer.init_range(self.weight)
        if a_bits is None:
            self.input_quantizer = None
        elif split is not None:
            self.input_quantizer = SplitActQuantizer(split, a_bits, act_scheme, act_groups, channel_dim, group_size,
                                                     clipping)
        else:
            self.input_quantizer = ActQuantizer(a_bits, act_scheme, act_groups, channel_dim, group_size, clipping)
        levers.add_buffers(self, smoothing and a_bits is not None, rank, rank_bits)
        self.quantize_weight = True
        self.frozen = False
        self.register_state_dict_post_hook(_compact_frozen_state)

    @property
    def codes_per_channel(self) -> int:
        return math.prod(self.weight_shape[1:])

    def quantized_weight(self) -> torch.Tensor:
        if self.frozen:
            return self.dequantized_weight()
        if not self.quantize_weight:
            return self.weight
        return self.weight_quantizer(self.weight)

    def dequantized_weight(self) -> torch.Tensor:
        codes = intexec.weight_codes(self)
        q = self.weight_quantizer
        dtype = q.scale.dtype if self.bias is None else self.bias.dtype
        w = codes.view(self.weight_shape).float()  # in float32, then rounded once to the layer's dtype
        return ((w - q.zero_point.float()) * q.scale.float()).to(dtype)

    def _weight_and_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (fake-)quantized weight and the bias in the input's dtype (a frozen model loaded in half precision
        keeps its quantizer state in float32)."""
        w, b = self.quantized_weight(), self.bias
        if self.frozen and w.dtype != x.dtype and x.is_floating_point():
            w, b = w.to(x.dtype), None if b is None else b.to(x.dtype)
        return w, b

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = levers.smooth_input(self, x)
        y = None
        if self.execution == "integer":
            y = intexec.compiled_forward(self, x) if torch.compiler.is_compiling() else intexec.forward(self, x)
        if y is None:
            y = self._float_op(self.quantize_input(x), *self._weight_and_bias(x))
        return levers.add_branch(self, x, y)

    @torch.no_grad()
    def freeze(self, float16: bool = True) -> None:
        """Bake the (learned or nearest) rounding into packed integer codes and drop the float weight; with
        ``float16`` (the default), then round the bias and the scales to float16 values (see the module docstring).
        The codes are chosen with the calibrated scale, so learned rounding stays what was learned."""
        if self.frozen:
            return
        codes = self.weight_quantizer.harden(self.weight.detach()).round().reshape(self.weight_shape[0], -1)
        del self.weight
        self.register_buffer("packed_weight", pack_codes(codes, self.w_bits))
        self.frozen = True
        if float16:
            for t, smallest in self.float16_tensors().values():
                round_to_float16_(t, smallest)

    def float16_tensors(self) -> dict[str, tuple[torch.Tensor, float]]:
        """The tensors freezing rounds to float16 values, by state-dict name, each with the smallest nonzero magnitude
        it may hold: the bias (any) and the weight and static input scales (float16's smallest normal number)."""
        tensors = {} if self.bias is None else {"bias": (self.bias, 0.0)}
        tensors["weight_quantizer.scale"] = (self.weight_quantizer.scale, FLOAT16.tiny)
        if self.smooth is not None:
            tensors["smooth"] = (self.smooth, FLOAT16.tiny)
        if self.lowrank_up_scale is not None:  # 8-bit factors: integer codes, and scales rounded when they were set
            tensors["lowrank_down_scale"] = (self.lowrank_down_scale, FLOAT16.tiny)
            tensors["lowrank_up_scale"] = (self.lowrank_up_scale, FLOAT16.tiny)
        elif self.lowrank_up is not None:  # summed in a GEMM: an absolute error, like the bias's
            tensors["lowrank_down"], tensors["lowrank_up"] = (self.lowrank_down, 0.0), (self.lowrank_up, 0.0)
        if self.input_quantizer is not None:
            for name, q in self.input_quantizer.named_modules(prefix="input_quantizer"):
                if isinstance(q, ActQuantizer) and q.scale.numel():  # dynamic ones hold no scale
                    tensors[f"{name}.scale"] = (q.scale, FLOAT16.tiny)
        return tensors

    def make_frozen_placeholder(self) -> None:
        """Become a frozen layer with empty buffers of the checkpoint's shapes (for loading pre-quantized weights)."""
        device = self.weight.device
        del self.weight
        width = packed_width(self.codes_per_channel, self.w_bits)
        self.register_buffer("packed_weight", torch.zeros(self.weight_shape[0], width, dtype=torch.uint8, device=device))
        self.frozen = True

    @torch.no_grad()
    def set_execution(self, execution: str, int4_storage: str = "packed") -> bool:
        """Run this frozen layer as ``"fake"`` quantization or on the ``"integer"`` kernels, or let the device decide
        (``"auto"``: integer where ``intexec.integer_pays_off`` says the kernels gain, and on a GPU, per input
        shape, the fastest of the GPU paths that serve it, ``gpuauto.choose_path``); returns whether it
        holds the integer layout now. A layer the kernels do not serve stays fake (``intexec.integer_support``, and
        on a GPU ``gpuexec.dense_support``); one on a device without them runs fake until it is moved to one with them
        (``_apply``), and ``"auto"`` is decided again for the device it is moved to."""
        check_choice("execution", execution, ("fake", "integer", "auto"))
        check_choice("int4_storage", int4_storage, intexec.INT4_STORAGES)
        if not self.frozen:
            raise ValueError("only frozen layers choose an execution; freeze() the layer first")
        wanted = execution != "fake" and intexec.integer_support(self) is None
        self._integer_storage = int4_storage if wanted else None
        self._integer_auto = execution == "auto"
        return self._sync_execution()

    def _sync_execution(self) -> bool:
        """Hold the integer layout if and only if integer execution was asked for (by ``"auto"``: and pays off on
        this device) and the device has the kernels."""
        device = intexec.layer_device(self)
        if (self._integer_storage is None or not intexec.integer_kernels_available(device)
                # no GPU path serves it: the reference from the packed codes (from the integer layout it would
                # rebuild the codes block by block at every call)
                or (device.type != "cpu" and gpuexec.dense_support(self) is not None)
                or (self._integer_auto and not intexec.integer_pays_off(self, device))):
            intexec.to_fake(self)
            return False
        if intexec.layout_storage(self) != intexec.storage_for(self.w_bits, self._integer_storage, device):
            intexec.to_fake(self)
            intexec.to_integer(self, self._integer_storage)
        return True

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        gpuexec.drop_gpu_plan(self)  # its views may be of the tensors before the move
        if self.frozen and self._integer_storage is not None:  # moved: follow the device (no kernels, no integer)
            with torch.no_grad():
                self._sync_execution()
        return self

    def _save_to_state_dict(self, destination, prefix, keep_vars) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self.execution == "integer":  # checkpoints hold the packed codes whatever the execution
            destination[prefix + "packed_weight"] = pack_codes(intexec.weight_codes(self), self.w_bits)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        if self.execution == "integer" and prefix + "packed_weight" in state_dict:
            # load into the reference layout; the post-hook goes back to integer once the quantizers loaded too
            intexec.to_fake(self)
            if not getattr(self, "_resync_hook", False):
                self.register_load_state_dict_post_hook(_resync_execution)
                self._resync_hook = True
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, w_bits={self.w_bits}, a_bits={self.a_bits}, frozen={self.frozen}"
                + (f", execution={self.execution}" if self.frozen else ""))


ZERO_POINT_KEYS = ("weight_quantizer.zero_point", "input_quantizer.zero_point", "input_quantizer.first.zero_point",
                   "input_quantizer.second.zero_point")
FLOAT16_KEYS = ("bias", "weight_quantizer.scale", "input_quantizer.scale", "input_quantizer.first.scale",
                "input_quantizer.second.scale", "smooth", "lowrank_down", "lowrank_up", "lowrank_down_scale",
                "lowrank_up_scale")


def _compact_frozen_state(layer: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
    """A frozen layer saves its zero points as uint8 (integers in [0, 2**bits - 1], at most 8 bits) and its bias and
    scales as float16 when float16 holds them exactly (as freezing leaves them): exact either way, so loading casts
    them back to the buffers' float dtype without a change; a tensor float16 does not hold exactly stays as it is.
    (8-bit low-rank factors are int8 buffers already.)"""
    if not layer.frozen:
        return
    for key in ZERO_POINT_KEYS + FLOAT16_KEYS:
        t = state_dict.get(prefix + key)
        if t is None or not t.is_floating_point() or not t.numel() or t.device.type == "meta":
            continue
        t = t.detach()
        if key in ZERO_POINT_KEYS:
            if bool((t == t.round()).all()) and 0 <= float(t.min()) and float(t.max()) <= 255:
                state_dict[prefix + key] = t.to(torch.uint8)
        elif t.dtype in (torch.float32, torch.float64) and torch.equal(t.half().to(t.dtype), t):
            state_dict[prefix + key] = t.half()



def _resync_execution(layer: nn.Module, incompatible_keys) -> None:
    if layer.frozen and layer._integer_storage is not None:
        with torch.no_grad():
            layer._sync_execution()


class QuantConv2d(QuantLayerMixin, nn.Conv2d):
    @classmethod
    def from_module(cls, module: nn.Conv2d, *, w_bits: int, a_bits: int | None, weight_init: WeightInit = "mse",
                    act_scheme: ActScheme = "static", act_groups: int = 1, split: int | None = None,
                    **lever_options) -> "QuantConv2d":
        """``lever_options``: ``group_size``, ``clipping``, ``smoothing``, ``rank`` and ``rank_bits`` (``levers.py``)."""
        layer = cls(
            module.in_channels, module.out_channels, module.kernel_size, stride=module.stride, padding=module.padding,
            dilation=module.dilation, groups=module.groups, bias=module.bias is not None, padding_mode=module.padding_mode,
            device="meta",
        )
        layer.weight, layer.bias = module.weight, module.bias
        layer.weight_shape = tuple(module.weight.shape)
        layer._channels_last = intkernels.channels_last_input(module.weight)
        layer._init_quant(w_bits, a_bits, weight_init, act_scheme, act_groups, channel_dim=1, split=split,
                          **lever_options)
        return layer.to(module.weight.device)

    def _apply(self, fn, recurse=True):
        # channels-last after ``fn``? ``module.to(memory_format=...)`` converts every 4-D tensor (a float convolution's
        # weight, and so its output's layout), moves and casts keep layouts; a frozen layer holds no 4-D weight to
        # carry it, so ``fn`` is shown a small 4-D tensor in the layer's layout
        layout = torch.channels_last if self._channels_last else torch.contiguous_format
        self._channels_last = intkernels.channels_last_input(fn(torch.empty(1, 2, 1, 2, memory_format=layout)))
        return super()._apply(fn, recurse)

    def _float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._channels_last:  # a frozen layer's weight is dequantized channels-first
            weight = weight.contiguous(memory_format=torch.channels_last)
        return self._conv_forward(x, weight, bias)


class QuantLinear(QuantLayerMixin, nn.Linear):
    @classmethod
    def from_module(cls, module: nn.Linear, *, w_bits: int, a_bits: int | None, weight_init: WeightInit = "mse",
                    act_scheme: ActScheme = "static", act_groups: int = 1, split: int | None = None,
                    **lever_options) -> "QuantLinear":
        if split is not None:
            raise ValueError("split input quantizers are only defined for convolutions")
        layer = cls(module.in_features, module.out_features, bias=module.bias is not None, device="meta")
        layer.weight, layer.bias = module.weight, module.bias
        layer.weight_shape = tuple(module.weight.shape)
        layer._init_quant(w_bits, a_bits, weight_init, act_scheme, act_groups, channel_dim=-1, split=None,
                          **lever_options)
        return layer.to(module.weight.device)

    def _float_op(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return F.linear(x, weight, bias)


QUANT_LAYERS = {nn.Conv2d: QuantConv2d, nn.Linear: QuantLinear}
