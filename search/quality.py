"""How well the predictors rank held-out configs: GNN and ridge side by side, as one typed table.

:func:`compare` reads the models' ``metrics`` (see ``search.predictor``): ``final`` (mean ± std over the folds),
``pooled`` (all out-of-fold predictions at once) and each hop's graph-embedding norm ``‖h_G^m‖₁``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .graph import LayerGraph
from .journal import Record
from .predictor import (
    BaselineEnsemble,
    FeatureBuilder,
    PredictorConfig,
    PredictorEnsemble,
    train_baseline,
    train_predictor,
)

__all__ = ["Correlation", "PredictorQuality", "QualityRow", "RankCorrelations", "TrainedPredictors", "compare",
           "train_and_compare"]

RANK_METRICS = ("spearman", "kendall")


@dataclass(frozen=True)
class Correlation:
    """A held-out rank correlation: the mean over folds and its std (NaN where there is one value)."""

    mean: float
    std: float = math.nan


@dataclass(frozen=True)
class RankCorrelations:
    """Held-out Spearman ρ and Kendall τ of one model in one row."""

    spearman: Correlation
    kendall: Correlation


@dataclass(frozen=True)
class QualityRow:
    """One row of the table: ``metric`` ("final", "pooled", "hop m") and a cell per model (None: not defined)."""

    metric: str
    cells: dict[str, RankCorrelations | None]


@dataclass(frozen=True)
class PredictorQuality:
    """The models' held-out rank correlations, row by row (``names`` in column order)."""

    names: tuple[str, ...]
    rows: tuple[QualityRow, ...]

    def row(self, metric: str) -> QualityRow | None:
        return next((r for r in self.rows if r.metric == metric), None)

    def table(self) -> dict[str, dict[str, float]]:
        """``{metric: {"<model> spearman": mean, "<model> kendall": mean, …}}``: the report's predictor section."""
        out: dict[str, dict[str, float]] = {}
        for r in self.rows:
            out[r.metric] = {f"{name} {k}": getattr(c, k).mean for name, c in r.cells.items() if c is not None
                             for k in RANK_METRICS}
        return out

    def pooled(self, name: str, metric: str = "spearman") -> float | None:
        """The pooled held-out correlation of model ``name`` (None when absent or undefined)."""
        r = self.row("pooled")
        c = None if r is None else r.cells.get(name)
        v = None if c is None else getattr(c, metric).mean
        return float(v) if v is not None and math.isfinite(v) else None

    @property
    def text(self) -> str:
        def fmt(c: RankCorrelations | None) -> str:
            if c is None:
                return f"{'—':>25s}"
            s, k = c.spearman, c.kendall
            pm = "" if math.isnan(s.std) else f"±{s.std:.2f}"
            return f"{s.mean:+.3f}{pm:6s} / {k.mean:+.3f}{'':5s}"

        head = f"{'held-out':10s}" + "".join(f" | {n + ' ρ / τ':>25s}" for n in self.names)
        lines = [head, "-" * len(head)]
        lines += [f"{r.metric:10s}" + "".join(f" | {fmt(r.cells[n])}" for n in self.names) for r in self.rows]
        return "\n".join(lines)


def _cell(src: Mapping | None) -> RankCorrelations | None:
    if src is None:
        return None
    return RankCorrelations(*(Correlation(float(src[k]["mean"]), float(src[k]["std"])) for k in RANK_METRICS))


def compare(*models: PredictorEnsemble | BaselineEnsemble, names: Sequence[str] | None = None) -> PredictorQuality:
    """Held-out Spearman / Kendall τ of the models side by side. Rows are ``final`` (mean ± std over folds),
    ``pooled`` (all out-of-fold predictions at once) and each hop ``‖h_G^m‖₁``; models are named "gnn" / "ridge"
    by default."""
    if names is None:
        names = ["gnn" if isinstance(m, PredictorEnsemble) else "ridge" for m in models]
    n_hops = max((len(m.metrics.get("hops", [])) for m in models), default=0)
    rows = []
    for label in ["final", "pooled"] + [f"hop {h}" for h in range(n_hops)]:
        cells: dict[str, RankCorrelations | None] = {}
        for name, m in zip(names, models, strict=True):
            met = m.metrics
            if label == "final":
                src = met["final"]
            elif label == "pooled":
                src = {k: {"mean": met["pooled"][k], "std": math.nan} for k in RANK_METRICS}
            else:
                hop = int(label.split()[1])
                src = met["hops"][hop] if hop < len(met.get("hops", [])) else None
            cells[name] = _cell(src)
        rows.append(QualityRow(label, cells))
    return PredictorQuality(tuple(names), tuple(rows))


@dataclass(frozen=True)
class TrainedPredictors:
    """The GNN ensemble and the ridge baseline trained on the same records, their features and held-out quality."""

    features: FeatureBuilder
    ensemble: PredictorEnsemble
    baseline: BaselineEnsemble
    quality: PredictorQuality


def train_and_compare(graph: LayerGraph, table, records: Sequence[Record], config: PredictorConfig
                      ) -> TrainedPredictors:
    """Train both predictors on ``records`` and compare them held out. Autograd is switched back on: ComfyUI runs
    nodes under inference mode, and training needs it (and tensors made outside it)."""
    with torch.inference_mode(False), torch.enable_grad():
        features = FeatureBuilder.from_table(graph, table)
        ensemble = train_predictor(graph, features, records, config)
        baseline = train_baseline(features, records, config)
    return TrainedPredictors(features, ensemble, baseline, compare(ensemble, baseline))
