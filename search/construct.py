"""Configurations from unit scores (paper §5): the paper's argmax rule, a multiple-choice knapsack for an exact
bit or byte budget (paper §7.2.3), a Pareto sweep over budgets, and evaluation of the results into the journal.

**Scores.** A unit score is the paper's ``S(g)`` (§4.2): the fold-weighted, per-hop standardized norm of the output
node's embedding, ``S = Σ_f ρ_f^m (‖h‖₁ − μ_f^m) / σ_f^m``. **Higher is better**: a positive score means the
variant goes with a better relevance target ``y = −objective − λ·b̄`` (the sign already accounts for a negative
rank correlation ρ). The knapsack *adds* scores over units, so it assumes they are comparable across units — the
per-hop standardization by the scores module is what makes them so; no rescaling happens here.

**Units.** Any objects with the attributes of :class:`UnitScoreLike` (or mappings with those keys), one per
``(unit, variant)``. The paper builds one configuration per granularity: give one level (or pass ``level=``).
Units must be disjoint (as the paper's are); a layer in two units is an error. Layers covered by no unit get
``default`` (``"uaq-4"``: the paper falls back to each layer's min-error option, which needs the option table —
pass a ``{layer: option}`` mapping, e.g. the min-error options, or ``"fp16"`` to keep them unquantized).

**Sizes.** A bit target is met in the paper's accounting, overhead included: ``b̄ = 8·Σ paper bytes / Σ weights``
over *all* layers (:func:`quant.accounting.average_bits`); a byte budget counts the bytes really stored
(packed codes + tables, ``QuantConfig.nbytes("stored")``) of the quantizable layers only.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from torch import nn

from ..quant import accounting
from ..quant.config import QuantConfig
from ..quant.layer_table import LayerInfo, quantizable_layers
from ..quant.options import parse_option
from .journal import Journal, Record
from .sampling import config_key

__all__ = [
    "CONSTRUCTED_SOURCE",
    "DEFAULT_OPTION",
    "Construction",
    "UnitScoreLike",
    "evaluate_constructions",
    "knapsack",
    "paper_rule",
    "pareto_sweep",
]

DEFAULT_OPTION = "uaq-4"
CONSTRUCTED_SOURCE = "constructed"
"""Journal ``source`` prefix of evaluated constructions: ``"constructed:paper"``, ``"constructed:knapsack"``."""
PREDICTED_KEY = "predicted_score"
"""Key of the predicted score sum in a constructed record's ``values`` (next to the measured objective values)."""

_EXACT_CELLS = 10_000_000  # units × cost states of an exact DP (int16 back-pointers: 20 MB)
_EXACT_WORK = 40_000_000  # variants × cost states of an exact DP (~0.2 s)
_APPROX_STATES = 1 << 15  # cost buckets of a core DP
_FULL_STATES = 1 << 12  # cost buckets of the last-resort DP over all units
_CORE_SIZES = (24, 96)  # core units tried before the full bucketed DP
_MAX_DP_VARIANTS = 48  # variants per unit kept for the DP of large instances


class UnitScoreLike(Protocol):
    """What construction needs of a unit score (``search.scores.UnitScore`` has these fields)."""

    unit: str
    level: str  # "op" | "block"
    op_type: str
    block_category: str
    block_index: int
    members: tuple[str, ...]  # layer names
    variant: tuple[str, ...]  # one option per member
    score: float  # higher = better


def _get(obj: Any, name: str) -> Any:
    return obj[name] if isinstance(obj, Mapping) else getattr(obj, name)


