"""A search journal *file*: create it, check it, open SQLite connections to it, and hold its writer lock.

What a run does with the file (add, read, resume, export) is in :mod:`.journal`; this module knows nothing of runs
beyond listing them. Safety rules, all here:

* a new file is built under a temporary name, checkpointed (explicitly: ``close()`` hides a failed checkpoint),
  read back and only then hard-linked into place, so the journal path either does not exist or holds a complete,
  empty journal; any failure (a full disk) removes the temporary file and says so.
* an existing file is validated through a **read-only** connection (SQLite magic, ``PRAGMA quick_check``, format,
  schema version, model) before anything may write to it: a file that fails is left byte-for-byte untouched.
* a journal on read-only media (or where this process may not write) is reported as read-only, never as corrupt;
  read-only opens of a cleanly closed journal there work (SQLite's ``immutable`` mode: no WAL index to write).
* one writer per journal file: an exclusive ``flock`` on the sidecar ``<journal>.lock`` (released by the OS when the
  process dies, even on kill -9; ``msvcrt`` byte lock on Windows; no lock where neither exists). Read-only opens
  (status, reports) take no lock and work while a search writes. The lock file is never deleted.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import sqlite3
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

__all__ = [
    "APPLICATION_ID", "JOURNAL_FORMAT", "SCHEMA_VERSION", "JournalError", "JournalFile", "JournalLocked",
    "JournalReadOnly", "RunInfo",
]

JOURNAL_FORMAT = "qua2sedimo.journal"
SCHEMA_VERSION = 1
APPLICATION_ID = 0x51325344  # "Q2SD" in the SQLite header: a journal is recognisable without reading tables
_SQLITE_MAGIC = b"SQLite format 3\x00"
MOVE_ASIDE = "The file was left untouched; move it aside (or choose another journal path) to start a new journal."

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


class JournalReadOnly(JournalError):
    """The journal cannot be written (or its WAL read) where it is: read-only media or permissions. It is intact."""


@dataclass(frozen=True)
class RunInfo:
    """A run stored in a journal file."""

    id: int
    model_fingerprint: str
    objective: str
    settings: dict
    created: float
    n_evals: int


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def is_busy(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return "locked" in text or "busy" in text


def _is_readonly_error(e: sqlite3.Error) -> bool:
    text = str(e).lower()
    return "readonly database" in text or "read-only" in text


def writable(path: Path) -> bool:
    """Whether this process may write ``path`` (file or folder): ``access(2)``, which also sees read-only mounts and
    immutable files (even for root)."""
    return os.access(path, os.W_OK)


def rollback(con: sqlite3.Connection) -> None:
    if con.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            con.execute("ROLLBACK")


def read_only_message(journal: Path) -> str:
    return (
        f"journal {str(journal)!r} is read-only here (read-only media, or no write permission on the file or its "
        "folder); it was left untouched and is not corrupt. To continue this search, copy it (with its -wal file, "
        "if there is one) to a writable folder and use the copy; opening it read-only (status, reports) works in "
        "place when it was closed cleanly."
    )


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
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise JournalReadOnly(read_only_message(self.journal)) from None
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
                stacklevel=4,
            )
        self.fd = fd
        info = {"pid": os.getpid(), "host": socket.gethostname(), "since": now_iso()}
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


# ------------------------------------------------------------------------------------------------ the file
class JournalFile:
    """One journal file: validated, opened read-only or for writing (holding its writer lock), created atomically.

    ``model_fingerprint`` is the model the caller works on ("" accepts any model, for listing runs).
    """

    def __init__(self, path: str | os.PathLike, *, model_fingerprint: str = "", busy_timeout: float = 10.0) -> None:
        self.path = Path(path).expanduser().absolute()
        self.model_fingerprint = model_fingerprint
        self.busy = float(busy_timeout)
        self._lock: _WriterLock | None = None

    # ------------------------------------------------------------------------------------------------ open
    def open(self, *, create: bool, readonly: bool, allow_other_model: bool) -> sqlite3.Connection:
        """A connection to the validated file: read-only (no lock), or read-write holding the writer lock in WAL mode
        with ``synchronous=FULL``. ``create`` makes a missing file (never with ``readonly``)."""
        path = self.path
        if not path.exists():
            if readonly or not create:
                raise JournalError(f"no journal at {str(path)!r} (check the path, or open with create=True)")
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise JournalError(f"cannot create the journal's folder {str(path.parent)!r} ({e})") from None
            self.acquire_lock()
            if not path.exists():  # still missing now that we hold the writer lock
                self.create()
        self.check_header()
        if not readonly and not self.writable_here():
            raise JournalReadOnly(read_only_message(path))
        con = self.connect(readonly=True)
        try:
            self.validate(con, allow_other_model)
        except BaseException:
            con.close()
            raise
        if readonly:
            with self.sql("open the database"):
                con.execute("PRAGMA foreign_keys = ON")
            return con
        con.close()
        self.acquire_lock()
        con = self.connect(readonly=False)
        try:
            with self.sql("open the run"):
                con.execute("PRAGMA foreign_keys = ON")
                if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
                    con.execute("PRAGMA journal_mode = WAL")
                con.execute("PRAGMA synchronous = FULL")
        except BaseException:
            con.close()
            raise
        return con

    def writable_here(self) -> bool:
        """Whether this process can write the journal and create its sidecars (-wal, -shm, .lock) beside it."""
        return writable(self.path) and writable(self.path.parent)

    def _wal_pending(self) -> bool:
        wal = self.path.with_name(self.path.name + "-wal")
        return wal.exists() and wal.stat().st_size > 0

    def connect(self, readonly: bool) -> sqlite3.Connection:
        """A connection; read-only on read-only media with no unfinished WAL: ``immutable`` (SQLite would otherwise
        have to create a WAL index beside the file, and fail)."""
        mode = "?mode=rw"
        if readonly:
            immutable = not writable(self.path) and not writable(self.path.parent) and not self._wal_pending()
            mode = "?mode=ro&immutable=1" if immutable else "?mode=ro"
        uri = self.path.as_uri() + mode
        with self.sql("open the database"):
            return sqlite3.connect(uri, uri=True, timeout=self.busy, isolation_level=None, check_same_thread=False)

    def acquire_lock(self) -> None:
        """Take the file's writer lock (idempotent); :class:`JournalLocked` when another process holds it."""
        if self._lock is None:
            lock = _WriterLock(self.path)
            lock.acquire()
            self._lock = lock

    def release_lock(self) -> None:
        lock, self._lock = self._lock, None
        if lock is not None:
            lock.release()

    @property
    def locked(self) -> bool:
        return self._lock is not None

    # ---------------------------------------------------------------------------------------------- create
    def create(self) -> None:
        """Build an empty journal under a temporary name, checkpoint it into one file, read it back, then link it into
        place. Any failure (a full disk, …) leaves no journal in place and no temporary file: :class:`JournalError`."""
        path = self.path
        for stale in path.parent.iterdir():  # left by a creator that died (we hold the lock, so none is live)
            if stale.name.startswith(f".{path.name}.") and stale.name.endswith((".new", ".new-wal", ".new-shm")):
                with contextlib.suppress(OSError):
                    stale.unlink()
        tmp: Path | None = None
        try:
            fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".new", dir=path.parent)
            os.close(fd)
            tmp = Path(tmp_name)
            self._build(tmp)
            self._verify_new(tmp)
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
        except (sqlite3.Error, OSError) as e:
            full = "full" in str(e).lower() or getattr(e, "errno", None) == 28  # ENOSPC
            raise JournalError(
                f"could not create the journal {str(path)!r} ({e}); nothing was put in its place. "
                + ("Free some disk space (or choose a journal folder on another disk) and try again."
                   if full else "Check that the folder is writable and has free space, then try again.")
            ) from None
        finally:
            if tmp is not None:
                for suffix in ("", "-wal", "-shm"):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(str(tmp) + suffix)
        with contextlib.suppress(OSError):
            dir_fd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)

    def _build(self, tmp: Path) -> None:
        """Schema and metadata into ``tmp``, then an explicit checkpoint: ``close()`` would hide a failed one
        (a full disk), leaving the schema in a WAL file that is not linked with it."""
        con = sqlite3.connect(tmp, isolation_level=None)
        try:
            con.execute("PRAGMA journal_mode = WAL")
            con.executescript(_SCHEMA)
            meta = {
                "format": JOURNAL_FORMAT,
                "schema_version": str(SCHEMA_VERSION),
                "created": now_iso(),
                "model_fingerprint": self.model_fingerprint,
                "created_by": _package_version(),
            }
            con.execute("BEGIN")
            con.executemany("INSERT INTO meta (key, value) VALUES (?, ?)", list(meta.items()))
            con.execute("COMMIT")
            busy, log, done = con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
            if busy or log != done:
                raise JournalError(f"could not create the journal {str(self.path)!r}: its checkpoint did not "
                                   f"complete ({done} of {log} pages); nothing was put in its place. Try again.")
        finally:
            con.close()

    def _verify_new(self, tmp: Path) -> None:
        """Read the new file back as a journal: everything in the main file (no WAL left), valid, ours."""
        wal = Path(str(tmp) + "-wal")
        if wal.exists() and wal.stat().st_size > 0:
            raise JournalError(f"could not create the journal {str(self.path)!r}: the new file's write-ahead log was "
                               "not checkpointed (a full disk?); nothing was put in its place. Free space and retry.")
        probe = JournalFile(tmp, model_fingerprint=self.model_fingerprint, busy_timeout=self.busy)
        try:
            probe.check_header()
            con = probe.connect(readonly=True)
            try:
                probe.validate(con, allow_other_model=False)
            finally:
                con.close()
        except JournalError as e:
            raise JournalError(f"could not create the journal {str(self.path)!r}: the new file did not read back "
                               f"({e}); nothing was put in its place") from None

    # -------------------------------------------------------------------------------------------- validate
    def check_header(self) -> None:
        """Before SQLite opens the file: is it a regular file with the SQLite magic?"""
        path = self.path
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
            raise JournalError(f"{where!r} {what}, so it is not a Qua2SeDiMo journal. {MOVE_ASIDE}")
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
                f"journal {where!r} is truncated or corrupt ({size} bytes, pages of {page} bytes). {MOVE_ASIDE}"
            )

    def validate(self, con: sqlite3.Connection, allow_other_model: bool) -> None:
        """Read-only checks of an existing file through ``con``; raises before anything could write to it."""
        where = str(self.path)
        try:
            problems = [r[0] for r in con.execute("PRAGMA quick_check").fetchall()]
            if problems != ["ok"]:
                raise JournalError(
                    f"journal {where!r} is corrupt (SQLite quick_check: {'; '.join(problems[:3])}). {MOVE_ASIDE}"
                )
            app_id = con.execute("PRAGMA application_id").fetchone()[0]
            tables = {r[0] for r in con.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta: dict[str, str] = {}
            if app_id == APPLICATION_ID and "meta" in tables:
                meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.OperationalError as e:
            if is_busy(e):
                raise self.locked_error() from None
            if _is_readonly_error(e) or not self.writable_here():
                raise JournalReadOnly(
                    f"journal {where!r} cannot be read in place ({e}): it is on read-only media or in a folder this "
                    "process cannot write, and SQLite must write beside a journal with unfinished changes (its -wal "
                    "and -shm files) to read it. The file is intact, not corrupt: copy it (with its -wal file) to a "
                    "writable folder and open the copy."
                ) from None
            raise JournalError(f"journal {where!r} is corrupt or unreadable ({e}). {MOVE_ASIDE}") from None
        except sqlite3.DatabaseError as e:
            raise JournalError(f"journal {where!r} is corrupt or unreadable ({e}). {MOVE_ASIDE}") from None
        if meta.get("format") != JOURNAL_FORMAT or app_id != APPLICATION_ID:
            found = f"format {meta['format']!r}" if "format" in meta else "no journal metadata in its header"
            raise JournalError(
                f"{where!r} is a SQLite database but not a Qua2SeDiMo journal ({found}; another program's file?). "
                + MOVE_ASIDE
            )
        try:
            version = int(meta.get("schema_version", ""))
        except ValueError:
            raise JournalError(f"journal {where!r} has no valid schema version. {MOVE_ASIDE}") from None
        if version > SCHEMA_VERSION:
            raise JournalError(
                f"journal {where!r} was written by a newer release (schema {version}; this one reads up to "
                f"{SCHEMA_VERSION}). Update the node pack to continue this search; the file was left untouched."
            )
        if version < 1 or not {"runs", "evals"} <= tables:
            raise JournalError(f"journal {where!r} is incomplete (schema {version}, tables missing). {MOVE_ASIDE}")
        if not self.model_fingerprint:
            return
        with self.sql("read the runs"):
            models = [r[0] for r in con.execute("SELECT DISTINCT model_fingerprint FROM runs")]
        owner = meta.get("model_fingerprint", "")
        if self.model_fingerprint not in {owner, *models} and not allow_other_model:
            raise JournalError(
                f"journal {where!r} belongs to another model (fingerprint {owner}; this model is "
                f"{self.model_fingerprint}). The file was left untouched: use another journal file for this model, "
                "or pass allow_other_model=True to keep both models' runs in it."
            )

    # --------------------------------------------------------------------------------------------- helpers
    @contextlib.contextmanager
    def sql(self, what: str) -> Iterator[None]:
        """SQLite errors as :class:`JournalError` (busy beyond the timeout: :class:`JournalLocked`)."""
        try:
            yield
        except sqlite3.OperationalError as e:
            if is_busy(e):
                raise self.locked_error() from None
            if _is_readonly_error(e):
                raise JournalReadOnly(read_only_message(self.path)) from None
            raise JournalError(f"journal {str(self.path)!r}: could not {what} ({e})") from None
        except sqlite3.DatabaseError as e:
            raise JournalError(f"journal {str(self.path)!r}: could not {what} ({e})") from None

    def locked_error(self) -> JournalLocked:
        return JournalLocked(
            f"journal {str(self.path)!r} stayed locked by another process for {self.busy:g} s: another search may "
            "be running on it. Wait for it or stop it (reading it read-only works meanwhile)."
        )

    @staticmethod
    def read_runs(con: sqlite3.Connection) -> list[RunInfo]:
        rows = con.execute(
            "SELECT r.id, r.model_fingerprint, r.objective, r.settings, r.created, "
            "(SELECT COUNT(*) FROM evals e WHERE e.run_id = r.id) FROM runs r ORDER BY r.id"
        ).fetchall()
        return [RunInfo(int(i), fp, obj, json.loads(s), float(c), int(n)) for i, fp, obj, s, c, n in rows]

    def list_runs(self) -> list[RunInfo]:
        """The runs of the file (read-only, any model)."""
        if not self.path.is_file():
            raise JournalError(f"no journal at {str(self.path)!r}")
        self.check_header()
        con = self.connect(readonly=True)
        try:
            self.validate(con, allow_other_model=True)
            with self.sql("read the runs"):
                return self.read_runs(con)
        finally:
            con.close()


def _package_version() -> str:
    try:
        from .. import __version__
    except ImportError:
        return "qua2sedimo"
    return f"qua2sedimo {__version__}"
