"""The paper's three data-free weight quantizers, vectorized over output channels.

Every result is *packed codes + lookup table*: UAQ's per-channel scale/zero-point becomes a table
``lut[c, q] = (q − z_c)·Δ_c``, K-Means-C stores its centroids per channel, K-Means-A one table. So
``dequantize()`` is a gather, and one kernel family and one file format serve all methods.

* UAQ: asymmetric min-max per output channel with the paper's clip search over α ∈ {1.0, 0.9, …, 0.1},
  keeping the candidate with the lowest mean ``|w − q(w)|^2.4``; round to nearest (ties to even).
* K-Means: 1-D Lloyd iterations on *sorted* rows with prefix sums, so one iteration costs
  O(rows · 2^b · log n) instead of O(rows · n · 2^b): the best of seeded k-means++ draws and a
  quantile initialisation per row, Lloyd steps on coresets of the sorted row, then exact steps on the
  full row (K-Means-C: a fixed number, like scikit-learn's tolerance stop; K-Means-A: to a fixed point).
"""

from __future__ import annotations

import contextlib
import functools
import math
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from . import accounting
from .options import check_method_bits
from .packed import PackedLayout, PackedWeight, lut_dtype_for  # noqa: F401 (re-exported)
from .packing import pack_codes

UAQ_ALPHAS: tuple[float, ...] = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))
LP_NORM = 2.4


@dataclass
class QuantizedWeight:
    """A quantizer's result: the :class:`~.packed.PackedWeight` and its errors against the original weight."""

    packed: PackedWeight
    rel_error: float = float("nan")
    lp_error: float = float("nan")
    extra: dict = field(default_factory=dict)

    @property
    def packing(self) -> PackedLayout:
        return self.packed.packing

    codes = property(lambda self: self.packed.codes, doc="packed codes [N, packed_length(K, bits)] (a view)")
    lut = property(lambda self: self.packed.lut, doc="lookup table [R, 2**bits] (a view)")
    method = property(lambda self: self.packing.method)
    bits = property(lambda self: self.packing.bits)
    shape = property(lambda self: self.packing.shape)
    dtype = property(lambda self: self.packing.dtype)
    group_size = property(lambda self: self.packing.group_size)
    option = property(lambda self: self.packing.option)
    n_out = property(lambda self: self.packing.n_out)
    k_in = property(lambda self: self.packing.k_in)

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight (same shape and, by default, dtype as the original) by a table gather."""
        return self.packed.dequantize(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes really stored (packed codes + tables)."""
        return self.packing.stored_nbytes

    @property
    def paper_nbytes(self) -> int:
        """The paper's accounting (indices at b bits + scale/codebook overhead at the original precision)."""
        prec = accounting.dtype_bits(self.dtype)
        return accounting.paper_nbytes(self.shape, self.method, self.bits, prec, self.group_size)

    @property
    def fp_nbytes(self) -> int:
        return self.n_out * self.k_in * accounting.dtype_bits(self.dtype) // 8


def check_weight(weight: torch.Tensor, name: str = "") -> None:
    """Reject weights that cannot be quantized, with a message naming the layer and the fix."""
    at = f"layer {name!r}: " if name else ""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{at}expected a torch.Tensor weight, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{at}weight dtype {weight.dtype} is not floating point; pass the float weight")
    if weight.dim() < 2:
        raise ValueError(
            f"{at}weight of shape {tuple(weight.shape)} has fewer than 2 dimensions; only Linear/Conv "
            "weights [out, in, ...] are quantized (keep biases and norms in full precision)"
        )
    if weight.numel() == 0:
        raise ValueError(f"{at}weight is empty (shape {tuple(weight.shape)})")
    # a NaN or Inf makes the sum non-finite (a fast reduction); only then (or on overflow) check every value
    if not math.isfinite(float(weight.detach().sum())) and not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{at}weight contains NaN or Inf values; fix or re-export the checkpoint first")


# --------------------------------------------------------------------------------------------- UAQ


def _uaq_candidates(wmax: torch.Tensor, wmin: torch.Tensor, qmax: int, alphas: tuple[float, ...]):
    """Per-row step ``Δ`` and zero point ``z`` of every clip factor: two ``[A, R]`` tensors (fp32 as the released
    code computes them; a degenerate step becomes 1)."""
    al = torch.tensor(alphas, dtype=wmax.dtype, device=wmax.device)[:, None]  # fp32 like the scalars: same values
    delta = (al * wmax - al * wmin) / qmax
    delta = torch.where(delta > 0, delta, torch.ones_like(delta))
    zero = torch.round(-(al * wmin) / delta)
    return delta, zero


def _uaq_levels(w: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, qmax: int) -> torch.Tensor:
    """``q(w)·Δ`` for rows ``w`` [r, K] with their ``delta``/``zero`` [r]: round to nearest (ties to even), clip."""
    d, z = delta[:, None], zero[:, None]  # in place on one temporary: the same values as out of place
    return torch.div(w, d).round_().add_(z).clamp_(0, qmax).sub_(z).mul_(d)


def _uaq_lp_errors(w: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
                   qmax: int) -> torch.Tensor:
    """The clip search's score per row: ``mean |w − q(w)|^2.4`` on the row's scale (the released code's ops)."""
    return (w - _uaq_levels(w, delta, zero, qmax)).div_(scale[:, None]).abs_().pow_(LP_NORM).mean(dim=1)


def _pow_(x: torch.Tensor, p: float) -> torch.Tensor:
    """``x^p`` in place for ``x ≥ 0`` as ``exp(p·log x)`` (0 → 0, Inf → Inf): on CPU ~2.5x faster than ``pow`` in
    fp32 (~10x in fp64), within a few units in the last place relative (``|p·log x| ≤ 105`` for normal fp32 and
    ``p = 1.2``; the rounding of each step is relative to the result)."""
    return x.log_().mul_(p).exp_()


