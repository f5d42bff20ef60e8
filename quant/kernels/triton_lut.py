"""Triton LUT kernels: fused "unpack → table lookup → ``tl.dot``" GEMM and a dequantize-to-dense kernel.

Weights use the packed layout of :mod:`..packing` (codes along K inside each output row; 3-bit as
``[lo2 plane | hi1 plane]``). Tables: per channel (``lut [N, 2**bits]``) or per layer (``[1, 2**bits]``,
row stride 0). Group-wise tables are reference-only. Activations fp16/bf16/fp32, fp32 accumulation.

Dispatch in :func:`lut_linear`: ``M <= FUSED_MAX_M`` → fused kernel; larger ``M`` → :func:`dequantize`
(in row chunks) + ``F.linear`` (cuBLAS). ``TRITON_INTERPRET=1`` must be set *before* this module is imported
to run on CPU tensors (interpreter: one fixed config, bf16 tiles upcast to fp32 before ``tl.dot``).

Environment: ``QUA2SEDIMO_FUSED_MAX_M`` (default 256), ``QUA2SEDIMO_TRITON_AUTOTUNE=0`` (use the fixed
heuristic configs on GPU), ``QUA2SEDIMO_TRITON_REG_LUT=1`` (table held in registers + ``tl.gather`` instead
of a pointer gather from the L1-resident table).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch
import triton
import triton.language as tl

from ..packed import PackedWeight
from ..packing import padded_length
from .reference import check_activation, chunked_linear, row_range

NAME = "triton"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FUSED_MAX_M = int(os.environ.get("QUA2SEDIMO_FUSED_MAX_M", "256"))
AUTOTUNE = not INTERPRET and os.environ.get("QUA2SEDIMO_TRITON_AUTOTUNE", "1") != "0"
REG_LUT = os.environ.get("QUA2SEDIMO_TRITON_REG_LUT") == "1"
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
__all__ = ["dequantize", "linear", "supports", "NAME", "INTERPRET", "FUSED_MAX_M"]


@triton.jit
def _load_codes(q_ptr, rn, rk, mask, stride_qn, hi_off, BITS: tl.constexpr):
    """Decode the int32 code tile ``[BN, BK]`` of rows ``rn`` and inputs ``rk`` (masked entries → 0)."""
    row = q_ptr + rn[:, None].to(tl.int64) * stride_qn
    if BITS == 8:
        code = tl.load(row + rk[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
    elif BITS == 4:
        b = tl.load(row + (rk // 2)[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
        code = (b >> ((rk % 2) * 4)[None, :]) & 0xF
    elif BITS == 2:
        b = tl.load(row + (rk // 4)[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
        code = (b >> ((rk % 4) * 2)[None, :]) & 0x3
    else:  # 3-bit bit planes: [lo2 plane (K8 / 4 bytes) | hi1 plane (K8 / 8 bytes)]
        lo = tl.load(row + (rk // 4)[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
        hi = tl.load(row + hi_off + (rk // 8)[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
        code = ((lo >> ((rk % 4) * 2)[None, :]) & 0x3) | (((hi >> (rk % 8)[None, :]) & 0x1) << 2)
    return code


@triton.jit
def _lut_gemm_kernel(
    x_ptr, q_ptr, lut_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qn, stride_lut, stride_om, hi_off, M_BUCKET,
    BITS: tl.constexpr, NLEV: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    REG_LUT: tl.constexpr, IEEE: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):  # fmt: skip
    """``out[M, N] = x[M, K] @ W[N, K]^T (+ bias)`` with ``W[n, k] = lut[n * stride_lut + code[n, k]]``."""
    pid = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    m_mask = rm < M
    n_mask = rn < N
    x_rows = x_ptr + rm[:, None].to(tl.int64) * stride_xm
    lut_rows = lut_ptr + rn[:, None] * stride_lut
    if REG_LUT:
        table = tl.load(lut_rows + tl.arange(0, NLEV)[None, :], mask=n_mask[:, None], other=0.0)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for k0 in range(0, K, BK):
        rk = k0 + tl.arange(0, BK)
        k_mask = rk < K
        a = tl.load(x_rows + rk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w_mask = n_mask[:, None] & k_mask[None, :]
        code = _load_codes(q_ptr, rn, rk, w_mask, stride_qn, hi_off, BITS)
        if REG_LUT:
            w = tl.gather(table, code, 1)
        else:
            w = tl.load(lut_rows + code, mask=n_mask[:, None], other=0.0)
        if UPCAST:  # interpreter: bf16 arithmetic / bf16 tl.dot are wrong there
            acc = tl.dot(a.to(tl.float32), tl.trans(w.to(tl.float32)), acc)
        elif IEEE:  # fp32 activations: full fp32 products (no TF32), like F.linear's default
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, tl.trans(w.to(a.dtype)), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _lut_dequant_kernel(
    q_ptr, lut_ptr, out_ptr, N, K, stride_qn, stride_lut, stride_on, hi_off,
    BITS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """``out[n, k] = lut[n * stride_lut + code[n, k]]`` for a ``[BN, BK]`` tile per program."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    rk = tl.program_id(1) * BK + tl.arange(0, BK)
    n_mask = rn < N
    mask = n_mask[:, None] & (rk < K)[None, :]
    code = _load_codes(q_ptr, rn, rk, mask, stride_qn, hi_off, BITS)
    w = tl.load(lut_ptr + rn[:, None] * stride_lut + code, mask=mask, other=0.0)
    out = out_ptr + rn[:, None].to(tl.int64) * stride_on + rk[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- configs

# (BM, BN, BK, num_warps, num_stages); GROUP_M = 8 everywhere.
_SMALL_M_CONFIGS = [(16, 64, 64, 4, 4), (16, 128, 64, 4, 4), (16, 64, 128, 4, 3), (16, 128, 128, 4, 3),
                    (32, 64, 64, 4, 4), (32, 128, 64, 4, 3)]  # fmt: skip
_MID_M_CONFIGS = [(64, 64, 64, 4, 4), (64, 128, 64, 4, 3), (64, 128, 32, 4, 4), (128, 64, 64, 4, 3),
                  (128, 128, 32, 8, 3), (128, 128, 64, 8, 3)]  # fmt: skip
_AUTOTUNE_KEY = ["M_BUCKET", "N", "K", "BITS", "HAS_BIAS", "REG_LUT", "IEEE"]


def make_autotuned(configs: list[tuple[int, int, int, int, int]], do_bench: Callable | None = None) -> Any:
    """Wrap the fused kernel in ``triton.autotune`` over ``configs`` (``do_bench``: interpreter stub)."""
    cfgs = [
        triton.Config({"BM": bm, "BN": bn, "BK": bk, "GROUP_M": 8}, num_warps=w, num_stages=s)
        for bm, bn, bk, w, s in configs
    ]
    for bm, bn, bk, *_ in configs:
        _check_tiles(bm, bn, bk)
    kwargs = {} if do_bench is None else {"do_bench": do_bench}
    return triton.autotune(cfgs, key=_AUTOTUNE_KEY, **kwargs)(_lut_gemm_kernel)


def heuristic_config(m: int) -> tuple[int, int, int, int, int]:
    """Fixed config (interpreter, or ``QUA2SEDIMO_TRITON_AUTOTUNE=0``): ``(BM, BN, BK, warps, stages)``."""
    if m <= 16:
        return (16, 64, 64, 4, 4)
    if m <= 32:
        return (32, 64, 64, 4, 4)
    if m <= 64 or INTERPRET:
        return (64, 64, 64, 4, 4)
    return (128, 128, 32, 8, 3)


def _check_tiles(bm: int, bn: int, bk: int) -> None:
    # tl.dot on GPU needs every tile dim >= 16 (the interpreter would silently accept less)
    assert min(bm, bn, bk) >= 16, f"tile sizes must be >= 16, got BM={bm}, BN={bn}, BK={bk}"
    assert bk % 8 == 0, f"BK must be a multiple of 8, got {bk}"


_TUNED: dict[str, Any] = {}


def _tuned_kernel(m: int) -> Any:
    name = "small" if m <= 32 else "mid"
    if name not in _TUNED:
        _TUNED[name] = make_autotuned(_SMALL_M_CONFIGS if name == "small" else _MID_M_CONFIGS)
    return _TUNED[name]


# ----------------------------------------------------------------------------------------------- wrappers


def supports(w: PackedWeight, x_dtype: torch.dtype | None, device: torch.device) -> bool:
    """Capabilities: CUDA tensors (CPU only under ``TRITON_INTERPRET=1``), per-layer and per-channel tables,
    fp16/bf16/fp32 activations (``x_dtype`` None: dequantize only, to any of those)."""
    on_device = device.type == "cuda" or (device.type == "cpu" and INTERPRET)
    return on_device and w.packing.table_kind in ("layer", "channel") and (x_dtype is None or x_dtype in ACT_DTYPES)


def _check_supported(kind: str, device: torch.device) -> None:
    if kind == "group":
        raise ValueError("triton backend: group-wise tables are only supported by the reference backend")
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "triton backend got CPU tensors: use CUDA tensors, or set TRITON_INTERPRET=1 before importing "
            "qua2sedimo.quant.kernels.triton_lut (interpreter, tests only)"
        )
    if device.type not in ("cpu", "cuda"):
        raise RuntimeError(f"triton backend supports CUDA tensors only, got {device}")


