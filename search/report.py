"""Figures, text and JSON about a search and its sensitivity scores (matplotlib, Agg backend; no ComfyUI).

Figures are returned as PNG bytes (:func:`png_to_array` turns one into a ComfyUI IMAGE array):

* :func:`pareto_png` — evaluated configs (b̄ vs objective) with the Pareto front; constructed configs (journal
  ``source`` ``"constructed:<rule>"``) as stars, and their predicted scores on a second axis;
* :func:`insight_figures` — box plots of unit scores per op type, block category and block index (paper §4.3);
* :func:`chosen_options_png` — per op type, the fraction of layers given each option, one panel per config.

Every figure has the same size (:data:`FIGURE_INCHES` at :data:`FIGURE_DPI`), so a node's batch of figures pads
nothing and each reads at Preview Image's size.

:func:`build_report` gathers, in one typed :class:`Report`, the insights (most/least sensitive units, per-category
statistics, which op types tolerate 3 bits), the predictor's held-out quality (``search.quality``), constructions
predicted vs measured, the uniform and best-random baselines and recommendations; :meth:`Report.to_json` (and
:func:`report_json`) gives strict-JSON data, :func:`report_text` renders it and :func:`report_dumps` serializes it
(no NaN).

Scores follow the paper's convention: higher = better predicted quality (§4.2). A unit is *sensitive* when the
choice among its variants matters, i.e. its scores spread widely (the README's reading of the box plots).
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import textwrap
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy import stats

from ..quant.options import FP_OPTION, OPTIONS, parse_option
from .construct import PREDICTED_KEY
from .insights import UnitSummary, field_of, insights
from .journal import Record
from .quality import PredictorQuality
from .runner import pareto_front
from .sampling import config_key

__all__ = [
    "REPORT_FORMAT",
    "Baselines",
    "Measured",
    "MeasuredConstruction",
    "PredictorSummary",
    "Report",
    "build_report",
    "chosen_options_png",
    "insight_figures",
    "is_constructed",
    "pareto_png",
    "png_to_array",
    "report_dumps",
    "report_json",
    "report_text",
    "status_text",
]

REPORT_FORMAT = "qua2sedimo.report"
REPORT_VERSION = 1
_INPUT_SIDE = ("t-embed", "c-embed", "patchify", "conv-in")  # global units drawn before block 0
# Every figure is drawn on one canvas: 8 × 5 in at 150 dpi = 1200 × 750 px. ComfyUI batches a node's images by
# padding them to the largest one, so figures of different sizes shrank to a corner of a mostly white image;
# equal sizes pad nothing, and text of 8–11 pt at 150 dpi stays legible when Preview Image shows it at half size.
FIGURE_INCHES = (8.0, 5.0)
FIGURE_DPI = 150
TEXT_WIDTH = 100  # report_text wraps longer lines (the node's text box wraps too, but without the indent)
STABLE_CONFIGS = 120
"""Evaluated configs below which the sensitivity ranking is not yet stable, measured on the trained reference model
(``bench/predictor_stability.py``, docs/benchmarks.md): the op-level unit scores trained on fewer configs rank
unlike those of 200 configs. Fewer → a warning in the report, its text and its figures."""
MIN_HELDOUT_SPEARMAN = 0.5
"""The GNN's pooled held-out Spearman below which its scores are reported as unreliable whatever the count."""


def _figure():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


@contextlib.contextmanager
def _new_figure(*args: Any, **kwargs: Any) -> Iterator[tuple[Any, Any]]:
    """``plt.subplots(...)`` on the report's one canvas (:data:`FIGURE_INCHES` at :data:`FIGURE_DPI`); the figure
    is closed however the drawing ends."""
    plt = _figure()
    fig, axes = plt.subplots(*args, figsize=FIGURE_INCHES, dpi=FIGURE_DPI, **kwargs)
    try:
        yield fig, axes
    finally:
        plt.close(fig)


def _png(fig: Any, rect: tuple[float, float, float, float] | None = None) -> bytes:
    """The figure as PNG at its own size (no tight bounding box: every figure keeps the one canvas size)."""
    fig.tight_layout(rect=rect)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIGURE_DPI)
    return buf.getvalue()


