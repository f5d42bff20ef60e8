"""Pure-PyTorch LUT dequantization and linear layer (CPU/CUDA fallback and test oracle).

A quantized weight of ``N`` output rows and ``K`` inputs is ``codes`` uint8 ``[N, packed_length(K, bits)]``
(see :mod:`..packing`) plus a float table ``lut [R, 2**bits]``; ``W[n, k] = lut[r(n, k), code[n, k]]`` with

* ``R == 1``  ("layer"):   ``r = 0`` (one table per layer, K-Means-A);
* ``R == N``  ("channel"): ``r = n`` (per-channel: folded UAQ or K-Means-C centroids);
* ``R == N * ceil(K / group_size)`` ("group"): ``r = n * ceil(K / group_size) + k // group_size``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..packing import SUPPORTED_BITS, packed_length, padded_length

NAME = "reference"

#: default upper bound on the number of weights dequantized at once by :func:`lut_linear`
CHUNK_WEIGHTS = 1 << 24

_LUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def table_kind(
    codes: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    n_out: int,
    k_in: int,
    group_size: int | None = None,
) -> str:
    """Validate a quantized weight; return its table kind: ``"layer"``, ``"channel"`` or ``"group"``.

    ``group_size`` only matters when ``lut`` has ``N * ceil(K / group_size)`` rows (neither 1 nor N).
    Raises ``ValueError`` with the expected shape/dtype on any mismatch.
    """
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"unsupported bit width {bits!r}: use one of {SUPPORTED_BITS}")
    if not isinstance(n_out, int) or n_out < 0:
        raise ValueError(f"n_out must be a non-negative int, got {n_out!r}")
    if not isinstance(k_in, int) or k_in < 1:
        raise ValueError(f"k_in must be a positive int, got {k_in!r}")
    if not isinstance(codes, torch.Tensor) or codes.dtype != torch.uint8:
        got = codes.dtype if isinstance(codes, torch.Tensor) else type(codes).__name__
        raise ValueError(f"codes must be a uint8 tensor, got {got}")
    expected = (n_out, packed_length(k_in, bits))
    if tuple(codes.shape) != expected:
        raise ValueError(
            f"codes of shape {tuple(codes.shape)} do not match a {bits}-bit weight with N={n_out}, K={k_in}: "
            f"expected {expected} (uint8, packed_length(K, bits) bytes per output row)"
        )
    if not isinstance(lut, torch.Tensor) or lut.dtype not in _LUT_DTYPES:
        got = lut.dtype if isinstance(lut, torch.Tensor) else type(lut).__name__
        raise ValueError(f"lut must be a float16/bfloat16/float32/float64 tensor, got {got}")
    levels = 1 << bits
    if lut.dim() != 2 or lut.shape[1] != levels:
        raise ValueError(f"lut of shape {tuple(lut.shape)} is not a {bits}-bit table: expected [R, {levels}]")
    if lut.device != codes.device:
        raise ValueError(f"lut is on {lut.device} but codes are on {codes.device}")
    if group_size is not None and (not isinstance(group_size, int) or group_size < 1):
        raise ValueError(f"group_size must be None or a positive int, got {group_size!r}")
    rows = lut.shape[0]
    if rows == 1:
        return "layer"
    if rows == n_out:
        return "channel"
    if group_size is not None and rows == n_out * -(-k_in // group_size):
        return "group"
    allowed = f"1 (per layer) or N={n_out} (per channel)"
    if group_size is None:
        allowed += "; pass group_size for group-wise tables"
    else:
        allowed += (
            f" or N*ceil(K/group_size)={n_out * -(-k_in // group_size)} (group-wise, group_size={group_size})"
        )
    raise ValueError(f"lut has {rows} rows: expected {allowed}")


def row_range(rows: slice | None, n_out: int) -> tuple[int, int]:
    """Resolve an optional contiguous slice of output rows to ``(start, stop)``."""
    if rows is None:
        return 0, n_out
    if not isinstance(rows, slice):
        raise ValueError(f"rows must be a slice of output rows or None, got {type(rows).__name__}")
    start, stop, step = rows.indices(n_out)
    if step != 1:
        raise ValueError(f"rows must be a contiguous slice (step 1), got step {step}")
    return start, max(start, stop)


def check_activation(x: torch.Tensor, codes: torch.Tensor, k_in: int, bias: torch.Tensor | None) -> None:
    """Validate the activation ``x [..., K]`` and ``bias [N]`` against the packed weight."""
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] != k_in:
        raise ValueError(
            f"x of shape {tuple(x.shape)} does not match the weight: expected last dimension K={k_in}"
        )
    if x.device != codes.device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {codes.device}")
    if bias is not None:
        n_out = codes.shape[0]
        if not isinstance(bias, torch.Tensor) or not bias.dtype.is_floating_point:
            raise ValueError("bias must be a floating-point tensor or None")
        if tuple(bias.shape) != (n_out,):
            raise ValueError(
                f"bias of shape {tuple(bias.shape)} does not match the weight: expected ({n_out},)"
            )
        if bias.device != x.device:
            raise ValueError(f"bias is on {bias.device} but x is on {x.device}")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """Matmul dtype: ``x.dtype`` on accelerators; on CPU half types are upcast to float32."""
    if x.device.type == "cpu" and x.dtype in (torch.float16, torch.bfloat16):
        return torch.float32
    return x.dtype


def dequantize(
    codes: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    n_out: int,
    k_in: int,
    group_size: int | None = None,
    dtype: torch.dtype | None = None,
    rows: slice | None = None,
) -> torch.Tensor:
    """Dense ``[N, K]`` weight (or ``[len(rows), K]``) in ``dtype`` (default: ``lut.dtype``)."""
    kind = table_kind(codes, lut, bits, n_out, k_in, group_size)
    r0, r1 = row_range(rows, n_out)
    levels = 1 << bits
    c = unpack_u8(codes[r0:r1], bits, k_in).long()
    table = lut if dtype is None else lut.to(dtype)  # cast the small table, not the weight
    if kind == "layer":
        return torch.gather(table.expand(r1 - r0, levels), 1, c)
    if kind == "channel":
        return torch.gather(table[r0:r1], 1, c)
    assert group_size is not None
    n_groups = -(-k_in // group_size)
    group = torch.arange(k_in, device=codes.device) // group_size
    return torch.gather(table.reshape(n_out, n_groups * levels)[r0:r1], 1, c + (group * levels)[None, :])


def unpack_u8(packed: torch.Tensor, bits: int, k_in: int) -> torch.Tensor:
    """uint8 codes ``[n, K]`` of packed rows: same values as :func:`..packing.unpack_codes` (tested against
    it) without its int32 intermediates, 2-3x faster on CPU."""
    if bits == 8:
        return packed[:, :k_in]
    n = packed.shape[0]

    def planes(p: torch.Tensor, width: int) -> torch.Tensor:
        shifts = torch.arange(0, 8, width, dtype=torch.uint8, device=p.device)
        return ((p.unsqueeze(-1) >> shifts) & ((1 << width) - 1)).reshape(n, p.shape[1] * (8 // width))

    if bits in (2, 4):
        return planes(packed, bits)[:, :k_in]
    lo_bytes = padded_length(k_in, 3) // 4
    return (planes(packed[:, :lo_bytes], 2) | (planes(packed[:, lo_bytes:], 1) << 2))[:, :k_in]


def lut_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    k_in: int,
    bias: torch.Tensor | None = None,
    group_size: int | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` dequantized in chunks of ``chunk_rows`` output rows.

    Default chunk: ``CHUNK_WEIGHTS // K`` rows (≤ 16M weights), bounding extra memory. Returns ``x.dtype``.
    """
    return chunked_linear(x, codes, lut, bits, k_in, bias, group_size, chunk_rows, dequantize)


