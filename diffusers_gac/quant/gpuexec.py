"""Integer execution of a frozen quantized layer on a CUDA GPU: the glue between a layer (``intexec``'s integer
layout) and the Triton kernels of ``gpukernels``, and the same call as a PyTorch custom op for ``torch.compile``.

``gpu_layer_args`` turns a layer and its input into tensors and a flat list of integers; ``gpu_run`` runs the two
kernels on them (quantize the input per token, then the implicit GEMM); ``gpu_forward`` is both in eager mode, with
the part that does not depend on the input built once per layer (``gpu_plan``), since at small batches an eager step
is bound by the host's work per layer call, not by the GPU.
Under ``torch.compile`` the layer calls ``integer_layer``, the custom op ``diffusers_gac::integer_layer`` around
``gpu_run``, which keeps the layer inside the compiled graph (no graph break; with ``mode="reduce-overhead"`` the
step can replay as one CUDA graph); its fake implementation gives the output's shape and layout for tracing.

A layer set to ``"auto"`` has more paths on a GPU: ``dense_run`` (``gpudense``), the fake-quant reference in two
fused kernels and PyTorch's dense conv/linear in the input's dtype, which needs no more memory resident (the weight is
dequantized per call into a temporary); and for bfloat16 linear layers and 1x1 convolutions of at most 4 bits,
``scaled_run``, a float8 GEMM with the scales in its epilogue (``torch._scaled_mm``, Hopper and later;
``scaled_support``). For each input shape it sees, the layer times the paths that serve it once and keeps the
fastest (``gpuauto.choose_path``), so a layer where the integer kernels do not pay runs as fast as the GPU's library
GEMMs can with its input quantized. Compiled, a layer takes the op of the path its eager calls chose for the input's
shape or it was pinned to (``integer_layer``, ``dense_layer``, ``scaled_layer``: ``compiled_op``), the integer
kernels' for a shape never run eagerly, the dense path's where only that path serves it.

The integer kernels serve every layer the integer path serves (``intexec.integer_support``) except grouped
convolutions and layers with per-group activation ranges, which run the dense path (``gpu_support``); layers with
more than ``GPU_MAX_CHANNELS`` input channels in a part (the quantize kernels hold a token's channels in registers)
run the fake-quant reference from the packed layout (``dense_support``). No ``from __future__ import
annotations`` here: the custom ops' schemas are read from their annotations.
"""

import functools
import os
from typing import List, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn

from . import gpuauto, gpudense, gpukernels
from .intkernels import _out_size, channels_last_input
from .quantizers import ActQuantizer, input_parts, part_quantizers


def triton_available() -> bool:
    """Whether Triton is installed (it ships with CUDA builds of torch)."""
    return gpukernels.triton is not None


GPU_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
GPU_MAX_CHANNELS = 32768  # the quantize kernel holds a token's channels in registers
HEADER = 6  # integers before the parts' in a call's description: conv, n, packed, rowsum, channels-last, parts


