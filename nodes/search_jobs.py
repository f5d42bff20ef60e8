"""Search jobs: plan a search (its journal run, at once), prepare the model for it (option table, FP trajectory
states, weight swapper: seconds to minutes) and run :func:`search.runner.run_search`, in a background thread, one
job per journal run, re-attachable.

Order of work: :func:`plan` (cheap: layers, fingerprint, settings, sampler) → the journal opened for writing (its
writer lock: a busy journal fails here, in a second) → :class:`Preparation` (the expensive part, once) → the
search. A background job does the last two in its thread, so the Search node returns at once and re-attaching or
stopping never prepares. Used by the Search nodes and by the command line (``python -m qua2sedimo search``).
ComfyUI internals are reached only through :mod:`.comfy_bridge`.
"""

from __future__ import annotations

import hashlib
import threading
import time
import traceback
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..quant import option_table, quantizable_layers
from ..quant.layer_table import layers_fingerprint
from ..quant.quantizers import QUANTIZER_VERSION
from ..quant.swap import ConfigSwapper
from ..search.journal import Journal, conditioning_digest
from ..search.journal_file import JournalFile
from ..search.objectives import DenoiseError, ImageDistance, StateRecorder, TrajectoryStates, states_cache_key
from ..search.runner import Executor, SearchCancelled, SearchProgress, SearchResult, run_search
from ..search.sampling import ConfigSampler, option_set
from . import comfy_bridge as bridge

OBJECTIVES = ("denoise_error", "image")
PRIMARY = {"denoise_error": "denoise_error", "image": "image_nmse"}  # the value that ranks configs, per objective


