"""The 2025-26 architectures as first-class citizens, on every host the suite runs on.

* Tiny random-weight models built with ComfyUI's own classes and detected by its own loader (``tiny_models.SPECS``):
  Wan 2.1 / 2.2 (5-D video latents), SD3 and SD3.5 (MMDiT, SD3.5's second self-attention), HunyuanVideo (double and
  single stream, token refiner) and — on hosts whose detection accepts a small width — Flux dev / schnell. Each:
  Uniform and mixed Apply Config → sample → Save → Load → sample bit-identical; a short search; the report.
* Full-width architectures (Qwen-Image, Chroma, Lumina 2, Z-Image, Flux; ``tiny_models.FULL_WIDTH``): built on the
  meta device (no memory), detected by ComfyUI from their state dict, layer table checked. Opt-in
  (``QUA2SEDIMO_FULL_WIDTH=1``), with real random weights (one block each): the round trip, and a short search and
  the report through the Search and Sensitivity Report nodes.

Every layer table must classify every layer of the repeated blocks (no ``other``); the expected category counts are
written out per architecture below.
"""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest
import torch

TINY = ("wan21_tiny", "wan22_tiny", "sd3_tiny", "sd35_tiny", "hunyuan_video_tiny", "flux_dev_tiny",
        "flux_schnell_tiny")
KW = dict(steps=2, cfg=3.0, sampler_name="euler", scheduler="normal", width=64, height=64)

_DOUBLE = {"modulation": 2, "self-attn": 4, "feedforward": 4}  # img/txt: mod, qkv + proj, mlp.0 + mlp.2
_FLUX_GLOBAL = {"patchify": 1, "t-embed": 6, "c-embed": 1, "out-proj": 2}  # time_in, vector_in, guidance_in
# block category -> number of layers, per architecture (one block of each kind unless said)
EXPECTED: dict[str, dict[str, int]] = {
    "wan21_tiny": {"self-attn": 8, "cross-attn": 8, "feedforward": 4, "c-embed": 2, "t-embed": 3, "out-proj": 1},
    "sd3_tiny": {"patchify": 1, "t-embed": 2, "c-embed": 3, "out-proj": 2,
                 "self-attn": 7, "feedforward": 6, "modulation": 4},  # the last context block is pre-only
    "sd35_tiny": {"patchify": 1, "t-embed": 2, "c-embed": 3, "out-proj": 2,
                  "self-attn": 9, "feedforward": 6, "modulation": 4},  # + x_block.attn2 (self-attention)
    "hunyuan_video_tiny": {"t-embed": 8, "c-embed": 3, "out-proj": 2,  # + the token refiner's t_embedder
                           # 2 token-refiner blocks (mod, qkv + proj, mlp) + a double and a single block
                           "modulation": 2 + 2 + 1, "self-attn": 4 + 4, "feedforward": 4 + 4, "single-stream": 2},
    "flux_dev_tiny": {**_FLUX_GLOBAL, "modulation": 3, "self-attn": 4, "feedforward": 4, "single-stream": 2},
    "flux_schnell_tiny": {**_FLUX_GLOBAL, "t-embed": 4, "modulation": 3, "self-attn": 4, "feedforward": 4,
                          "single-stream": 2},
    "flux_dev_full": {**_FLUX_GLOBAL, "modulation": 3, "self-attn": 4, "feedforward": 4, "single-stream": 2},
    # Chroma: no per-block modulation layers; the approximator (12 layers) is a global embedder
    "chroma_full": {"patchify": 1, "c-embed": 1, "t-embed": 12, "out-proj": 1, "self-attn": 4, "feedforward": 4,
                    "single-stream": 2},
    "qwen_image_full": {"patchify": 1, "t-embed": 2, "c-embed": 1, "out-proj": 2, "modulation": 2, "self-attn": 8,
                        "feedforward": 4},
    # 2 noise refiners (with modulation), 2 context refiners, 1 main layer; SwiGLU w1/w2/w3
    "lumina2_full": {"patchify": 1, "t-embed": 2, "c-embed": 1, "out-proj": 2, "modulation": 3, "self-attn": 10,
                     "feedforward": 15},
    "zimage_full": {"patchify": 1, "t-embed": 2, "c-embed": 1, "out-proj": 2, "modulation": 3, "self-attn": 10,
                    "feedforward": 15},
}
EXPECTED["wan22_tiny"] = EXPECTED["wan21_tiny"]


def _version() -> str:
    import comfy_host

    return comfy_host.host_version()


