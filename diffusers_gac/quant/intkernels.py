"""Integer kernels: int8 x int8 -> int32 GEMMs (``torch._int_mm``) for the frozen quantized layers, from stock ops.

They compute exactly what the fake-quantized layers compute (``layers.py``: dequantized weight, float conv/linear
on fake-quantized inputs), with the products summed in int32, so the only differences are float rounding in the
rescale (tests hold them within 1e-5 of the output's scale; measured ~1e-7).

Activations (``Act``): a quantized input carried in int8 (rows of tokens for a linear layer; (B, C, H, W) for a
convolution) with a float scale per token (or per sample, broadcastable) and, for 8-bit inputs only, a float
offset: ``value = scale * (q - zero)``. The library's codes are affine, ``c`` in ``[0, 2^b - 1]`` with an integer
zero point ``z``: for ``b <= 7`` the carrier ``c - z`` fits int8 exactly (``|c - z| <= 2^b - 1``) and ``zero`` is
None; for ``b = 8`` the carrier is ``c - 128`` and ``zero = z - 128``. ``quantize_dynamic`` reproduces
``ActQuantizer``'s per-token ranges (same float ops, so the same codes); ``quantize_static`` its learned ranges.

Weights: int8 blocks ``(out, in)``, one per (input part, kernel tap) segment of a layer, carrying ``c - z`` (bits <= 7,
exact) or ``c - 128`` (8 bits, with the offset ``zw = z - 128`` per output channel left to correct).

Sum over segments ``j`` (taps of a convolution, parts of a split input), with per-token scale ``s_j``, offset
``z_j``, sums ``r_j`` of the carriers over the channels and ``C_j`` input channels::

    out = ws * (sum_j s_j * acc_j  -  sum_j colsum_j (x) (s_j z_j)  -  zw (x) (sum_j s_j (r_j - C_j z_j))) + bias

with ``acc_j`` the int32 GEMM of the segment (``int_mm``) and ``colsum_j`` the per-output-channel sums of its weight
block. The correction terms exist only for 8-bit inputs (``z``) or 8-bit weights (``zw``): one rank-J update and
one rank-1 update per layer.

A convolution with a scale per input position is one GEMM per kernel tap (each output sums kh*kw positions with
different scales), computed tokens-major: ``acc (positions, out) = X_tap (positions, C) @ W_tap^T (C, out)``, the
layout of a linear layer. torch's CPU ``_int_mm`` (oneDNN) runs a GEMM whose short side is the rows at full speed and
one whose short side is an odd column count up to 1.8x slower (1280 channels, 3x3 taps over a 4x4 input: 22
positions as rows 228 us, as columns 404), and a UNet's deep convolutions see few positions. The int8 input is
laid out (B*Hp*Wp, C) once per call (a transposing int8 copy of a channels-first input, by 2-D transposes where the
image is large; of a channels-last one, the padding only). Stride 1: the taps read zero-copy row slices of that
padded input ("flat shift": output row ``o`` of tap ``(i, j)`` reads input row ``o + i*dh*Wp + j*dw``; the rows
between image rows and between images are computed and dropped). Other strides gather each tap's rows (an int8
copy). 1x1 convolutions are one GEMM. The output is written channels-last for a channels-last input (as ``F.conv2d``
does), else channels-first (one transposing copy).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch

EPS = 1e-8  # the library's smallest scale (quantizers.affine_params)
# Row blocks of linear_dynamic and conv2d: rows x (input + output channels) of about BLOCK_ELEMENTS, at least
# BLOCK_MIN_ROWS rows. Each block costs a dozen op calls and a GEMM call whatever its size; at two threads blocks of
# 2M elements ran SD's 320- and 640-channel layers 10-27% faster than blocks of 256K outputs (4096 x 320 -> 320 in
# bfloat16: 1.78 against 2.15 ms; a 1x1 convolution 640 -> 640 over 32x32: 2.82 against 3.30) and the others within
# 3%, since a call's buffers are shared by its blocks (no longer allocated per block)
BLOCK_ELEMENTS, BLOCK_MIN_ROWS = 1 << 21, 256
# ``_tokens_major``: the smallest image (H*W) laid out by 2-D transposes, and the most threads: the transposes run on
# one thread, the 4-D copy on all (a 3x3 convolution's padded int8 input, 320 x 64 x 64: 0.87 against 3.95 ms at one
# thread, 0.83 against 1.99 at two; 640 x 32 x 32: 0.40 against 0.63 at one, 0.41 against 0.32 at two)
TRANSPOSE_MIN_POSITIONS, TRANSPOSE_MAX_THREADS = 4096, 4


class Act(NamedTuple):
    """An int8-carried quantized activation: ``value = scale * (q - zero)`` row by row (``zero`` None means 0)."""

    q: torch.Tensor  # int8 (..., C), contiguous
    scale: torch.Tensor  # float32 (..., 1)
    zero: torch.Tensor | None  # float32 (..., 1) or None


def quantize_dynamic(x: torch.Tensor, bits: int, dim: int = -1, clip: torch.Tensor | None = None,
                     work: torch.Tensor | None = None, codes: torch.Tensor | None = None) -> Act:
    """Affine quantization with the range ``[min(x, 0), max(x, 0)]`` of each token (slice along ``dim``, the
    channels), shrunk by ``clip`` if given: the ``dynamic`` scheme of ``ActQuantizer``. Scale and zero keep ``dim``
    with size 1. ``work`` (float32) and ``codes`` (int8), of ``x``'s shape: buffers to compute in and to write the
    codes to (``linear_dynamic``'s row blocks reuse one pair), else new tensors."""
    levels = 2**bits - 1
    # A half-precision x is copied to float32 once (exactly): the CPU's min/max reductions read float32 several times
    # faster than bfloat16 (1024 x 320 along the channels: 20 against 120 us), and the division then overwrites the
    # copy in place instead of writing a new float32 tensor
    own = x.dtype != torch.float32
    if own:
        x = x.float() if work is None else work.copy_(x)
    # amin + amax: torch.aminmax over the innermost dim is ~30x slower on CPU
    lo, hi = x.amin(dim, keepdim=True).clamp_max_(0), x.amax(dim, keepdim=True).clamp_min_(0)
    if clip is not None:
        lo, hi = lo * clip, hi * clip
    scale = ((hi - lo) / levels).clamp_min_(EPS)
    zp = torch.round(-lo / scale)
    # c - z = clamp(round(x/s), -z, levels - z); without clipping the lower bound holds by construction (x >= lo,
    # division is monotonic, round(lo/s) = -z), so only the upper one is applied
    t = (x.div_(scale) if own else torch.div(x, scale, out=work)).round_().clamp_max_(levels - zp)
    if clip is not None:
        t = torch.maximum(t, -zp)
    if bits > 7:
        t = t.add_(zp - 128)
    q = t.to(torch.int8) if codes is None else codes.copy_(t)
    return Act(q, scale, None if bits <= 7 else zp - 128)


def quantize_static(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, bits: int) -> Act:
    """Affine quantization with given ranges (``scale``/``zero_point`` of shape (B, 1, ..., 1), one per sample):
    the ``static`` and ``timestep`` schemes. Scale and zero stay of that shape (broadcastable)."""
    levels = 2**bits - 1
    t = torch.div(x, scale).round_()
    low, high = -zero_point, levels - zero_point
    if bits <= 7:
        q = t.clamp_min_(low).clamp_max_(high).to(torch.int8)
        zero = None
    else:
        q = t.clamp_min_(low).clamp_max_(high).add_(zero_point - 128).to(torch.int8)
        zero = zero_point - 128
    return Act(q, scale, zero)


def unpack_int4(packed: torch.Tensor, zero_point: torch.Tensor, cols: int) -> torch.Tensor:
    """Int8 carrier ``c - z`` of a block stored two 4-bit codes per byte, halves split: byte ``j`` of a row holds
    code ``j`` (low nibble) and code ``j + ceil(cols/2)`` (high nibble). ``zero_point``: int8 (rows, 1)."""
    rows, half = packed.shape
    if torch.compiler.is_compiling():  # out= into a view breaks a torch.compile graph; the compiler fuses this anyway
        w = torch.cat([packed & 15, packed >> 4], 1).to(torch.int8) - zero_point
        return w if cols == 2 * half else w[:, :cols]
    out = torch.empty(rows, 2 * half, dtype=torch.uint8, device=packed.device)
    torch.bitwise_and(packed, 15, out=out[:, :half])
    torch.bitwise_right_shift(packed, 4, out=out[:, half:])
    w = out.view(torch.int8).sub_(zero_point)
    return w if cols == 2 * half else w[:, :cols]


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Inverse of ``unpack_int4`` (before the zero point): codes (rows, cols) in [0, 15] -> uint8 (rows, ceil(cols/2))."""
    codes = codes.to(torch.uint8)
    half = (codes.shape[1] + 1) // 2
    if codes.shape[1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[:, :half] | (codes[:, half:] << 4)).contiguous()


def _unit_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself if it is row- or column-major (a dimension of stride 1), else a contiguous copy."""
    return t if 1 in t.stride() else t.contiguous()


def int_mm(a: torch.Tensor, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``a @ b`` of int8 (M, K) and (K, N) in int32, into ``out`` (int32 (M, N)) if given: ``torch._int_mm``, except
    for K = 1, where the CPU kernel of torch 2.13 returns garbage (an outer product then, exact in int32). An operand
    with no dimension of stride 1 (a strided convolution's tap read as a view, when its output has a single row) is
    copied first: the CPU kernel of torch 2.13 takes a path several hundred times slower for it (1280 x 1280 by 1280
    x 64 with every other column: 1.5 s against 0.5 ms)."""
    if a.shape[1] == 1:
        return torch.mul(a.to(torch.int32), b.to(torch.int32), out=out)
    return torch._int_mm(_unit_stride(a), _unit_stride(b), out=out)


def _as_float(acc: torch.Tensor) -> torch.Tensor:
    """An int32 GEMM result converted to float32 in its own bytes (exact below 2**24, as ``acc.float()``). Mixed
    int32 and float operands make the CPU's elementwise ops copy the int32 tensor to a new float one first: a 4096 x
    320 ``addcmul_`` took 0.95 ms so, 0.23 ms converting in place first (one thread)."""
    return acc.view(torch.float32).copy_(acc)


def _rows(t: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """Per-row values (M, 1) of a scale or zero given per row or per sample."""
    return None if t is None else t.expand(*q.shape[:-1], 1).reshape(-1, 1)


def _corrections(dst: torch.Tensor, terms: list, zw: torch.Tensor | None, colsum: torch.Tensor | None) -> None:
    """Subtract the zero-point terms: ``terms`` holds per segment ``(s_j, z_j, r_j, C_j)`` rows (each (M, 1))."""
    if colsum is not None:  # 8-bit inputs: - sum_j (s_j z_j) (x) colsum_j
        u = torch.cat([s * z for s, z, _, _ in terms], 1)
        dst.addmm_(u, colsum, alpha=-1)
    if zw is not None:  # 8-bit weights: - sum_j s_j (r_j - C_j z_j) (x) zw
        v = None
        for s, z, r, c in terms:
            part = s * (r if z is None else r - c * z)
            v = part if v is None else v.add_(part)
        dst.addr_(v.view(-1), zw, alpha=-1)


def _epilogue(dst: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor | None = None,
              out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``dst * w_scale + bias`` into ``out``, or else in place: one pass, and no new output buffer (a fresh large
    buffer costs page faults with glibc's default malloc: 10x the pass itself for a 1024 x 2560 float output). In
    another ``out_dtype`` (a half-precision model's), computed in place and rounded once as copied: an ``out`` of
    another dtype makes the op write a float32 temporary first (an 819 x 320 block with a bias into bfloat16: 34
    against 14 + 15 us, two threads)."""
    if out is None:
        out = dst if out_dtype == dst.dtype else torch.empty_like(dst, dtype=out_dtype)
    if out.dtype != dst.dtype:
        return out.copy_(_epilogue(dst, w_scale, bias))
    return torch.mul(dst, w_scale, out=out) if bias is None else torch.addcmul(bias, dst, w_scale, out=out)


def linear(a: Act, weight: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
           zw: torch.Tensor | None = None, colsum: torch.Tensor | None = None,
           out: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
           acc: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear`` of a quantized input (rows (..., K)) and an int8 weight carrier (N, K) -> (..., N) in
    ``out_dtype``; with ``out`` (rows, N), written there; with ``acc`` (int32 (rows, N)), the GEMM's sums go there
    (and are rescaled in its bytes)."""
    q = a.q.reshape(-1, a.q.shape[-1])
    s = _rows(a.scale, a.q)
    dst = _as_float(int_mm(q, weight.t(), acc)).mul_(s)
    if colsum is not None or zw is not None:
        r = q.sum(1, keepdim=True, dtype=torch.int32).float() if zw is not None else None
        _corrections(dst, [(s, _rows(a.zero, a.q), r, q.shape[1])], zw, colsum)
    return _epilogue(dst, w_scale, bias, out, out_dtype).view(*a.q.shape[:-1], weight.shape[0])


def _block_rows(inputs: int, outputs: int) -> int:
    """Rows per block of a layer with ``inputs`` and ``outputs`` channels (``BLOCK_ELEMENTS``)."""
    return max(BLOCK_MIN_ROWS, BLOCK_ELEMENTS // (inputs + outputs))


def linear_dynamic(x: torch.Tensor, bits: int, weight: torch.Tensor, w_scale: torch.Tensor,
                   bias: torch.Tensor | None, zw: torch.Tensor | None = None,
                   colsum: torch.Tensor | None = None, clip: torch.Tensor | None = None,
                   out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``linear`` of ``x`` (..., K) quantized per token (``quantize_dynamic``), in blocks of rows
    (``_block_rows``): exact, since every token is quantized alone. One block is slower where the outputs are wide
    (8192 x 320 -> 2560 in bfloat16 at two threads: 59 against 31 ms). The
    blocks share one set of buffers (float32 input, int8 codes, int32 sums), allocated once per call: a block's
    temporaries, allocated anew, are page-faulted in again wherever the allocator returned the last ones to the
    system (4096 x 320 -> 320 in bfloat16, two threads: 3.2 against 3.0 ms with glibc's defaults, 4.3 against 3.2
    with its mmap threshold fixed)."""
    n = weight.shape[0]
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    rows = max(1, min(m, _block_rows(k, n)))  # one row at least: no tokens, no blocks
    work = torch.empty(rows, k, dtype=torch.float32, device=x.device)
    codes = torch.empty(rows, k, dtype=torch.int8, device=x.device)
    acc = torch.empty(rows, n, dtype=torch.int32, device=x.device)
    out = torch.empty(m, n, dtype=out_dtype, device=x.device)
    for r0 in range(0, m, rows):
        c = min(rows, m - r0)
        a = quantize_dynamic(x2[r0:r0 + c], bits, clip=clip, work=work[:c], codes=codes[:c])
        linear(a, weight, w_scale, bias, zw, colsum, out=out[r0:r0 + c], acc=acc[:c])
    return out.view(*x.shape[:-1], n)


class ConvGeometry(NamedTuple):
    kernel: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int]
    dilation: tuple[int, int]
    groups: int


def linear_parts(parts: list[Act], weights: list[torch.Tensor], w_scale: torch.Tensor, bias: torch.Tensor | None,
                 zw: torch.Tensor | None = None, colsum: torch.Tensor | None = None,
                 out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``linear`` of an input split along its features into ``parts`` (rows (..., K_p), each with its own ranges:
    per-group activations) and the weight blocks (N, K_p) of those features: one int8 GEMM per part, rescaled and
    summed in float. ``colsum`` (parts, N) for 8-bit inputs, ``zw`` for 8-bit weights, as in ``linear``."""
    dst, terms = None, []
    for a, weight in zip(parts, weights):
        q = a.q.reshape(-1, a.q.shape[-1])
        s = _rows(a.scale, a.q)
        acc = _as_float(int_mm(q, weight.t())).mul_(s)
        dst = acc if dst is None else dst.add_(acc)
        r = q.sum(1, keepdim=True, dtype=torch.int32).float() if zw is not None else None
        terms.append((s, _rows(a.zero, a.q), r, q.shape[1]))
    if colsum is not None or zw is not None:
        _corrections(dst, terms, zw, colsum)
    return _epilogue(dst, w_scale, bias, out_dtype=out_dtype).view(*parts[0].q.shape[:-1], weights[0].shape[0])


def _out_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def channels_last_input(x: torch.Tensor) -> bool:
    """Whether a convolution's input is laid out channels-last (``x.to(memory_format=torch.channels_last)``), so that
    its integer kernels read it as it is and write a channels-last output, as ``F.conv2d`` does; a tensor both layouts
    describe (one channel, or one position) counts as channels-first."""
    return x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)


def _position_maps(a: Act, groups: int, need_r: bool) -> list[torch.Tensor]:
    """Per input position, tokens-major views (B, H, W, k): [q (C channels), scale (1), scale*zero (1) for 8-bit
    inputs, scale*(rowsum - C*zero) (one per group) for 8-bit weights]."""
    q = a.q
    b, c, h, w = q.shape
    s = a.scale.expand(b, 1, h, w)
    z = None if a.zero is None else a.zero.expand(b, 1, h, w)
    maps = [q, s]
    if z is not None:
        maps.append(s * z)
    if need_r:
        cg = c // groups
        r = q.reshape(b, groups, cg, h, w).sum(2, dtype=torch.int32).float()
        maps.append(s * (r if z is None else r - cg * z))
    return [m.permute(0, 2, 3, 1) for m in maps]


def _tokens_major(m: torch.Tensor) -> torch.Tensor:
    """``m`` (B, H, W, C), a permuted view of a channels-first tensor, as a contiguous tensor: one 2-D transpose per
    sample, which the CPU's ``copy_`` runs in cache-sized blocks. A copy of the 4-D view walks the channels with the
    image's size as stride; at a power of two (an int8 64x64 map: 4096 bytes) the reads of a row of channels land in
    the same cache set: 320 x 64 x 64, 4.0 ms against 0.8 ms (one thread). Smaller images gain little, and with many
    threads the parallel 4-D copy is estimated to win (``TRANSPOSE_MAX_THREADS``, from one- and two-thread timings):
    they stay views."""
    b, h, w, c = m.shape
    if (m.is_contiguous() or not m.permute(0, 3, 1, 2).is_contiguous() or h * w < TRANSPOSE_MIN_POSITIONS
            or torch.get_num_threads() > TRANSPOSE_MAX_THREADS):
        return m
    out = torch.empty(b, h, w, c, dtype=m.dtype, device=m.device)
    for i in range(b):
        out[i].view(h * w, c).copy_(m[i].view(h * w, c))  # (H*W, C) with strides (1, H*W): a transpose
    return out


def conv2d(parts: list[Act], weight: Callable[[int, int, int], torch.Tensor], out_channels: int, geo: ConvGeometry,
           w_scale: torch.Tensor, bias: torch.Tensor | None, zw: torch.Tensor | None = None,
           colsum: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
           channels_last: bool = False) -> torch.Tensor:
    """``F.conv2d`` of a quantized input split along channels into ``parts`` (each ``Act`` with q (B, C_p, H, W),
    scale and zero (B, 1, H, W) or broadcastable), with int8 weight blocks ``weight(group, part, tap) -> (out/groups,
    C_p/groups)``. ``colsum``: float (parts * taps, out), needed for 8-bit inputs; ``zw``: float (out,), for 8-bit
    weights. Returns (B, out, Ho, Wo) in ``out_dtype``, in the channels-last memory format if ``channels_last``,
    else contiguous.

    Tokens-major: per tap and group, ``acc (positions, out/groups) = X_tap @ W_tap^T`` with ``X_tap`` the int8 input
    laid out (B*H*W, C) (padded: an int8 copy; unpadded 1x1: a free view of a channels-last input) read at the
    tap's offsets."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), g = geo
    b, _, h, w = parts[0].q.shape
    ho, wo = _out_size(h, kh, sh, ph, dh), _out_size(w, kw, sw, pw, dw)
    og = out_channels // g
    need_r = zw is not None
    one_by_one = kh == kw == 1 and ph == pw == 0
    hp, wp = h + 2 * ph, w + 2 * pw
    flat_shift = not one_by_one and sh == sw == 1
    device = parts[0].q.device
    if flat_shift:  # every sample's padded image one after the other; the rows between image rows and images dropped
        rows = (b - 1) * hp * wp + (ho - 1) * wp + wo
        dst = torch.empty(b * hp * wp, out_channels, dtype=torch.float32, device=device)[:rows]
    else:
        rows = b * ho * wo
        dst = torch.empty(rows, out_channels, dtype=torch.float32, device=device)
    segments = []  # per (part, tap): the part, the tap, its channels per group, maps with a row per output
    for p, a in enumerate(parts):
        maps = _position_maps(a, g, need_r)
        if not one_by_one or b > 1 or sh != 1 or sw != 1:  # else the rows are a transposed view, which _int_mm
            maps[0] = _tokens_major(maps[0])  # reads as fast as a transpose and a GEMM of the copy
        if one_by_one:
            if sh != 1 or sw != 1:
                maps = [m[:, ::sh, ::sw] for m in maps]
            maps = [m.reshape(rows, m.shape[-1]) for m in maps]
        else:
            padded = []
            for m in maps:
                mp = m.new_zeros(b, hp, wp, m.shape[-1])
                mp[:, ph:ph + h, pw:pw + w] = m
                padded.append(mp)
            maps = padded
        for i in range(kh):
            for j in range(kw):
                if one_by_one:
                    tm = maps
                elif flat_shift:
                    off = i * dh * wp + j * dw
                    tm = [m.view(-1, m.shape[-1])[off:off + rows] for m in maps]
                else:
                    tm = [m[:, i * dh:i * dh + sh * (ho - 1) + 1:sh, j * dw:j * dw + sw * (wo - 1) + 1:sw]
                          .reshape(rows, m.shape[-1]) for m in maps]
                segments.append((p, i * kw + j, a.q.shape[1] // g, tm))
    # output rows are independent: run them in blocks (every tap's GEMM for a block, then the next block)
    block = _block_rows(sum(a.q.shape[1] for a in parts), out_channels)
    if rows > block:  # several blocks: each weight block unpacked once per call, not once per block
        weight = functools.cache(weight)
    sums = torch.empty(min(rows, block), og, dtype=torch.int32, device=device)  # every GEMM's, in turn
    for r0 in range(0, rows, block):
        rs = slice(r0, min(rows, r0 + block))
        blk = dst[rs]
        u, v = [], None
        for k, (p, t, cg, tm) in enumerate(segments):
            q, s = tm[0][rs], tm[1][rs]
            for gi in range(g):
                acc = _as_float(int_mm(q if g == 1 else q[:, gi * cg:(gi + 1) * cg], weight(gi, p, t).t(),
                                       sums[:rs.stop - r0]))
                d = blk if g == 1 else blk[:, gi * og:(gi + 1) * og]
                if k == 0:
                    torch.mul(acc, s, out=d)
                else:
                    d.addcmul_(acc, s)
            if parts[p].zero is not None:
                u.append(tm[2][rs])
            if need_r:
                v = tm[-1][rs] if v is None else v + tm[-1][rs]
        if colsum is not None:  # 8-bit inputs: - sum_j (s z)_j (x) colsum_j
            blk.addmm_(torch.cat(u, 1), colsum, alpha=-1)
        if need_r:  # 8-bit weights: - sum_j s_j (r_j - C_j z_j) (x) zw, per group
            for gi in range(g):
                cols = slice(gi * og, (gi + 1) * og)
                blk[:, cols].addr_(v[:, gi], zw[cols], alpha=-1)
    image, row = (hp * wp, wp) if flat_shift else (ho * wo, wo)

    def as_output(t: torch.Tensor) -> torch.Tensor:  # rows (tokens-major) seen as (B, out, Ho, Wo)
        return torch.as_strided(t, (b, out_channels, ho, wo), (image * out_channels, 1, row * out_channels, out_channels))

    if channels_last:
        ws, bs = w_scale.view(1, -1, 1, 1), None if bias is None else bias.view(1, -1, 1, 1)
        if not flat_shift and out_dtype == torch.float32:  # already the output's layout
            return _epilogue(as_output(dst), ws, bs)
        out = torch.empty(b, out_channels, ho, wo, dtype=out_dtype, device=device, memory_format=torch.channels_last)
        return _epilogue(as_output(dst), ws, bs, out)
    # channels first: the epilogue on the rows as they are (contiguous), then one transposing copy (a transposing
    # epilogue is ~1.6x slower: 4096 positions x 320 channels, 1.81 against 1.14 ms)
    y = _epilogue(dst, w_scale, bias, out_dtype=out_dtype)
    return torch.empty(b, out_channels, ho, wo, dtype=out_dtype, device=device).copy_(as_output(y))
