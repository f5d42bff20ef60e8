"""Evaluate search configs on a Ray cluster: one actor per GPU (or CPU slot), results back to the driver.

:class:`RayExecutor` implements :class:`.runner.Executor`, so :func:`.runner.run_search` drives it unchanged and
the driver alone writes the journal (resume, reports and the predictor see the same store as in-process).

Each actor calls a picklable ``factory()`` once (load the model, the option table, the reference) and then
evaluates the configs it is sent with the returned ``evaluate(options)``. The factory is put into Ray's object
store once and fetched by every actor. An actor that dies (killed process, OOM, lost node) loses only its
config in flight, which goes to the next free actor (at most ``max_retries`` times), and a replacement actor
is started (at most ``max_restarts`` in a run). An exception raised by the objective itself is a bug, not a
fault: it is re-raised in the driver as is.

Requires the optional extra ``qua2sedimo[ray]``; nothing here imports Ray before an executor is used.
"""

from __future__ import annotations

import collections
import itertools
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from .runner import EvalResult, Evaluate

EvaluateFactory = Callable[[], Evaluate]


def import_ray():
    """``ray``, or a clear error saying how to install it."""
    try:
        import ray
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the Ray executor needs Ray: pip install 'qua2sedimo[ray]' (or pip install ray) on the "
                          "driver and on every worker node") from e
    return ray


class EvalWorker:
    """The actor: builds ``evaluate`` once from the factory, then evaluates configs one at a time."""

    def __init__(self, factory: EvaluateFactory, threads: int | None = None):
        if threads:
            import torch

            torch.set_num_threads(threads)
        self.evaluate = factory()

    def where(self) -> tuple[str, int]:
        """(host, pid) of this actor's process."""
        return socket.gethostname(), os.getpid()

    def run(self, idx: int, options: dict[str, str]) -> tuple[int, dict[str, float], float, dict[str, float]]:
        t0 = time.perf_counter()
        values = {k: float(v) for k, v in dict(self.evaluate(options)).items()}
        seconds = time.perf_counter() - t0
        return idx, values, seconds, dict(getattr(self.evaluate, "last_timings", None) or {})


@dataclass
class RayStats:
    """What a run went through: actors started and lost, configs retried, where actors ran."""

    actors_started: int = 0
    actors_lost: int = 0
    retries: int = 0
    workers: dict[str, tuple[str, int]] = field(default_factory=dict)  # actor id → (host, pid)


class RayExecutorError(RuntimeError):
    pass


