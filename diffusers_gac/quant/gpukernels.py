"""Integer kernels for GPUs, in Triton: per-token activation quantization and an int8 implicit GEMM.

They compute what ``intkernels`` computes on the CPU (and so what the fake-quantized layers compute): the same codes,
products summed exactly in int32, the scales applied in float32, the output in the input's dtype.

Two kernels per layer call:

* ``quantize``: reads the layer's input (any float dtype, upcast to float32) and writes int8 carriers token-major,
  ``(tokens, C)`` with the channels contiguous (a token is a row of a linear layer's input, or a pixel of a
  convolution's input), a float32 scale per token and, for 8-bit inputs, a zero offset and the carriers' sum per
  token. Dynamic ranges follow ``ActQuantizer``'s per-token ``[min(x, 0), max(x, 0)]`` with correctly rounded
  divisions and round-half-to-even, so the codes are those of the float32 reference; static ranges take a scale and
  zero point per sample.
* ``igemm``: ``out[b, n, oh, ow] = ws[n] * sum_parts sum_taps s(token) * (acc - corrections) + bias[n]`` as an
  implicit GEMM: each program owns a tile of one sample's output positions x output channels (consecutive
  positions, so its stores are contiguous runs the compiler can vectorize), and for every kernel tap gathers
  the int8 rows of the input positions that tap reads (zero outside the image), sums ``rows @ W_tap^T`` over the
  channels in int32 on the tensor cores, and adds it, scaled by those positions' scales, to a float32 accumulator.
  A linear layer is the 1x1 case. Weights are read in ``intexec``'s layout: one block per (input part, tap), each
  ``(out, C)`` int8 carriers, or two 4-bit codes per byte (``intkernels.pack_int4``: byte ``j`` holds channel ``j``
  and channel ``j + ceil(C/2)``), unpacked in registers with the zero point subtracted: nothing is unpacked to
  memory. The output is written in the layout asked for (``(B, N, Ho, Wo)`` for a convolution, rows for a linear
  layer) and dtype.

Float8 (``int4_storage="fp8"``): 4-bit weights resident as float8 e4m3 carriers, and inputs of at most 4 bits
quantized to float8 e4m3 too, multiply on float8 tensor cores (Ada, Hopper) with the same results: e4m3 holds every
integer up to 16, the tensor cores' partial sums are added into the float32 accumulator every 32 channels (each under
32 * 225 < 2**13) and no tap's sum reaches 2**24 (at most ``gpuexec.GPU_MAX_CHANNELS`` channels). Why: Triton (3.9)
keeps a float8 ``wgmma`` in flight while the next step's copies are issued, where it waits for each int8 one
(``benchmarks/gpu_codegen.py``); an operand built in registers (unpacked from packed codes) is waited for either
way, hence float8 weights resident rather than packed ones converted per call.

Zero-point corrections (8-bit inputs or weights; see ``intkernels``) are applied per tap, in the kernel:
``acc - z * colsum[n] - zw[n] * (r - C * z)`` with ``z`` the token's zero offset, ``r`` its carriers' sum.

Sizes and strides are specialized on where the memory accesses depend on them (Triton's divisibility by 16, or 1):
that is what lets loads and stores be 16-byte vectors (``benchmarks/gpu_codegen.py`` compiles the kernels for a GPU
without one and counts them). ``TRITON_INTERPRET=1`` (set before Triton is first imported) runs both kernels on CPU
tensors, slowly: that is how the tests check them without a GPU. Without Triton this module still imports
(``triton`` is None) and defines no kernels; ``gpuexec.triton_available`` says which.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch

try:  # ships with CUDA builds of torch; without it the package still imports, and layers run other paths
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001  (a missing or broken install alike)
    triton = tl = None

FP8_DTYPE = torch.float8_e4m3fn  # float8 carriers (int4_storage="fp8")


class Tokens(NamedTuple):
    """A quantized activation, token-major: ``value[t, c] = scale[t] * (q[t, c] - zero[t])``."""

    q: torch.Tensor  # int8 or float8 (tokens, C), contiguous
    scale: torch.Tensor  # float32 (tokens,)
    zero: torch.Tensor | None  # float32 (tokens,), 8-bit inputs only
    rowsum: torch.Tensor | None  # float32 (tokens,): sum of q over C, when 8-bit weights need it


class Conv(NamedTuple):
    """Geometry of a GEMM call: batch, input height/width, kernel, stride, padding, dilation, output height/width.
    A linear layer over ``M`` rows is ``Conv(1, 1, M, 1, 1, 1, 1, 0, 0, 1, 1, 1, M)``."""

    batch: int
    height: int
    width: int
    kh: int
    kw: int
    sh: int
    sw: int
    ph: int
    pw: int
    dh: int
    dw: int
    out_h: int
    out_w: int


if triton is not None:
    @triton.jit
    def _rint(v):  # round half to even (torch.round) for |v| < 2**22
        r = tl.floor(v + 0.5)
        odd = (r - 2.0 * tl.floor(r * 0.5)) != 0.0
        return tl.where((r - v == 0.5) & odd, r - 1.0, r)

    @triton.jit
    def _token_codes(x, ss_ptr, sz_ptr, clip_ptr, b, offs_p, LEVELS: tl.constexpr, STATIC: tl.constexpr,
                     CLIP: tl.constexpr):
        """Per token (a row of ``x``, float32 (tokens, channels), masked entries 0): the codes minus the zero point
        ``t`` (``q - z``, in ``[-z, LEVELS - z]``), the scale and the zero point, as ``ActQuantizer`` computes them:
        dynamic ranges ``[min(x, 0), max(x, 0)]`` (masked entries lie inside already), times the clipping ratio at
        ``clip_ptr`` with ``CLIP`` (positive: ``min(a, 0) * c == min(a * c, 0)``, as the quantizer clips), or sample
        ``b``'s static scale and zero point."""
        if STATIC:
            scale = tl.load(ss_ptr + b + offs_p * 0)
            zp = tl.load(sz_ptr + b + offs_p * 0)
        else:
            lo = tl.minimum(tl.min(x, axis=1), 0.0)
            hi = tl.maximum(tl.max(x, axis=1), 0.0)
            if CLIP:
                ratio = tl.load(clip_ptr + offs_p * 0)
                lo = lo * ratio
                hi = hi * ratio
            scale = tl.maximum(tl.math.div_rn(hi - lo, tl.full(hi.shape, LEVELS, tl.float32)), 1e-8)  # the library's smallest scale
            zp = _rint(tl.math.div_rn(-lo, scale))
        t = _rint(tl.math.div_rn(x, scale[:, None]))
        return tl.minimum(tl.maximum(t, -zp[:, None]), LEVELS - zp[:, None]), scale, zp

    # every size and stride is specialized on (divisibility by 16, or 1): without it the loads of the input and the
    # stores of the codes cannot be proven aligned and contiguous, and go one element at a time
    @triton.jit
    def quantize_kernel(x_ptr, q_ptr, s_ptr, z_ptr, r_ptr, ss_ptr, sz_ptr, clip_ptr,
                        C, P, stride_b, stride_c, stride_p,
                        LEVELS: tl.constexpr, EIGHT: tl.constexpr, STATIC: tl.constexpr, ROWSUM: tl.constexpr,
                        CLIP: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        pid_p = tl.program_id(0)
        b = tl.program_id(1)
        offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
        offs_c = tl.arange(0, BLOCK_C)
        pmask = offs_p < P
        mask = pmask[:, None] & (offs_c[None, :] < C)
        src = x_ptr + b.to(tl.int64) * stride_b + offs_p[:, None].to(tl.int64) * stride_p + offs_c[None, :] * stride_c
        x = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        t, scale, zp = _token_codes(x, ss_ptr, sz_ptr, clip_ptr, b, offs_p, LEVELS, STATIC, CLIP)
        if EIGHT:
            t = t + (zp[:, None] - 128.0)
        q = t.to(q_ptr.dtype.element_ty)  # int8, or float8 e4m3 (exact: |t| <= 15 for 4-bit inputs)
        row = b.to(tl.int64) * P + offs_p
        tl.store(q_ptr + row[:, None] * C + offs_c[None, :], q, mask=mask)
        tl.store(s_ptr + row, scale, mask=pmask)
        if EIGHT:
            tl.store(z_ptr + row, zp - 128.0, mask=pmask)
        if ROWSUM:
            tl.store(r_ptr + row, tl.sum(tl.where(mask, t, 0.0), axis=1), mask=pmask)

    @triton.jit
    def _carriers(w, FP8: tl.constexpr):
        """Weight carriers as the tensor cores take them: float8 weights beside int8 inputs go to int8 (through
        float16: exact for the integers of 4-bit codes, |c - z| <= 15); a constexpr branch."""
        if not FP8 and w.dtype == tl.float8e4nv:
            w = w.to(tl.float16).to(tl.int8)
        return w

    @triton.jit
    def _dot(a, w, acc, FP8: tl.constexpr):
        """acc += a @ w^T: int8 into int32, or float8 into float32 with the tensor cores' partial sums added into
        the float32 accumulator every 32 channels (no partial sum of 4-bit products exceeds 32 * 225 < 2**13, and
        no total 2**24, so float32 holds every sum exactly)."""
        if FP8:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.float32, max_num_imprecise_acc=32)
        else:
            acc = tl.dot(a, tl.trans(w), acc, out_dtype=tl.int32)
        return acc

    @triton.jit
    def _tap_sum(acc, q_ptr, rows, valid, w_ptr, wz, offs_n, nmask, C, WIDTH, BK: tl.constexpr,
                 PACKED: tl.constexpr, FP8: tl.constexpr):
        """acc += rows (BM, C) @ weight block (BN, C)^T, over the channels: int8 carriers summed in int32, or
        float8 ones (``FP8``) in float32, exactly alike."""
        offs_k = tl.arange(0, BK)
        a_row = q_ptr + rows[:, None] * C
        w_row = w_ptr + offs_n[:, None].to(tl.int64) * WIDTH
        if PACKED:  # WIDTH = ceil(C/2) bytes: low nibble channel j, high nibble channel j + WIDTH
            for k0 in range(0, WIDTH, BK):
                kk = k0 + offs_k
                kmask = kk < WIDTH
                w = tl.load(w_row + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0)
                lo = (w & 15).to(tl.int8) - wz[:, None]
                hi = (w >> 4).to(tl.int8) - wz[:, None]
                a_lo = tl.load(a_row + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
                a_hi = tl.load(a_row + (kk + WIDTH)[None, :], mask=valid[:, None] & ((kk + WIDTH) < C)[None, :],
                               other=0.0)
                acc = _dot(a_lo, lo, acc, FP8)
                acc = _dot(a_hi, hi, acc, FP8)
        else:
            for k0 in range(0, C, BK):
                kk = k0 + offs_k
                kmask = kk < C
                w = _carriers(tl.load(w_row + kk[None, :], mask=nmask[:, None] & kmask[None, :], other=0.0), FP8)
                a = tl.load(a_row + kk[None, :], mask=valid[:, None] & kmask[None, :], other=0.0)
                acc = _dot(a, w, acc, FP8)
        return acc

    @triton.jit
    def _part(facc, q_ptr, s_ptr, z_ptr, r_ptr, C, WIDTH, w_ptr, wz, cs_ptr, zw, tap0, bi, pos, pmask, offs_n, nmask,
              N, H, W, Wo, sh, sw, ph, pw, dh, dw,
              KH: tl.constexpr, KW: tl.constexpr, PACKED: tl.constexpr, ZERO: tl.constexpr, ZW: tl.constexpr,
              FP8: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
        """facc += sum over the taps of this input part of s * (int32 sums - corrections), for the output positions
        ``pos`` of sample ``bi``."""
        oh = pos // Wo
        ow = pos % Wo
        for t in range(KH * KW):
            ih = oh * sh - ph + (t // KW) * dh
            iw = ow * sw - pw + (t % KW) * dw
            valid = pmask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            rows = (bi.to(tl.int64) * H + ih) * W + iw
            acc = tl.zeros((BM, BN), dtype=tl.float32 if FP8 else tl.int32)
            acc = _tap_sum(acc, q_ptr, rows, valid, w_ptr + t * N * WIDTH, wz, offs_n, nmask, C, WIDTH, BK, PACKED,
                           FP8)
            f = acc.to(tl.float32)
            z = tl.zeros((BM,), dtype=tl.float32)
            if ZERO:
                z = tl.load(z_ptr + rows, mask=valid, other=0.0)
                cs = tl.load(cs_ptr + (tap0 + t) * N + offs_n, mask=nmask, other=0.0)
                f = f - z[:, None] * cs[None, :]
            if ZW:
                r = tl.load(r_ptr + rows, mask=valid, other=0.0)
                f = f - zw[None, :] * (r - C * z)[:, None]
            s = tl.load(s_ptr + rows, mask=valid, other=0.0)
            facc += f * s[:, None]
        return facc

    # sizes that vary with the input are not specialized on (each specialization is a compile of seconds); the
    # output strides are (divisibility by 16, or 1): that is what lets the stores be 16-byte vectors
    @triton.jit(do_not_specialize=["H", "W", "Wo", "sh", "sw", "ph", "pw", "dh", "dw"])
    def igemm_kernel(q0, s0, z0, r0, C0, WIDTH0, q1, s1, z1, r1, C1, WIDTH1,
                     w_ptr, wz_ptr, ws_ptr, bias_ptr, cs_ptr, zw_ptr, out_ptr,
                     B, P, N, H, W, Wo, sh, sw, ph, pw, dh, dw, so_b, so_n, so_p,
                     KH: tl.constexpr, KW: tl.constexpr, PARTS: tl.constexpr, PACKED: tl.constexpr,
                     ZERO: tl.constexpr, ZW: tl.constexpr, HAS_BIAS: tl.constexpr, FP8: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr):
        # a tile is BM output positions of one sample (P = Ho * Wo per sample) x BN output channels: its positions
        # are consecutive, so the compiler can prove the output addresses contiguous and store in vectors
        pid = tl.program_id(0)
        tiles_p = tl.cdiv(P, BM)
        grid_m = B * tiles_p
        grid_n = tl.cdiv(N, BN)
        width = GROUP_M * grid_n  # grouped order: programs that run together share weight tiles in L2
        group = pid // width
        first_m = group * GROUP_M
        size_m = tl.minimum(grid_m - first_m, GROUP_M)
        pid_m = first_m + (pid % width) % size_m
        pid_n = (pid % width) // size_m
        bi = pid_m // tiles_p
        pos = (pid_m % tiles_p) * BM + tl.arange(0, BM)
        pmask = pos < P
        offs_n = pid_n * BN + tl.arange(0, BN)
        nmask = offs_n < N
        wz = tl.zeros((BN,), dtype=tl.int8)
        if PACKED:
            wz = tl.load(wz_ptr + offs_n, mask=nmask, other=0)
        zw = tl.zeros((BN,), dtype=tl.float32)
        if ZW:
            zw = tl.load(zw_ptr + offs_n, mask=nmask, other=0.0)
        facc = tl.zeros((BM, BN), dtype=tl.float32)
        facc = _part(facc, q0, s0, z0, r0, C0, WIDTH0, w_ptr, wz, cs_ptr, zw, 0, bi, pos, pmask, offs_n, nmask,
                     N, H, W, Wo, sh, sw, ph, pw, dh, dw, KH, KW, PACKED, ZERO, ZW, FP8, BM, BN, BK)
        if PARTS == 2:
            facc = _part(facc, q1, s1, z1, r1, C1, WIDTH1, w_ptr + KH * KW * N * WIDTH0, wz, cs_ptr, zw, KH * KW,
                         bi, pos, pmask, offs_n, nmask, N, H, W, Wo, sh, sw, ph, pw, dh, dw,
                         KH, KW, PACKED, ZERO, ZW, FP8, BM, BN, BK)
        ws = tl.load(ws_ptr + offs_n, mask=nmask, other=0.0)
        out = facc * ws[None, :]
        if HAS_BIAS:
            out += tl.load(bias_ptr + offs_n, mask=nmask, other=0.0).to(tl.float32)[None, :]
        dst = (out_ptr + bi.to(tl.int64) * so_b + offs_n[None, :].to(tl.int64) * so_n
               + pos.to(tl.int64)[:, None] * so_p)
        tl.store(dst, out.to(out_ptr.dtype.element_ty), mask=pmask[:, None] & nmask[None, :])


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def on_input_device(run):
    """``run(x, ...)`` with ``x``'s CUDA device made current where another one is: Triton launches a kernel on the
    current device, not on its tensors' device, so a layer on ``cuda:1`` while ``cuda:0`` is current (a pipeline
    spread over GPUs, ``device_map``) would launch on the wrong GPU. Where they agree it costs one device query."""

    @functools.wraps(run)
    def on_device(x: torch.Tensor, *args, **kwargs):
        if x.is_cuda and x.device.index != torch.cuda.current_device():
            with torch.cuda.device(x.device):
                return run(x, *args, **kwargs)
        return run(x, *args, **kwargs)

    return on_device


def quantize(x: torch.Tensor, bits: int, static: tuple[torch.Tensor, torch.Tensor] | None = None,
             rowsum: bool = False, fp8: bool = False, clip: torch.Tensor | None = None) -> Tokens:
    """Quantize ``x`` viewed as ``(B, C, P)`` (channels ``C``, tokens ``(b, p)``; any strides, any float dtype):
    a conv input ``(B, C, H, W)`` is passed as ``x.flatten(2)``, a linear input ``(M, K)`` as ``x.t()[None]``.
    ``static``: per-sample float32 ``(scale, zero_point)`` of shape ``(B,)``; None for dynamic per-token ranges.
    ``fp8``: carriers in float8 e4m3 instead of int8 (inputs of at most 4 bits, whose carriers it holds exactly).
    ``clip``: a float32 scalar tensor, the ratio dynamic ranges shrink by (``act_clipping``)."""
    if fp8 and bits > 4:
        raise ValueError(f"float8 carriers hold inputs of at most 4 bits exactly, not {bits}")
    b, c, p = x.shape
    tokens = b * p
    eight = bits == 8
    q = torch.empty(tokens, c, dtype=FP8_DTYPE if fp8 else torch.int8, device=x.device)
    scale = torch.empty(tokens, dtype=torch.float32, device=x.device)
    zero = torch.empty(tokens, dtype=torch.float32, device=x.device) if eight else None
    rsum = torch.empty(tokens, dtype=torch.float32, device=x.device) if rowsum else None
    block_c = _next_pow2(c)
    block_p = max(1, min(64, 8192 // block_c))
    ss, sz = static if static is not None else (scale, scale)
    quantize_kernel[(_cdiv(p, block_p), b)](
        x, q, scale, zero if eight else scale, rsum if rowsum else scale, ss, sz, clip if clip is not None else scale,
        c, p, x.stride(0), x.stride(1), x.stride(2),
        LEVELS=2**bits - 1, EIGHT=eight, STATIC=static is not None, ROWSUM=rowsum, CLIP=clip is not None,
        BLOCK_P=block_p, BLOCK_C=block_c, num_warps=4 if block_c * block_p <= 4096 else 8)
    return Tokens(q, scale, zero, rsum)


CONFIG_OVERRIDE: tuple[int, int, int, int, int] | None = None  # (BM, BN, BK, warps, stages), for tuning runs


def _padding(length: int, block: int) -> int:
    return _cdiv(length, block) * block - length


def _config(m: int, n: int, k_bytes: int) -> tuple[int, int, int, int, int]:
    """(BM, BN, BK, warps, stages) for ``m`` output positions, ``n`` output channels and a channel loop over
    ``k_bytes`` bytes of weight per row (the channels, or half of them for packed 4-bit weights): a small fixed
    table (no autotuning: each Triton compile costs seconds). BK is 128 unless 128-byte steps pad the loop by more
    than an eighth and 64-byte steps pad it less: every padded byte is a multiply by zero on the tensor cores (320
    channels in 128-byte steps waste a sixth of the work; packed 4-bit, 160 bytes a row, three eighths). On an H200
    64-byte steps (with 4 stages) measured 6-14% faster on SD's 320-channel layers and 640-channel packed ones, and
    128-byte steps 6-11% faster where they divide the loop (docs/results/inference_speed_cuda.md, tile sweep)."""
    if CONFIG_OVERRIDE is not None:
        bm, bn, bk, warps, stages = CONFIG_OVERRIDE
        return bm, bn, (bk if k_bytes > 64 else min(bk, 64)), warps, stages
    bm = 128 if m >= 4096 else 64
    bn = 128 if n >= 128 else 64
    warps = 8 if bm * bn >= 128 * 128 else 4
    if 8 * _padding(k_bytes, 128) > k_bytes and _padding(k_bytes, 64) < _padding(k_bytes, 128):
        return bm, bn, 64, warps, 4
    return bm, bn, 128, warps, 3


def igemm(parts: list[tuple[Tokens, int]], weight: torch.Tensor, packed: bool, w_zero: torch.Tensor | None,
          n: int, geo: Conv, w_scale: torch.Tensor, bias: torch.Tensor | None, colsum: torch.Tensor | None,
          zw: torch.Tensor | None, out: torch.Tensor, out_strides: tuple[int, int, int]) -> torch.Tensor:
    """The layer's output into ``out`` (viewed through ``out_strides``: per sample, per output channel, per output
    position). ``parts``: one or two ``(Tokens, C)`` (a split input's parts, in order); ``weight``: the flat int8
    (or packed uint8) blocks of ``intexec``, ``w_zero`` int8 (n,) for packed codes; ``colsum`` float32
    (parts * taps, n) for 8-bit inputs, ``zw`` float32 (n,) for 8-bit weights. ``weight`` may be float8 carriers
    (``int4_storage="fp8"``, weights of at most 4 bits): with inputs quantized to float8 too (``quantize(...,
    fp8=True)``, at most 4 bits) the products run on float8 tensor cores (compute capability 8.9+), summed in float32,
    exactly; with int8 inputs the weights are converted to int8 in registers."""
    if len(parts) not in (1, 2):
        raise ValueError(f"igemm takes one or two input parts, got {len(parts)}")
    fp8 = parts[0][0].q.dtype == FP8_DTYPE
    if fp8 and (weight.dtype != FP8_DTYPE or any(t.q.dtype != FP8_DTYPE for t, _ in parts)):
        raise ValueError("float8 inputs need float8 weights (int4_storage='fp8') and every input part in float8")
    positions = geo.out_h * geo.out_w  # per sample
    m = geo.batch * positions
    (t0, c0), (t1, c1) = parts[0], parts[-1]
    width0, width1 = ((c0 + 1) // 2, (c1 + 1) // 2) if packed else (c0, c1)
    bm, bn, bk, warps, stages = _config(m, n, max(width0, width1))
    dummy = w_scale
    grid = (geo.batch * _cdiv(positions, bm) * _cdiv(n, bn),)
    eight_in = t0.zero is not None
    igemm_kernel[grid](
        t0.q, t0.scale, t0.zero if eight_in else dummy, t0.rowsum if zw is not None else dummy, c0, width0,
        t1.q, t1.scale, t1.zero if eight_in else dummy, t1.rowsum if zw is not None else dummy, c1, width1,
        weight, w_zero if packed else dummy, w_scale, bias if bias is not None else dummy,
        colsum if eight_in else dummy, zw if zw is not None else dummy, out,
        geo.batch, positions, n, geo.height, geo.width, geo.out_w, geo.sh, geo.sw, geo.ph, geo.pw, geo.dh, geo.dw,
        *out_strides,
        KH=geo.kh, KW=geo.kw, PARTS=len(parts), PACKED=packed, ZERO=eight_in, ZW=zw is not None,
        HAS_BIAS=bias is not None, FP8=fp8, BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages)
    return out
