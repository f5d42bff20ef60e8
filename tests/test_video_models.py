"""Video models (5-D latents) through the normal code paths: a tiny Wan 2.1 text-to-video model built with ComfyUI's
own classes and detected by its own detection — Apply Config → sample → Save → Load → sample bit-identical, the
layer table (no layer of a block left as 'other'), and the search with both objectives (the reference sampler used
to build 4-D latents and failed after the whole option table was built)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

NAME, ARCH = "wan21_tiny", "wan"
KW = dict(steps=2, cfg=3.0, sampler_name="euler", scheduler="normal", width=64, height=64)


@pytest.fixture(scope="module")
def wan(comfy_inproc, tmp_path_factory):
    import comfy.sd
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge

    bridge.register_folders()
    files = tm.ensure_models(comfy_inproc.base / "models", [NAME])
    mp = comfy.sd.load_diffusion_model(str(files[f"diffusion_models/{NAME}.safetensors"]))
    assert type(mp.model.model_config).__name__ == "WAN21_T2V"
    return mp, tm.conditioning_for(ARCH, seed=1), tm.conditioning_for(ARCH, seed=2)


@pytest.mark.comfy_inproc
def test_wan_layer_table_classifies_every_block_layer(wan):
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.search.graph import layer_table

    table = layer_table(bridge.diffusion_model(wan[0]))
    counts = Counter((n.op_type, n.block_category) for n in table)
    assert not [n.name for n in table if n.block_category == "other"], counts
    per_block = Counter(n.block_index for n in table if n.block_index >= 0)
    assert per_block == {0: 10, 1: 10}, per_block  # q, k, v, o of self- and cross-attention, two FF layers
    assert counts[("CA-K", "cross-attn")] == 2 and counts[("FF-2", "feedforward")] == 2


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("mixed", [False, True], ids=["uniform-uaq4", "mixed"])
def test_wan_round_trip_is_bit_identical(wan, tmp_path, monkeypatch, mixed):
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import OPTIONS, QuantConfig, quantizable_layers

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "cache")
    mp, pos, neg = wan
    dm = bridge.diffusion_model(mp)
    names = [la.name for la in quantizable_layers(dm)]
    cfg = (QuantConfig.from_options(dm, {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(names)}) if mixed
           else QuantConfig.uniform(dm, "uaq-4"))
    qmp, summary = bridge.apply_config(mp, cfg)
    assert summary["bytes_after"] < summary["bytes_before"]
    lat1 = bridge.sample_latents(qmp, pos, neg, seed=3, **KW)
    assert lat1.ndim == 5 and lat1.shape[2] == 1 and torch.isfinite(lat1).all()
    path = tmp_path / "wan_q.safetensors"
    bridge.save_quantized(qmp, path)
    loaded = bridge.load_quantized(path)
    assert type(loaded.model.model_config) is type(mp.model.model_config)
    assert torch.equal(lat1, bridge.sample_latents(loaded, pos, neg, seed=3, **KW))


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("objective", ["denoise_error", "image"])
def test_wan_search(wan, tmp_path, monkeypatch, objective):
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import search_jobs as jobs

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "cache")
    mp, pos, neg = wan
    spec = jobs.SearchSpec(objective=objective, n_seeds=1, n_states=2, steps=2, width=64, height=64)
    ctx = jobs.prepare(mp, pos, neg, spec)
    names = [la.name for la in ctx.layers]
    primary = ctx.primary
    assert ctx.evaluate({n: "fp16" for n in names})[primary] < 1e-6
    w4 = ctx.evaluate({n: "uaq-4" for n in names})[primary]
    w3 = ctx.evaluate({n: "uaq-3" for n in names})[primary]
    assert 0 < w4 < w3
    res = jobs.run_job(ctx, tmp_path / "j.sqlite", max_configs=3, max_seconds=None, job=jobs.SearchJob("wan"))
    assert (res.status, res.new) == ("done", 3)


@pytest.mark.comfy_inproc
def test_bad_size_fails_before_the_option_table(wan, monkeypatch):
    from qua2sedimo.nodes import search_jobs as jobs

    def no_table(*a, **k):
        raise AssertionError("the option table was built before the size was checked")

    monkeypatch.setattr(jobs, "option_table", no_table)
    mp, pos, neg = wan
    with pytest.raises(ValueError, match="multiples of 8"):
        jobs.prepare(mp, pos, neg, jobs.SearchSpec(n_seeds=1, n_states=2, steps=2, width=60, height=64))
