"""The Ray executor on a local 2-CPU cluster with a small torch objective: same journal as in-process, a worker
killed mid-search loses nothing, errors are clear, cancel and resume work."""

import os
import signal
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import ray_toy  # noqa: E402

from qua2sedimo.quant import option_table  # noqa: E402
from qua2sedimo.quant.layer_table import layers_fingerprint  # noqa: E402
from qua2sedimo.search.journal import Journal  # noqa: E402
from qua2sedimo.search.ray_executor import RayExecutor, RayExecutorError  # noqa: E402
from qua2sedimo.search.runner import run_search  # noqa: E402
from qua2sedimo.search.sampling import ConfigSampler  # noqa: E402

pytestmark = pytest.mark.ray
TESTS = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster with 2 CPUs; workers find ``ray_toy`` through PYTHONPATH."""
    path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=200 * 2**20, runtime_env={"env_vars": {"PYTHONPATH": path}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    d = tmp_path_factory.mktemp("toy-table")
    option_table(ray_toy.toy_model(), cache_dir=d)  # computed once here, loaded by every worker
    return d


def journal(path):
    layers = ray_toy.toy_layers()
    return Journal.open(path, model_fingerprint=layers_fingerprint(layers), objective="denoise_error",
                        settings={"toy": 1}, layer_names=[la.name for la in layers])


def search(path, evaluate, n, executor=None, **kw):
    layers = ray_toy.toy_layers()
    sampler = ConfigSampler([la.name for la in layers], seed=5)
    with journal(path) as j:
        res = run_search(j, sampler, evaluate, layers, primary="denoise_error", max_configs=n, executor=executor,
                         **kw)
        return res, {r.idx: r for r in j.records()}


def same_content(a, b):
    assert sorted(a) == sorted(b)
    for i in a:
        ra, rb = a[i], b[i]
        assert (ra.options, ra.avg_bits, ra.nbytes, ra.source) == (rb.options, rb.avg_bits, rb.nbytes, rb.source)
        assert ra.values == pytest.approx(rb.values, rel=1e-6, abs=0) and ra.primary == pytest.approx(rb.primary)


def test_same_journal_as_in_process(cluster, cache, tmp_path):
    _, local = search(tmp_path / "local.sqlite", ray_toy.ToyFactory(cache)(), 8)
    with RayExecutor(ray_toy.ToyFactory(cache), workers=2) as ex:
        res, remote = search(tmp_path / "ray.sqlite", None, 8, executor=ex)
        assert len({pid for _, pid in ex.stats.workers.values()}) == 2  # two actor processes did the work
    assert (res.status, res.done, res.new) == ("done", 8, 8)
    same_content(local, remote)
    assert all("forward" in r.timings and r.timings["evaluate"] > 0 for r in remote.values())


def test_killed_worker_loses_only_its_config_in_flight(cluster, cache, tmp_path):
    _, local = search(tmp_path / "local.sqlite", ray_toy.ToyFactory(cache)(), 10)
    killed = []
    with RayExecutor(ray_toy.ToyFactory(cache, delay=0.4), workers=2) as ex:

        def kill_one(p):
            if p.new == 1 and not killed:  # both actors busy: one result is in, the next two configs are in flight
                host, pid = next(iter(ex.stats.workers.values()))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

        res, remote = search(tmp_path / "ray.sqlite", None, 10, executor=ex, progress=kill_one)
        assert killed and ex.stats.actors_lost == 1 and ex.stats.retries == 1
        assert ex.stats.actors_started == 3  # a replacement joined
    assert (res.status, res.done, res.new) == ("done", 10, 10)
    same_content(local, remote)


def test_cancel_keeps_configs_in_flight_and_resume_finishes(cluster, cache, tmp_path):
    _, local = search(tmp_path / "local.sqlite", ray_toy.ToyFactory(cache)(), 9)
    with RayExecutor(ray_toy.ToyFactory(cache, delay=0.2), workers=2) as ex:
        seen = []
        res, part = search(tmp_path / "ray.sqlite", None, 9, executor=ex, progress=seen.append,
                           cancel=lambda: len(seen) > 3)
        assert res.status == "cancelled" and 3 <= res.done < 9
        assert res.done == len(part)  # everything evaluated (in flight at cancel too) is journaled
        res, remote = search(tmp_path / "ray.sqlite", None, 9, executor=ex)
        assert (res.done, res.new) == (9, 9 - len(part))
    same_content(local, remote)


def test_nothing_to_do_starts_no_workers(cache):
    ex = RayExecutor(ray_toy.ToyFactory(cache), workers=2)
    assert list(ex.run([])) == [] and ex.stats.actors_started == 0


def test_objective_errors_are_raised_in_the_driver(cluster, cache):
    opts = {la.name: "uaq-4" for la in ray_toy.toy_layers()}
    with RayExecutor(ray_toy.ToyFactory(cache, fail_on=1), workers=1) as ex:
        with pytest.raises(ValueError, match="told to fail"):
            list(ex.run([(0, opts), (1, {**opts, "__fail__": "yes"})]))


def test_a_worker_that_cannot_prepare_gives_a_clear_error(cluster, cache):
    with pytest.raises(RayExecutorError, match="could not prepare.*weights are missing on this worker"):
        with RayExecutor(ray_toy.ToyFactory(cache, fail_init=True), workers=1) as ex:
            ex.start()


def test_bad_arguments():
    with pytest.raises(ValueError, match="workers must be at least 1"):
        RayExecutor(ray_toy.ToyFactory("."), workers=0)