@dataclass(frozen=True)
class SearchSpec:
    """What a search measures and how; everything here except the budget keys its journal run."""

    objective: str = "denoise_error"
    seed: int = 0  # sampler stream and sampling seeds
    n_seeds: int = 2  # FP trajectories (seeds) recorded / sampled per evaluation
    n_states: int = 8  # trajectory states kept in total (denoise_error)
    steps: int = 10
    cfg: float = 4.0
    sampler_name: str = "euler"
    scheduler: str = "normal"
    width: int = 256
    height: int = 256
    options: tuple[str, ...] = field(default_factory=lambda: option_set())
    keep: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"unknown objective {self.objective!r}; choose one of {', '.join(OBJECTIVES)}")
        for name in ("n_seeds", "n_states", "steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.width % 8 or self.height % 8 or min(self.width, self.height) < 16:
            raise ValueError(f"width/height must be multiples of 8 and ≥ 16, got {self.width}×{self.height}")

    def settings(self, conditioning: str) -> dict:
        d = asdict(self)
        d["options"], d["keep"] = list(self.options), list(self.keep)
        d["conditioning"] = conditioning
        d["states_branch"] = "positive"  # denoise_error states: the conditional half of CFG batches
        d["quantizer"] = QUANTIZER_VERSION  # configs measured with other quantizers are another run
        return d


def check_conditioning(cond, what: str) -> None:
    ok = isinstance(cond, list) and cond and all(
        isinstance(c, list | tuple) and len(c) == 2 and isinstance(c[0], torch.Tensor) and c[0].dim() == 3
        for c in cond)
    if not ok:
        raise ValueError(f"{what}: expected ComfyUI CONDITIONING (a list of [tensor[batch, tokens, dim], dict]); "
                         "connect a CLIP Text Encode output")


@dataclass
class Reference:
    """What a config is compared against, computed once with the full-precision MODEL: trajectory states with
    their FP outputs (``denoise_error``) or the FP final latents (``image``). Shipped as is to Ray workers."""

    states: TrajectoryStates | None = None
    fp_latents: torch.Tensor | None = None


@dataclass
class SearchContext:
    """Everything an evaluation needs, prepared once per model and spec."""

    model: object  # the ComfyUI MODEL (ModelPatcher)
    layers: list
    sampler: ConfigSampler
    evaluate: Callable[[Mapping[str, str]], dict]
    journal_kwargs: dict
    primary: str
    table: object = None  # the OptionTable
    search_dm: object = None  # the search's own denoiser module tree (quantized layers are swapped into it)
    search_model: object = None  # the search's BaseModel copy around it (``apply_model``)
    forward_once: Callable[[], object] | None = None  # one denoiser call (for tracing the layer graph)
    spec: SearchSpec | None = None
    positive: list | None = None
    negative: list | None = None
    reference: Reference | None = None


class _Evaluate:
    """``options → objective values``: swap prepared weights into the search copy, run the objective."""

    def __init__(self, model, swapper: ConfigSwapper, objective: Callable[[], dict]):
        self.model, self.swapper, self.objective = model, swapper, objective
        self.last_timings: dict[str, float] = {}

    def __call__(self, options: Mapping[str, str]) -> dict:
        t0 = time.perf_counter()
        bridge.load_for_eval(self.model)
        self.swapper.apply(dict(options))
        t1 = time.perf_counter()
        with torch.inference_mode():
            values = self.objective()
        self.last_timings = {"swap": t1 - t0, "forward": time.perf_counter() - t1}
        return values


def _sampling_kwargs(spec: SearchSpec) -> dict:
    return dict(steps=spec.steps, cfg=spec.cfg, sampler_name=spec.sampler_name, scheduler=spec.scheduler,
                width=spec.width, height=spec.height)


def _seeds(spec: SearchSpec) -> list[int]:
    return [spec.seed + i for i in range(spec.n_seeds)]


def make_reference(model, positive, negative, spec: SearchSpec, fingerprint: str, settings: dict) -> Reference:
    """The FP reference of ``spec`` (trajectory states are cached on disk per model and settings)."""
    bridge.load_for_eval(model)
    if spec.objective == "image":
        return Reference(fp_latents=torch.cat([bridge.sample_latents(model, positive, negative, seed=s,
                                                                     **_sampling_kwargs(spec))
                                               for s in _seeds(spec)]))
    cache = bridge.cache_dir() / f"states-{states_cache_key(fingerprint, settings)}.safetensors"
    states = TrajectoryStates.load(cache) if cache.exists() else None
    if states is None:
        per = max(1, -(-spec.n_states // spec.n_seeds))
        rec = StateRecorder(lambda x, t, **c: c.pop("__out"), per_trajectory=per, drop=("__out",))

        def record(apply_model, a):
            out = apply_model(a["input"], a["timestep"], **a["c"])
            _record_positive(rec, a, out)
            return out

        fp = bridge.routed(model, record)
        for s in _seeds(spec):
            rec.new_trajectory()
            bridge.sample_latents(fp, positive, negative, seed=s, **_sampling_kwargs(spec))
        states = rec.states(meta={"settings": settings})
        states.save(cache)
    return Reference(states=states)


def _frames(latents: torch.Tensor) -> torch.Tensor:
    """Video latents ``[B, C, T, H, W]`` as ``[B·T, C, H, W]`` frames (images pass through)."""
    if latents.dim() == 5:
        b, c, t, h, w = latents.shape
        return latents.transpose(1, 2).reshape(b * t, c, h, w)
    return latents


def search_copy_and_table(model, options, cache_dir, *, progress=None):
    """The search's copy of ``model`` (:func:`.comfy_bridge.search_copy`) and the option table built from its
    denoiser (fp8 layers dequantized once, in the copy)."""
    base = bridge.search_copy(model)
    table = option_table(base.diffusion_model, options, cache_dir=cache_dir, device=bridge.quant_device(),
                         progress=progress)
    return base, table


def build_evaluate(model, positive, negative, spec: SearchSpec, table, reference: Reference, base):
    """``(evaluate, forward_once, primary)`` for ``spec``'s objective on ``base``, the search copy of ``model``
    (:func:`.comfy_bridge.search_copy`, whose denoiser ``table`` was built from; the same code in-process and on
    Ray workers)."""
    swapper = ConfigSwapper(base.diffusion_model, table, check_weights=False)
    kw = _sampling_kwargs(spec)
    if spec.objective == "denoise_error":
        states = reference.states
        metric = DenoiseError(states, device=model.load_device)

        def objective() -> dict:
            return metric(base.apply_model)

        def forward_once():
            st = states[0]
            return base.apply_model(st.x.to(model.load_device), st.t.to(model.load_device), **st.cond)

        primary = "denoise_error"
    else:
        metric = ImageDistance(_frames(reference.fp_latents))
        quant = bridge.routed(model, lambda apply_model, a: base.apply_model(a["input"], a["timestep"], **a["c"]))

        def objective() -> dict:
            out = torch.cat([bridge.sample_latents(quant, positive, negative, seed=s, **kw) for s in _seeds(spec)])
            return metric(_frames(out))

        def forward_once():
            return bridge.sample_latents(quant, positive, negative, seed=spec.seed, **{**kw, "steps": 1})

        primary = "image_nmse"
    return _Evaluate(model, swapper, objective), forward_once, primary, base


@dataclass(frozen=True)
class SearchPlan:
    """What a search is, known without preparing anything: its journal run, layers and sampler (no option table,
    no FP sampling, no model load)."""

    model: object  # the ComfyUI MODEL (ModelPatcher)
    positive: list
    negative: list
    spec: SearchSpec
    layers: list
    sampler: ConfigSampler
    fingerprint: str
    settings: dict  # the spec's settings with the conditioning digest
    journal_kwargs: dict
    primary: str


def plan(model, positive, negative, spec: SearchSpec) -> SearchPlan:
    """Check the inputs and compute the search's journal run; fast (no option table, no sampling)."""
    check_conditioning(positive, "positive")
    check_conditioning(negative, "negative")
    dm = bridge.diffusion_model(model)
    layers = quantizable_layers(dm)
    if not layers:
        raise ValueError("this MODEL's denoiser has no quantizable Linear/Conv2d layers: nothing to search")
    bridge.empty_latent(model, spec.width, spec.height)  # a bad size fails here, not after the option table
    fingerprint = layers_fingerprint(layers)
    settings = spec.settings(conditioning_digest(positive, negative))
    sampler = ConfigSampler([la.name for la in layers], seed=spec.seed, options=spec.options, keep=spec.keep)
    journal_kwargs = dict(model_fingerprint=fingerprint, objective=spec.objective,
                          settings={**settings, "sampler": sampler.settings()},
                          layer_names=[la.name for la in layers])
    return SearchPlan(model, positive, negative, spec, layers, sampler, fingerprint, settings, journal_kwargs,
                      PRIMARY[spec.objective])


def prepare_plan(p: SearchPlan, *, progress=None) -> SearchContext:
    """Option table (cached), FP reference (trajectory states or final latents, cached per spec), swapper."""
    base, table = search_copy_and_table(p.model, p.spec.options, bridge.cache_dir(), progress=progress)
    reference = make_reference(p.model, p.positive, p.negative, p.spec, p.fingerprint, p.settings)
    evaluate, forward_once, primary, base = build_evaluate(p.model, p.positive, p.negative, p.spec, table, reference,
                                                           base)
    return SearchContext(p.model, p.layers, p.sampler, evaluate, p.journal_kwargs, primary, table=table,
                         search_dm=base.diffusion_model, search_model=base, forward_once=forward_once, spec=p.spec,
                         positive=p.positive, negative=p.negative, reference=reference)


def prepare(model, positive, negative, spec: SearchSpec, *, progress=None) -> SearchContext:
    """:func:`plan` and :func:`prepare_plan` in one call."""
    return prepare_plan(plan(model, positive, negative, spec), progress=progress)


class Preparation:
    """The expensive part of a search, done once on first use (by the search job, or a report) and shared.

    ``label`` says what it is doing while it prepares (for status text).
    """

    def __init__(self, p: SearchPlan | None = None, *, context: SearchContext | None = None) -> None:
        if (p is None) == (context is None):
            raise TypeError("Preparation needs a SearchPlan or a prepared SearchContext")
        self.plan = p
        self._context = context
        self._mu = threading.Lock()
        self.label = ""

    @property
    def journal_kwargs(self) -> dict:
        return self._context.journal_kwargs if self.plan is None else self.plan.journal_kwargs

    @property
    def primary(self) -> str:
        return self._context.primary if self.plan is None else self.plan.primary

    @property
    def ready(self) -> bool:
        return self._context is not None

    @property
    def model(self) -> object:
        return self._context.model if self.plan is None else self.plan.model

    def context(self, progress: Callable[..., None] | None = None) -> SearchContext:
        """The prepared context (prepares now, once, if nobody did yet; other callers wait for it)."""
        with self._mu:
            if self._context is None:
                def step(done: int, total: int, label: str = "") -> None:  # the FP reference comes next
                    self.label = f"option table {done}/{total}" if done < total else "FP reference"
                    if progress is not None:
                        progress(done, total, label)

                try:
                    self._context = prepare_plan(self.plan, progress=step)
                finally:
                    self.label = ""
            return self._context


def as_preparation(source: SearchContext | Preparation) -> Preparation:
    return source if isinstance(source, Preparation) else Preparation(context=source)


def _record_positive(rec: StateRecorder, a: dict, out: torch.Tensor) -> None:
    """Record the positive-prompt chunk of a (possibly CFG-batched) denoiser call: the denoise error is measured
    on the conditional branch only, which halves its cost (the negative branch sees the same weights)."""
    chunks = list(a.get("cond_or_uncond") or [0])
    if 0 not in chunks:
        return
    i, n, batch = chunks.index(0), len(chunks), a["input"].shape[0]

    def part(v):
        if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == batch and n > 1:
            return v.chunk(n)[i]
        if isinstance(v, dict):
            return {k: part(x) for k, x in v.items()}
        return v

    cond = {k: part(v) for k, v in a["c"].items() if k != "transformer_options"}
    rec(part(a["input"]), part(a["timestep"]), __out=part(out), **cond)


# ---------------------------------------------------------------------------------------------- jobs
def open_readonly(journal: str | Path, journal_kwargs: dict) -> Journal:
    """The search's journal run, read-only (no writer lock: works while the search writes)."""
    kw = {k: v for k, v in journal_kwargs.items() if k != "layer_names"}
    return Journal.open(journal, readonly=True, **kw)


@dataclass(frozen=True)
class SearchHandle:
    """What flows along a SEARCH socket: where the journal run is (read it with :meth:`open`); in-process, the
    prepared search (:attr:`context`, prepared on first use when the job has not done it yet)."""

    journal: str
    journal_kwargs: dict
    primary: str
    job_key: str
    target: int | None = None  # the configs budget the Search node was given
    prepared: SearchContext | Preparation | None = field(default=None, compare=False, repr=False)

    @property
    def context(self) -> SearchContext | None:
        if isinstance(self.prepared, Preparation):
            return self.prepared.context()
        return self.prepared

    def open(self) -> Journal:
        return open_readonly(self.journal, self.journal_kwargs)

    def job(self) -> SearchJob | None:
        return JOBS.get(self.job_key)


class SearchJob:
    """One search running in a daemon thread; ``stop()`` makes it finish after the evaluation in flight (or at the
    next step of its preparation)."""

    def __init__(self, key: str):
        self.key = key
        self.status = "starting"  # starting, preparing, running, then done / time / cancelled / failed
        self.progress: SearchProgress | None = None
        self.result: SearchResult | None = None
        self.error: str | None = None
        self.preparation: Preparation | None = None
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None

    @property
    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stop(self) -> None:
        self._stop.set()

    def stopped(self) -> bool:
        return self._stop.is_set()

    def wait(self, timeout: float | None = None) -> None:
        if self.thread is not None:
            self.thread.join(timeout)

    def state_text(self) -> str:
        """The job's state for status text: ``preparing (option table 3/20) …`` while it prepares."""
        if self.stopped() and self.running:
            return "stopping (after the evaluation in flight) …"
        if self.status == "preparing":
            label = self.preparation.label if self.preparation is not None else ""
            return f"preparing ({label}) …" if label else "preparing …"
        return self.status


JOBS: dict[str, SearchJob] = {}
_JOBS_LOCK = threading.Lock()


def job_key(journal: Path, journal_kwargs: dict) -> str:
    kw = {k: journal_kwargs[k] for k in ("model_fingerprint", "objective", "settings")}
    return hashlib.sha256(repr((str(journal), sorted(kw.items(), key=str))).encode()).hexdigest()[:16]


def done_count(journal: Path, journal_kwargs: dict) -> int:
    """Sampled configs of this run already in the journal (0 when the file or the run does not exist yet)."""
    if not Path(journal).exists():
        return 0
    try:
        with open_readonly(journal, journal_kwargs) as j:
            return len(j.done_indices())
    except ValueError:
        return 0


def open_writer(journal: str | Path | JournalFile | Journal, journal_kwargs: dict) -> Journal:
    """The journal run opened for writing: its writer lock is taken here (:class:`JournalLocked` at once when
    another search writes the file), before anything is prepared. An open journal is passed through."""
    return journal if isinstance(journal, Journal) else Journal.open(journal, **journal_kwargs)


def run_job(source: SearchContext | Preparation, journal: str | Path | Journal, *, max_configs: int | None,
            max_seconds: float | None, job: SearchJob, on_progress: Callable[[SearchProgress], None] | None = None,
            cancel: Callable[[], bool] | None = None, executor: Executor | None = None,
            make_executor: Callable[[SearchContext], Executor] | None = None,
            prepare_progress: Callable[..., None] | None = None) -> SearchResult:
    """Run the search to its budget (in this thread), recording status on ``job``: the journal first (writer lock),
    then the preparation when ``source`` is not prepared yet, then the evaluations. ``executor`` evaluates
    (default: here, in-process), or ``make_executor(ctx)`` makes one once prepared (closed at the end; see
    :func:`.search_remote.ray_executor`). ``journal`` may be a journal already opened for writing (it is closed)."""
    prep = as_preparation(source)
    job.preparation = prep
    stopped = lambda: job.stopped() or (cancel is not None and cancel())  # noqa: E731

    def progress(p: SearchProgress) -> None:
        job.progress = p
        if on_progress is not None:
            on_progress(p)

    def preparing(done: int, total: int, label: str = "") -> None:
        if stopped():
            raise SearchCancelled("stopped while preparing")
        if prepare_progress is not None:
            prepare_progress(done, total, label)

    made = None
    try:
        with open_writer(journal, prep.journal_kwargs) as j:
            t0 = time.perf_counter()
            if not prep.ready:
                job.status = "preparing"
            try:
                ctx = prep.context(progress=preparing)
            except SearchCancelled:
                done = len(j.done_indices())
                res = SearchResult("cancelled", done, 0, time.perf_counter() - t0, None, {})
                job.result, job.status = res, res.status
                return res
            if executor is None and make_executor is not None:
                executor = made = make_executor(ctx)
            job.status = "running"
            res = run_search(j, ctx.sampler, ctx.evaluate, ctx.layers, primary=ctx.primary, max_configs=max_configs,
                             max_seconds=max_seconds, progress=progress, cancel=stopped, executor=executor)
        job.result, job.status = res, res.status
        return res
    except BaseException as e:
        job.status, job.error = "failed", "".join(traceback.format_exception_only(type(e), e)).strip()
        raise
    finally:
        close = getattr(made, "close", None)
        if close is not None:
            close()


def start_background(source: SearchContext | Preparation, journal: Path, *, max_configs: int | None,
                     max_seconds: float | None, on_progress: Callable[[SearchProgress], None] | None = None,
                     executor: Callable[[SearchContext], Executor] | None = None,
                     prepare_progress: Callable[..., None] | None = None) -> SearchJob:
    """Start the job for this journal run, or return the one already running (re-attach: nothing is prepared).

    The journal is opened for writing here, in the caller's thread (a busy journal fails at once); the preparation
    and the search run in the job's thread. ``executor(ctx)`` makes the executor once prepared (default:
    in-process)."""
    prep = as_preparation(source)
    key = job_key(journal, prep.journal_kwargs)
    with _JOBS_LOCK:
        job = JOBS.get(key)
        if job is not None and job.running:
            return job
        writer = open_writer(journal, prep.journal_kwargs)
        job = SearchJob(key)
        job.preparation = prep
        job.status = "starting" if prep.ready else "preparing"

        def target() -> None:
            try:
                run_job(prep, writer, max_configs=max_configs, max_seconds=max_seconds, job=job,
                        on_progress=on_progress, make_executor=executor, prepare_progress=prepare_progress)
            except BaseException as e:  # recorded on the job; the Status node shows it
                if job.error is None:
                    job.status, job.error = "failed", "".join(traceback.format_exception_only(type(e), e)).strip()
            finally:
                job.preparation = None  # a finished job keeps no model copy or table alive

        job.thread = threading.Thread(target=target, name=f"qua2sedimo-search-{key}", daemon=True)
        try:
            job.thread.start()
        except BaseException:
            writer.close()
            raise
        JOBS[key] = job
    return job
