"""Insights from unit scores (paper §4.3), aggregated once for the report, its figures and the benchmarks.

Unit scores are objects or mappings with ``unit``, ``level``, ``op_type``, ``block_category``, ``block_index``,
``members``, ``variant`` and ``score`` (higher is better). Two spreads, each with one meaning:

* a **unit's** spread is its best minus its worst variant score: how much the unit's choice matters;
* a **group's** spread (op type, block category, block index) is p90 − p10 of all its variant scores.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["INSIGHT_KEYS", "Insights", "UnitSummary", "aggregate_insights", "group_stats", "insights",
           "unit_summaries"]

INSIGHT_KEYS = ("op_type", "block_category", "block_index")


def field_of(obj: Any, name: str, default: Any = None) -> Any:
    """``obj[name]`` of a mapping, else ``obj.name`` (``default`` when absent)."""
    if isinstance(obj, Mapping):
        return obj.get(name, default)
    return getattr(obj, name, default)


def aggregate_insights(unit_scores: Iterable[Any]) -> dict[str, dict]:
    """Variant scores grouped as the paper's plots do (§4.3):

    * ``"op_type"``: ``{op type: [scores]}`` — every variant of every **op-level** unit of that op type (the
      block-level units' own ``op_type`` when no op-level scores are given);
    * ``"block_category"``: ``{category: [scores]}`` — every variant of every **block-level** unit of the category
      (op-level when no block-level scores are given);
    * ``"block_index"``: ``{index: [scores]}`` — the same scores by block index (``int``, ``>= 0``); units outside
      the repeated blocks (``block_index < 0``) are keyed by their block category (``str``, e.g. ``"t-embed"``).

    Non-finite scores are dropped. Keys keep first-seen order.
    """
    items = [s for s in unit_scores if math.isfinite(float(field_of(s, "score")))]
    levels = {field_of(s, "level") for s in items}
    op_src = [s for s in items if field_of(s, "level") == "op"] if "op" in levels else items
    blk_src = [s for s in items if field_of(s, "level") == "block"] if "block" in levels else items
    out: dict[str, dict] = {k: {} for k in INSIGHT_KEYS}
    for s in op_src:
        out["op_type"].setdefault(str(field_of(s, "op_type")), []).append(float(field_of(s, "score")))
    for s in blk_src:
        score, cat = float(field_of(s, "score")), str(field_of(s, "block_category"))
        idx = int(field_of(s, "block_index"))
        out["block_category"].setdefault(cat, []).append(score)
        out["block_index"].setdefault(idx if idx >= 0 else cat, []).append(score)
    return out


def group_stats(values: Sequence[float]) -> dict:
    """``n, min, p10, q1, median, q3, p90, max`` and ``spread`` (p90 − p10) of the finite values."""
    a = np.array([float(v) for v in values if math.isfinite(float(v))])
    if not len(a):
        return {"n": 0}
    q = np.percentile(a, [0, 10, 25, 50, 75, 90, 100])
    return {"n": int(len(a)), "min": q[0], "p10": q[1], "q1": q[2], "median": q[3], "q3": q[4], "p90": q[5],
            "max": q[6], "spread": q[5] - q[1]}


@dataclass(frozen=True)
class UnitSummary:
    """One unit's variant scores in brief: its best and worst variants and their spread."""

    unit: str
    level: str
    op_type: str
    block_category: str
    block_index: int
    members: tuple[str, ...]
    n_variants: int
    spread: float  # best − worst score
    median: float
    best_variant: tuple[str, ...]
    best_score: float
    worst_variant: tuple[str, ...]
    worst_score: float


def unit_summaries(unit_scores: Iterable[Any]) -> list[UnitSummary]:
    """One :class:`UnitSummary` per unit with a finite score, in first-seen order."""
    units: dict[str, tuple[Any, list[tuple[str, ...]], list[float]]] = {}
    for s in unit_scores:
        score = float(field_of(s, "score"))
        if not math.isfinite(score):
            continue
        first, variants, scores = units.setdefault(str(field_of(s, "unit")), (s, [], []))
        variants.append(tuple(field_of(s, "variant") or ()))
        scores.append(score)
    out = []
    for name, (s, variants, scores) in units.items():
        sc = np.array(scores)
        b, w = int(np.argmax(sc)), int(np.argmin(sc))
        out.append(UnitSummary(name, field_of(s, "level"), field_of(s, "op_type"), field_of(s, "block_category"),
                               field_of(s, "block_index"), tuple(field_of(s, "members") or ()), len(sc),
                               float(sc[b] - sc[w]), float(np.median(sc)), variants[b], float(sc[b]), variants[w],
                               float(sc[w])))
    return out


@dataclass(frozen=True)
class Insights:
    """Everything the report and the benchmarks read from unit scores."""

    groups: dict[str, dict]  # :func:`aggregate_insights`
    units: dict[str, UnitSummary]
    levels: list[str]
    n_variants: int  # all variant scores given, finite or not
    sampled_units: list[str]  # units whose variants were sampled, not enumerated

    def stats(self) -> dict[str, dict[str, dict]]:
        """:func:`group_stats` of every group: ``{key: {group (str): stats}}``."""
        return {key: {str(k): group_stats(v) for k, v in self.groups[key].items()} for key in INSIGHT_KEYS}


def insights(unit_scores: Iterable[Any]) -> Insights:
    """:class:`Insights` of unit scores (objects or mappings, see the module docstring)."""
    scores = list(unit_scores)
    return Insights(aggregate_insights(scores), {u.unit: u for u in unit_summaries(scores)},
                    sorted({str(field_of(s, "level")) for s in scores}), len(scores),
                    list(dict.fromkeys(str(field_of(s, "unit")) for s in scores if field_of(s, "sampled", False))))
