"""Unit scores and insights from a GNN ensemble trained on a synthetic journal (toy DiT, fast, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
from toys import FAST, INSENSITIVE, SENSITIVE, make_synthetic, toy_graph

from qua2sedimo.quant.options import OPTIONS
from qua2sedimo.search.insights import insights
from qua2sedimo.search.predictor import FeatureBuilder, PredictorConfig, train_predictor
from qua2sedimo.search.scores import UnitScore, unit_scores, unit_variants


@pytest.fixture(scope="module")
def ensemble():
    graph, errors, records = make_synthetic()
    return train_predictor(graph, FeatureBuilder(graph, errors), records, PredictorConfig(seed=0, **FAST))


def _by_unit(scores: list[UnitScore]) -> dict[str, list[UnitScore]]:
    out: dict[str, list[UnitScore]] = {}
    for s in scores:
        out.setdefault(s.unit, []).append(s)
    return out


def _spread(scores: list[UnitScore]) -> float:
    v = [s.score for s in scores]
    return max(v) - min(v)


def test_unit_variants():
    full, sampled = unit_variants(2, 6, 36)
    assert not sampled and full.shape == (36, 2) and full[0].tolist() == [0, 0] and full[7].tolist() == [1, 1]
    assert len({tuple(r) for r in full.tolist()}) == 36
    part, sampled = unit_variants(5, 6, 100, seed=(0, 3))
    assert sampled and part.shape == (100, 5) and len({tuple(r) for r in part.tolist()}) == 100
    assert part[:6].tolist() == [[o] * 5 for o in range(6)]  # the uniform variants first
    np.testing.assert_array_equal(part, unit_variants(5, 6, 100, seed=(0, 3))[0])
    assert not np.array_equal(part, unit_variants(5, 6, 100, seed=(1, 3))[0])


def test_op_level_scores(ensemble):
    graph = ensemble.graph
    scores = unit_scores(ensemble, level="op")
    assert len(scores) == 6 * len(graph.layers)
    s = scores[0]
    assert (s.level, s.members, s.unit, s.hop, s.sampled, s.n_variants) == ("op", ("x_embedder",), "x_embedder", 0,
                                                                           False, 6)
    assert s.op_type == "patchify" and s.block_category == "patchify" and s.block_index == -1
    assert [x.variant for x in scores[:6]] == [(o,) for o in OPTIONS]
    assert all(np.isfinite(x.score) for x in scores)
    units = _by_unit(scores)
    # the sensitive layers' choice matters far more than the insensitive ones'
    assert min(_spread(units[n]) for n in SENSITIVE) > 3 * max(_spread(units[n]) for n in INSENSITIVE)
    for n in SENSITIVE:
        best = max(units[n], key=lambda x: x.score)
        assert best.variant[0].endswith("-4"), best
    # bits and bytes of a variant come from the paper accounting
    uaq4 = next(x for x in units["final_layer"] if x.variant == ("uaq-4",))
    assert uaq4.nbytes > 0 and uaq4.bits == pytest.approx(8 * uaq4.nbytes / (8 * 4))


def test_block_level_scores_and_sampling(ensemble):
    graph = ensemble.graph
    scores = unit_scores(ensemble, level="block")
    units = _by_unit(scores)
    assert list(units) == [u.name for u in graph.units("block")]
    for u in graph.units("block"):
        got = units[u.name]
        assert len(got) == 6 ** len(u.members) and all(len(x.variant) == len(u.members) for x in got)
        assert all(x.hop == min(u.hop, 4) and x.members == x.layers == u.members for x in got)
    ff, cemb = units["blocks.0/feedforward"], units["c-embed"]
    assert _spread(ff) > 3 * _spread(cemb)
    best = max(ff, key=lambda x: x.score)
    assert all(o.endswith("-4") for o in best.variant), best
    worst = min(ff, key=lambda x: x.score)
    assert all(o.endswith("-3") for o in worst.variant), worst
    # too many variants: sampled (seeded, marked), the uniform ones included
    few = unit_scores(ensemble, level="block", max_variants=10, seed=1)
    fu = _by_unit(few)
    big = [u for u in graph.units("block") if 6 ** len(u.members) > 10]
    assert big and all(len(fu[u.name]) == 10 and all(x.sampled for x in fu[u.name]) for u in big)
    assert all(not x.sampled for u in graph.units("block") if u not in big for x in fu[u.name])
    assert insights(few).sampled_units == [u.name for u in big]
    again = unit_scores(ensemble, level="block", max_variants=10, seed=1)
    assert [x.variant for x in again] == [x.variant for x in few]


def test_context_scores_and_graph_check(ensemble):
    graph = ensemble.graph
    ctx = {la.name: "uaq-4" for la in graph.layers}
    scores = unit_scores(ensemble, level="block", context=ctx, options=["uaq-4", "uaq-3"])
    units = _by_unit(scores)
    assert all(len(v) == 2 ** len(v[0].members) for v in units.values())
    ff = units["blocks.0/feedforward"]
    assert max(ff, key=lambda x: x.score).variant == ("uaq-4", "uaq-4")
    with pytest.raises(ValueError, match="not the one the predictor"):
        unit_scores(ensemble, toy_graph(depth=2))
    with pytest.raises(ValueError, match="not among the predictor's options"):
        unit_scores(ensemble, options=["uaq-2"])


def test_insights(ensemble):
    scores = unit_scores(ensemble, level="op")
    ins = insights(scores)
    assert ins.levels == ["op"] and ins.n_variants == len(scores) and ins.sampled_units == []
    stats = ins.stats()
    for key in ("op_type", "block_category", "block_index"):
        assert sum(s["n"] for s in stats[key].values()) == len(scores)
    ff2 = stats["op_type"]["FF-2"]
    assert ff2["n"] == 6 and ff2["min"] <= ff2["q1"] <= ff2["median"] <= ff2["q3"] <= ff2["max"]
    # block 0, and the global units (block index -1) apart from it, keyed by their category
    assert {k for k in ins.groups["block_index"] if isinstance(k, int)} == {0}
    assert all(isinstance(k, str) for k in ins.groups["block_index"] if k != 0)
    assert set(ins.units) == {la.name for la in ensemble.graph.layers}
    b = ins.units["blocks.0.mlp.2"]
    assert b.best_score == max(s.score for s in scores if s.unit == "blocks.0.mlp.2") and b.spread > 0
    assert scores[0].to_json()["variant"] == list(scores[0].variant)


def test_scores_feed_construction(ensemble):
    from qua2sedimo.quant.accounting import option_nbytes
    from qua2sedimo.quant.layer_table import LayerInfo, dtype_from_name
    from qua2sedimo.search.construct import knapsack, paper_rule

    layers = [LayerInfo(la.name, la.kind, la.shape, dtype_from_name(la.dtype)) for la in ensemble.graph.layers]
    scores = unit_scores(ensemble, level="block")
    paper = paper_rule(scores, layers)
    assert set(paper.options) == {la.name for la in layers}
    assert all(paper.options[n].endswith("-4") for n in SENSITIVE)
    cheapest = sum(min(option_nbytes(la.shape, o, la.dtype) for o in OPTIONS) for la in layers)
    lo = 8.0 * cheapest / sum(la.numel for la in layers)
    target = (lo + paper.avg_bits) / 2
    mid = knapsack(scores, layers, target_bits=target, tolerance=(paper.avg_bits - lo) / 4)
    assert target - (paper.avg_bits - lo) / 4 <= mid.avg_bits <= target + 1e-9
