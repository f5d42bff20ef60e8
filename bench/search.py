"""The search on the tiny PixArt-Σ (in-process ComfyUI host, CPU): option table, one evaluation, machinery share,
and the Ray executor's scaling (configs per minute with 1 vs 2 workers, overhead per config vs in-process).

Run (COMFY_DIR set, e.g. ``set -a; . .venv/.qua2sedimo-host.env; set +a``):
``python bench/search.py [--configs 10] [--sizes 272,384] [--ray-configs 12] [--out bench-output/search]``

Targets (issue 5): one ``denoise_error`` evaluation with 8 cached states ≤ 2 s (at the first, smallest size: 272 px
is the least the tiny PixArt-Σ takes, a 34×34 latent); the search machinery (journal, weight swaps, bookkeeping)
≤ 10 % of total time; the option table (all six options) ≤ 60 s. Issue 7: the scaling figure.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=10)
    ap.add_argument("--out", type=Path, default=REPO / "bench-output" / "search")
    ap.add_argument("--keep-cache", action="store_true", help="reuse the option table (skip its timing)")
    ap.add_argument("--sizes", default="272,384", help="image sides in pixels to time one evaluation at; the first "
                    "is the target's and the search's (the tiny PixArt-Σ needs ≥ 272)")
    ap.add_argument("--ray-configs", type=int, default=24, help="configs per Ray run (0: skip the Ray scaling)")
    args = ap.parse_args()

    import comfy_host
    import tiny_models as tm

    base = comfy_host.make_base_dir(args.out / "comfyui")
    comfy_host.setup_inprocess(base)
    tm.ensure_models(base / "models", ["pixart_sigma_d1"])
    import comfy.sd
    import torch

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.quant import option_table

    bridge.register_folders()
    mp = comfy.sd.load_diffusion_model(str(base / "models" / "diffusion_models" / "pixart_sigma_d1.safetensors"))
    dm = bridge.diffusion_model(mp)
    pos, neg = tm.conditioning_for("pixart", 1), tm.conditioning_for("pixart", 2)
    n_weights = sum(p.numel() for n, p in dm.named_parameters() if n.endswith("weight") and p.dim() > 1)

    cache = bridge.cache_dir()
    if not args.keep_cache and cache.exists():
        shutil.rmtree(cache)
    sizes = [int(x) for x in args.sizes.split(",")]
    t_table = None
    evaluations = {}
    ctx = None
    for size in reversed(sizes):  # the first size last: its context runs the search below
        spec = jobs.SearchSpec(n_seeds=2, n_states=8, steps=10, width=size, height=size)
        if t_table is None:
            t0 = time.perf_counter()
            option_table(dm, spec.options, cache_dir=cache)
            t_table = time.perf_counter() - t0
        t0 = time.perf_counter()
        ctx = jobs.prepare(mp, pos, neg, spec)
        t_prepare = time.perf_counter() - t0  # FP trajectories + table from the cache
        names = [la.name for la in ctx.layers]
        ctx.evaluate({n: "uaq-4" for n in names})  # warm-up (builds the swapped modules once)
        t_one = min(_timed(ctx.evaluate, {n: "kmeans_c-3" for n in names}) for _ in range(3))
        t_dense = min(_timed(ctx.evaluate, {n: "fp16" for n in names}) for _ in range(3))  # the compute floor
        evaluations[f"{size}px"] = {"tokens": (size // 16) ** 2, "prepare_s": round(t_prepare, 1),
                                    "one_evaluation_s": round(t_one, 3), "dense_evaluation_s": round(t_dense, 3)}
    t_one = evaluations[f"{sizes[0]}px"]["one_evaluation_s"]

    journal = args.out / "journal.sqlite"
    journal.unlink(missing_ok=True)
    res = jobs.run_job(ctx, journal, max_configs=args.configs, max_seconds=None, job=jobs.SearchJob("bench"))
    forward = res.timings.get("forward", 0.0)
    machinery = (res.seconds - forward) / res.seconds
    result = {
        "date": datetime.date.today().isoformat(),
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch "
                   f"{torch.__version__}",
        "model": f"pixart_sigma_d1 ({n_weights / 1e6:.1f} M quantizable weights, 14 layers)",
        "option_table_s": round(t_table, 1),
        "states": 8,
        "evaluation": evaluations,
        "search": {"size": sizes[0], "configs": res.new, "seconds": round(res.seconds, 2),
                   "per_config_s": round(res.seconds / max(res.new, 1), 3),
                   "forward_s": round(forward, 2), "swap_s": round(res.timings.get("swap", 0.0), 2),
                   "journal_s": round(res.timings.get("journal", 0.0), 3),
                   "machinery_share": round(machinery, 4)},
        "targets": {"one_evaluation_le_2s": t_one <= 2.0, "machinery_le_10pct": machinery <= 0.10,
                    "option_table_le_60s": t_table <= 60.0},
    }
    if args.ray_configs:
        result["ray"] = ray_scaling(ctx, jobs, args.out, args.ray_configs)
    print(json.dumps(result, indent=2))


def _timed(fn, *a) -> float:
    t0 = time.perf_counter()
    fn(*a)
    return time.perf_counter() - t0


def ray_scaling(ctx, jobs, out: Path, n: int) -> dict:
    """Configs per minute in-process (1 thread, and all threads) and on a local Ray cluster with 1 and 2 workers
    (1 CPU and 1 torch thread each); overhead per config = wall time − evaluation time, per config."""
    import ray
    import torch

    from qua2sedimo.nodes.search_remote import ray_executor

    def run(name: str, executor=None) -> dict:
        path = out / f"journal-{name}.sqlite"
        path.unlink(missing_ok=True)
        res = jobs.run_job(ctx, path, max_configs=n, max_seconds=None, job=jobs.SearchJob(name), executor=executor)
        evaluate = res.timings["evaluate"]
        workers = getattr(executor, "workers", None) or 1
        return {"configs": res.new, "seconds": round(res.seconds, 2),
                "configs_per_min": round(60 * res.new / res.seconds, 2),
                "evaluate_s_per_config": round(evaluate / res.new, 3),
                # serial: wall − evaluate; parallel: the wall time the workers' evaluations do not cover
                "overhead_s_per_config": round(max(res.seconds * workers - evaluate, 0.0) / res.new, 4)}

    threads = torch.get_num_threads()
    out_ = {}
    torch.set_num_threads(1)
    try:
        out_["in_process_1_thread"] = run("inproc-1")
    finally:
        torch.set_num_threads(threads)
    out_[f"in_process_{threads}_threads"] = run(f"inproc-{threads}")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        for w in (1, 2):
            t0 = time.perf_counter()
            ex = ray_executor(ctx, workers=w)
            ex.start()
            startup = time.perf_counter() - t0
            warm = {la.name: "uaq-4" for la in ctx.layers}
            list(ex.run([(-1 - i, warm) for i in range(w)]))  # one config per worker first, as in-process is warm
            with ex:
                out_[f"ray_{w}_worker"] = {**run(f"ray-{w}", ex), "startup_s": round(startup, 1)}
    finally:
        ray.shutdown()
    out_["scaling_2_vs_1_workers"] = round(out_["ray_2_worker"]["configs_per_min"]
                                           / out_["ray_1_worker"]["configs_per_min"], 2)
    out_["ray_1_worker_vs_in_process_1_thread"] = round(out_["ray_1_worker"]["configs_per_min"]
                                                        / out_["in_process_1_thread"]["configs_per_min"], 2)
    return out_


if __name__ == "__main__":
    main()
