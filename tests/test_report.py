import dataclasses
import json
import math

import numpy as np
import pytest
import torch

from qua2sedimo.quant.layer_table import LayerInfo
from qua2sedimo.quant.options import OPTIONS
from qua2sedimo.search.construct import knapsack, paper_rule
from qua2sedimo.search.insights import INSIGHT_KEYS, aggregate_insights
from qua2sedimo.search.journal import Record
from qua2sedimo.search.report import (
    chosen_options_png,
    insight_figures,
    pareto_png,
    png_to_array,
    report_dumps,
    report_json,
    report_text,
    status_text,
)
from qua2sedimo.search.sampling import config_key
from qua2sedimo.search.scores import VariantScore

PNG = b"\x89PNG\r\n\x1a\n"


US = VariantScore  # a unit score without size fields


OPS = ("SA-Q", "SA-K", "FF1", "FF2")


def model(rng, n_blocks=4):
    """Layers of a toy transformer + op-level and block-level unit scores (SA-Q tolerant, FF2 sensitive)."""
    layers, op_types, scores = [], {}, []
    for b in range(n_blocks):
        for op in OPS:
            la = LayerInfo(f"blocks.{b}.{op.lower()}", "linear", (64, 64), torch.float16)
            layers.append(la)
            op_types[la.name] = op
            for o in OPTIONS:
                pref = (1.0 if o.endswith("-3") else -1.0) if op == "SA-Q" else (3.0 if o.endswith("-4") else -3.0)
                if op != "FF2":
                    pref *= 0.2
                scores.append(US(la.name, "op", op, "attn" if op.startswith("SA") else "ff", b, (la.name,), (o,),
                                 float(pref + rng.normal(0, 0.1))))
        for cat, ops in (("attn", OPS[:2]), ("ff", OPS[2:])):
            members = tuple(f"blocks.{b}.{op.lower()}" for op in ops)
            for o1 in OPTIONS:
                for o2 in OPTIONS:
                    scores.append(US(f"blocks.{b}/{cat}", "block", ops[-1], cat, b, members, (o1, o2),
                                     float(rng.normal(0, 3.0 if cat == "ff" else 0.5))))
    emb = LayerInfo("t_embedder.linear", "linear", (64, 32), torch.float16)
    layers.insert(0, emb)
    op_types[emb.name] = "t-Embed"
    for o in OPTIONS:
        scores.append(US(emb.name, "op", "t-Embed", "t-embed", -1, (emb.name,), (o,), float(rng.normal())))
        scores.append(US("t-embed", "block", "t-Embed", "t-embed", -1, (emb.name,), (o,), float(rng.normal())))
    return layers, op_types, scores


def record(i, options, bits, primary, source="random", values=None):
    return Record(i, i if source == "random" else None, config_key(options), dict(options), bits, 1000,
                  dict(values or {}, err=primary), primary, {"evaluate": 0.1}, source, 0.0)


def is_png(data, min_size=2000):
    assert data[:8] == PNG
    assert len(data) > min_size
    arr = png_to_array(data)
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.float32


def test_aggregate_insights_shape():
    rng = np.random.default_rng(0)
    _, _, scores = model(rng)
    ins = aggregate_insights(scores)
    assert set(ins) == set(INSIGHT_KEYS)
    assert set(ins["op_type"]) == {*OPS, "t-Embed"}
    assert len(ins["op_type"]["SA-Q"]) == 4 * 6  # op-level: 4 layers × 6 options
    assert set(ins["block_category"]) == {"attn", "ff", "t-embed"}
    assert len(ins["block_category"]["attn"]) == 4 * 36  # block-level: 4 units × 36 variants
    assert set(ins["block_index"]) == {0, 1, 2, 3, "t-embed"}
    # only op-level scores: the block plots fall back to them
    op_only = aggregate_insights([s for s in scores if s.level == "op"])
    assert len(op_only["block_category"]["attn"]) == 8 * 6
    assert aggregate_insights([]) == {k: {} for k in INSIGHT_KEYS}


