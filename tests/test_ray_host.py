"""The search on a local Ray cluster (2 CPU workers) with the real ComfyUI host: workers boot ComfyUI, rebuild the
MODEL from what the driver ships, and the journal equals the in-process one, also when a worker is killed."""

from __future__ import annotations

import os
import signal

import pytest

pytest.importorskip("ray")  # the optional extra qua2sedimo[ray]: skip, not ImportError, without it
pytestmark = [pytest.mark.ray, pytest.mark.comfy_inproc, pytest.mark.slow]
SPEC = dict(n_seeds=1, n_states=4, steps=4, width=64, height=64)


@pytest.fixture(scope="module")
def ray_session():
    ray = pytest.importorskip("ray")
    yield ray
    ray.shutdown()


def _prepare(tiny_models, tmp_path, monkeypatch):
    import comfy.sd
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import search_jobs as jobs

    bridge.register_folders()
    monkeypatch.setattr(bridge, "journal_dir", lambda: tmp_path / "journals")
    mp = comfy.sd.load_diffusion_model(str(tiny_models["sd15_tiny"]))
    pos, neg = tm.conditioning_for("sd15", seed=1), tm.conditioning_for("sd15", seed=2)
    return jobs.prepare(mp, pos, neg, jobs.SearchSpec(**SPEC))


def _records(path, ctx):
    from qua2sedimo.nodes import search_jobs as jobs

    with jobs.open_readonly(path, ctx.journal_kwargs) as j:
        return {r.idx: r for r in j.records()}


def test_ray_journal_equals_in_process_with_a_worker_killed(comfy_inproc, tiny_models, tmp_path, monkeypatch,
                                                            ray_session):
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.nodes.search_remote import ray_executor

    ctx = _prepare(tiny_models, tmp_path, monkeypatch)
    n = 6
    jobs.run_job(ctx, tmp_path / "local.sqlite", max_configs=n, max_seconds=None, job=jobs.SearchJob("local"))
    killed = []
    with ray_executor(ctx, workers=2, init_kwargs=dict(num_cpus=2, object_store_memory=300 * 2**20)) as ex:

        def kill_one(p):
            if p.new == 1 and not killed:
                _, pid = next(iter(ex.stats.workers.values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        res = jobs.run_job(ctx, tmp_path / "ray.sqlite", max_configs=n, max_seconds=None,
                           job=jobs.SearchJob("ray"), on_progress=kill_one, executor=ex)
        assert (res.status, res.done, res.new) == ("done", n, n)
        assert killed and ex.stats.actors_lost == 1 and ex.stats.retries == 1
        assert len({pid for _, pid in ex.stats.workers.values()}) == 3  # two workers and a replacement
        assert all(pid != os.getpid() for _, pid in ex.stats.workers.values())
    local, remote = _records(tmp_path / "local.sqlite", ctx), _records(tmp_path / "ray.sqlite", ctx)
    assert sorted(local) == sorted(remote) == list(range(n))
    for i in range(n):
        a, b = local[i], remote[i]
        assert (a.options, a.avg_bits, a.nbytes) == (b.options, b.avg_bits, b.nbytes)
        assert b.values == pytest.approx(a.values, rel=1e-5)
    assert len({r.primary for r in remote.values()}) == n  # real, config-dependent values


def _ray_cli(comfy_base, journal, cond, configs):
    import sys

    import comfy_host

    return [sys.executable, "-m", "qua2sedimo", "search", "--cpu", "--comfy-dir", str(comfy_host.comfy_dir()),
            "--base-directory", str(comfy_base),
            "--model", "sd15_tiny.safetensors", "--conditioning", str(cond), "--journal", str(journal),
            "--configs", str(configs), "--n-seeds", "1", "--n-states", "4", "--steps", "4",
            "--width", "64", "--height", "64", "--executor", "ray", "--ray-workers", "2"]


def test_cli_on_ray_driver_killed_then_resumed(comfy_base, tiny_models, tmp_path):
    """kill -9 of the driver (the CLI) keeps every journaled config; the same command resumes on Ray."""
    import json
    import subprocess
    import time

    import tiny_models as tm
    from journal_worker import journal_indices
    from safetensors.torch import save_file

    (pos, _), = tm.conditioning_for("sd15", seed=1)
    (neg, _), = tm.conditioning_for("sd15", seed=2)
    cond = tmp_path / "cond.safetensors"
    save_file({"positive": pos.contiguous(), "negative": neg.contiguous()}, str(cond))
    journal = tmp_path / "journal.sqlite"
    proc = subprocess.Popen(_ray_cli(comfy_base, journal, cond, 30), stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True)
    t0, seen = time.monotonic(), []
    for line in proc.stderr:  # progress lines: "<done>/30, best …"
        seen.append(line)
        if line.startswith("4/30"):
            break
        assert time.monotonic() - t0 < 300, "".join(seen[-20:])
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    done = journal_indices(journal)
    assert 4 <= len(done) < 30 and len(set(done)) == len(done)

    out = subprocess.run(_ray_cli(comfy_base, journal, cond, len(done) + 3), capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert (summary["status"], summary["executor"], summary["ray"]["workers"]) == ("done", "ray", 2)
    assert summary["done"] == len(done) + 3 and summary["new"] == 3  # done ⊂ 0..len(done)+1: at most 2 in flight
    assert journal_indices(journal) == list(range(len(done) + 3))


def test_image_objective_on_ray_equals_in_process(comfy_inproc, tiny_models, tmp_path, monkeypatch, ray_session):
    """The 'image' objective ships the FP final latents; full sampling on a worker gives the in-process values."""
    import comfy.sd
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.nodes.search_remote import ray_executor

    bridge.register_folders()
    mp = comfy.sd.load_diffusion_model(str(tiny_models["sd15_tiny"]))
    pos, neg = tm.conditioning_for("sd15", seed=1), tm.conditioning_for("sd15", seed=2)
    ctx = jobs.prepare(mp, pos, neg, jobs.SearchSpec(objective="image", **SPEC))
    jobs.run_job(ctx, tmp_path / "local.sqlite", max_configs=2, max_seconds=None, job=jobs.SearchJob("local"))
    with ray_executor(ctx, workers=1, init_kwargs=dict(num_cpus=2, object_store_memory=300 * 2**20)) as ex:
        jobs.run_job(ctx, tmp_path / "ray.sqlite", max_configs=2, max_seconds=None, job=jobs.SearchJob("ray"),
                     executor=ex)
    local, remote = _records(tmp_path / "local.sqlite", ctx), _records(tmp_path / "ray.sqlite", ctx)
    assert sorted(remote) == [0, 1]
    for i in (0, 1):
        assert remote[i].options == local[i].options and remote[i].values["image_nmse"] > 0
        assert remote[i].values == pytest.approx(local[i].values, rel=1e-4)
