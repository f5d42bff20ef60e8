import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qua2sedimo.quant import pack_codes, packed_length, unpack_codes


@settings(max_examples=150, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4, 8]),
    lead=st.lists(st.integers(1, 4), min_size=0, max_size=2),
    n=st.integers(1, 70),
    seed=st.integers(0, 2**31 - 1),
)
def test_round_trip(bits, lead, n, seed):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (*lead, n), generator=g)
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (*lead, packed_length(n, bits))
    assert torch.equal(unpack_codes(packed, bits, n), codes.to(torch.int32))


@pytest.mark.parametrize(("bits", "n", "nbytes"), [(4, 1152, 576), (3, 1152, 432), (3, 9, 6), (2, 5, 2), (8, 3, 3)])
def test_dense_sizes(bits, n, nbytes):
    assert packed_length(n, bits) == nbytes


def test_layouts_are_the_documented_ones():
    # 4-bit: low nibble is the even code.
    assert pack_codes(torch.tensor([[1, 2]]), 4).tolist() == [[0x21]]
    # 3-bit bit planes: [lo2 plane (2 bytes) | hi1 plane (1 byte)] for 8 codes.
    codes = torch.tensor([[7, 0, 0, 0, 4, 0, 0, 1]])
    lo, hi = [0b11, 0b01 << 6], 0b00010001
    assert pack_codes(codes, 3).tolist() == [[lo[0], lo[1], hi]]


def test_bad_input():
    with pytest.raises(ValueError, match="out of range"):
        pack_codes(torch.tensor([[16]]), 4)
    with pytest.raises(ValueError, match="unsupported bit width"):
        pack_codes(torch.tensor([[1]]), 5)
    with pytest.raises(ValueError, match="integer"):
        pack_codes(torch.tensor([[1.0]]), 4)
    with pytest.raises(ValueError, match="do not hold"):
        unpack_codes(torch.zeros(2, 3, dtype=torch.uint8), 4, 8)
    with pytest.raises(ValueError, match="uint8"):
        unpack_codes(torch.zeros(2, 4, dtype=torch.int32), 4, 8)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_numpy_and_torch_packing_agree(bits, monkeypatch):
    # CPU packs in NumPy (wider-integer shifts, little-endian); other devices and big-endian hosts in torch
    from qua2sedimo.quant import packing

    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, (5, 3, 37), generator=g, dtype=torch.uint8)
    fast = pack_codes(codes, bits)
    monkeypatch.setattr(packing, "sys", type("sys", (), {"byteorder": "big"}))
    assert torch.equal(pack_codes(codes, bits), fast)
    assert torch.equal(pack_codes(codes.long(), bits), fast)
