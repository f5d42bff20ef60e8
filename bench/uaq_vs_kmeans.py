"""UAQ against K-Means-C, time per weight, side by side in one process (issue 15, point 4).

Run: ``python bench/uaq_vs_kmeans.py [--rounds 3] [--out FILE.md]``

``quantize_weight`` (quantizer + packing + both error metrics: what the option table runs per layer) on the three
PixArt-Σ Linear shapes (1152×1152 stands in for the attention layers: 4608×1152, 1152×4608, 3456×1152, fp16,
gaussian with a few outliers), the four options round-robin so that drift in a shared machine's load hits all alike;
the best round of each. The full-model figure is ``bench/option_table.py``.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from pathlib import Path

import torch

from qua2sedimo.quant.quantizers import quantize_weight

SHAPES = ((4608, 1152), (1152, 4608), (3456, 1152))
OPTIONS = (("uaq", 4), ("kmeans_c", 4), ("uaq", 3), ("kmeans_c", 3))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    weights = []
    for n, k in SHAPES:
        w = torch.randn(n, k, generator=g) / k**0.5
        w[:, :2] *= 8  # a few outliers per row
        weights.append(w.half())
    n_weights = sum(w.numel() for w in weights)
    load0 = os.getloadavg()
    quantize_weight(weights[0][:64], "uaq", 4)  # warm-up (thread pool, first calls)
    quantize_weight(weights[0][:64], "kmeans_c", 4)
    times: dict[tuple[str, int], list[float]] = {o: [] for o in OPTIONS}
    for _ in range(a.rounds):
        for method, bits in OPTIONS:
            t0 = time.perf_counter()
            for w in weights:
                quantize_weight(w, method, bits)
            times[(method, bits)].append(time.perf_counter() - t0)
    lines = [f"UAQ vs K-Means-C per weight — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"{platform.machine()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch "
             f"{torch.__version__}, load average {load0[0]:.1f} at the start, {os.getloadavg()[0]:.1f} at the end; "
             f"{n_weights / 1e6:.1f} M weights, best of {a.rounds} rounds", "",
             "| option | s | ns per weight | vs K-Means-C, same bits |", "|---|---|---|---|"]
    for method, bits in OPTIONS:
        best = min(times[(method, bits)])
        kc = min(times[("kmeans_c", bits)])
        lines.append(f"| {method}-{bits} | {best:.2f} | {best / n_weights * 1e9:.0f} | {best / kc:.2f} |")
    report = "\n".join(lines)
    print(report)
    if a.out:
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text(report + "\n")
        tmp.replace(a.out)


if __name__ == "__main__":
    main()
