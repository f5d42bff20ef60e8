"""Quality on the trained reference model (issue 14, point 3): FID / class accuracy vs b̄, and whether the search's
cheap objective tracks them.

On the digits SD3 of ``nodes/reference_model.py`` (trained or taken from its cache; ComfyUI in-process, CPU):
(a) a search journal of ``--random`` configs from the paper's sampler, objective ``denoise_error`` (conditioning:
the ten classes as one batch of prompts against 'no class', or one class with ``--digit``); (b) the Sensitivity
Report's analysis: predictor, unit scores, knapsack at b̄ 3.25 / 3.5 / 3.75 / 3.9 / 4.0 and the paper rule,
measured; uniform {UAQ, K-Means-C, K-Means-A} × {3, 4}; (c) every config (and FP, twice: the second with other
seeds is the noise level) samples ``--samples`` digits with ComfyUI's KSampler (same seeds for every config) → FID
on the held-out classifier's features and class accuracy; (d) the objective study: Spearman vs FID over all configs
of ``denoise_error`` and its variants (one class, more states, v-space weighting of the states) and of the
``image`` objective; one plot (FID vs b̄), tables.

Run: ``set -a && . .venv/.qua2sedimo-host.env && set +a && .venv/bin/python bench/quality_trained.py``
(``--random 60 --samples 500`` by default; writes ``bench-output/quality-trained/``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # comfy_host

UNIFORM = ("uaq-4", "kmeans_c-4", "kmeans_a-4", "uaq-3", "kmeans_c-3", "kmeans_a-3")
TARGETS = (3.25, 3.5, 3.75, 3.9, 4.0)


def _plot(rows: list[dict], fp_fid: float, noise: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"random": dict(c="0.6", marker="o", s=14), "uniform": dict(c="tab:blue", marker="s", s=40),
              "knapsack": dict(c="tab:red", marker="*", s=110), "paper": dict(c="tab:green", marker="D", s=40)}
    for kind, style in styles.items():
        pts = [r for r in rows if r["kind"] == kind]
        if pts:
            ax.scatter([r["avg_bits"] for r in pts], [r["fid"] for r in pts], label=kind, **style)
    for r in rows:
        if r["kind"] in ("uniform", "knapsack"):
            ax.annotate(r["name"].removeprefix("uniform ").removeprefix("knapsack "), (r["avg_bits"], r["fid"]),
                        fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.axhline(fp_fid, color="k", lw=1, label=f"FP ({fp_fid:.2f})")
    ax.axhspan(fp_fid - noise, fp_fid + noise, color="k", alpha=0.08, label=f"FP seed noise ±{noise:.2f}")
    ax.set_xlabel("b̄ (average bits per weight)")
    ax.set_ylabel("FID (digit-classifier features)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title("Digits SD3 (trained): quality vs bits")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def objective_study(mp, ctx, spec, configs: list[dict], fids, *, seed: int) -> list[dict]:
    """Spearman vs FID of the search's objective and its variants, each measured on every config:
    ``denoise_error`` as searched, its states re-weighted to velocity space (``e_i / σ_i²``), with 4× the states,
    on one class only; the ``image`` objective (final-latent NMSE after the full sampler) on all classes / one."""
    import dataclasses

    import numpy as np
    import torch
    from scipy import stats

    from qua2sedimo.nodes import reference_model as rm
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.search import digits
    from qua2sedimo.search.objectives import DenoiseError

    def conditioning(classes):
        return rm.conditioning(classes), rm.conditioning([digits.NULL_CLASS] * len(classes))

    everyone, one = list(range(digits.N_CLASSES)), [7]
    per_state = DenoiseError(ctx.reference.states, device=mp.load_device)
    sigma = np.array([float(s.t.flatten()[0]) for s in ctx.reference.states])
    columns: dict[str, list[float]] = {"denoise_error, v-space weights e_i/σ_i² (8 states)": []}
    seconds: dict[str, float] = {"denoise_error, v-space weights e_i/σ_i² (8 states)": 0.0}
    searched_name = "denoise_error, all classes, 8 states (the search's)"
    seconds[searched_name] = 0.0
    for c in configs:
        t0 = time.perf_counter()
        ctx.evaluate(c["options"])
        t1 = time.perf_counter()
        with torch.inference_mode():
            e = per_state.errors(ctx.search_model.apply_model).numpy()
        columns["denoise_error, v-space weights e_i/σ_i² (8 states)"].append(float((e / sigma ** 2).mean()))
        seconds[searched_name] += t1 - t0
        seconds["denoise_error, v-space weights e_i/σ_i² (8 states)"] += time.perf_counter() - t1
    variants = {
        "denoise_error, 32 states (4 seeds)": (dataclasses.replace(spec, n_seeds=4, n_states=32), everyone),
        "denoise_error, one class (digit 7), 8 states": (spec, one),
        "image_nmse, all classes (2 seeds)": (dataclasses.replace(spec, objective="image"), everyone),
        "image_nmse, one class (digit 7)": (dataclasses.replace(spec, objective="image"), one),
    }
    for name, (vspec, classes) in variants.items():
        vctx = jobs.prepare(mp, *conditioning(classes), vspec)
        t0 = time.perf_counter()
        columns[name] = [float(vctx.evaluate(c["options"])[vctx.primary]) for c in configs]
        seconds[name] = time.perf_counter() - t0
        print(f"  {name}: {seconds[name]:.0f} s", flush=True)
    rows = []
    random = np.array([c["kind"] == "random" for c in configs])
    searched = np.array([c["denoise_error"] for c in configs])
    for name, values in {searched_name: searched, **columns}.items():
        v = np.asarray(values, dtype=float)
        rows.append({"objective": name, "seconds_per_config": seconds.get(name, float("nan")) / len(configs),
                     "all": float(stats.spearmanr(v, fids).statistic),
                     "random": float(stats.spearmanr(v[random], fids[random]).statistic)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--random", type=int, default=60, help="random configs sampled for FID (the journal's first)")
    ap.add_argument("--journal", type=int, default=None,
                    help="random configs in the journal the report analyses (default: --random); FID is measured on "
                    "the first --random of them only")
    ap.add_argument("--samples", type=int, default=500, help="digits sampled per config")
    ap.add_argument("--digit", type=int, default=None, help="search on this class only (default: all ten)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench-output" / "quality-trained")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    import comfy_host

    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    comfy_host.setup_inprocess(out / "comfy_base")
    import numpy as np
    import torch
    from scipy import stats

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import reference_model as rm
    from qua2sedimo.nodes import report_jobs
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.quant import QuantConfig
    from qua2sedimo.search import digits

    torch.set_num_threads(1)
    t_all = time.perf_counter()
    trained, mp = rm.load_trained(comfy_host.cache_root() / "reference-models")
    classes = list(range(digits.N_CLASSES)) if args.digit is None else [args.digit]
    pos, neg, spec = rm.search_setup(classes, seed=args.seed)
    t0 = time.perf_counter()
    ctx = jobs.prepare(mp, pos, neg, spec)
    path = out / "journal-digits.sqlite"
    n_journal = max(args.random, args.journal or 0)
    jobs.run_job(ctx, path, max_configs=n_journal, max_seconds=None, job=jobs.SearchJob("quality-trained"))
    t_search = time.perf_counter() - t0
    handle = jobs.SearchHandle(str(path), ctx.journal_kwargs, ctx.primary, "quality-trained", n_journal, ctx)
    t0 = time.perf_counter()
    analysis = report_jobs.analyse(handle, targets=TARGETS, seed=args.seed)
    t_analyse = time.perf_counter() - t0
    report = analysis.report.to_json()
    print(f"search {n_journal} configs: {t_search:.0f} s; analysis {t_analyse:.0f} s; predictor "
          f"{json.dumps(report['predictor'])}")

    configs: list[dict] = []
    with jobs.open_readonly(path, ctx.journal_kwargs) as j:
        records = j.records()
    built = {json.dumps(c.options, sort_keys=True): c for c in analysis.constructions}
    for rec in records:
        c = built.get(json.dumps(rec.options, sort_keys=True))
        if rec.source == "random":
            if rec.idx >= args.random:
                continue  # analysed by the report, not sampled for FID
            kind, name = "random", f"random {rec.idx}"
        elif c is not None:
            kind, name = c.rule, c.label
        elif rec.source == "uniform":
            kind, name = "uniform", f"uniform {next(iter(set(rec.options.values())))}"
        else:
            continue
        configs.append({"name": name, "kind": kind, "options": rec.options, "avg_bits": rec.avg_bits,
                        "denoise_error": rec.primary})
    have = {c["name"] for c in configs}
    for option in UNIFORM:  # the uniform options the report does not measure itself
        name = f"uniform {option}"
        if name in have:
            continue
        opts = {la.name: option for la in ctx.layers}
        values = ctx.evaluate(opts)
        configs.append({"name": name, "kind": "uniform", "options": opts,
                        "avg_bits": QuantConfig.from_options(bridge.diffusion_model(mp), opts).avg_bits(),
                        "denoise_error": float(values[ctx.primary])})
    print(f"{len(configs)} configs to sample")

    metric = digits.build_metric(digits.load_digits_data(rm.IMAGE_PX, seed=rm.SEED), seed=rm.SEED)
    sample_labels = digits.sample_labels(args.samples)
    t0 = time.perf_counter()
    fp = metric.score(rm.sample_digits(mp, sample_labels, args.seed), sample_labels)
    fp_other = metric.score(rm.sample_digits(mp, sample_labels, args.seed + 10_000), sample_labels)
    noise = abs(fp.fid - fp_other.fid)
    print(f"FP: FID {fp.fid:.3f} acc {fp.accuracy:.3f}; other seeds: FID {fp_other.fid:.3f} acc "
          f"{fp_other.accuracy:.3f} ({time.perf_counter() - t0:.0f} s)")
    dm = bridge.diffusion_model(mp)
    for i, c in enumerate(configs):
        t1 = time.perf_counter()
        model, _ = bridge.apply_config(mp, QuantConfig.from_options(dm, c["options"]))
        q = metric.score(rm.sample_digits(model, sample_labels, args.seed), sample_labels)
        c.update(fid=q.fid, accuracy=q.accuracy, seconds=round(time.perf_counter() - t1, 1))
        del model
        print(f"  [{i + 1}/{len(configs)}] {c['name']:28s} b̄ {c['avg_bits']:.3f}  denoise_error "
              f"{c['denoise_error']:.4g}  FID {q.fid:8.3f}  acc {q.accuracy:.3f}  ({c['seconds']:.0f} s)")

    de = np.array([c["denoise_error"] for c in configs])
    fids = np.array([c["fid"] for c in configs])
    rho = float(stats.spearmanr(de, fids).statistic)
    rho_random = float(stats.spearmanr(de[[c["kind"] == "random" for c in configs]],
                                       fids[[c["kind"] == "random" for c in configs]]).statistic)
    t0 = time.perf_counter()
    study = objective_study(mp, ctx, spec, configs, fids, seed=args.seed)
    t_study = time.perf_counter() - t0
    _plot(configs, fp.fid, noise, out / "fid-vs-bits.png")
    random35 = [c for c in configs if c["kind"] == "random" and c["avg_bits"] <= 3.5]
    best_random35 = min(random35, key=lambda c: c["fid"]) if random35 else None
    summary = {
        "model": {"path": str(trained.path), **{k: trained.meta[k] for k in ("version", "params", "train_seconds")}},
        "samples": args.samples, "random": args.random, "journal": n_journal, "classes": classes,
        "report_warnings": report["warnings"],
        "fp": fp.to_dict(), "fp_other_seeds": fp_other.to_dict(), "fp_seed_noise_fid": round(noise, 4),
        "spearman_denoise_error_vs_fid": {"all": round(rho, 4), "random": round(rho_random, 4)},
        "objective_study": study,
        "predictor": report["predictor"],
        "best_random_at_or_below_3.5": None if best_random35 is None else
        {k: best_random35[k] for k in ("name", "avg_bits", "fid", "accuracy")},
        "configs": [{k: v for k, v in c.items() if k != "options"} for c in configs],
        "seconds": {"search": round(t_search, 1), "analyse": round(t_analyse, 1), "study": round(t_study, 1),
                    "total": round(time.perf_counter() - t_all, 1)},
    }
    (out / "quality-trained.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"\nSpearman(denoise_error, FID): {rho:.3f} over {len(configs)} configs ({rho_random:.3f} over the "
          f"random ones); FP seed noise ±{noise:.3f}")
    print("| config | b̄ | denoise_error | FID | accuracy |\n|---|---|---|---|---|")
    print(f"| FP | 16 | 0 | {fp.fid:.3f} | {fp.accuracy:.3f} |")
    print(f"| FP, other seeds | 16 | 0 | {fp_other.fid:.3f} | {fp_other.accuracy:.3f} |")
    for c in sorted((c for c in configs if c["kind"] != "random"), key=lambda c: c["avg_bits"]):
        print(f"| {c['name']} | {c['avg_bits']:.3f} | {c['denoise_error']:.4g} | {c['fid']:.3f} | "
              f"{c['accuracy']:.3f} |")
    if best_random35:
        print(f"| best random b̄ ≤ 3.5 ({best_random35['name']}) | {best_random35['avg_bits']:.3f} | "
              f"{best_random35['denoise_error']:.4g} | {best_random35['fid']:.3f} | {best_random35['accuracy']:.3f} |")
    print("\n| objective | cost per config (s) | Spearman vs FID, all | random only |\n|---|---|---|---|")
    for row in study:
        print(f"| {row['objective']} | {row['seconds_per_config']:.2f} | {row['all']:.3f} | {row['random']:.3f} |")
    print(f"total {summary['seconds']['total']:.0f} s → {out}")


if __name__ == "__main__":
    main()
