"""Triton LUT kernels: a split-K "swap AB" GEMM for few tokens and a dequantize-to-dense kernel for the rest.

Weights use the packed layout of :mod:`..packing` (codes along K inside each output row; 3-bit as
``[lo2 plane | hi1 plane]``). Tables: per channel (``lut [N, 2**bits]``) or per layer (``[1, 2**bits]``, row stride
0). Group-wise tables are reference-only.

**Fused GEMM** (:func:`fused_into`, fp16/bf16 activations, ``M <= FUSED_MAX_M`` tokens): ``out^T = W · x^T`` — the
decoded weight tile ``[BN, BK]`` is the MMA's wide operand, the ``BM >= 16`` tokens its narrow side (no padded copy:
rows and tokens past the edge are clamped and never stored). Whole K-blocks run without masks (2/8-bit affine decodes
excepted); the last split's partial block runs once after the loop. Codes are read as 32-bit words (2/3/4/8 bits:
16/32+16/8/4 codes per word) and decoded with shifts and masks; 3-bit words are first rearranged into two words of
3-bit nibbles (even and odd codes, the hi plane's bits spread in three shift+mask stages) and then decode as 4-bit
words do. 3/4-bit tables (``TABLE_DECODE = "prmt"``, the default) are looked up in registers: each program splits
its rows' 16-bit entries once into byte planes (the low and the high bytes of four entries per 32-bit register), and
PTX ``prmt`` (byte permute: four 3-bit byte selectors at once) picks four codes' bytes per instruction — at 4 bits
among entries 0-7 and 8-15, kept by a byte mask of the codes' top bits — then interleaves low and high bytes into
the 16-bit pairs the MMA reads (21 instructions per 8 codes at 4 bits, 13 at 3; no memory access). Under the
interpreter, which runs no PTX, ``prmt`` is emulated with shifts and masks (:func:`_prmt`), so the tests check the
lookup's logic on CPU; ``"gather"`` (``QUA2SEDIMO_TABLE_DECODE=gather``) keeps the previous decode, one global
load per weight at an int32 offset, and 2/8-bit tables use it.

UAQ layers (``affine``: their table is ``(code - zero) * delta``) decode without a gather or an int→float conversion:
the code bits, where they lie in the word (3/4/8 bits) or moved to the top of the mantissa (2 bits), are ORed with the
exponent of 1.0 and one FMA gives ``(1 + c * 2**(q-23)) * D + (t[0] - D)``, ``D = delta * 2**(23-q)``, ``delta =
(t[L-1] - t[0]) / (L-1)`` in fp32 (about one unit in the last place of the table's dtype from the stored table). K is
split over ``split_k`` programs (fp32 partials, summed in order: deterministic) so that the grid covers at least two
waves of the GPU's SMs (:func:`plan`).

**Large M** and fp32 activations: :func:`dequantize` (same word-wise decode; byte-wise for rows that are not 4-byte
aligned) in row chunks, each chunk's ``x @ W_chunk^T`` written by ``torch.addmm``/``mm`` straight into its columns of
the output (no copy). Rows whose packed length is not a multiple of 4 bytes also take this path.

Threshold (no GPU measured yet: a roofline estimate for an H100, see docs/benchmarks.md): ``FUSED_MAX_M = 256``.
The fused kernel decodes every weight once per 64-token tile (4.5-6.5 SASS instructions per weight on the main
tiles, measured by ``bench/kernel_compile.py``); dequant + cuBLAS moves about 4 extra bytes per weight (write and read
of the bf16 weight). Their costs cross at roughly 500-750 tokens (fused MMA efficiency 50-100 % of cuBLAS); 256 keeps
a margin until ``bench/gpu_check.py`` measures it.

``TRITON_INTERPRET=1`` must be set *before* this module is imported to run on CPU tensors (tests: bf16 tiles are
upcast to fp32 before ``tl.dot``). ``QUA2SEDIMO_FUSED_MAX_M`` overrides the threshold.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..packed import PackedWeight
from ..packing import packed_length, padded_length
from .reference import CHUNK_WEIGHTS, check_activation, row_range

NAME = "triton"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
FUSED_MAX_M = int(os.environ.get("QUA2SEDIMO_FUSED_MAX_M", "256"))
#: how the fused GEMM looks up 3/4-bit tables: "prmt" (byte planes in registers, PTX ``prmt``; emulated with shifts
#: under the interpreter) or "gather" (one global load per weight, the previous decode)
TABLE_DECODE = os.environ.get("QUA2SEDIMO_TABLE_DECODE", "prmt")
#: the byte planes travel as a tuple through the decode's functions: Triton 3.2 (torch 2.6) takes no tuple arguments
TUPLE_ARGS = tuple(int(p) for p in triton.__version__.split(".")[:2]) >= (3, 3)
if TABLE_DECODE not in ("prmt", "gather"):
    raise ValueError(f"QUA2SEDIMO_TABLE_DECODE must be 'prmt' or 'gather', got {TABLE_DECODE!r}")
ACT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
FUSED_DTYPES = (torch.float16, torch.bfloat16)
DEFAULT_SMS = 132  # H100 SXM; the device's own count is used where there is one
__all__ = ["dequantize", "linear", "supports", "plan", "FusedConfig", "NAME", "INTERPRET", "FUSED_MAX_M"]


# ----------------------------------------------------------------------------------------------- decoding


@triton.jit
def _shift(v, s: tl.constexpr):
    """``v << s`` (``s >= 0``) or ``v >> -s``; callers mask the bits they keep."""
    if s >= 0:
        r = v << s
    else:
        r = v >> (-s)
    return r


@triton.jit
def _dec(words, hi16, lut_rows, d, t, t_one, j: tl.constexpr, BITS: tl.constexpr, AFFINE: tl.constexpr):
    """Weight of code ``j`` of each word (2 and 8 bits; 3 and 4 bits: :func:`_nib8`).

    Affine: the code goes to the top of an fp32 mantissa whose exponent bits ``t_one`` (``0x3F800000``, a runtime
    value so that it stays in a register) make ``1 + c / 2**BITS``, then one FMA with ``d = 2**BITS * delta``,
    ``t = t0 - d`` (no int→float conversion). Table: one gather at an int32 offset."""
    if AFFINE:
        top: tl.constexpr = 23 - BITS
        bits = (_shift(words, top - j * BITS) & (((1 << BITS) - 1) << top)) | t_one
        w = bits.to(tl.float32, bitcast=True) * d + t
    else:
        w = tl.load(lut_rows + ((words >> (j * BITS)) & ((1 << BITS) - 1)))
    return w


@triton.jit
def _aq(src, q: tl.constexpr, BITS: tl.constexpr, delta, t0, t_one):
    """Affine weight of the code at bits ``q .. q + BITS - 1`` of ``src`` taken where it lies: mantissa bits
    ``1 + c * 2**(q - 23)`` (one LOP3), then one FMA with ``D = delta * 2**(23 - q)`` and ``t0 - D`` (hoisted; its
    rounding error is ``2**-24 * D <= delta * 2**-9`` for ``q >= 8``)."""
    D: tl.constexpr = float(1 << (23 - q))
    bits = (src & (((1 << BITS) - 1) << q)) | t_one
    return bits.to(tl.float32, bitcast=True) * (delta * D) + (t0 - delta * D)


@triton.jit
def _j4(a0, a1, a2, a3):
    """``[..., 2, 2]`` whose row-major flattening is ``a0, a1, a2, a3`` (the joined axes live in registers)."""
    return tl.join(tl.join(a0, a2), tl.join(a1, a3))


@triton.jit
def _j8(a0, a1, a2, a3, a4, a5, a6, a7):
    return tl.join(_j4(a0, a2, a4, a6), _j4(a1, a3, a5, a7))


@triton.jit
def _j16(a0, a1, a2, a3, a4, a5, a6, a7, a8, a9, a10, a11, a12, a13, a14, a15):
    return tl.join(_j8(a0, a2, a4, a6, a8, a10, a12, a14), _j8(a1, a3, a5, a7, a9, a11, a13, a15))


@triton.jit
def _prmt(a, b, s, EMULATE: tl.constexpr):
    """PTX ``prmt.b32 d, a, b, s`` (default mode): byte i of ``d`` is byte ``(s >> 4i) & 7`` of the eight bytes
    ``b:a`` (0-3 from ``a``), or that byte's sign bit replicated when bit ``4i + 3`` of ``s`` is set; bits 16-31 of
    ``s`` are ignored. ``EMULATE`` (the interpreter, which runs no PTX): the same with shifts and masks."""
    if EMULATE:
        au = a.to(tl.uint32, bitcast=True)
        bu = b.to(tl.uint32, bitcast=True)
        su = s.to(tl.uint32, bitcast=True)
        r = su & 0
        for i in tl.static_range(4):
            nib = (su >> (4 * i)) & 0xF
            sh = (nib & 3) * 8
            byte = tl.where((nib & 4) == 0, au >> sh, bu >> sh) & 0xFF
            byte = tl.where(nib >= 8, tl.where(byte >= 0x80, 0xFF, 0), byte)
            r = r | (byte << (8 * i))
        d = r.to(tl.int32, bitcast=True)
    else:
        d = tl.inline_asm_elementwise("prmt.b32 $0, $1, $2, $3;", "=r,r,r,r", [a, b, s], dtype=tl.int32,
                                      is_pure=True, pack=1)
    return d


@triton.jit
def _bytes_of(e0, e1, e2, e3, SHIFT: tl.constexpr):
    """The word whose byte i is byte ``SHIFT // 8`` of ``e_i`` (16-bit table entries as int32)."""
    return ((e0 >> SHIFT) & 0xFF) | (((e1 >> SHIFT) & 0xFF) << 8) | (((e2 >> SHIFT) & 0xFF) << 16) | \
        (((e3 >> SHIFT) & 0xFF) << 24)