def _hi_off(bits: int, k_in: int) -> int:
    return padded_length(k_in, 3) // 4 if bits == 3 else 0


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def dequant_into(
    codes: torch.Tensor, lut: torch.Tensor, bits: int, k_in: int, out: torch.Tensor
) -> torch.Tensor:
    """Launch the dequant kernel: ``out [n, K]`` (stride(1) == 1) ← rows of ``codes``; ``lut`` 1 or n rows."""
    n = codes.shape[0]
    if n == 0:
        return out
    codes, lut = _row_major(codes), _row_major(lut)
    bn, bk = (32, 128) if INTERPRET else (16, 256)  # no tl.dot here: any power-of-2 tile works
    grid = (triton.cdiv(n, bn), triton.cdiv(k_in, bk))
    stride_lut = lut.stride(0) if lut.shape[0] > 1 else 0
    _lut_dequant_kernel[grid](
        codes, lut, out, n, k_in, codes.stride(0), stride_lut, out.stride(0), _hi_off(bits, k_in),
        BITS=bits, BN=bn, BK=bk,
    )  # fmt: skip
    return out


def fused_into(
    x2: torch.Tensor,
    codes: torch.Tensor,
    lut: torch.Tensor,
    bits: int,
    k_in: int,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    config: tuple[int, int, int, int, int] | None = None,
    reg_lut: bool | None = None,
    tuned: Any = None,
) -> torch.Tensor:
    """Launch the fused GEMM: ``out [M, N] = x2 [M, K] @ W^T (+ bias)``; ``config`` pins the tiles,
    ``tuned`` an autotuned kernel (default: autotune on GPU, :func:`heuristic_config` otherwise)."""
    m, n = x2.shape[0], codes.shape[0]
    if m == 0 or n == 0:
        return out
    x2, codes, lut = _row_major(x2), _row_major(codes), _row_major(lut)
    bias = None if bias is None else bias.contiguous()
    args = (
        x2, codes, lut, out if bias is None else bias, out, m, n, k_in,
        x2.stride(0), codes.stride(0), lut.stride(0) if lut.shape[0] > 1 else 0, out.stride(0),
        _hi_off(bits, k_in), min(triton.next_power_of_2(m), 4096),
    )  # fmt: skip
    consts = {
        "BITS": bits,
        "NLEV": 1 << bits,
        "HAS_BIAS": bias is not None,
        "UPCAST": INTERPRET and x2.dtype == torch.bfloat16,
        "REG_LUT": REG_LUT if reg_lut is None else reg_lut,
        "IEEE": x2.dtype == torch.float32,
    }
    if tuned is None and config is None and AUTOTUNE:
        tuned = _tuned_kernel(m)
    if tuned is not None:
        tuned[lambda meta: (triton.cdiv(m, meta["BM"]) * triton.cdiv(n, meta["BN"]),)](*args, **consts)
        return out
    bm, bn, bk, warps, stages = config or heuristic_config(m)
    _check_tiles(bm, bn, bk)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _lut_gemm_kernel[grid](
        *args, **consts, BM=bm, BN=bn, BK=bk, GROUP_M=8, num_warps=warps, num_stages=stages
    )
    return out


