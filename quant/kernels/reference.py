"""Pure-PyTorch LUT dequantization and linear layer over a :class:`~..packed.PackedWeight`: runs on every device and
dtype and every table kind (layer, channel, group) — the fallback of the kernel registry and its oracle."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..packed import PackedWeight
from ..packing import padded_length

NAME = "reference"

#: default upper bound on the number of weights dequantized at once by :func:`lut_linear`
CHUNK_WEIGHTS = 1 << 24


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


def check_activation(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None) -> None:
    """Validate the activation ``x [..., K]`` and ``bias [N]`` against the packed weight."""
    k_in, n_out = w.packing.k_in, w.packing.n_out
    if not isinstance(x, torch.Tensor) or not x.dtype.is_floating_point:
        got = x.dtype if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a floating-point tensor, got {got}")
    if x.dim() == 0 or x.shape[-1] != k_in:
        raise ValueError(
            f"x of shape {tuple(x.shape)} does not match the weight: expected last dimension K={k_in}"
        )
    if x.device != w.device:
        raise ValueError(f"x is on {x.device} but the quantized weight is on {w.device}")
    if bias is not None:
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


def dequantize(w: PackedWeight, dtype: torch.dtype | None = None, rows: slice | None = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight (or ``[len(rows), K]``) in ``dtype`` (default: the table's dtype)."""
    lay = w.packing
    r0, r1 = row_range(rows, lay.n_out)
    levels, k_in = lay.levels, lay.k_in
    c = unpack_u8(w.codes[r0:r1], lay.bits, k_in).long()
    lut = w.lut
    table = lut if dtype is None else lut.to(dtype)  # cast the small table, not the weight
    if lay.table_kind == "layer":
        return torch.gather(table.expand(r1 - r0, levels), 1, c)
    if lay.table_kind == "channel":
        return torch.gather(table[r0:r1], 1, c)
    group_size = lay.group_size
    n_groups = -(-k_in // group_size)
    group = torch.arange(k_in, device=w.device) // group_size
    return torch.gather(table.reshape(lay.n_out, n_groups * levels)[r0:r1], 1, c + (group * levels)[None, :])


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


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
           chunk_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` dequantized in chunks of ``chunk_rows`` output rows.

    Default chunk: ``CHUNK_WEIGHTS // K`` rows (≤ 16M weights), bounding extra memory. Returns ``x.dtype``.
    """
    return chunked_linear(x, w, bias, chunk_rows, dequantize)


def chunked_linear(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None,
    chunk_rows: int | None,
    dequant: Callable[..., torch.Tensor],
) -> torch.Tensor:
    """Validate, then run ``F.linear`` over chunks of rows dequantized by ``dequant`` (same signature as
    :func:`dequantize`); shared by the reference and the Triton "dequant + matmul" path."""
    check_activation(x, w, bias)
    n_out, k_in = w.packing.n_out, w.packing.k_in
    if chunk_rows is None:
        chunk_rows = max(1, CHUNK_WEIGHTS // k_in)
    elif not isinstance(chunk_rows, int) or chunk_rows < 1:
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    cdt = compute_dtype(x)
    x2 = x.reshape(-1, k_in).to(cdt)
    b = None if bias is None else bias.to(cdt)
    if chunk_rows >= n_out:
        y = F.linear(x2, dequant(w, cdt), b)
    else:
        y = torch.empty(x2.shape[0], n_out, dtype=cdt, device=x.device)
        for r0 in range(0, n_out, chunk_rows):
            r1 = min(n_out, r0 + chunk_rows)
            y[:, r0:r1] = F.linear(x2, dequant(w, cdt, rows=slice(r0, r1)), None if b is None else b[r0:r1])
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