class RayExecutor:
    """Evaluate configs on Ray actors built by ``factory`` (see the module docstring).

    ``address``: an existing cluster (``"auto"``, ``"ray://host:10001"``, ``"host:6379"``); ``None`` starts a
    local one (or reuses the one this process already joined). ``workers``: actors to start (default: one per
    GPU when ``gpus_per_worker`` > 0, else one per ``cpus_per_worker`` CPUs of the cluster). ``threads``: torch
    threads inside each actor (default ``cpus_per_worker``). ``init_kwargs`` go to ``ray.init`` (e.g.
    ``num_cpus``, ``runtime_env``).
    """

    def __init__(
        self,
        factory: EvaluateFactory,
        *,
        address: str | None = None,
        workers: int | None = None,
        cpus_per_worker: float = 1.0,
        gpus_per_worker: float = 0.0,
        threads: int | None = None,
        max_retries: int = 2,
        max_restarts: int | None = None,
        init_kwargs: Mapping[str, Any] | None = None,
    ):
        if workers is not None and workers < 1:
            raise ValueError(f"workers must be at least 1, got {workers}")
        if cpus_per_worker <= 0 or gpus_per_worker < 0:
            raise ValueError("cpus_per_worker must be positive and gpus_per_worker non-negative")
        self.factory = factory
        self.address = address or None
        self.workers = workers
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.threads = threads if threads is not None else max(1, int(cpus_per_worker))
        self.max_retries = max_retries
        self.max_restarts = max_restarts
        self.init_kwargs = dict(init_kwargs or {})
        self.stats = RayStats()
        self._actors: list[Any] = []
        self._factory_ref = None

    # ------------------------------------------------------------------------------------ cluster
    def connect(self):
        """Join the cluster (start a local one when no address is given); returns the ``ray`` module."""
        ray = import_ray()
        if not ray.is_initialized():
            kw = {"include_dashboard": False, "log_to_driver": True, **self.init_kwargs}
            _check_reachable(self.address)
            try:  # "local": a new cluster here, never a stale one named in /tmp/ray/ray_current_cluster
                ray.init(address=self.address or "local", **kw)
            except ConnectionError as e:
                why = f"{e}" + (f" ({_cause(e.__cause__)})" if e.__cause__ is not None else "")
                raise RayExecutorError(f"cannot reach the Ray cluster at {self.address!r}: {why}. Start it with "
                                       "`ray start --head` (or give no address for a local cluster); for a cluster "
                                       "with token authentication set RAY_AUTH_MODE=token and its token as Ray's "
                                       "docs say") from e
        return ray

    def n_workers(self) -> int:
        """Actors this executor runs: ``workers``, or as many as the cluster's resources hold."""
        if self.workers is not None:
            return self.workers
        ray = self.connect()
        res = ray.cluster_resources()
        if self.gpus_per_worker > 0:
            n = int(res.get("GPU", 0) // self.gpus_per_worker)
            if n < 1:
                raise RayExecutorError("the Ray cluster has no GPU: set gpus_per_worker=0 to evaluate on CPUs")
            return n
        return max(1, int(res.get("CPU", 1) // self.cpus_per_worker))

    def _new_actor(self):
        ray = self.connect()
        cls = ray.remote(num_cpus=self.cpus_per_worker, num_gpus=self.gpus_per_worker, max_restarts=0)(EvalWorker)
        actor = cls.remote(self._factory_ref, self.threads)
        self.stats.actors_started += 1
        return actor

    def start(self) -> None:
        """Start the actors and wait until each has built its model (errors in ``factory`` surface here)."""
        if self._actors:
            return
        ray = self.connect()
        if self._factory_ref is None:
            self._factory_ref = ray.put(self.factory)
        actors = [self._new_actor() for _ in range(self.n_workers())]
        try:
            where = ray.get([a.where.remote() for a in actors])
        except ray.exceptions.RayActorError as e:
            for a in actors:
                ray.kill(a)
            raise RayExecutorError(f"a Ray worker could not prepare the evaluation: {_cause(e)}") from None
        for a, w in zip(actors, where, strict=True):
            self.stats.workers[a._actor_id.hex()] = w
        self._actors = actors

    def close(self) -> None:
        """Stop the actors (the cluster itself stays up)."""
        if not self._actors:
            return
        ray = import_ray()
        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:  # already gone
                pass
        self._actors = []

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------------------------ run
    def run(self, jobs: Iterable[tuple[int, dict[str, str]]], evaluate: Evaluate | None = None
            ) -> Iterator[EvalResult]:
        """Evaluate ``(idx, options)`` jobs on the actors; yields results as they finish.

        ``evaluate`` (the driver's own) is not used: the actors evaluate with what ``factory`` built. A job is
        pulled from ``jobs`` only when an actor is free, so budgets and cancel act between evaluations; the
        configs in flight when ``jobs`` ends still finish and are yielded.
        """
        jobs = iter(jobs)
        first = next(jobs, None)
        if first is None:  # nothing to do (e.g. the budget is already in the journal): start no actors
            return
        jobs = itertools.chain([first], jobs)
        ray = self.connect()
        self.start()
        max_restarts = self.max_restarts if self.max_restarts is not None else 2 * len(self._actors)
        restarts = 0
        retry: collections.deque[tuple[int, dict[str, str], int]] = collections.deque()
        idle = list(self._actors)
        in_flight: dict[Any, tuple[Any, int, dict[str, str], int] | tuple[Any, None, None, None]] = {}
        exhausted = False
        while True:
            while idle and (retry or not exhausted):
                if retry:
                    idx, options, attempt = retry.popleft()
                else:
                    nxt = next(jobs, None)
                    if nxt is None:
                        exhausted = True
                        break
                    (idx, options), attempt = nxt, 0
                actor = idle.pop(0)
                in_flight[actor.run.remote(idx, dict(options))] = (actor, idx, dict(options), attempt)
            if not in_flight:
                if retry:
                    raise RayExecutorError("every Ray worker was lost; configs are left to evaluate (re-run to "
                                           "resume: everything finished is in the journal)")
                return
            (ref,), _ = ray.wait(list(in_flight), num_returns=1)
            actor, idx, options, attempt = in_flight.pop(ref)
            try:
                value = ray.get(ref)
            except ray.exceptions.RayTaskError as e:  # the objective (or factory) raised: a bug, not a fault
                if idx is None:
                    raise RayExecutorError(f"a replacement Ray worker could not prepare the evaluation: "
                                           f"{_cause(e)}") from None
                raise e.as_instanceof_cause() from None
            except ray.exceptions.RayActorError as e:  # the actor's process died: retry its config elsewhere
                self.stats.actors_lost += 1
                if actor in self._actors:
                    self._actors.remove(actor)
                if idx is not None:
                    if attempt >= self.max_retries:
                        raise RayExecutorError(f"config {idx} was lost with {attempt + 1} Ray workers "
                                               f"(last: {_cause(e)}); giving up") from None
                    retry.append((idx, options, attempt + 1))
                    self.stats.retries += 1
                if restarts < max_restarts:
                    restarts += 1
                    new = self._new_actor()
                    self._actors.append(new)
                    in_flight[new.where.remote()] = (new, None, None, None)
                elif not self._actors:
                    raise RayExecutorError(f"every Ray worker was lost (last: {_cause(e)}) and {max_restarts} "
                                           "replacements were used up") from None
                continue
            if idx is None:  # a replacement actor is ready
                self.stats.workers[actor._actor_id.hex()] = value
                idle.append(actor)
                continue
            idle.append(actor)
            _, values, seconds, timings = value
            yield EvalResult(idx, options, values, seconds, timings)


def _check_reachable(address: str | None, timeout: float = 5.0) -> None:
    """Fail fast on a ``host:port`` nobody listens on (Ray itself retries for minutes)."""
    if not address or "://" in address or address == "auto" or ":" not in address:
        return
    host, _, port = address.rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout).close()
    except (OSError, ValueError) as e:
        raise RayExecutorError(f"cannot reach the Ray cluster at {address!r}: {e}. Start it with `ray start --head` "
                               "(or give no address for a local cluster)") from None


def _cause(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[-1] if text else type(e).__name__
