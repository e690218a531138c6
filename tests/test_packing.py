import pytest
import torch

from diffusers_gac.quant.packing import pack_codes, packed_width, unpack_codes


@pytest.mark.parametrize("bits", [2, 4, 5, 8])
@pytest.mark.parametrize("k", [1, 6, 7])
def test_pack_unpack_round_trip(bits, k):
    codes = torch.randint(0, 2**bits, (3, k), dtype=torch.uint8)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.shape == (3, packed_width(k, bits))
    assert torch.equal(unpack_codes(packed, k, bits), codes)


def test_four_bit_codes_take_half_a_byte():
    codes = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_codes(codes, 4).tolist() == [[0x21, 0x0F]]
