"""`make demo`'s job (``python -m qua2sedimo.demo``) end to end: real server, every output written.

The reference model is trained for a few steps only here (``$QUA2SEDIMO_DIGITS_STEPS``; its own cache entry), so
its digits are not recognisable; when the full training is in the cache, its FP samples must be."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SHORT_STEPS = 40
SAMPLES = 40


@pytest.mark.slow
@pytest.mark.comfy_server
def test_demo_writes_every_output(tmp_path, monkeypatch):
    from PIL import Image

    from qua2sedimo import demo
    from qua2sedimo.quant.format import read_header

    monkeypatch.setenv("QUA2SEDIMO_DIGITS_STEPS", str(SHORT_STEPS))
    summary = demo.main(["--out", str(tmp_path), "--samples", str(SAMPLES), "--search-configs", "12"])
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    for name in ("sample-uniform-w4.png", "sample-from-quantized.png"):
        assert Image.open(tmp_path / name).size == (384, 384)
    header = read_header(tmp_path / "model-mixed.q.safetensors")
    options = {i["option"] for i in header["layers"].values()}
    assert {"kmeans_c-3", "uaq-4"} <= options
    assert json.loads((tmp_path / "config-mixed.json").read_text())["format"] == "qua2sedimo.config"
    assert summary["quantized_file_bytes"] < 0.4 * summary["dense_file_bytes"]
    assert 3.0 < summary["workflows"]["mixed"]["avg_bits"] < 4.0
    search = summary["workflows"]["search"]
    assert search["evaluated"] == 12 and (tmp_path / "journal.sqlite").stat().st_size > 0
    assert Image.open(tmp_path / "search-pareto.png").size[0] > 100
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["evaluated"] == 12 and report["objective"] == "denoise_error"
    # 12 configs are too few for a stable ranking: the report, and the demo's summary, say so
    assert any("only 12 configs evaluated" in w for w in report["warnings"])
    assert summary["workflows"]["report"]["warnings"] == report["warnings"]
    assert set(report["predictor"]) >= {"spearman", "kendall", "baseline_spearman"}
    rules = {(c["rule"], c["target_bits"]) for c in report["constructed"]}
    assert {("knapsack", 3.5), ("knapsack", 4.0), ("paper", None)} <= rules
    assert all(c["objective"] is not None for c in report["constructed"])
    assert {"best_random_at_or_below_target", "uniform_uaq4", "uniform_uaq3"} <= set(report["baselines"])
    assert all((tmp_path / f).exists() for f in report["figures"].values())
    # the trained model: SD3 detected by ComfyUI, the short training, quality of four configs on the same seeds
    assert summary["training"]["steps"] == SHORT_STEPS
    assert "SD3" in summary["model"]
    quality = summary["quality"]
    assert quality["grid_rows"] == ["fp", "uniform-w4", "uniform-w3", "knapsack-3.5"]
    rows = quality["configs"]
    assert all(r["n"] == SAMPLES and r["fid"] > 0 and 0 <= r["accuracy"] <= 1 for r in rows.values())
    assert rows["fp"]["avg_bits"] is None
    assert 4.0 <= rows["uniform-w4"]["avg_bits"] < 4.5 and 3.0 <= rows["uniform-w3"]["avg_bits"] < 3.5
    assert rows["knapsack-3.5"]["avg_bits"] <= 3.5 + 1e-6
    assert quality["classifier_real_accuracy"] > 0.9
    grid = Image.open(tmp_path / quality["grid"])
    assert grid.size[1] > grid.size[0] / 20 * 4 * 0.9  # four rows of 20 digits


@pytest.mark.slow
@pytest.mark.comfy_inproc
def test_fully_trained_reference_draws_recognisable_digits(tmp_path, comfy_inproc):
    """The FP samples of the full training (when it is cached: `make demo` or the training command made it)."""
    from qua2sedimo import demo
    from qua2sedimo.nodes import reference_model as rm

    full = rm.cache_dir(demo.reference_cache(), rm.DEFAULT_STEPS) / rm.FILE_NAME
    if not full.is_file():
        pytest.skip(f"no fully trained reference model cached at {full} (make demo trains it)")
    cmd = [sys.executable, "-m", "qua2sedimo.nodes.reference_model", "evaluate", "--model", str(full),
           "--config", "fp", "--samples", "200", "--out", str(tmp_path), "--base-directory", str(comfy_inproc.base)]
    res = subprocess.run(cmd, capture_output=True, text=True, env=demo._reference_env(), cwd=demo.REPO.parent,
                         timeout=600)
    assert res.returncode == 0, res.stderr[-4000:]
    fp = json.loads(res.stdout.strip().splitlines()[-1])["variants"]["fp"]
    assert fp["accuracy"] >= 0.8, fp
    assert os.path.getsize(tmp_path / "digits-grid.png") > 0