def test_insight_figures_render_normal_and_empty():
    rng = np.random.default_rng(1)
    _, _, scores = model(rng, n_blocks=12)
    ins = aggregate_insights(scores + [US("nan", "op", "X", "x", 0, ("nan",), ("uaq-4",), math.nan)])
    figs = insight_figures(ins)
    assert set(figs) == set(INSIGHT_KEYS)
    for png in figs.values():
        is_png(png, 8000)
    # JSON round trip (string keys) still sorts and draws
    figs2 = insight_figures(json.loads(json.dumps(ins)))
    is_png(figs2["block_index"], 8000)
    for png in insight_figures({}).values():
        is_png(png)
    for png in insight_figures({"op_type": {"FF1": []}, "block_index": {}}).values():
        is_png(png)


def test_chosen_options_png():
    rng = np.random.default_rng(2)
    layers, op_types, scores = model(rng)
    paper = paper_rule(scores, layers, level="op")
    ks = knapsack(scores, layers, target_bits=3.6, level="op", tolerance=0.05)
    is_png(chosen_options_png({paper.label: paper.options, ks.label: ks.options}, op_types), 8000)
    is_png(chosen_options_png({"with unknown layer": {**paper.options, "extra": "fp16"}}, op_types))
    is_png(chosen_options_png({}, op_types))
    is_png(chosen_options_png({"empty": {}}, {}))


def test_pareto_png_with_constructed_and_predicted():
    rng = np.random.default_rng(3)
    layers, _, scores = model(rng)
    names = [la.name for la in layers]
    recs = [record(i, {n: str(rng.choice(OPTIONS)) for n in names}, 3 + rng.random(), float(rng.random()))
            for i in range(30)]
    uni = record(30, dict.fromkeys(names, "uaq-4"), 4.03, 0.05, source="uniform")
    c1 = knapsack(scores, layers, target_bits=3.5, level="op", tolerance=0.05)
    c2 = knapsack(scores, layers, target_bits=3.8, level="op", tolerance=0.05)
    built = record(31, c1.options, c1.avg_bits, 0.1, source="constructed:knapsack",
                   values={"predicted_score": c1.predicted, "target_bits": 3.5})
    nan = record(32, {n: "uaq-3" for n in names}, 3.03, math.nan)
    is_png(pareto_png([*recs, uni, built, nan], objective="err", constructions=[c1, c2]), 10000)
    is_png(pareto_png(recs, objective="err"), 10000)  # the old call
    is_png(pareto_png([], objective="err"))
    is_png(pareto_png([], objective="err", constructions=[c1]))
    assert "Pareto front" in status_text([*recs, built], objective="err")