@triton.jit
def _entry(lut_rows, c: tl.constexpr, BITS: tl.constexpr):
    """The bits of 16-bit table entry ``c`` of each row as int32 (0 past the table)."""
    if c < (1 << BITS):
        e = tl.load(lut_rows + c).to(tl.int16, bitcast=True).to(tl.int32) & 0xFFFF
    else:
        e = tl.load(lut_rows).to(tl.int16, bitcast=True).to(tl.int32) & 0
    return e


@triton.jit
def _table_planes(lut_rows, BITS: tl.constexpr):
    """Byte planes of 16-bit table rows (``lut_rows`` [BN] pointers, 2**BITS entries each): ``(L0, .., L3, H0, ..,
    H3)`` [BN, 1] int32, ``Lj``/``Hj`` holding the low/high bytes of entries ``4j .. 4j + 3`` (3 bits: 8 entries,
    planes 2-3 unused and zero). Computed once per program (the table does not change along K)."""
    e0, e1, e2, e3 = _entry(lut_rows, 0, BITS), _entry(lut_rows, 1, BITS), _entry(lut_rows, 2, BITS), \
        _entry(lut_rows, 3, BITS)
    e4, e5, e6, e7 = _entry(lut_rows, 4, BITS), _entry(lut_rows, 5, BITS), _entry(lut_rows, 6, BITS), \
        _entry(lut_rows, 7, BITS)
    e8, e9, e10, e11 = _entry(lut_rows, 8, BITS), _entry(lut_rows, 9, BITS), _entry(lut_rows, 10, BITS), \
        _entry(lut_rows, 11, BITS)
    e12, e13, e14, e15 = _entry(lut_rows, 12, BITS), _entry(lut_rows, 13, BITS), _entry(lut_rows, 14, BITS), \
        _entry(lut_rows, 15, BITS)
    return (_bytes_of(e0, e1, e2, e3, 0)[:, None], _bytes_of(e4, e5, e6, e7, 0)[:, None],
            _bytes_of(e8, e9, e10, e11, 0)[:, None], _bytes_of(e12, e13, e14, e15, 0)[:, None],
            _bytes_of(e0, e1, e2, e3, 8)[:, None], _bytes_of(e4, e5, e6, e7, 8)[:, None],
            _bytes_of(e8, e9, e10, e11, 8)[:, None], _bytes_of(e12, e13, e14, e15, 8)[:, None])