def dequantize(w: PackedWeight, dtype: torch.dtype | None = None, rows: slice | None = None) -> torch.Tensor:
    """Dense ``[N, K]`` weight (or ``[len(rows), K]``) in ``dtype`` (default: the table's dtype)."""
    lay = w.packing
    _check_supported(lay.table_kind, w.device)
    dtype = lay.lut_dtype if dtype is None else dtype
    if dtype not in ACT_DTYPES:
        raise ValueError(f"triton backend: dequantize dtype must be float16/bfloat16/float32, got {dtype}")
    r0, r1 = row_range(rows, lay.n_out)
    out = torch.empty(r1 - r0, lay.k_in, dtype=dtype, device=w.device)
    lut = w.lut
    return dequant_into(w.codes[r0:r1], lut[r0:r1] if lay.table_kind == "channel" else lut, lay.bits, lay.k_in, out)


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
           chunk_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for ``x [..., K]`` in ``x.dtype``: fused kernel for ``M <= FUSED_MAX_M``,
    else dequantize (``chunk_rows`` output rows at a time, default ≤ 16M weights) + ``F.linear``."""
    lay = w.packing
    _check_supported(lay.table_kind, w.device)
    check_activation(x, w, bias)
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"triton backend: x must be float16/bfloat16/float32, got {x.dtype}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    if x.numel() // lay.k_in > FUSED_MAX_M:
        return chunked_linear(x, w, bias, chunk_rows, dequantize)
    x2 = x.reshape(-1, lay.k_in)
    out = torch.empty(x2.shape[0], lay.n_out, dtype=x.dtype, device=x.device)
    lut = w.lut if w.lut.dtype == x.dtype else w.lut.to(x.dtype)  # the small table, in the GEMM's dtype
    fused_into(x2, w.codes, lut, lay.bits, lay.k_in, bias, out)
    return out.reshape(*x.shape[:-1], lay.n_out)
