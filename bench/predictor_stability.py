"""How many evaluated configs the predictor needs before its ranking is stable (issue 14, point 5), GNN vs ridge
with ≥ 200 configs, and the sensitivity insights of a long search — on the trained reference model.

On the digits SD3 of ``nodes/reference_model.py`` (ComfyUI in-process, CPU): a search journal of ``--configs``
random configs (the paper's sampler; ``denoise_error`` with all ten classes as one batch of prompts, cfg 1, like
``bench/quality_trained.py``). The last ``--test`` configs are a fixed held-out set. For each training size n in
``--sizes`` (and ``--repeats`` random draws of n from the rest), both predictors are trained exactly as the
Sensitivity Report trains them (:func:`search.quality.train_and_compare`, 5 folds) and rank the held-out set:
Spearman / Kendall against the measured objective, next to the report's own cross-validated estimate at that n.
Then the report's full analysis runs on the whole journal and its insight figures (box plots) are saved.

Run: ``set -a && . .venv/.qua2sedimo-host.env && set +a && .venv/bin/python bench/predictor_stability.py``
(writes ``bench-output/predictor-stability/``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # comfy_host


def _plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4.2))
    sizes = sorted({r["n"] for r in rows})
    for key, label, style in (("gnn", "GNN, held-out set", "-o"), ("ridge", "ridge, held-out set", "-s"),
                              ("gnn_cv", "GNN, report's cross-validation", ":^")):
        mean = [np.mean([r[key] for r in rows if r["n"] == n]) for n in sizes]
        ax.plot(sizes, mean, style, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("evaluated configs the predictor trains on")
    ax.set_ylabel("Spearman ρ")
    ax.set_ylim(top=1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Digits SD3 (trained): predictor ranking vs configs")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=260, help="random configs in the journal")
    ap.add_argument("--test", type=int, default=60, help="held-out configs (the journal's last)")
    ap.add_argument("--sizes", default="10,20,30,50,80,120,200", help="training sizes, comma-separated")
    ap.add_argument("--repeats", type=int, default=2, help="random draws per training size")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-output" / "predictor-stability")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if max(sizes) + args.test > args.configs:
        ap.error(f"--configs {args.configs} is less than the largest size {max(sizes)} + --test {args.test}")
    import comfy_host

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    comfy_host.setup_inprocess(out / "comfy_base")
    import numpy as np
    import torch
    from scipy import stats

    from qua2sedimo.nodes import reference_model as rm
    from qua2sedimo.nodes import report_jobs
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.quant.options import FP_OPTION
    from qua2sedimo.search.graph import trace_graph
    from qua2sedimo.search.predictor import PredictorConfig
    from qua2sedimo.search.quality import train_and_compare
    from qua2sedimo.search.scores import unit_scores

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    trained, mp = rm.load_trained(comfy_host.cache_root() / "reference-models")
    pos, neg, spec = rm.search_setup(seed=args.seed)
    ctx = jobs.prepare(mp, pos, neg, spec)
    path = out / "journal-digits.sqlite"
    t0 = time.perf_counter()
    jobs.run_job(ctx, path, max_configs=args.configs, max_seconds=None, job=jobs.SearchJob("predictor-stability"))
    t_search = time.perf_counter() - t0
    with jobs.open_readonly(path, ctx.journal_kwargs) as j:
        records = sorted(j.records(source="random"), key=lambda r: r.idx)[:args.configs]
    test, pool = records[-args.test:], records[:-args.test]
    y_test = np.array([r.primary for r in test])
    print(f"{len(records)} configs ({t_search:.0f} s); held out {len(test)}")

    ctx.evaluate({la.name: FP_OPTION for la in ctx.layers})
    with torch.inference_mode():
        graph = trace_graph(ctx.search_dm, ctx.forward_once)
    rows: list[dict] = []
    units: list[tuple[int, int, dict]] = []  # (n, repeat, op-level variant scores)
    rng = np.random.default_rng(args.seed)
    for n in sizes:
        for rep in range(args.repeats):
            subset = pool[:n] if rep == 0 else [pool[i] for i in sorted(rng.choice(len(pool), n, replace=False))]
            t0 = time.perf_counter()
            tp = train_and_compare(graph, ctx.table, subset, PredictorConfig(folds=5, seed=rep))
            row = {"n": n, "repeat": rep, "seconds": round(time.perf_counter() - t0, 1)}
            for name, model in (("gnn", tp.ensemble), ("ridge", tp.baseline)):
                pred = model.predict([r.options for r in test])
                row[name] = float(stats.spearmanr(pred, y_test).statistic)
                row[f"{name}_kendall"] = float(stats.kendalltau(pred, y_test).statistic)
                cv = tp.quality.pooled(name)
                row[f"{name}_cv"] = float("nan") if cv is None else cv
            op_scores = {(u.unit, u.variant): u.score for u in unit_scores(tp.ensemble, graph, level="op")}
            units.append((n, rep, op_scores))
            rows.append(row)
            print(f"  n {n:4d} #{rep}: held-out ρ GNN {row['gnn']:.3f} ridge {row['ridge']:.3f} | report's CV ρ "
                  f"GNN {row['gnn_cv']:.3f} ridge {row['ridge_cv']:.3f} ({row['seconds']:.0f} s)", flush=True)
    # the insights' stability: op-level unit scores at n ranked against those of the largest n (first draw)
    ref = next(sc for n, rep, sc in units if n == max(sizes) and rep == 0)
    keys = sorted(ref)
    for row, (_, _, sc) in zip(rows, units, strict=True):
        row["scores_vs_largest"] = float(stats.spearmanr([sc[k] for k in keys], [ref[k] for k in keys]).statistic)
    _plot(rows, out / "predictor-stability.png")

    t0 = time.perf_counter()
    handle = jobs.SearchHandle(str(path), ctx.journal_kwargs, ctx.primary, "predictor-stability", args.configs, ctx)
    analysis = report_jobs.analyse(handle, seed=args.seed)
    t_analyse = time.perf_counter() - t0
    for name, png in analysis.figures.items():
        (out / f"{name}.png").write_bytes(png)
    report = analysis.report.to_json()
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    summary = {"configs": len(records), "test": len(test), "sizes": sizes, "repeats": args.repeats, "rows": rows,
               "report_predictor": report["predictor"], "categories": report["categories"],
               "seconds": {"search": round(t_search, 1), "analyse": round(t_analyse, 1),
                           "total": round(time.perf_counter() - t_all, 1)}}
    (out / "predictor-stability.json").write_text(json.dumps(summary, indent=2) + "\n")
    print("\n| configs | GNN ρ (held-out) | ridge ρ | GNN τ | ridge τ | GNN ρ (report's CV) | op scores ρ vs "
          f"{max(sizes)} configs |")
    print("|---|---|---|---|---|---|---|")
    for n in sizes:
        rs = [r for r in rows if r["n"] == n]

        def cell(k: str, rs: list[dict] = rs) -> str:
            v = [r[k] for r in rs]
            return f"{np.mean(v):.3f}" + (f" ± {np.std(v):.3f}" if len(v) > 1 else "")

        print(f"| {n} | {cell('gnn')} | {cell('ridge')} | {cell('gnn_kendall')} | {cell('ridge_kendall')} | "
              f"{cell('gnn_cv')} | {cell('scores_vs_largest')} |")
    print(f"analysis on all {len(records)} configs: {t_analyse:.0f} s; predictor {json.dumps(report['predictor'])}")
    print(f"total {summary['seconds']['total']:.0f} s → {out}")


if __name__ == "__main__":
    main()
