"""The search journal: every evaluated configuration, in SQLite (WAL), keyed by model and objective settings.

One journal file belongs to **one model** (its layer-table fingerprint) and holds one or more **runs**; a run is
keyed by ``(model fingerprint, objective, settings)`` — e.g. the same model under two objectives is two runs in one
file. Opening a file made for another model fails (``allow_other_model=True`` adds the other model's runs anyway).
Re-opening with the same key resumes the run: :meth:`Journal.done_indices` tells which sampler indices are done.

Durability and safety:

* every :meth:`Journal.add` is one transaction (``BEGIN IMMEDIATE … COMMIT``) in WAL mode with
  ``synchronous=FULL``: a committed evaluation survives kill -9 *and* power loss; the fsync per commit is noise next
  to an evaluation's seconds. A kill at any moment loses at most the evaluation in flight.
* a new file is built under a temporary name and hard-linked into place, so the journal path either does not
  exist or holds a complete, empty journal.
* an existing file is validated through a **read-only** connection (SQLite magic, ``PRAGMA quick_check``, format,
  schema version, model) before anything may write to it: a file that fails is left byte-for-byte untouched.
* one writer per journal file: an exclusive ``flock`` on the sidecar ``<journal>.lock`` (released by the OS when the
  process dies, even on kill -9; ``msvcrt`` byte lock on Windows; no lock where neither exists). Read-only opens
  (status, reports) take no lock and work while a search writes. The lock file is never deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
import socket
import sqlite3
import tempfile
import threading
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..quant.atomic import atomic_path
from ..quant.options import parse_option
from .sampling import config_key

__all__ = ["JOURNAL_FORMAT", "SCHEMA_VERSION", "Journal", "JournalError", "JournalLocked", "Record", "RunInfo"]

JOURNAL_FORMAT = "qua2sedimo.journal"
SCHEMA_VERSION = 1
APPLICATION_ID = 0x51325344  # "Q2SD" in the SQLite header: a journal is recognisable without reading tables
_SQLITE_MAGIC = b"SQLite format 3\x00"
_MOVE_ASIDE = "The file was left untouched; move it aside (or choose another journal path) to start a new journal."

_SCHEMA = f"""
PRAGMA application_id = {APPLICATION_ID};
BEGIN;
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
CREATE TABLE runs (
    id INTEGER PRIMARY KEY,
    run_key TEXT NOT NULL UNIQUE,
    model_fingerprint TEXT NOT NULL,
    objective TEXT NOT NULL,
    settings TEXT NOT NULL,
    layer_names TEXT,
    created REAL NOT NULL
);
CREATE TABLE evals (
    id INTEGER PRIMARY KEY,
    run_id INTEGER NOT NULL REFERENCES runs (id),
    idx INTEGER CHECK (idx IS NULL OR idx >= 0),
    config_key TEXT NOT NULL,
    options TEXT NOT NULL,
    avg_bits REAL NOT NULL,
    nbytes INTEGER NOT NULL,
    objective_values TEXT NOT NULL,
    primary_value REAL,
    timings TEXT NOT NULL,
    source TEXT NOT NULL,
    created REAL NOT NULL,
    UNIQUE (run_id, config_key)
);
CREATE UNIQUE INDEX evals_run_idx ON evals (run_id, idx) WHERE idx IS NOT NULL;
COMMIT;
"""


class JournalError(ValueError):
    """A journal that cannot be used as asked (missing, corrupt, foreign, too new, another model, locked, …)."""


class JournalLocked(JournalError):
    """Another process is writing the journal (its writer lock, or SQLite's lock beyond the busy timeout)."""


@dataclass(frozen=True)
class Record:
    """One evaluated configuration of a run."""

    id: int
    idx: int | None
    config_key: str
    options: dict[str, str]
    avg_bits: float
    nbytes: int
    values: dict[str, float]
    primary: float
    timings: dict[str, float]
    source: str
    created: float

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "idx": self.idx,
            "config_key": self.config_key,
            "source": self.source,
            "avg_bits": self.avg_bits,
            "nbytes": self.nbytes,
            "primary": self.primary,
            "values": self.values,
            "timings": self.timings,
            "created": self.created,
            "options": self.options,
        }


