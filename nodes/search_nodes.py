"""The Search node (a background job over the journal) and the Search Status node."""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..search.ray_executor import import_ray
from ..search.report import STABLE_CONFIGS, pareto_png, png_to_array, status_text
from ..search.sampling import option_set
from . import comfy_bridge as bridge
from . import search_jobs as jobs
from .comfy_bridge import safe_prefix
from .sockets import CATEGORY, CONFIG_OUT, Config
from .sockets import Search as SearchSocket

MODES = ["background", "wait", "stop"]
# Fixed seeds (no "randomize after queueing"): queueing the same node again re-attaches to its run and 'stop'
# reaches it; a new seed is a new run.
SEED_TOOLTIP = "fixed: queueing again re-attaches to the same run (and 'stop' reaches it); change it for a new run"
EXECUTORS = ["in-process", "ray"]
STOP_WAIT_S = 5.0  # 'stop' returns after this at most; a job still finishing its evaluation shows "stopping"


RAY_ADDRESSES_ENV = "QUA2SEDIMO_RAY_ADDRESSES"


def allowed_ray_address(address: str) -> str | None:
    """The Ray cluster a prompt may use: ``None`` (a local cluster started here) for "" or "local", else an address
    the server's owner listed in ``$QUA2SEDIMO_RAY_ADDRESSES`` (comma-separated). Anyone who can queue a prompt
    sets this input, and the search ships the model to the cluster and unpickles what comes back: a prompt never
    chooses an arbitrary host, and nothing is contacted before this check (no port probe)."""
    address = address.strip()
    if address in ("", "local"):
        return None
    allowed = {a.strip() for a in os.environ.get(RAY_ADDRESSES_ENV, "").split(",") if a.strip()}
    if address not in allowed:
        raise ValueError(
            f"ray_address {address!r} is not a Ray cluster this server's owner allowed. Leave it empty for a local "
            f"cluster, or start ComfyUI with {RAY_ADDRESSES_ENV}={address} (comma-separated list) to allow it"
            + (f"; allowed now: {', '.join(sorted(allowed))}" if allowed else ""))
    return address


def _executor_factory(executor: str, address: str | None, workers: int):
    """``None`` (in-process) or a function that starts the Ray executor for a prepared search (in the job's
    thread, once prepared)."""
    if executor != "ray":
        return None
    from .search_remote import ray_executor

    return lambda ctx: ray_executor(ctx, address=address, workers=workers or None)


_PREPARED: dict[str, jobs.Preparation] = {}  # the latest preparation (one: it holds a table and a model copy)


def _preparation(p: jobs.SearchPlan, key: str) -> jobs.Preparation:
    """The search's preparation: the running or last job's, or the last one made for this MODEL, or a new one
    (prepared lazily: by the job, or by a report that needs it)."""
    job = jobs.JOBS.get(key)
    found = [prep for prep in (job.preparation if job is not None else None, _PREPARED.get(key))
             if prep is not None and prep.model is p.model]
    prep = found[0] if found else jobs.Preparation(p)
    _PREPARED.clear()
    _PREPARED[key] = prep
    return prep


def _journal_path(name: str):
    path = bridge.journal_dir() / f"{safe_prefix(name)}.sqlite"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