def is_constructed(record: Record) -> bool:
    """Whether a journal record is a constructed configuration (``source`` ``"constructed"`` or ``"constructed:…"``)."""
    return record.source == "constructed" or record.source.startswith("constructed:")


# ------------------------------------------------------------------------------------------------ Pareto
def pareto_png(
    records: Sequence[Record], *, objective: str, title: str = "", constructions: Sequence[Any] = ()
) -> bytes:
    """PNG of every evaluated config (b̄ vs objective, lower is better) with the Pareto front highlighted.

    Random configs are dots, other sources (``uniform``, …) squares, constructed configs (measured) stars. Their
    predicted scores (``values["predicted_score"]`` of constructed records, plus ``constructions`` — objects with
    ``avg_bits``, ``predicted`` and optionally ``options``/``label`` — not yet evaluated) are hollow diamonds on a
    right-hand axis, inverted so that better is down on both axes.
    """
    with _new_figure() as (fig, ax):
        finite = [r for r in records if np.isfinite(r.primary)]
        handles = []
        if finite:
            groups: dict[str, list[Record]] = defaultdict(list)
            for r in finite:
                groups["constructed" if is_constructed(r) else r.source].append(r)
            styles = {"random": dict(marker="o", s=14, alpha=0.6),
                      "constructed": dict(marker="*", s=90, alpha=0.95, color="tab:orange", zorder=4)}
            for src in sorted(groups, key=lambda s: (s != "random", s == "constructed", s)):
                rs = groups[src]
                label = f"{'constructed, measured' if src == 'constructed' else src} ({len(rs)})"
                if src == "random" and len(groups) == 1:
                    label = f"evaluated ({len(rs)})"
                handles.append(ax.scatter([r.avg_bits for r in rs], [r.primary for r in rs], label=label,
                                          **styles.get(src, dict(marker="s", s=28, alpha=0.85, zorder=3))))
            front = pareto_front(finite)
            handles += ax.plot([r.avg_bits for r in front], [r.primary for r in front], "r.-", label="Pareto front")
            if min(r.primary for r in finite) > 0:
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no configurations evaluated yet", ha="center", va="center", transform=ax.transAxes)
        predicted = [(r.avg_bits, r.values[PREDICTED_KEY]) for r in records
                     if is_constructed(r) and math.isfinite(r.values.get(PREDICTED_KEY, math.nan))]
        done = {r.config_key for r in records}
        for c in constructions:
            opts = field_of(c, "options")
            if opts and config_key(opts) in done:
                continue
            bits, pred = field_of(c, "avg_bits"), field_of(c, "predicted")
            if bits is not None and pred is not None and math.isfinite(pred):
                predicted.append((float(bits), float(pred)))
        if predicted:
            ax2 = ax.twinx()
            handles.append(ax2.scatter([p[0] for p in predicted], [p[1] for p in predicted], marker="D", s=30,
                                       facecolors="none", edgecolors="tab:purple",
                                       label=f"predicted score ({len(predicted)})"))
            ax2.invert_yaxis()
            ax2.set_ylabel("predicted score (higher is better, axis inverted)", color="tab:purple")
        ax.set_xlabel("average bits per weight b̄")
        ax.set_ylabel(f"{objective} (lower is better)")
        ax.set_title(title or "Qua²SeDiMo search")
        ax.grid(alpha=0.3)
        if handles:
            ax.legend(handles=handles, loc="upper right", fontsize=8)
        return _png(fig)


def png_to_array(png: bytes) -> np.ndarray:
    """``H×W×3`` float32 in [0, 1] (what a ComfyUI IMAGE holds per picture)."""
    plt = _figure()
    img = plt.imread(io.BytesIO(png), format="png")
    return np.ascontiguousarray(img[..., :3], dtype=np.float32)


def status_text(records: Sequence[Record], *, objective: str, target: int | None = None, state: str = "") -> str:
    """A few lines: progress, best configs, Pareto front size."""
    finite = [r for r in records if np.isfinite(r.primary)]
    lines = [f"{state + ': ' if state else ''}{len(records)}" + (f"/{target}" if target else "") + " configs evaluated"]
    if finite:
        best = min(finite, key=lambda r: r.primary)
        lines.append(f"best {objective} = {best.primary:.4g} at b̄ = {best.avg_bits:.3f} (config #{best.idx})")
        front = pareto_front(finite)
        lines.append("Pareto front: " + ", ".join(f"b̄ {r.avg_bits:.2f} → {r.primary:.3g}" for r in front[:8]))
        secs = [r.timings.get("evaluate") for r in finite if r.timings.get("evaluate")]
        if secs:
            lines.append(f"{np.mean(secs):.2f} s per evaluation")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ insights