@dataclass(frozen=True)
class RunInfo:
    """A run stored in a journal file."""

    id: int
    model_fingerprint: str
    objective: str
    settings: dict
    created: float
    n_evals: int


def _canonical(obj: object, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable with finite numbers ({e})") from None


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _float_map(values: object, what: str) -> dict[str, float]:
    if not isinstance(values, Mapping):
        raise ValueError(f"{what} must be a dict name → number, got {type(values).__name__}")
    out = {}
    for k, v in values.items():
        if not isinstance(k, str) or isinstance(v, bool):
            raise ValueError(f"{what}: entry {k!r}: {v!r} must map a name to a number")
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            raise ValueError(f"{what}: entry {k!r}: {v!r} is not a number") from None
    return out


# ----------------------------------------------------------------------------------------------- writer lock
class _WriterLock:
    """Exclusive advisory lock on ``<journal>.lock``; the OS drops it when the holder dies."""

    def __init__(self, journal: Path) -> None:
        self.path = journal.with_name(journal.name + ".lock")
        self.journal = journal
        self.fd: int | None = None

    def acquire(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise JournalError(
                f"cannot create the writer lock {str(self.path)!r} ({e}); the journal's folder must be writable"
            ) from None
        try:
            locked = self._try_lock(fd)
        except OSError:
            holder = self._holder()
            os.close(fd)
            raise JournalLocked(
                f"journal {str(self.journal)!r} is being written by another process ({holder}): another search "
                "may be running on it. Stop it or wait for it to finish; opening read-only works meanwhile."
            ) from None
        if not locked:
            warnings.warn(
                f"no file locking on this platform: make sure only one search writes {str(self.journal)!r}",
                stacklevel=3,
            )
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": _now_iso()}
        with contextlib.suppress(OSError):  # only for the message a second writer gets
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(info).encode())

    @staticmethod
    def _try_lock(fd: int) -> bool:
        try:
            import fcntl
        except ImportError:
            fcntl = None
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise
            except OSError:  # e.g. ENOLCK / EOPNOTSUPP on some network file systems: no lock to be had
                return False
            return True
        try:
            import msvcrt
        except ImportError:
            return False
        msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        return True

    def _holder(self) -> str:
        try:
            info = json.loads(self.path.read_text(encoding="utf-8"))
            return f"pid {info['pid']} on {info['host']} since {info['since']}"
        except (OSError, ValueError, KeyError, TypeError):
            return "holder unknown"

    def release(self) -> None:
        if self.fd is None:
            return
        fd, self.fd = self.fd, None
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the last descriptor drops flock / msvcrt locks


# ---------------------------------------------------------------------------------------------------- journal
class Journal:
    """A run of a journal file: add evaluated configs, list them, resume, export. Use :meth:`Journal.open`."""

    def __init__(self, *_: object, **__: object) -> None:
        raise TypeError("use Journal.open(path, model_fingerprint=..., objective=..., settings=...)")

    # ------------------------------------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: str | os.PathLike,
        *,
        model_fingerprint: str,
        objective: str,
        settings: Mapping | None = None,
        layer_names: Sequence[str] | None = None,
        create: bool = True,
        readonly: bool = False,
        allow_other_model: bool = False,
        busy_timeout: float = 10.0,
    ) -> Journal:
        """Open (or create) the run ``(model_fingerprint, objective, settings)`` of the journal at ``path``.

        ``create``: make the file and/or the run when missing (ignored with ``readonly``). ``readonly``: no writer
        lock, no writes, the run must exist. ``layer_names``: when given, every added config must cover exactly these
        layers (they are stored with a new run and checked against a stored list). ``busy_timeout``: seconds to wait
        for SQLite's lock before failing with :class:`JournalLocked`. Raises :class:`JournalError` otherwise.
        """
        if not isinstance(model_fingerprint, str) or not model_fingerprint:
            raise ValueError("model_fingerprint must be a non-empty string (e.g. layers_fingerprint(layers))")
        if not isinstance(objective, str) or not objective:
            raise ValueError("objective must be a non-empty string naming the objective (e.g. 'denoise_error')")
        settings = dict(settings or {})
        settings_json = _canonical(settings, "objective settings")
        names: list[str] | None = None
        if layer_names is not None:
            names = list(layer_names)
            if not names or not all(isinstance(n, str) and n for n in names) or len(set(names)) != len(names):
                raise ValueError("layer_names must be a non-empty list of distinct layer names")
        path = Path(path).expanduser().absolute()
        self = object.__new__(cls)
        self._path = path
        self._readonly = bool(readonly)
        self._busy = float(busy_timeout)
        self._mu = threading.RLock()
        self._con = None
        self._lock = None
        self.model_fingerprint = model_fingerprint
        self.objective = objective
        self.settings = json.loads(settings_json)
        self._run_key = hashlib.sha256(
            _canonical({"model": model_fingerprint, "objective": objective, "settings": settings}, "run key").encode()
        ).hexdigest()
        try:
            self._open(create=create, allow_other_model=allow_other_model, names=names, settings_json=settings_json)
        except BaseException:
            self.close()
            raise
        return self

    def _open(self, *, create: bool, allow_other_model: bool, names: list[str] | None, settings_json: str) -> None:
        path = self._path
        if not path.exists():
            if self._readonly or not create:
                raise JournalError(f"no journal at {str(path)!r} (check the path, or open with create=True)")
            path.parent.mkdir(parents=True, exist_ok=True)
            self._lock = _WriterLock(path)
            self._lock.acquire()
            if not path.exists():  # still missing now that we hold the writer lock
                self._create_file()
        self._check_header()
        con = self._connect(readonly=True)
        try:
            self._validate(con, allow_other_model)
        except BaseException:
            con.close()
            raise
        if self._readonly:
            self._con = con
        else:
            con.close()
            if self._lock is None:
                self._lock = _WriterLock(path)
                self._lock.acquire()
            self._con = self._connect(readonly=False)
        with self._sql("open the run"):
            self._con.execute("PRAGMA foreign_keys = ON")
            if not self._readonly:
                if self._con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    self._con.execute("PRAGMA journal_mode = WAL")
                self._con.execute("PRAGMA synchronous = FULL")
            self._bind_run(names, settings_json, create)

    def _connect(self, readonly: bool) -> sqlite3.Connection:
        uri = self._path.as_uri() + ("?mode=ro" if readonly else "?mode=rw")
        with self._sql("open the database"):
            return sqlite3.connect(
                uri, uri=True, timeout=self._busy, isolation_level=None, check_same_thread=False
            )

    def _create_file(self) -> None:
        """Build an empty journal under a temporary name, then link it into place (never a half-made journal)."""
        path = self._path
        for stale in path.parent.iterdir():  # left by a creator that died (we hold the lock, so none is live)
            if stale.name.startswith(f".{path.name}.") and stale.name.endswith((".new", ".new-wal", ".new-shm")):
                with contextlib.suppress(OSError):
                    stale.unlink()
        fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            con = sqlite3.connect(tmp, isolation_level=None)
            try:
                con.execute("PRAGMA journal_mode = WAL")
                con.executescript(_SCHEMA)
                meta = {
                    "format": JOURNAL_FORMAT,
                    "schema_version": str(SCHEMA_VERSION),
                    "created": _now_iso(),
                    "model_fingerprint": self.model_fingerprint,
                    "created_by": _package_version(),
                }
                con.execute("BEGIN")
                con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
                con.execute("COMMIT")
            finally:
                con.close()  # checkpoints and removes the WAL: everything is in the main file
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                raise JournalError(f"{str(path)!r} appeared while creating a journal there; open it again") from None
            except OSError:  # no hard links on this file system: rename (we hold the writer lock)
                if path.exists():
                    raise JournalError(f"{str(path)!r} appeared while creating a journal; open it again") from None
                os.replace(tmp, path)
        finally:
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(str(tmp) + suffix)
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _check_header(self) -> None:
        """Before SQLite opens the file: is it a regular file with the SQLite magic?"""
        path = self._path
        where = str(path)
        if not path.is_file():
            raise JournalError(f"{where!r} is not a regular file; choose a file path for the journal")
        try:
            with open(path, "rb") as f:
                head = f.read(100)
        except OSError as e:
            raise JournalError(f"cannot read journal {where!r}: {e}") from None
        if not head.startswith(_SQLITE_MAGIC) or len(head) < 100:
            what = "is empty" if not head else "is not a SQLite database (wrong header)"
            raise JournalError(f"{where!r} {what}, so it is not a Qua2SeDiMo journal. {_MOVE_ASIDE}")
        # SQLite reads missing bytes as zeros, so a cut-off file can pass quick_check: check the size first.
        page = int.from_bytes(head[16:18], "big")
        page = 65536 if page == 1 else page
        size = path.stat().st_size
        header_pages = int.from_bytes(head[28:32], "big")
        header_size_valid = head[24:28] == head[92:96]
        wal = path.with_name(path.name + "-wal")
        wal_pending = wal.exists() and wal.stat().st_size > 0  # a checkpoint may be under way: sizes may lag
        if page < 512 or page & (page - 1) or size % page or (
            header_size_valid and not wal_pending and header_pages * page > size
        ):
            raise JournalError(
                f"journal {where!r} is truncated or corrupt ({size} bytes, pages of {page} bytes). {_MOVE_ASIDE}"
            )

    def _validate(self, con: sqlite3.Connection, allow_other_model: bool) -> None:
        """Read-only checks of an existing file through ``con``; raises before anything could write to it."""
        where = str(self._path)
        try:
            problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise JournalError(
                    f"journal {where!r} is corrupt (SQLite quick_check: {'; '.join(problems[:3])}). {_MOVE_ASIDE}"
                )
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta: dict[str, str] = {}
            if app_id == APPLICATION_ID and "meta" in tables:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise self._locked_error() from None
            raise JournalError(f"journal {where!r} is corrupt or unreadable ({e}). {_MOVE_ASIDE}") from None
        except sqlite3.DatabaseError as e:
            raise JournalError(f"journal {where!r} is corrupt or unreadable ({e}). {_MOVE_ASIDE}") from None
        if meta.get("format") != JOURNAL_FORMAT or app_id != APPLICATION_ID:
            found = f"format {meta['format']!r}" if "format" in meta else "no journal metadata in its header"
            raise JournalError(
                f"{where!r} is a SQLite database but not a Qua2SeDiMo journal ({found}; another program's file?). "
                + _MOVE_ASIDE
            )
        try:
            version = int(meta.get("schema_version", ""))
        except ValueError:
            raise JournalError(f"journal {where!r} has no valid schema version. {_MOVE_ASIDE}") from None
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {where!r} was written by a newer release (schema {version}; this one reads up to "
                f"{SCHEMA_VERSION}). Update the node pack to continue this search; the file was left untouched."
            )
        if version < 1 or not {"runs", "evals"} <= tables:
            raise JournalError(f"journal {where!r} is incomplete (schema {version}, tables missing). {_MOVE_ASIDE}")
        with self._sql("read the runs"):
            models = [r[0] for r in con.execute("SELECT DISTINCT model_fingerprint FROM runs")]
        owner = meta.get("model_fingerprint", "")
        if self.model_fingerprint not in {owner, *models} and not allow_other_model:
            raise JournalError(
                f"journal {where!r} belongs to another model (fingerprint {owner}; this model is "
                f"{self.model_fingerprint}). The file was left untouched: use another journal file for this model, "
                "or pass allow_other_model=True to keep both models' runs in it."
            )

    def _bind_run(self, names: list[str] | None, settings_json: str, create: bool) -> None:
        con = self._con
        row = con.execute("SELECT id, layer_names FROM runs WHERE run_key = ?", (self._run_key,)).fetchone()
        if row is None:
            if self._readonly or not create:
                runs = ", ".join(f"{r.objective} {json.dumps(r.settings, sort_keys=True)}" for r in self._runs(con))
                raise JournalError(
                    f"journal {str(self._path)!r} has no run for objective {self.objective!r} with these settings "
                    f"and this model (runs there: {runs or 'none'})"
                )
            con.execute("BEGIN IMMEDIATE")
            try:
                cur = con.execute(
                    "INSERT INTO runs (run_key, model_fingerprint, objective, settings, layer_names, created) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (self._run_key, self.model_fingerprint, self.objective, settings_json,
                     None if names is None else json.dumps(names), time.time()),
                )
                con.execute("COMMIT")
            except BaseException:
                _rollback(con)
                raise
            self._run_id = int(cur.lastrowid)
            self._names = names
            return
        self._run_id = int(row[0])
        stored = None if row[1] is None else json.loads(row[1])
        if names is not None and stored is not None and stored != names:
            raise JournalError(
                f"journal {str(self._path)!r}: the run's stored layer names differ from the ones given "
                f"({len(stored)} vs {len(names)} layers) although the model fingerprint matches; check the model"
            )
        if names is not None and stored is None and not self._readonly:
            con.execute("UPDATE runs SET layer_names = ? WHERE id = ?", (json.dumps(names), self._run_id))
        self._names = names if names is not None else stored

    # ------------------------------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def _sql(self, what: str) -> Iterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                raise self._locked_error() from None
            raise JournalError(f"journal {str(self._path)!r}: could not {what} ({e})") from None
        except sqlite3.DatabaseError as e:
            raise JournalError(f"journal {str(self._path)!r}: could not {what} ({e})") from None

    def _locked_error(self) -> JournalLocked:
        return JournalLocked(
            f"journal {str(self._path)!r} stayed locked by another process for {self._busy:g} s: another search may "
            "be running on it. Wait for it or stop it (reading it read-only works meanwhile)."
        )

    def _check_open(self) -> sqlite3.Connection:
        if self._con is None:
            raise JournalError(f"journal {str(self._path)!r} is closed")
        return self._con

    @staticmethod
    def _runs(con: sqlite3.Connection) -> list[RunInfo]:
        rows = con.execute(
            "SELECT r.id, r.model_fingerprint, r.objective, r.settings, r.created, "
            "(SELECT COUNT(*) FROM evals e WHERE e.run_id = r.id) FROM runs r ORDER BY r.id"
        ).fetchall()
        return [RunInfo(int(i), fp, obj, json.loads(s), float(c), int(n)) for i, fp, obj, s, c, n in rows]

    # ---------------------------------------------------------------------------------------------- API
    @property
    def path(self) -> Path:
        return self._path

    @property
    def readonly(self) -> bool:
        return self._readonly

    @property
    def run_id(self) -> int:
        return self._run_id

    @property
    def layer_names(self) -> list[str] | None:
        return None if self._names is None else list(self._names)

    def add(
        self,
        options: Mapping[str, str],
        *,
        avg_bits: float,
        nbytes: int,
        values: Mapping[str, float],
        primary: float,
        timings: Mapping[str, float] | None = None,
        idx: int | None = None,
        source: str = "random",
    ) -> int:
        """Record one evaluated config in one transaction; returns its row id.

        A config already in the run (same :func:`config_key`) is not stored twice: its existing id is returned.
        ``idx`` is the sampler index (``None`` for constructed/uniform configs); ``primary`` the objective value
        that ranks configs (lower is better for :meth:`best` unless told); values may be non-finite (NaN, inf).
        """
        if self._readonly:
            raise JournalError(f"journal {str(self._path)!r} was opened read-only; open it without readonly to add")
        if not isinstance(options, Mapping) or not options:
            raise ValueError("options must be a non-empty dict layer name → option")
        options = dict(options)
        for name, option in options.items():
            if not isinstance(name, str):
                raise ValueError(f"layer names must be strings, got {name!r}")
            parse_option(option, name)
        if self._names is not None and set(options) != set(self._names):
            missing = [n for n in self._names if n not in options]
            extra = [n for n in options if n not in set(self._names)]
            raise ValueError(
                f"options must cover exactly the run's {len(self._names)} layers "
                f"(missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
                f"unknown {extra[:3]}{'…' if len(extra) > 3 else ''})"
            )
        try:
            avg_bits_f = float(avg_bits)
            nbytes_i = operator.index(nbytes)
            primary_f = float(primary)
        except TypeError:
            raise ValueError("avg_bits and primary must be numbers and nbytes an integer") from None
        if not math.isfinite(avg_bits_f) or avg_bits_f <= 0 or nbytes_i < 0:
            raise ValueError(f"avg_bits must be a positive number and nbytes >= 0 (got {avg_bits!r}, {nbytes!r})")
        values_d = _float_map(values, "values")
        timings_d = _float_map(timings or {}, "timings")
        if idx is not None:
            if isinstance(idx, bool):
                raise ValueError(f"idx must be a non-negative integer or None, got {idx!r}")
            idx = operator.index(idx)
            if idx < 0:
                raise ValueError(f"idx must be a non-negative integer or None, got {idx!r}")
        if not isinstance(source, str) or not source:
            raise ValueError("source must be a non-empty string such as 'random', 'constructed' or 'uniform'")
        key = config_key(options)
        row = (
            self._run_id, idx, key, json.dumps(options, separators=(",", ":"), ensure_ascii=False),
            avg_bits_f, nbytes_i, json.dumps(values_d), None if math.isnan(primary_f) else primary_f,
            json.dumps(timings_d), source, time.time(),
        )
        with self._mu, self._sql("add an evaluation"):
            con = self._check_open()
            con.execute("BEGIN IMMEDIATE")
            try:
                found = con.execute(
                    "SELECT id FROM evals WHERE run_id = ? AND config_key = ?", (self._run_id, key)
                ).fetchone()
                if found is not None:
                    con.execute("ROLLBACK")
                    return int(found[0])
                cur = con.execute(
                    "INSERT INTO evals (run_id, idx, config_key, options, avg_bits, nbytes, objective_values, "
                    "primary_value, timings, source, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                con.execute("COMMIT")
            except sqlite3.IntegrityError:
                _rollback(con)
                raise JournalError(
                    f"journal {str(self._path)!r}: sampler index {idx} is already recorded with another config; "
                    "the sampler settings changed since the run started: put them into the run settings or use "
                    "a new run"
                ) from None
            except BaseException:
                _rollback(con)
                raise
            return int(cur.lastrowid)

    def __len__(self) -> int:
        with self._mu, self._sql("count evaluations"):
            return int(
                self._check_open().execute("SELECT COUNT(*) FROM evals WHERE run_id = ?", (self._run_id,)).fetchone()[0]
            )

    def records(self, source: str | None = None) -> list[Record]:
        """Every evaluation of the run in insertion order (only ``source`` ones when given)."""
        sql = (
            "SELECT id, idx, config_key, options, avg_bits, nbytes, objective_values, primary_value, timings, source, "
            "created FROM evals WHERE run_id = ?"
        )
        args: tuple = (self._run_id,)
        if source is not None:
            sql, args = sql + " AND source = ?", (*args, source)
        with self._mu, self._sql("read evaluations"):
            rows = self._check_open().execute(sql + " ORDER BY id", args).fetchall()
        return [_record(r) for r in rows]

    def done_indices(self) -> set[int]:
        """Sampler indices already evaluated in this run (skip them when resuming)."""
        with self._mu, self._sql("read evaluations"):
            rows = self._check_open().execute(
                "SELECT idx FROM evals WHERE run_id = ? AND idx IS NOT NULL", (self._run_id,)
            ).fetchall()
        return {int(r[0]) for r in rows}

    def has(self, key: str) -> bool:
        """Whether a config with this :func:`config_key` is recorded in the run."""
        with self._mu, self._sql("read evaluations"):
            return (
                self._check_open().execute(
                    "SELECT 1 FROM evals WHERE run_id = ? AND config_key = ?", (self._run_id, key)
                ).fetchone()
                is not None
            )

    def best(self, n: int = 1, *, lower_is_better: bool = True) -> list[Record]:
        """The ``n`` best evaluations by primary value (NaN last), ties by insertion order."""
        order = "ASC" if lower_is_better else "DESC"
        with self._mu, self._sql("read evaluations"):
            rows = self._check_open().execute(
                "SELECT id, idx, config_key, options, avg_bits, nbytes, objective_values, primary_value, timings, "
                f"source, created FROM evals WHERE run_id = ? ORDER BY primary_value IS NULL, primary_value {order}, "
                "id LIMIT ?",
                (self._run_id, int(n)),
            ).fetchall()
        return [_record(r) for r in rows]

    def export_jsonl(self, path: str | os.PathLike) -> Path:
        """Write the run as JSON lines, atomically: a header object, then one object per evaluation."""
        header = {
            "format": JOURNAL_FORMAT + ".jsonl",
            "schema_version": SCHEMA_VERSION,
            "model_fingerprint": self.model_fingerprint,
            "objective": self.objective,
            "settings": self.settings,
            "layer_names": self.layer_names,
            "exported": _now_iso(),
        }
        records = self.records()
        target = Path(path)
        with atomic_path(target) as tmp, open(tmp, "w", encoding="utf-8", newline="\n") as f:
            f.write(json.dumps(header, ensure_ascii=False) + "\n")
            for record in records:
                f.write(json.dumps(record.to_json(), ensure_ascii=False) + "\n")
        return target

    @staticmethod
    def list_runs(path: str | os.PathLike, busy_timeout: float = 10.0) -> list[RunInfo]:
        """The runs of a journal file (read-only, no validation of the model)."""
        path = Path(path).expanduser().absolute()
        if not path.is_file():
            raise JournalError(f"no journal at {str(path)!r}")
        probe = object.__new__(Journal)
        probe._path, probe._busy, probe._readonly, probe.model_fingerprint = path, float(busy_timeout), True, ""
        probe._check_header()
        con = probe._connect(readonly=True)
        try:
            probe._validate(con, allow_other_model=True)
            with probe._sql("read the runs"):
                return Journal._runs(con)
        finally:
            con.close()

    def close(self) -> None:
        """Close the database and release the writer lock (idempotent)."""
        with self._mu:
            con, self._con = self._con, None
            if con is not None:
                with contextlib.suppress(sqlite3.Error):
                    con.close()
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.release()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._con is None else ("read-only" if self._readonly else "open")
        run = getattr(self, "_run_id", "?")
        return f"Journal({str(self._path)!r}, objective={self.objective!r}, run {run}, {state})"


def _record(row: tuple) -> Record:
    rid, idx, key, options, avg_bits, nbytes, values, primary, timings, source, created = row
    return Record(
        id=int(rid),
        idx=None if idx is None else int(idx),
        config_key=key,
        options=json.loads(options),
        avg_bits=float(avg_bits),
        nbytes=int(nbytes),
        values=json.loads(values),
        primary=math.nan if primary is None else float(primary),
        timings=json.loads(timings),
        source=source,
        created=float(created),
    )


def _is_busy(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return "locked" in text or "busy" in text


def _rollback(con: sqlite3.Connection) -> None:
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")


def _package_version() -> str:
    try:
        from .. import __version__
    except ImportError:
        return "qua2sedimo"
    return f"qua2sedimo {__version__}"