class Search(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoSearch",
            display_name="Qua2SeDiMo Search",
            category=CATEGORY,
            description="Evaluate random mixed 3/4-bit configs of the model against its full-precision outputs and "
            "journal every result (models/qua2sedimo/journals/<journal>.sqlite). 'background' returns at once and "
            "keeps searching while ComfyUI stays usable; queue the node again (same inputs) to re-attach, also "
            "after a restart: the search resumes from the journal. 'wait' runs to the budget with a progress bar "
            "(Cancel keeps every finished config). 'stop' ends a background search after the config in flight.",
            inputs=[
                io.Model.Input("model"),
                io.Conditioning.Input("positive"),
                io.Conditioning.Input("negative"),
                io.Combo.Input("objective", options=list(jobs.OBJECTIVES), default="denoise_error",
                               tooltip="denoise_error: teacher-forced denoiser error on cached FP trajectory states "
                               "(cheapest); image: full sampling, distance of final latents to FP (costs more, tracks "
                               "image quality best)"),
                io.Int.Input("configs", default=STABLE_CONFIGS, min=1, max=100000,
                             tooltip=f"configs the journal should hold (the report warns below {STABLE_CONFIGS}: its "
                             "ranking is not stable yet)"),
                io.Float.Input("minutes", default=0.0, min=0.0, max=10000.0, step=1.0,
                               tooltip="time budget of this session (0 = none)"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip=SEED_TOOLTIP),
                io.Combo.Input("mode", options=MODES, default="background",
                               tooltip="background: return at once and search on; wait: search to the budget with a "
                                       "progress bar; stop: end this background search after the config in flight"),
                io.String.Input("journal", default="search",
                                tooltip="name of the journal file (models/qua2sedimo/journals/<name>.sqlite): every "
                                        "evaluated config is kept there; the same name resumes"),
                io.Int.Input("steps", default=10, min=1, max=200, tooltip="sampler steps of the FP trajectories"),
                io.Int.Input("width", default=512, min=64, max=4096, step=8),
                io.Int.Input("height", default=512, min=64, max=4096, step=8),
                io.Int.Input("n_states", default=8, min=1, max=256,
                             tooltip="trajectory states per evaluation (denoise_error)"),
                io.Int.Input("n_seeds", default=2, min=1, max=64, tooltip="sampling seeds (trajectories)"),
                io.Float.Input("cfg", default=4.0, min=0.0, max=30.0, step=0.1),
                io.Combo.Input("executor", options=EXECUTORS, default="in-process",
                               tooltip="in-process: evaluate here, sharing the model with ComfyUI; ray: evaluate on "
                               "Ray workers (one per GPU or CPU), results journaled here (needs qua2sedimo[ray])"),
                io.String.Input("ray_address", default="",
                                tooltip="ray: empty = start a local cluster on this machine; else a cluster address "
                                "the server's owner allowed in $QUA2SEDIMO_RAY_ADDRESSES (e.g. 'auto', "
                                "'ray://host:10001'); any other address is refused"),
                io.Int.Input("ray_workers", default=0, min=0, max=1024,
                             tooltip="ray: workers to start (0 = one per GPU, or per CPU without GPUs)"),
            ],
            outputs=[SearchSocket.Output(display_name="search",
                tooltip="the search (journal + model): connect to Status, Sensitivity Report, Build Config"),
                     io.String.Output(display_name="status", tooltip="configs evaluated, best so far, state")],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")  # always re-run: the journal changes while the job runs

    @classmethod
    def execute(cls, model, positive, negative, objective: str, configs: int, minutes: float, seed: int, mode: str,
                journal: str, steps: int, width: int, height: int, n_states: int, n_seeds: int,
                cfg: float, executor: str = "in-process", ray_address: str = "", ray_workers: int = 0
                ) -> io.NodeOutput:
        spec = jobs.SearchSpec(objective=objective, seed=seed, n_seeds=n_seeds, n_states=n_states, steps=steps,
                               cfg=cfg, width=width, height=height, options=option_set())
        path = _journal_path(journal)
        node_id = cls.hidden.unique_id
        if not math.isfinite(minutes) or minutes < 0:  # NaN would silently mean "no time budget"
            raise ValueError(f"minutes must be a finite number ≥ 0 (0 = no time budget), got {minutes}")
        if executor not in EXECUTORS:
            raise ValueError(f"unknown executor {executor!r}; choose one of {', '.join(EXECUTORS)}")
        address = None
        if executor == "ray":
            address = allowed_ray_address(ray_address)  # before anything is prepared or contacted
            import_ray()  # a clear error before any preparation when Ray is missing
        # Nothing is prepared here unless this run is a 'wait' one: the plan is fast, re-attach and stop are instant,
        # and a background job prepares in its own thread after taking the journal's writer lock.
        plan = jobs.plan(model, positive, negative, spec)
        key = jobs.job_key(path, plan.journal_kwargs)
        prep = _preparation(plan, key)
        handle = jobs.SearchHandle(str(path), plan.journal_kwargs, plan.primary, key, configs, prep)
        make_executor = _executor_factory(executor, address, ray_workers)
        max_seconds = minutes * 60 if minutes > 0 else None
        job = jobs.JOBS.get(key)
        if mode == "stop":
            if job is not None and job.running:
                job.stop()
                job.wait(STOP_WAIT_S)  # the evaluation in flight or the preparation's step: "stopping" if longer
        elif mode == "wait":
            if job is not None and job.running:
                raise ValueError("this search is running in the background: use mode 'stop' first, or 'background' "
                                 "to watch it")
            bar = bridge.progress_bar(node_id, configs)
            job = jobs.SearchJob(key)
            jobs.run_job(prep, path, max_configs=configs, max_seconds=max_seconds, job=job,
                         on_progress=lambda p: bar.update_absolute(p.done, configs), cancel=bridge.interrupted,
                         make_executor=make_executor, prepare_progress=bridge.Progress(node_id))
            if job.status == "cancelled":
                bridge.raise_if_interrupted()
        else:
            def on_progress(p) -> None:
                bridge.progress_bar(node_id, configs).update_absolute(p.done, configs)
                bridge.send_event("qua2sedimo.search", {"node": node_id, "journal": str(path), "text": p.text()})

            def on_prepare(done: int, total: int, label: str = "") -> None:
                bridge.send_event("qua2sedimo.search", {"node": node_id, "journal": str(path),
                                                        "text": f"preparing: option table {done}/{total}"})

            if (job is not None and job.running) or jobs.done_count(path, plan.journal_kwargs) < configs:
                job = jobs.start_background(prep, path, max_configs=configs, max_seconds=max_seconds,
                                            on_progress=on_progress, executor=make_executor,
                                            prepare_progress=on_prepare)
        text = _status(handle, configs)
        return io.NodeOutput(handle, text, ui=ui.PreviewText(text))


def _records(handle: jobs.SearchHandle) -> list:
    """The run's records so far (none yet when the journal or the run does not exist)."""
    try:
        with handle.open() as j:
            return j.records()
    except ValueError:
        return []


def _status(handle: jobs.SearchHandle, target: int | None = None, records: list | None = None) -> str:
    job = handle.job()
    records = _records(handle) if records is None else records
    n_random = sum(r.idx is not None for r in records)
    state = job.state_text() if job is not None else "idle"
    if target and n_random >= target and not (job is not None and job.running):
        state = "done"
    text = status_text(records, objective=handle.primary, target=target, state=state)
    if job is not None and job.progress is not None and job.progress.eta is not None and job.running:
        text += f"\nETA {job.progress.eta / 60:.1f} min"
    if job is not None and job.error:
        text += f"\nerror: {job.error}"
    return text


class SearchStatus(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoSearchStatus",
            display_name="Qua2SeDiMo Search Status",
            category=CATEGORY,
            description="What a search has evaluated so far: text and a Pareto plot (objective vs b̄).",
            inputs=[SearchSocket.Input("search")],
            outputs=[io.String.Output(display_name="text", tooltip="progress and the Pareto front (b̄ vs objective)"),
                     io.Image.Output(display_name="pareto", tooltip="the evaluated configs: b̄ vs objective")],
            is_output_node=True,
        )

    @classmethod
    def fingerprint_inputs(cls, **kwargs):
        return float("nan")

    @classmethod
    def execute(cls, search: jobs.SearchHandle) -> io.NodeOutput:
        records = _records(search)
        text = _status(search, search.target, records)
        image = torch.from_numpy(png_to_array(pareto_png(records, objective=search.primary)))[None]
        return io.NodeOutput(text, image, ui=ui.PreviewText(text))




def _images(pngs: list[bytes]) -> torch.Tensor:
    """PNG figures → one IMAGE batch (padded with white to the largest size)."""
    arrays = [png_to_array(p) for p in pngs]
    h, w = max(a.shape[0] for a in arrays), max(a.shape[1] for a in arrays)
    out = np.ones((len(arrays), h, w, 3), dtype=np.float32)
    for i, a in enumerate(arrays):
        out[i, : a.shape[0], : a.shape[1]] = a
    return torch.from_numpy(out)


class SensitivityReport(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoSensitivityReport",
            display_name="Qua2SeDiMo Sensitivity Report",
            category=CATEGORY,
            description="Train the GNN predictor (and a ridge baseline) on the search's journal, score every unit "
            "(layer and block), build knapsack configs at the target bits and the paper's rule, measure them, and "
            "show the insights: box plots per op type / block category / block index, chosen options, Pareto plot; "
            "text; JSON in the output folder.",
            inputs=[
                SearchSocket.Input("search"),
                io.String.Input("targets", default="3.5, 4.0", tooltip="average bits of the knapsack configs"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip=SEED_TOOLTIP),
                io.String.Input("filename_prefix", default="qua2sedimo/report"),
            ],
            outputs=[io.Image.Output(display_name="figures",
                tooltip="sensitivity box plots, chosen options, Pareto plot"),
                     io.String.Output(display_name="text",
                         tooltip="the report: most sensitive units, predictor quality, recommendations")],
            hidden=[io.Hidden.unique_id],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, search, targets: str, seed: int, filename_prefix: str) -> io.NodeOutput:
        from ..quant.atomic import atomic_write_text, atomic_write_with
        from ..search.report import report_dumps, report_text
        from . import report_jobs

        try:
            bits = tuple(float(t) for t in targets.replace(";", ",").split(",") if t.strip())
        except ValueError:
            raise ValueError(f"targets {targets!r}: write average bits separated by commas, e.g. '3.5, 4.0'") from None
        analysis = report_jobs.analyse(search, targets=bits, seed=seed, progress=bridge.Progress(cls.hidden.unique_id))
        out_dir = bridge.output_dir()
        path = bridge.new_output_path(filename_prefix, out_dir, "report.json")
        stem = path.name.removesuffix("report.json")
        figures = {}
        for name, png in analysis.figures.items():
            fig = path.with_name(f"{stem}{name}.png")
            atomic_write_with(fig, lambda tmp, png=png: tmp.write_bytes(png))
            figures[name] = fig.name
        atomic_write_text(path, report_dumps({**analysis.report.to_json(), "figures": figures}))
        text = report_text(analysis.report) + f"\nreport: {path.relative_to(out_dir.resolve()).as_posix()}"
        return io.NodeOutput(_images(list(analysis.figures.values())), text, ui=ui.PreviewText(text))


class BuildConfig(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="Qua2SeDiMoBuildConfig",
            display_name="Qua2SeDiMo Build Config",
            category=CATEGORY,
            description="A config from the search's unit scores: 'knapsack' hits the target average bits (±0.01, "
            "overhead included) or a size in GiB with the best predicted quality; 'paper' takes each unit's "
            "top-scoring variant. The config is measured and journaled.",
            inputs=[
                SearchSocket.Input("search"),
                io.Combo.Input("rule", options=["knapsack", "paper"], default="knapsack",
                               tooltip="knapsack: the best predicted config at exactly ≤ target_bits average bits; "
                                       "paper: the paper's rule from the sensitivity scores (its own bit width)"),
                io.Float.Input("target_bits", default=3.5, min=2.0, max=16.0, step=0.05,
                               tooltip="average bits per weight b̄ the knapsack may spend (3.0-4.0 typical)"),
                io.Float.Input("max_gib", default=0.0, min=0.0, max=1024.0, step=0.1,
                               tooltip="instead of target_bits: quantized layers must fit in this many GiB (0 = off)"),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip=SEED_TOOLTIP),
            ],
            outputs=[Config.Output(display_name="config", tooltip=CONFIG_OUT),
                     io.String.Output(display_name="summary", tooltip="b̄, predicted and measured objective")],
        )

    @classmethod
    def execute(cls, search, rule: str, target_bits: float, max_gib: float, seed: int) -> io.NodeOutput:
        from . import report_jobs

        max_bytes = int(max_gib * 2**30) if max_gib > 0 else None
        cfg, c, rec = report_jobs.build_config(search, rule=rule, target_bits=None if max_bytes else target_bits,
                                               max_bytes=max_bytes, seed=seed)
        text = (f"{c.label}: b̄ = {c.avg_bits:.3f}, {c.nbytes / 2**20:.1f} MiB; measured {search.primary} = "
                f"{rec.primary:.4g}; " + ", ".join(f"{o}: {n}" for o, n in sorted(cfg.counts().items())))
        return io.NodeOutput(cfg, text, ui=ui.PreviewText(text))
