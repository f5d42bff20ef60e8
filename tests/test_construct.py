import dataclasses
import itertools
import math
import time

import numpy as np
import pytest
import torch

from qua2sedimo.quant import accounting
from qua2sedimo.quant.config import QuantConfig
from qua2sedimo.quant.layer_table import LayerInfo, layers_fingerprint
from qua2sedimo.quant.options import OPTIONS
from qua2sedimo.search.construct import (
    PREDICTED_KEY,
    evaluate_constructions,
    knapsack,
    paper_rule,
    pareto_sweep,
)
from qua2sedimo.search.journal import Journal
from qua2sedimo.search.scores import VariantScore

EPS = 1e-9


US = VariantScore  # a unit score without size fields


def make_instance(rng, unit_sizes, *, dims=(8, 96), level=None, options=OPTIONS, uncovered=0):
    """Random layers (fp16 linears) grouped into units of the given sizes; every variant gets a random score
    (4-bit variants better on average, as real scores are)."""
    layers, scores = [], []
    for u, k in enumerate(unit_sizes):
        members = []
        for j in range(k):
            shape = (int(rng.integers(*dims)), int(rng.integers(*dims)))
            la = LayerInfo(f"u{u}.l{j}", "linear", shape, torch.float16)
            layers.append(la)
            members.append(la.name)
        lvl = level or ("block" if max(unit_sizes) > 1 else "op")
        for variant in itertools.product(options, repeat=k):
            bonus = 0.3 * sum(o.endswith("-4") for o in variant)
            scores.append(US(f"u{u}", lvl, "FF1", "ff", u, tuple(members), variant, float(rng.normal() + bonus)))
    for j in range(uncovered):
        layers.append(LayerInfo(f"free{j}", "linear", (int(rng.integers(*dims)), int(rng.integers(*dims))),
                                torch.float16))
    return layers, scores


def brute_force(layers, scores, acct="paper", default="uaq-4"):
    """All combinations: (avg bits or bytes, score sum) arrays."""
    by_name = {la.name: la for la in layers}
    units: dict[str, list[US]] = {}
    for s in scores:
        units.setdefault(s.unit, []).append(s)
    covered = {m for vs in units.values() for m in vs[0].members}
    fixed = sum(accounting.option_nbytes(la.shape, default, la.dtype, acct) for la in layers if la.name not in covered)
    per_unit = []
    for vs in units.values():
        per_unit.append([(sum(accounting.option_nbytes(by_name[m].shape, o, by_name[m].dtype, acct)
                              for m, o in zip(s.members, s.variant, strict=True)), s.score) for s in vs])
    n = sum(la.numel for la in layers)
    sizes, totals = [], []
    for combo in itertools.product(*per_unit):
        nbytes = fixed + sum(c for c, _ in combo)
        sizes.append(8 * nbytes / n if acct == "paper" else nbytes)
        totals.append(sum(s for _, s in combo))
    return np.array(sizes), np.array(totals)


def check_window(c, target, tol, layers):
    assert target - tol - EPS <= c.avg_bits <= target + EPS, (target, c.avg_bits)
    bits = accounting.average_bits((la.shape, c.options[la.name], la.dtype) for la in layers)
    assert bits == pytest.approx(c.avg_bits, abs=1e-12)
    assert set(c.options) == {la.name for la in layers}


def test_knapsack_matches_brute_force():
    rng = np.random.default_rng(0)
    n_checked = n_infeasible = 0
    for trial in range(24):
        sizes = [1, 1, 1, 1] if trial % 2 == 0 else [2, 1, 1]
        layers, scores = make_instance(rng, sizes, uncovered=trial % 3 == 0, level="op" if trial % 2 == 0 else "x")
        bits, total = brute_force(layers, scores)
        for target in rng.uniform(bits.min() - 0.03, bits.max() + 0.03, 6):
            tol = float(rng.choice([0.01, 0.03]))
            ok = (bits <= target + EPS) & (bits >= target - tol - EPS)
            if not ok.any():
                with pytest.raises(ValueError):
                    knapsack(scores, layers, target_bits=target, tolerance=tol)
                n_infeasible += 1
                continue
            c = knapsack(scores, layers, target_bits=target, tolerance=tol)
            check_window(c, target, tol, layers)
            assert c.exact
            assert c.predicted == pytest.approx(total[ok].max(), abs=1e-9)
            assert c.bound == pytest.approx(c.predicted)
            n_checked += 1
    assert n_checked > 50 and n_infeasible > 5


