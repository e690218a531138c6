"""Integer execution of frozen quantized layers: what stays resident, and the forward pass through ``intkernels``.

A frozen layer (``layers.py``) runs in one of two modes:

* ``"fake"`` (the reference): it holds ``packed_weight`` (the checkpoint's codes) and every call dequantizes the
  weight and runs a float conv/linear on fake-quantized inputs.
* ``"integer"``: ``packed_weight`` is replaced by the weight in the layout the int8 GEMMs read, as non-persistent
  buffers (``state_dict`` still writes ``packed_weight``, rebuilt exactly from them):

      int_weight   the weight blocks, one per (group, input part, kernel tap), each (out/groups, in_part) row-major,
                   concatenated flat. w_bits <= 4: two codes per byte (``intkernels.pack_int4``), unpacked to int8 per
                   call (``int4_storage="packed"``, the default: 0.5 byte per weight resident) or kept as int8
                   ``c - z`` (``int4_storage="int8"``: 1 byte per weight, no unpacking) or, on GPUs with float8
                   tensor cores, as float8 e4m3 ``c - z`` (``int4_storage="fp8"``, exact: 1 byte per weight; inputs
                   of at most 4 bits then multiply them as float8, which Triton pipelines where it waits for each
                   int8 step; int8 carriers on other devices). 5-7 bits: int8 ``c - z``. 8 bits: int8 ``c - 128``.
      int_zero     int8 (out, 1): the weight zero points, subtracted while unpacking (packed 4-bit only)
      int_zw       float (out,): ``z - 128`` of 8-bit weights (their correction term)
      int_colsum   float (parts * taps, out): sums of the weight carriers per segment, for 8-bit inputs

  The per-channel weight scales, zero points and the bias stay where they are (``weight_quantizer``, ``bias``).
  The layout is the same on every device. On the CPU the kernels are ``intkernels`` (``torch._int_mm``); on a CUDA
  GPU with int8 tensor cores, the Triton kernels of ``gpukernels`` (through ``gpuexec``; under ``torch.compile``, one
  custom op per layer). A layer moved to a device without kernels goes back to the reference layout, and to the integer one
  when moved back (``layers.py``: ``_apply``). A call with its input on another device, in a dtype the kernels do
  not take, needing gradients, or while the input quantizer is off or observing runs the fake-quant reference from
  these same buffers (dequantizing the weight), so the result never depends on which kernels exist. Half-precision
  inputs are quantized in float32 and the output comes back in the input's dtype.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from . import gpuexec
from . import intkernels as K
from .gpukernels import FP8_DTYPE
from .packing import pack_codes, unpack_codes
from ..denoisers import HALF_DTYPES
from .quantizers import ActQuantizer, SplitActQuantizer, input_parts, part_quantizers

INT4_STORAGES = ("packed", "int8", "fp8")


class IntSpec(NamedTuple):
    """Python-side description of a layer's integer layout (no tensors)."""

    conv: bool
    shape: tuple[int, ...]  # the weight's shape (out, in/groups[, kh, kw])
    parts: tuple[tuple[int, int], ...]  # input channel ranges of the parts (one unless a split input)
    geometry: K.ConvGeometry | None
    blocks: tuple[tuple[int, int, int], ...]  # (offset, rows, stored columns) per (group, part, tap)
    packed: bool  # two 4-bit codes per byte
    eight_bit_weights: bool