@triton.jit
def _select(a, b, m):
    """Bytes of ``b`` where ``m`` is 0xFF, of ``a`` where it is 0 (one LOP3)."""
    return (a & ~m) | (b & m)


@triton.jit
def _lut_nib8(src, tb, NB: tl.constexpr, EMU: tl.constexpr, DT: tl.constexpr):
    """Table weights (``DT``) of the eight ``NB``-bit codes at bits ``4i`` of each word ``src`` (3 bits: bit
    ``4i + 3`` ignored) from the byte planes ``tb`` (:func:`_table_planes`), as ``[..., 2, 2, 2]`` (flattening in
    code order); no memory access.

    Codes 0-3 select with nibbles 0-3 of ``s7`` (bits 3 cleared), codes 4-7 with ``s7 >> 16``. Per byte plane and
    four codes one ``prmt`` picks each code's byte among entries 0-7; at 4 bits a second one among entries 8-15
    and one LOP3 keeps either by a byte mask of the codes' bits 3 (one ``prmt`` in sign mode: bit ``4i + 3`` of
    ``src`` is the top bit of a byte of ``src`` or of ``src << 4``); two ``prmt`` interleave low and high bytes
    into pairs. Per word of 8 codes: 21 instructions at 4 bits, 13 at 3 bits."""
    s7 = src & 0x77777777
    s7h = s7 >> 16
    zero = src * 0
    if NB == 4:
        sh4 = src << 4
        m_lo = _prmt(src, sh4, zero + 0x9D8C, EMU)  # codes 0, 1, 2, 3: bits 3, 7, 11, 15
        m_hi = _prmt(src, sh4, zero + 0xBFAE, EMU)  # codes 4, 5, 6, 7: bits 19, 23, 27, 31
        lo0 = _select(_prmt(tb[0], tb[1], s7, EMU), _prmt(tb[2], tb[3], s7, EMU), m_lo)
        hi0 = _select(_prmt(tb[4], tb[5], s7, EMU), _prmt(tb[6], tb[7], s7, EMU), m_lo)
        lo1 = _select(_prmt(tb[0], tb[1], s7h, EMU), _prmt(tb[2], tb[3], s7h, EMU), m_hi)
        hi1 = _select(_prmt(tb[4], tb[5], s7h, EMU), _prmt(tb[6], tb[7], s7h, EMU), m_hi)
    else:
        lo0 = _prmt(tb[0], tb[1], s7, EMU)
        hi0 = _prmt(tb[4], tb[5], s7, EMU)
        lo1 = _prmt(tb[0], tb[1], s7h, EMU)
        hi1 = _prmt(tb[4], tb[5], s7h, EMU)
    w0, w1 = _halves(_prmt(lo0, hi0, zero + 0x5140, EMU), DT)
    w2, w3 = _halves(_prmt(lo0, hi0, zero + 0x7362, EMU), DT)
    w4, w5 = _halves(_prmt(lo1, hi1, zero + 0x5140, EMU), DT)
    w6, w7 = _halves(_prmt(lo1, hi1, zero + 0x7362, EMU), DT)
    return _j8(w0, w1, w2, w3, w4, w5, w6, w7)


@triton.jit
def _halves(p, DT: tl.constexpr):
    """The two 16-bit values (low, high) of words ``p`` as ``DT``."""
    return p.to(tl.int16).to(DT, bitcast=True), (p >> 16).to(tl.int16).to(DT, bitcast=True)


@triton.jit
def _nib8(src, lr, d, t, one, NB: tl.constexpr, AFFINE: tl.constexpr, TABLE: tl.constexpr, DT: tl.constexpr):
    """The eight ``NB``-bit codes at bits ``4i`` of each word ``src`` (``[..., 2, 2, 2]``, flattening in code order).
    Affine: nibbles 2-4 in place, 0-1 from one left shift, 5-7 from one right shift (mantissa bits 8, 12, 16: one
    LOP3 + one FMA each); ``TABLE`` 1/2 (``lr``: the byte planes): :func:`_lut_nib8` with PTX / emulated
    ``prmt``; else one shift + mask and one gather each."""
    if AFFINE:
        sl = src << 8
        sr = src >> 12
        w = _j8(_aq(sl, 8, NB, d, t, one), _aq(sl, 12, NB, d, t, one), _aq(src, 8, NB, d, t, one),
                _aq(src, 12, NB, d, t, one), _aq(src, 16, NB, d, t, one), _aq(sr, 8, NB, d, t, one),
                _aq(sr, 12, NB, d, t, one), _aq(sr, 16, NB, d, t, one))
    elif TABLE != 0:
        w = _lut_nib8(src, lr, NB, TABLE == 2, DT)
    else:
        M: tl.constexpr = (1 << NB) - 1
        w = _j8(tl.load(lr + (src & M)), tl.load(lr + ((src >> 4) & M)), tl.load(lr + ((src >> 8) & M)),
                tl.load(lr + ((src >> 12) & M)), tl.load(lr + ((src >> 16) & M)), tl.load(lr + ((src >> 20) & M)),
                tl.load(lr + ((src >> 24) & M)), tl.load(lr + ((src >> 28) & M)))
    return w


