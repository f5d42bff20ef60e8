"""The Search workflow over HTTP on the real server: a background search re-attached until done with its
status and Pareto plot; Cancel (``/interrupt``) of a search in 'wait' mode keeps every finished config."""

from __future__ import annotations

import sqlite3
import time

import pytest
import workflow_api as wa

STEM = "5. Search in background"


def _graph(**search_inputs) -> dict:
    graph = wa.to_testbed(wa.twin(STEM), **wa.TWIN_MODEL)
    node = next(n for n in graph.values() if n["class_type"] == "Qua2SeDiMoSearch")
    node["inputs"].update(search_inputs)
    return graph


def _texts(entry: dict) -> list[str]:
    return [t for out in (entry.get("outputs") or {}).values() for t in out.get("text", [])]


def _rows(path) -> int:
    if not path.exists():
        return 0
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT count(*) FROM evals").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


@pytest.mark.comfy_server
def test_background_search_reattaches_until_done(comfy_server):
    graph = _graph(journal="http-background", configs=4)
    t0 = time.monotonic()
    entry = comfy_server.run(graph, timeout=600)  # returns while the job runs (or already done)
    first = time.monotonic() - t0
    while True:
        status = [t for t in _texts(entry) if "configs evaluated" in t]
        if len(status) == 2 and all(t.startswith("done: 4/4") for t in status):  # Search and Status nodes
            break
        assert time.monotonic() - t0 < 600, status
        time.sleep(2)
        entry = comfy_server.run(graph, timeout=600)  # the same node again: re-attaches, no second job
    assert "Pareto front" in status[-1]
    (png,) = comfy_server.saved_images(entry)
    assert png.stat().st_size > 1000
    assert _rows(comfy_server.base / "models" / "qua2sedimo" / "journals" / "http-background.sqlite") == 4
    assert first < 600


@pytest.mark.comfy_server
def test_cancel_keeps_finished_configs_and_resumes(comfy_server):
    from comfy_host import ComfyServerError

    journal = comfy_server.base / "models" / "qua2sedimo" / "journals" / "http-cancel.sqlite"
    pid = comfy_server.post_prompt(_graph(journal="http-cancel", configs=1000, mode="wait"))
    t0 = time.monotonic()
    while _rows(journal) < 2:
        assert time.monotonic() - t0 < 600, "the search did not start"
        time.sleep(0.5)
    comfy_server.post("/interrupt", {})
    t_cancel = time.monotonic()
    with pytest.raises(ComfyServerError, match="interrupted"):
        comfy_server.wait(pid, timeout=300)
    assert time.monotonic() - t_cancel < 60, "Cancel must stop the search within seconds (one evaluation)"
    kept = _rows(journal)
    assert kept >= 2
    entry = comfy_server.run(_graph(journal="http-cancel", configs=kept + 1, mode="wait"), timeout=600)
    status = [t for t in _texts(entry) if "configs evaluated" in t]
    assert status[-1].startswith(f"done: {kept + 1}/{kept + 1}"), status
    assert _rows(journal) == kept + 1


@pytest.mark.slow
@pytest.mark.comfy_server
def test_full_workflow_search_report_build_sample(comfy_server):
    import json

    graph = wa.to_testbed(wa.twin("6. Search report and build"), **wa.TWIN_MODEL, search_configs=12)
    node = next(n for n in graph.values() if n["class_type"] == "Qua2SeDiMoSearch")
    node["inputs"].update(journal="http-full")
    entry = comfy_server.run(graph, timeout=1200)
    texts = _texts(entry)
    built = next(t for t in texts if t.startswith("knapsack"))
    bits = float(built.split("b̄ = ")[1].split(",")[0])
    assert 3.49 <= bits <= 3.5, built
    report_line = next(t for t in texts if "report: " in t)
    rel = report_line.rsplit("report: ", 1)[1].strip()
    report = json.loads((comfy_server.base / "output" / rel).read_text())
    assert report["evaluated"] == 12 and report["objective"] == "denoise_error"
    assert {c["rule"] for c in report["constructed"]} == {"knapsack", "paper"}
    assert all(c["objective"] is not None for c in report["constructed"])
    for name in report["figures"].values():
        assert (comfy_server.base / "output" / rel).with_name(name).stat().st_size > 1000
    images = comfy_server.saved_images(entry)
    assert len(images) >= 2  # the sample (output) and the report figures (preview)
    assert any(t.startswith("saved qua2sedimo/knapsack-3.5") for t in texts)


@pytest.mark.ray
@pytest.mark.slow
@pytest.mark.comfy_server
def test_search_node_on_a_local_ray_cluster(comfy_server):
    """executor 'ray': the server starts a local cluster, 2 workers evaluate, the server journals."""
    pytest.importorskip("ray")
    journal = comfy_server.base / "models" / "qua2sedimo" / "journals" / "http-ray.sqlite"
    entry = comfy_server.run(_graph(journal="http-ray", configs=4, mode="wait", executor="ray", ray_workers=2),
                             timeout=900)
    status = [t for t in _texts(entry) if "configs evaluated" in t]
    assert status and all(t.startswith("done: 4/4") for t in status), status
    assert _rows(journal) == 4


@pytest.mark.slow
@pytest.mark.comfy_server
def test_normal_workflow_runs_alongside_a_background_search(comfy_server):
    """A background search holds no queue slot and no second model copy: a sampling workflow on the same model
    file runs to its image while the search keeps going; 'stop' then ends the search, keeping its configs."""
    journal = comfy_server.base / "models" / "qua2sedimo" / "journals" / "http-alongside.sqlite"
    entry = comfy_server.run(_graph(journal="http-alongside", configs=1000), timeout=600)
    t0 = time.monotonic()
    while _rows(journal) < 1:
        assert time.monotonic() - t0 < 300, "the background search did not start"
        time.sleep(0.5)
    sample = comfy_server.run(wa.to_testbed(wa.twin("1. Quantize W4 and sample"), **wa.TWIN_MODEL), timeout=600)
    (png,) = comfy_server.saved_images(sample)
    assert png.stat().st_size > 1000
    during = _rows(journal)
    status = [t for t in _texts(comfy_server.run(_graph(journal="http-alongside", configs=1000), timeout=600))
              if "configs evaluated" in t]
    assert status and status[0].startswith("running"), status  # still searching after the sample finished
    entry = comfy_server.run(_graph(journal="http-alongside", configs=1000, mode="stop"), timeout=600)
    after = _rows(journal)
    assert 1 <= during <= after < 1000
    status = [t for t in _texts(entry) if "configs evaluated" in t]
    assert status and not status[0].startswith("running"), status


@pytest.mark.comfy_server
def test_prompt_cannot_send_the_model_to_an_arbitrary_ray_cluster(comfy_server):
    """Security: ``ray_address`` is set by whoever can queue a prompt; the server would ship the model there and
    unpickle the answers. Only a local cluster or an address the server's owner allowed is accepted, refused before
    any preparation or connection (the journal is never created)."""
    from comfy_host import ComfyServerError

    journal = comfy_server.base / "models" / "qua2sedimo" / "journals" / "http-ray-address.sqlite"
    t0 = time.monotonic()
    refused = "not a Ray cluster this server's owner allowed.*QUA2SEDIMO_RAY_ADDRESSES"
    with pytest.raises(ComfyServerError, match=refused):
        comfy_server.run(_graph(journal="http-ray-address", configs=2, mode="wait", executor="ray",
                                ray_address="127.0.0.9:6379"), timeout=120)
    assert time.monotonic() - t0 < 60 and not journal.exists()