def fp8_tensor_cores(device: torch.device | str) -> bool:
    """Whether ``device`` multiplies float8 on its tensor cores: CUDA compute capability 8.9+ (Ada, Hopper and
    later). CPU tensors take the GPU kernels only through Triton's interpreter (``TRITON_INTERPRET=1``, the tests),
    which emulates float8; the CPU's own kernels are int8 ones."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device) >= (8, 9)
    return device.type == "cpu" and triton_available() and os.environ.get("TRITON_INTERPRET") == "1"


def _fp8_call(weight: torch.Tensor, bits: list[int]) -> bool:
    return weight.dtype == gpukernels.FP8_DTYPE and max(bits) <= 4


def fp8_carriers(layer: nn.Module) -> bool:
    """Whether ``layer``'s GPU call multiplies float8 e4m3 carriers: weights held as float8 (``int4_storage="fp8"``,
    on a device with float8 tensor cores) and inputs of at most 4 bits (whose carriers float8 holds exactly, as it
    holds 4-bit weights'). With wider inputs the kernel converts the float8 weights to int8 in registers."""
    return _fp8_call(layer.int_weight, [p.bits for p in input_parts(layer.input_quantizer)])


def _grouped(layer: nn.Module) -> bool:
    return isinstance(layer, nn.Conv2d) and layer.groups != 1


def dense_support(layer: nn.Module) -> str | None:
    """Why no GPU path serves ``layer`` (neither the integer kernels nor the dense one), or None if one does. On a
    GPU such a layer goes back to the packed layout and runs the reference (``layers``' ``_sync_execution``)."""
    widths = [c1 - c0 for _, c0, c1 in part_quantizers(layer)] + ([layer.in_channels] if _grouped(layer) else [])
    if max(widths) > GPU_MAX_CHANNELS:  # a grouped convolution's input is quantized whole
        return f"more than {GPU_MAX_CHANNELS} input channels"
    return None


def gpu_support(layer: nn.Module) -> str | None:
    """Why the GPU's integer kernels do not serve ``layer``, or None if they do. The layers the dense path serves
    apart from them (grouped convolutions, activation ranges per channel group) run it whatever their execution
    (``gpu_forward``)."""
    reason = dense_support(layer)
    if reason is None and _grouped(layer):
        reason = "grouped convolution"
    if reason is None and len(part_quantizers(layer)) != len(input_parts(layer.input_quantizer)):
        reason = "activation ranges per channel group (act_group_size)"
    return reason


def scaled_support(layer: nn.Module) -> str | None:
    """Why the float8 path (``scaled_run``) does not serve ``layer``, or None if it does (its bfloat16 calls): a
    linear layer or an unpadded 1x1 convolution with stride 1 whose weights and inputs (one part, dynamic or static
    ranges) have at most 4 bits, so that float8 e4m3 holds their carriers exactly, with input and output channels in
    multiples of 16 (the float8 GEMMs' alignment), on a device with row-wise scaled float8 GEMMs."""
    reason = gpu_support(layer)
    return reason if reason is not None else _scaled_refusal(layer)


def _scaled_refusal(layer: nn.Module) -> str | None:
    """``scaled_support``'s own conditions, for a layer the integer kernels serve."""
    if isinstance(layer, nn.Conv2d) and (layer.kernel_size != (1, 1) or layer.stride != (1, 1)
                                         or layer.padding != (0, 0)):
        return "not a linear layer or an unpadded 1x1 convolution with stride 1"
    parts = input_parts(layer.input_quantizer)
    if len(parts) != 1:
        return "a split input"
    if layer.w_bits > 4 or parts[0].bits > 4:
        return "more than 4 bits (float8 e4m3 holds the carriers of codes of at most 4 bits exactly)"
    out_channels, in_channels = layer.weight_shape[:2]
    if in_channels % 16 or out_channels % 16:
        return "input or output channels not a multiple of 16"
    if not gpudense.scaled_gemms(layer.int_weight.device):
        return "no row-wise scaled float8 GEMMs on this device"
    return None


def static_range(q: ActQuantizer, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Per-sample float32 (scale, zero point) of a static or timestep quantizer, (batch,) each; None if dynamic."""
    if q.scheme == "dynamic":
        return None
    scale, zero_point = q.scale.abs().clamp_min(1e-8).float(), q.zero_point.float()
    groups = q._sample_groups(batch, device)
    if groups is not None:
        return scale[groups].contiguous(), zero_point[groups].contiguous()
    return scale.expand(batch).contiguous(), zero_point.expand(batch).contiguous()


class GpuPlan(NamedTuple):
    """What a layer's call through the Triton kernels takes that does not depend on its input: views of the layer's
    tensors and its integer description. Built once per layer (``gpu_plan``) and rebuilt by the call that finds any
    tensor it was built from replaced (a new layout, a move or cast, Accelerate's offloading hooks), so an eager call
    only reads it: the per-call host work of a step is what keeps small batches launch-bound. Leaving the integer
    layout or moving the layer drops it (``intexec.to_fake``, ``layers``' ``_apply``), so that it holds no tensor the
    layer let go of."""

    tensors: tuple  # int_weight, w_zero, w_scale, bias, colsum, zw (``gpu_run``'s arguments after x)
    ints: list[int]
    quantizers: tuple[ActQuantizer, ...]  # per input part (a channel group of per-group ranges is a part)
    static: bool  # some part has static or timestep ranges, read per call (they depend on the batch)
    integer: bool  # the integer kernels serve the layer (else only the dense path does)
    scaled: bool  # the float8 path serves its bfloat16 calls (``scaled_support``)
    sources: tuple[int, ...]  # where the layer's tensors lived when it was built (``_sources``)
    biases: dict  # the bias cast to an input dtype, for the dense and float8 paths


def _sources(layer: nn.Module) -> tuple[int, ...]:
    """The storage addresses of the tensors a plan views (the plan keeps them alive, so an address cannot be reused
    by another tensor while the plan exists)."""
    buffers, bias = layer._buffers, layer._parameters.get("bias")
    return (buffers["int_weight"].data_ptr(), layer.weight_quantizer._buffers["scale"].data_ptr(),
            0 if bias is None else bias.data_ptr(), *(0 if buffers.get(name) is None else buffers[name].data_ptr()
                                                       for name in ("int_zero", "int_colsum", "int_zw")))


def _build_plan(layer: nn.Module) -> GpuPlan:
    quantizers = tuple(q for q, _, _ in part_quantizers(layer))
    spec = layer._int_spec
    w_scale = layer.weight_quantizer.scale.reshape(-1)
    if w_scale.dtype != torch.float32:
        w_scale = w_scale.float()
    w_zero = layer.int_zero.reshape(-1) if spec.packed else None
    bias = None if layer.bias is None else layer.bias.detach()
    ints = [int(spec.conv), spec.shape[0], int(spec.packed), int(spec.eight_bit_weights), int(layer._channels_last),
            len(spec.parts)]
    for p, (c0, c1) in zip(quantizers, spec.parts):
        ints += [c0, c1, p.bits]
    if spec.conv:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw), groups = spec.geometry
        ints += [kh, kw, sh, sw, ph, pw, dh, dw, groups]
    static = any(p.scheme != "dynamic" for p in quantizers)
    integer = gpu_support(layer) is None
    scaled = integer and _scaled_refusal(layer) is None
    return GpuPlan((layer.int_weight, w_zero, w_scale, bias, layer.int_colsum, layer.int_zw), ints, quantizers, static,
                   integer, scaled, _sources(layer), {})


def _ranges(plan: GpuPlan, x: torch.Tensor) -> list[torch.Tensor | None]:
    """Per input part, three entries: the static (scale, zero point) per sample of this call (two Nones for dynamic
    ranges), and the clipping ratio of dynamic ones (``act_clipping``; None without)."""
    batch = x.shape[0] if x.dim() > 1 else 1
    ranges = []
    for p in plan.quantizers:
        static = static_range(p, batch, x.device) if plan.static else None
        ranges += [None, None, p.clip] if static is None else [*static, None]
    return ranges


def gpu_plan(layer: nn.Module) -> GpuPlan | None:
    """The layer's cached ``GpuPlan``, built on first use; None where no GPU path serves it (``dense_support``)."""
    plan = layer.__dict__.get("_gpu_plan")
    if plan is None or plan and plan.sources != _sources(layer):
        plan = _build_plan(layer) if dense_support(layer) is None else False
        layer._gpu_plan = plan
    return plan or None


def drop_gpu_plan(layer: nn.Module) -> None:
    """Forget the cached plan (the layer's layout, device or dtype changed)."""
    layer.__dict__.pop("_gpu_plan", None)


def gpu_layer_args(layer: nn.Module, x: torch.Tensor) -> tuple[list, list[int]] | None:
    """The tensors and the integer description that ``PATHS``' functions (and their ops) take for ``layer`` called on
    ``x``; None where no GPU path serves the call (``dense_support``). Built afresh per call (what ``torch.compile``
    traces; eager calls read the cached ``gpu_plan``)."""
    if x.dtype not in GPU_DTYPES or dense_support(layer) is not None:
        return None
    plan = _build_plan(layer)
    return [*plan.tensors, _ranges(plan, x)], plan.ints


def gpu_output_shape(shape: torch.Size | tuple[int, ...], ints: list[int]) -> tuple[int, ...]:
    conv, n, _, _, _, num_parts = ints[:HEADER]
    if not conv:
        return (*shape[:-1], n)
    kh, kw, sh, sw, ph, pw, dh, dw, _ = ints[HEADER + 3 * num_parts:]
    return (shape[0], n, _out_size(shape[2], kh, sh, ph, dh), _out_size(shape[3], kw, sw, pw, dw))


def _static(ranges: list[torch.Tensor | None], i: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Input part ``i``'s static (scale, zero point) per sample from ``_ranges``' list, or None if dynamic."""
    return None if ranges[3 * i] is None else (ranges[3 * i], ranges[3 * i + 1])


@gpukernels.on_input_device
def gpu_run(x: torch.Tensor, weight: torch.Tensor, w_zero: torch.Tensor | None, w_scale: torch.Tensor,
            bias: torch.Tensor | None, colsum: torch.Tensor | None, zw: torch.Tensor | None,
            ranges: list[torch.Tensor | None], ints: list[int]) -> torch.Tensor:
    """One layer through the Triton kernels, from ``gpu_layer_args``: the output in ``x``'s dtype."""
    conv, n, packed, rowsum, _, num_parts = ints[:HEADER]
    parts = [ints[HEADER + 3 * i:HEADER + 3 + 3 * i] for i in range(num_parts)]
    packed, rowsum, fp8 = bool(packed), bool(rowsum), _fp8_call(weight, [bits for _, _, bits in parts])

    if not conv:
        (_, k, bits), = parts
        batch = x.shape[0] if x.dim() > 1 else 1
        x3 = x.reshape(batch, -1, k).transpose(1, 2)  # (B, K, tokens): tokens in row order
        tokens = gpukernels.quantize(x3, bits, _static(ranges, 0), rowsum, fp8, ranges[2])
        m = tokens.q.shape[0]
        out = torch.empty(m, n, dtype=x.dtype, device=x.device)
        geo = gpukernels.Conv(1, 1, m, 1, 1, 1, 1, 0, 0, 1, 1, 1, m)
        gpukernels.igemm([(tokens, k)], weight, packed, w_zero, n, geo, w_scale, bias, colsum, zw, out, (0, 1, n))
        return out.view(*x.shape[:-1], n)
    b, _, h, w = x.shape
    kh, kw, sh, sw, ph, pw, dh, dw, _ = ints[HEADER + 3 * num_parts:]
    _, _, ho, wo = gpu_output_shape(x.shape, ints)
    acts = []
    for i, (c0, c1, bits) in enumerate(parts):
        xp = x[:, c0:c1] if num_parts > 1 else x
        acts.append((gpukernels.quantize(xp.flatten(2), bits, _static(ranges, i), rowsum, fp8, ranges[3 * i + 2]),
                     c1 - c0))
    layout = output_format(x, ints)
    out = torch.empty(b, n, ho, wo, dtype=x.dtype, device=x.device, memory_format=layout)
    geo = gpukernels.Conv(b, h, w, kh, kw, sh, sw, ph, pw, dh, dw, ho, wo)
    gpukernels.igemm(acts, weight, packed, w_zero, n, geo, w_scale, bias, colsum, zw, out,
                     (n * ho * wo, 1, n) if layout == torch.channels_last else (n * ho * wo, ho * wo, 1))
    return out


def output_format(x: torch.Tensor, ints: list[int]) -> torch.memory_format:
    """A call's output layout on every GPU path: a convolution's is channels-last where its input is (read as it
    lies) or its layer was moved to channels-last (``model.to(memory_format=torch.channels_last)``), as ``F.conv2d``
    answers in channels-last where its input or its weight is."""
    last = bool(ints[0]) and (bool(ints[4]) or channels_last_input(x))
    return torch.channels_last if last else torch.contiguous_format


@gpukernels.on_input_device
def dense_run(x: torch.Tensor, weight: torch.Tensor, w_zero: torch.Tensor | None, w_scale: torch.Tensor,
              bias: torch.Tensor | None, colsum: torch.Tensor | None, zw: torch.Tensor | None,
              ranges: list[torch.Tensor | None], ints: list[int]) -> torch.Tensor:
    """One layer on the dense path (``gpudense``), from ``gpu_layer_args`` like ``gpu_run``: the input fake-quantized
    and the weight dequantized (into a temporary) in ``x``'s dtype, then PyTorch's conv/linear: the fake-quant
    reference's output, from the integer layout. Two launches per run of equal input parts (``gpudense.runs``)."""
    conv, n, packed, _, _, num_parts = ints[:HEADER]
    parts = [ints[HEADER + 3 * i:HEADER + 3 + 3 * i] for i in range(num_parts)]
    kh, kw, sh, sw, ph, pw, dh, dw, groups = ints[HEADER + 3 * num_parts:] if conv else (1, 1, 1, 1, 0, 0, 1, 1, 1)
    runs = gpudense.runs(parts, ranges)
    w = torch.empty((n, parts[-1][1], kh, kw) if conv else (n, parts[-1][1]), dtype=x.dtype, device=x.device)
    offset = 0
    for first, count, width, _ in runs:  # a grouped convolution: one part (its weight's in_channels / groups)
        gpudense.dequantize(weight[offset:], bool(packed), w_zero, w_scale, zw, w, parts[first][0], width, kh * kw,
                            count, n // groups)
        offset += count * kh * kw * n * ((width + 1) // 2 if packed else width)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    if conv:  # (B, C, H, W) -> per run (B, groups, channels each, H * W)
        out = torch.empty_like(x)
        xv, ov = x.flatten(2), out.flatten(2)
    else:  # (..., K) -> (B, K, tokens)
        batch = x.shape[0] if x.dim() > 1 else 1
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        xv, ov = x.reshape(batch, -1, x.shape[-1]).transpose(1, 2), out.view(batch, -1, x.shape[-1]).transpose(1, 2)
    if groups > 1:  # the input's channels, all of them, quantized per token like one part
        runs = [(0, 1, x.shape[1], parts[0][2])]
    for first, count, width, bits in runs:
        c0 = parts[first][0]
        span = slice(c0, c0 + count * width)
        gpudense.fake_quantize(xv[:, span].unflatten(1, (count, width)), ov[:, span].unflatten(1, (count, width)),
                               bits, _static(ranges, first), ranges[3 * first + 2])
    if not conv:
        return F.linear(out, w, bias)
    y = F.conv2d(out, w, bias, (sh, sw), (ph, pw), (dh, dw), groups)
    return y.contiguous(memory_format=output_format(x, ints))  # a copy where F.conv2d chose otherwise


@gpukernels.on_input_device
def scaled_run(x: torch.Tensor, weight: torch.Tensor, w_zero: torch.Tensor | None, w_scale: torch.Tensor,
               bias: torch.Tensor | None, colsum: torch.Tensor | None, zw: torch.Tensor | None,
               ranges: list[torch.Tensor | None], ints: list[int]) -> torch.Tensor:
    """One layer on the float8 path (``gpudense.scaled_gemm``: a float8 GEMM with row-wise scales), from
    ``gpu_layer_args`` like ``gpu_run``, for the layers ``scaled_support`` admits, in ``output_format``."""
    conv, n, packed, _, _, _ = ints[:HEADER]
    _, k, bits = ints[HEADER:HEADER + 3]
    x3 = x.flatten(2) if conv else x.reshape(x.shape[0] if x.dim() > 1 else 1, -1, k).transpose(1, 2)
    out = gpudense.scaled_gemm(x3, bits, _static(ranges, 0), ranges[2], weight, bool(packed), w_zero, w_scale, bias, n)
    if not conv:
        return out.view(*x.shape[:-1], n)
    b, _, h, w = x.shape
    return out.view(b, h, w, n).permute(0, 3, 1, 2).contiguous(memory_format=output_format(x, ints))


PATHS = {"integer": gpu_run, "dense": dense_run, "scaled": scaled_run}  # what "auto" chooses from (gpuauto.PATHS)


def path_calls(layer: nn.Module, x: torch.Tensor, plan: GpuPlan | None = None) -> dict[str, tuple] | None:
    """The GPU paths that serve ``layer`` called on ``x``, each with its arguments (``PATHS``' functions take them):
    the integer kernels where ``gpu_support`` allows, always the dense path, and the float8 path for bfloat16 inputs
    where ``scaled_support`` allows. None where none serves the call. ``plan``: the layer's ``gpu_plan``, if at
    hand."""
    if plan is None:
        plan = gpu_plan(layer) if x.dtype in GPU_DTYPES else None
        if plan is None:
            return None
    args = (x, *plan.tensors, _ranges(plan, x), plan.ints)
    own = (*args[:4], _bias_in(plan, x.dtype), *args[5:])  # the bias cast once per dtype
    calls = {"integer": args} if plan.integer else {}
    calls["dense"] = own
    if plan.scaled and x.dtype == torch.bfloat16:
        calls["scaled"] = own
    return calls


def gpu_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
    """The layer's output on a GPU path, in ``x``'s dtype; None where none serves the call (see ``dense_support``).
    ``execution="integer"`` takes the integer kernels (``gpu_run``) where they serve the layer, the dense path where
    only it does; a layer set to ``"auto"`` takes, for each input shape, the fastest of the paths that serve it
    (``path_calls``), timed on its first call (``gpuauto.choose_path``). Runs on CPU tensors too under
    ``TRITON_INTERPRET=1`` (tests)."""
    if x.dtype not in GPU_DTYPES:
        return None
    plan = gpu_plan(layer)
    if plan is None:
        return None
    if plan.integer and not layer._integer_auto:
        return gpu_run(x, *plan.tensors, _ranges(plan, x), plan.ints)
    calls = path_calls(layer, x, plan)
    if len(calls) == 1:
        return dense_run(*calls["dense"])
    path = gpuauto.choose_path(layer, (x, plan.tensors[0]), tuple(calls),
                               lambda: {name: functools.partial(PATHS[name], *args) for name, args in calls.items()})
    return PATHS[path](*calls[path])


def compiled_op(layer: nn.Module, x: torch.Tensor):
    """The custom op a compiled model calls for ``layer`` on ``x``: ``dense_layer`` where only the dense path serves
    the layer; for an ``"auto"`` layer, the op of the path it is pinned to or chose by timing eager calls of inputs
    like ``x`` (nothing can be timed while tracing: run one eager step before compiling for the choices to count),
    where that path serves the call; else ``integer_layer``."""
    if gpu_support(layer) is not None:
        return dense_layer
    path = gpuauto.chosen_path(layer, x, layer.int_weight) if layer._integer_auto else None
    if path == "dense":
        return dense_layer
    if path == "scaled" and x.dtype == torch.bfloat16 and scaled_support(layer) is None:
        return scaled_layer
    return integer_layer


def _bias_in(plan: GpuPlan, dtype: torch.dtype) -> torch.Tensor | None:
    """The layer's bias in ``dtype`` (the dense path's op takes it so), cast once per dtype rather than per call."""
    bias = plan.tensors[3]
    if bias is None or bias.dtype == dtype:
        return bias
    if dtype not in plan.biases:
        plan.biases[dtype] = bias.to(dtype)
    return plan.biases[dtype]


def _fake_layer(x, weight, w_zero, w_scale, bias, colsum, zw, ranges, spec):
    return torch.empty(gpu_output_shape(x.shape, spec), dtype=x.dtype, device=x.device,
                       memory_format=output_format(x, spec))


def _layer_op(name: str, run: str):
    """The custom op ``diffusers_gac::<name>`` around this module's function ``run`` (``gpu_run`` or ``dense_run``,
    looked up at each call), with a fake implementation giving the output's shape and layout (``output_format``;
    inductor asserts the real output's strides against it)."""

    def layer_op(x: torch.Tensor, weight: torch.Tensor, w_zero: Optional[torch.Tensor], w_scale: torch.Tensor,
                 bias: Optional[torch.Tensor], colsum: Optional[torch.Tensor], zw: Optional[torch.Tensor],
                 ranges: List[Optional[torch.Tensor]], spec: List[int]) -> torch.Tensor:
        return globals()[run](x, weight, w_zero, w_scale, bias, colsum, zw, ranges, spec)

    op = torch.library.custom_op(f"diffusers_gac::{name}", layer_op, mutates_args=())
    op.register_fake(_fake_layer)
    return op


integer_layer = _layer_op("integer_layer", "gpu_run")  # what a compiled model calls for a layer on the integer kernels
dense_layer = _layer_op("dense_layer", "dense_run")  # ... on the dense path (only it serves the layer, or chosen)
scaled_layer = _layer_op("scaled_layer", "scaled_run")  # ... on the float8 path (an "auto" layer's choice or pin)