# --------------------------------------------------------------------------------------------- result type
@dataclass
class Construction:
    """A constructed configuration: options for every layer, its size and the predicted score it maximizes.

    ``predicted`` is the sum of the chosen variants' scores; ``bound`` an upper bound on that sum for the budget
    (LP relaxation; equal to ``predicted`` when ``exact``); ``units`` the chosen variant per unit.
    """

    rule: str  # "paper" | "knapsack"
    options: dict[str, str]
    avg_bits: float  # paper accounting, overhead included
    nbytes: int  # stored bytes of the quantizable layers
    predicted: float
    level: str | None = None
    target_bits: float | None = None
    max_bytes: int | None = None
    tolerance: float | None = None
    bound: float | None = None
    exact: bool = True
    units: dict[str, tuple[str, ...]] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def label(self) -> str:
        lvl = f" {self.level}" if self.level else ""
        if self.target_bits is not None:
            return f"{self.rule}{lvl} @ {self.target_bits:g} bits"
        if self.max_bytes is not None:
            return f"{self.rule}{lvl} ≤ {self.max_bytes / 2**30:.3g} GiB"
        return f"{self.rule}{lvl}"

    @property
    def source(self) -> str:
        """Journal ``source`` of this construction once evaluated."""
        return f"{CONSTRUCTED_SOURCE}:{self.rule}"

    def meta(self) -> dict:
        """Plain-JSON description (no options)."""
        return {
            "rule": self.rule, "level": self.level, "label": self.label, "target_bits": self.target_bits,
            "max_bytes": self.max_bytes, "tolerance": self.tolerance, "avg_bits": self.avg_bits,
            "nbytes": self.nbytes, "predicted": _finite(self.predicted), "bound": _finite(self.bound),
            "exact": self.exact, "seconds": self.seconds,
        }

    def to_config(self, model_or_layers: nn.Module | Iterable[LayerInfo]) -> QuantConfig:
        """A :class:`QuantConfig` for ``model_or_layers`` (its layers must be exactly the constructed ones)."""
        return QuantConfig(dict(self.options), quantizable_layers(model_or_layers), {"construction": self.meta()})