@triton.jit
def _nib16(wd, s, lr, d, t, one, AFFINE: tl.constexpr, TABLE: tl.constexpr, DT: tl.constexpr):
    """The sixteen 3-bit codes of lo-plane words ``wd`` with their hi bits ``s`` (bit j: code j) as ``[..., 2, 2, 2,
    2]`` (flattening in code order). Three shift+mask stages move hi bit j to bit ``4 * (j // 2) + j % 2``; even codes
    j = 2i become nibble i of ``ev`` (lo bits 4i, 4i+1 of the lo word in place, hi bit to 4i+2), odd codes nibble i
    of ``od`` (lo bits shifted down by 2): one bit-select each (bit 4i+3 is left over from the lo word; every decode
    masks it off), then both decode as 4-bit words do."""
    s = (s | (s << 8)) & 0x00FF00FF
    s = (s | (s << 4)) & 0x0F0F0F0F
    s = (s | (s << 2)) & 0x33333333
    ev = ((s << 2) & 0x44444444) | (wd & ~0x44444444)
    od = ((s << 1) & 0x44444444) | ((wd >> 2) & ~0x44444444)
    return tl.join(_nib8(ev, lr, d, t, one, 3, AFFINE, TABLE, DT), _nib8(od, lr, d, t, one, 3, AFFINE, TABLE, DT))