def _check_table(name: str, table) -> None:
    assert not [n.name for n in table if n.block_category == "other" or n.op_type == "other"]
    assert dict(Counter(n.block_category for n in table)) == EXPECTED[name]
    ff = [n for n in table if n.block_category == "feedforward"]
    assert {n.op_type for n in ff} == {"FF-1", "FF-2"} and sum(n.op_type == "FF-2" for n in ff) * 2 <= len(ff) + 1
    # a block's index counts repeated blocks only (refiners included, global embedders excluded)
    blocks = sorted({(n.block_index, n.block) for n in table if n.block_index >= 0})
    assert [i for i, _ in blocks] == list(range(len(blocks))) and all(b for _, b in blocks)


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("name", ["flux_dev_full", "chroma_full", "qwen_image_full", "lumina2_full", "zimage_full"])
def test_full_width_detection_and_layer_table(comfy_inproc, name):
    import tiny_models as tm

    from qua2sedimo.search.graph import layer_table

    dm, detected = tm.build_meta(name)
    assert detected == tm.FULL_WIDTH[name].cls
    _check_table(name, layer_table(dm))


@pytest.fixture(scope="module", params=TINY)
def arch(request, comfy_inproc):
    import comfy.sd
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge

    name = request.param
    spec = tm.SPECS[name]
    if not spec.available_on(_version()):
        pytest.skip(f"{name}: ComfyUI {_version()}'s detection fixes this architecture's width (built on "
                    f"{', '.join(spec.hosts)}; the full width is checked by test_full_width_detection_and_layer_table)")
    bridge.register_folders()
    files = tm.ensure_models(comfy_inproc.base / "models", [name])
    mp = comfy.sd.load_diffusion_model(str(files[f"diffusion_models/{name}.safetensors"]))
    assert type(mp.model.model_config).__name__ == spec.cls and type(mp.model).__name__ == spec.model_base
    return name, mp, tm.conditioning_for(spec.arch, seed=1), tm.conditioning_for(spec.arch, seed=2)


@pytest.mark.comfy_inproc
def test_layer_table(arch):
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.search.graph import layer_table

    name, mp = arch[:2]
    _check_table(name, layer_table(bridge.diffusion_model(mp)))


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform-uaq4", "mixed"])
def test_round_trip_is_bit_identical(arch, tmp_path, monkeypatch, mixed):
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import OPTIONS, QuantConfig, quantizable_layers

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "cache")
    name, mp, pos, neg = arch
    dm = bridge.diffusion_model(mp)
    names = [la.name for la in quantizable_layers(dm)]
    cfg = (QuantConfig.from_options(dm, {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(names)}) if mixed
           else QuantConfig.uniform(dm, "uaq-4"))
    qmp, summary = bridge.apply_config(mp, cfg)
    assert summary["bytes_after"] < summary["bytes_before"]
    # the Conv3d patch embeddings of the video models stay dense and are listed as such
    conv3d = {"wan21_tiny": "patch_embedding", "wan22_tiny": "patch_embedding", "hunyuan_video_tiny": "img_in.proj"}
    assert [(d["name"], d["type"]) for d in summary["dense_only"]] == (
        [(conv3d[name], "Conv3d")] if name in conv3d else [])
    lat1 = bridge.sample_latents(qmp, pos, neg, seed=3, **KW)
    dense = bridge.sample_latents(mp, pos, neg, seed=3, **KW)
    assert lat1.shape == dense.shape and torch.isfinite(lat1).all() and not torch.equal(lat1, dense)
    path = tmp_path / f"{name}_q.safetensors"
    bridge.save_quantized(qmp, path)
    loaded = bridge.load_quantized(path)
    assert type(loaded.model.model_config) is type(mp.model.model_config)
    assert torch.equal(lat1, bridge.sample_latents(loaded, pos, neg, seed=3, **KW))


@pytest.mark.comfy_inproc
def test_search_and_report(arch, tmp_path, monkeypatch):
    """A short search and the report at the node's defaults (5 folds on 10 configs): scores are not all zero and
    the uniform baselines are filled."""
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import report_jobs
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.search.report import report_dumps

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "cache")
    name, mp, pos, neg = arch
    spec = jobs.SearchSpec(n_seeds=1, n_states=2, steps=2, width=64, height=64)
    ctx = jobs.prepare(mp, pos, neg, spec)
    names = [la.name for la in ctx.layers]
    assert ctx.evaluate({n: "fp16" for n in names})[ctx.primary] < 1e-6
    assert 0 < ctx.evaluate({n: "uaq-4" for n in names})[ctx.primary] < ctx.evaluate(
        {n: "uaq-3" for n in names})[ctx.primary]
    path = tmp_path / "j.sqlite"
    res = jobs.run_job(ctx, path, max_configs=10, max_seconds=None, job=jobs.SearchJob(name))
    assert (res.status, res.new) == ("done", 10)
    handle = jobs.SearchHandle(str(path), ctx.journal_kwargs, ctx.primary, name, 10, ctx)
    a = report_jobs.analyse(handle, targets=(3.5, 4.0), folds=5, epochs=20)
    assert len(a.graph.layers) == len(names) and not a.graph.meta["unexecuted"]
    report = json.loads(report_dumps(a.report))
    assert any(s.score != 0 for s in a.scores), "every sensitivity score is 0"
    assert report["baselines"]["uniform_uaq4"]["objective"] < report["baselines"]["uniform_uaq3"]["objective"]
    assert all(m["objective"] is not None for m in report["constructed"])
    assert {s.block_category for s in a.scores} == set(EXPECTED[name])  # every category has its units scored


