"""Search jobs: prepare a model for the search (option table, FP trajectory states, weight swapper) and run
:func:`search.runner.run_search` in a background thread, one job per journal run, re-attachable.

Used by the Search nodes and by the command line (``python -m qua2sedimo search``). ComfyUI internals are
reached only through :mod:`.comfy_bridge`.
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
from ..search.journal import Journal
from ..search.objectives import DenoiseError, ImageDistance, StateRecorder, TrajectoryStates, states_cache_key
from ..search.runner import Executor, SearchProgress, SearchResult, run_search
from ..search.sampling import ConfigSampler, option_set
from . import comfy_bridge as bridge

OBJECTIVES = ("denoise_error", "image")


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

    def settings(self, conditioning_digest: str) -> dict:
        d = asdict(self)
        d["options"], d["keep"] = list(self.options), list(self.keep)
        d["conditioning"] = conditioning_digest
        d["states_branch"] = "positive"  # denoise_error states: the conditional half of CFG batches
        d["quantizer"] = QUANTIZER_VERSION  # configs measured with other quantizers are another run
        return d


def conditioning_digest(*conds) -> str:
    """A hash of CONDITIONING tensors (prompts), part of the journal key."""
    h = hashlib.sha256()

    def visit(v) -> None:
        if isinstance(v, torch.Tensor):
            t = v.detach().to("cpu", torch.float32).contiguous()
            h.update(str(tuple(t.shape)).encode())
            h.update(t.numpy().tobytes())
        elif isinstance(v, dict):
            for k in sorted(v):
                h.update(str(k).encode())
                visit(v[k])
        elif isinstance(v, list | tuple):
            for x in v:
                visit(x)
        elif isinstance(v, int | float | str | bool) or v is None:
            h.update(repr(v).encode())

    for c in conds:
        visit(c)
    return h.hexdigest()[:16]


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


def prepare(model, positive, negative, spec: SearchSpec, *, progress=None) -> SearchContext:
    """Option table (cached), FP reference (trajectory states or final latents, cached per spec), swapper."""
    check_conditioning(positive, "positive")
    check_conditioning(negative, "negative")
    dm = bridge.diffusion_model(model)
    layers = quantizable_layers(dm)
    if not layers:
        raise ValueError("this MODEL's denoiser has no quantizable Linear/Conv2d layers: nothing to search")
    bridge.empty_latent(model, spec.width, spec.height)  # a bad size fails here, not after the option table
    fingerprint = layers_fingerprint(layers)
    settings = spec.settings(conditioning_digest(positive, negative))
    base, table = search_copy_and_table(model, spec.options, bridge.cache_dir(), progress=progress)
    reference = make_reference(model, positive, negative, spec, fingerprint, settings)
    evaluate, forward_once, primary, base = build_evaluate(model, positive, negative, spec, table, reference, base)
    sampler = ConfigSampler([la.name for la in layers], seed=spec.seed, options=spec.options, keep=spec.keep)
    journal_kwargs = dict(model_fingerprint=fingerprint, objective=spec.objective,
                          settings={**settings, "sampler": sampler.settings()},
                          layer_names=[la.name for la in layers])
    return SearchContext(model, layers, sampler, evaluate, journal_kwargs, primary, table=table,
                         search_dm=base.diffusion_model, forward_once=forward_once, spec=spec, positive=positive,
                         negative=negative, reference=reference)


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
    """What flows along a SEARCH socket: where the journal run is (read it with :meth:`open`)."""

    journal: str
    journal_kwargs: dict
    primary: str
    job_key: str
    target: int | None = None  # the configs budget the Search node was given
    context: SearchContext | None = field(default=None, compare=False, repr=False)  # in-process only

    def open(self) -> Journal:
        return open_readonly(self.journal, self.journal_kwargs)

    def job(self) -> SearchJob | None:
        return JOBS.get(self.job_key)


class SearchJob:
    """One search running in a daemon thread; ``stop()`` makes it finish after the evaluation in flight."""

    def __init__(self, key: str):
        self.key = key
        self.status = "starting"
        self.progress: SearchProgress | None = None
        self.result: SearchResult | None = None
        self.error: str | None = None
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


def run_job(ctx: SearchContext, journal: Path, *, max_configs: int | None, max_seconds: float | None,
            job: SearchJob, on_progress: Callable[[SearchProgress], None] | None = None,
            cancel: Callable[[], bool] | None = None, executor: Executor | None = None) -> SearchResult:
    """Run the search to its budget (in this thread), recording status on ``job``; ``executor`` evaluates
    (default: here, in-process; see :func:`.search_remote.ray_executor`)."""
    job.status = "running"

    def progress(p: SearchProgress) -> None:
        job.progress = p
        if on_progress is not None:
            on_progress(p)

    try:
        with Journal.open(journal, **ctx.journal_kwargs) as j:
            res = run_search(j, ctx.sampler, ctx.evaluate, ctx.layers, primary=ctx.primary, max_configs=max_configs,
                             max_seconds=max_seconds, progress=progress,
                             cancel=lambda: job.stopped() or (cancel is not None and cancel()),
                             executor=executor)
        job.result, job.status = res, res.status
        return res
    except BaseException as e:
        job.status, job.error = "failed", "".join(traceback.format_exception_only(type(e), e)).strip()
        raise


def start_background(ctx: SearchContext, journal: Path, *, max_configs: int | None, max_seconds: float | None,
                     on_progress: Callable[[SearchProgress], None] | None = None,
                     executor: Callable[[], Executor] | None = None) -> SearchJob:
    """Start the job for this journal run, or return the one already running (re-attach)."""
    key = job_key(journal, ctx.journal_kwargs)
    with _JOBS_LOCK:
        job = JOBS.get(key)
        if job is not None and job.running:
            return job
        job = SearchJob(key)
        JOBS[key] = job

        def target() -> None:
            ex = None
            try:
                ex = executor() if executor is not None else None
                run_job(ctx, journal, max_configs=max_configs, max_seconds=max_seconds, job=job,
                        on_progress=on_progress, executor=ex)
            except BaseException as e:  # recorded on the job; the Status node shows it
                if job.error is None:
                    job.status, job.error = "failed", "".join(traceback.format_exception_only(type(e), e)).strip()
            finally:
                close = getattr(ex, "close", None)
                if close is not None:
                    close()

        job.thread = threading.Thread(target=target, name=f"qua2sedimo-search-{key}", daemon=True)
        job.thread.start()
    return job
