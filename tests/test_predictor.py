"""GNN predictor and ridge baseline on synthetic journals of a traced toy DiT (fast, CPU)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from toys import FAST, make_synthetic

from qua2sedimo.quant.accounting import option_nbytes
from qua2sedimo.quant.options import OPTIONS
from qua2sedimo.search.journal import Record
from qua2sedimo.search.predictor import (
    GNN,
    BaselineEnsemble,
    FeatureBuilder,
    GATv2,
    PredictorConfig,
    PredictorEnsemble,
    TargetTransform,
    hop_pool_matrix,
    lambdarank_loss,
    make_folds,
    soft_spearman_loss,
    train_baseline,
    train_predictor,
    training_loss,
    with_self_loops,
)
from qua2sedimo.search.quality import compare
from qua2sedimo.search.report import report_json, report_text

# ------------------------------------------------------------------------------------------- synthetic data


@pytest.fixture(scope="module")
def data():
    return make_synthetic()


@pytest.fixture(scope="module")
def trained(data):
    graph, errors, records = data
    fb = FeatureBuilder(graph, errors)
    return (train_predictor(graph, fb, records, PredictorConfig(seed=0, **FAST)),
            train_baseline(fb, records, PredictorConfig(folds=3, seed=0)))


# ------------------------------------------------------------------------------------------------ features
def test_features_gather(data):
    graph, errors, records = data
    fb = FeatureBuilder(graph, errors)
    assert fb.options == (*OPTIONS, "fp16")
    x = fb([records[0].options, records[1].options])
    assert x.shape == (2, len(graph.nodes), fb.n_features)
    col = {n: i for i, n in enumerate(fb.feature_names)}
    for la in graph.layers:
        row = x[0, graph.index(la.name)]
        method, bits = records[0].options[la.name].split("-")
        assert row[col[f"method:{method}"]] == 1 and row[col[f"bits:{bits}"]] == 1 and row[col["is_layer"]] == 1
        assert row[col[f"op:layer:{la.op_type}"]] == 1
        opt, dtype = records[0].options[la.name], getattr(torch, la.dtype)
        ratio = option_nbytes(la.shape, opt, dtype) / option_nbytes(la.shape, "fp16", dtype)
        assert row[col["size_ratio"]] == pytest.approx(ratio)  # Q/F, paper accounting (tiny layers: overhead)
    combine = [i for i, n in enumerate(graph.nodes) if n.kind == "combine"]
    assert combine and float(x[:, combine].sum(-1).max()) == 1.0  # only the op one-hot
    # fp16 keeps the full size and the lowest error; a lower-error option has a lower error feature
    fp = fb([{la.name: "fp16" for la in graph.layers}])[0, graph.index("final_layer")]
    assert fp[col["size_ratio"]] == 1 and fp[col["method:fp16"]] == 1 and fp[col["bits:16"]] == 1
    e = errors["final_layer"]
    a, b = sorted(OPTIONS, key=e.get)[:2]
    xa, xb = fb([{**records[0].options, "final_layer": o} for o in (a, b)])[:, graph.index("final_layer")]
    assert fp[col["log_error"]] < xa[col["log_error"]] < xb[col["log_error"]]
    with pytest.raises(ValueError, match="misses layer"):
        fb.encode([{"x_embedder": "uaq-4"}])
    with pytest.raises(ValueError, match="unknown option"):
        fb.encode([{**records[0].options, "final_layer": "uaq-2"}])
    with pytest.raises(ValueError, match="no errors for"):
        FeatureBuilder(graph, {"x_embedder": errors["x_embedder"]})


def test_gatv2_matches_pyg():
    pyg = pytest.importorskip("torch_geometric.nn")
    torch.manual_seed(0)
    edges = [(0, 1), (0, 2), (1, 3), (2, 3), (3, 4), (1, 4), (5, 6)]
    mine, ref = GATv2(5, 8), pyg.GATv2Conv(5, 8)
    ref.load_state_dict(mine.state_dict())
    x = torch.randn(3, 7, 5)
    src, dst = with_self_loops(edges, 7)
    expect = torch.stack([ref(x[b], torch.tensor(edges).T) for b in range(3)])
    torch.testing.assert_close(mine(x, src, dst), expect, atol=1e-5, rtol=1e-5)


# -------------------------------------------------------------------------------------------------- losses
def test_soft_spearman_and_lambdarank_losses():
    y = torch.linspace(0, 1, 12)
    assert soft_spearman_loss(y * 3, y) < 0.05 < 1.9 < soft_spearman_loss(-y, y)
    two = torch.stack([y, -y], 1)  # per-column losses, averaged
    assert torch.isclose(soft_spearman_loss(two, y), (soft_spearman_loss(y, y) + soft_spearman_loss(-y, y)) / 2)
    rel = torch.tensor([3.0, 0.0, 1.0, 2.0])
    assert lambdarank_loss(rel.clone(), rel) < lambdarank_loss(-rel, rel)
    # the gradient is the LambdaRank λ: Σ_j |ΔNDCG_ij|·(−σ(s_j − s_i)) over pairs where i is more relevant
    s = torch.tensor([0.3, 1.2, -0.5, 0.1], requires_grad=True)
    lambdarank_loss(s, rel).backward()
    with torch.no_grad():
        z = (s - s.mean()) / (s.std() + 1e-8)
        pos = torch.empty(4)
        pos[torch.argsort(z, descending=True)] = torch.arange(1.0, 5.0)
        gain, disc = 2 ** rel - 1, 1 / torch.log2(1 + pos)
        ideal = (gain.sort(descending=True).values / torch.log2(torch.arange(2.0, 6.0))).sum()
        lam = torch.zeros(4)
        n_pairs = 0
        for i in range(4):
            for j in range(4):
                if rel[i] > rel[j]:
                    w = abs(gain[i] - gain[j]) * abs(disc[i] - disc[j]) / ideal * torch.sigmoid(z[j] - z[i])
                    lam[i] -= w
                    lam[j] += w
                    n_pairs += 1
        lam /= n_pairs
        jac = torch.autograd.functional.jacobian(lambda v: (v - v.mean()) / (v.std() + 1e-8), s.detach())
    torch.testing.assert_close(s.grad, jac.T @ lam)


def test_ranking_gradients_are_applied(data):
    graph, errors, records = data
    fb = FeatureBuilder(graph, errors)
    pool, _ = hop_pool_matrix(graph, 4)
    src, dst = with_self_loops(graph.edges, len(graph.nodes))
    v = np.array([r.primary for r in records[:32]])
    t = TargetTransform.fit(v)
    torch.manual_seed(0)
    model = GNN(fb.n_features, pool)
    x, z = fb([r.options for r in records[:32]]), torch.from_numpy(t(v)).float()
    for ranking in ("spearman", "lambdarank", "hybrid"):
        model.zero_grad()
        training_loss(model, x, z, src, dst, t, ranking, 0.0, 1.0, range(5)).backward()  # ranking term only
        assert all(float(p.grad.abs().sum()) > 0 for p in model.convs.parameters()), ranking
        assert all(p.grad is None or float(p.grad.abs().sum()) == 0 for p in model.head.parameters())
    # training on the ranking loss alone makes the hop embedding norms rank the configs
    model.eval()
    with torch.no_grad():
        norms = model.pool(model.node_embeddings(x, src, dst)).abs().sum(-1)
    before = np.mean([stats.spearmanr(norms[:, m], z).statistic for m in range(5)])
    ens = train_predictor(graph, fb, records, PredictorConfig(seed=1, mse_weight=0.0, ranking="spearman", **FAST))
    after = [h["spearman"]["mean"] for h in ens.metrics["hops"]]
    assert np.mean(after) > before + 0.3 and max(after) > 0.85, (before, after)


# ------------------------------------------------------------------------------------------------ training
def test_predictor_learns_and_beats_nothing(trained):
    ens, ridge = trained
    assert isinstance(ens, PredictorEnsemble) and len(ens.folds) == 3
    m = ens.metrics
    assert m["final"]["spearman"]["mean"] > 0.85, m["final"]
    assert m["pooled"]["spearman"] > 0.85 and m["final"]["kendall"]["mean"] > 0.6
    assert len(m["hops"]) == 5 and m["hops"][0]["spearman"]["mean"] > 0.8
    assert all(f["n_test"] + f["n_train"] + f["n_val"] == 160 for f in m["folds"])
    assert ens.rho.shape == (3, 5) and all(np.all(f.sigma > 0) for f in ens.folds)
    assert ridge.metrics["final"]["spearman"]["mean"] > 0.85
    table = compare(ens, ridge)
    assert [r.metric for r in table.rows] == ["final", "pooled", "hop 0", "hop 1", "hop 2", "hop 3", "hop 4"]
    assert table.rows[2].cells["ridge"] is None and "gnn ρ / τ" in table.text


def test_predict_units_and_embeddings(trained, data):
    ens, ridge = trained
    _, _, records = data
    cfgs = [r.options for r in records[:20]]
    pred, truth = ens.predict(cfgs), np.array([r.primary for r in records[:20]])
    assert pred.shape == (20,) and np.all(pred > 0)
    assert 0.2 < np.median(pred / truth) < 5  # back in the objective's own units
    assert ridge.predict(cfgs).shape == (20,)
    n_nodes = len(ens.graph.nodes)
    assert ens.hop_embeddings(cfgs[:3]).shape == (3, 3, 5, n_nodes, 64)
    assert ens.graph_embeddings(cfgs[:3]).shape == (3, 3, 5, 64)


def test_deterministic_with_seed(data):
    graph, errors, records = data
    fb = FeatureBuilder(graph, errors)
    kw = dict(folds=2, epochs=6, min_epochs=6, patience=6, seed=3)
    a, b = (train_predictor(graph, fb, records, PredictorConfig(**kw)) for _ in range(2))
    cfgs = [r.options for r in records[:10]]
    np.testing.assert_array_equal(a.predict(cfgs), b.predict(cfgs))
    assert a.metrics["folds"] == b.metrics["folds"]
    c = train_predictor(graph, fb, records, PredictorConfig(**{**kw, "seed": 4}))
    assert not np.array_equal(a.predict(cfgs), c.predict(cfgs))


def test_few_configs_use_fewer_folds_so_held_out_ranks_are_defined():
    """Node defaults (10 configs, 5 folds) used to hold out 2 configs per fold: NaN Spearman, all scores 0."""
    from qua2sedimo.search.predictor import fold_count

    assert [fold_count(n, 5) for n in (4, 10, 14, 25, 200)] == [2, 2, 2, 5, 5]
    assert all(len(f.test) == 5 for f in make_folds(10, 5, 0, 0.15))
    with pytest.raises(ValueError, match="folds must be"):
        fold_count(10, 1)


def test_folds_are_shared():
    s = make_folds(50, 5, 0, 0.15)
    tests = np.concatenate([f.test for f in s])
    assert sorted(tests.tolist()) == list(range(50))
    for f in s:
        assert not set(f.train) & set(f.val) and not (set(f.train) | set(f.val)) & set(f.test)
    assert all(np.array_equal(a.test, b.test) for a, b in zip(s, make_folds(50, 5, 0, 0.15), strict=True))


def test_save_load_round_trip(trained, data, tmp_path):
    ens, ridge = trained
    _, _, records = data
    path = ens.save(tmp_path / "p.safetensors")
    back = PredictorEnsemble.load(path)
    cfgs = [r.options for r in records[:15]]
    np.testing.assert_allclose(back.predict(cfgs), ens.predict(cfgs), rtol=1e-6)
    assert back.metrics == ens.metrics and back.hyper == ens.hyper
    np.testing.assert_array_equal(back.rho, ens.rho)
    rb = BaselineEnsemble.from_dict(ridge.to_dict(), back.features)
    np.testing.assert_allclose(rb.predict(cfgs), ridge.predict(cfgs))
    eff = ridge.effects()
    assert set(eff) == {la.name for la in ens.graph.layers}
    ff = eff["blocks.0.mlp.2"]
    assert ff["kmeans_c-4"] > ff["kmeans_a-3"]  # the low-error option of a sensitive layer helps
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError):
        PredictorEnsemble.load(bad)


def test_bad_inputs(data):
    graph, errors, records = data
    fb = FeatureBuilder(graph, errors)
    with pytest.raises(ValueError, match="at least 10"):
        train_predictor(graph, fb, records[:5])
    with pytest.raises(ValueError, match="ranking must be"):
        train_predictor(graph, fb, records, PredictorConfig(ranking="ndcg"))
    nan = [Record(r.id, r.idx, r.config_key, r.options, r.avg_bits, 0, {}, float("nan"), {}, "random", 0.0)
           for r in records[:20]]
    with pytest.raises(ValueError, match="finite objective"):
        train_baseline(fb, nan)


def test_report_holds_the_predictor_quality(trained):
    """The report's predictor section is compare()'s table; it used to be empty (the report looked rows up by
    keys compare() never wrote)."""
    ens, ridge = trained
    rep = report_json(predictor_quality=compare(ens, ridge))
    pq = rep["predictor_quality"]
    assert list(pq) == ["final", "pooled", "hop 0", "hop 1", "hop 2", "hop 3", "hop 4"]
    assert pq["final"]["gnn spearman"] > 0.85 and pq["pooled"]["ridge spearman"] > 0.85
    assert pq["final"]["gnn spearman"] == pytest.approx(ens.metrics["final"]["spearman"]["mean"])
    assert set(pq["hop 0"]) == {"gnn spearman", "gnn kendall"}  # the ridge has no hops
    assert rep["predictor"]["spearman"] == pytest.approx(ens.metrics["pooled"]["spearman"])
    assert rep["predictor"]["baseline_kendall"] == pytest.approx(ridge.metrics["pooled"]["kendall"])
    text = report_text(rep)
    assert "predictor quality" in text and f"{pq['pooled']['gnn spearman']:.4g}" in text
