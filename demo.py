"""`make demo`: the main job end to end on a tiny model (see README.md).

Run as ``python -m qua2sedimo.demo --out demo-output``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch import nn

from .quant import OPTIONS, QuantConfig, option_table
from .quant.atomic import atomic_write_text


class TinyDiTBlock(nn.Module):
    """A PixArt-like block: self-attention, cross-attention and feed-forward projections."""

    def __init__(self, width: int, ctx: int):
        super().__init__()
        self.attn = nn.ModuleDict({"qkv": nn.Linear(width, 3 * width), "proj": nn.Linear(width, width)})
        self.cross_attn = nn.ModuleDict({
            "q_linear": nn.Linear(width, width),
            "kv_linear": nn.Linear(ctx, 2 * width),
            "proj": nn.Linear(width, width),
        })
        self.mlp = nn.ModuleDict({"fc1": nn.Linear(width, 4 * width), "fc2": nn.Linear(4 * width, width)})


def tiny_dit(width: int = 256, depth: int = 4, ctx: int = 512, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Module()
    model.x_embedder = nn.Conv2d(4, width, 2, stride=2)
    model.t_embedder = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
    model.blocks = nn.ModuleList(TinyDiTBlock(width, ctx) for _ in range(depth))
    model.final_layer = nn.Linear(width, 32)
    return model.half()


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description="Qua2SeDiMo demo on a tiny random model")
    ap.add_argument("--out", type=Path, default=Path("demo-output"))
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    model = tiny_dit()
    t0 = time.perf_counter()
    table = option_table(model, cache_dir=args.out / "cache")
    t_table = time.perf_counter() - t0
    errors = table.errors()
    # A simple mixed rule until the search lands: the lowest-error 3-bit option where it costs at most
    # 2x the best 4-bit error, else the best 4-bit option; first and last layers stay in fp16.
    mixed = {}
    for name, errs in errors.items():
        best4 = min((errs[o], o) for o in OPTIONS if o.endswith("-4"))
        best3 = min((errs[o], o) for o in OPTIONS if o.endswith("-3"))
        mixed[name] = best3[1] if best3[0] <= 2 * best4[0] else best4[1]
    keep = ("x_embedder", "final_layer")
    configs = {
        "uniform_uaq4": QuantConfig.uniform(model, "uaq-4", keep=keep),
        "mixed": QuantConfig.from_options(model, {k: v for k, v in mixed.items() if k not in keep}),
    }
    summary = {"layers": len(table.layers), "option_table_seconds": round(t_table, 3), "configs": {}}
    for name, cfg in configs.items():
        cfg.save(args.out / f"config_{name}.json")
        summary["configs"][name] = {
            "avg_bits": round(cfg.avg_bits(model), 4),
            "stored_bytes": cfg.nbytes(),
            "options": dict(cfg.counts()),
            "mean_rel_error": sum(
                errors[n][o] for n, o in cfg.options.items() if o != "fp16"
            ) / max(1, sum(o != "fp16" for o in cfg.options.values())),
        }
    atomic_write_text(args.out / "summary.json", json.dumps(summary, indent=1))
    print(f"option table: {len(table.layers)} layers x {len(OPTIONS)} options in {t_table:.2f} s")
    for name, s in summary["configs"].items():
        print(f"{name:>14}: b̄ = {s['avg_bits']:.3f} bits, {s['stored_bytes'] / 1e6:.2f} MB, "
              f"mean rel. error {s['mean_rel_error']:.4f}")
    print(f"wrote {args.out}/summary.json and configs")
    return summary


if __name__ == "__main__":
    main()
