"""Video models (5-D latents) through the normal code paths, beyond what tests/test_architectures.py runs for every
architecture: the image objective on frames, and sizes checked before the option table (the reference sampler used
to build 4-D latents and failed after the whole option table was built)."""

from __future__ import annotations

import pytest

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
def test_wan_search_image_objective(wan, tmp_path, monkeypatch, objective="image"):
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