def test_report_json_is_strict_and_text_readable():
    rng = np.random.default_rng(4)
    layers, op_types, scores = model(rng)
    i = next(k for k, s in enumerate(scores) if s.unit == "blocks.0.sa-q" and s.variant == ("kmeans_a-4",))
    scores[i] = dataclasses.replace(scores[i], score=math.nan)
    names = [la.name for la in layers]
    c = knapsack(scores, layers, target_bits=3.6, level="op", tolerance=0.05)
    p = paper_rule(scores, layers, level="op")
    recs = [record(i, {n: str(rng.choice(OPTIONS)) for n in names}, 3 + rng.random(), float(1 + rng.random()))
            for i in range(20)]
    recs.append(record(20, c.options, c.avg_bits, 0.5, "constructed:knapsack", {"predicted_score": c.predicted}))
    recs.append(record(21, {n: "kmeans_a-3" for n in names}, 3.0, math.nan, "constructed:paper",
                       {"predicted_score": math.inf}))
    quality = {"hop 0": {"srcc": 0.8, "ndcg": math.nan}, "mean": {"srcc": np.float32(0.7)}}
    rep = report_json(unit_scores=scores, records=recs, constructions=[c, p], predictor_quality=quality,
                      op_types=op_types, objective="err", top=3)
    text = report_dumps(rep)
    json.dumps(rep, allow_nan=False)
    assert json.loads(text) == rep
    assert rep["predictor_quality"]["hop 0"]["ndcg"] is None
    assert set(rep["sensitive_units"]) == {"op", "block"}
    assert len(rep["sensitive_units"]["op"]["most"]) == 3
    assert rep["sensitive_units"]["op"]["most"][0]["op_type"] == "FF2"  # the widest spread
    assert rep["bits_by_op_type"]["SA-Q"]["frac_3bit"] == 1.0
    assert rep["bits_by_op_type"]["FF2"]["frac_3bit"] == 0.0
    assert rep["constructions"][0]["measured"] == 0.5 and rep["constructions"][0]["record_id"] == 20
    assert any(b["label"] == "constructed:paper" for b in rep["constructions"])  # journal-only construction
    recs_text = " ".join(rep["recommendations"])
    assert "SA-Q tolerates 3 bits" in recs_text and "keep FF2 at 4 bits" in recs_text
    assert "most sensitive block category: ff" in recs_text
    out = report_text(rep)
    for needle in ("most sensitive op-level units", "predictor quality", "constructed configs", "recommendations",
                   "SA-Q tolerates 3 bits"):
        assert needle in out
    # empty inputs
    empty = report_json()
    assert json.loads(report_dumps(empty)) == empty
    assert "no unit scores" in report_text(empty)
    with pytest.raises(ValueError):
        report_dumps({"x": math.nan})


def test_figures_share_one_readable_canvas():
    """Every figure has the same pixel size (ComfyUI pads a node's image batch to the largest one, which shrank the
    smaller figures) at the report's DPI, whatever the number of groups or configs drawn."""
    from qua2sedimo.search.report import FIGURE_DPI, FIGURE_INCHES

    rng = np.random.default_rng(5)
    layers, op_types, scores = model(rng)
    names = [la.name for la in layers]
    many_blocks = {"op_type": {"SA-Q": [0.1, 0.2]}, "block_index": {str(i): [float(i), 0.5] for i in range(40)}}
    configs = {f"config {i}": {n: str(rng.choice(OPTIONS)) for n in names} for i in range(7)}
    recs = [record(i, configs["config 0"], 3 + rng.random(), float(1 + rng.random())) for i in range(5)]
    pngs = [*insight_figures(aggregate_insights(scores)).values(), *insight_figures(many_blocks).values(),
            chosen_options_png(configs, op_types), chosen_options_png(dict(list(configs.items())[:1]), op_types),
            chosen_options_png({}, op_types), pareto_png(recs, objective="err"), pareto_png([], objective="err")]
    want = (round(FIGURE_INCHES[1] * FIGURE_DPI), round(FIGURE_INCHES[0] * FIGURE_DPI))
    assert want[1] >= 1000 and 1.2 < want[1] / want[0] < 2.0  # wide enough to read, not a strip
    for png in pngs:
        assert png_to_array(png).shape[:2] == want


