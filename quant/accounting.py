"""Size accounting of quantized layers: stored bytes and the paper's bytes/average bits.

Both are computed from shapes alone, so configurations can be costed without quantizing anything;
:class:`~.quantizers.QuantizedWeight` reports the same numbers from its real tensors.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch

from .options import parse_option
from .packed import lut_rows, n_out_k_in  # noqa: F401 (re-exported)
from .packing import packed_length


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element of a floating dtype (16 for fp16/bf16, 32 for fp32)."""
    return torch.finfo(dtype).bits


def stored_nbytes(
    shape: Sequence[int], method: str, bits: int, lut_dtype: torch.dtype, group_size: int | None = None
) -> int:
    """Bytes really stored: packed codes + lookup table(s)."""
    n, k = n_out_k_in(shape)
    lut = lut_rows(method, n, k, group_size) * (1 << bits) * (dtype_bits(lut_dtype) // 8)
    return n * packed_length(k, bits) + lut


def paper_nbytes(
    shape: Sequence[int], method: str, bits: int, precision: int, group_size: int | None = None
) -> int:
    """The paper's accounting: ``⌊n·b/8⌋ + ⌊overhead/8⌋`` with overhead bits
    ``2·P·C_out`` (UAQ), ``2^b·P·C_out`` (K-Means-C), ``2^b·P`` (K-Means-A)."""
    n_out, k = n_out_k_in(shape)
    n = n_out * k
    if method == "uaq":
        overhead = 2 * precision * lut_rows(method, n_out, k, group_size)
    elif method == "kmeans_c":
        overhead = (1 << bits) * precision * n_out
    else:
        overhead = (1 << bits) * precision
    return n * bits // 8 + overhead // 8


def option_nbytes(shape: Sequence[int], option: str, dtype: torch.dtype, accounting: str = "paper") -> int:
    """Bytes of one layer under ``option`` (``fp16`` keeps the original dtype's size)."""
    n = math.prod(shape)
    parsed = parse_option(option)
    if parsed is None:
        return n * dtype_bits(dtype) // 8
    method, bits = parsed
    if accounting == "paper":
        return paper_nbytes(shape, method, bits, dtype_bits(dtype))
    if accounting == "stored":
        return stored_nbytes(shape, method, bits, dtype)
    raise ValueError(f"unknown accounting {accounting!r}: use 'paper' or 'stored'")


def average_bits(items: Iterable[tuple[Sequence[int], str, torch.dtype]], accounting: str = "paper") -> float:
    """Model-level average bits per weight ``b̄ = 8·ΣQ / Σn`` over ``(shape, option, dtype)`` items.

    With one original precision P this is the paper's ``b̄ = P·ΣQ/ΣF``.
    """
    total_bytes = 0
    total_weights = 0
    for shape, option, dtype in items:
        total_bytes += option_nbytes(shape, option, dtype, accounting)
        total_weights += math.prod(shape)
    if total_weights == 0:
        raise ValueError("no quantizable layers: the average bit width is undefined")
    return 8.0 * total_bytes / total_weights