def integer_kernels_available(device: torch.device | str) -> bool:
    """Whether integer execution runs on ``device``: the CPU with int8 GEMMs through oneDNN (x86 with AVX2 or
    AVX-512; VNNI/AMX where present), or a CUDA GPU with int8 tensor cores (compute capability 8.0 or newer:
    Ampere, Ada, Hopper, Blackwell) through the Triton kernels of ``gpukernels`` (Triton ships with CUDA builds of
    torch). Layers on other devices run the fake-quant reference."""
    device = torch.device(device)
    if device.type == "cpu":
        return (hasattr(torch, "_int_mm") and torch.backends.mkldnn.is_available()
                and torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"))
    if device.type == "cuda":
        return (torch.cuda.is_available() and gpuexec.triton_available()
                and torch.cuda.get_device_capability(device) >= (8, 0))
    return False


def layer_device(layer: nn.Module) -> torch.device:
    return layer.weight_quantizer.scale.device


# Smallest input channels per GEMM (in_channels/groups, in_features) at which the integer path beats the fake-quant
# one, measured on a 2-core AVX-512 CPU at 1 thread: per-token convolutions pay a float rescale per kernel tap, so
# narrow ones lose (3x3 at 64 channels: 0.8x of fake, at 128: 1.4x; 1x1 and linear at 64: 1.3-1.8x).
MIN_CHANNELS = {"kernel": 128, "pointwise": 64}


def integer_pays_off(layer: nn.Module, device: torch.device | str = "cpu") -> bool:
    """Whether ``"auto"`` runs ``layer`` on the integer kernels of ``device``. On the CPU: wide enough for int8
    GEMMs to outweigh the quantization and rescale passes (``MIN_CHANNELS``). On a GPU: always, since the integer
    layout serves every path ``"auto"`` chooses from there per input shape, by timing them (the integer kernels,
    the dense one and the float8 one, ``gpuauto.choose_path``); the reference from the packed layout is slower than
    any."""
    if torch.device(device).type != "cpu":
        return True
    if isinstance(layer, nn.Conv2d):
        kind = "pointwise" if layer.kernel_size == (1, 1) else "kernel"
        return layer.in_channels // layer.groups >= MIN_CHANNELS[kind]
    return layer.in_features >= MIN_CHANNELS["pointwise"]


def integer_support(layer: nn.Module) -> str | None:
    """Why ``layer`` cannot run the integer kernels, or None if it can."""
    if not layer.frozen:
        return "not frozen"
    q = layer.input_quantizer
    if q is None:
        return "weight-only (inputs in full precision)"
    if isinstance(layer, nn.Conv2d):
        if isinstance(layer.padding, str) or layer.padding_mode != "zeros":
            return f"padding {layer.padding!r} / {layer.padding_mode!r}"
        if isinstance(q, SplitActQuantizer) and layer.groups != 1:
            return "split input with groups"
    if isinstance(q, SplitActQuantizer) and q.first.scheme != q.second.scheme:
        return "split input with two schemes"
    if isinstance(layer, nn.Conv2d) and layer.groups != 1 and any(
            p.scheme == "dynamic" and p.channel_groups(layer.in_channels) != layer.in_channels for p in input_parts(q)):
        # the quantizer groups the whole input's channels; the layout's parts count a convolution group's
        return "activation ranges per channel group with groups"
    return None


def _parts(layer: nn.Module) -> tuple[tuple[int, int], ...]:
    return tuple((c0, c1) for _, c0, c1 in part_quantizers(layer))


def _codes4d(layer: nn.Module, codes: torch.Tensor) -> torch.Tensor:
    shape = layer.weight_shape
    return codes.reshape(shape if len(shape) == 4 else (*shape, 1, 1))


def _zero_points(layer: nn.Module) -> torch.Tensor:
    return layer.weight_quantizer.zero_point.reshape(-1).to(torch.int16)


def storage_for(w_bits: int, int4_storage: str, device: torch.device | str) -> str:
    """The layout ``int4_storage`` gives weights of ``w_bits`` bits on ``device``: above 4 bits always int8
    carriers; float8 ones only where the tensor cores multiply float8 (``gpuexec.fp8_tensor_cores``), int8 ones
    (the same bytes, without a conversion per call) elsewhere."""
    if w_bits > 4 or (int4_storage == "fp8" and not gpuexec.fp8_tensor_cores(device)):
        return "int8"
    return int4_storage


def layout_storage(layer: nn.Module) -> str | None:
    """The storage the layer's integer layout holds (``INT4_STORAGES``), or None if it holds none (or its weight
    was cast to a dtype no storage has, e.g. by ``model.to(torch.bfloat16)``: the layout is then rebuilt)."""
    if layer.execution != "integer":
        return None
    return {torch.uint8: "packed", torch.int8: "int8", FP8_DTYPE: "fp8"}.get(layer.int_weight.dtype)


def to_integer(layer: nn.Module, int4_storage: str = "packed") -> None:
    """Replace ``packed_weight`` by the integer layout (see the module docstring); exact and reversible."""
    codes = _codes4d(layer, unpack_codes(layer.packed_weight, layer.codes_per_channel, layer.w_bits)).to(torch.int16)
    out, _, kh, kw = codes.shape
    conv = isinstance(layer, nn.Conv2d)
    groups = layer.groups if conv else 1
    og = out // groups
    zp = _zero_points(layer)
    eight = layer.w_bits == 8
    device = layer.packed_weight.device
    storage = storage_for(layer.w_bits, int4_storage, device)
    packed = storage == "packed"
    carrier = codes - (128 if eight else zp.view(-1, 1, 1, 1))  # int8-exact, see intkernels
    parts = _parts(layer)
    stored, blocks, colsums, offset = [], [], [], 0
    for gi in range(groups):
        rows = slice(gi * og, (gi + 1) * og)
        for c0, c1 in parts:
            for i in range(kh):
                for j in range(kw):
                    block = (codes if packed else carrier)[rows, c0:c1, i, j]
                    data = K.pack_int4(block) if packed else block.to(torch.int8)
                    stored.append(data.reshape(-1))
                    blocks.append((offset, og, data.shape[1]))
                    offset += data.numel()
    for c0, c1 in parts:  # colsum rows in (part, tap) order, every output channel
        for i in range(kh):
            for j in range(kw):
                colsums.append(carrier[:, c0:c1, i, j].sum(1))
    flat = torch.cat(stored)
    if storage == "fp8":
        flat = flat.to(torch.float16).to(FP8_DTYPE)  # |c - z| <= 15: exact
    del layer.packed_weight
    layer.register_buffer("int_weight", flat.view(torch.uint8) if packed else flat, persistent=False)
    layer.register_buffer("int_zero", zp.to(torch.int8).view(-1, 1) if packed else None, persistent=False)
    layer.register_buffer("int_zw", (zp - 128).float() if eight else None, persistent=False)
    eight_in = layer.a_bits == 8
    layer.register_buffer("int_colsum", torch.stack(colsums).float() if eight_in else None, persistent=False)
    geometry = None
    if conv:
        geometry = K.ConvGeometry((kh, kw), layer.stride, layer.padding, layer.dilation, layer.groups)
    layer._int_spec = IntSpec(conv, tuple(layer.weight_shape), parts, geometry, tuple(blocks), packed, eight)
    for name in ("int_weight", "int_zero", "int_zw", "int_colsum"):
        if getattr(layer, name) is not None:
            setattr(layer, name, getattr(layer, name).to(device))
    layer.execution = "integer"


def _block(layer: nn.Module, index: int, cols: int) -> torch.Tensor:
    """Int8 carrier of weight block ``index`` ((out/groups, cols))."""
    spec = layer._int_spec
    offset, rows, width = spec.blocks[index]
    data = layer.int_weight[offset:offset + rows * width].view(rows, width)
    if data.is_floating_point():  # float8 carriers (or any float cast of them: small integers, exact)
        return data.to(torch.float16).to(torch.int8)
    if not spec.packed:
        return data
    group = index // (len(spec.parts) * _taps(spec))
    return K.unpack_int4(data, layer.int_zero[group * rows:(group + 1) * rows], cols)


def _taps(spec: IntSpec) -> int:
    return spec.geometry.kernel[0] * spec.geometry.kernel[1] if spec.conv else 1


def weight_codes(layer: nn.Module) -> torch.Tensor:
    """The weight's integer codes (out, k) as uint8, from whichever layout the layer holds."""
    if layer.execution != "integer":
        return unpack_codes(layer.packed_weight, layer.codes_per_channel, layer.w_bits)
    spec = layer._int_spec
    out = spec.shape[0]
    shape = spec.shape if len(spec.shape) == 4 else (*spec.shape, 1, 1)
    codes = torch.empty(shape, dtype=torch.int16, device=layer.int_weight.device)
    groups = spec.geometry.groups if spec.conv else 1
    og, (kh, kw) = out // groups, (spec.geometry.kernel if spec.conv else (1, 1))
    zp = _zero_points(layer)
    index = 0
    for gi in range(groups):
        rows = slice(gi * og, (gi + 1) * og)
        for c0, c1 in spec.parts:
            for i in range(kh):
                for j in range(kw):
                    block = _block(layer, index, c1 - c0).to(torch.int16)
                    codes[rows, c0:c1, i, j] = block + (128 if spec.eight_bit_weights else zp[rows].view(-1, 1))
                    index += 1
    return codes.reshape(out, -1).to(torch.uint8)


def to_fake(layer: nn.Module) -> None:
    """Back to the reference layout: ``packed_weight`` rebuilt exactly from the integer buffers."""
    if layer.execution != "integer":
        return
    packed = pack_codes(weight_codes(layer), layer.w_bits)
    for name in ("int_weight", "int_zero", "int_zw", "int_colsum"):
        delattr(layer, name)
    del layer._int_spec
    layer.register_buffer("packed_weight", packed)
    gpuexec.drop_gpu_plan(layer)
    layer.execution = "fake"


def _quantizer_ready(q: ActQuantizer) -> bool:
    return q.enabled and q._observed is None


def _quantize(q: ActQuantizer, x: torch.Tensor, dim: int) -> K.Act:
    """``x``: (batch, ...) with channels along ``dim``."""
    if q.scheme == "dynamic":
        return K.quantize_dynamic(x, q.bits, dim, q.clip)
    scale, zero_point = q.scale.abs().clamp_min(1e-8), q.zero_point
    groups = q._sample_groups(x.shape[0], x.device)
    view = (-1,) + (1,) * (x.dim() - 1)
    if groups is not None:
        scale, zero_point = scale[groups], zero_point[groups]
    return K.quantize_static(x, scale.view(view).float(), zero_point.view(view).float(), q.bits)


def _forward_cpu(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CPU kernels on a float32 or half-precision ``x``, quantized as float32 values, out in ``x``'s dtype."""
    dtype = x.dtype
    q = layer.input_quantizer
    spec = layer._int_spec
    w_scale = layer.weight_quantizer.scale.reshape(-1).float()
    bias = None if layer.bias is None else layer.bias.detach().float()
    if not spec.conv:
        x = x.contiguous()
        if len(spec.parts) > 1:  # per-group ranges: one GEMM per group of features
            acts = [_quantize(p, x[..., c0:c1], -1) for p, c0, c1 in part_quantizers(layer)]
            weights = [_block(layer, i, c1 - c0) for i, (c0, c1) in enumerate(spec.parts)]
            return K.linear_parts(acts, weights, w_scale, bias, layer.int_zw, layer.int_colsum, dtype)
        weight = _block(layer, 0, spec.shape[1])
        if q.scheme == "dynamic":
            return K.linear_dynamic(x, q.bits, weight, w_scale, bias, layer.int_zw, layer.int_colsum, q.clip, dtype)
        return K.linear(_quantize(q, x, -1), weight, w_scale, bias, layer.int_zw, layer.int_colsum, out_dtype=dtype)
    # a channels-last input is read as it is (its int8 codes are already tokens-major) and gives a channels-last
    # output, as F.conv2d does (so does a layer moved to channels-last); any other layout is made channels-first
    channels_last = K.channels_last_input(x)
    if not channels_last:
        x = x.contiguous()
    if len(spec.parts) == 1:
        acts = [_quantize(q, x, 1)]
    else:  # split input or per-group ranges (groups == 1): each part with its own ranges
        acts = [_quantize(p, x[:, c0:c1], 1) for p, c0, c1 in part_quantizers(layer)]
    taps = _taps(spec)
    per_group = len(spec.parts) * taps

    def weight(gi: int, p: int, t: int) -> torch.Tensor:
        c0, c1 = spec.parts[p]
        return _block(layer, gi * per_group + p * taps + t, c1 - c0)

    return K.conv2d(acts, weight, spec.shape[0], spec.geometry, w_scale, bias, layer.int_zw, layer.int_colsum, dtype,
                    channels_last or layer._channels_last)


def _ready(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether this call may take the integer kernels at all (else the fake-quant reference runs)."""
    if x.device != layer.int_weight.device:
        return False
    if torch.is_grad_enabled() and x.requires_grad:  # int8 GEMMs have no gradient: the reference has one
        return False
    return all(_quantizer_ready(p) for p in input_parts(layer.input_quantizer))


def forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output through the integer kernels of the input's device, or None when this call must take the
    fake-quant path."""
    if not _ready(layer, x):
        return None
    if x.device.type == "cpu":
        # half precision: quantized as float32 values, as the reference does; the output written in x's dtype
        return _forward_cpu(layer, x) if x.dtype == torch.float32 or x.dtype in HALF_DTYPES else None
    return gpuexec.gpu_forward(layer, x)


# Under torch.compile the CPU kernels run as they are, outside the graph (one graph break per integer layer: the
# compiler fuses what lies between them, and tracing their per-tap GEMM loops would cost long compiles for nothing);
# the GPU kernels are one custom op each (gpuexec.integer_layer, or dense_layer), inside the graph.
_compiled_cpu_forward = torch.compiler.disable(forward)


def compiled_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """``forward`` while ``torch.compile`` traces the model."""
    if x.device.type == "cpu":
        return _compiled_cpu_forward(layer, x)
    return compiled_gpu_forward(layer, x)


def compiled_gpu_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer as one ``diffusers_gac`` op (``gpuexec.compiled_op``: the integer kernels', or the dense or float8
    path's where only the dense path serves the layer or an ``"auto"`` one chose or is pinned to it), what a compiled
    model traces on a GPU (and on CPU tensors under Triton's interpreter, in tests)."""
    if not _ready(layer, x):
        return None
    args = gpuexec.gpu_layer_args(layer, x)
    if args is None:
        return None
    return gpuexec.compiled_op(layer, x)(x, *args[0], args[1])
