"""The Ray executor joins an existing cluster (``ray start --head``) by address, as on a multi-machine setup."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

import comfy_host  # noqa: E402  (standard library only: free_port)
import ray_toy  # noqa: E402

from qua2sedimo.search.ray_executor import RayExecutor, RayExecutorError  # noqa: E402

pytestmark = [pytest.mark.ray, pytest.mark.slow]
TESTS = Path(__file__).resolve().parent


@pytest.fixture()
def head(tmp_path):
    port = comfy_host.free_port()
    ray_bin = Path(sys.executable).with_name("ray")
    proc = subprocess.Popen([str(ray_bin), "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
                             "--include-dashboard=false", "--disable-usage-stats"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env={**os.environ, "RAY_AUTH_MODE": "disabled"})  # no token: a test cluster on loopback
    try:
        yield f"127.0.0.1:{port}"
    finally:
        ray.shutdown()
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:  # `ray start --block` can take half a minute to wind down
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)


def test_joins_an_existing_cluster_by_address(head, tmp_path):
    from qua2sedimo.quant import option_table

    option_table(ray_toy.toy_model(), cache_dir=tmp_path)
    env = {"PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    opts = {la.name: "kmeans_c-3" for la in ray_toy.toy_layers()}
    t0 = time.monotonic()
    while True:  # the head takes a few seconds to accept drivers
        try:
            ex = RayExecutor(ray_toy.ToyFactory(tmp_path), address=head, init_kwargs={"runtime_env": {"env_vars": env}})
            ex.start()
            break
        except RayExecutorError:
            ray.shutdown()
            assert time.monotonic() - t0 < 120, "the Ray head did not come up"
            time.sleep(1)
    with ex:
        assert ex.n_workers() == 2  # one per CPU of the cluster
        (res,) = list(ex.run([(0, opts)]))
    assert res.idx == 0 and res.values["denoise_error"] == pytest.approx(ray_toy.ToyFactory(tmp_path)()(opts)[
        "denoise_error"], rel=1e-6)


def test_unreachable_address_is_a_clear_error():
    port = comfy_host.free_port()
    with pytest.raises(RayExecutorError, match="cannot reach the Ray cluster"):
        RayExecutor(ray_toy.ToyFactory("."), address=f"127.0.0.1:{port}").connect()
    ray.shutdown()
