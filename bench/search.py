"""The search on the tiny PixArt-Σ (in-process ComfyUI host, CPU): option table, one evaluation, machinery share.

Run (COMFY_DIR set, e.g. ``set -a; . .venv/.qua2sedimo-host.env; set +a``):
``python bench/search.py [--configs 10] [--out bench-output/search]``

Targets (issue 5): one ``denoise_error`` evaluation with 8 cached states ≤ 2 s; the search machinery (journal,
weight swaps, bookkeeping) ≤ 10 % of total time; the option table (all six options) ≤ 60 s.
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
    ap.add_argument("--size", type=int, default=384, help="image side in pixels (PixArt needs ≥ 264)")
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
    spec = jobs.SearchSpec(n_seeds=2, n_states=8, steps=10, width=args.size, height=args.size)
    t0 = time.perf_counter()
    option_table(dm, spec.options, cache_dir=cache)
    t_table = time.perf_counter() - t0

    t0 = time.perf_counter()
    ctx = jobs.prepare(mp, pos, neg, spec)
    t_prepare = time.perf_counter() - t0  # FP trajectories + table from the cache
    names = [la.name for la in ctx.layers]
    ctx.evaluate({n: "uaq-4" for n in names})  # warm-up (builds the swapped modules once)
    t0 = time.perf_counter()
    ctx.evaluate({n: "kmeans_c-3" for n in names})
    t_one = time.perf_counter() - t0
    t0 = time.perf_counter()
    ctx.evaluate({n: "fp16" for n in names})  # the same states through the dense model: the compute floor
    t_dense = time.perf_counter() - t0

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
        "prepare_s": round(t_prepare, 1),
        "one_evaluation_s": round(t_one, 3),
        "dense_evaluation_s": round(t_dense, 3),
        "states": 8,
        "search": {"configs": res.new, "seconds": round(res.seconds, 2),
                   "per_config_s": round(res.seconds / max(res.new, 1), 3),
                   "forward_s": round(forward, 2), "swap_s": round(res.timings.get("swap", 0.0), 2),
                   "journal_s": round(res.timings.get("journal", 0.0), 3),
                   "machinery_share": round(machinery, 4)},
        "targets": {"one_evaluation_le_2s": t_one <= 2.0, "machinery_le_10pct": machinery <= 0.10,
                    "option_table_le_60s": t_table <= 60.0},
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