def _index_order(key: Any) -> tuple:
    if isinstance(key, str) and key.lstrip("-").isdigit():
        key = int(key)
    if isinstance(key, (int, np.integer)):
        return (1, int(key), "")
    return (0 if key in _INPUT_SIDE else 2, 0, str(key))


def _box_png(data: Mapping[Any, Sequence[float]], *, title: str, xlabel: str, sort_keys: bool = False,
             warning: str | None = None) -> bytes:
    keys = [k for k in data if any(math.isfinite(float(v)) for v in data[k])]
    if sort_keys:
        keys.sort(key=_index_order)
    series = [np.array([float(v) for v in data[k] if math.isfinite(float(v))]) for k in keys]
    with _new_figure() as (fig, ax):
        if keys:
            ax.boxplot(series, positions=np.arange(1, len(keys) + 1), widths=0.6, flierprops=dict(markersize=3))
            ax.set_xticks(np.arange(1, len(keys) + 1))
            many = len(keys) > 8
            ax.set_xticklabels([str(k) for k in keys], rotation=60 if many else 0, ha="right" if many else "center",
                               fontsize=9 if len(keys) <= 24 else 7)
            ax.axhline(0.0, color="grey", lw=0.8, ls="--")
            n = sum(len(s) for s in series)
            ax.set_title(f"{title} ({n} variant scores)")
        else:
            ax.text(0.5, 0.5, "no unit scores", ha="center", va="center", transform=ax.transAxes)
            ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("unit score (higher = better)")
        ax.grid(alpha=0.3, axis="y")
        if warning:
            fig.text(0.5, 0.985, "\n".join(textwrap.wrap(f"PROVISIONAL — {warning}", 110)), ha="center", va="top",
                     fontsize=8, color="#b00020", bbox=dict(facecolor="#fff0f0", edgecolor="#b00020", lw=0.8))
            return _png(fig, rect=(0, 0, 1, 0.88))
        return _png(fig)


def insight_figures(insights: Mapping[str, Mapping[Any, Sequence[float]]], warning: str | None = None
                    ) -> dict[str, bytes]:
    """Box plots of unit scores (paper §4.3): ``{"op_type": png, "block_category": png, "block_index": png}``;
    ``warning`` (e.g. the report's first) is drawn as a red banner over each, so a provisional plot says so.

    ``insights`` is the dict of ``search.insights.aggregate_insights`` (missing or empty groups give a figure that
    says so). Block indices are drawn in order, global units before (t-embed, c-embed, patchify, conv-in) or after
    (out-proj, conv-out, …) them; keys may be ints or their decimal strings (as after a JSON round trip).
    """
    insights = insights or {}
    return {
        "op_type": _box_png(insights.get("op_type") or {}, title="Sensitivity per op type", xlabel="op type",
                            warning=warning),
        "block_category": _box_png(insights.get("block_category") or {}, title="Sensitivity per block category",
                                   xlabel="block category", warning=warning),
        "block_index": _box_png(insights.get("block_index") or {}, title="Sensitivity per block index",
                                xlabel="block index", sort_keys=True, warning=warning),
    }


_OPTION_COLORS = {"uaq-4": "#1f77b4", "kmeans_c-4": "#2ca02c", "kmeans_a-4": "#17becf", "uaq-3": "#ff7f0e",
                  "kmeans_c-3": "#d62728", "kmeans_a-3": "#e377c2", FP_OPTION: "#7f7f7f"}


def _bits(option: str) -> int:
    parsed = parse_option(option)
    return 16 if parsed is None else parsed[1]


def _option_order(opt: str) -> tuple:
    if opt in OPTIONS:
        return (0, OPTIONS.index(opt), opt)
    return (2, 0, opt) if opt == FP_OPTION else (1, 0, opt)