def _finite(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


# ------------------------------------------------------------------------------------------ unit tables
@dataclass
class _Unit:
    name: str
    members: tuple[str, ...]
    variants: list[tuple[str, ...]]
    scores: np.ndarray  # float64 [V]


def _units(unit_scores: Iterable[Any], layers: Sequence[LayerInfo], level: str | None) -> tuple[list[_Unit], str]:
    """Group scores by unit and validate them (levels, members, options, disjointness); also the level used."""
    names = {la.name for la in layers}
    items = list(unit_scores)
    levels = {str(_get(s, "level")) for s in items}
    if level is not None:
        items = [s for s in items if str(_get(s, "level")) == level]
        if not items:
            raise ValueError(f"no unit scores at level {level!r} (levels given: {sorted(levels)})")
    elif len(levels) > 1:
        raise ValueError(f"unit scores of several levels {sorted(levels)}: the paper builds one configuration per "
                         "level, pass level='op' or level='block'")
    if not items:
        raise ValueError("no unit scores given")
    by_unit: dict[str, _Unit] = {}
    seen: dict[str, dict[tuple[str, ...], float]] = {}
    for s in items:
        unit, members, variant = str(_get(s, "unit")), tuple(_get(s, "members")), tuple(_get(s, "variant"))
        score = float(_get(s, "score"))
        if len(variant) != len(members) or not members:
            raise ValueError(f"unit {unit!r}: variant {variant} does not give one option per member {members}")
        for m, o in zip(members, variant, strict=True):
            parse_option(o, m)
        u = by_unit.get(unit)
        if u is None:
            u = by_unit[unit] = _Unit(unit, members, [], np.empty(0))
            seen[unit] = {}
        elif u.members != members:
            raise ValueError(f"unit {unit!r} is given with different members: {u.members} vs {members}")
        if variant in seen[unit]:
            raise ValueError(f"unit {unit!r}: variant {variant} is scored twice")
        seen[unit][variant] = score
    owner: dict[str, str] = {}
    units = []
    for name, u in by_unit.items():
        for m in u.members:
            if m not in names:
                raise ValueError(f"unit {name!r} names layer {m!r}, which is not in the layer table")
            if m in owner:
                raise ValueError(f"layer {m!r} is in units {owner[m]!r} and {name!r}: units must be disjoint")
            owner[m] = name
        finite = [(v, sc) for v, sc in seen[name].items() if math.isfinite(sc)]
        if not finite:
            raise ValueError(f"unit {name!r} has no finite score")
        u.variants = [v for v, _ in finite]
        u.scores = np.array([sc for _, sc in finite], dtype=np.float64)
        units.append(u)
    return units, str(_get(items[0], "level"))


def _defaults(layers: Sequence[LayerInfo], units: list[_Unit], default: str | Mapping[str, str]) -> dict[str, str]:
    covered = {m for u in units for m in u.members}
    out = {}
    for la in layers:
        if la.name in covered:
            continue
        opt = default.get(la.name, DEFAULT_OPTION) if isinstance(default, Mapping) else default
        parse_option(opt, la.name)
        out[la.name] = opt
    return out


def _costs(units: list[_Unit], layers: Sequence[LayerInfo], acct: str) -> list[np.ndarray]:
    """Bytes (``acct`` accounting) of every variant of every unit, int64."""
    by_name = {la.name: la for la in layers}
    cache: dict[tuple[str, str], int] = {}

    def nb(layer: str, opt: str) -> int:
        key = (layer, opt)
        if key not in cache:
            la = by_name[layer]
            cache[key] = accounting.option_nbytes(la.shape, opt, la.dtype, acct)
        return cache[key]

    return [np.array([sum(nb(m, o) for m, o in zip(u.members, v, strict=True)) for v in u.variants], dtype=np.int64)
            for u in units]


def _finish(rule: str, layers: Sequence[LayerInfo], units: list[_Unit], choice: Sequence[int],
            fixed: dict[str, str], **kw: Any) -> Construction:
    options = dict(fixed)
    chosen = {}
    for u, c in zip(units, choice, strict=True):
        chosen[u.name] = u.variants[c]
        options.update(zip(u.members, u.variants[c], strict=True))
    options = {la.name: options[la.name] for la in layers}
    bits = accounting.average_bits(((la.shape, options[la.name], la.dtype) for la in layers), "paper")
    nbytes = sum(accounting.option_nbytes(la.shape, options[la.name], la.dtype, "stored") for la in layers)
    predicted = float(sum(u.scores[c] for u, c in zip(units, choice, strict=True)))
    return Construction(rule, options, bits, nbytes, predicted, units=chosen, **kw)


# ------------------------------------------------------------------------------------------- paper rule
def paper_rule(
    unit_scores: Iterable[Any],
    layers: Sequence[LayerInfo],
    *,
    level: str | None = None,
    default: str | Mapping[str, str] = DEFAULT_OPTION,
) -> Construction:
    """The paper's rule (§5.1): the top-scoring variant of every unit (first one on ties), no budget.

    The achieved b̄ is an outcome. Units must be disjoint; uncovered layers get ``default`` (see module doc).
    """
    t0 = time.perf_counter()
    layers = list(layers)
    units, lvl = _units(unit_scores, layers, level)
    fixed = _defaults(layers, units, default)
    choice = [int(np.argmax(u.scores)) for u in units]
    c = _finish("paper", layers, units, choice, fixed, level=lvl, exact=True)
    c.bound = c.predicted
    c.seconds = time.perf_counter() - t0
    return c


# --------------------------------------------------------------------------------------------- knapsack
def _upper_hull(d: np.ndarray, s: np.ndarray) -> np.ndarray:
    """Indices of the upper concave hull of points ``(d, s)`` from the cheapest to the dearest, by cost."""
    order = np.lexsort((-s, d))
    d_o = d[order]
    keep = np.ones(len(order), dtype=bool)
    keep[1:] = d_o[1:] != d_o[:-1]  # best score per cost
    hull: list[int] = []
    for i in order[keep]:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (d[b] - d[a]) * (s[i] - s[a]) - (s[b] - s[a]) * (d[i] - d[a])
            if cross >= 0:  # b on or below the segment a–i
                hull.pop()
            else:
                break
        hull.append(int(i))
    return np.array(hull, dtype=np.int64)


def _prune(d: np.ndarray, s: np.ndarray, limit: int) -> np.ndarray:
    """At most ``limit`` variant indices keeping both Pareto fronts (cheap & good, dear & good); exact when
    ``len(d) <= limit``."""
    n = len(d)
    if n <= limit:
        return np.arange(n)
    order = np.lexsort((-s, d))
    best = np.maximum.accumulate(s[order])
    lo_front = order[np.r_[True, s[order][1:] > best[:-1]]]  # cheapest-first records
    rev = np.lexsort((-s, -d))
    best_r = np.maximum.accumulate(s[rev])
    hi_front = rev[np.r_[True, s[rev][1:] > best_r[:-1]]]
    keep = np.unique(np.r_[lo_front, hi_front, np.argmin(d), np.argmax(d), np.argmax(s)])
    if len(keep) > limit:  # thin by cost bucket, best score per bucket
        bucket = (d[keep] - d.min()) * (limit - 1) // max(int(d.max() - d.min()), 1)
        o = np.lexsort((-s[keep], bucket))
        first = np.r_[True, bucket[o][1:] != bucket[o][:-1]]
        keep = np.unique(np.r_[keep[o][first], np.argmin(d), np.argmax(d)])
    return keep


def _dp(deltas: list[np.ndarray], scores: list[np.ndarray], lo: int, hi: int,
        max_states: int | None) -> tuple[list[int], float, int, bool] | None:
    """One variant per group, maximizing Σ score with ``lo ≤ Σ delta ≤ hi`` (deltas ≥ 0).

    Exact (cost states in steps of the deltas' gcd) when ``max_states`` is None; otherwise costs are bucketed into
    ``max_states`` cells, each keeping its best partial solution *with its exact cost*, so the returned cost is exact
    and in the window, but a partial solution dominated within a bucket may be lost. Returns
    ``(choices, score, cost, exact)`` or None when no state lands in the window.
    """
    if hi < 0 or hi < lo:
        return None
    g = 0
    for d in deltas:
        g = math.gcd(g, *[int(x) for x in np.unique(d)])
    g = max(g, 1)
    n_exact = hi // g + 1
    exact = max_states is None or n_exact <= max_states
    width = g if exact else g * -(-(hi // g) // (max_states - 1))
    n = hi // width + 1
    val = np.full(n, -np.inf)
    val[0] = 0.0
    cost = np.zeros(n, dtype=np.int64)
    back = np.empty((len(deltas), n), dtype=np.int16 if max(len(d) for d in deltas) < 16000 else np.int32)
    ar = np.arange(n)
    for u, (d, s) in enumerate(zip(deltas, scores, strict=True)):
        new = np.full(n, -np.inf)
        ch = back[u]
        ch.fill(-1)
        if exact:
            for v in range(len(d)):
                k = int(d[v]) // width
                if k >= n:
                    continue
                cand = val[: n - k] + s[v]
                tgt = new[k:]
                better = cand > tgt
                tgt[better] = cand[better]
                ch[k:][better] = v
        else:
            new_cost = np.zeros(n, dtype=np.int64)
            reach = np.isfinite(val)
            for v in range(len(d)):
                k = int(d[v]) // width
                tc = cost + int(d[v])
                ok = reach & (tc <= hi)
                carry = tc // width - ar - k
                for c in (0, 1):
                    idx = np.flatnonzero(ok & (carry == c))
                    if not len(idx):
                        continue
                    t = idx + k + c
                    cand = val[idx] + s[v]
                    better = cand > new[t]
                    t, idx = t[better], idx[better]
                    new[t] = cand[better]
                    new_cost[t] = tc[idx]
                    ch[t] = 2 * v + c
            cost = new_cost
        val = new
    final_cost = ar * width if exact else cost
    ok = np.isfinite(val) & (final_cost >= lo)
    if not ok.any():
        return None
    t = int(np.flatnonzero(ok)[np.argmax(val[ok])])
    best, total = float(val[t]), int(final_cost[t])
    choices = [0] * len(deltas)
    for u in range(len(deltas) - 1, -1, -1):
        code = int(back[u, t])
        v, c = (code, 0) if exact else divmod(code, 2)
        choices[u] = v
        t -= int(deltas[u][v]) // width + c
    return choices, best, total, exact


@dataclass
class _Problem:
    """Per-unit variant costs (relative to each unit's cheapest) and hulls, reused across budgets."""

    units: list[_Unit]
    base: int  # Σ cheapest variant + fixed layers, bytes
    deltas: list[np.ndarray]
    hulls: list[np.ndarray]
    inc_unit: np.ndarray
    inc_dd: np.ndarray
    inc_ds: np.ndarray
    inc_slope: np.ndarray
    s0: float
    start: np.ndarray  # hull start variant per unit
    max_extra: int

    @classmethod
    def build(cls, units: list[_Unit], costs: list[np.ndarray], fixed_bytes: int) -> _Problem:
        deltas, hulls, iu, idd, ids = [], [], [], [], []
        base, s0, start, max_extra = fixed_bytes, 0.0, [], 0
        for j, (u, c) in enumerate(zip(units, costs, strict=True)):
            cmin = int(c.min())
            d = c - cmin
            base += cmin
            deltas.append(d)
            max_extra += int(d.max())
            h = _upper_hull(d, u.scores)
            hulls.append(h)
            start.append(int(h[0]))
            s0 += float(u.scores[h[0]])
            if len(h) > 1:
                iu.append(np.full(len(h) - 1, j))
                idd.append(np.diff(d[h]))
                ids.append(np.diff(u.scores[h]))
        def cat(xs: list[np.ndarray], t: type) -> np.ndarray:
            return np.concatenate(xs).astype(t) if xs else np.zeros(0, t)

        inc_unit, inc_dd, inc_ds = cat(iu, np.int64), cat(idd, np.int64), cat(ids, np.float64)
        slope = inc_ds / np.maximum(inc_dd, 1)
        # decreasing slope; within a unit the hull order (slopes strictly decrease along a hull)
        pos = np.concatenate([np.arange(len(h) - 1) for h in hulls]) if len(inc_unit) else np.zeros(0, np.int64)
        order = np.lexsort((pos, inc_unit, -slope))
        return cls(units, base, deltas, hulls, inc_unit[order], inc_dd[order], inc_ds[order], slope[order], s0,
                   np.array(start, dtype=np.int64), max_extra)

    def bound(self, lo: int, hi: int) -> tuple[float, float]:
        """(LP-relaxation upper bound of Σ score for extra cost in [lo, hi], critical slope λ*)."""
        cum_c = np.r_[0, np.cumsum(self.inc_dd)]
        cum_s = self.s0 + np.r_[0.0, np.cumsum(self.inc_ds)]
        n_pos = int(np.sum(self.inc_slope > 0))
        c = float(min(max(cum_c[n_pos], lo), hi))
        ub = float(np.interp(c, cum_c, cum_s))
        k = int(np.searchsorted(cum_c, c, side="left"))
        lam = float(self.inc_slope[min(max(k - 1, 0), len(self.inc_slope) - 1)]) if len(self.inc_slope) else 0.0
        if lo <= cum_c[n_pos] <= hi:
            lam = 0.0
        return ub, lam

    def greedy(self, lo: int, hi: int) -> tuple[np.ndarray, float, int]:
        """Lagrangian greedy: hull increments by decreasing slope while they fit under ``hi``; non-positive ones
        only while below ``lo``."""
        pos = np.zeros(len(self.units), dtype=np.int64)
        blocked = np.zeros(len(self.units), dtype=bool)
        cost, score = 0, self.s0
        for u, dd, ds, sl in zip(self.inc_unit.tolist(), self.inc_dd.tolist(), self.inc_ds.tolist(),
                                 self.inc_slope.tolist(), strict=True):
            if sl <= 0 and cost >= lo:
                break
            if blocked[u]:
                continue
            if cost + dd <= hi:
                cost += dd
                score += ds
                pos[u] += 1
            else:
                blocked[u] = True
        choice = np.array([h[p] for h, p in zip(self.hulls, pos, strict=True)], dtype=np.int64)
        return choice, score, cost

    def solve(self, lo: int, hi: int) -> tuple[list[int], float, bool, float]:
        """(choices, Σ score, exact, bound) with extra cost in ``[lo, hi]``; :class:`_NoFit` when none is found."""
        ub, lam = self.bound(lo, hi)
        units = self.units
        n_units = len(units)
        # Exact DP when the cost grid is small enough.
        g = 0
        for d in self.deltas:
            g = math.gcd(g, *[int(x) for x in np.unique(d)])
        states = hi // max(g, 1) + 1
        if n_units * states <= _EXACT_CELLS and sum(len(d) for d in self.deltas) * states <= _EXACT_WORK:
            res = _dp(self.deltas, [u.scores for u in units], lo, hi, None)
            if res is None:
                raise _NoFit(exact=True)
            return res[0], res[1], True, res[1]
        choice, score, cost = self.greedy(lo, hi)
        best: tuple[list[int], float] | None = (choice.tolist(), score) if lo <= cost <= hi else None
        # Core: the units with a hull increment closest to the critical slope, re-optimized by DP over all their
        # (pruned) variants with the others fixed; widen the core if the window is still missed.
        dist = np.full(n_units, np.inf)
        if len(self.inc_unit):
            np.minimum.at(dist, self.inc_unit, np.abs(self.inc_slope - lam))
        ranked = np.argsort(dist, kind="stable")
        cur_extra = np.array([int(d[c]) for d, c in zip(self.deltas, choice, strict=True)], dtype=np.int64)
        for k in (*_CORE_SIZES, n_units):
            k = min(k, n_units)
            core = np.sort(ranked[:k])
            fixed_extra = int(cur_extra.sum() - cur_extra[core].sum())
            fixed_score = score - float(sum(units[i].scores[choice[i]] for i in core))
            sub_d, sub_s, keep_idx, mins = [], [], [], 0
            for i in core:
                keep = _prune(self.deltas[i], units[i].scores, _MAX_DP_VARIANTS)
                d = self.deltas[i][keep]
                m = int(d.min())
                mins += m
                sub_d.append(d - m)
                sub_s.append(units[i].scores[keep])
                keep_idx.append(keep)
            off = fixed_extra + mins
            res = _dp(sub_d, sub_s, lo - off, hi - off, _APPROX_STATES if k < n_units else _FULL_STATES)
            if res is not None and (best is None or fixed_score + res[1] > best[1]):
                new = choice.copy()
                for i, keep, v in zip(core, keep_idx, res[0], strict=True):
                    new[i] = keep[v]
                best = (new.tolist(), fixed_score + res[1])
            if best is not None or k == n_units:
                break
        if best is None:
            raise _NoFit(exact=False)
        return best[0], best[1], False, ub


class _NoFit(Exception):
    def __init__(self, exact: bool) -> None:
        super().__init__("no configuration in the budget window")
        self.exact = exact


_Prepared = tuple[list[_Unit], str, dict[str, str], _Problem]


def _prepare(unit_scores: Iterable[Any], layers: Sequence[LayerInfo], level: str | None,
             default: str | Mapping[str, str], acct: str) -> _Prepared:
    units, lvl = _units(unit_scores, layers, level)
    fixed = _defaults(layers, units, default)
    by_name = {la.name: la for la in layers}
    fixed_bytes = sum(accounting.option_nbytes(by_name[n].shape, o, by_name[n].dtype, acct) for n, o in fixed.items())
    return units, lvl, fixed, _Problem.build(units, _costs(units, layers, acct), fixed_bytes)


def knapsack(
    unit_scores: Iterable[Any],
    layers: Sequence[LayerInfo],
    *,
    target_bits: float | None = None,
    max_bytes: int | None = None,
    tolerance: float = 0.01,
    level: str | None = None,
    default: str | Mapping[str, str] = DEFAULT_OPTION,
    _prepared: _Prepared | None = None,
) -> Construction:
    """Multiple-choice knapsack: one variant per unit, maximizing the summed score within a size budget.

    ``target_bits``: ``target_bits − tolerance ≤ b̄ ≤ target_bits`` (paper accounting, overhead included, all
    layers), i.e. the budget is used, not just respected — even where the scores would prefer fewer bits.
    ``max_bytes``: stored bytes of the quantizable layers ``≤ max_bytes`` (no lower bound). Give exactly one.
    ``level``/``default``: as for :func:`paper_rule` (uncovered layers' bytes count against the budget).

    Algorithm: if the cost grid (bytes in steps of the cost gcd) is small, an exact DP over units × cost — the
    optimum. Otherwise Lagrangian relaxation: the units' upper concave hulls in (bytes, score), increments taken by
    decreasing slope (the LP optimum, whose value is ``Construction.bound``); then the units whose increments lie
    closest to the critical slope (24, then 96, then all) are re-optimized over all their variants by a DP over
    bucketed cost that carries exact costs, the others fixed. The result's b̄ is exact and always in the window;
    ``bound − predicted`` bounds its suboptimality. ``ValueError`` when the target is outside the achievable
    range, or no configuration lands in the window.
    """
    t0 = time.perf_counter()
    if (target_bits is None) == (max_bytes is None):
        raise ValueError("give exactly one budget: target_bits (average bits b̄) or max_bytes (stored bytes)")
    layers = list(layers)
    acct = "paper" if target_bits is not None else "stored"
    units, lvl, fixed, prob = _prepared or _prepare(unit_scores, layers, level, default, acct)
    n_weights = sum(la.numel for la in layers)
    lo_b, hi_b = prob.base, prob.base + prob.max_extra
    if target_bits is not None:
        target_bits = float(target_bits)
        if not (math.isfinite(target_bits) and tolerance >= 0):
            raise ValueError(f"target_bits must be finite and tolerance >= 0 (got {target_bits}, {tolerance})")
        b_min, b_max = 8.0 * lo_b / n_weights, 8.0 * hi_b / n_weights
        if target_bits < b_min - 1e-12 or target_bits - tolerance > b_max + 1e-12:
            raise ValueError(f"target b̄ = {target_bits:g} is not achievable with these units: b̄ ranges over "
                             f"[{b_min:.4f}, {b_max:.4f}] (paper accounting, overhead included)")
        hi = math.floor(target_bits * n_weights / 8 + 1e-9)
        lo = math.ceil((target_bits - tolerance) * n_weights / 8 - 1e-9)
    else:
        max_bytes = int(max_bytes)
        if max_bytes < lo_b:
            raise ValueError(f"max_bytes = {max_bytes} is below the smallest achievable size {lo_b} bytes "
                             f"(stored bytes range over [{lo_b}, {hi_b}])")
        hi, lo = max_bytes, lo_b
    try:
        choice, _, exact, bound = prob.solve(max(lo - prob.base, 0), min(hi - prob.base, prob.max_extra))
    except _NoFit as e:
        how = "no" if e.exact else "the search found no"
        window = f"b̄ in [{target_bits - tolerance:g}, {target_bits:g}]" if target_bits is not None else "the budget"
        raise ValueError(f"{how} configuration has {window}: the units' size steps are too coarse for this "
                         "tolerance; widen the tolerance or pick another target") from None
    c = _finish("knapsack", layers, units, choice, fixed, level=lvl, target_bits=target_bits, max_bytes=max_bytes,
                tolerance=tolerance if target_bits is not None else None, bound=bound, exact=exact)
    if exact:
        c.bound = c.predicted
    c.seconds = time.perf_counter() - t0
    return c


def pareto_sweep(
    unit_scores: Iterable[Any],
    layers: Sequence[LayerInfo],
    targets: Iterable[float] = np.arange(3.0, 4.51, 0.1),
    *,
    tolerance: float = 0.01,
    level: str | None = None,
    default: str | Mapping[str, str] = DEFAULT_OPTION,
) -> list[Construction]:
    """:func:`knapsack` at every target b̄ (rounded to 1e-6); targets that cannot be met are skipped."""
    unit_scores = list(unit_scores)
    layers = list(layers)
    prepared = _prepare(unit_scores, layers, level, default, "paper")
    out = []
    for t in targets:
        try:
            out.append(knapsack(unit_scores, layers, target_bits=round(float(t), 6), tolerance=tolerance,
                                level=level, default=default, _prepared=prepared))
        except ValueError:
            continue
    return out


# ----------------------------------------------------------------------------------------- evaluation
def evaluate_constructions(
    journal: Journal,
    constructions: Iterable[Construction],
    evaluate: Callable[[Mapping[str, str]], Mapping[str, float]],
    *,
    primary: str,
) -> list[Record]:
    """Evaluate constructions with the real objective and record them (``source="constructed:<rule>"``, the
    predicted score under ``values["predicted_score"]``, the target under ``values["target_bits"]``).

    A configuration already in the journal (same options) is not evaluated again; its record is returned.
    """
    keys = []
    for c in constructions:
        key = config_key(c.options)
        keys.append(key)
        if not journal.has(key):
            t0 = time.perf_counter()
            values = dict(evaluate(c.options))
            seconds = time.perf_counter() - t0
            if primary not in values:
                raise ValueError(f"the objective returned {sorted(values)}, without the primary value {primary!r}")
            extra = {PREDICTED_KEY: c.predicted}
            if c.target_bits is not None:
                extra["target_bits"] = c.target_bits
            journal.add(c.options, avg_bits=c.avg_bits, nbytes=c.nbytes, values={**values, **extra},
                        primary=values[primary], timings={"evaluate": seconds, "construct": c.seconds},
                        source=c.source)
    by_key = {r.config_key: r for r in journal.records()}
    return [by_key[k] for k in keys]
