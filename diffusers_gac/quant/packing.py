"""Integer weight codes in compact storage: two 4-bit codes per byte (bits <= 4), one code per byte otherwise.

A layer with ``out`` output channels and ``k`` weights per channel stores ``packed_weight`` of dtype uint8 and
shape ``(out, packed_width(k, bits))``; code ``j`` of a row sits in byte ``j // 2``, low nibble for even ``j``.
"""

from __future__ import annotations

import torch


def codes_per_byte(bits: int) -> int:
    return 2 if bits <= 4 else 1


def packed_width(num_codes: int, bits: int) -> int:
    per = codes_per_byte(bits)
    return (num_codes + per - 1) // per


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes ``(rows, k)`` in ``[0, 2**bits)`` into uint8 ``(rows, packed_width(k, bits))``."""
    codes = codes.to(torch.uint8)
    if codes_per_byte(bits) == 1:
        return codes.contiguous()
    if codes.shape[-1] % 2:
        codes = torch.nn.functional.pad(codes, (0, 1))
    return (codes[..., 0::2] | (codes[..., 1::2] << 4)).contiguous()


def unpack_codes(packed: torch.Tensor, num_codes: int, bits: int) -> torch.Tensor:
    """Inverse of ``pack_codes``: uint8 codes of shape ``(rows, num_codes)``."""
    if codes_per_byte(bits) == 1:
        return packed[..., :num_codes]
    low, high = packed & 0x0F, packed >> 4
    return torch.stack([low, high], dim=-1).flatten(-2)[..., :num_codes]