def test_byte_budget_matches_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(12):
        layers, scores = make_instance(rng, [1, 1, 1, 1, 1])
        nbytes, total = brute_force(layers, scores, acct="stored")
        for budget in rng.integers(int(nbytes.min()), int(nbytes.max()) + 1, 4):
            c = knapsack(scores, layers, max_bytes=int(budget))
            ok = nbytes <= budget
            assert c.nbytes <= budget
            assert c.nbytes == QuantConfig(c.options, layers).nbytes("stored")
            assert c.predicted == pytest.approx(total[ok].max(), abs=1e-9)
        with pytest.raises(ValueError, match="smallest achievable"):
            knapsack(scores, layers, max_bytes=int(nbytes.min()) - 1)


def test_bits_window_over_many_instances():
    """The result's b̄ is always in [target − tol, target], on the exact DP and on the Lagrangian path."""
    rng = np.random.default_rng(2)
    paths = set()
    for trial in range(10):
        n_units = int(rng.choice([30, 120, 300]))
        sizes = [1] * n_units if trial % 4 else [int(k) for k in rng.integers(1, 3, n_units // 6)]
        dims = (64, 1100) if trial % 2 else (16, 200)
        layers, scores = make_instance(rng, sizes, dims=dims, uncovered=2)
        lo_c = knapsack(scores, layers, max_bytes=10**15)  # any feasible config, to know the range
        assert lo_c.nbytes > 0
        for target in rng.uniform(3.05, 4.2, 4):
            target = float(round(target, 3))
            try:
                c = knapsack(scores, layers, target_bits=target)
            except ValueError as e:
                assert "ranges over" in str(e), e  # only out-of-range targets may fail here
                continue
            check_window(c, target, 0.01, layers)
            assert c.bound >= c.predicted - 1e-9
            paths.add(c.exact)
    assert paths == {True, False}


def test_infeasible_targets_name_the_range():
    rng = np.random.default_rng(3)
    layers, scores = make_instance(rng, [1] * 20, dims=(64, 256))
    with pytest.raises(ValueError, match=r"ranges over \[3\.\d+, \d\.\d+\]"):
        knapsack(scores, layers, target_bits=2.5)
    with pytest.raises(ValueError, match="ranges over"):
        knapsack(scores, layers, target_bits=6.0)
    with pytest.raises(ValueError, match="exactly one budget"):
        knapsack(scores, layers)
    with pytest.raises(ValueError, match="exactly one budget"):
        knapsack(scores, layers, target_bits=3.5, max_bytes=10**6)


def test_lower_bound_is_enforced_even_when_scores_prefer_fewer_bits():
    rng = np.random.default_rng(4)
    layers, scores = make_instance(rng, [1] * 40, dims=(64, 256))
    cheap = [US(s.unit, s.level, s.op_type, s.block_category, s.block_index, s.members, s.variant,
                1.0 if s.variant[0].endswith("-3") else -1.0) for s in scores]
    c = knapsack(cheap, layers, target_bits=4.0)
    check_window(c, 4.0, 0.01, layers)
    assert paper_rule(cheap, layers).avg_bits < 3.2


def test_paper_rule_top_variant_default_and_validation():
    rng = np.random.default_rng(5)
    layers, scores = make_instance(rng, [1, 2, 1], level="block", uncovered=2)
    c = paper_rule(scores, layers)
    for unit in {s.unit for s in scores}:
        best = max((s for s in scores if s.unit == unit), key=lambda s: s.score)
        assert c.units[unit] == best.variant
        assert all(c.options[m] == o for m, o in zip(best.members, best.variant, strict=True))
    assert c.options["free0"] == c.options["free1"] == "uaq-4"
    assert c.rule == "paper" and c.level == "block"
    assert c.predicted == pytest.approx(sum(max(s.score for s in scores if s.unit == u) for u in c.units))
    assert paper_rule(scores, layers, default="fp16").options["free0"] == "fp16"
    assert paper_rule(scores, layers, default={"free1": "kmeans_a-3"}).options["free1"] == "kmeans_a-3"
    # NaN scores are ignored
    nan = [US(s.unit, s.level, s.op_type, s.block_category, s.block_index, s.members, s.variant, math.nan)
           if s.unit == "u0" and s.variant != ("uaq-3",) else s for s in scores]
    assert paper_rule(nan, layers).options["u0.l0"] == "uaq-3"
    # validation
    op = [US("op0", "op", "FF1", "ff", 0, ("u0.l0",), (o,), 0.0) for o in OPTIONS]
    with pytest.raises(ValueError, match="several levels"):
        paper_rule(scores + op, layers)
    with pytest.raises(ValueError, match="disjoint"):
        paper_rule(scores + [US(s.unit, "block", "x", "y", 0, ("u0.l0",), s.variant, 0.0) for s in op], layers)
    assert paper_rule(scores + op, layers, level="op").options["u0.l0"] == "uaq-4"  # first of tied variants
    with pytest.raises(ValueError, match="not in the layer table"):
        paper_rule([US("x", "op", "a", "b", 0, ("nope",), ("uaq-4",), 1.0)], layers)
    with pytest.raises(ValueError, match="one option per member"):
        paper_rule([US("x", "op", "a", "b", 0, ("u0.l0",), ("uaq-4", "uaq-3"), 1.0)], layers)
    with pytest.raises(ValueError, match="invalid option"):
        paper_rule([US("x", "op", "a", "b", 0, ("u0.l0",), ("int4",), 1.0)], layers)
    with pytest.raises(ValueError, match="scored twice"):
        paper_rule([op[0], op[0]], layers)


def test_construction_to_config_and_sweep():
    rng = np.random.default_rng(6)
    layers, scores = make_instance(rng, [1] * 60, dims=(64, 300))
    sweep = pareto_sweep(scores, layers)
    targets = [c.target_bits for c in sweep]
    assert len(sweep) >= 8 and targets == sorted(targets)
    for c in sweep:
        check_window(c, c.target_bits, 0.01, layers)
        cfg = c.to_config(layers)
        assert cfg.avg_bits() == pytest.approx(c.avg_bits)
        assert cfg.nbytes() == c.nbytes
        assert cfg.meta["construction"]["rule"] == "knapsack"
        assert "@" in c.label
    preds = [c.predicted for c in sweep]
    assert preds[-1] > preds[0]  # more bits, better predicted quality (4-bit variants score higher)
    with pytest.raises(ValueError):
        sweep[0].to_config(layers[:-1])


def test_speed_1000_units_6_variants():
    rng = np.random.default_rng(7)
    layers, scores = make_instance(rng, [1] * 1000, dims=(256, 2600))
    t0 = time.perf_counter()
    c = knapsack(scores, layers, target_bits=3.6)
    seconds = time.perf_counter() - t0
    print(f"knapsack 1000 units × 6 variants: {seconds:.3f} s, gap to LP bound {c.bound - c.predicted:.4f}")
    check_window(c, 3.6, 0.01, layers)
    assert c.bound - c.predicted < 0.05 * abs(c.bound) + 1.0


def test_block_level_units_with_many_variants():
    rng = np.random.default_rng(8)
    layers, scores = make_instance(rng, [3] * 25 + [1] * 20, dims=(64, 600))
    t0 = time.perf_counter()
    for target in (3.3, 3.7, 4.0):
        c = knapsack(scores, layers, target_bits=target)
        check_window(c, target, 0.01, layers)
    print(f"3 block-level knapsacks (25 units × 216 variants + 20 × 6): {time.perf_counter() - t0:.3f} s")


def test_evaluate_constructions_into_journal(tmp_path):
    rng = np.random.default_rng(9)
    layers, scores = make_instance(rng, [1] * 6, dims=(16, 64))
    built = [paper_rule(scores, layers), *pareto_sweep(scores, layers, targets=[3.6, 3.9], tolerance=0.05)]
    calls = []

    def evaluate(options):
        calls.append(options)
        return {"err": sum(o.endswith("-3") for o in options.values()) / len(options)}

    with Journal.open(tmp_path / "j.sqlite", model_fingerprint=layers_fingerprint(layers), objective="err",
                      layer_names=[la.name for la in layers]) as j:
        recs = evaluate_constructions(j, built, evaluate, primary="err")
        assert [r.source for r in recs][:2] == ["constructed:paper", "constructed:knapsack"]
        for c, r in zip(built, recs, strict=True):
            assert r.options == c.options
            assert r.values[PREDICTED_KEY] == pytest.approx(c.predicted)
            assert r.avg_bits == pytest.approx(c.avg_bits)
        n = len(calls)
        again = evaluate_constructions(j, built, evaluate, primary="err")
        assert len(calls) == n and [r.id for r in again] == [r.id for r in recs]
        other = dataclasses.replace(built[0], options={la.name: "kmeans_a-3" for la in layers})
        with pytest.raises(ValueError, match="primary"):
            evaluate_constructions(j, [other], lambda o: {"x": 1.0}, primary="err")