def chosen_options_png(options_by_config: Mapping[str, Mapping[str, str]], op_types: Mapping[str, str],
                       *, title: str = "", max_configs: int = 8) -> bytes:
    """Stacked bars: per op type, the fraction of its layers given each option — one row per config (paper §4.3).

    ``options_by_config``: ``{label: {layer: option}}`` (at most ``max_configs`` rows are drawn);
    ``op_types``: ``{layer: op type}`` (layers not in it count as ``"other"``). Op types keep ``op_types`` order.
    """
    configs = list(options_by_config.items())[:max_configs]
    order = list(dict.fromkeys(op_types.values()))
    if any(n not in op_types for _, opts in configs for n in opts):
        order.append("other")
    present = [t for t in order if any(op_types.get(n, "other") == t for _, opts in configs for n in opts)]
    all_opts = sorted({o for _, opts in configs for o in opts.values()}, key=_option_order)
    cols = 1 if len(configs) <= 3 else 2
    rows = max(math.ceil(len(configs) / cols), 1)
    with _new_figure(rows, cols, squeeze=False, sharex=True, sharey=True) as (fig, axes):
        if not configs or not present:
            axes[0, 0].text(0.5, 0.5, "no configurations", ha="center", va="center", transform=axes[0, 0].transAxes)
        x = np.arange(len(present))
        handles: dict[str, Any] = {}
        for (label, opts), ax in zip(configs, axes.flat, strict=False):
            counts = {t: Counter() for t in present}
            for n, o in opts.items():
                counts[op_types.get(n, "other")][o] += 1
            totals = np.array([max(sum(counts[t].values()), 1) for t in present], dtype=float)
            bottom = np.zeros(len(present))
            for o in all_opts:
                frac = np.array([counts[t][o] for t in present]) / totals
                handles[o] = ax.bar(x, frac, bottom=bottom, color=_OPTION_COLORS.get(o), label=o, width=0.75)
                bottom += frac
            low = sum(1 for o in opts.values() if _bits(o) <= 3)
            sub = f" — {low}/{len(opts)} layers ≤3 bits" if opts else ""
            ax.set_title(f"{label}{sub}", fontsize=9)
            ax.set_ylim(0, 1)
        for ax in axes[:, 0]:
            ax.set_ylabel("fraction", fontsize=9)
        for ax in axes.flat[len(configs):]:
            if configs:
                ax.set_axis_off()
        many = len(present) > 6
        for j in range(cols):  # op types under the lowest drawn panel of each column
            ax = axes[max((len(configs) - 1 - j) // cols, 0), j]
            ax.set_xticks(x)
            ax.xaxis.set_tick_params(labelbottom=True)
            ax.set_xticklabels(present, rotation=60 if many else 0, ha="right" if many else "center", fontsize=8)
        if handles:
            fig.legend(list(handles.values()), list(handles), loc="lower center", ncol=min(len(handles), 7),
                       fontsize=8, frameon=False)
        if title:
            fig.suptitle(title)
        return _png(fig, rect=(0, 0.07 if handles else 0, 1, 1))


# -------------------------------------------------------------------------------------------- report data
def _plain(obj: Any) -> Any:
    """Strict-JSON data: NaN/inf → None, numpy scalars → Python, tuples → lists, keys → str."""
    if isinstance(obj, Mapping):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, set, frozenset, np.ndarray)):
        return [_plain(v) for v in (obj.tolist() if isinstance(obj, np.ndarray) else obj)]
    if isinstance(obj, (bool, np.bool_)):
        return bool(obj)
    if isinstance(obj, (int, np.integer)):
        return int(obj)
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(obj) else None
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _bits_by_op_type(units: Sequence[UnitSummary], op_types: Mapping[str, str] | None) -> dict[str, dict]:
    """Per op type, from each unit's best variant: layers at 3 bits, preferred method (paper-rule choices)."""
    levels = {u.level for u in units}
    use = [u for u in units if u.level == "op"] if "op" in levels else units
    per: dict[str, Counter] = defaultdict(Counter)
    for u in use:
        for layer, opt in zip(u.members, u.best_variant, strict=False):
            t = (op_types or {}).get(layer) or (u.op_type if len(u.members) == 1 or not op_types else "other")
            per[str(t)][opt] += 1
    out = {}
    for t, cnt in per.items():
        n = sum(cnt.values())
        low = sum(c for o, c in cnt.items() if _bits(o) <= 3)
        methods = Counter()
        for o, c in cnt.items():
            if (p := parse_option(o)) is not None:
                methods[p[0]] += c
        out[t] = {"layers": n, "frac_3bit": low / n if n else None,
                  "method": methods.most_common(1)[0][0] if methods else None,
                  "options": dict(cnt.most_common())}
    return out