FULL_SAMPLE = {"flux_dev_full": "flux", "chroma_full": "flux", "qwen_image_full": "qwen", "lumina2_full": "lumina2",
               "zimage_full": "zimage"}


def _load_full_width(name: str, tmp_path):
    """A full-width model built with ComfyUI's classes, saved, loaded by ComfyUI's loader (detected as its class),
    and its two prompts."""
    import comfy.sd
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge

    bridge.register_folders()
    src = tmp_path / f"{name}.safetensors"
    tm.build_and_save(name, src)
    mp = comfy.sd.load_diffusion_model(str(src))
    assert type(mp.model.model_config).__name__ == tm.FULL_WIDTH[name].cls
    return mp, tm.conditioning_for(FULL_SAMPLE[name], seed=1), tm.conditioning_for(FULL_SAMPLE[name], seed=2)


@pytest.mark.comfy_inproc
@pytest.mark.skipif(os.environ.get("QUA2SEDIMO_FULL_WIDTH") != "1",
                    reason="full-width round trips (0.4-0.9 B weights, minutes each): set QUA2SEDIMO_FULL_WIDTH=1")
@pytest.mark.parametrize("name", list(FULL_SAMPLE))
def test_full_width_round_trip(comfy_inproc, tmp_path, monkeypatch, name):
    """Opt-in: a real full-width model (one block) through Apply Config (uniform K-Means-C 4-bit, the fast
    quantizer) → sample → Save → Load → sample, bit-identical."""

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "cache")
    mp, pos, neg = _load_full_width(name, tmp_path)
    dm = bridge.diffusion_model(mp)
    qmp, summary = bridge.apply_config(mp, QuantConfig.uniform(dm, "kmeans_c-4"))
    assert summary["bytes_after"] < 0.3 * summary["bytes_before"]
    kw = dict(KW, steps=1)
    lat = bridge.sample_latents(qmp, pos, neg, seed=3, **kw)
    assert torch.isfinite(lat).all()
    bridge.save_quantized(qmp, tmp_path / "q.safetensors")
    assert torch.equal(lat, bridge.sample_latents(bridge.load_quantized(tmp_path / "q.safetensors"), pos, neg,
                                                  seed=3, **kw))


def _node(cls, node_id: str):
    """A node class as ComfyUI's executor hands it over: its hidden inputs set (on a copy)."""
    from comfy_api.latest import io

    return type(cls.__name__, (cls,), {"hidden": io.HiddenHolder.from_dict({"UNIQUE_ID": node_id})})


FULL_SEARCH_CONFIGS = 10  # the Sensitivity Report node's 5 folds need 2 × 5 configs
# UAQ and K-Means-C at 3 and 4 bits: all six options (K-Means-A, about half of the option table's time, included)
# took more than 6 min per model on the shared 2-core machine (docs/benchmarks.md, "Full-width architectures")
FULL_SEARCH_METHODS = ("uaq", "kmeans_c")


@pytest.mark.comfy_inproc
@pytest.mark.skipif(os.environ.get("QUA2SEDIMO_FULL_WIDTH") != "1",
                    reason="full-width searches (0.4-0.9 B weights, minutes each): set QUA2SEDIMO_FULL_WIDTH=1")
