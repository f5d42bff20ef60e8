"""Dense packing of 2/3/4/8-bit integer codes into uint8 along the last axis.

Layouts (per row of ``n`` codes; rows are padded with zero codes to a whole number of bytes):

* 8-bit: one code per byte.
* 4-bit: byte ``k // 2`` holds code ``k`` in bits ``4 * (k % 2)`` (low nibble = even ``k``).
* 2-bit: byte ``k // 4`` holds code ``k`` in bits ``2 * (k % 4)``.
* 3-bit: *bit planes* ``[lo2 plane | hi1 plane]``. The row is padded to ``n8 = ceil(n / 8) * 8``
  codes; the first ``n8 / 4`` bytes are the 2-bit plane of the low two bits (2-bit layout above), the
  last ``n8 / 8`` bytes hold the high bit of code ``k`` at bit ``k % 8`` of byte ``k // 8``.
  Exactly 3 bits per code, no code crosses a byte, and a kernel decodes a tile with two aligned loads.
"""

from __future__ import annotations

import sys

import numpy as np
import torch

SUPPORTED_BITS = (2, 3, 4, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: use one of {SUPPORTED_BITS}")


def padded_length(n: int, bits: int) -> int:
    """Number of codes per row after padding to whole bytes for ``bits``."""
    _check_bits(bits)
    unit = {8: 1, 4: 2, 2: 4, 3: 8}[bits]
    return -(-n // unit) * unit


def packed_length(n: int, bits: int) -> int:
    """Bytes per packed row of ``n`` codes."""
    return padded_length(n, bits) * bits // 8


def _pack_sub(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack codes of width 1, 2, 4 or 8 (row length already a multiple of 8 // bits)."""
    per = 8 // bits
    c = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per)
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=codes.device)
    return (c << shifts).sum(dim=-1, dtype=torch.int32).to(torch.uint8)


def _unpack_sub(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 8 // bits
    shifts = torch.arange(0, 8, bits, dtype=torch.int32, device=packed.device)
    c = (packed.to(torch.int32).unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return c.reshape(*packed.shape[:-1], packed.shape[-1] * per)


def _pack_np(c: np.ndarray, bits: int, pad: int) -> np.ndarray:
    """:func:`pack_codes` of uint8 codes in NumPy (little-endian): adjacent codes are read as one wider
    integer and shifted together, several times faster than per-code shifts."""
    if pad:
        c = np.concatenate([c, np.zeros((*c.shape[:-1], pad), np.uint8)], axis=-1)
    if bits == 8:
        return np.array(c, copy=True, order="C")
    c = np.ascontiguousarray(c)
    if bits == 4:  # v = c0 | c1 << 8 → low byte of v | v >> 4
        v = c.view(np.uint16)
        return (v | (v >> 4)).astype(np.uint8)
    if bits == 2:  # v = c0 | c1 << 8 | c2 << 16 | c3 << 24 → low byte of v | v >> 6 | v >> 12 | v >> 18
        v = c.view(np.uint32)
        return (v | (v >> 6) | (v >> 12) | (v >> 18)).astype(np.uint8)
    lo = _pack_np(c & 3, 2, 0)
    hi = np.packbits(c >> 2, axis=-1, bitorder="little")
    return np.concatenate([lo, hi], axis=-1)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer ``codes`` (values in ``[0, 2**bits)``) along the last axis into uint8.

    Returns a contiguous uint8 tensor of shape ``codes.shape[:-1] + (packed_length(n, bits),)``.
    """
    _check_bits(bits)
    if codes.dtype.is_floating_point or codes.dtype == torch.bool or codes.is_complex():
        raise ValueError(f"codes must be an integer tensor, got {codes.dtype}")
    if codes.dim() == 0:
        raise ValueError("codes must have at least one dimension")
    n = codes.shape[-1]
    c = codes if codes.dtype == torch.uint8 else codes.to(torch.int32)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= (1 << bits)):
        raise ValueError(f"codes out of range for {bits}-bit packing: values must lie in [0, {1 << bits})")
    pad = padded_length(n, bits) - n
    if c.device.type == "cpu" and sys.byteorder == "little":
        return torch.from_numpy(_pack_np(c.to(torch.uint8).numpy(), bits, pad))
    c = c.to(torch.int32)
    if pad:
        c = torch.nn.functional.pad(c, (0, pad))
    if bits == 8:
        return c.to(torch.uint8).contiguous()
    if bits in (2, 4):
        return _pack_sub(c, bits).contiguous()
    lo = _pack_sub(c & 3, 2)
    hi = _pack_sub((c >> 2) & 1, 1)
    return torch.cat([lo, hi], dim=-1).contiguous()


def unpack_codes(packed: torch.Tensor, bits: int, n: int) -> torch.Tensor:
    """Inverse of :func:`pack_codes`: uint8 ``packed`` → int32 codes with last dimension ``n``."""
    _check_bits(bits)
    if packed.dtype != torch.uint8:
        raise ValueError(f"packed codes must be uint8, got {packed.dtype}")
    if packed.dim() == 0 or packed.shape[-1] != packed_length(n, bits):
        got = tuple(packed.shape)
        raise ValueError(
            f"packed codes of shape {got} do not hold {n} {bits}-bit codes per row "
            f"(expected last dimension {packed_length(n, bits)})"
        )
    if bits == 8:
        return packed.to(torch.int32)
    if bits in (2, 4):
        return _unpack_sub(packed, bits)[..., :n]
    n8 = padded_length(n, 3)
    lo = _unpack_sub(packed[..., : n8 // 4], 2)
    hi = _unpack_sub(packed[..., n8 // 4 :], 1)
    return (lo | (hi << 2))[..., :n]
