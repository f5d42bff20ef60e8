"""From a search's journal to insights and configs: layer graph, predictor (GNN + ridge baseline), unit scores,
constructions at bit budgets (measured with the real objective and journaled), baselines, figures, report.

Used by the Sensitivity Report and Build Config nodes and by ``make demo``. Results are cached per journal
state, so Report and Build Config on the same search train once.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..search.construct import Construction, evaluate_constructions, knapsack, paper_rule
from ..search.graph import LayerGraph, trace_graph
from ..search.journal import Journal, Record
from ..search.predictor import FeatureBuilder, compare, train_baseline, train_predictor
from ..search.report import aggregate_insights, chosen_options_png, insight_figures, pareto_png, report_json
from ..search.runner import config_size
from ..search.sampling import config_key
from ..search.scores import VariantScore, unit_scores
from .search_jobs import SearchHandle

DEFAULT_TARGETS = (3.5, 4.0)


@dataclass
class Analysis:
    graph: LayerGraph
    features: FeatureBuilder
    ensemble: object
    baseline: object
    quality: dict
    scores: list
    constructions: list[Construction]
    records: list[Record]
    report: dict
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


def _baselines(records: Sequence[Record], targets: Sequence[float]) -> dict:
    out: dict = {}
    # any record whose layers all share one option (a knapsack at b̄ 4.0 may have built uniform UAQ-4 first)
    uniform: dict[str, Record] = {}
    for r in sorted(records, key=lambda r: r.source != "uniform"):
        options = set(r.options.values())
        if len(options) == 1 and math.isfinite(r.primary):
            uniform.setdefault(options.pop(), r)
    for option in ("uaq-4", "uaq-3"):
        r = uniform.get(option)
        out[f"uniform_{option.replace('-', '')}"] = ({"objective": r.primary, "avg_bits": r.avg_bits}
                                                     if r is not None else None)
    random = [r for r in records if r.source == "random" and math.isfinite(r.primary)]
    out["best_random_at_or_below_target"] = {}
    for t in targets:
        below = [r for r in random if r.avg_bits <= t]
        best = min(below, key=lambda r: r.primary) if below else None
        out["best_random_at_or_below_target"][f"{t:g}"] = ({"objective": best.primary, "avg_bits": best.avg_bits}
                                                           if best else None)
    return out


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
                         f"(about 200 for reliable insights): run the search longer")
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
    ctx.evaluate({la.name: "fp16" for la in ctx.layers})  # trace the unquantized graph
    with torch.inference_mode():
        graph = trace_graph(ctx.search_dm, ctx.forward_once)
    t = step("graph", t)
    with handle.open() as j:
        random = j.records(source="random")
    # ComfyUI runs nodes under inference mode: training needs autograd back (and tensors made outside it)
    with torch.inference_mode(False), torch.enable_grad():
        features = FeatureBuilder.from_table(graph, ctx.table)
        ensemble = train_predictor(graph, features, random, folds=folds, seed=seed, epochs=epochs)
        baseline = train_baseline(features, random, folds=folds, seed=seed)
    quality = compare(ensemble, baseline)
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
    report = report_json(unit_scores=scores, records=records, constructions=constructions,
                         predictor_quality=_quality_table(quality), op_types=op_types, objective=handle.primary)
    report["evaluated_summary"] = report.get("evaluated")
    report["evaluated"] = n_random
    report["objective"] = handle.primary
    report["predictor"] = _predictor_summary(ensemble, baseline)
    report["constructed"] = _measured(records, constructions)
    report["baselines"] = _baselines(records, targets)
    if not any(s.score != 0 and math.isfinite(s.score) for s in scores):
        report.setdefault("recommendations", []).insert(0, (
            f"WARNING: every sensitivity score is 0 — the predictor could not rank the {n_random} evaluated configs "
            f"(held-out Spearman {report['predictor'].get('spearman')}); the insights and the constructions are "
            "meaningless: run the search longer (≥ 50 configs; ~200 for stable insights)"))
    sampled = sorted({s.unit for s in scores if getattr(s, "sampled", False)})
    report["sampled_block_units"] = sampled  # block units with more variants than scored: a seeded sample
    if sampled:
        report.setdefault("recommendations", []).append(
            f"{len(sampled)} block unit(s) have more than 1296 option combinations; their scores come from a "
            f"seeded sample of variants (e.g. {sampled[0]})")
    figures = {f"insights-{k}": v for k, v in insight_figures(aggregate_insights(scores)).items()}
    figures["chosen-options"] = chosen_options_png({c.label: c.options for c in constructions}, op_types)
    figures["pareto"] = pareto_png(records, objective=handle.primary, constructions=constructions)
    step("report", t)
    result = Analysis(graph, features, ensemble, baseline, quality, scores, constructions, records, report, figures,
                      seconds)
    _CACHE[key] = result
    return result


def marginal_scores(ensemble, op_scores: Sequence, context: dict[str, str]) -> list[VariantScore]:
    """Per layer and option: how much the predicted log objective improves when that layer alone takes the
    option, all other layers as in ``context`` (higher is better). Summed over layers this is a first-order
    model of the predictor around ``context``, so a knapsack over it minimizes the predicted objective."""
    import numpy as np

    units = {s.unit: s for s in op_scores}
    configs, keys = [dict(context)], []
    for unit, s in units.items():
        for v in {x.variant for x in op_scores if x.unit == unit}:
            configs.append({**context, s.members[0]: v[0]})
            keys.append((unit, v))
    pred = np.log(np.maximum(ensemble.predict(configs), 1e-30))
    base = pred[0]
    return [VariantScore(u, "op", units[u].op_type, units[u].block_category, units[u].block_index,
                         tuple(units[u].members), v, float(base - p))
            for (u, v), p in zip(keys, pred[1:], strict=True)]


def predicted_knapsack(ensemble, op_scores: Sequence, layers, *, target_bits: float | None = None,
                       max_bytes: int | None = None, rounds: int = 3) -> Construction:
    """The knapsack at a budget over the predictor's marginal effects, re-linearized around its own answer:
    start from the knapsack over the paper's unit scores, then ``rounds`` times score every (layer, option)
    around the current config and solve again; the config with the best predicted objective wins."""
    c = knapsack(op_scores, layers, target_bits=target_bits, max_bytes=max_bytes)
    best, best_pred = c, float(ensemble.predict([c.options])[0])
    for _ in range(rounds):
        c = knapsack(marginal_scores(ensemble, op_scores, c.options), layers, target_bits=target_bits,
                     max_bytes=max_bytes)
        pred = float(ensemble.predict([c.options])[0])
        if pred < best_pred:
            best, best_pred = c, pred
    return best


def _quality_table(quality: dict) -> dict:
    rows = {}
    for row in quality.get("rows", []):
        name = row.get("row") or row.get("name") or str(len(rows))
        rows[str(name)] = {k: v for k, v in row.items() if isinstance(v, int | float) or v is None}
    return rows


def _predictor_summary(ensemble, baseline) -> dict:
    def final(m, metric: str):
        v = (m.metrics.get("pooled") or m.metrics.get("final") or {}).get(metric)
        return float(v) if isinstance(v, int | float) else None

    return {"spearman": final(ensemble, "spearman"), "kendall": final(ensemble, "kendall"),
            "baseline_spearman": final(baseline, "spearman"), "baseline_kendall": final(baseline, "kendall")}


def _measured(records: Sequence[Record], constructions: Sequence[Construction]) -> list[dict]:
    by_key = {r.config_key: r for r in records}
    out = []
    for c in constructions:
        r = by_key.get(config_key(c.options))
        out.append({"rule": c.rule, "target_bits": c.target_bits, "avg_bits": c.avg_bits,
                    "objective": r.primary if r is not None else None, "predicted_score": c.predicted})
    return out


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