def chunked_linear(
    x: torch.Tensor,
    codes: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    k_in: int,
    bias: torch.Tensor | None,
    group_size: int | None,
    chunk_rows: int | None,
    dequant: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Validate, then run ``F.linear`` over chunks of rows dequantized by ``dequant`` (same signature as
    :func:`dequantize`); shared by the reference and the Triton "dequant + matmul" path."""
    if not isinstance(codes, torch.Tensor) or codes.dim() != 2:
        raise ValueError("codes must be a 2-D uint8 tensor [N, packed_length(K, bits)]")
    n_out = codes.shape[0]
    table_kind(codes, lut, bits, n_out, k_in, group_size)
    check_activation(x, codes, k_in, bias)
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_WEIGHTS // k_in)
    elif not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    cdt = compute_dtype(x)
    x2 = x.reshape(-1, k_in).to(cdt)
    b = None if bias is None else bias.to(cdt)
    if chunk_rows >= n_out:
        y = F.linear(x2, dequant(codes, lut, bits, n_out, k_in, group_size, cdt), b)
    else:
        y = torch.empty(x2.shape[0], n_out, dtype=cdt, device=x.device)
        for r0 in range(0, n_out, chunk_rows):
            r1 = min(n_out, r0 + chunk_rows)
            w = dequant(codes, lut, bits, n_out, k_in, group_size, cdt, rows=slice(r0, r1))
            y[:, r0:r1] = F.linear(x2, w, None if b is None else b[r0:r1])
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
