"""``python -m qua2sedimo search`` on the real host: a search process killed with SIGKILL resumes from its
journal, which stays intact; the finished run holds every config exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from journal_worker import journal_indices


def _cli(comfy_base, journal, cond, configs):
    return [sys.executable, "-m", "qua2sedimo", "search", "--cpu", "--base-directory", str(comfy_base),
            "--model", "pixart_sigma_d1.safetensors", "--conditioning", str(cond), "--journal", str(journal),
            "--configs", str(configs), "--n-seeds", "1", "--n-states", "2", "--steps", "3",
            "--width", "384", "--height", "384"]


@pytest.mark.slow
@pytest.mark.comfy_inproc
def test_cli_search_survives_kill_9_and_resumes(comfy_base, tiny_models, tmp_path):
    import tiny_models as tm
    from safetensors.torch import save_file

    (pos, pextra), = tm.conditioning_for("pixart", seed=1)
    (neg, _), = tm.conditioning_for("pixart", seed=2)
    cond = tmp_path / "cond.safetensors"
    save_file({"positive": pos.contiguous(), "negative": neg.contiguous(),
               **{f"positive.{k}": v for k, v in pextra.items() if hasattr(v, "shape")}}, str(cond))
    journal = tmp_path / "journal.sqlite"
    env = dict(os.environ)

    proc = subprocess.Popen(_cli(comfy_base, journal, cond, 40), stderr=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    t0 = time.monotonic()
    seen = []
    for line in proc.stderr:  # progress lines: "<done>/40, best …"
        seen.append(line)
        if line.startswith("3/40"):
            break
        assert time.monotonic() - t0 < 600, "".join(seen[-20:])
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "".join(seen[-20:])
    done = journal_indices(journal)
    assert done == list(range(len(done))) and len(done) >= 3

    out = subprocess.run(_cli(comfy_base, journal, cond, len(done) + 2), capture_output=True, text=True, env=env,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout)
    assert summary["status"] == "done" and summary["done"] == len(done) + 2 and summary["new"] == 2
    assert journal_indices(journal) == list(range(len(done) + 2))
    # budget of zero: a clear error, journal untouched
    bad = subprocess.run(_cli(comfy_base, journal, cond, 0), capture_output=True, text=True, env=env, timeout=600)
    assert bad.returncode != 0 and "budget of zero" in bad.stderr
    assert journal_indices(journal) == list(range(len(done) + 2))
