"""The paths of a quantized layer on a GPU that end in a library GEMM: the dense path (the fake-quant reference,
computed fast) and the float8 path (``scaled_gemm``).

What ``"auto"`` runs on a GPU where the integer kernels (``gpukernels``) lose to the GPU's own half-precision
GEMMs (``gpuauto.choose_path``): the layer's input fake-quantized in one pass (``fake_quantize``: the same codes as
``gpukernels.quantize``, written back dequantized in the input's dtype and layout), its weight dequantized from the
integer layout into a temporary dense tensor (``dequantize``, one pass over the resident bytes: nothing extra stays
resident), then the dense conv/linear of PyTorch (cuBLAS, cuDNN). That is exactly what the reference computes
(``QuantLayerMixin.forward`` with ``execution="fake"``: the dequantized values are the same float32 products rounded
once to the input's dtype), with two fused kernels where the reference launches a dozen small ops.

The float8 path serves linear layers and 1x1 convolutions whose weights and inputs have at most 4 bits: their
carriers (``c - z``, at most 15 in magnitude) are exact in float8 e4m3, so ``torch._scaled_mm`` (cuBLASLt/CUTLASS
on Hopper and later) multiplies them on the float8 tensor cores with the token's and the output channel's scales
applied in its epilogue, in one GEMM from the quantize kernel's codes. In float32 arithmetic their sums are exact
(integers far below 2**24); whether Hopper's float8 tensor cores, which accumulate with fewer bits between the
GEMM's promotions to float32 (``use_fast_accum`` is off, so there are promotions), keep them exact is
``benchmarks/gpu_check.py``'s to measure against the integer kernels.
"""

from __future__ import annotations

import os

import torch

from .gpukernels import FP8_DTYPE, _cdiv, _next_pow2, _token_codes, quantize, tl, triton

