"""Issue-6 quality targets on the tiny PixArt-Σ (in-process ComfyUI, CPU, denoise_error), end to end:
journal of N random configs → predictor + baseline → unit scores → knapsack at 3.5 / 4.0 and the paper's rule →
measured with the real objective, against uniform UAQ-3/4 and the best random config at or below each target.

Run (COMFY_DIR set): ``python bench/quality.py [--configs 200] [--out bench-output/predictor]`` — the journal is
shared with ``bench/predictor.py`` (same spec), so configs evaluated there are reused.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "bench"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=200)
    ap.add_argument("--out", type=Path, default=ROOT / "bench-output" / "predictor")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import comfy_host
    import tiny_models as tm
    from predictor import SPEC

    base = args.out / "comfy_base"
    comfy_host.setup_inprocess(base)
    files = tm.ensure_models(base / "models", ("pixart_sigma_d1",))
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import report_jobs
    from qua2sedimo.nodes import search_jobs as jobs

    bridge.register_folders()
    mp = comfy.sd.load_diffusion_model(str(files["diffusion_models/pixart_sigma_d1.safetensors"]))
    pos, neg = tm.conditioning_for("pixart", seed=1), tm.conditioning_for("pixart", seed=2)
    ctx = jobs.prepare(mp, pos, neg, jobs.SearchSpec(**SPEC))
    path = args.out / "journal-pixart_sigma_d1.sqlite"
    t0 = time.perf_counter()
    jobs.run_job(ctx, path, max_configs=args.configs, max_seconds=None, job=jobs.SearchJob("quality"))
    t_search = time.perf_counter() - t0
    handle = jobs.SearchHandle(str(path), ctx.journal_kwargs, ctx.primary, "quality", args.configs, ctx)
    t0 = time.perf_counter()
    a = report_jobs.analyse(handle, targets=(3.5, 4.0), seed=args.seed)
    t_analyse = time.perf_counter() - t0
    r = a.report.to_json()
    b = r["baselines"]
    m = {(c["rule"], c["target_bits"]): c for c in r["constructed"]}
    k35, k40 = m[("knapsack", 3.5)], m[("knapsack", 4.0)]
    rows = [
        ("predictor held-out Spearman (GNN)", r["predictor"]["spearman"], "≥ 0.8",
         (r["predictor"]["spearman"] or 0) >= 0.8),
        ("ridge baseline Spearman", r["predictor"]["baseline_spearman"], "—", None),
        ("knapsack@3.5 objective (b̄)", f"{k35['objective']:.4g} ({k35['avg_bits']:.3f})", "", None),
        ("best random b̄ ≤ 3.5", f"{b['best_random_at_or_below_target']['3.5']['objective']:.4g} "
         f"({b['best_random_at_or_below_target']['3.5']['avg_bits']:.3f})", "knapsack beats it",
         k35["objective"] < b["best_random_at_or_below_target"]["3.5"]["objective"]),
        ("uniform UAQ-3", f"{b['uniform_uaq3']['objective']:.4g} ({b['uniform_uaq3']['avg_bits']:.3f})",
         "knapsack@3.5 beats it", k35["objective"] < b["uniform_uaq3"]["objective"]),
        ("knapsack@4.0 objective (b̄)", f"{k40['objective']:.4g} ({k40['avg_bits']:.3f})", "", None),
        ("uniform UAQ-4", f"{b['uniform_uaq4']['objective']:.4g} ({b['uniform_uaq4']['avg_bits']:.3f})",
         "knapsack@4.0 beats it", k40["objective"] < b["uniform_uaq4"]["objective"]),
        ("paper rule objective (b̄)", f"{m[('paper', None)]['objective']:.4g} ({m[('paper', None)]['avg_bits']:.3f})",
         "", None),
        ("prediction + scoring + construction", f"{sum(v for k, v in a.seconds.items() if k != 'measure'):.1f} s",
         "≤ 120 s", sum(v for k, v in a.seconds.items() if k != "measure") <= 120),
    ]
    print(f"journal: {len(a.records)} records; search {t_search:.0f} s; analyse {t_analyse:.1f} s {a.seconds}")
    print("| measure | value | target | met |\n|---|---|---|---|")
    for name, value, target, ok in rows:
        v = f"{value:.3f}" if isinstance(value, float) else value
        print(f"| {name} | {v} | {target} | {'' if ok is None else ('yes' if ok else '**no**')} |")
    (args.out / "quality.json").write_text(json.dumps({"rows": [list(x) for x in rows], "seconds": a.seconds},
                                                      default=str, indent=2))


if __name__ == "__main__":
    main()
