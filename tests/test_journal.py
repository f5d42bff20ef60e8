"""The search journal: round trip, resume, export, bad files left untouched, writer lock, and kill -9."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from qua2sedimo.search import journal_file
from qua2sedimo.search.journal import APPLICATION_ID, SCHEMA_VERSION, Journal, JournalError, JournalLocked
from qua2sedimo.search.journal_file import JournalReadOnly
from qua2sedimo.search.sampling import ConfigSampler, config_key

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.append(str(HERE))
import journal_worker  # noqa: E402  (tests/journal_worker.py, also run as the killed subprocess)

NAMES = [f"blocks.{b}.{k}" for b in range(4) for k in ("q", "k", "v", "o")]
FP = "fp-a"


def _open(path: Path, **kw) -> Journal:
    kw.setdefault("model_fingerprint", FP)
    kw.setdefault("objective", "denoise_error")
    kw.setdefault("settings", {"steps": 4, "seeds": [1, 2]})
    return Journal.open(path, **kw)


def _add(j: Journal, options: dict, i: int | None, value: float, source: str = "random") -> int:
    return j.add(
        options, avg_bits=3.5, nbytes=1000 + i if i is not None else 999, values={"denoise_error": value, "aux": 1.0},
        primary=value, timings={"eval_s": 0.01}, idx=i, source=source,
    )


def _snapshot(path: Path) -> dict[str, bytes]:
    """Bytes of the file and its sidecars, except the ``-shm`` index a SQLite reader may create for a WAL file."""
    return {
        p.name: p.read_bytes()
        for p in sorted(path.parent.iterdir())
        if p.name.startswith(path.name) and p.name != path.name + "-shm"
    }


@pytest.fixture
def sampler() -> ConfigSampler:
    return ConfigSampler(NAMES, seed=3)


@pytest.fixture
def filled(tmp_path: Path, sampler: ConfigSampler) -> Path:
    """A closed journal with 10 random evaluations of FP."""
    path = tmp_path / "j.sqlite"
    with _open(path, layer_names=NAMES) as j:
        for i, options in sampler.stream(stop=10):
            _add(j, options, i, value=(i * 7 % 10) / 10)
    return path


# ------------------------------------------------------------------------------------------------ round trip
def test_round_trip_resume_dedup_best(tmp_path: Path, sampler: ConfigSampler) -> None:
    path = tmp_path / "sub" / "j.sqlite"
    with _open(path, layer_names=NAMES) as j:
        assert len(j) == 0 and j.done_indices() == set() and j.records() == []
        assert j._con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert j._con.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
        for i, options in sampler.stream(stop=5):
            assert _add(j, options, i, value=1.0 - i / 10) == i + 1
        uniform = dict.fromkeys(NAMES, "uaq-4")
        rid = _add(j, uniform, None, value=math.nan, source="uniform")
        assert _add(j, uniform, None, value=0.5, source="uniform") == rid  # dedup: not stored twice
        assert len(j) == 6 and j.has(config_key(uniform)) and not j.has("0" * 64)
    with _open(path, layer_names=NAMES) as j:  # resume
        assert j.done_indices() == {0, 1, 2, 3, 4}
        assert [i for i, _ in sampler.pending(j.done_indices(), stop=7)] == [5, 6]
        recs = j.records()
        assert [r.idx for r in recs] == [0, 1, 2, 3, 4, None]
        r = recs[2]
        assert r.options == sampler.config(2) and r.config_key == config_key(r.options)
        assert (r.avg_bits, r.nbytes, r.primary, r.source) == (3.5, 1002, 0.8, "random")
        assert r.values == {"denoise_error": 0.8, "aux": 1.0} and r.timings == {"eval_s": 0.01}
        assert math.isnan(recs[-1].primary) and math.isnan(recs[-1].values["denoise_error"])
        assert [r.idx for r in j.records(source="uniform")] == [None]
        assert [r.idx for r in j.best(3)] == [4, 3, 2]
        assert [r.idx for r in j.best(2, lower_is_better=False)] == [0, 1]  # NaN last either way
        assert j.best(10)[-1].source == "uniform"
        with pytest.raises(JournalError, match="sampler index 3 is already recorded with another config"):
            _add(j, sampler.config(9), 3, value=0.1)
        assert len(j) == 6  # the failed add left nothing behind


def test_several_runs_in_one_file(filled: Path, sampler: ConfigSampler) -> None:
    with _open(filled, objective="latent_mse") as j:  # same model, another objective: a new run
        assert len(j) == 0
        _add(j, sampler.config(0), 0, value=0.3)
    with _open(filled, settings={"steps": 8, "seeds": [1, 2]}) as j:  # other settings: another run
        assert len(j) == 0
    runs = Journal.list_runs(filled)
    assert [(r.objective, r.n_evals) for r in runs] == [("denoise_error", 10), ("latent_mse", 1), ("denoise_error", 0)]
    assert runs[0].settings == {"steps": 4, "seeds": [1, 2]} and runs[0].model_fingerprint == FP
    with _open(filled) as j:
        assert len(j) == 10 and j.layer_names == NAMES  # stored with the run


def test_export_jsonl(filled: Path, tmp_path: Path) -> None:
    out = tmp_path / "out" / "j.jsonl"
    with _open(filled, readonly=True) as j:
        assert j.export_jsonl(out) == out
        recs = j.records()
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    header, rows = lines[0], lines[1:]
    assert header["format"] == "qua2sedimo.journal.jsonl" and header["schema_version"] == SCHEMA_VERSION
    assert header["model_fingerprint"] == FP and header["objective"] == "denoise_error"
    assert header["settings"] == {"steps": 4, "seeds": [1, 2]} and header["layer_names"] == NAMES
    assert rows == [r.to_json() for r in recs] and len(rows) == 10
    assert not [p for p in out.parent.iterdir() if p.name.endswith(".tmp")]


def test_add_validation(filled: Path, sampler: ConfigSampler) -> None:
    good = sampler.config(50)
    with _open(filled) as j:
        with pytest.raises(ValueError, match=r"cover exactly the run's 16 layers \(missing \['blocks.0.q'\]"):
            j.add({k: v for k, v in good.items() if k != "blocks.0.q"}, avg_bits=3, nbytes=1, values={}, primary=0)
        with pytest.raises(ValueError, match="unknown quantization method 'gptq' for layer 'blocks.0.q'"):
            j.add(dict(good, **{"blocks.0.q": "gptq-4"}), avg_bits=3, nbytes=1, values={}, primary=0)
        with pytest.raises(ValueError, match="'x' is not a number"):
            j.add(good, avg_bits=3, nbytes=1, values={"e": "x"}, primary=0)
        with pytest.raises(ValueError, match="avg_bits must be a positive number"):
            j.add(good, avg_bits=math.inf, nbytes=1, values={}, primary=0)
        with pytest.raises(ValueError, match="idx must be a non-negative integer"):
            j.add(good, avg_bits=3, nbytes=1, values={}, primary=0, idx=-1)
        with pytest.raises(ValueError, match="source must be a non-empty string"):
            j.add(good, avg_bits=3, nbytes=1, values={}, primary=0, source="")
        assert len(j) == 10
    with pytest.raises(ValueError, match="settings must be JSON-serializable"):
        _open(filled, settings={"x": object()})
    with pytest.raises(JournalError, match="stored layer names differ"):
        _open(filled, layer_names=NAMES[:-1])


def test_readonly_and_missing(filled: Path, tmp_path: Path, sampler: ConfigSampler) -> None:
    with _open(filled, readonly=True) as r:
        assert len(r) == 10 and r.readonly
        with pytest.raises(JournalError, match="opened read-only"):
            _add(r, sampler.config(99), 99, 0.1)
    with pytest.raises(JournalError, match="no run for objective 'fid' .*runs there: denoise_error"):
        _open(filled, objective="fid", readonly=True)
    with pytest.raises(JournalError, match="no journal at .*create=True"):
        _open(tmp_path / "nope.sqlite", create=False)
    with pytest.raises(JournalError, match="no journal at"):
        _open(tmp_path / "nope.sqlite", readonly=True)
    assert not (tmp_path / "nope.sqlite").exists()
    j = _open(filled)
    j.close()
    j.close()  # idempotent
    with pytest.raises(JournalError, match="is closed"):
        len(j)


def test_use_from_another_thread(filled: Path, sampler: ConfigSampler) -> None:
    with _open(filled) as j:  # a ComfyUI node may open in one thread and run the search in another
        errors: list[BaseException] = []

        def work() -> None:
            try:
                _add(j, sampler.config(10), 10, 0.2)
            except BaseException as e:  # pragma: no cover - reported below
                errors.append(e)

        t = threading.Thread(target=work)
        t.start()
        t.join()
        assert not errors and 10 in j.done_indices()


# ----------------------------------------------------------------------------------------------- bad files
def _assert_refused(path: Path, match: str, **kw) -> None:
    before = _snapshot(path)
    with pytest.raises(JournalError, match=match):
        _open(path, **kw)
    after = _snapshot(path)
    if path.name + "-wal" not in before and after.get(path.name + "-wal") == b"":
        del after[path.name + "-wal"]  # an empty WAL a read-only SQLite connection may leave: no content
    assert after == before, "a refused journal file was modified (or got a lock file)"


def test_garbage_empty_and_directory(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(os.urandom(3000))
    _assert_refused(garbage, r"not a SQLite database .*left untouched; move it aside")
    text = tmp_path / "notes.sqlite"
    text.write_text("SQLite format 3 — not really\n" * 20)
    _assert_refused(text, "not a SQLite database")
    empty = tmp_path / "empty.sqlite"
    empty.write_bytes(b"")
    _assert_refused(empty, "is empty")
    folder = tmp_path / "folder.sqlite"
    folder.mkdir()
    with pytest.raises(JournalError, match="not a regular file"):
        _open(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.sqlite", "folder.sqlite", "garbage.sqlite",
                                                          "notes.sqlite"]  # no sidecars, no lock files


@pytest.mark.parametrize("cut", ["header", "one_page", "half", "last_page", "one_byte"])
def test_truncated_journal(filled: Path, cut: str) -> None:
    size = filled.stat().st_size
    keep = {"header": 100, "one_page": 4096, "half": size // 2, "last_page": size - 4096, "one_byte": size - 1}[cut]
    with open(filled, "r+b") as f:
        f.truncate(keep)
    _assert_refused(filled, r"(truncated|corrupt).*left untouched; move it aside")


def test_corrupt_pages(filled: Path) -> None:
    data = bytearray(filled.read_bytes())
    rng = random.Random(0)
    for page in range(1, len(data) // 4096):  # scribble over every page but the header page
        start = page * 4096 + rng.randrange(0, 2048)
        data[start:start + 512] = rng.randbytes(512)
    filled.write_bytes(bytes(data))
    _assert_refused(filled, r"corrupt.*left untouched; move it aside")


def test_foreign_sqlite_file(tmp_path: Path) -> None:
    other = tmp_path / "other.db"
    con = sqlite3.connect(other)
    con.execute("PRAGMA journal_mode = WAL")  # like a journal, but another format
    con.execute(f"PRAGMA application_id = {APPLICATION_ID}")
    con.execute("CREATE TABLE meta (key TEXT, value TEXT)")
    con.execute("INSERT INTO meta VALUES ('format', 'something.else')")
    con.commit()
    con.close()
    _assert_refused(other, r"a SQLite database but not a Qua2SeDiMo journal \(format 'something.else'")
    _assert_refused(other, "not a Qua2SeDiMo journal", readonly=True)
    plain = tmp_path / "plain.db"
    con = sqlite3.connect(plain)
    con.execute("CREATE TABLE meta (name, other_columns)")
    con.commit()
    con.close()
    _assert_refused(plain, "not a Qua2SeDiMo journal \\(no journal metadata")


def test_schema_too_new(filled: Path) -> None:
    con = sqlite3.connect(filled)
    con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    con.commit()
    con.close()
    _assert_refused(filled, f"newer release \\(schema {SCHEMA_VERSION + 1}.*Update the node pack")
    _assert_refused(filled, "newer release", readonly=True)


def test_other_model(filled: Path, sampler: ConfigSampler) -> None:
    _assert_refused(filled, r"belongs to another model \(fingerprint fp-a; this model is fp-b\).*left untouched",
                    model_fingerprint="fp-b")
    _assert_refused(filled, "belongs to another model", model_fingerprint="fp-b", readonly=True)
    with _open(filled, model_fingerprint="fp-b", allow_other_model=True) as j:  # asked for: a second model's run
        _add(j, sampler.config(0), 0, 0.5)
    with _open(filled, model_fingerprint="fp-b") as j:  # known to the file from now on
        assert len(j) == 1


class _FullDiskConnection:
    """A SQLite connection to a journal being created on a nearly full disk: its WAL cannot be checkpointed into
    the main file. ``close()`` hides that (SQLite skips the checkpoint silently); an explicit checkpoint fails with
    SQLITE_FULL, or (``lying``) reports success without doing it."""

    def __init__(self, con: sqlite3.Connection, other: sqlite3.Connection, lying: bool) -> None:
        self._con, self._other, self._lying = con, other, lying

    def execute(self, sql: str, *args):
        if "wal_checkpoint" in sql:
            if self._lying:
                return self._con.execute("SELECT 0, 0, 0")
            raise sqlite3.OperationalError("database or disk is full")
        cur = self._con.execute(sql, *args)
        if "journal_mode" in sql:  # the other connection attaches in WAL mode: close() then cannot checkpoint
            cur.fetchall()
            self._other.execute("SELECT count(*) FROM sqlite_master").fetchall()
        return cur

    def __getattr__(self, name: str):
        return getattr(self._con, name)


@pytest.fixture
def full_disk(monkeypatch):
    """Creation's connections see a disk too full for the checkpoint: a second connection held open keeps
    ``close()`` from checkpointing (as a failed checkpoint would), the explicit checkpoint fails."""
    real = sqlite3.connect
    held: list[sqlite3.Connection] = []
    mode = {"full": True, "lying": False}

    def connect(database, *args, **kwargs):
        con = real(database, *args, **kwargs)
        if not mode["full"] or not str(database).endswith(".new"):
            return con
        held.append(real(database))
        return _FullDiskConnection(con, held[-1], mode["lying"])

    monkeypatch.setattr(sqlite3, "connect", connect)
    yield mode
    for con in held:
        con.close()


@pytest.mark.parametrize("lying", [False, True], ids=["checkpoint_fails", "checkpoint_silently_incomplete"])
def test_creation_on_a_full_disk_links_nothing(tmp_path: Path, full_disk: dict, lying: bool) -> None:
    """Issue 16, defect 5: a failed checkpoint was hidden by ``close()`` and a journal without its schema was linked
    into place. Now: a clear error, no journal, no temporary file (the lock file alone stays, as always)."""
    full_disk["lying"] = lying
    path = tmp_path / "j.sqlite"
    match = "disk is full.*nothing was put in its place.*Free some disk space" if not lying else \
        "write-ahead log was not checkpointed.*nothing was put in its place"
    with pytest.raises(JournalError, match=match):
        _open(path, layer_names=NAMES)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["j.sqlite.lock"]
    full_disk["full"] = False  # space freed: the same call creates the journal
    with _open(path, layer_names=NAMES) as j:
        assert len(j) == 0 and j.layer_names == NAMES


# ----------------------------------------------------------------------------------------- read-only media
_WRITER_REFUSED = r"is read-only here \(read-only media.*not corrupt.*copy it .*to a writable folder"
_READER_REFUSED = r"cannot be read in place.*read-only media.*not corrupt: copy it .*writable folder"


def _pending_wal_copy(filled: Path, sampler: ConfigSampler, folder: Path) -> Path:
    """A copy of ``filled`` taken while a writer had unfinished WAL content (as a backup of a live search is)."""
    folder.mkdir()
    with _open(filled) as j:
        j._con.execute("PRAGMA wal_autocheckpoint = 0")
        _add(j, sampler.config(10), 10, 0.1)
        for name in (filled.name, filled.name + "-wal"):
            shutil.copy(filled.parent / name, folder / name)
    assert (folder / (filled.name + "-wal")).stat().st_size > 0
    return folder / filled.name


@pytest.fixture
def immutable():
    """``chattr +i`` paths (refused even to root, like read-only media); undone afterwards."""
    done: list[Path] = []

    def make(*paths: Path) -> None:
        for path in paths:
            out = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
            if out.returncode != 0:
                pytest.skip(f"chattr +i is not available here ({out.stderr.strip()})")
            done.append(path)
        probe = paths[-1] / "probe" if paths[-1].is_dir() else paths[-1].with_name("probe")
        try:
            probe.touch()
        except OSError:
            return
        probe.unlink()
        pytest.skip("chattr +i does not make files read-only here")

    yield make
    for path in reversed(done):
        subprocess.run(["chattr", "-i", str(path)], check=False)


@pytest.mark.skipif(shutil.which("chattr") is None, reason="needs chattr")
def test_read_only_media_said_read_only_not_corrupt(filled: Path, sampler: ConfigSampler, tmp_path: Path,
                                                    immutable) -> None:
    """Issue 16, defect 6: an intact WAL journal on read-only media was reported corrupt ("move it aside")."""
    pending = _pending_wal_copy(filled, sampler, tmp_path / "backup")
    immutable(filled, filled.with_name(filled.name + ".lock"), filled.parent, pending, pending.parent,
              pending.with_name(pending.name + "-wal"))
    before = _snapshot(filled)
    with _open(filled, readonly=True) as r:  # closed cleanly: reading works in place
        assert len(r) == 11
    with pytest.raises(JournalReadOnly, match=_WRITER_REFUSED):
        _open(filled)
    with pytest.raises(JournalReadOnly, match=_READER_REFUSED):
        _open(pending, readonly=True)  # unfinished WAL content: SQLite must write its index beside it
    assert _snapshot(filled) == before


def test_read_only_folder_simulated(filled: Path, sampler: ConfigSampler, tmp_path: Path, monkeypatch) -> None:
    """The same where chattr is not available: the access check says read-only, SQLite fails as it does on a
    read-only folder when it must create a WAL index ("unable to open database file")."""
    pending = _pending_wal_copy(filled, sampler, tmp_path / "backup")
    monkeypatch.setattr(journal_file, "writable", lambda path: False)
    real = sqlite3.connect

    class NoWalIndex:  # SQLite opens lazily: the first statement fails
        def execute(self, *args):
            raise sqlite3.OperationalError("unable to open database file")

        def close(self) -> None:
            pass

    def connect(database, *args, **kwargs):
        if "mode=ro" in str(database) and "immutable=1" not in str(database):
            return NoWalIndex()
        return real(database, *args, **kwargs)

    monkeypatch.setattr(sqlite3, "connect", connect)
    before = _snapshot(filled)
    with _open(filled, readonly=True) as r:
        assert len(r) == 11
    with pytest.raises(JournalReadOnly, match=_WRITER_REFUSED):
        _open(filled)
    assert _snapshot(filled) == before
    pending_before = _snapshot(pending)
    with pytest.raises(JournalReadOnly, match=_READER_REFUSED):
        _open(pending, readonly=True)
    assert _snapshot(pending) == pending_before


# ------------------------------------------------------------------------------------------------- locking
def test_second_writer_refused_reader_allowed(filled: Path, sampler: ConfigSampler) -> None:
    with _open(filled) as writer:
        with pytest.raises(JournalLocked, match=rf"being written by another process \(pid {os.getpid()} on .*"
                                                r"another search may be running"):
            _open(filled, objective="other")  # one writer per file, whatever the run
        with _open(filled, readonly=True) as reader:
            _add(writer, sampler.config(10), 10, 0.1)
            assert len(reader) == 11  # sees committed rows while the writer is open
    with _open(filled) as again:  # released on close
        assert len(again) == 11


def test_sqlite_lock_beyond_busy_timeout(filled: Path, sampler: ConfigSampler) -> None:
    blocker = sqlite3.connect(filled, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")  # e.g. a foreign tool writing the file
    try:
        t0 = time.monotonic()
        with pytest.raises(JournalLocked, match=r"j.sqlite' stayed locked .*another search may be running"):
            _open(filled, objective="new_objective", busy_timeout=0.2)  # creating the run must write
        assert time.monotonic() - t0 < 5
        with _open(filled, busy_timeout=0.2) as j:  # an existing run opens (reads work under WAL) ...
            assert len(j) == 10
            with pytest.raises(JournalLocked, match="stayed locked"):
                _add(j, sampler.config(10), 10, 0.1)  # ... but adding waits, then fails clearly
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    with _open(filled) as j:
        _add(j, sampler.config(10), 10, 0.1)
        assert len(j) == 11


# --------------------------------------------------------------------------------------------------- kill -9
def _check_consistent(path: Path, sampler: ConfigSampler, checked: int = 0) -> int:
    """After a kill: integrity ok, indices exactly 0..n-1, every row complete and correct (options compared with
    the sampler from index ``checked - 1`` on; earlier rows were compared before). Returns n."""
    if not path.exists():
        return 0
    con = sqlite3.connect(path.as_uri() + "?mode=ro", uri=True)
    try:
        assert con.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
    finally:
        con.close()
    with Journal.open(path, model_fingerprint=journal_worker.FINGERPRINT, objective=journal_worker.OBJECTIVE,
                      settings=sampler.settings(), readonly=True) as j:
        recs = j.records()
    assert sorted(r.idx for r in recs) == list(range(len(recs)))
    for r in recs:
        assert r.config_key == config_key(r.options) and (r.idx < checked - 1 or r.options == sampler.config(r.idx))
        avg_bits, nbytes, error = journal_worker.fake_eval(r.options)
        assert (r.avg_bits, r.nbytes, r.primary, r.values) == (avg_bits, nbytes, error, {"denoise_error": error})
    return len(recs)


def _content(path: Path, sampler: ConfigSampler) -> list[tuple]:
    with Journal.open(path, model_fingerprint=journal_worker.FINGERPRINT, objective=journal_worker.OBJECTIVE,
                      settings=sampler.settings(), readonly=True) as j:
        return sorted((r.idx, r.config_key, r.options, r.avg_bits, r.nbytes, r.values, r.primary, r.source)
                      for r in j.records())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")
def test_kill9_at_random_moments_then_resume(tmp_path: Path) -> None:
    n = 4000  # more than a tight loop writes before the latest kill, even on a fast, quiet machine
    path = tmp_path / "killed.sqlite"
    sampler = ConfigSampler(journal_worker.LAYERS, journal_worker.SEED)
    rng = random.Random(20250521)
    cmd = [sys.executable, str(HERE / "journal_worker.py"), str(path), str(n)]
    done, interrupted = 0, 0
    for attempt in range(6):
        delay = "0.002" if attempt % 2 else "0.0002"  # sleeping "evaluations" and a near-tight add loop
        proc = subprocess.Popen([*cmd, delay], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            if attempt == 0:
                time.sleep(rng.uniform(0.0, 0.3))  # may land in start-up or in creating the file
            else:
                line = proc.stdout.readline()
                assert line.startswith("ready"), (line, proc.stderr.read())
                if attempt == 2:  # while it runs: no second writer, but readers are welcome
                    with pytest.raises(JournalLocked, match=f"pid {proc.pid} "):
                        Journal.open(path, model_fingerprint=journal_worker.FINGERPRINT, objective="x")
                    _check_consistent(path, sampler, checked=done)
                time.sleep(rng.uniform(0.005, 0.12))
        finally:
            proc.kill()
            proc.wait(timeout=30)
            proc.stdout.close()
            proc.stderr.close()
        interrupted += proc.returncode == -signal.SIGKILL
        assert proc.returncode in (0, -signal.SIGKILL)
        now = _check_consistent(path, sampler, checked=done)
        assert now >= done
        done = now
    assert interrupted >= 5 and 0 < done < n
    # resume to the end, then compare with an uninterrupted run
    finish = subprocess.run([*cmd, "0"], capture_output=True, text=True, timeout=120)
    assert finish.returncode == 0, finish.stderr
    assert _check_consistent(path, sampler, checked=done) == n
    reference = tmp_path / "reference.sqlite"
    journal_worker.fill(reference, n)
    assert _content(path, sampler) == _content(reference, sampler)


def test_conditioning_digest_is_by_value_and_ignores_object_identity():
    import torch

    from qua2sedimo.search.journal import conditioning_digest

    class Hook:  # an object whose repr holds its address (ComfyUI puts such objects into conditioning dicts)
        pass

    t = torch.arange(12, dtype=torch.float32).reshape(1, 3, 4)
    cond = [[t, {"pooled_output": t[0, 0], "hook": Hook(), "strength": 1.0}]]
    same = [[t.clone(), {"strength": 1.0, "hook": Hook(), "pooled_output": t[0, 0].clone()}]]
    assert conditioning_digest(cond, None) == conditioning_digest(same, None)
    changed = [[t + 1, {"pooled_output": t[0, 0], "hook": Hook(), "strength": 1.0}]]
    assert conditioning_digest(changed, None) != conditioning_digest(cond, None)
    assert conditioning_digest([[t.half(), cond[0][1]]], None) != conditioning_digest(cond, None)  # dtype counts
    assert conditioning_digest(cond, None) != conditioning_digest(None, cond)  # positive vs negative
    other = [[t, {"pooled_output": t[0, 0], "hook": Hook(), "strength": 0.5}]]
    assert conditioning_digest(other, None) != conditioning_digest(cond, None)