def _record_summary(r: Record) -> dict:
    return {"id": r.id, "source": r.source, "avg_bits": r.avg_bits, "nbytes": r.nbytes, "primary": r.primary}


def _spearman(x: Sequence[float], y: Sequence[float]) -> float | None:
    """Spearman ρ, None where it is undefined (fewer than 3 pairs, or a constant side)."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    return float(stats.spearmanr(x, y).statistic)


@dataclass(frozen=True)
class PredictorSummary:
    """Pooled held-out rank correlations of the GNN and of the ridge baseline (None: undefined)."""

    spearman: float | None
    kendall: float | None
    baseline_spearman: float | None
    baseline_kendall: float | None

    @classmethod
    def of(cls, quality: PredictorQuality) -> PredictorSummary:
        return cls(quality.pooled("gnn"), quality.pooled("gnn", "kendall"), quality.pooled("ridge"),
                   quality.pooled("ridge", "kendall"))


@dataclass(frozen=True)
class MeasuredConstruction:
    """A construction and its measured objective (None: not measured)."""

    rule: str
    target_bits: float | None
    avg_bits: float
    objective: float | None
    predicted_score: float | None


@dataclass(frozen=True)
class Measured:
    """A measured config in brief."""

    objective: float
    avg_bits: float


@dataclass(frozen=True)
class Baselines:
    """Uniform UAQ-4 / UAQ-3 and the best random config at or below each target b̄ (None: none measured)."""

    uniform_uaq4: Measured | None
    uniform_uaq3: Measured | None
    best_random_at_or_below_target: dict[str, Measured | None]


def _baselines(records: Sequence[Record], targets: Sequence[float]) -> Baselines:
    # any record whose layers all share one option (a knapsack at b̄ 4.0 may have built uniform UAQ-4 first)
    uniform: dict[str, Measured] = {}
    for r in sorted(records, key=lambda r: r.source != "uniform"):
        options = set(r.options.values())
        if len(options) == 1 and math.isfinite(r.primary):
            uniform.setdefault(options.pop(), Measured(r.primary, r.avg_bits))
    random = [r for r in records if r.source == "random" and math.isfinite(r.primary)]
    best: dict[str, Measured | None] = {}
    for t in targets:
        below = [r for r in random if r.avg_bits <= t]
        r = min(below, key=lambda r: r.primary) if below else None
        best[f"{t:g}"] = Measured(r.primary, r.avg_bits) if r is not None else None
    return Baselines(uniform.get("uaq-4"), uniform.get("uaq-3"), best)


def _measured(records: Sequence[Record], constructions: Sequence[Any]) -> list[MeasuredConstruction]:
    by_key = {r.config_key: r for r in records}
    out = []
    for c in constructions:
        opts = field_of(c, "options")
        r = by_key.get(config_key(opts)) if opts else None
        out.append(MeasuredConstruction(field_of(c, "rule"), field_of(c, "target_bits"), field_of(c, "avg_bits"),
                                        r.primary if r is not None else None, field_of(c, "predicted")))
    return out


@dataclass(frozen=True)
class Report:
    """The report of a search, built once by :func:`build_report`; :meth:`to_json` gives strict-JSON data."""

    objective: str
    units: dict[str, int]  # unit summaries per level
    sensitive_units: dict[str, dict[str, list[UnitSummary]]]  # level → "most" / "least" → widest / narrowest spread
    categories: dict[str, dict[str, dict]]  # insight key → group → :func:`group_stats`
    bits_by_op_type: dict[str, dict]
    predictor_quality: dict[str, dict[str, float | None]]  # row → column → value
    constructions: list[dict]  # predicted vs measured, journal-only constructions included
    predicted_vs_measured: dict
    evaluated: int  # configs of the random search
    evaluated_summary: dict  # every evaluated record: count by source, best, Pareto front
    recommendations: list[str]
    warnings: list[str]  # why the scores, insights and constructions should not be trusted yet (empty: no reason)
    predictor: PredictorSummary | None
    constructed: list[MeasuredConstruction]
    baselines: Baselines
    sampled_block_units: list[str]  # block units scored from a seeded sample of their variants

    def to_json(self) -> dict:
        return _plain({"format": REPORT_FORMAT, "version": REPORT_VERSION, **dataclasses.asdict(self)})


def reliability_warnings(unit_scores: Sequence[Any], evaluated: int, summary: PredictorSummary | None
                         ) -> list[str]:
    """Why a report's scores should not be trusted yet: too few evaluated configs for a stable ranking
    (:data:`STABLE_CONFIGS`), a predictor that ranks held-out configs poorly (:data:`MIN_HELDOUT_SPEARMAN`), or
    scores that are all zero. Empty when none applies."""
    out: list[str] = []
    rho = summary.spearman if summary is not None else None
    if unit_scores and not any(math.isfinite(v := float(field_of(s, "score"))) and v != 0 for s in unit_scores):
        out.append(f"every sensitivity score is 0: the predictor could not rank the {evaluated} evaluated configs "
                   f"(held-out Spearman {_fmt(rho)}); the insights and constructions are meaningless")
    if unit_scores and evaluated < STABLE_CONFIGS:
        out.append(f"only {evaluated} configs evaluated: below {STABLE_CONFIGS} the sensitivity ranking is not stable "
                   "(measured on the trained reference model), so the insights and constructions are provisional "
                   f"— run the search to at least {STABLE_CONFIGS} configs")
    if rho is not None and rho < MIN_HELDOUT_SPEARMAN:
        out.append(f"the predictor ranks held-out configs poorly (Spearman {rho:.2f} < {MIN_HELDOUT_SPEARMAN}): its "
                   "scores are unreliable — evaluate more configs")
    return out


def build_report(
    *,
    unit_scores: Iterable[Any] = (),
    records: Sequence[Record] = (),
    constructions: Sequence[Any] = (),
    predictor_quality: PredictorQuality | Mapping[str, Mapping[str, float | None]] | None = None,
    op_types: Mapping[str, str] | None = None,
    objective: str = "objective",
    targets: Sequence[float] = (),
    evaluated: int | None = None,
    top: int = 10,
    tolerate_3bit: float = 0.75,
) -> Report:
    """The :class:`Report` of a search.

    ``unit_scores``: unit score objects/mappings (see ``search.insights``); ``records``: journal records;
    ``constructions``: ``construct.Construction`` objects (or mappings with ``label``, ``rule``, ``avg_bits``,
    ``predicted``, ``options`` …); ``predictor_quality``: :func:`search.quality.compare`'s table, or rows → metric →
    value, e.g. ``{"hop 0": {"srcc": 0.8}}``; ``op_types``: layer → op type (for block-level units); ``targets``:
    the b̄ of the best-random baselines; ``evaluated``: configs of the random search (default: the records with a
    sampler index). Op types whose best variants are 3-bit for at least ``tolerate_3bit`` of their layers are
    reported as tolerating 3 bits; at most ``1 − tolerate_3bit`` as 4-bit.
    """
    unit_scores = list(unit_scores)
    ins = insights(unit_scores)
    units = list(ins.units.values())
    by_level: dict[str, list[UnitSummary]] = defaultdict(list)
    for u in units:
        by_level[str(u.level)].append(u)
    sensitive = {lvl: {"most": sorted(us, key=lambda u: -u.spread)[:top],
                       "least": sorted(us, key=lambda u: u.spread)[:top]} for lvl, us in by_level.items()}
    categories = ins.stats()
    bits = _bits_by_op_type(units, op_types)
    summary = PredictorSummary.of(predictor_quality) if isinstance(predictor_quality, PredictorQuality) else None
    quality_rows = (predictor_quality.table() if isinstance(predictor_quality, PredictorQuality)
                    else dict(predictor_quality or {}))
    if evaluated is None:
        evaluated = sum(1 for r in records if r.idx is not None)

    # constructions: predicted vs measured
    by_key = {r.config_key: r for r in records}
    built = []
    for c in constructions:
        meta = c.meta() if hasattr(c, "meta") else {k: v for k, v in dict(c).items() if k != "options"}
        opts = field_of(c, "options")
        rec = by_key.get(config_key(opts)) if opts else None
        built.append(dict(meta, measured=rec.primary if rec else None, record_id=rec.id if rec else None))
    seen_ids = {b["record_id"] for b in built}
    for r in records:
        if is_constructed(r) and r.id not in seen_ids:
            built.append({"rule": r.source.partition(":")[2] or None, "label": r.source,
                          "target_bits": r.values.get("target_bits"), "avg_bits": r.avg_bits, "nbytes": r.nbytes,
                          "predicted": r.values.get(PREDICTED_KEY), "measured": r.primary, "record_id": r.id})
    pairs = [(b["predicted"], b["measured"]) for b in built
             if b.get("predicted") is not None and b.get("measured") is not None
             and math.isfinite(b["predicted"]) and math.isfinite(b["measured"])]
    rho = _spearman([p for p, _ in pairs], [-m for _, m in pairs])

    finite = [r for r in records if math.isfinite(r.primary)]
    evaluated_summary = {"n": len(records), "by_source": dict(Counter(r.source for r in records)),
                         "best": _record_summary(min(finite, key=lambda r: r.primary)) if finite else None,
                         "pareto": [_record_summary(r) for r in pareto_front(finite)]}

    recs: list[str] = []
    warnings = reliability_warnings(unit_scores, evaluated, summary)
    for t, b in sorted(bits.items(), key=lambda kv: -(kv[1]["frac_3bit"] or 0)):
        f = b["frac_3bit"]
        if f is None:
            continue
        if f >= tolerate_3bit:
            recs.append(f"{t} tolerates 3 bits: its best variants are 3-bit for {f:.0%} of {b['layers']} layer(s) "
                        f"(mostly {b['method']})")
        elif f <= 1 - tolerate_3bit:
            recs.append(f"keep {t} at 4 bits: only {f:.0%} of {b['layers']} layer(s) prefer 3 bits")
    cat_stats = [(k, s) for k, s in categories["block_category"].items() if s.get("n", 0) >= 2]
    if len(cat_stats) >= 2:
        cat_stats.sort(key=lambda kv: -kv[1]["spread"])
        recs.append(f"most sensitive block category: {cat_stats[0][0]} (score spread p90−p10 "
                    f"{cat_stats[0][1]['spread']:.3g}); least: {cat_stats[-1][0]} ({cat_stats[-1][1]['spread']:.3g})")
    for lvl, s in sensitive.items():
        if s["most"]:
            u = s["most"][0]
            recs.append(f"most sensitive {lvl}-level unit: {u.unit} (spread {u.spread:.3g}, best "
                        f"{'/'.join(u.best_variant)})")
    if rho is not None:
        if rho < 0.3:
            recs.append(f"predicted and measured quality of the constructed configs disagree (Spearman {rho:.2f} over "
                        f"{len(pairs)}): evaluate more random configs and retrain the predictor before trusting them")
        else:
            recs.append(f"predicted scores rank the constructed configs like the measurements (Spearman {rho:.2f} "
                        f"over {len(pairs)})")
    randoms = [r for r in finite if not is_constructed(r)]
    for b in built:
        if b.get("measured") is None or not math.isfinite(b["measured"]) or not randoms:
            continue
        cheaper = [r for r in randoms if r.avg_bits <= b["avg_bits"] + 1e-9]
        if cheaper and b["measured"] < min(r.primary for r in cheaper):
            recs.append(f"{b.get('label')}: b̄ {b['avg_bits']:.3f}, {objective} {b['measured']:.4g} beats every other "
                        f"evaluated config at ≤ that b̄")
    sampled = sorted({str(field_of(s, "unit")) for s in unit_scores if field_of(s, "sampled", False)})
    if sampled:
        n = ins.units[sampled[0]].n_variants if sampled[0] in ins.units else 0
        recs.append(f"{len(sampled)} block unit(s) have more than {n} option combinations; their scores come "
                    f"from a seeded sample of variants (e.g. {sampled[0]})")

    return Report(objective, {lvl: len(us) for lvl, us in by_level.items()}, sensitive, categories, bits,
                  quality_rows, built, {"n": len(pairs), "spearman": rho}, evaluated, evaluated_summary, recs,
                  warnings, summary, _measured(records, constructions), _baselines(records, targets), sampled)


def report_json(**kwargs: Any) -> dict:
    """:func:`build_report` as plain, strict-JSON data (``json.dumps(..., allow_nan=False)`` works; NaN → None)."""
    return build_report(**kwargs).to_json()


def report_dumps(report: Report | Mapping) -> str:
    """Strict JSON text of a report (``ValueError`` on NaN/inf, which :meth:`Report.to_json` never leaves)."""
    data = report.to_json() if isinstance(report, Report) else report
    return json.dumps(data, indent=1, ensure_ascii=False, allow_nan=False)


def _fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _wrapped(text: str, first: str, rest: str, width: int = TEXT_WIDTH) -> list[str]:
    return textwrap.wrap(text, width, initial_indent=first, subsequent_indent=rest, break_on_hyphens=False) or [first]


def report_text(report: Report | Mapping) -> str:
    """Human-readable report (or its JSON data) in sections: a title, then ``## <section>`` headings each followed
    by indented lines (search, units, most/least sensitive units, predictor quality, constructed configs,
    recommendations), sections separated by a blank line, long lines wrapped at :data:`TEXT_WIDTH`."""
    if isinstance(report, Report):
        report = report.to_json()
    objective = report.get("objective", "objective")
    sections: list[tuple[str, list[str]]] = []
    ev = report.get("evaluated_summary") or {}
    search = []
    if ev.get("n"):
        by_source = ", ".join(f"{n} {src}" for src, n in (ev.get("by_source") or {}).items())
        search.append(f"  {ev['n']} evaluated ({by_source})")
    if ev.get("best"):
        b = ev["best"]
        search.append(f"  best evaluated: {objective} {_fmt(b['primary'])} at b̄ {_fmt(b['avg_bits'])} "
                      f"({b['source']}, #{b['id']})")
    if search:
        sections.append(("search", search))
    units = report.get("units") or {}
    sections.append(("units", ["  " + (", ".join(f"{n} {lvl}-level" for lvl, n in units.items())
                                       or "no unit scores")]))
    for lvl, s in (report.get("sensitive_units") or {}).items():
        for which, title in (("most", "most sensitive"), ("least", "least sensitive")):
            rows = s.get(which) or []
            if rows:
                sections.append((f"{title} {lvl}-level units (score spread; best variant)",
                                 [f"  {u['unit']}: {_fmt(u['spread'])}; {'/'.join(u['best_variant'])}"
                                  for u in rows]))
    pq = report.get("predictor_quality") or {}
    if pq:
        cols = list(dict.fromkeys(k for row in pq.values() for k in row))
        names = [str(n) for n in pq]
        wn = max(len(n) for n in names)
        widths = [max(len(c), *(len(_fmt(row.get(c))) for row in pq.values())) for c in cols]
        header = "  " + " " * wn + "  " + "  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))
        sections.append(("predictor quality (held-out)", [header] + [
            "  " + n.ljust(wn) + "  " + "  ".join(_fmt(row.get(c)).rjust(w) for c, w in zip(cols, widths, strict=True))
            for n, row in zip(names, pq.values(), strict=True)]))
    built = report.get("constructions") or []
    if built:
        lines = [f"  {b.get('label')}: b̄ {_fmt(b.get('avg_bits'))}, predicted {_fmt(b.get('predicted'))}, "
                 f"measured {_fmt(b.get('measured'))}" for b in built]
        pvm = report.get("predicted_vs_measured") or {}
        if pvm.get("spearman") is not None:
            lines.append(f"  Spearman(predicted, −measured) = {pvm['spearman']:.3f} over {pvm['n']}")
        sections.append((f"constructed configs (predicted score → measured {objective})", lines))
    recs = report.get("recommendations") or []
    if recs:
        sections.append(("recommendations", [ln for r in recs for ln in _wrapped(r, "  - ", "    ")]))
    warns = report.get("warnings") or []
    if warns:
        sections.insert(0, ("WARNING", [ln for w in warns for ln in _wrapped(w, "  ! ", "    ")]))
    out = [f"# Qua²SeDiMo sensitivity report — objective: {objective}"]
    for heading, lines in sections:
        out += ["", f"## {heading}", *lines]
    return "\n".join(out)