@triton.jit
def _weights(q_ptr, rn, lr, d, t, one, stride_qw, hi_off_w, k0, K, BITS: tl.constexpr, AFFINE: tl.constexpr,
             MASKED: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TABLE: tl.constexpr = 0,
             DT: tl.constexpr = tl.float16):  # fmt: skip
    """Decoded weights ``[BN, BK]`` (fp32 when affine, else the table's dtype) of rows ``rn`` (table rows ``lr``;
    affine: ``d`` = delta, ``t`` = T[0], ``one`` the exponent bits), inputs ``k0 .. k0 + BK``, from 32-bit code
    words (``q_ptr`` an int32 view, ``stride_qw``/``hi_off_w`` in words); words past the row read as code 0 (the
    activations there are 0)."""
    row = q_ptr + rn[:, None] * stride_qw
    PER: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    kw = k0 // PER + tl.arange(0, BK // PER)
    if MASKED:
        wmask = (kw < (K + PER - 1) // PER)[None, :]
        wd = tl.load(row + kw[None, :], mask=wmask, other=0)
    else:
        wd = tl.load(row + kw[None, :])
    if AFFINE and BITS == 2:  # code at the top of the mantissa: 1 + c / 2**BITS
        d, t = d * (1 << BITS), t - d * (1 << BITS)
    if (BITS == 3 and AFFINE) and BK >= 128:
        # lo words 2p, 2p+1 share hi word p (its low and high 16 bits): one load, no shifts
        if MASKED:
            hi = tl.load(row + hi_off_w + k0 // 32 + tl.arange(0, BK // 32)[None, :],
                         mask=(k0 // 32 + tl.arange(0, BK // 32) < (K + 31) // 32)[None, :], other=0)
        else:
            hi = tl.load(row + hi_off_w + k0 // 32 + tl.arange(0, BK // 32)[None, :])
        lo_e, lo_o = tl.split(tl.reshape(wd, (BN, BK // 32, 2)))
        w_e = _nib16(lo_e, hi & 0xFFFF, lr, d, t, one, AFFINE, TABLE, DT)
        w_o = _nib16(lo_o, (hi.to(tl.uint32, bitcast=True) >> 16).to(tl.int32, bitcast=True), lr, d, t, one,
                     AFFINE, TABLE, DT)
        w = tl.permute(tl.join(w_e, w_o), (0, 1, 6, 2, 3, 4, 5))
    elif BITS == 3:
        # per lo word: tables (the join above costs them a shared-memory round trip under Triton 3.6) and small tiles
        if MASKED:
            hi = tl.load(row + hi_off_w + (kw // 2)[None, :], mask=wmask, other=0)
        else:
            hi = tl.load(row + hi_off_w + (kw // 2)[None, :])
        w = _nib16(wd, (hi >> ((kw % 2) * 16)[None, :]) & 0xFFFF, lr, d, t, one, AFFINE, TABLE, DT)
    elif BITS == 4:
        w = _nib8(wd, lr, d, t, one, 4, AFFINE, TABLE, DT)
    elif AFFINE and BITS == 8:
        w = _j4(_aq(wd << 8, 8, 8, d, t, one), _aq(wd, 8, 8, d, t, one), _aq(wd >> 8, 8, 8, d, t, one),
                _aq(wd >> 16, 8, 8, d, t, one))
    elif PER == 4:
        h = wd
        w = _j4(_dec(wd, h, lr, d, t, one, 0, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 1, BITS, AFFINE),
                _dec(wd, h, lr, d, t, one, 2, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 3, BITS, AFFINE))
    else:  # 2 bits
        h = wd
        w = _j16(_dec(wd, h, lr, d, t, one, 0, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 1, BITS, AFFINE),
                 _dec(wd, h, lr, d, t, one, 2, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 3, BITS, AFFINE),
                 _dec(wd, h, lr, d, t, one, 4, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 5, BITS, AFFINE),
                 _dec(wd, h, lr, d, t, one, 6, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 7, BITS, AFFINE),
                 _dec(wd, h, lr, d, t, one, 8, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 9, BITS, AFFINE),
                 _dec(wd, h, lr, d, t, one, 10, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 11, BITS, AFFINE),
                 _dec(wd, h, lr, d, t, one, 12, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 13, BITS, AFFINE),
                 _dec(wd, h, lr, d, t, one, 14, BITS, AFFINE), _dec(wd, h, lr, d, t, one, 15, BITS, AFFINE))
    return tl.reshape(w, (BN, BK))


@triton.jit
def _codes_bytes(q_ptr, rn, rk, mask, stride_qn, hi_off, BITS: tl.constexpr):
    """Int32 codes ``[BN, BK]`` read byte by byte (rows not 4-byte aligned; masked entries → 0)."""
    row = q_ptr + rn[:, None].to(tl.int64) * stride_qn
    if BITS == 8:
        code = tl.load(row + rk[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
    elif BITS == 3:
        lo = tl.load(row + (rk // 4)[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
        hi = tl.load(row + hi_off + (rk // 8)[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
        code = ((lo >> ((rk % 4) * 2)[None, :]) & 0x3) | (((hi >> (rk % 8)[None, :]) & 0x1) << 2)
    else:
        PER: tl.constexpr = 8 // BITS
        b = tl.load(row + (rk // PER)[None, :], mask=mask, other=0).to(tl.int32) & 0xFF
        code = (b >> ((rk % PER) * BITS)[None, :]) & ((1 << BITS) - 1)
    return code


@triton.jit
def _affine_rows(lut_ptr, rn, n_mask, stride_lut, BITS: tl.constexpr):
    """``(delta, T[0])`` fp32 per row of an affine table ``T[c] = T[0] + c * delta`` (from its two ends)."""
    t0 = tl.load(lut_ptr + rn * stride_lut, mask=n_mask, other=0.0).to(tl.float32)
    t1 = tl.load(lut_ptr + rn * stride_lut + ((1 << BITS) - 1), mask=n_mask, other=0.0).to(tl.float32)
    return (t1 - t0) / ((1 << BITS) - 1), t0


# ----------------------------------------------------------------------------------------------- kernels


@triton.jit
def _step(acc, x_cols, q_ptr, rq, tb, d, t, one, stride_qw, hi_off_w, k0, K, BITS: tl.constexpr,
          AFFINE: tl.constexpr, UPCAST: tl.constexpr, MASKED: tl.constexpr,
          BN: tl.constexpr, BK: tl.constexpr, TABLE: tl.constexpr, DT: tl.constexpr):  # fmt: skip
    """One K-step of the fused GEMM: ``acc += W[rq, k0:k0+BK] · x^T`` (``MASKED``: inputs past ``K`` read as 0;
    ``tb``: the table's byte planes when ``TABLE``, else its row pointers ``[BN, 1]``)."""
    rk = k0 + tl.arange(0, BK)
    if MASKED:
        xt = tl.load(x_cols + rk[:, None], mask=(rk < K)[:, None], other=0.0)
    else:
        xt = tl.load(x_cols + rk[:, None])
    w = _weights(q_ptr, rq, tb, d, t, one, stride_qw, hi_off_w, k0, K, BITS, AFFINE, MASKED, BN, BK, TABLE, DT)
    if UPCAST:  # interpreter: bf16 arithmetic / bf16 tl.dot are wrong there
        acc = tl.dot(w.to(xt.dtype).to(tl.float32), xt.to(tl.float32), acc)
    else:
        acc = tl.dot(w.to(xt.dtype), xt, acc)
    return acc


@triton.jit
def _lut_gemm_kernel(
    x_ptr, q_ptr, lut_ptr, bias_ptr, out_ptr,
    M, N, K, stride_xm, stride_qw, stride_lut, stride_om, stride_os, hi_off_w, k_per_split, one_bits,
    BITS: tl.constexpr, AFFINE: tl.constexpr, HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, TABLE: tl.constexpr,
):  # fmt: skip
    """Split ``pid(1)`` of ``out^T[N, M] = W[N, K] · x[M, K]^T`` for rows ``pid(0)``, tokens ``pid(2)``: written to
    ``out + pid(1) * stride_os`` (fp32 partials when split, else the output; bias added by split 0)."""
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    pid_m = tl.program_id(2)
    rn = pid_n * BN + tl.arange(0, BN)
    rm = pid_m * BM + tl.arange(0, BM)
    n_mask = rn < N
    m_mask = rm < M
    lut_rows = lut_ptr + tl.minimum(rn, N - 1) * stride_lut  # int32 offsets; rows past N: clamped, never stored
    if AFFINE:
        d, t = _affine_rows(lut_ptr, rn, n_mask, stride_lut, BITS)
        d, t = d[:, None], t[:, None]
    else:
        d, t = 0.0, 0.0
    x_cols = x_ptr + tl.minimum(rm, M - 1)[None, :] * stride_xm  # tokens past M: clamped, never stored
    rq = tl.minimum(rn, N - 1)
    if TABLE != 0:  # 3/4-bit tables: byte planes in registers, looked up with prmt
        tb = _table_planes(lut_rows, BITS)
    else:
        tb = lut_rows[:, None]
    k_lo = pid_s * k_per_split
    k_hi = tl.minimum(k_lo + k_per_split, K)
    k_full = k_lo + (k_hi - k_lo) // BK * BK
    # tl.full, not tl.zeros/tl.cdiv: those are Triton's own @jit library functions, which stay compiled-mode
    # functions when something (torch._dynamo, diffusers) imported triton before TRITON_INTERPRET was set
    acc = tl.full((BN, BM), 0.0, dtype=tl.float32)
    if (BITS == 3 or BITS == 4) or not AFFINE:
        for k0 in range(k_lo, k_full, BK):  # whole K-blocks: no masks
            acc = _step(acc, x_cols, q_ptr, rq, tb, d, t, one_bits, stride_qw, hi_off_w, k0, K, BITS, AFFINE,
                        UPCAST, False, BN, BK, TABLE, lut_ptr.dtype.element_ty)
        if k_full < k_hi:  # the last split's partial block
            acc = _step(acc, x_cols, q_ptr, rq, tb, d, t, one_bits, stride_qw, hi_off_w, k_full, K, BITS,
                        AFFINE, UPCAST, True, BN, BK, TABLE, lut_ptr.dtype.element_ty)
    else:  # 2/8-bit affine: every block masked (peeling the last one makes ptxas 3.9 spill a value across the loop)
        for k0 in range(k_lo, k_hi, BK):
            acc = _step(acc, x_cols, q_ptr, rq, tb, d, t, one_bits, stride_qw, hi_off_w, k0, K, BITS, AFFINE,
                        UPCAST, True, BN, BK, TABLE, lut_ptr.dtype.element_ty)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask & (rn * 0 + pid_s == 0), other=0.0).to(tl.float32)[:, None]
    out = out_ptr + pid_s * stride_os + rm[None, :] * stride_om + rn[:, None]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_mask[:, None] & m_mask[None, :])


@triton.jit
def _lut_dequant_kernel(
    q_ptr, lut_ptr, out_ptr, N, K, stride_q, stride_lut, stride_on, hi_off,
    BITS: tl.constexpr, WORDS: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
):  # fmt: skip
    """``out[n, k] = lut[n * stride_lut + code[n, k]]`` for a ``[BN, BK]`` tile per program (``WORDS``: ``q_ptr`` is
    an int32 view and ``stride_q``/``hi_off`` count words, else bytes)."""
    rn = tl.program_id(0) * BN + tl.arange(0, BN)
    k0 = tl.program_id(1) * BK
    rk = k0 + tl.arange(0, BK)
    n_mask = rn < N
    mask = n_mask[:, None] & (rk < K)[None, :]
    lut_rows = lut_ptr + tl.minimum(rn, N - 1)[:, None] * stride_lut
    if WORDS:
        w = _weights(q_ptr, tl.minimum(rn, N - 1), lut_rows, 0.0, 0.0, 0, stride_q, hi_off, k0, K, BITS, False,
                     True, BN, BK)
    else:
        w = tl.load(lut_rows + _codes_bytes(q_ptr, rn, rk, mask, stride_q, hi_off, BITS))
    out = out_ptr + rn[:, None].to(tl.int64) * stride_on + rk[None, :]
    tl.store(out, w.to(out_ptr.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------- planning


@dataclass(frozen=True)
class FusedConfig:
    """Tiles of one fused launch: tokens ``bm``, weight rows ``bn``, inputs ``bk``; ``split_k`` programs over K."""

    bm: int
    bn: int
    bk: int
    split_k: int = 1
    warps: int = 4
    stages: int = 3

    def __post_init__(self) -> None:
        # tl.dot on GPU needs every tile dim >= 16; 3-bit tiles hold whole hi-plane words (32 codes)
        if min(self.bm, self.bn, self.bk) < 16 or self.bk % 32:
            raise ValueError(f"fused tiles need BM, BN >= 16 and BK a multiple of 32, got {self}")
        if self.split_k < 1:
            raise ValueError(f"split_k must be >= 1, got {self.split_k}")


#: (BN, BK) tried in order: the first whose grid reaches two waves wins (small layers need the smaller tiles);
#: 16-token tiles decode twice as many weights per K-step (the loop's fixed cost spread thinner); affine (UAQ)
#: decodes take 128 x 128 there (fewer SASS instructions per weight on both Triton versions; table decodes spill
#: with it under Triton 3.6)
TILES = ((64, 128), (32, 64), (32, 32))
TILES_M16 = ((64, 256), (32, 64), (32, 32))
TILES_M16_AFFINE = ((128, 128), (32, 64), (32, 32))


def tiles_for(bm: int, affine: bool = False) -> tuple[tuple[int, int], ...]:
    if bm == 16:
        return TILES_M16_AFFINE if affine else TILES_M16
    return TILES


WAVES = 2


def fused_config(bm: int, bn: int, bk: int, split_k: int = 1) -> FusedConfig:
    """The launch config of a tile: 3 pipeline stages, 2 for 64 tokens × 32 rows (3 spill there under Triton 3.9)."""
    return FusedConfig(bm, bn, bk, split_k, stages=2 if (bm >= 64 and bn == 32) else 3)


def token_tile(m: int) -> int:
    return 16 if m <= 16 else 32 if m <= 32 else 64


def plan(m: int, n: int, k: int, sms: int = DEFAULT_SMS, affine: bool = False) -> FusedConfig:
    """Tiles and split-K for ``M = m`` tokens on an ``[n, k]`` weight (``affine``: a UAQ decode): the first of
    :func:`tiles_for` whose
    ``N-tiles × M-tiles × K-blocks`` reach ``WAVES × sms`` programs, K split just enough for that (every split the same
    whole number of K-blocks, the last one fewer); else the smallest tiles, K split completely."""
    bm = token_tile(m)
    tiles_list = tiles_for(bm, affine)
    for i, (bn, bk) in enumerate(tiles_list):
        tiles = triton.cdiv(n, bn) * triton.cdiv(m, bm)
        blocks = triton.cdiv(k, bk)
        if tiles * blocks >= WAVES * sms or i == len(tiles_list) - 1:
            per = max(1, blocks // triton.cdiv(WAVES * sms, tiles))  # K-blocks per split (the last: no more)
            split = triton.cdiv(blocks, per)
            return fused_config(bm, bn, bk, split)
    raise AssertionError("unreachable")


@functools.lru_cache(maxsize=8)
def _sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sms(device: torch.device) -> int:
    return _sms(device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else DEFAULT_SMS


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
    """Byte offset of the 3-bit hi plane inside a row (0 otherwise)."""
    return padded_length(k_in, 3) // 4 if bits == 3 else 0


def _row_major(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def word_aligned(codes: torch.Tensor, bits: int, k_in: int) -> bool:
    """Rows (and the 3-bit hi plane) start on 4-byte boundaries: the word-wise decode applies."""
    row = codes.stride(0) if codes.shape[0] > 1 else packed_length(k_in, bits)
    return (codes.stride(-1) == 1 and row % 4 == 0 and _hi_off(bits, k_in) % 4 == 0
            and codes.data_ptr() % 4 == 0 and (bits != 3 or padded_length(k_in, 3) % 32 == 0))


def _word_view(codes: torch.Tensor) -> torch.Tensor:
    """The bytes from ``codes``' first byte to the end of its storage as int32 words (no copy; the kernels index
    rows by their word stride)."""
    base = codes.storage_offset()
    flat = torch.as_strided(codes, (codes.untyped_storage().nbytes() - base,), (1,))
    usable = flat.numel() // 4 * 4
    return flat[:usable].view(torch.int32)


def table_mode(bits: int, affine: bool, lut_dtype: torch.dtype, decode: str | None = None) -> int:
    """The fused kernel's ``TABLE``: 1 (PTX ``prmt``; NVIDIA, Triton ≥ 3.3) or 2 (emulated, interpreter) for
    3/4-bit tables of 16-bit entries under the ``"prmt"`` decode (default :data:`TABLE_DECODE`), else 0 (gather)."""
    decode = TABLE_DECODE if decode is None else decode
    if decode not in ("prmt", "gather"):
        raise ValueError(f"table decode must be 'prmt' or 'gather', got {decode!r}")
    if affine or bits not in (3, 4) or lut_dtype not in FUSED_DTYPES or decode != "prmt":
        return 0
    if INTERPRET:
        return 2
    if torch.version.hip or not TUPLE_ARGS:  # prmt is PTX: ROCm builds keep the gather, as do Tritons before 3.3
        return 0
    return 1


def dequant_into(
    codes: torch.Tensor, lut: torch.Tensor, bits: int, k_in: int, out: torch.Tensor
) -> torch.Tensor:
    """Launch the dequant kernel: ``out [n, K]`` (stride(1) == 1) ← rows of ``codes``; ``lut`` 1 or n rows."""
    n = codes.shape[0]
    if n == 0:
        return out
    lut = _row_major(lut)
    words = word_aligned(codes, bits, k_in)
    bn, bk = (32, 128) if INTERPRET else (16, 256)  # no tl.dot here: any power-of-2 tile works
    grid = (triton.cdiv(n, bn), triton.cdiv(k_in, bk))
    stride_lut = lut.stride(0) if lut.shape[0] > 1 else 0
    if words:
        q, stride_q, hi = _word_view(codes), codes.stride(0) // 4, _hi_off(bits, k_in) // 4
    else:
        codes = _row_major(codes)
        q, stride_q, hi = codes, codes.stride(0), _hi_off(bits, k_in)
    _lut_dequant_kernel[grid](
        q, lut, out, n, k_in, stride_q, stride_lut, out.stride(0), hi, BITS=bits, WORDS=words, BN=bn, BK=bk,
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
    config: FusedConfig | None = None,
    affine: bool = False,
    decode: str | None = None,
) -> torch.Tensor:
    """Launch the fused GEMM: ``out [M, N] = x2 [M, K] @ W^T (+ bias)`` for fp16/bf16 ``x2`` and word-aligned
    ``codes`` (:func:`word_aligned`); ``config`` pins tiles and split (default :func:`plan`); ``affine``: decode
    with one FMA from the table's first and last entries (UAQ tables); ``decode``: how 3/4-bit tables are looked
    up, ``"prmt"`` or ``"gather"`` (default :data:`TABLE_DECODE`)."""
    m, n = x2.shape[0], codes.shape[0]
    if x2.dtype not in FUSED_DTYPES:
        raise ValueError(f"fused kernel: activations must be float16/bfloat16, got {x2.dtype} (fp32 takes the "
                         "dequantize + F.linear path)")
    if not word_aligned(codes, bits, k_in):
        raise ValueError("fused kernel: packed rows must start on 4-byte boundaries (use linear(), which falls back)")
    if m == 0 or n == 0:
        return out
    x2, lut = _row_major(x2), _row_major(lut)
    cfg = config or plan(m, n, k_in, device_sms(x2.device), affine)
    k_per_split = triton.cdiv(triton.cdiv(k_in, cfg.bk), cfg.split_k) * cfg.bk
    split = triton.cdiv(k_in, k_per_split)
    bias = None if bias is None else bias.contiguous()
    target = out if split == 1 else torch.empty(split, m, n, dtype=torch.float32, device=x2.device)
    stride_om = out.stride(0) if split == 1 else n
    grid = (triton.cdiv(n, cfg.bn), split, triton.cdiv(m, cfg.bm))
    _lut_gemm_kernel[grid](
        x2, _word_view(codes), lut, target if bias is None else bias, target, m, n, k_in, x2.stride(0),
        codes.stride(0) // 4 if n > 1 else packed_length(k_in, bits) // 4, lut.stride(0) if lut.shape[0] > 1 else 0,
        stride_om, m * n, _hi_off(bits, k_in) // 4, k_per_split, 0x3F800000,
        BITS=bits, AFFINE=affine, HAS_BIAS=bias is not None, UPCAST=INTERPRET and x2.dtype == torch.bfloat16,
        BM=cfg.bm, BN=cfg.bn, BK=cfg.bk, TABLE=table_mode(bits, affine, lut.dtype, decode), num_warps=cfg.warps,
        num_stages=cfg.stages,
    )  # fmt: skip
    if split > 1:
        out.copy_(target.sum(dim=0))  # splits summed in order: deterministic
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


def _dequant_matmul(x2: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None, chunk_rows: int | None,
                    dequant: Callable[..., torch.Tensor]) -> torch.Tensor:
    """``x2 @ W^T (+ bias)`` with ``W`` dequantized ``chunk_rows`` output rows at a time, each chunk's product
    written by cuBLAS straight into its columns of the output (a row-major view with leading dimension N)."""
    n_out, k_in = w.packing.n_out, w.packing.k_in
    rows = chunk_rows or max(1, CHUNK_WEIGHTS // k_in)
    b = None if bias is None else bias.to(x2.dtype)
    if rows >= n_out:
        wt = dequant(w, x2.dtype).t()
        return torch.mm(x2, wt) if b is None else torch.addmm(b, x2, wt)
    y = torch.empty(x2.shape[0], n_out, dtype=x2.dtype, device=x2.device)
    for r0 in range(0, n_out, rows):
        r1 = min(n_out, r0 + rows)
        wt = dequant(w, x2.dtype, rows=slice(r0, r1)).t()
        if b is None:
            torch.mm(x2, wt, out=y[:, r0:r1])
        else:
            torch.addmm(b[r0:r1], x2, wt, out=y[:, r0:r1])
    return y


def linear(x: torch.Tensor, w: PackedWeight, bias: torch.Tensor | None = None,
           chunk_rows: int | None = None) -> torch.Tensor:
    """``F.linear(x, W, bias)`` for ``x [..., K]`` in ``x.dtype``: fused kernel for fp16/bf16 with ``M <=
    FUSED_MAX_M`` tokens (word-aligned rows), else dequantize (``chunk_rows`` output rows at a time, default ≤ 16M
    weights) + cuBLAS."""
    lay = w.packing
    _check_supported(lay.table_kind, w.device)
    check_activation(x, w, bias)
    if x.dtype not in ACT_DTYPES:
        raise ValueError(f"triton backend: x must be float16/bfloat16/float32, got {x.dtype}")
    if chunk_rows is not None and (not isinstance(chunk_rows, int) or chunk_rows < 1):
        raise ValueError(f"chunk_rows must be a positive int or None, got {chunk_rows!r}")
    x2 = _row_major(x.reshape(-1, lay.k_in))
    m = x2.shape[0]
    if m == 0:
        return x.new_empty(*x.shape[:-1], lay.n_out)
    codes = w.codes
    if m > FUSED_MAX_M or x.dtype not in FUSED_DTYPES or not word_aligned(codes, lay.bits, lay.k_in):
        y = _dequant_matmul(x2, w, bias, chunk_rows, dequantize)
    else:
        y = torch.empty(m, lay.n_out, dtype=x.dtype, device=x.device)
        lut = w.lut if w.lut.dtype == x.dtype or lay.method == "uaq" else w.lut.to(x.dtype)
        fused_into(x2, codes, lut, lay.bits, lay.k_in, bias, y, affine=lay.method == "uaq")
    return y.reshape(*x.shape[:-1], lay.n_out)


# ----------------------------------------------------------------------------------------------- compile check


@dataclass(frozen=True)
class CompileVariant:
    """A launch of one kernel variant with CPU tensors of real shapes (for ``bench/kernel_compile.py``);
    ``max_per_weight``: the static SASS instructions per weight its main loop may cost on sm_90 (issue 15's targets,
    set for the table and UAQ decodes on their 16-token main tiles), else None."""

    name: str
    launch: Callable[[], object]
    weights_per_iter: int
    gemm: bool
    max_per_weight: float | None = None


#: static SASS instructions per weight (sm_90) of the 16-token main tiles' table and UAQ decodes, by bit width
PER_WEIGHT_TARGETS = {3: 6.0, 4: 5.0}


#: the layer shapes (N, K) the plan is checked on: PixArt-Σ, SDXL, Flux
MODEL_SHAPES = {
    "pixart": ((1152, 1152), (4608, 1152), (1152, 4608)),
    "sdxl": ((640, 640), (1280, 1280), (5120, 640), (640, 2560), (10240, 1280), (1280, 5120)),
    "flux": ((3072, 3072), (12288, 3072), (3072, 12288)),
}


def fused_variants() -> list[tuple[FusedConfig, int, bool, torch.dtype]]:
    """Every ``(config without split, bits, affine, dtype)`` the dispatch can launch (split only changes runtime
    arguments)."""
    out = []
    for bm in (16, 32, 64):
        for affine in (False, True):
            for bn, bk in tiles_for(bm, affine):
                for bits in (2, 3, 4, 8):
                    for dt in FUSED_DTYPES:
                        out.append((fused_config(bm, bn, bk), bits, affine, dt))
    return out


def compile_variants(quick: bool = False) -> list[CompileVariant]:
    """Launches of every fused/dequant variant (``quick``: the representative set CI compiles — 3/4 bits, bf16, table
    and affine decode on the main tiles of 16 and 64 tokens, the small-layer tiles at 4 bits (16 tokens) and at 3-bit
    affine (64 tokens: the heaviest decode), the dequant kernel); the full set also holds the gather table decode on
    the 16-token main tile (``QUA2SEDIMO_TABLE_DECODE=gather``, the previous decode: the comparison)."""
    n, k = 3072, 3072
    specs = [(*s, "prmt") for s in fused_variants()]
    if quick:
        main = {(16, *TILES_M16[0]), (16, *TILES_M16_AFFINE[0]), (64, *TILES[0])}
        specs = [s for s in specs if s[1] in (3, 4) and s[3] == torch.bfloat16
                 and ((s[0].bm, s[0].bn, s[0].bk) in main or (s[0].bm == 16 and s[1] == 4)
                      or (s[0].bm == 64 and s[1] == 3 and s[2]))]
    else:
        specs += [(fused_config(16, *TILES_M16[0]), bits, False, torch.bfloat16, "gather") for bits in (3, 4)]
    out = []
    for cfg, bits, affine, dt, decode in specs:
        def go(cfg=cfg, bits=bits, affine=affine, dt=dt, decode=decode):
            x = torch.empty(cfg.bm, k, dtype=dt)
            codes = torch.empty(n, packed_length(k, bits), dtype=torch.uint8)
            lut = torch.empty(n, 1 << bits, dtype=dt)
            fused_into(x, codes, lut, bits, k, None, torch.empty(cfg.bm, n, dtype=dt), config=cfg, affine=affine,
                       decode=decode)
        kind = "affine" if affine else "table" if decode == "prmt" or bits not in (3, 4) else "table-gather"
        name = f"fused {cfg.bm}x{cfg.bn}x{cfg.bk} {bits}b {kind} {str(dt)[6:]}"
        main_tile = (cfg.bm, cfg.bn, cfg.bk) == (16, *tiles_for(16, affine)[0])
        target = PER_WEIGHT_TARGETS.get(bits) if main_tile and kind != "table-gather" else None
        out.append(CompileVariant(name, go, cfg.bn * cfg.bk, True, target))
    for bits in (3, 4) if quick else (2, 3, 4, 8):
        for words in (True,) if quick else (True, False):
            def dq(bits=bits, words=words):
                kk = k if words else k + 1
                codes = torch.empty(n, packed_length(kk, bits), dtype=torch.uint8)
                lut = torch.empty(n, 1 << bits, dtype=torch.bfloat16)
                dequant_into(codes, lut, bits, kk, torch.empty(n, kk, dtype=torch.bfloat16))
            out.append(CompileVariant(f"dequant 16x256 {bits}b {'words' if words else 'bytes'} bf16", dq, 16 * 256,
                                      False))
    return out
