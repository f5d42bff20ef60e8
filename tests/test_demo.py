"""`make demo`'s job (``python -m qua2sedimo.demo``) end to end: real server, every output written."""

from __future__ import annotations

import json

import pytest


@pytest.mark.slow
@pytest.mark.comfy_server
def test_demo_writes_every_output(tmp_path, tiny_models):
    from PIL import Image

    from qua2sedimo import demo
    from qua2sedimo.quant.format import read_header

    summary = demo.main(["--out", str(tmp_path)])
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
    assert set(report["predictor"]) >= {"spearman", "kendall", "baseline_spearman"}
    rules = {(c["rule"], c["target_bits"]) for c in report["constructed"]}
    assert {("knapsack", 3.5), ("knapsack", 4.0), ("paper", None)} <= rules
    assert all(c["objective"] is not None for c in report["constructed"])
    assert {"best_random_at_or_below_target", "uniform_uaq4", "uniform_uaq3"} <= set(report["baselines"])
    assert all((tmp_path / f).exists() for f in report["figures"].values())
