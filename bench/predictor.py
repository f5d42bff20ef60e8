"""Predictor quality on a real journal: the tiny PixArt-Σ (ComfyUI in-process, CPU), denoise_error.

(a) loads the tiny model through the in-process ComfyUI host, traces its layer graph and fills a journal with
``--configs`` random configs (about 1 s each on CPU; cached under ``bench-output/predictor/``, so reruns reuse it),
(b) trains the GNN ensemble and the ridge baseline on the same folds and prints held-out Spearman / Kendall τ side
by side with timings, (c) scores op-level and block-level units, builds the configs the nodes build (the
paper rule and the predicted knapsack over op-level scores, ``search.marginal``) and prints the insights.

Run: ``set -a && . .venv/.qua2sedimo-host.env && set +a && .venv/bin/python bench/predictor.py --configs 200``

Result (2 CPU cores, 200 configs, seed 0): held-out Spearman 0.935 ± 0.02 (GNN) vs 0.943 ± 0.02 (ridge), hop 0 and
hop 4 at 0.94, hops 1–3 at 0.48–0.60; training 14 s, scores and construction < 0.2 s.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from scipy import stats

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # comfy_host, tiny_models

SPEC = dict(n_seeds=1, n_states=4, steps=4, width=384, height=384)  # the host tests' small denoise_error spec


def load_tiny(out: Path, n_configs: int, model: str = "pixart_sigma_d1", log=print):
    """(graph, option table, journal records, seconds spent evaluating) for the tiny model."""
    import comfy_host
    import tiny_models as tm

    base = out / "comfy_base"
    comfy_host.setup_inprocess(base)
    files = tm.ensure_models(base / "models", (model,))
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.quant import option_table
    from qua2sedimo.search.graph import trace_graph
    from qua2sedimo.search.journal import Journal

    bridge.register_folders()
    arch = tm.SPECS[model].arch
    mp = comfy.sd.load_diffusion_model(str(files[f"diffusion_models/{model}.safetensors"]))
    pos, neg = tm.conditioning_for(arch, seed=1), tm.conditioning_for(arch, seed=2)
    spec = jobs.SearchSpec(**SPEC)
    t0 = time.perf_counter()
    ctx = jobs.prepare(mp, pos, neg, spec)
    log(f"prepare (option table, FP states): {time.perf_counter() - t0:.1f} s")
    path = out / f"journal-{model}.sqlite"
    with Journal.open(path, **ctx.journal_kwargs) as j:
        have = len(j)
    t0 = time.perf_counter()
    if have < n_configs:
        log(f"evaluating {n_configs - have} configs into {path} …")
        jobs.run_job(ctx, path, max_configs=n_configs, max_seconds=None, job=jobs.SearchJob("bench"))
    eval_s = time.perf_counter() - t0
    kw = {k: v for k, v in ctx.journal_kwargs.items() if k != "layer_names"}
    with Journal.open(path, readonly=True, **kw) as j:
        records = [r for r in j.records() if r.idx is not None and r.idx < n_configs]
    dm = bridge.diffusion_model(mp)
    table = option_table(dm, spec.options, cache_dir=bridge.cache_dir())
    side = 40  # PixArt's position embedding needs (H + W) / 2 > 32
    x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond, extras = pos[0]
    conds = {k: v.cond for k, v in mp.model.extra_conds(cross_attn=cond, noise=x, device="cpu", **extras).items()}
    context = conds.pop("c_crossattn")
    graph = trace_graph(dm, lambda: mp.model.apply_model(x, torch.tensor([1.0]), c_crossattn=context, **conds))
    return graph, table, records, eval_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--configs", type=int, default=200)
    ap.add_argument("--model", default="pixart_sigma_d1")
    ap.add_argument("--out", default=str(ROOT / "bench-output" / "predictor"))
    ap.add_argument("--collect-only", action="store_true", help="only fill the journal")
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--ranking", default="spearman", choices=["spearman", "lambdarank", "none"])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the predictor (1 is fastest here)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    graph, table, records, eval_s = load_tiny(out, a.configs, a.model)
    n_layer = len(graph.layers)
    print(f"{a.model}: {n_layer} layers, {len(graph.nodes)} nodes, {len(graph.edges)} edges; "
          f"{len(records)} configs (evaluated now: {eval_s:.0f} s)")
    if a.collect_only:
        return

    from qua2sedimo.search.insights import insights
    from qua2sedimo.search.predictor import FeatureBuilder, PredictorConfig, train_baseline, train_predictor
    from qua2sedimo.search.quality import compare
    from qua2sedimo.search.scores import unit_scores

    timings = {}
    t0 = time.perf_counter()
    features = FeatureBuilder.from_table(graph, table)
    kw = {} if a.epochs is None else {"epochs": a.epochs}
    config = PredictorConfig(seed=a.seed, ranking=None if a.ranking == "none" else a.ranking, threads=a.threads,
                             **kw)
    ens = train_predictor(graph, features, records, config, log=lambda s: print("  " + s))
    timings["gnn train (5 folds)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ridge = train_baseline(features, records, config)
    timings["ridge train (5 folds)"] = time.perf_counter() - t0
    print()
    print(compare(ens, ridge).text)
    t0 = time.perf_counter()
    ens.predict([r.options for r in records])
    timings[f"gnn predict ({len(records)} configs)"] = time.perf_counter() - t0
    scores = {}
    for level in ("op", "block"):
        t0 = time.perf_counter()
        scores[level] = unit_scores(ens, level=level)
        timings[f"scores {level} ({len(scores[level])} variants)"] = time.perf_counter() - t0
    from qua2sedimo.quant.layer_table import LayerInfo, dtype_from_name
    from qua2sedimo.search.construct import paper_rule
    from qua2sedimo.search.marginal import predicted_knapsack

    layers = [LayerInfo(la.name, la.kind, la.shape, dtype_from_name(la.dtype)) for la in graph.layers]
    t0 = time.perf_counter()
    built = [paper_rule(scores["op"], layers)]  # what the Sensitivity Report and Build Config nodes construct
    for bits in (3.25, 3.5, 3.75):
        try:
            built.append(predicted_knapsack(ens, scores["op"], layers, target_bits=bits))
        except ValueError as e:
            print(f"knapsack at {bits} bits: {e}")
    timings["construct (paper + 3 predicted knapsacks)"] = time.perf_counter() - t0
    pred = ens.predict([c.options for c in built])
    constructed = ", ".join(f"{c.rule} b̄={c.avg_bits:.3f} predicted {p:.4g}" for c, p in zip(built, pred, strict=True))
    ens.save(out / "predictor.safetensors")
    # cross-check: how much each layer's choice matters, GNN op-level score spread vs the ridge's effect spread
    eff = ridge.effects()
    units = {}
    for sc in scores["op"]:
        units.setdefault(sc.unit, []).append(sc.score)
    names = list(units)
    gnn_spread = [max(units[n]) - min(units[n]) for n in names]
    ridge_spread = [max(eff[n][o] for o in features.quant_options) - min(eff[n][o] for o in features.quant_options)
                    for n in names]
    rho = stats.spearmanr(gnn_spread, ridge_spread).statistic
    print(f"\nper-layer sensitivity, GNN op-score spread vs ridge effect spread: Spearman {rho:+.3f} "
          f"over {len(names)} layers")
    print("\ntimings (s):", json.dumps({k: round(v, 2) for k, v in timings.items()}))
    print(f"total predictor + scores + construction: {sum(timings.values()):.1f} s (target ≤ 120 s)")
    print("constructed (op level, as the nodes do):", constructed)
    for level, sc in scores.items():
        ins = insights(sc)
        print(f"\n== {level}-level insights ({len(sc)} variants; sampled units: {ins.sampled_units or 'none'})")
        for key, groups in ins.stats().items():
            print(f"  by {key}:")
            for name, s in sorted(groups.items(), key=lambda kv: -kv[1]["median"]):
                print(f"    {str(name):16s} n={s['n']:5d} median={s['median']:+.3f} "
                      f"q1={s['q1']:+.3f} q3={s['q3']:+.3f} min={s['min']:+.3f} max={s['max']:+.3f}")
        print("  best variant per unit (spread = best − worst):")
        for unit, u in ins.units.items():
            print(f"    {unit:40s} {'/'.join(u.best_variant)}  score={u.best_score:+.3f} spread={u.spread:.3f}")


if __name__ == "__main__":
    main()