@pytest.mark.parametrize("name", list(FULL_SAMPLE))
def test_full_width_search_and_report(comfy_inproc, tmp_path, monkeypatch, name):
    """Opt-in: a short search and the report on a real full-width model (one block), the way a user runs them: the
    Search node ('wait', the default denoise_error objective, 10 configs — the fewest the report's 5 folds accept —,
    64 px, 2 steps, 2 trajectory states) journals the configs, then the Sensitivity Report node (its defaults)
    trains, scores, measures and writes the report and its figures. Options: a subset, UAQ and K-Means-C at 3 and 4
    bits (``FULL_SEARCH_METHODS``), set where the node takes its option set: with all six the search took more than
    6 min per model on the shared 2-core test machine. Prints the timings and the layer-classification counts per
    category (docs/benchmarks.md, "Full-width architectures")."""
    import math
    import subprocess
    import time

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import report_jobs, search_nodes
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.nodes.search_nodes import Search, SensitivityReport
    from qua2sedimo.search.journal import Journal
    from qua2sedimo.search.sampling import option_set

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "cache")  # a fresh option table, measured
    monkeypatch.setattr(bridge, "journal_dir", lambda: tmp_path / "journals")
    monkeypatch.setattr(bridge, "output_dir", lambda: tmp_path / "output")
    table_s: list[float] = []
    real_table = jobs.option_table

    def timed_table(*a, **k):
        t0 = time.perf_counter()
        try:
            return real_table(*a, **k)
        finally:
            table_s.append(time.perf_counter() - t0)

    monkeypatch.setattr(jobs, "option_table", timed_table)
    options = option_set(FULL_SEARCH_METHODS)
    monkeypatch.setattr(search_nodes, "option_set", lambda: options)
    mp, pos, neg = _load_full_width(name, tmp_path)

    t0 = time.perf_counter()
    handle, status = _node(Search, "search").execute(
        mp, pos, neg, objective="denoise_error", configs=FULL_SEARCH_CONFIGS, minutes=0.0, seed=0, mode="wait",
        journal=name, steps=2, width=64, height=64, n_states=2, n_seeds=1, cfg=3.0).result
    search_s = time.perf_counter() - t0
    assert status.startswith("done"), status
    with Journal.open(handle.journal, readonly=True,
                      **{k: v for k, v in handle.journal_kwargs.items() if k != "layer_names"}) as j:
        records = j.records(source="random")
        config_s = sum(r.timings.get("evaluate", 0.0) for r in records)
    print(f"\nFULL-WIDTH-SEARCH-PHASE {name} {_version()}: search {search_s:.1f} s, option table {table_s} s, "
          f"configs {config_s:.1f} s, {len(records)} configs", flush=True)
    assert len(records) == FULL_SEARCH_CONFIGS
    bad = [(r.primary, r.avg_bits) for r in records if not (math.isfinite(r.primary) and r.primary > 0
                                                            and 3 <= r.avg_bits < 5)]
    assert not bad, bad
    assert all(math.isfinite(v) for r in records for v in r.values.values())
    assert handle.context.journal_kwargs["settings"]["options"] == list(options) and len(table_s) == 1

    t0 = time.perf_counter()
    _, text = _node(SensitivityReport, "report").execute(handle, targets="3.5, 4.0", seed=0,
                                                         filename_prefix="qua2sedimo/report").result
    report_s = time.perf_counter() - t0
    report_path = tmp_path / "output" / text.rsplit("report: ", 1)[1].strip()
    report = json.loads(report_path.read_text())
    a = report_jobs.analyse(handle, targets=(3.5, 4.0), seed=0)  # the node's analysis (cached, not trained again)
    assert a.seconds and report["evaluated"] == FULL_SEARCH_CONFIGS

    # the layer table: every layer classified, no layer of a main block (nor any other) in `other`
    counts = dict(Counter(n.block_category for n in a.graph.layers))
    _check_table(name, a.graph.layers)
    assert "other" not in report["categories"].get("block_category", {}), report["categories"].keys()
    # unit scores finite (and not all 0), baselines and constructions measured, figures written
    assert a.scores and all(math.isfinite(s.score) for s in a.scores)
    assert any(s.score != 0 for s in a.scores), "every sensitivity score is 0"
    assert {s.block_category for s in a.scores} == set(EXPECTED[name])
    base = report["baselines"]
    assert 0 < base["uniform_uaq4"]["objective"] < base["uniform_uaq3"]["objective"]
    assert all(m["objective"] is not None and math.isfinite(m["objective"]) for m in report["constructed"])
    assert set(report["figures"]) == set(a.figures) and len(a.figures) >= 3
    for fig in report["figures"].values():
        assert (report_path.parent / fig).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    figures = dict(model=name, host=_version(), options=list(options), configs=len(records),
                   search_s=round(search_s, 1), option_table_s=round(table_s[0], 1), configs_s=round(config_s, 1),
                   report_s=round(report_s, 1), report_steps=a.seconds, layers=len(a.graph.layers),
                   categories=counts, uptime=load)
    print(f"\nFULL-WIDTH-SEARCH {json.dumps(figures)}")