def test_report_text_has_sections():
    rng = np.random.default_rng(4)
    layers, op_types, scores = model(rng)
    names = [la.name for la in layers]
    c = knapsack(scores, layers, target_bits=3.6, level="op", tolerance=0.05)
    recs = [record(i, {n: str(rng.choice(OPTIONS)) for n in names}, 3 + rng.random(), float(1 + rng.random()))
            for i in range(20)]
    recs.append(record(20, c.options, c.avg_bits, 0.5, "constructed:knapsack", {"predicted_score": c.predicted}))
    rep = report_json(unit_scores=scores, records=recs, constructions=[c], objective="err", top=3,
                      predictor_quality={"final": {"gnn spearman": 0.81, "gnn kendall": 0.6}, "hop 0": {"x": 0.5}})
    lines = report_text(rep).split("\n")
    assert lines[0].startswith("# ") and "err" in lines[0]
    headings = [ln[3:] for ln in lines if ln.startswith("## ")]
    # 20 configs are fewer than a stable ranking needs: the warning comes first
    assert headings[:4] == ["WARNING", "search", "units", "most sensitive op-level units (score spread; best variant)"]
    assert headings[-3:] == ["predictor quality (held-out)", "constructed configs (predicted score → measured err)",
                             "recommendations"]
    for i, ln in enumerate(lines[1:], 1):  # a blank line before every heading; the rest is indented
        if ln.startswith("## "):
            assert lines[i - 1] == ""
        elif ln:
            assert ln.startswith("  ") and len(ln) <= 100 + 4, ln
    table = lines[lines.index("## predictor quality (held-out)") + 1:][:3]
    assert table[0].split() == ["gnn", "spearman", "gnn", "kendall", "x"]
    assert table[1].split() == ["final", "0.81", "0.6", "–"] and table[2].split() == ["hop", "0", "–", "–", "0.5"]
    recs_block = lines[lines.index("## recommendations") + 1:]
    assert sum(ln.startswith("  - ") for ln in recs_block) == len(rep["recommendations"])
    assert report_text(report_json()).split("\n")[:4] == ["# Qua²SeDiMo sensitivity report — objective: objective",
                                                          "", "## units", "  no unit scores"]


def test_report_warns_when_too_few_configs_or_a_poor_predictor():
    """Point 5 of the trained-model issue: a report over fewer configs than a stable ranking needs, or whose
    predictor ranks held-out configs poorly, says so in report.json, first in its text and on its figures."""
    from qua2sedimo.search import report as rp
    from qua2sedimo.search.quality import Correlation, PredictorQuality, QualityRow, RankCorrelations

    def quality(rho):
        cell = RankCorrelations(Correlation(rho), Correlation(rho / 2))
        return PredictorQuality(("gnn", "ridge"), (QualityRow("pooled", {"gnn": cell, "ridge": cell}),))

    rng = np.random.default_rng(6)
    layers, op_types, scores = model(rng)
    names = [la.name for la in layers]
    n = rp.STABLE_CONFIGS
    assert n >= 20  # the measured threshold (docs/benchmarks.md), not a token value
    recs = [record(i, {nm: str(rng.choice(OPTIONS)) for nm in names}, 3 + rng.random(), float(1 + rng.random()))
            for i in range(n)]
    enough = report_json(unit_scores=scores, records=recs, predictor_quality=quality(0.85), op_types=op_types)
    assert enough["warnings"] == []
    assert "WARNING" not in report_text(enough)
    few = report_json(unit_scores=scores, records=recs[:n - 1], predictor_quality=quality(0.85), op_types=op_types)
    assert len(few["warnings"]) == 1 and f"only {n - 1} configs evaluated" in few["warnings"][0]
    text = report_text(few)
    assert text.index("## WARNING") < text.index("## units") and f"at least {n} configs" in " ".join(text.split())
    poor = report_json(unit_scores=scores, records=recs, predictor_quality=quality(0.3), op_types=op_types)
    assert len(poor["warnings"]) == 1 and "ranks held-out configs poorly (Spearman 0.30" in poor["warnings"][0]
    zero = [dataclasses.replace(s, score=0.0) for s in scores]
    flat = report_json(unit_scores=zero, records=recs, predictor_quality=quality(0.85), op_types=op_types)
    assert any("every sensitivity score is 0" in w for w in flat["warnings"])
    # the figures carry the warning as a red banner; without one they stay as they were
    ins = aggregate_insights(scores)
    plain, marked = insight_figures(ins), insight_figures(ins, few["warnings"][0])
    for key in plain:
        a, b = png_to_array(plain[key]), png_to_array(marked[key])
        assert a.shape == b.shape
        def red(img):
            return (img[..., 0] > 0.6) & (img[..., 1] < 0.2) & (img[..., 2] < 0.2)

        assert red(b)[: b.shape[0] // 8].sum() > 50 and not red(a).any()