class _UaqBounds:
    """Lower bounds of the candidates' scores (``delta``/``zero`` [A, r]) on rows ``w`` [r, K], without a pow per
    weight; bounds are ``[r, A]`` (fp64), like :attr:`factor` ``= (Δ/scale)^2.4``.

    :meth:`moments`: per weight its error ``u`` in steps (``|u| ≤ 1/2`` inside the clip range, more for clipped
    weights) and, from the row's ``m1 = mean |u|`` and ``m2 = mean u²``, Lyapunov's inequality ``mean |u|^2.4 ≥
    m2^1.4 / m1^0.4`` (attained by a two-point distribution on {0, m2/m1}; ≥ Jensen's ``m2^1.2``; ~3.5 % low on
    rounding errors, Jensen's ~9 %). :meth:`extremes`: the clipped row maximum and minimum alone (no pass)."""

    def __init__(self, w: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor, qmax: int):
        self.w, self.delta, self.zero, self.scale, self.qmax = w, delta, zero, scale, qmax
        self.factor = _pow_(delta.double().t() / scale.double()[:, None], LP_NORM)  # [r, A]

    def sums(self, a: int, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Σ|u|, Σu²)`` (fp32) of candidate ``a`` on ``rows`` (indices; all rows of the block by default):
        ``u = round(w/Δ + z)`` clipped to the levels ``− (w/Δ + z)`` (at a tie a level of the same distance as
        the released code's ``round(w/Δ) + z``, so the same values up to fp32 rounding)."""
        w, delta, zero = self.w, self.delta[a], self.zero[a]
        if rows is not None:
            w, delta, zero = w.index_select(0, rows), delta[rows], zero[rows]
        t = torch.mul(w, delta[:, None].reciprocal()).add_(zero[:, None])
        u = torch.round(t).clamp_(0, self.qmax).sub_(t).abs_()
        return u.sum(dim=1), u.square_().sum(dim=1)

    def lyapunov(self, s1: torch.Tensor, s2: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        """The bound from the :meth:`sums` (any shape, with the candidates' ``factor``): ``mean |u|^2.4 ≥
        s2^1.4 / s1^0.4 / K``, fp64."""
        s1, s2 = s1.double(), s2.double()
        bound = s2.log().mul_(1.4).sub_(s1.log().mul_(0.4)).exp_().mul_(factor / self.w.shape[1])
        return torch.where(s2 > 0, bound, 0.0)

    def moments(self, a: int, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The bound of candidate ``a`` on ``rows`` (all rows of the block by default)."""
        return self.lyapunov(*self.sums(a, rows), self.factor[:, a] if rows is None else self.factor[rows, a])

    def extremes(self, wmax: torch.Tensor, wmin: torch.Tensor) -> torch.Tensor:
        """A bound of every candidate ([r, A]) without a pass over the weights: the errors of the row's largest
        and smallest weight where the candidate clips them (beyond its top level ``(qmax − z)·Δ`` or its bottom
        level ``−z·Δ``; every other term ≥ 0)."""
        delta, zero, scale = self.delta.double().t(), self.zero.double().t(), self.scale.double()[:, None]
        over = (wmax.double()[:, None] - (self.qmax - zero) * delta).clamp_min_(0)
        under = (-zero * delta - wmin.double()[:, None]).clamp_min_(0)
        return _pow_(torch.stack([over, under]).div_(scale), LP_NORM).sum(dim=0).div_(self.w.shape[1])


# a bound rules a candidate out only above (1 + _MARGIN)·best + _SLACK·(Δ/scale)^2.4: far above the fp32 rounding
# of scores and bounds (relative ≲ 3e-5; absolute ≲ 2e-6 per weight in steps^2.4, where rows quantize near exactly)
# and far below the bounds' own gap (≥ 2 %)
_MARGIN = 1e-3
_SLACK = 1e-5
# :func:`_uaq_lp_errors_fast` against the exact scores: relative error ≤ _FAST_REL (measured ≲ 2e-6 on the test rows
# and PixArt-like layers; per term a few ulp of exp/log, plus two different fp32 sums); ≪ _MARGIN, so the bounds'
# pruning stays valid against fast scores
_FAST_REL = 1e-4
_FAST_ABS = 1e-30  # fp32 underflow of terms of rows quantized near exactly
_ROUNDING_MEAN = 0.5**LP_NORM / (LP_NORM + 1)  # mean |u|^2.4 of rounding errors u uniform on ±1/2 (an estimate)


def _uaq_lp_errors_fast(w: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor, scale: torch.Tensor,
                        qmax: int) -> torch.Tensor:
    """:func:`_uaq_lp_errors` with ``|e|^2.4 = (e²)^1.2`` by :func:`_pow_` on the same errors ``e``: the same
    scores within a relative :data:`_FAST_REL` (the per-term rounding, a few ulp, and the two fp32 sums)."""
    e = _uaq_levels(w, delta, zero, qmax)
    e = torch.sub(w, e, out=e).div_(scale[:, None])
    return _pow_(e.square_(), LP_NORM / 2).mean(dim=1)


def _uaq_block(w: torch.Tensor, wmax: torch.Tensor, wmin: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor,
               scale: torch.Tensor, qmax: int) -> torch.Tensor:
    """The chosen candidate per row of ``w`` [r, K] (``delta``/``zero`` [A, r]): the first with the lowest
    :func:`_uaq_lp_errors`, as the released loop picks it, with most scores never computed.

    ``|·|^2.4`` costs ~10-40x the other element ops, so candidates first get lower bounds of their score without
    it (:class:`_UaqBounds`): the clipped extremes for all, the moments' bound where that cannot rule a candidate
    out. Rows are scored by :func:`_uaq_lp_errors_fast` (``exp``/``log``, ~2.5x cheaper than ``pow``, within
    :data:`_FAST_REL`), first a likely candidate, then every candidate whose bound is below the best score so far
    (by a margin far above fp32 rounding and that error), the lowest bound first, one pass over the open rows per
    round; the others cannot be the minimum. Rows whose best fast scores lie within their error of each other get
    those candidates' exact scores, so the choice (ties included) is the reference's. Small ``[r, A]`` tables
    (a reduction over candidates is then contiguous)."""
    n_alpha, r = delta.shape
    bounds = _UaqBounds(w, delta, zero, scale, qmax)
    bound = bounds.extremes(wmax, wmin)  # raised to the moments' bound where it cannot rule a candidate out
    refined = torch.zeros_like(bound, dtype=torch.bool)
    s1, s2 = torch.zeros_like(bound, dtype=torch.float32), torch.zeros_like(bound, dtype=torch.float32)
    rows = torch.arange(r, device=w.device)
    score = torch.full((r, n_alpha), float("inf"), dtype=torch.float32, device=w.device)
    delta_t, zero_t = delta.t(), zero.t()

    def score_rows(sel: torch.Tensor | None, cand: torch.Tensor) -> None:  # one pass: row sel[i] ← cand[i]
        if sel is None:
            score[rows, cand] = _uaq_lp_errors_fast(w, delta_t[rows, cand], zero_t[rows, cand], scale, qmax)
        else:
            score[sel, cand] = _uaq_lp_errors_fast(w.index_select(0, sel), delta_t[sel, cand], zero_t[sel, cand],
                                                   scale[sel], qmax)

    def refine(where: torch.Tensor) -> None:  # [r, A] bool: the moments' bound where asked (and not yet there)
        where = where & ~refined
        todo = torch.nonzero(where.any(dim=0)).flatten().tolist()
        if not todo:
            return
        for a in todo:  # the passes; the bounds from their sums all at once (small ops cost as much as a pass)
            sel = torch.nonzero(where[:, a]).flatten()
            if len(sel) > r * 7 // 8:  # cheaper on the whole block than on a copy of its rows (index_select)
                where[:, a] = True
                s1[:, a], s2[:, a] = bounds.sums(a)
            else:
                s1[sel, a], s2[sel, a] = bounds.sums(a, sel)
        refined.logical_or_(where)
        torch.where(where, torch.maximum(bound, bounds.lyapunov(s1, s2, bounds.factor)), bound, out=bound)

    # a first score per row: the lowest moments' bound among candidates that look good (a rounding-error estimate
    # plus the clipped extremes)
    guess = bounds.factor * _ROUNDING_MEAN + bound
    refine(bound <= guess.min(dim=1, keepdim=True).values)
    score_rows(None, torch.where(refined, bound, float("inf")).argmin(dim=1))
    slack = bounds.factor.amin(dim=1, keepdim=True) * _SLACK
    while True:  # score the most promising open candidate of each row until no bound is below the best score
        limit = score.min(dim=1, keepdim=True).values.double() * (1 + _MARGIN) + slack
        open_ = (bound <= limit) & torch.isinf(score)
        if int(open_.any(dim=1).sum()) <= r // 8:  # few rows left: all their open candidates at once, no more bounds
            sel, cand = torch.nonzero(open_, as_tuple=True)
            if len(sel):
                score_rows(sel, cand)
            break
        refine(open_)
        open_bound = torch.where((bound <= limit) & torch.isinf(score), bound, float("inf"))
        pick = open_bound.argmin(dim=1)
        live = torch.isfinite(open_bound[rows, pick])
        n_live = int(live.sum())
        if n_live == 0:
            break
        if n_live > r * 15 // 16:  # cheaper on the whole block (rows not live rescore a scored candidate)
            score_rows(None, torch.where(live, pick, score.argmin(dim=1)))
        else:
            sel = torch.nonzero(live).flatten()
            score_rows(sel, pick[sel])
    best = score.min(dim=1, keepdim=True).values
    near = score <= best * (1 + 3 * _FAST_REL) + _FAST_ABS  # candidates whose exact score may be the lowest
    unsure = near.sum(dim=1, keepdim=True) > 1
    if bool(unsure.any()):
        near &= unsure
        for a in torch.nonzero(near.any(dim=0)).flatten().tolist():
            sel = torch.nonzero(near[:, a]).flatten()
            score[sel, a] = _uaq_lp_errors(w.index_select(0, sel), delta[a, sel], zero[a, sel], scale[sel], qmax)
    # the released rule: candidates in order, a later one replaces the best only if strictly lower
    return (score == score.min(dim=1, keepdim=True).values).to(torch.uint8).argmax(dim=1)


def _uaq_setup(w: torch.Tensor, qmax: int, alphas: tuple[float, ...]):
    """Per row: max, min, the scale scores are compared on (errors of rows spread over ≳1e16 overflow fp32
    otherwise), and every candidate's step and zero point ([A, R])."""
    wmax = w.amax(dim=1)
    wmin = w.amin(dim=1)
    scale = torch.maximum(wmax.abs(), wmin.abs())
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    return (wmax, wmin, scale, *_uaq_candidates(wmax, wmin, qmax, alphas))


def uaq_codes(w: torch.Tensor, bits: int, alphas: tuple[float, ...] = UAQ_ALPHAS):
    """UAQ with clip search on rows of ``w`` (fp32 ``[R, K]``) → ``(codes uint8 [R,K], lut fp32 [R,2^b])``.

    The same choice as :func:`uaq_codes_reference` (the released per-row loop, vectorized), computed on blocks of
    rows that stay in cache, one block per thread, with the clip candidates pruned (:func:`_uaq_block`). Everything
    is row-local, so each block also does its own setup and codes while in cache, on its row thread (no
    whole-tensor pass in torch's parallel regions, which stall on shared cores)."""
    codes, lut, _ = _uaq(w, bits, None, alphas)
    return codes, lut


def _uaq(w: torch.Tensor, bits: int, lut_dtype: torch.dtype | None, alphas: tuple[float, ...] = UAQ_ALPHAS):
    """:func:`uaq_codes`; on CPU with ``lut_dtype`` also the error sums ``(Σ (W−Q)², Σ |W−Q|^2.4, Σ W²)`` for the
    table stored in that dtype, each block's while it is in cache (:func:`_block_error_sums`), else ``None``."""
    qmax = (1 << bits) - 1
    cpu = w.device.type == "cpu"
    step = max(1, _UAQ_BLOCK_ELEMS // w.shape[1]) if cpu else w.shape[0]
    with_sums = cpu and lut_dtype is not None

    def block(b: slice) -> tuple[torch.Tensor, torch.Tensor, tuple[float, float, float] | None]:
        wb = w[b]
        wmax, wmin, scale, delta, zero = _uaq_setup(wb, qmax, alphas)
        choice = _uaq_block(wb, wmax, wmin, delta, zero, scale, qmax)
        rows = torch.arange(wb.shape[0], device=w.device)
        codes, lut = _uaq_table(wb, wmax, wmin, delta[choice, rows], zero[choice, rows], qmax)
        sums = _block_error_sums(wb, codes, to_table_dtype(lut, lut_dtype).float()) if with_sums else None
        return codes, lut, sums

    def rows_of(part: slice) -> tuple[torch.Tensor, torch.Tensor, list]:
        # returned, not written into a shared tensor: ComfyUI runs nodes under inference mode, which the row
        # threads do not inherit, and a tensor made under it cannot be written outside it
        out = [block(slice(i, min(i + step, part.stop))) for i in range(part.start, part.stop, step)]
        return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), [o[2] for o in out]

    parts = _map_row_blocks(rows_of, w.shape[0], w.numel(), w.device)
    sums = None
    if with_sums:
        blocks = [x for p in parts for x in p[2]]
        sums = tuple(float(sum(x[i] for x in blocks)) for i in range(3))
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]), sums


def _block_error_sums(w: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor) -> tuple[float, float, float]:
    """``(Σ (W−Q)², Σ |W−Q|^2.4, Σ W²)`` of rows ``w`` (fp32, CPU) for ``Q = lut[row, code]`` (fp32 values of the
    stored table): the same values as :func:`_error_sums` (NumPy's pairwise fp32 sums, more accurate than torch's
    here), while the block is in cache."""
    d = torch.sub(w, lut.gather(1, codes.long())).square_()
    dn, x = d.numpy().reshape(-1), w.numpy().reshape(-1)
    with np.errstate(over="ignore"):  # an overflow to Inf is redone in fp64 (see quantize_weight)
        sq = float(dn.sum())
        return sq, float(_pow_(d, LP_NORM / 2).numpy().sum()), float(np.einsum("i,i->", x, x))


def uaq_codes_reference(w: torch.Tensor, bits: int, alphas: tuple[float, ...] = UAQ_ALPHAS):
    """The oracle of :func:`uaq_codes`: every candidate scored on every row (whole-tensor ops)."""
    qmax = (1 << bits) - 1
    wmax, wmin, scale, delta, zero = _uaq_setup(w, qmax, alphas)
    best_err = torch.full_like(wmax, float("inf"))
    best_delta = torch.ones_like(wmax)
    best_zero = torch.zeros_like(wmax)
    for a in range(len(alphas)):
        err = _uaq_lp_errors(w, delta[a], zero[a], scale, qmax)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_delta = torch.where(better, delta[a], best_delta)
        best_zero = torch.where(better, zero[a], best_zero)
    return _uaq_table(w, wmax, wmin, best_delta, best_zero, qmax)


def _uaq_table(w: torch.Tensor, wmax: torch.Tensor, wmin: torch.Tensor, delta: torch.Tensor, zero: torch.Tensor,
               qmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes (uint8) and table of rows ``w`` for their chosen step and zero point (constant rows: exact table,
    code 0). The code ops run in place on one fp32 temporary (the same values as out of place)."""
    codes = torch.div(w, delta[:, None]).round_().add_(zero[:, None]).clamp_(0, qmax).to(torch.uint8)
    levels = torch.arange(qmax + 1, device=w.device, dtype=w.dtype)
    lut = (levels[None, :] - zero[:, None]) * delta[:, None]
    const = wmax == wmin
    if bool(const.any()):
        lut[const] = wmin[const, None]
        codes[const] = 0
    return codes, lut


_UAQ_BLOCK_ELEMS = 1 << 19  # weights per block of the clip search (256 KiB of fp32: the block's temporaries
# stay in a core's L2 cache)


# ------------------------------------------------------------------------------------------ k-means
#
# Each row is sorted once. Lloyd's steps then run on coresets of the sorted row — atoms are runs of
# adjacent sorted weights with their exact count and sum: single weights in both tails (where the
# outliers are), short runs in the bulk — so a step is a binary search of the k−1
# midpoints among ~100–600 atoms plus prefix-sum look-ups. Seeded k-means++ draws on a small coreset
# and a quantile initialisation take a few steps on a coarse coreset, the lowest-SSE one per row
# continues on the fine coreset, and the final assignment and its exact segment means use the full
# sorted row. The sort, the atom sums and the codes are the only passes over all weights.

QUANTIZER_VERSION = 5  # bump when any quantizer's output changes: keys option-table caches and search runs
KMEANS_MAX_ITER = 10  # Lloyd steps on the fine coreset (K-Means-C; later steps gain ≲ 1 % of the error)
KMEANS_A_MAX_ITER = 300  # K-Means-A is one row, its steps cost microseconds: exact steps to a fixed point
KMEANS_DRAWS = 4  # k-means++ draws per row (scikit-learn's default for k-means++ is 1)
KMEANS_COARSE_ITER = 4  # Lloyd steps on the coarse coreset (the first for every initialisation)
KMEANS_KEEP = KMEANS_DRAWS + 1  # initialisations per row that take the later coarse steps (all; 2 is faster
# on one thread but costs 0.3–0.6 % of the error)
KMEANS_EXACT_STEPS = 2  # final Lloyd steps (≥ 1) on the full sorted rows (the last one's assignment → codes)
_GRID = 128  # logit-spaced grid bounding the coarse coreset's atoms; every 4th point: the seeding coreset
_TAIL = 32  # single-weight atoms at each end of a sorted row
_FINE_PER_CLUSTER = 16  # the fine coreset's bulk atoms hold K / (this · 2^bits) sorted weights
_OMEGA = 1.8  # over-relaxation while a row's assignment still changes (plain steps then settle it)
_CACHE_ELEMS = 1 << 18  # weights per block of the code comparisons


@contextlib.contextmanager
def _one_torch_thread(device: torch.device):
    """Run torch's CPU ops on one thread (threads started inside inherit it): the k-means steps are many
    small ops, and with the cores shared every parallel region can stall for a scheduler slice (5-15x
    slower on a loaded 2-core machine). :func:`_map_row_blocks` splits the rows over threads instead."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _map_row_blocks(fn: Callable[[slice], Any], n_rows: int, size: int, device: torch.device) -> list:
    """``fn(rows)`` for row blocks, one per torch CPU thread (a single block on other devices or for
    small work), each with torch's own ops on one thread; NumPy and torch release the GIL."""
    n = min(torch.get_num_threads(), n_rows) if device.type == "cpu" and size >= 1 << 16 else 1
    step = -(-n_rows // n)
    parts = [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]
    with _one_torch_thread(device):
        if len(parts) == 1:
            return [fn(parts[0])]
        return list(_pool(len(parts)).map(fn, parts))


@functools.cache
def _pool(n: int) -> ThreadPoolExecutor:
    """A thread pool kept for the process (starting threads costs milliseconds per call)."""
    return ThreadPoolExecutor(n, thread_name_prefix="qua2sedimo-rows")


def _flip16(bits: np.ndarray) -> np.ndarray:
    """fp16/bf16 bit patterns (int16) ↔ order-preserving int16 keys (sign-magnitude ↔ two's complement;
    the map is its own inverse)."""
    key = bits >> 15
    key &= 0x7FFF
    key ^= bits
    return key


def _order_keys(w: torch.Tensor) -> np.ndarray:
    """Keys of a CPU weight that order like its values: int16 keys for fp16/bf16, fp32 values otherwise."""
    if w.dtype in (torch.float16, torch.bfloat16):
        return _flip16(w.contiguous().view(torch.int16).numpy())
    return w.to(torch.float32).contiguous().numpy()


def _sorted_rows(w: torch.Tensor, keys: np.ndarray | None) -> torch.Tensor:
    """Rows of ``w`` sorted ascending, fp32. On CPU the :func:`_order_keys` are sorted with NumPy: int16
    keys by its radix sort (several times faster than a comparison sort), fp32 by its SIMD sort."""
    if keys is None:
        return w.float().sort(dim=1).values
    if keys.dtype == np.int16:
        return torch.from_numpy(_flip16(np.sort(keys, axis=1, kind="stable"))).view(w.dtype).float()
    return torch.from_numpy(np.sort(keys, axis=1))


def _coreset_bounds(k_in: int, fine_atom: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`_coreset_bounds_of`, cached for the usual row lengths (not for whole layers: K-Means-A)."""
    return (_cached_bounds if k_in <= 1 << 16 else _coreset_bounds_of)(k_in, fine_atom)


def _coreset_bounds_of(k_in: int, fine_atom: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Atom boundaries in a sorted row of ``k_in`` weights: the fine coreset's (single weights in the
    tails, runs of ``fine_atom`` in between; all single for short rows), and the positions among them
    of the coarse coreset's (a logit-spaced grid: atoms grow geometrically from the tails towards the
    median) and of the seeding coreset's (every 4th grid point)."""
    if k_in <= 2 * _TAIL + 4 * fine_atom:
        fine = torch.arange(k_in + 1)
    else:
        hi = k_in - _TAIL - (k_in - 2 * _TAIL) % fine_atom
        bulk = torch.arange(_TAIL, hi, fine_atom)
        fine = torch.cat([torch.arange(_TAIL), bulk, torch.arange(hi, k_in + 1)])
    z = math.log(2 * k_in)
    grid = torch.sigmoid(torch.linspace(-z, z, _GRID + 1, dtype=torch.float64)) * k_in
    grid[0], grid[-1] = 0, k_in
    coarse = torch.unique(torch.searchsorted(fine.double(), grid))
    seed = torch.unique(torch.searchsorted(fine.double(), grid[::4].contiguous()))
    return fine, coarse, seed


_cached_bounds = functools.lru_cache(maxsize=32)(_coreset_bounds_of)


def _atom_sums(xs: torch.Tensor, fine: torch.Tensor) -> torch.Tensor:
    """Cumulative sums ``[R, M+1]`` (fp64) of the fine atoms of sorted rows ``xs``."""
    r, k = xs.shape
    sizes = fine.diff()
    run = int(sizes.max())
    if run == 1:
        sums = xs
    else:  # single weights, runs of ``run`` (summed by a matrix-vector product), single weights
        lo = int((sizes > 1).nonzero()[0])
        hi = int(fine[lo + int((sizes > 1).sum())])
        mid = xs[:, int(fine[lo]) : hi].reshape(-1, run) @ xs.new_ones(run)
        sums = torch.cat([xs[:, : int(fine[lo])], mid.view(r, -1), xs[:, hi:]], dim=1)
    out = torch.zeros(r, sums.shape[1] + 1, dtype=torch.float64, device=xs.device)
    torch.cumsum(sums, dim=1, dtype=torch.float64, out=out[:, 1:])
    return out


def _count_below(a: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``#{j : a[r, j] < t[r, i]}`` for rows ``a`` ([R, M]) sorted ascending and any ``t`` ([R, Q]). (A
    branchless binary search by gathers is no faster, even compiled: ~30 small ops instead of one.)"""
    return torch.searchsorted(a, t.contiguous())


def _kmeanspp(a: torch.Tensor, pcnt: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """k-means++ (D² sampling) draws on the weighted atoms ``a`` ([R, M] sorted, cumulative weights
    ``pcnt`` [M+1]) of every row, driven by the uniforms ``u`` ([k, R, draws]): seeds ``[R, draws, k]``, unsorted
    (see :func:`_sort_last`)."""
    r, m = a.shape
    w = pcnt.diff()
    c = a.gather(1, torch.searchsorted(pcnt[1:], u[0] * pcnt[-1], right=True).clamp_max_(m - 1))
    seeds = [c]
    pot = (a[:, None, :] - c[:, :, None]).square_().mul_(w)
    new = torch.empty_like(pot)
    for j in range(1, u.shape[0]):
        cdf = pot.cumsum(dim=2)
        pick = torch.searchsorted(cdf, (u[j] * cdf[:, :, -1])[..., None], right=True).clamp_max_(m - 1)
        c = a.gather(1, pick.view(r, -1))
        seeds.append(c)
        torch.sub(a[:, None, :], c[:, :, None], out=new)
        pot = torch.minimum(pot, new.square_().mul_(w), out=pot)
    return torch.stack(seeds, dim=2)


def _sort_last(x: torch.Tensor) -> torch.Tensor:
    """Sort along the last dimension (NumPy on CPU: torch's sort of short rows is several times slower)."""
    if x.device.type == "cpu":
        return torch.from_numpy(np.sort(x.numpy(), axis=-1))
    return x.sort(dim=-1).values


def _draws(psum: torch.Tensor, fine: torch.Tensor, seed: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """:func:`_kmeanspp` on the seeding coreset (``seed``: its bounds among the ``fine`` atoms, whose cumulative
    sums are ``psum``)."""
    sb, sp = fine[seed], psum.index_select(1, seed)
    return _kmeanspp((sp.diff(dim=1) / sb.diff()).float(), sb.float(), u)


def _coreset(bounds: torch.Tensor, psum: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor,
                                                                                     torch.Tensor]:
    """Atoms of sorted rows cut at ``bounds`` (from the cumulative sums ``psum`` at them, [R, M+1]): their
    cumulative counts ``cnt`` ([M+1], the same for every row), means ``a`` ([R, M]) and cumulative sums
    ([R, M+1]), in one dtype."""
    cnt = bounds.to(psum.device, dtype)
    a = (psum.diff(dim=1) / bounds.diff().to(psum.device)).to(dtype)
    return cnt, a, psum.to(dtype)


def _segments(cnt: torch.Tensor, a: torch.Tensor, psum: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor,
                                                                                               torch.Tensor,
                                                                                               torch.Tensor]:
    """Nearest-centroid segments of the :func:`_coreset` ``(cnt, a, psum)`` for sorted centroids ``c``
    ([R, G, k]: G candidate sets per row); atoms below a midpoint go left. Returns ``(edges [R, G, k−1],
    counts, sums [R, G, k])``."""
    r, g, k = c.shape
    m = a.shape[1]
    e = _count_below(a, ((c[..., 1:] + c[..., :-1]) * 0.5).view(r, -1)).view(r, g, k - 1)
    ends = torch.empty(r, g, k + 1, dtype=torch.long, device=c.device)
    ends[..., 0] = 0
    ends[..., -1] = m
    ends[..., 1:-1] = e
    cn = cnt.take(ends).diff(dim=2)
    sm = psum.gather(1, ends.view(r, -1)).view(r, g, k + 1).diff(dim=2)
    return e, cn, sm


def _means(cn: torch.Tensor, sm: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Segment means; an empty segment keeps its centroid."""
    return torch.where(cn > 0, sm / cn, c)


def _lloyd(cnt: torch.Tensor, a: torch.Tensor, psum: torch.Tensor, c: torch.Tensor, n_iter: int,
           omega: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """At most ``n_iter`` (≥ 1) Lloyd steps for the candidate centroids ``c`` ([R, G, k]) on the
    :func:`_coreset` ``(cnt, a, psum)``. Returns them with the score ``Σ_j s_j²/n_j`` ([R, G]) of the last
    step's segments (SSE of those segments at their means = Σx² − score; the returned centroids are those
    means).

    With ``omega > 1`` a row whose assignment still changes moves ``omega`` times the Lloyd step
    (over-relaxation); once its assignment did not change it takes plain steps. A plain step that
    changes nothing is a Lloyd fixed point; the loop ends early when every row is at one.
    """
    r, g, k = c.shape
    lo, hi = a[:, :1, None], a[:, -1:, None]
    c = c.to(a.dtype)
    prev = torch.empty(0, dtype=torch.long, device=c.device)
    plain = torch.full((r, g), omega == 1.0, dtype=torch.bool, device=c.device)
    e, cn, sm = _segments(cnt, a, psum, c)
    for it in range(n_iter):
        if it > 0:
            e, cn, sm = _segments(cnt, a, psum, c)
        mean = _means(cn, sm, c)
        if omega == 1.0 and (it % 4 != 3 or it == n_iter - 1):  # plain Lloyd keeps centroids sorted
            c, prev = mean, e
            continue
        stable = (e == prev).all(dim=2) if it > 0 else torch.zeros_like(plain)
        if bool((stable & plain).all()):
            break
        if omega == 1.0:
            c = mean
        else:
            c = torch.where(stable[..., None], mean, torch.lerp(c, mean, omega).clamp_(lo, hi))
            if bool((c[..., 1:] < c[..., :-1]).any()):  # over-relaxed steps may cross
                c = c.sort(dim=2).values
            plain = stable
        prev = e
    return c, torch.where(cn > 0, sm * sm / cn, 0.0).sum(dim=2)


def _kmeans_steps(xs: torch.Tensor, psum: torch.Tensor, fine: torch.Tensor, coarse: torch.Tensor,
                  seeds: torch.Tensor, max_iter: int, exact: bool, coarse_iter: int, keep: int, exact_steps: int,
                  omega: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The Lloyd steps of :func:`_kmeans_rows` on sorted rows ``xs`` with their fine atoms' cumulative sums
    ``psum``, from the sorted k-means++ ``seeds`` ([R, draws, k]); the module constants come as arguments.
    Returns the last assignment's midpoints ``t`` ([R, k−1], fp32) and the exact means of its segments
    (fp32). Compiled by :func:`_compiled` where it can be."""
    r, k = xs.shape
    n_clusters = seeds.shape[2]
    # initialisations: k-means++ draws on the seeding coreset and quantiles; a Lloyd step on the coarse
    # coreset for all of them, more for the best few
    pos = ((torch.arange(n_clusters, device=xs.device) + 0.5) * (k / n_clusters)).long()
    seeds = torch.cat([seeds, xs.index_select(1, pos)[:, None]], dim=1)
    cnt, a, ps = _coreset(fine[coarse], psum.index_select(1, coarse), torch.float32)
    c, score = _lloyd(cnt, a, ps, seeds, 1)
    if coarse_iter > 1:
        top = score.topk(min(keep, c.shape[1]), dim=1).indices[..., None].expand(-1, -1, n_clusters)
        c, score = _lloyd(cnt, a, ps, c.gather(1, top), coarse_iter - 1)
    c = c.gather(1, score.argmax(dim=1)[:, None, None].expand(-1, 1, n_clusters))
    # the coreset steps only steer (fp32; the exact steps below use fp64 sums); with single-weight
    # atoms (K-Means-A) they are exact Lloyd steps, in fp64, and reach a fixed point
    cnt, a, ps = _coreset(fine, psum, torch.float64 if exact else torch.float32)
    c = _lloyd(cnt, a, ps, c, max_iter, omega)[0][:, 0]

    # exact Lloyd steps on the full sorted rows; the last assignment gives the codes
    first = xs.index_select(1, fine[:-1])
    c = c.double()
    t = ((c[:, 1:] + c[:, :-1]) * 0.5).float()
    for i in range(exact_steps):
        if i > 0:
            t = ((c[:, 1:] + c[:, :-1]) * 0.5).float()
        c = _exact_means(xs, fine, psum, first, t, c)
    return t, c.float()


@functools.cache
def _compiled() -> tuple[Callable, Callable]:
    """:func:`_draws` and :func:`_kmeans_steps` compiled by TorchScript: the steps are hundreds of small ops,
    and compiled they run without Python (nor its GIL, which the row blocks' threads otherwise wait on);
    the Python functions where TorchScript is unavailable."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.jit.script(_draws), torch.jit.script(_kmeans_steps)
    except Exception:  # TorchScript is deprecated (and may go): the same code runs as Python
        return _draws, _kmeans_steps


def _ceil_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of ``dtype`` ≥ ``t`` (so ``w >= result`` ⇔ ``w >= t`` for weights of that dtype)."""
    r = t.to(dtype)
    r = torch.where(r.to(t.dtype) < t, torch.nextafter(r, torch.full_like(r, math.inf)), r)
    return torch.where(r == 0, torch.full_like(r, -0.0), r)  # −0: the order keys put −0 below +0


def _codes(w: torch.Tensor, keys: np.ndarray | None, t: torch.Tensor) -> torch.Tensor:
    """``codes[r, i] = #{j : w[r, i] >= t[r, j]}`` as uint8 (``t`` fp32, sorted per row).

    On CPU the comparisons run on the :func:`_order_keys` in NumPy (its SIMD compare is several times
    faster than torch's broadcast compare here).
    """
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        w = w.float()
    t = _ceil_to(t, w.dtype)
    if keys is None:
        codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        for j in range(t.shape[1]):
            codes += w >= t[:, j : j + 1]
        return codes
    tk = _order_keys(t)
    r, k = keys.shape
    codes = np.zeros((r, k), dtype=np.uint8)
    step = max(1, _CACHE_ELEMS // k)  # rows per pass: the k−1 compares of a block run in cache
    hit = np.empty((min(step, r), k), dtype=np.bool_)
    for i in range(0, r, step):
        block, out = keys[i : i + step], codes[i : i + step]
        for j in range(tk.shape[1]):
            np.greater_equal(block, tk[i : i + step, j : j + 1], out=hit[: block.shape[0]])
            out += hit[: block.shape[0]].view(np.uint8)
    return torch.from_numpy(codes)


def kmeans_codes(
    w: torch.Tensor, bits: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER, fine_atom: int | None = None
):
    """1-D k-means with ``2^bits`` centroids on every row of ``w`` (``[R, K]``, any float dtype) at once.

    ``KMEANS_DRAWS`` seeded k-means++ draws and a quantile initialisation take a Lloyd step on a coarse
    coreset; the ``KMEANS_KEEP`` lowest-SSE ones per row take ``KMEANS_COARSE_ITER − 1`` more, and the best
    continues with at most ``max_iter`` Lloyd steps on the fine coreset (runs of ``fine_atom`` sorted
    weights in the bulk, by default ``K / (_FINE_PER_CLUSTER · 2^bits)``; 1 = the row itself).
    The final assignment gives the codes (every weight → its nearest centroid) and the table holds the
    exact means of those segments. A row whose assignment stops changing is a Lloyd fixed point; like
    scikit-learn (which stops at a tolerance), long rows may stop just short of one. Rows are split
    over torch's CPU threads; the random draws are made up front, so the result does not depend on it.
    Returns ``(codes uint8 [R, K], centroids fp32 [R, 2^bits])``.
    """
    codes, lut, _ = _kmeans(w, bits, seed, max_iter, fine_atom)
    return codes, lut


def _kmeans(w: torch.Tensor, bits: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER, fine_atom: int | None = None,
            lut_dtype: torch.dtype | None = None):
    """:func:`kmeans_codes`; with ``lut_dtype`` also the error sums ``(Σ (W−Q)², Σ |W−Q|^2.4, Σ W²)`` for the
    table stored in that dtype, from the sorted rows (see :func:`_sorted_error_sums`)."""
    r, k = w.shape
    fine_atom = fine_atom or max(1, k // (_FINE_PER_CLUSTER << bits))
    gen = torch.Generator(device=w.device).manual_seed(int(seed))
    u = torch.rand(1 << bits, r, KMEANS_DRAWS, generator=gen, device=w.device)
    fns = _compiled()
    out = _map_row_blocks(lambda s: _kmeans_rows(w[s], u[:, s], max_iter, fine_atom, lut_dtype, fns), r,
                          w.numel(), w.device)
    sums = tuple(float(sum(o[2][i] for o in out)) for i in range(3)) if lut_dtype is not None else None
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out]), sums


def _kmeans_rows(w: torch.Tensor, u: torch.Tensor, max_iter: int, fine_atom: int, lut_dtype: torch.dtype | None,
                 fns: tuple[Callable, Callable]):
    """:func:`_kmeans` on a block of rows, with the k-means++ draws' uniforms ``u`` ([k, R, draws]) and
    :func:`_draws` and :func:`_kmeans_steps` (or their compiled forms) ``fns``."""
    r, k = w.shape
    keys = _order_keys(w) if w.device.type == "cpu" else None
    xs = _sorted_rows(w, keys)
    fine, coarse, seed = (b.to(w.device) for b in _coreset_bounds(k, fine_atom))
    psum = _atom_sums(xs, fine)
    draws, steps = fns
    with torch.jit.optimized_execution(False):  # run as written: no profiling runs, no rewrites
        seeds = _sort_last(draws(psum, fine, seed, u))
        t, c = steps(xs, psum, fine, coarse, seeds, max_iter, fine_atom == 1, KMEANS_COARSE_ITER, KMEANS_KEEP,
                     KMEANS_EXACT_STEPS, _OMEGA)
    sums = None if lut_dtype is None else _sorted_error_sums(xs, _ceil_to(t, _code_dtype(w)).float(),
                                                              c.to(lut_dtype).float())
    return _codes(w, keys, t), c, sums


def _code_dtype(w: torch.Tensor) -> torch.dtype:
    """The dtype :func:`_codes` compares ``w`` in."""
    return w.dtype if w.dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def _sorted_error_sums(xs: torch.Tensor, t: torch.Tensor, lut: torch.Tensor) -> tuple[float, float, float]:
    """``(Σ (W−Q)², Σ |W−Q|^2.4, Σ W²)`` over rows whose codes count the thresholds ``t`` ([R, L−1], in the
    weights' dtype) at or below each weight and ``Q = lut[row, code]``, from the sorted rows ``xs``: code j is
    the j-th segment of a sorted row, so Q over it is the table row with each entry repeated (sums do not
    depend on the order). NumPy's pairwise fp32 sums on CPU."""
    r, k = xs.shape
    e = _count_below(xs, t)
    ends = torch.cat([torch.zeros_like(e[:, :1]), e, torch.full_like(e[:, :1], k)], dim=1)
    n = ends.diff(dim=1).reshape(-1)
    if xs.device.type != "cpu":
        d = xs.reshape(-1) - lut.reshape(-1).repeat_interleave(n)
        d2 = d.square_()
        return (float(d2.sum(dtype=torch.float64)), float(d2.pow_(LP_NORM / 2).sum(dtype=torch.float64)),
                float(xs.square().sum(dtype=torch.float64)))
    x = xs.numpy().reshape(-1)
    d = np.subtract(x, np.repeat(lut.numpy().reshape(-1), n.numpy()))
    d *= d
    sq = float(d.sum())
    return sq, float(np.power(d, LP_NORM / 2, out=d).sum()), float(np.einsum("i,i->", x, x))


def _exact_means(xs: torch.Tensor, fine: torch.Tensor, psum: torch.Tensor, first: torch.Tensor, t: torch.Tensor,
                 c: torch.Tensor) -> torch.Tensor:
    """Exact means of the segments of the sorted rows ``xs`` cut at the midpoints ``t`` ([R, k−1]):
    the fine atom holding each midpoint (from the atoms' ``first`` weights), then its weights below it."""
    r, k = xs.shape
    j = (_count_below(first, t) - 1).clamp_min_(0)
    size = fine.diff()
    span = torch.arange(int(size.max()), device=xs.device)
    start = fine[j]
    idx = (start[..., None] + span).clamp_max_(k - 1)
    vals = xs.gather(1, idx.view(r, -1)).view(idx.shape)
    below = (span < size[j][..., None]) & (vals < t[..., None])
    zero = torch.zeros(r, 1, dtype=torch.float64, device=xs.device)
    cn = torch.cat([zero, (start + below.sum(dim=2)).double(), zero + k], dim=1).diff(dim=1)
    s = psum.gather(1, j) + torch.where(below, vals, 0.0).sum(dim=2, dtype=torch.float64)
    sm = torch.cat([zero, s, psum[:, -1:]], dim=1).diff(dim=1)
    return _means(cn, sm, c)



def quantize_weight(
    weight: torch.Tensor,
    method: str,
    bits: int,
    seed: int = 0,
    group_size: int | None = None,
    name: str = "",
) -> QuantizedWeight:
    """Quantize a Linear/Conv weight (``[out, in, ...]``) with one method and bit width.

    ``group_size`` (UAQ only) quantizes groups of that many input weights per output channel.
    Errors are measured against the dequantized *stored* tables: ``rel_error = ‖W−Q‖²/‖W‖²``
    and the paper's ``lp_error = mean |W−Q|^2.4``.
    """
    check_method_bits(method, bits, name)
    check_weight(weight, name)
    at = f"layer {name!r}: " if name else ""
    shape = tuple(weight.shape)
    n_out, k_in = accounting.n_out_k_in(shape)
    if group_size and method != "uaq":
        raise ValueError(f"{at}group-wise quantization is only defined for 'uaq', not {method!r}")
    lut_dtype = lut_dtype_for(weight.dtype)
    if method == "uaq":
        w = weight.detach().reshape(n_out, k_in).float()
        if group_size:
            if group_size <= 0 or k_in % group_size:
                raise ValueError(
                    f"{at}group size {group_size} does not divide the {k_in} input weights per channel; "
                    "choose a divisor (e.g. 64 or 128) or leave group_size unset"
                )
            codes, lut, sums = _uaq(w.reshape(n_out * (k_in // group_size), group_size), bits, lut_dtype)
            codes = codes.reshape(n_out, k_in)
        else:
            codes, lut, sums = _uaq(w, bits, lut_dtype)
        lut = to_table_dtype(lut, lut_dtype)
        if sums is None or not all(math.isfinite(x) for x in sums):  # not on CPU, or squares past fp32's range
            sums = _error_sums(w, codes, lut.float(), group_size)
    elif method == "kmeans_c":  # errors from the sorted rows (see _sorted_error_sums)
        codes, lut, sums = _kmeans(weight.detach().reshape(n_out, k_in), bits, seed, lut_dtype=lut_dtype)
        lut = lut.to(lut_dtype)
    else:
        one_row = weight.detach().reshape(1, -1)
        codes, lut, sums = _kmeans(one_row, bits, seed, KMEANS_A_MAX_ITER, fine_atom=1, lut_dtype=lut_dtype)
        codes, lut = codes.reshape(n_out, k_in), lut.to(lut_dtype)
    if not bool(torch.isfinite(lut).all()):  # never stored: a poisoned table would fail every later load
        raise ValueError(f"{at}{method}-{bits} produced a non-finite table; report this with the layer's weights")
    packing = PackedLayout(method, bits, shape, weight.dtype, group_size or None, lut_dtype=lut.dtype)
    qw = QuantizedWeight(PackedWeight.from_parts(pack_codes(codes, bits), lut.contiguous(), packing))
    sq, lp, norm = sums
    qw.rel_error = sq / norm if norm > 0 else sq
    qw.lp_error = lp / weight.numel()
    return qw


def to_table_dtype(lut: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``lut`` in the table dtype, saturating at its finite range (fp16 weights near ±65504: a level computed as
    (q − z)·Δ may land just past it and would round to Inf)."""
    info = torch.finfo(dtype)
    return lut.clamp(info.min, info.max).to(dtype)


def _table_lookup(codes: torch.Tensor, lut: torch.Tensor, group_size: int | None) -> torch.Tensor:
    """``lut[row or group, code]`` for every weight (``codes`` [N, K], unpacked; ``lut`` [1 | N | N·G, L]):
    the same values as :meth:`QuantizedWeight.dequantize` of the packed codes, by one index_select."""
    n, k = codes.shape
    levels = lut.shape[1]
    idx = codes.to(torch.int32, copy=True)
    if lut.shape[0] > 1:
        per_row = lut.shape[0] // n
        idx += (torch.arange(n, dtype=torch.int32, device=codes.device) * (per_row * levels))[:, None]
        if per_row > 1:
            idx += (torch.arange(k, dtype=torch.int32, device=codes.device) // group_size * levels)[None, :]
    return lut.reshape(-1).index_select(0, idx.view(-1)).view(n, k)


def _error_sums(w: torch.Tensor, codes: torch.Tensor, lut: torch.Tensor, group_size: int | None):
    """``(Σ (W−Q)², Σ |W−Q|^2.4, Σ W²)`` for ``Q = lut[row or group, code]``; on CPU over row blocks in
    torch's threads, with NumPy's pairwise fp32 sums and power (several times faster than torch's here)."""
    if w.device.type != "cpu":
        d = (w - _table_lookup(codes, lut, group_size)).double()
        return (float(d.square().sum()), float(d.abs_().pow_(LP_NORM).sum()), float(w.double().square().sum()))
    n = w.shape[0]
    per_row = lut.shape[0] // n

    def block(rows: slice) -> tuple[float, float, float]:
        table = lut[rows.start * per_row : rows.stop * per_row] if per_row else lut
        x = w[rows].contiguous().numpy().reshape(-1)
        d = (w[rows] - _table_lookup(codes[rows], table, group_size)).numpy().reshape(-1)
        with np.errstate(over="ignore"):  # an overflow to Inf is redone in fp64 below
            d *= d
            sq = float(d.sum())
            _pow_(torch.from_numpy(d), LP_NORM / 2)  # in place, as NumPy's fp32 power within a few ulp, ~3x faster
            return sq, float(d.sum()), float(np.einsum("i,i->", x, x))

    sums = _map_row_blocks(block, n, w.numel(), w.device)
    out = tuple(float(sum(s[i] for s in sums)) for i in range(3))
    if not all(math.isfinite(x) for x in out) and w.dtype != torch.float64:  # squares past fp32's range
        return _error_sums(w.double(), codes, lut.double(), group_size)
    return out