if triton is not None:
    @triton.jit
    def fake_quantize_kernel(x_ptr, o_ptr, ss_ptr, sz_ptr, clip_ptr, G, C, P, stride_b, stride_g, stride_c, stride_p,
                             so_b, so_g, so_c, so_p, LEVELS: tl.constexpr, STATIC: tl.constexpr, CLIP: tl.constexpr,
                             BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_p = tl.program_id(0)
        b = tl.program_id(1) // G
        g = (tl.program_id(1) % G).to(tl.int64)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.arange(0, BLOCK_C)
        mask = (offs_p < P)[:, None] & (offs_c[None, :] < C)
        p64 = offs_p[:, None].to(tl.int64)
        src = x_ptr + b.to(tl.int64) * stride_b + g * stride_g + p64 * stride_p + offs_c[None, :] * stride_c
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        t, scale, _ = _token_codes(x, ss_ptr, sz_ptr, clip_ptr, b, offs_p, LEVELS, STATIC, CLIP)
        dst = o_ptr + b.to(tl.int64) * so_b + g * so_g + p64 * so_p + offs_c[None, :] * so_c
        tl.store(dst, (t * scale[:, None]).to(o_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def dequantize_kernel(w_ptr, wz_ptr, ws_ptr, zw_ptr, o_ptr, N, ROWS, C, WIDTH, E, start, so_n,
                          TAPS: tl.constexpr, PACKED: tl.constexpr, ZW: tl.constexpr, SCALE: tl.constexpr,
                          BN: tl.constexpr, BE: tl.constexpr):
        # a tile is BN output channels x BE consecutive elements of their (channels x taps) rows from ``start``: the
        # stores are contiguous runs; the loads gather each element's byte from its (channel group, tap) block, in
        # the blocks of the output channel's convolution group (ROWS output channels each; N without groups)
        offs_n = tl.program_id(0) * BN + tl.arange(0, BN)
        offs_e = tl.program_id(1) * BE + tl.arange(0, BE)
        nmask = offs_n < N
        mask = nmask[:, None] & (offs_e < E)[None, :]
        channel = offs_e // TAPS
        block = (channel // C) * TAPS + offs_e % TAPS
        k = channel % C
        if PACKED:  # WIDTH = ceil(C/2) bytes: low nibble channel j, high nibble channel j + WIDTH
            byte = tl.where(k < WIDTH, k, k - WIDTH)
        else:
            byte = k
        row_block = (offs_n // ROWS).to(tl.int64) * (E // C) * ROWS * WIDTH + (offs_n % ROWS).to(tl.int64) * WIDTH
        src = w_ptr + (block.to(tl.int64) * ROWS * WIDTH + byte)[None, :] + row_block[:, None]
        if PACKED:
            w = tl.load(src, mask=mask, other=0)
            code = tl.where((k < WIDTH)[None, :], w & 15, w >> 4).to(tl.int8)
            v = (code - tl.load(wz_ptr + offs_n, mask=nmask, other=0)[:, None]).to(tl.float32)
        else:  # carriers: int8 or float8 (small integers: exact through float16) c - z, or c - 128 for 8 bits
            w = tl.load(src, mask=mask, other=0.0)
            v = w.to(tl.float16).to(tl.float32) if w.dtype == tl.float8e4nv else w.to(tl.float32)
            if ZW:
                v = v - tl.load(zw_ptr + offs_n, mask=nmask, other=0.0)[:, None]
        if SCALE:
            v = v * tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)[:, None]
        dst = o_ptr + offs_n[:, None].to(tl.int64) * so_n + (start + offs_e)[None, :]
        tl.store(dst, v.to(o_ptr.dtype.element_ty), mask=mask)


def fake_quantize(x: torch.Tensor, out: torch.Tensor, bits: int,
                  static: tuple[torch.Tensor, torch.Tensor] | None = None,
                  clip: torch.Tensor | None = None) -> torch.Tensor:
    """Write ``x`` fake-quantized per token into ``out``, both viewed as ``(B, C, P)`` or, for ranges per group of
    ``C`` channels, ``(B, G, C, P)`` (any strides; ``out`` in the dtype wanted): the codes of
    ``gpukernels.quantize`` (float32 ranges and divisions), dequantized in float32 and rounded once to ``out``'s
    dtype, as ``ActQuantizer`` does. ``static``: per-sample ``(scale, zero_point)``; ``clip``: the ratio dynamic
    ranges shrink by."""
    if x.dim() == 3:
        x, out = x.unsqueeze(1), out.unsqueeze(1)
    b, g, c, p = x.shape
    block_c = _next_pow2(c)
    block_p = max(1, min(64, 8192 // block_c))
    ss, sz = static if static is not None else (x, x)  # unread without STATIC
    fake_quantize_kernel[(_cdiv(p, block_p), b * g)](
        x, out, ss, sz, clip if clip is not None else x, g, c, p, *x.stride(), *out.stride(),
        LEVELS=2**bits - 1, STATIC=static is not None, CLIP=clip is not None, BLOCK_P=block_p, BLOCK_C=block_c,
        num_warps=4 if block_c * block_p <= 4096 else 8)
    return out


def runs(parts: list[list[int]], ranges: list[torch.Tensor | None]) -> list[tuple[int, int, int, int]]:
    """The input parts as runs of equal ones, ``(first part, count, channels each, bits)``: the channel groups of
    per-group ranges (dynamic, same bits, same clipping) are one run, which one kernel launch serves.
    ``parts``/``ranges``: ``gpuexec.gpu_layer_args``' ``(c0, c1, bits)`` per part and ranges, three entries per part."""
    found = []
    for i, (c0, c1, bits) in enumerate(parts):
        if found and ranges[3 * i] is None:
            j, count, width, b = found[-1]
            if (ranges[3 * j] is None and width == c1 - c0 and b == bits and ranges[3 * j + 2] is ranges[3 * i + 2]
                    and parts[j][0] + count * width == c0):
                found[-1] = (j, count + 1, width, b)
                continue
        found.append((i, 1, c1 - c0, bits))
    return found


def dequantize(blocks: torch.Tensor, packed: bool, w_zero: torch.Tensor | None, w_scale: torch.Tensor,
               zw: torch.Tensor | None, out: torch.Tensor, first: int, channels: int, taps: int,
               groups: int = 1, rows: int | None = None, scale: bool = True) -> None:
    """Write the weight of ``groups`` consecutive input parts of ``channels`` channels each, from channel ``first``,
    into ``out`` ((N, C[, kh, kw]), contiguous): ``scale * (c - z)`` in float32 rounded once to ``out``'s dtype, as
    ``dequantized_weight`` computes it; with ``scale=False``, the carriers ``c - z`` themselves (small integers,
    exact in float8 e4m3 for weights of at most 4 bits: what ``gpuexec.scaled_run`` multiplies). ``blocks``: the
    parts' ``groups * taps`` blocks of ``intexec``'s layout (part-major, then tap), from the first one's start, each
    ``rows`` output channels (a grouped convolution's ``N / groups``: its blocks repeat per convolution group;
    default N): packed 4-bit codes with int8 zero points ``w_zero``, or int8/float8 carriers, minus ``zw`` for 8-bit
    weights."""
    n = out.shape[0]
    width = (channels + 1) // 2 if packed else channels
    elements = groups * channels * taps  # of each output channel's row, contiguous from first * taps
    dequantize_kernel[(_cdiv(n, 16), _cdiv(elements, 128))](
        blocks, w_zero if packed else w_scale, w_scale, zw if zw is not None else w_scale, out, n, rows or n, channels,
        width, elements, first * taps, out.stride(0), TAPS=taps, PACKED=packed, ZW=zw is not None, SCALE=scale,
        BN=16, BE=128, num_warps=4)


def scaled_gemms(device: torch.device | str) -> bool:
    """Whether ``device`` runs ``torch._scaled_mm`` on float8 with a scale per row and per column, which the float8
    path needs: CUDA compute capability 9.0+ (Hopper and later) where a small such GEMM runs (``_row_wise_float8``: a
    build or GPU without the kernel costs the path, not a warning per layer). CPU tensors take the GPU paths only
    through Triton's interpreter (the tests), where PyTorch's CPU ``_scaled_mm`` serves. Decided once per device and
    remembered (``FLOAT8_GEMMS``), so that ``torch.compile`` traces a dictionary lookup only; while it traces, a device
    not decided yet answers no."""
    device = torch.device(device)
    known = FLOAT8_GEMMS.get(device)
    if known is not None:
        return known
    if torch.compiler.is_compiling():
        return False
    if device.type == "cuda":
        known = torch.cuda.get_device_capability(device) >= (9, 0) and _row_wise_float8(device)
    else:
        known = (device.type == "cpu" and triton is not None and os.environ.get("TRITON_INTERPRET") == "1"
                 and _row_wise_float8(device))
    FLOAT8_GEMMS[device] = known
    return known


FLOAT8_GEMMS: dict[torch.device, bool] = {}  # scaled_gemms' answers, per device


def _row_wise_float8(device: torch.device) -> bool:
    """Whether a 16 x 16 float8 ``torch._scaled_mm`` with row-wise scales and a bfloat16 output runs on ``device``."""
    try:
        a = torch.ones(16, 16, dtype=torch.float32, device=device).to(FP8_DTYPE)
        ones = torch.ones(16, 1, dtype=torch.float32, device=device)
        torch._scaled_mm(a, a.t(), scale_a=ones, scale_b=ones.t().contiguous(), out_dtype=torch.bfloat16)
    except Exception:  # noqa: BLE001  (no such op, no kernel for this GPU or build: the path is not offered)
        return False
    return True


def scaled_gemm(x: torch.Tensor, bits: int, static: tuple[torch.Tensor, torch.Tensor] | None,
                clip: torch.Tensor | None, weight: torch.Tensor, packed: bool, w_zero: torch.Tensor | None,
                w_scale: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """The float8 path: ``x`` viewed as ``(B, K, P)`` (as ``gpukernels.quantize`` takes it) quantized per token into
    float8 e4m3 carriers (``bits <= 4``), times the weight's ``(n, K)`` carriers (the resident float8 ones, or
    written by ``dequantize`` into a temporary from packed or int8 ones), the products summed in float32 (small
    integers: exact in float32 arithmetic; see the module's docstring on the tensor cores), each sum scaled by its
    token's and its output channel's scale, the bias added and the result rounded once to ``x``'s dtype. Returns
    ``(B * P, n)``, tokens in ``x``'s order."""
    k = x.shape[1]
    tokens = quantize(x, bits, static, False, True, clip)
    if weight.dtype == FP8_DTYPE:
        carriers = weight.view(n, k)
    else:
        carriers = torch.empty(n, k, dtype=FP8_DTYPE, device=x.device)
        dequantize(weight, packed, w_zero, w_scale, None, carriers, 0, k, 1, scale=False)
    if bias is not None and bias.dtype != x.dtype:
        bias = bias.to(x.dtype)
    return torch._scaled_mm(tokens.q, carriers.t(), scale_a=tokens.scale.view(-1, 1), scale_b=w_scale.view(1, -1),
                            bias=bias, out_dtype=x.dtype)
