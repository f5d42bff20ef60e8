"""A fake search for tests/test_journal.py: samples configs, "evaluates" them, adds them to a journal; and
:func:`journal_indices`, what the search tests read back from a journal file.

Run as ``python tests/journal_worker.py JOURNAL N [DELAY]``: it prints ``ready <pid>`` once the journal is open, then
evaluates sampler indices 0..N-1 that are not done yet (resume) and exits 0. The test kills it with SIGKILL.
"""

from __future__ import annotations

import hashlib
import sqlite3
import sys
import time
import types
from pathlib import Path

LAYERS = [f"blocks.{b}.{k}" for b in range(16) for k in ("q", "k", "v", "o", "ff1", "ff2")]
SEED = 7
FINGERPRINT = "fp-kill-test"
OBJECTIVE = "denoise_error"


def journal_indices(journal: str | Path) -> list[int]:
    """The sampler indices a journal file holds, sorted (read-only; its integrity checked first)."""
    con = sqlite3.connect(f"file:{journal}?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        return sorted(r[0] for r in con.execute("SELECT idx FROM evals"))
    finally:
        con.close()


def fake_eval(options: dict[str, str]) -> tuple[float, int, float]:
    """Deterministic (avg_bits, nbytes, error) of a config."""
    bits = [int(o.rsplit("-", 1)[1]) for o in options.values()]
    digest = hashlib.sha256("".join(sorted(options.values())).encode() + str(sorted(options)).encode()).digest()
    error = int.from_bytes(digest[:4], "big") / 2**32 + (4.0 - sum(bits) / len(bits))
    return sum(bits) / len(bits), sum(b * 4096 // 8 for b in bits), error


def fill(path: str | Path, n: int, delay: float = 0.0, announce: bool = False) -> None:
    """Evaluate sampler indices ``0..n-1`` missing from the journal, one transaction each."""
    from qua2sedimo.search.journal import Journal
    from qua2sedimo.search.sampling import ConfigSampler

    sampler = ConfigSampler(LAYERS, SEED)
    with Journal.open(
        path, model_fingerprint=FINGERPRINT, objective=OBJECTIVE, settings=sampler.settings(), layer_names=LAYERS
    ) as journal:
        if announce:
            print(f"ready {len(journal)}", flush=True)
        for i, options in sampler.pending(journal.done_indices(), stop=n):
            t0 = time.perf_counter()
            if delay:
                time.sleep(delay)
            avg_bits, nbytes, error = fake_eval(options)
            journal.add(
                options, avg_bits=avg_bits, nbytes=nbytes, values={OBJECTIVE: error}, primary=error,
                timings={"eval_s": time.perf_counter() - t0}, idx=i, source="random",
            )


def _light_imports() -> None:
    """Let ``qua2sedimo.search.journal`` import without the package ``__init__`` files (they pull in torch):
    the worker starts in a fraction of a second. Only used when run as a script, never inside pytest."""
    import qua2sedimo

    root = Path(qua2sedimo.__file__).resolve().parent
    for sub in ("quant", "search"):
        name = f"qua2sedimo.{sub}"
        if name not in sys.modules:
            module = types.ModuleType(name)
            module.__path__ = [str(root / sub)]
            sys.modules[name] = module


if __name__ == "__main__":
    _light_imports()
    fill(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else 0.0, announce=True)
