"""From a search's journal to insights and configs: layer graph, predictor (GNN + ridge baseline), unit scores,
constructions at bit budgets (measured with the real objective and journaled), baselines, figures, report.

Used by the Sensitivity Report and Build Config nodes and by ``make demo``. Results are cached per journal
state, so Report and Build Config on the same search train once.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..quant.options import FP_OPTION
from ..search.construct import Construction, evaluate_constructions, paper_rule
from ..search.graph import LayerGraph, trace_graph
from ..search.insights import aggregate_insights
from ..search.journal import Journal, Record
from ..search.marginal import predicted_knapsack
from ..search.predictor import (
    BaselineEnsemble,
    FeatureBuilder,
    PredictorConfig,
    PredictorEnsemble,
)
from ..search.quality import PredictorQuality, train_and_compare
from ..search.report import STABLE_CONFIGS, Report, build_report, chosen_options_png, insight_figures, pareto_png
from ..search.runner import config_size
from ..search.sampling import config_key
from ..search.scores import UnitScore, unit_scores
from .search_jobs import SearchHandle

DEFAULT_TARGETS = (3.5, 4.0)


@dataclass
class Analysis:
    graph: LayerGraph
    features: FeatureBuilder
    ensemble: PredictorEnsemble
    baseline: BaselineEnsemble
    quality: PredictorQuality
    scores: list[UnitScore]
    constructions: list[Construction]
    records: list[Record]
    report: Report
    figures: dict[str, bytes] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


_CACHE: dict[tuple, Analysis] = {}


def _writer(handle: SearchHandle) -> Journal:
    job = handle.job()
    if job is not None and job.running:
        raise ValueError("the search is still running: let it finish, or queue the Search node with mode 'stop', "
                         "then build the report")
    return Journal.open(handle.journal, **handle.journal_kwargs)


def _uniform(layers, option: str) -> dict[str, str]:
    return {la.name: option for la in layers}


def _measure_baselines(handle: SearchHandle, journal: Journal) -> None:
    """Uniform UAQ-4 and UAQ-3, measured once and journaled (``source="uniform"``)."""
    ctx = handle.context
    for option in ("uaq-4", "uaq-3"):
        options = _uniform(ctx.layers, option)
        if journal.has(config_key(options)):
            continue
        t0 = time.perf_counter()
        values = dict(ctx.evaluate(options))
        bits, nbytes = config_size(ctx.layers, options)
        journal.add(options, avg_bits=bits, nbytes=nbytes, values=values, primary=values[handle.primary],
                    timings={"evaluate": time.perf_counter() - t0}, source="uniform")


def analyse(handle: SearchHandle, *, targets: Sequence[float] = DEFAULT_TARGETS, seed: int = 0, folds: int = 5,
            epochs: int = 300, progress=None) -> Analysis:
    """Train, score, construct and measure; cached per (journal run, number of records, settings)."""
    ctx = handle.context
    if ctx is None:
        raise ValueError("this SEARCH handle has no model attached: connect the Search node of this ComfyUI session")
    with handle.open() as j:
        n_random = len(j.done_indices())
    if n_random < 2 * folds:
        raise ValueError(f"the journal holds {n_random} evaluated configs; the predictor needs at least {2 * folds} "
                         f"({STABLE_CONFIGS} for a stable ranking): run the search longer")
    key = (handle.job_key, n_random, tuple(targets), seed, folds, epochs)
    if key in _CACHE:
        return _CACHE[key]
    seconds: dict[str, float] = {}

    def step(name: str, t0: float) -> float:
        seconds[name] = round(time.perf_counter() - t0, 2)
        if progress is not None:
            progress(len(seconds), 6, name)
        return time.perf_counter()

    t = time.perf_counter()
    ctx.evaluate({la.name: FP_OPTION for la in ctx.layers})  # trace the unquantized graph
    with torch.inference_mode():
        graph = trace_graph(ctx.search_dm, ctx.forward_once)
    t = step("graph", t)
    with handle.open() as j:
        random = j.records(source="random")
    trained = train_and_compare(graph, ctx.table, random, PredictorConfig(folds=folds, seed=seed, epochs=epochs))
    features, ensemble, baseline, quality = trained.features, trained.ensemble, trained.baseline, trained.quality
    t = step("predictor", t)
    scores = unit_scores(ensemble, graph, level="op") + unit_scores(ensemble, graph, level="block", max_variants=1296)
    t = step("scores", t)
    op_scores = [s for s in scores if s.level == "op"]
    constructions = [predicted_knapsack(ensemble, op_scores, ctx.layers, target_bits=tb) for tb in targets]
    constructions.append(paper_rule(op_scores, ctx.layers))
    t = step("construct", t)
    with _writer(handle) as j:
        evaluate_constructions(j, constructions, ctx.evaluate, primary=handle.primary)
        _measure_baselines(handle, j)
        records = j.records()
    t = step("measure", t)
    op_types = {la.name: la.op_type for la in graph.layers}
    report = build_report(unit_scores=scores, records=records, constructions=constructions, predictor_quality=quality,
                          op_types=op_types, objective=handle.primary, targets=targets, evaluated=n_random)
    warning = report.warnings[0] if report.warnings else None
    figures = {f"insights-{k}": v for k, v in insight_figures(aggregate_insights(scores), warning).items()}
    figures["chosen-options"] = chosen_options_png({c.label: c.options for c in constructions}, op_types)
    figures["pareto"] = pareto_png(records, objective=handle.primary, constructions=constructions)
    step("report", t)
    result = Analysis(graph, features, ensemble, baseline, quality, scores, constructions, records, report, figures,
                      seconds)
    _CACHE[key] = result
    return result


def build_config(handle: SearchHandle, *, rule: str, target_bits: float | None = None,
                 max_bytes: int | None = None, seed: int = 0):
    """A QuantConfig from the search: ``rule`` is "knapsack" (at ``target_bits`` or ``max_bytes``) or "paper"."""
    analysis = analyse(handle, seed=seed)
    ctx = handle.context
    op_scores = [s for s in analysis.scores if s.level == "op"]
    if rule == "paper":
        c = paper_rule(op_scores, ctx.layers)
    elif rule == "knapsack":
        c = predicted_knapsack(analysis.ensemble, op_scores, ctx.layers, target_bits=target_bits, max_bytes=max_bytes)
    else:
        raise ValueError(f"unknown rule {rule!r}: use 'knapsack' or 'paper'")
    with _writer(handle) as j:
        (rec,) = evaluate_constructions(j, [c], ctx.evaluate, primary=handle.primary)
    return c.to_config(ctx.layers), c, rec
