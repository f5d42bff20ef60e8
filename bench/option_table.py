"""All six options of a full-size random-weight PixArt-Σ through the option table, end to end, timed per option.

Run: ``python bench/option_table.py [--depth 28] [--reference-uaq] [--out FILE.md]`` (with the host environment of
``make host``: the model is built by ComfyUI's own ``PixArtSigma`` class, weights random, fp16).

This is what Apply Config and the search's preparation run (``quant.table.option_table``: every quantizable layer,
quantizer + packing + both error metrics), not an estimate from per-layer timings. ``--reference-uaq`` also times
the UAQ options with the clip search that scores every candidate (``uaq_codes_reference``, the previous
implementation) in the same run and checks that both give the same codes and tables.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' ComfyUI host helpers and tiny-model builders

OPTIONS = ("uaq-4", "kmeans_c-4", "kmeans_a-4", "uaq-3", "kmeans_c-3", "kmeans_a-3")


def build_pixart_sigma(depth: int, seed: int = 0):
    """The diffusion model of ComfyUI's PixArtSigma at full width (1152, 16 heads), ``depth`` blocks, fp16."""
    import comfy_host
    import tiny_models as tm

    comfy_host.setup_inprocess(Path(tempfile.mkdtemp(prefix="q2s-bench-table-")))
    import comfy.supported_models as sm

    spec = tm.SPECS["pixart_sigma_d1"]
    config = dict(spec.config_for(comfy_host.host_version()), depth=depth)
    dm = getattr(sm, spec.cls)(config).get_model({}).diffusion_model
    return tm.init_params(dm, seed).half()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--depth", type=int, default=28, help="transformer blocks (PixArt-Σ has 28)")
    ap.add_argument("--reference-uaq", action="store_true", help="also time UAQ scoring every clip candidate")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args()

    import torch

    from qua2sedimo.quant import quantizers
    from qua2sedimo.quant.table import option_table, quantizable_layers

    dm = build_pixart_sigma(args.depth)
    layers = quantizable_layers(dm)
    n_weights = sum(dm.get_submodule(layer.name).weight.numel() for layer in layers)
    load = os.getloadavg()[0]
    rows = []
    t_all, cpu_all = time.perf_counter(), time.process_time()
    tables = {}
    for option in OPTIONS:
        t0, c0 = time.perf_counter(), time.process_time()
        tables[option] = option_table(dm, (option,))
        rows.append((option, time.perf_counter() - t0, time.process_time() - c0))
    total, cpu_total = time.perf_counter() - t_all, time.process_time() - cpu_all
    ref_rows = []
    if args.reference_uaq:
        fast = quantizers._uaq  # what quantize_weight calls: codes, table and (on CPU) the error sums
        quantizers._uaq = lambda w, bits, lut_dtype, *a: (*quantizers.uaq_codes_reference(w, bits, *a), None)
        try:
            for option in ("uaq-4", "uaq-3"):
                t0 = time.perf_counter()
                ref = option_table(dm, (option,))
                seconds = time.perf_counter() - t0
                same = all(
                    torch.equal(ref.entries[n][option].packed, tables[option].entries[n][option].packed)
                    for n in ref.entries
                )
                ref_rows.append((option, seconds, same))
        finally:
            quantizers._uaq = fast

    lines = [
        f"Option table, full-size PixArt-Σ ({len(layers)} layers, {n_weights / 1e6:.0f} M weights, depth "
        f"{args.depth}) — {datetime.date.today().isoformat()}, {platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}, load average {load:.1f} at the start",
        "",
        "| option | seconds | ns per weight | CPU seconds (all threads) |",
        "|---|---|---|---|",
        *(f"| {o} | {s:.1f} | {s / n_weights * 1e9:.1f} | {c:.1f} |" for o, s, c in rows),
        f"| **all six** | **{total:.1f}** ({total / 60:.2f} min) | {total / n_weights * 1e9:.1f} | {cpu_total:.1f} |",
    ]
    if ref_rows:
        by_option = {o: s for o, s, _ in rows}
        lines += ["", "| UAQ option | every candidate scored, s | pruned search, s | speed-up | same codes/tables |",
                  "|---|---|---|---|---|"]
        lines += [f"| {o} | {s:.1f} | {by_option[o]:.1f} | {s / by_option[o]:.2f}× | {'yes' if same else 'NO'} |"
                  for o, s, same in ref_rows]
    kc = sum(s for o, s, _ in rows if o.startswith("kmeans_c"))
    uaq = sum(s for o, s, _ in rows if o.startswith("uaq"))
    lines += ["", f"- UAQ vs K-Means-C time per weight: {uaq / kc:.2f} (target ≤ 1) → "
              f"{'PASS' if uaq <= kc else 'FAIL'}",
              f"- all six options: {total / 60:.2f} min (target ≤ 5 min on 2 cores) → "
              f"{'PASS' if total <= 300 else 'FAIL'}"]
    report = "\n".join(lines)
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
