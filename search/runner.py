"""The search loop as a job: sample configs, evaluate them through an executor, journal every result.

Budgets: ``max_configs`` is the number of sampled configs the *run* should hold in the journal (so a resumed
search continues to the same target), ``max_seconds`` the wall time of this session. Progress goes to a
callback, ``cancel()`` is polled between evaluations (an evaluation in flight finishes or is lost; nothing
journaled is ever lost). The model is reached only through ``evaluate(options) -> {objective: value}``.

An executor maps ``(idx, options)`` jobs to results; :class:`InProcessExecutor` runs them here, one by one.
A distributed executor implements the same ``run`` and the loop, the journal and resume stay unchanged.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ..quant import accounting
from ..quant.layer_table import LayerInfo
from .journal import Journal, Record
from .sampling import ConfigSampler

Evaluate = Callable[[Mapping[str, str]], Mapping[str, float]]


@dataclass(frozen=True)
class EvalResult:
    idx: int
    options: dict[str, str]
    values: dict[str, float]
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)


class Executor(Protocol):
    def run(self, jobs: Iterable[tuple[int, dict[str, str]]], evaluate: Evaluate) -> Iterator[EvalResult]:
        """Evaluate ``(idx, options)`` jobs; yield results as they finish (any order)."""
        ...


class InProcessExecutor:
    """Evaluates in the calling thread, one config at a time (``evaluate.last_timings`` is kept if present)."""

    def run(self, jobs: Iterable[tuple[int, dict[str, str]]], evaluate: Evaluate) -> Iterator[EvalResult]:
        for idx, options in jobs:
            t0 = time.perf_counter()
            values = dict(evaluate(options))
            seconds = time.perf_counter() - t0
            yield EvalResult(idx, options, values, seconds, dict(getattr(evaluate, "last_timings", None) or {}))


@dataclass
class SearchProgress:
    done: int  # configs of this run in the journal (sampled ones)
    target: int | None  # max_configs, if any
    new: int  # evaluated in this session
    best: float | None  # lowest primary objective so far
    best_bits: float | None
    elapsed: float  # seconds in this session
    eta: float | None  # seconds, from the mean time per config of this session

    def text(self) -> str:
        parts = [f"{self.done}/{self.target}" if self.target else f"{self.done} configs"]
        if self.best is not None:
            parts.append(f"best {self.best:.4g} at b̄ {self.best_bits:.3f}")
        if self.eta is not None:
            parts.append(f"ETA {self.eta / 60:.1f} min")
        return ", ".join(parts)


@dataclass
class SearchResult:
    status: str  # "done" (budget in configs reached), "time" (time budget), "cancelled"
    done: int
    new: int
    seconds: float
    best: Record | None
    timings: dict[str, float]  # totals of this session: evaluate, journal, overhead


class SearchCancelled(Exception):
    pass


def config_size(layers: Sequence[LayerInfo], options: Mapping[str, str]) -> tuple[float, int]:
    """(b̄ in the paper's accounting, stored bytes) of a config over ``layers``."""
    bits = accounting.average_bits(((la.shape, options[la.name], la.dtype) for la in layers), "paper")
    nbytes = sum(accounting.option_nbytes(la.shape, options[la.name], la.dtype, "stored") for la in layers)
    return bits, nbytes


def _best(journal: Journal) -> Record | None:
    best = journal.best(1)
    return best[0] if best and math.isfinite(best[0].primary) else None


def run_search(
    journal: Journal,
    sampler: ConfigSampler,
    evaluate: Evaluate,
    layers: Sequence[LayerInfo],
    *,
    primary: str,
    max_configs: int | None = None,
    max_seconds: float | None = None,
    progress: Callable[[SearchProgress], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    executor: Executor | None = None,
) -> SearchResult:
    """Evaluate sampled configs until a budget is reached or ``cancel()``; every result goes to ``journal``.

    Resumes by itself: sampler indices already in the journal are skipped, and the ``i``-th config is the same
    on every run, so an interrupted search continues exactly where it stopped.
    """
    if max_configs is None and max_seconds is None:
        raise ValueError("give a budget: max_configs (configs in the journal) and/or max_seconds (this session)")
    if max_configs is not None and max_configs <= 0:
        raise ValueError(f"max_configs must be at least 1, got {max_configs}: a budget of zero evaluates nothing")
    if max_seconds is not None and not (math.isfinite(max_seconds) and max_seconds > 0):  # NaN > 0 is False too
        raise ValueError(f"max_seconds must be a positive finite number, got {max_seconds}")
    names = {la.name for la in layers}
    if set(sampler.layer_names) != names:
        raise ValueError("the sampler and the layer table name different layers: build both from the same model")
    executor = executor or InProcessExecutor()
    t_start = time.perf_counter()
    totals = {"evaluate": 0.0, "journal": 0.0}
    new = 0
    status = "done"
    best = _best(journal)

    def report() -> None:
        if progress is None:
            return
        elapsed = time.perf_counter() - t_start
        done = len(journal.done_indices())
        eta = None
        if new and max_configs is not None:
            eta = elapsed / new * max(max_configs - done, 0)
        progress(SearchProgress(done, max_configs, new, best.primary if best else None,
                                best.avg_bits if best else None, elapsed, eta))

    stop = {"reason": None}

    def jobs() -> Iterator[tuple[int, dict[str, str]]]:
        for idx, options in sampler.pending(journal.done_indices(), stop=max_configs):
            if cancel is not None and cancel():
                stop["reason"] = "cancelled"
                return
            if max_seconds is not None and time.perf_counter() - t_start >= max_seconds:
                stop["reason"] = "time"
                return
            yield idx, options

    report()
    for res in executor.run(jobs(), evaluate):
        if primary not in res.values:
            raise ValueError(f"the objective returned {sorted(res.values)}, without the primary value {primary!r}")
        t0 = time.perf_counter()
        bits, nbytes = config_size(layers, res.options)
        timings = {"evaluate": res.seconds, **res.timings}
        journal.add(res.options, avg_bits=bits, nbytes=nbytes, values=res.values, primary=res.values[primary],
                    timings=timings, idx=res.idx, source="random")
        totals["journal"] += time.perf_counter() - t0
        totals["evaluate"] += res.seconds
        for k, v in res.timings.items():
            totals[k] = totals.get(k, 0.0) + v
        new += 1
        if best is None or (math.isfinite(res.values[primary]) and res.values[primary] < best.primary):
            best = _best(journal)
        report()
    status = stop["reason"] or status
    seconds = time.perf_counter() - t_start
    totals["overhead"] = max(seconds - totals["evaluate"], 0.0)
    return SearchResult(status, len(journal.done_indices()), new, seconds, best, totals)


def pareto_front(records: Iterable[Record]) -> list[Record]:
    """Records not dominated in (b̄, primary objective), both lower is better; sorted by b̄."""
    front: list[Record] = []
    for r in sorted((r for r in records if math.isfinite(r.primary)), key=lambda r: (r.avg_bits, r.primary)):
        if not front or r.primary < front[-1].primary:
            front.append(r)
    return front
