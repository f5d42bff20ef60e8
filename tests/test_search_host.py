"""The search on the real ComfyUI host (in-process): preparation, evaluation, background job, status node."""

from __future__ import annotations

import time

import pytest


def _setup(tiny_models, tmp_path, monkeypatch, name="pixart_sigma_d1", arch="pixart"):
    import comfy.sd
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge

    bridge.register_folders()
    # the option-table cache is shared by the session (models/qua2sedimo/cache of the test base)
    monkeypatch.setattr(bridge, "journal_dir", lambda: tmp_path / "journals")
    mp = comfy.sd.load_diffusion_model(str(tiny_models[name]))
    return mp, tm.conditioning_for(arch, seed=1), tm.conditioning_for(arch, seed=2)


SMALL = dict(n_seeds=1, n_states=4, steps=4, width=384, height=384)  # PixArt needs ≥ 48 latent px


@pytest.mark.comfy_inproc
def test_denoise_error_search_and_resume(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.search.journal import Journal

    mp, pos, neg = _setup(tiny_models, tmp_path, monkeypatch)
    spec = jobs.SearchSpec(**SMALL)
    ctx = jobs.prepare(mp, pos, neg, spec)
    names = [la.name for la in ctx.layers]
    fp = ctx.evaluate({n: "fp16" for n in names})
    assert fp["denoise_error"] < 1e-6
    # no second copy of the model: the search's denoiser holds the MODEL's own parameter tensors
    from qua2sedimo.nodes import comfy_bridge as bridge

    own = dict(bridge.diffusion_model(mp).named_parameters())
    shared = dict(ctx.search_dm.named_parameters())
    assert shared.keys() == own.keys() and all(p.data_ptr() == own[n].data_ptr() for n, p in shared.items())
    w3 = ctx.evaluate({n: "uaq-3" for n in names})
    w4 = ctx.evaluate({n: "uaq-4" for n in names})
    assert 0 < w4["denoise_error"] < w3["denoise_error"]
    assert set(ctx.evaluate.last_timings) == {"swap", "forward"}

    path = tmp_path / "j.sqlite"
    job = jobs.SearchJob("t")
    res = jobs.run_job(ctx, path, max_configs=3, max_seconds=None, job=job)
    assert (res.status, res.new, job.status) == ("done", 3, "done")
    # the states are cached: a second prepare does not sample again, and the run resumes from the journal
    ctx2 = jobs.prepare(mp, pos, neg, spec)
    assert ctx2.journal_kwargs == ctx.journal_kwargs
    res = jobs.run_job(ctx2, path, max_configs=5, max_seconds=None, job=jobs.SearchJob("t2"))
    assert (res.done, res.new) == (5, 2)
    with Journal.open(path, readonly=True, **{k: v for k, v in ctx.journal_kwargs.items() if k != "layer_names"}) as j:
        recs = j.records()
    assert [r.idx for r in recs] == [0, 1, 2, 3, 4]
    assert all(0 < r.primary < 10 and 3 <= r.avg_bits < 5 for r in recs)
    # the input MODEL is untouched by the swaps
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConv2d, QuantLinear

    assert not any(isinstance(m, QuantLinear | QuantConv2d) for m in bridge.diffusion_model(mp).modules())


@pytest.mark.comfy_inproc
def test_image_objective_and_bad_input(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    import torch

    from qua2sedimo.nodes import search_jobs as jobs

    mp, pos, neg = _setup(tiny_models, tmp_path, monkeypatch)
    ctx = jobs.prepare(mp, pos, neg, jobs.SearchSpec(objective="image", **SMALL))
    names = [la.name for la in ctx.layers]
    assert ctx.evaluate({n: "fp16" for n in names})["image_nmse"] < 1e-10
    assert ctx.evaluate({n: "uaq-3" for n in names})["image_nmse"] > 0
    with pytest.raises(ValueError, match="positive: expected ComfyUI CONDITIONING"):
        jobs.prepare(mp, torch.zeros(3), neg, jobs.SearchSpec(**SMALL))
    with pytest.raises(ValueError, match="unknown objective 'fidd'"):
        jobs.SearchSpec(objective="fidd")


@pytest.mark.comfy_inproc
def test_a_batch_of_prompts_is_searched_whole(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    """Three prompts in one CONDITIONING: every one is sampled (one image per prompt and seed), not cropped to the
    first by ComfyUI's batch matching; the FP reference differs per prompt."""
    import torch

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import search_jobs as jobs

    mp, pos, neg = _setup(tiny_models, tmp_path, monkeypatch)
    g = torch.Generator().manual_seed(5)
    pos3 = [[torch.cat([pos[0][0], torch.randn(2, *pos[0][0].shape[1:], generator=g)]), dict(pos[0][1])]]
    assert bridge.conditioning_batch(pos3) == 3 and bridge.conditioning_batch(pos) == 1
    ctx = jobs.prepare(mp, pos3, neg, jobs.SearchSpec(objective="image", **SMALL))
    fp = ctx.reference.fp_latents
    assert fp.shape[0] == 3 and not torch.equal(fp[1], fp[2])
    one = bridge.sample_latents(mp, pos, neg, seed=SMALL.get("seed", 0), steps=SMALL["steps"], cfg=4.0,
                                sampler_name="euler", scheduler="normal", width=384, height=384)
    assert one.shape[0] == 1
    ctx = jobs.prepare(mp, pos3, neg, jobs.SearchSpec(**SMALL))
    assert {s.x.shape[0] for s in ctx.reference.states} == {3}
    names = [la.name for la in ctx.layers]
    assert ctx.evaluate({n: "uaq-3" for n in names})["denoise_error"] > 0


@pytest.mark.comfy_inproc
def test_background_job_stop_and_status(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.search.report import pareto_png, status_text

    mp, pos, neg = _setup(tiny_models, tmp_path, monkeypatch)
    ctx = jobs.prepare(mp, pos, neg, jobs.SearchSpec(**SMALL))
    path = tmp_path / "bg.sqlite"
    job = jobs.start_background(ctx, path, max_configs=1000, max_seconds=None)
    assert jobs.start_background(ctx, path, max_configs=1000, max_seconds=None) is job  # re-attach
    t0 = time.monotonic()
    while (job.progress is None or job.progress.done < 2) and time.monotonic() - t0 < 120:
        time.sleep(0.05)
    job.stop()
    job.wait(60)
    assert not job.running and job.status == "cancelled", job.error
    handle = jobs.SearchHandle(str(path), ctx.journal_kwargs, ctx.primary, job.key)
    with handle.open() as j:
        recs = j.records()
    assert len(recs) >= 2 and job.result.done == len(recs)
    text = status_text(recs, objective="denoise_error", target=1000, state=job.status)
    assert text.startswith(f"cancelled: {len(recs)}/1000") and "Pareto front" in text
    assert pareto_png(recs, objective="denoise_error")[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.comfy_inproc
def test_report_and_build_config(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    import json

    from qua2sedimo.nodes import report_jobs
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.quant import QuantConfig
    from qua2sedimo.search.report import report_dumps

    mp, pos, neg = _setup(tiny_models, tmp_path, monkeypatch)
    ctx = jobs.prepare(mp, pos, neg, jobs.SearchSpec(**SMALL))
    path = tmp_path / "r.sqlite"
    jobs.run_job(ctx, path, max_configs=16, max_seconds=None, job=jobs.SearchJob("r"))
    handle = jobs.SearchHandle(str(path), ctx.journal_kwargs, ctx.primary, "r", 16, ctx)
    a = report_jobs.analyse(handle, targets=(3.5, 4.0), folds=2, epochs=30)
    assert len(a.graph.layers) == len(ctx.layers)
    report = json.loads(report_dumps(a.report))
    measured = report["constructed"]
    assert [m["rule"] for m in measured] == ["knapsack", "knapsack", "paper"]
    for m, target in zip(measured, (3.5, 4.0, None), strict=True):
        assert m["objective"] is not None and m["objective"] > 0
        if target is not None:
            assert target - 0.01 <= m["avg_bits"] <= target
    assert report["baselines"]["uniform_uaq4"]["objective"] < report["baselines"]["uniform_uaq3"]["objective"]
    assert set(report["predictor"]) >= {"spearman", "kendall", "baseline_spearman"}
    assert {"final", "pooled", "hop 0"} <= set(report["predictor_quality"])  # the section is filled
    assert {"gnn spearman", "ridge spearman"} <= set(report["predictor_quality"]["final"])
    assert report["evaluated"] == 16 and report["objective"] == "denoise_error"
    assert set(report["baselines"]["best_random_at_or_below_target"]) == {"3.5", "4"}
    assert all(png[:4] == b"\x89PNG" for png in a.figures.values())
    assert report_jobs.analyse(handle, targets=(3.5, 4.0), folds=2, epochs=30) is a  # cached

    cfg, c, rec = report_jobs.build_config(handle, rule="knapsack", target_bits=3.7)
    assert isinstance(cfg, QuantConfig) and abs(cfg.avg_bits() - 3.7) <= 0.0100001 and rec.primary > 0


@pytest.mark.comfy_inproc
def test_ray_address_is_limited_to_what_the_owner_allowed(comfy_inproc, monkeypatch):
    from qua2sedimo.nodes.search_nodes import RAY_ADDRESSES_ENV, allowed_ray_address

    monkeypatch.delenv(RAY_ADDRESSES_ENV, raising=False)
    assert allowed_ray_address("") is None and allowed_ray_address(" local ") is None
    for hostile in ("auto", "127.0.0.9:6379", "ray://localhost:10001", "127.0.0.1:6379"):
        with pytest.raises(ValueError, match=RAY_ADDRESSES_ENV):
            allowed_ray_address(hostile)
    monkeypatch.setenv(RAY_ADDRESSES_ENV, "auto, ray://head.lan:10001")
    assert allowed_ray_address("auto") == "auto"
    assert allowed_ray_address(" ray://head.lan:10001 ") == "ray://head.lan:10001"
    with pytest.raises(ValueError, match="allowed now: auto, ray://head.lan:10001"):
        allowed_ray_address("ray://head.lan:10002")


@pytest.mark.comfy_inproc
def test_seeds_are_fixed_and_inputs_explained(comfy_inproc):
    """Seeds used to default to 'randomize' (re-queueing started a new run, 'stop' missed the running one); the
    options, act_bits, rules … and every output had no tooltip."""
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes.extension import NODES

    bridge.register_folders()
    for node in NODES:
        schema = node.define_schema()
        for inp in schema.inputs:
            if inp.id == "seed":
                assert inp.control_after_generate is False, node
        for inp in schema.inputs:
            if inp.id in ("option", "act_bits", "rules", "default", "mode", "journal", "rule", "target_bits", "seed"):
                assert inp.tooltip, (node.__name__, inp.id)
        assert all(out.tooltip for out in schema.outputs), node.__name__


NODE_INPUTS = dict(objective="denoise_error", minutes=0.0, seed=0, steps=4, width=384, height=384, n_states=4,
                   n_seeds=1, cfg=4.0)


def _search_node(node_id: str):
    """The Search node class as ComfyUI's executor hands it over: its hidden inputs set (on a copy)."""
    from comfy_api.latest import io

    from qua2sedimo.nodes.search_nodes import Search

    return type("Search", (Search,), {"hidden": io.HiddenHolder.from_dict({"UNIQUE_ID": node_id})})


def _counting_preparation(monkeypatch, gate=None) -> list:
    """Count calls of the search's preparation (and hold each one until ``gate`` is set, when given)."""
    from qua2sedimo.nodes import search_jobs as jobs

    calls: list[int] = []
    real = jobs.prepare_plan

    def counted(p, *, progress=None):
        calls.append(1)
        if gate is not None:
            assert gate.wait(120), "the test never released the preparation"
        return real(p, progress=progress)

    monkeypatch.setattr(jobs, "prepare_plan", counted)
    return calls


@pytest.mark.comfy_inproc
def test_busy_journal_fails_before_any_preparation(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    """Issue 16, defect 9: a second search on a journal another process writes used to fail only after the whole
    preparation (option table, FP states); the writer lock is now taken first."""
    from qua2sedimo.search.journal_file import JournalFile, JournalLocked

    mp, pos, neg = _setup(tiny_models, tmp_path, monkeypatch)
    calls = _counting_preparation(monkeypatch)
    (tmp_path / "journals").mkdir()
    other = JournalFile(tmp_path / "journals" / "busy.sqlite")  # another writer: its own lock (flock per open file)
    other.acquire_lock()
    try:
        for mode in ("wait", "background"):
            t0 = time.monotonic()
            with pytest.raises(JournalLocked, match="being written by another process"):
                _search_node("busy").execute(mp, pos, neg, configs=3, mode=mode, journal="busy", **NODE_INPUTS)
            assert time.monotonic() - t0 < 30 and calls == [], mode
    finally:
        other.release_lock()
    from qua2sedimo.nodes import search_jobs as jobs

    assert not any(job.running for job in jobs.JOBS.values())


@pytest.mark.comfy_inproc
def test_background_returns_at_once_and_reattach_or_stop_never_prepare(comfy_inproc, tiny_models, tmp_path,
                                                                      monkeypatch):
    """Issue 16, browser item 4: 'background' held the queue while preparing, and every re-attach or 'stop'
    prepared again. Now the job prepares in its thread (status "preparing …"); re-attach and stop prepare nothing."""
    import threading

    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.nodes import search_nodes

    mp, pos, neg = _setup(tiny_models, tmp_path, monkeypatch)
    gate = threading.Event()
    calls = _counting_preparation(monkeypatch, gate)
    monkeypatch.setattr(search_nodes, "STOP_WAIT_S", 60.0)
    node = _search_node("bg")
    try:
        t0 = time.monotonic()
        handle, text = node.execute(mp, pos, neg, configs=1000, mode="background", journal="instant",
                                    **NODE_INPUTS).result
        assert time.monotonic() - t0 < 30 and not gate.is_set()  # returned while the preparation is held
        assert text.startswith("preparing"), text
        job = handle.job()
        assert job is not None and job.running and job.status == "preparing"
        _, text = node.execute(mp, pos, neg, configs=1000, mode="background", journal="instant",
                               **NODE_INPUTS).result  # re-attach while preparing
        assert handle.job() is job and text.startswith("preparing"), text
        gate.set()
        t0 = time.monotonic()
        while (job.progress is None or job.progress.done < 1) and time.monotonic() - t0 < 300:
            time.sleep(0.05)
        assert job.status == "running", job.error
        _, text = node.execute(mp, pos, neg, configs=1000, mode="background", journal="instant",
                               **NODE_INPUTS).result  # re-attach while searching
        assert text.startswith("running") and handle.job() is job, text
        _, text = node.execute(mp, pos, neg, configs=1000, mode="stop", journal="instant", **NODE_INPUTS).result
        assert not job.running and job.status == "cancelled" and text.startswith("cancelled"), (text, job.error)
        assert calls == [1]  # one preparation, in the job; none for the re-attaches and the stop
        assert handle.context is not None and len(calls) == 1  # a report reuses the job's preparation
    finally:
        gate.set()
        job = jobs.JOBS.get(jobs.job_key(tmp_path / "journals" / "instant.sqlite", handle.journal_kwargs))
        if job is not None:
            job.stop()
            job.wait(120)


@pytest.mark.comfy_inproc
def test_stop_while_preparing_ends_the_job(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    """'stop' reaches a job that is still preparing: it ends at the preparation's next step, nothing evaluated."""
    import threading

    from qua2sedimo.nodes import search_jobs as jobs

    mp, pos, neg = _setup(tiny_models, tmp_path, monkeypatch)
    gate = threading.Event()
    calls = _counting_preparation(monkeypatch, gate)
    plan = jobs.plan(mp, pos, neg, jobs.SearchSpec(**SMALL))
    job = jobs.start_background(jobs.Preparation(plan), tmp_path / "prep.sqlite", max_configs=5, max_seconds=None)
    assert job.state_text().startswith("preparing")
    job.stop()
    assert job.state_text().startswith("stopping")
    gate.set()
    job.wait(120)
    assert not job.running and job.status == "cancelled" and job.result.new == 0, job.error
    assert calls == [1]
