"""``python -m qua2sedimo search …``: the search on a headless machine, on top of a ComfyUI install.

Same preparation, journal and results as the Search node (``nodes/search_jobs.py``); progress on stderr, a
JSON summary on stdout. Interrupt with Ctrl-C (or kill it): everything journaled stays, and running the same
command again resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
from pathlib import Path

from ..search.journal_file import JournalError, JournalFile
from ..search.sampling import option_set
from .comfy_boot import boot


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m qua2sedimo", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    s = sub.add_parser("search", help="evaluate random mixed 3/4-bit configs of a model into a journal",
                       description="Evaluate random mixed-precision configs of a denoiser against its full-precision "
                       "outputs and journal every result (SQLite). Re-running the same command resumes.")
    s.add_argument("--comfy-dir", default=os.environ.get("COMFY_DIR"),
                   help="the ComfyUI folder (default: $COMFY_DIR)")
    s.add_argument("--base-directory", help="ComfyUI --base-directory (models/, output/); default: the ComfyUI folder")
    s.add_argument("--cpu", action="store_true", help="run on the CPU (ComfyUI --cpu)")
    s.add_argument("--model", help="diffusion model file (path, or a name in models/diffusion_models); required "
                   "unless --diffusers")
    s.add_argument("--checkpoint", action="store_true", help="--model is a full checkpoint with its text encoder")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="positive prompt (needs --checkpoint)")
    g.add_argument("--conditioning", help="safetensors with 'positive' and 'negative' tensors [batch, tokens, dim] "
                   "(optional '<name>.pooled_output'); with --diffusers: the denoiser's forward kwargs by name "
                   "(e.g. 'encoder_hidden_states'), 'negative.<kwarg>' for the unconditional branch")
    g.add_argument("--class-labels", help="with --diffusers (class-conditional DiT): comma-separated class ids")
    s.add_argument("--negative", default="", help="negative prompt (with --prompt)")
    s.add_argument("--objective", choices=["denoise_error", "image"], default="denoise_error")
    s.add_argument("--configs", type=int, default=100, help="configs the journal run should hold (default 100)")
    s.add_argument("--minutes", type=float, default=0, help="time budget of this session (0 = none)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--journal", required=True, help="journal file (SQLite); created if missing, resumed otherwise")
    s.add_argument("--steps", type=int, default=10)
    s.add_argument("--width", type=int, default=512)
    s.add_argument("--height", type=int, default=512)
    s.add_argument("--n-states", type=int, default=8)
    s.add_argument("--n-seeds", type=int, default=2)
    s.add_argument("--cfg", type=float, default=4.0)
    s.add_argument("--export-jsonl", help="also write the run as JSONL here when done")
    d = s.add_argument_group("a diffusers model instead of ComfyUI (pip install 'qua2sedimo[diffusers]')")
    d.add_argument("--diffusers", metavar="DIR", help="local diffusers folder (pipeline with transformer/ or unet/ "
                   "and scheduler/, or a model folder); ComfyUI is not used. --cfg applies with negative conditioning "
                   "(DiT: the null class)")
    d.add_argument("--latent-size", type=int, help="with --diffusers: latent height = width (default: the model's)")
    d.add_argument("--report", metavar="DIR", help="with --diffusers: train the predictor and write report.json and "
                   "the constructed configs (config-*.json) here after the search")
    d.add_argument("--target-bits", default="3.5,4.0", help="with --report: comma-separated knapsack targets")
    r = s.add_argument_group("evaluation on a Ray cluster (pip install 'qua2sedimo[ray]')")
    r.add_argument("--executor", choices=["in-process", "ray"], default="in-process",
                   help="where configs are evaluated; the journal is always written here (default: in-process)")
    r.add_argument("--ray-address", default=None,
                   help="an existing cluster ('auto', 'ray://host:10001', 'host:6379'); default: a local one")
    r.add_argument("--ray-workers", type=int, default=None,
                   help="workers to start (default: one per GPU, or one per --ray-cpus-per-worker CPUs)")
    r.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs (and torch threads) per worker")
    return ap


def _conditioning(path: Path) -> tuple[list, list]:
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    out = []
    for name in ("positive", "negative"):
        if name not in tensors:
            raise SystemExit(f"{path}: no {name!r} tensor (expected 'positive' and 'negative' [batch, tokens, dim])")
        extra = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith(name + ".")}
        out.append([[tensors[name], extra]])
    return out[0], out[1]


def search_main(args: argparse.Namespace) -> dict:
    if args.configs < 1:
        raise SystemExit(f"--configs must be at least 1, got {args.configs}: a budget of zero evaluates nothing")
    if not math.isfinite(args.minutes) or args.minutes < 0:
        raise SystemExit(f"--minutes must be a finite number ≥ 0 (0 = no time budget), got {args.minutes}")
    if args.diffusers:
        from ..search.diffusers_adapter import search_folder

        if args.prompt is not None or args.objective != "denoise_error" or args.executor != "in-process":
            raise SystemExit("--diffusers runs the denoise_error objective in-process, conditioned by --class-labels "
                             "or --conditioning (a safetensors file of the denoiser's forward kwargs)")
        try:
            return search_folder(args.diffusers, args.journal, conditioning=args.conditioning,
                                 class_labels=args.class_labels, configs=args.configs, minutes=args.minutes,
                                 seed=args.seed, steps=args.steps, n_states=args.n_states, n_seeds=args.n_seeds,
                                 cfg=args.cfg, latent_size=args.latent_size, report_dir=args.report,
                                 targets=args.target_bits, export_jsonl=args.export_jsonl,
                                 log=lambda m: print(m, file=sys.stderr, flush=True))
        except (ImportError, ValueError) as e:
            raise SystemExit(str(e)) from None
    if args.model is None:
        raise SystemExit("--model is required (or --diffusers <folder> for a diffusers model)")
    if args.class_labels is not None:
        raise SystemExit("--class-labels is for --diffusers models; ComfyUI models take --prompt or --conditioning")
    if args.ray_workers is not None and args.ray_workers < 1:
        raise SystemExit(f"--ray-workers must be at least 1, got {args.ray_workers}")
    # The journal's writer lock first: a journal another search writes fails now, not after loading and preparing.
    journal = Path(args.journal).expanduser().resolve()
    try:
        journal.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SystemExit(f"cannot create the journal's folder {str(journal.parent)!r}: {e}") from None
    journal_file = JournalFile(journal)
    journal_file.acquire_lock()
    try:
        return _search(args, journal_file)
    finally:
        journal_file.release_lock()  # idempotent: the journal released it already when it was opened


def _search(args: argparse.Namespace, journal_file: JournalFile) -> dict:
    try:
        boot(args.comfy_dir, cpu=args.cpu, base_directory=args.base_directory)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    from . import comfy_bridge as bridge
    from . import search_jobs as jobs

    bridge.register_folders()
    path = Path(args.model)
    if not path.exists():
        path = bridge.model_file("diffusion_models", args.model)
    if args.prompt is not None and not args.checkpoint:
        raise SystemExit("--prompt needs --checkpoint (a model file with its text encoder); or use --conditioning")
    model, clip = bridge.load_model_file(path, with_clip=args.checkpoint)
    if args.prompt is not None:
        pos, neg = bridge.encode_prompt(clip, args.prompt), bridge.encode_prompt(clip, args.negative)
    else:
        pos, neg = _conditioning(Path(args.conditioning))
    spec = jobs.SearchSpec(objective=args.objective, seed=args.seed, n_seeds=args.n_seeds, n_states=args.n_states,
                           steps=args.steps, cfg=args.cfg, width=args.width, height=args.height, options=option_set())

    def progress(done: int, total: int, label: str = "") -> None:
        print(f"preparing: option table {done}/{total} {label}", file=sys.stderr, flush=True)

    plan = jobs.plan(model, pos, neg, spec)
    writer = jobs.open_writer(journal_file, plan.journal_kwargs)  # validated, holding the lock taken first
    executors = []

    def make_executor(ctx):
        from .search_remote import ray_executor

        executors.append(ray_executor(ctx, address=args.ray_address, workers=args.ray_workers,
                                      cpus_per_worker=args.ray_cpus_per_worker))
        return executors[-1]

    job = jobs.SearchJob("cli")
    signal.signal(signal.SIGTERM, lambda *_: job.stop())
    try:
        res = jobs.run_job(jobs.Preparation(plan), writer, max_configs=args.configs,
                           max_seconds=args.minutes * 60 or None, job=job,
                           on_progress=lambda p: print(p.text(), file=sys.stderr, flush=True),
                           make_executor=make_executor if args.executor == "ray" else None,
                           prepare_progress=progress)
    except KeyboardInterrupt:
        raise SystemExit("interrupted: everything evaluated so far is in the journal; run again to resume") from None
    journal = journal_file.path
    summary = {"status": res.status, "done": res.done, "new": res.new, "seconds": round(res.seconds, 2),
               "journal": str(journal), "objective": plan.primary,
               "best": {"value": res.best.primary, "avg_bits": res.best.avg_bits, "idx": res.best.idx}
               if res.best else None,
               "timings": {k: round(v, 3) for k, v in res.timings.items()}, "executor": args.executor}
    if executors:
        st = executors[0].stats
        summary["ray"] = {"workers": len(st.workers), "actors_started": st.actors_started,
                          "actors_lost": st.actors_lost, "retries": st.retries}
    if args.export_jsonl:
        with jobs.open_readonly(journal, plan.journal_kwargs) as j:
            summary["jsonl"] = str(j.export_jsonl(args.export_jsonl))
    return summary


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "search":
        try:
            summary = search_main(args)
        except JournalError as e:  # busy, corrupt, read-only, another model …: one line, no traceback
            print(f"qua2sedimo search: {e}", file=sys.stderr)
            return 2
        print(json.dumps(summary, indent=2))
    return 0
