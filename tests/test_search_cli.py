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


def test_cli_on_a_busy_journal_fails_at_once_in_one_line(tmp_path):
    """Issue 16, defect 9: a second search on a journal another process writes failed only after loading and
    preparing the model, with a traceback. The writer lock is taken first: one line, non-zero exit, nothing loaded."""
    from qua2sedimo.search.journal_file import JournalFile

    journal = tmp_path / "busy.sqlite"
    holder = JournalFile(journal)
    holder.acquire_lock()  # this process writes the journal (flock: the CLI below is another process)
    try:
        cmd = [sys.executable, "-m", "qua2sedimo", "search", "--cpu", "--model", str(tmp_path / "absent.safetensors"),
               "--conditioning", str(tmp_path / "absent-cond.safetensors"), "--journal", str(journal),
               "--configs", "2", "--comfy-dir", str(tmp_path / "no-comfy-here")]
        t0 = time.monotonic()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        seconds = time.monotonic() - t0
    finally:
        holder.release_lock()
    lines = out.stderr.strip().splitlines()
    assert out.returncode != 0 and out.stdout == "", out
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr
    assert "being written by another process" in lines[0] and f"pid {os.getpid()}" in lines[0]
    assert seconds < 120 and not journal.exists()  # nothing booted, loaded, prepared or created
