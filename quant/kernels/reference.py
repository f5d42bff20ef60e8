"""Pure-PyTorch LUT dequantization and linear layer over a :class:`~..packed.PackedWeight`: runs on every device and
dtype and every table kind (layer, channel, group) — the fallback of the kernel registry and its oracle.

:func:`dequantize` is the oracle (unpack → int64 → ``torch.gather``). :func:`dequantize_fast` gives bit-identical
weights 2-4× faster on CPU and is what :func:`linear` uses: codes are unpacked by wide-word shifts (several codes
per int16/32/64 word, no per-code broadcast), the table is flattened and read by ``index_select`` with int32
indices (``code + row·levels``, no int64 intermediates), in row blocks of ``DECODE_WEIGHTS`` weights that reuse
one index buffer and write straight into the output. Nothing dense is kept between calls.
"""

from __future__ import annotations

import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F

from ..packed import PackedWeight
from ..packing import padded_length

NAME = "reference"

#: default upper bound on the number of weights dequantized at once by :func:`lut_linear`
CHUNK_WEIGHTS = 1 << 24
#: weights decoded per block on CPU by :func:`dequantize_fast` (int32 indices + output rows stay in cache); 2**19
#: was the fastest of 2**16..2**22 in a sweep on a 2-core AVX2 EPYC (uaq-4 and kmeans_c-3, 4608×1152 and 1152×4608).
#: Other devices decode a call in one block.
DECODE_WEIGHTS = 1 << 19
_WORDS = {4: torch.int16, 2: torch.int32, 1: torch.int64}  # a byte of width-w codes spreads into one such word


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


def _spread(packed: torch.Tensor, width: int) -> torch.Tensor:
    """uint8 codes of width 1, 2 or 4 (``8 // width`` per byte, lowest bits first) from bytes ``[n, B]``: each byte
    is widened to one word of ``8 // width`` bytes and its codes moved apart by halves (upper half of the codes
    shifted to the upper half of the word, then each quarter, …), so code ``j`` lands in byte ``j`` (little-endian);
    log2(codes per byte) shift/or/mask steps instead of one pass per code."""
    per = 8 // width
    v = packed.to(_WORDS[width])
    half = per // 2
    while half:
        v |= v << (half * (8 - width))
        v &= sum(((1 << (half * width)) - 1) << s for s in range(0, 8 * per, 8 * half))
        half //= 2
    return v.view(torch.uint8).reshape(packed.shape[0], packed.shape[1] * per)


def unpack_fast(packed: torch.Tensor, bits: int, k_in: int) -> torch.Tensor:
    """:func:`unpack_u8` (same uint8 codes ``[n, K]``) by wide-word shifts: 2-4x faster on CPU; big-endian hosts
    take :func:`unpack_u8`."""
    if bits == 8 or sys.byteorder != "little":
        return unpack_u8(packed, bits, k_in)
    if bits in (2, 4):
        return _spread(packed, bits)[:, :k_in]
    lo_bytes = padded_length(k_in, 3) // 4
    codes = _spread(packed[:, :lo_bytes], 2)
    codes |= _spread(packed[:, lo_bytes:], 1) << 2
    return codes[:, :k_in]


def dequantize_fast(w: PackedWeight, dtype: torch.dtype | None = None, rows: slice | None = None,
                    out: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dequantize`, bit-identical and faster on CPU (see the module docstring); ``out`` (contiguous
    ``[rows, K]`` of the result dtype) is filled and returned instead of a new tensor."""
    lay = w.packing
    r0, r1 = row_range(rows, lay.n_out)
    levels, k_in, n = lay.levels, lay.k_in, r1 - r0
    table = (w.lut if dtype is None else w.lut.to(dtype)).reshape(-1)
    if out is None:
        out = torch.empty(n, k_in, dtype=table.dtype, device=w.device)
    elif out.shape != (n, k_in) or out.dtype != table.dtype or not out.is_contiguous() or out.device != w.device:
        raise ValueError(f"out must be a contiguous {table.dtype} tensor of shape ({n}, {k_in}) on {w.device}, got "
                         f"{out.dtype} {tuple(out.shape)} on {out.device}")
    if n == 0:
        return out
    kind = lay.table_kind
    row_stride = {"layer": 0, "channel": levels}.get(kind, -(-k_in // (lay.group_size or 1)) * levels)
    index_dtype = torch.int32 if table.numel() < 2**31 else torch.int64
    col_base = None
    if kind == "group":
        col_base = torch.arange(k_in, dtype=index_dtype, device=w.device).div_(lay.group_size, rounding_mode="floor")
        col_base *= levels
    block = max(1, DECODE_WEIGHTS // k_in) if w.device.type == "cpu" else n
    row_base = torch.arange(r0, r1, dtype=index_dtype, device=w.device).mul_(row_stride).unsqueeze(1)
    codes = w.codes
    index = torch.empty(min(block, n), k_in, dtype=index_dtype, device=w.device)
    for a in range(0, n, block):
        b = min(n, a + block)
        ix = index[: b - a]
        ix.copy_(unpack_fast(codes[r0 + a : r0 + b], lay.bits, k_in))
        if row_stride:
            ix += row_base[a:b]
        if col_base is not None:
            ix += col_base
        torch.index_select(table, 0, ix.view(-1), out=out[a:b].view(-1))
    return out


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
           chunk_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` with ``W`` dequantized in chunks of ``chunk_rows`` output rows.

    Default chunk: ``CHUNK_WEIGHTS // K`` rows (≤ 16M weights), bounding extra memory. Returns ``x.dtype``.
    """
    return chunked_linear(x, w, bias, chunk_rows, dequantize_fast, reuse_buffer=True)


def chunked_linear(
    x: torch.Tensor,
    w: PackedWeight,
    bias: torch.Tensor | None,
    chunk_rows: int | None,
    dequant: Callable[..., torch.Tensor],
    reuse_buffer: bool = False,
) -> torch.Tensor:
    """Validate, then run ``F.linear`` over chunks of rows dequantized by ``dequant`` (same signature as
    :func:`dequantize`); shared by the reference and the Triton "dequant + matmul" path. ``reuse_buffer``: ``dequant``
    takes ``out=`` (as :func:`dequantize_fast` does) and every chunk is decoded into one buffer."""
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
        buf = torch.empty(chunk_rows, k_in, dtype=cdt, device=x.device) if reuse_buffer else None
        for r0 in range(0, n_out, chunk_rows):
            r1 = min(n_out, r0 + chunk_rows)
            dense = dequant(w, cdt, rows=slice(r0, r1)) if buf is None else \
                dequant(w, cdt, rows=slice(r0, r1), out=buf[: r1 - r0])
            y[:, r0:r1] = F.linear(x2, dense, None if b is None else b[r0:r1])
    return y.to(x.dtype).reshape(*x.shape[:-1], n_out)
