"""The search journal's runs: every evaluated configuration, keyed by model and objective settings.

One journal file (:mod:`.journal_file`: creation, validation, the writer lock) belongs to **one model** (its
layer-table fingerprint) and holds one or more **runs**; a run is keyed by ``(model fingerprint, objective,
settings)`` — e.g. the same model under two objectives is two runs in one file. Opening a file made for another
model fails (``allow_other_model=True`` adds the other model's runs anyway). Re-opening with the same key resumes
the run: :meth:`Journal.done_indices` tells which sampler indices are done.

Every :meth:`Journal.add` is one transaction (``BEGIN IMMEDIATE … COMMIT``) in WAL mode with ``synchronous=FULL``:
a committed evaluation survives kill -9 *and* power loss; the fsync per commit is noise next to an evaluation's
seconds. A kill at any moment loses at most the evaluation in flight.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import operator
import os
import sqlite3
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..quant.atomic import atomic_path
from ..quant.options import parse_option
from .journal_file import (
    APPLICATION_ID,
    JOURNAL_FORMAT,
    SCHEMA_VERSION,
    JournalError,
    JournalFile,
    JournalLocked,
    JournalReadOnly,
    RunInfo,
    now_iso,
    rollback,
)
from .sampling import config_key

__all__ = [
    "APPLICATION_ID", "JOURNAL_FORMAT", "SCHEMA_VERSION", "Journal", "JournalError", "JournalLocked",
    "JournalReadOnly", "Record", "RunInfo", "conditioning_digest",
]


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


def conditioning_digest(*conds: object) -> str:
    """A hash of conditioning (prompts) by value, part of a run's settings and so of its journal key: tensors by
    shape, dtype and bytes, mappings by sorted keys, sequences in order, plain scalars by ``repr``; any other
    object by its type name only (a ``repr`` may hold a memory address, which would make every run a new one)."""
    h = hashlib.sha256()

    def visit(v: object) -> None:
        if isinstance(v, torch.Tensor):
            h.update(repr((tuple(v.shape), str(v.dtype))).encode())
            h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(v, Mapping):
            for k in sorted(v, key=str):
                h.update(repr(k).encode())
                visit(v[k])
        elif isinstance(v, list | tuple):
            for x in v:
                visit(x)
        elif isinstance(v, int | float | str | bool) or v is None:
            h.update(repr(v).encode())
        else:
            h.update(type(v).__qualname__.encode())

    for c in conds:
        visit(c)
    return h.hexdigest()[:16]


def _canonical(obj: object, what: str) -> str:
    try:
        return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{what} must be JSON-serializable with finite numbers ({e})") from None


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


# ---------------------------------------------------------------------------------------------------- journal
class Journal:
    """A run of a journal file: add evaluated configs, list them, resume, export. Use :meth:`Journal.open`."""

    def __init__(self, *_: object, **__: object) -> None:
        raise TypeError("use Journal.open(path, model_fingerprint=..., objective=..., settings=...)")

    # ------------------------------------------------------------------------------------------------ open
    @classmethod
    def open(
        cls,
        path: str | os.PathLike | JournalFile,
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
        ``path`` may be a :class:`JournalFile` whose writer lock the caller took first (taken over: closing the
        journal releases it).
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
        self = object.__new__(cls)
        if isinstance(path, JournalFile):
            self._file = path
            self._file.model_fingerprint, self._file.busy = model_fingerprint, float(busy_timeout)
        else:
            self._file = JournalFile(path, model_fingerprint=model_fingerprint, busy_timeout=busy_timeout)
        self._path = self._file.path
        self._readonly = bool(readonly)
        self._mu = threading.RLock()
        self._con = None
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
        self._con = self._file.open(create=create, readonly=self._readonly, allow_other_model=allow_other_model)
        with self._sql("open the run"):
            self._bind_run(names, settings_json, create)

    def _bind_run(self, names: list[str] | None, settings_json: str, create: bool) -> None:
        con = self._con
        row = con.execute("SELECT id, layer_names FROM runs WHERE run_key = ?", (self._run_key,)).fetchone()
        if row is None:
            if self._readonly or not create:
                runs = ", ".join(
                    f"{r.objective} {json.dumps(r.settings, sort_keys=True)}" for r in JournalFile.read_runs(con)
                )
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
                rollback(con)
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
    def _sql(self, what: str) -> contextlib.AbstractContextManager[None]:
        return self._file.sql(what)

    def _check_open(self) -> sqlite3.Connection:
        if self._con is None:
            raise JournalError(f"journal {str(self._path)!r} is closed")
        return self._con

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
                rollback(con)
                raise JournalError(
                    f"journal {str(self._path)!r}: sampler index {idx} is already recorded with another config; "
                    "the sampler settings changed since the run started: put them into the run settings or use "
                    "a new run"
                ) from None
            except BaseException:
                rollback(con)
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
            "exported": now_iso(),
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
        return JournalFile(path, busy_timeout=busy_timeout).list_runs()

    def close(self) -> None:
        """Close the database and release the writer lock (idempotent)."""
        with self._mu:
            con, self._con = self._con, None
            if con is not None:
                with contextlib.suppress(sqlite3.Error):
                    con.close()
            self._file.release_lock()

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
