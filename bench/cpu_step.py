"""The quantized denoiser step on CPU against the dense one, side by side in one process.

Run: ``python bench/cpu_step.py [--layers] [--toy] [--pixart] [--reps 3] [--out FILE.md]`` (``--pixart`` needs the
host environment of ``make host``: the model is ComfyUI's own ``PixArtSigma`` class, random weights).

* ``--layers``: the PixArt-Σ Linear shapes at 4 096 tokens — dense ``F.linear``, the quantized linear, and the
  decode alone (the gather oracle ``reference.dequantize`` and ``reference.dequantize_fast`` that the CPU path
  uses): where a quantized step's extra time goes.
* ``--toy``: the tiny transformer of ``bench/e2e.py`` (width 512, depth 2, batch 2) at 1 024 and 4 096 tokens.
* ``--pixart``: full-size random-weight PixArt-Σ (28 blocks, 1152 wide) at 1024 px (4 096 tokens, batch 1)
  through the path users take: ComfyUI's ``ModelPatcher``, the MODEL of Apply Config (``apply_config``, real
  quantizers), one step by ComfyUI's model call (``BaseModel.apply_model``).

Every variant is timed ``--reps`` times round-robin (dense, then each option, then again), so drift in the load of a
shared machine hits all alike; the table gives the best and the median step and their ratios dense/quantized (≥ 1
would be faster than dense) with the range of the per-round ratios. On a shared machine other jobs only ever add
time, so the best of several rounds is the figure to compare. ``decode s`` is the time spent decoding weights
inside the quantized step (measured by wrapping the decode).
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' ComfyUI host helpers
sys.path.insert(0, str(ROOT / "bench"))  # e2e.TinyDiT

from qua2sedimo.quant import QuantConfig, module_nbytes, quantize_  # noqa: E402
from qua2sedimo.quant.kernels import reference as ref  # noqa: E402
from qua2sedimo.quant.quantizers import quantize_weight  # noqa: E402

OPTIONS = ("uaq-4", "kmeans_c-4", "kmeans_c-3", "uaq-3")
PIXART_SHAPES = (("attn qkv", 3456, 1152), ("attn proj", 1152, 1152), ("cross kv (300 tokens)", 2304, 1152),
                 ("mlp fc1", 4608, 1152), ("mlp fc2", 1152, 4608))


class DecodeClock:
    """Wraps ``reference.dequantize_fast`` to add up the seconds spent decoding; ``oracle=True`` decodes with the
    gather oracle instead (the previous CPU path), to compare both in one run."""

    def __init__(self) -> None:
        self.seconds, self.oracle = 0.0, False
        self._fast = ref.dequantize_fast

    def __call__(self, w, dtype=None, rows=None, out=None):
        t0 = time.perf_counter()
        if self.oracle:
            dense = ref.dequantize(w, dtype, rows)
            if out is not None:
                out.copy_(dense)
                dense = out
        else:
            dense = self._fast(w, dtype, rows, out=out)
        self.seconds += time.perf_counter() - t0
        return dense

    def install(self) -> DecodeClock:
        ref.dequantize_fast = self
        return self


def best_of(fn: Callable[[], object], reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def header(title: str) -> str:
    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{title} — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
            f"{platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores, "
            f"{torch.get_num_threads()} torch threads, torch {torch.__version__}, load average {load} at the start")


def layer_table(reps: int, tokens: int = 4096) -> list[str]:
    """Per layer shape: dense and quantized linear timed alternately (best of ``reps`` each), and the decode."""
    rows = [header(f"Quantized Linear on CPU, {tokens} tokens, fp32 activations and tables"), "",
            "| layer | N×K | option | dense ms | quantized ms | dense/quantized | decode: oracle ms | fast ms |",
            "|---|---|---|---|---|---|---|---|"]
    for name, n, k in PIXART_SHAPES:
        m = 300 if "300" in name else tokens
        x = torch.randn(m, k)
        w = torch.randn(n, k) / math.sqrt(k)
        for option in ("uaq-4", "kmeans_c-3"):
            method, bits = option.split("-")
            packed = quantize_weight(w, method, int(bits)).packed
            pair = [lambda x=x, w=w: F.linear(x, w), lambda x=x, packed=packed: ref.linear(x, packed)]
            best = [math.inf, math.inf]
            for fn in pair:
                fn()
            for _ in range(reps):
                for i, fn in enumerate(pair):
                    t0 = time.perf_counter()
                    fn()
                    best[i] = min(best[i], time.perf_counter() - t0)
            t_oracle = best_of(lambda packed=packed: ref.dequantize(packed, torch.float32), reps)
            t_fast = best_of(lambda packed=packed: ref.dequantize_fast(packed, torch.float32), reps)
            rows.append(f"| {name} | {n}×{k} | {option} | {best[0] * 1e3:.1f} | {best[1] * 1e3:.1f} | "
                        f"{best[0] / best[1]:.2f}× | {t_oracle * 1e3:.1f} | {t_fast * 1e3:.1f} |")
    return rows


def side_by_side(title: str, variants: dict[str, tuple[Callable[[], object], bool]], clock: DecodeClock,
                 reps: int, sizes: dict[str, float], warm_up: Callable[[], object] | None = None) -> list[str]:
    """``variants``: label → (one step, decode with the oracle?); the first is the dense baseline. ``warm_up``
    replaces the untimed first call of each step (e.g. a smaller input through the same code)."""
    times: dict[str, list[float]] = {k: [] for k in variants}
    decode: dict[str, list[float]] = {k: [] for k in variants}
    with torch.no_grad():
        if warm_up is not None:
            warm_up()
        else:
            for step, oracle in variants.values():
                clock.oracle = oracle
                step()
        for _ in range(reps):
            for label, (step, oracle) in variants.items():
                clock.oracle, clock.seconds = oracle, 0.0
                t0 = time.perf_counter()
                step()
                times[label].append(time.perf_counter() - t0)
                decode[label].append(clock.seconds)
                print(f"  {label}: {times[label][-1]:.3f} s (decode {clock.seconds:.3f} s, load "
                      f"{os.getloadavg()[0]:.1f})", file=sys.stderr, flush=True)
    base_label = next(iter(variants))
    best0, med0 = min(times[base_label]), statistics.median(times[base_label])
    lines = [title, "", "| model | step s, best | dense/quantized, best | median | dense/quantized, median | "
             "per-round ratios | decode s | weights MiB |", "|---|---|---|---|---|---|---|---|"]
    for label, ts in times.items():
        best, med = min(ts), statistics.median(ts)
        per_round = [b / t for b, t in zip(times[base_label], ts, strict=True)]
        lines.append(f"| {label} | {best:.3f} | {best0 / best:.2f}× | {med:.3f} | {med0 / med:.2f}× | "
                     f"{min(per_round):.2f}–{max(per_round):.2f} | {min(decode[label]):.3f} | {sizes[label]:.1f} |")
    return lines


def toy(reps: int, clock: DecodeClock, token_counts: tuple[int, ...] = (1024, 4096), oracle: bool = True
        ) -> list[str]:
    from e2e import TinyDiT

    out: list[str] = []
    for tokens in token_counts:
        torch.manual_seed(0)
        x, y = torch.randn(2, tokens, 512), torch.randn(2, 120, 512)
        models = {"dense": TinyDiT(512, 2)}
        variants: dict[str, tuple[Callable[[], object], bool]] = {}
        for option in OPTIONS:
            model = TinyDiT(512, 2)
            model.load_state_dict(models["dense"].state_dict())
            quantize_(model, QuantConfig.uniform(model, option))
            models[option] = model
        for label, model in models.items():
            variants[label] = (lambda model=model, x=x, y=y: model(x, y), False)
        for option in ("uaq-4", "kmeans_c-3") if oracle else ():  # the previous CPU decode, same models
            variants[f"{option}, gather oracle decode"] = (lambda model=models[option], x=x, y=y: model(x, y), True)
        sizes = {label: module_nbytes(models[label.split(",")[0]]) / 2**20 for label in variants}
        out += side_by_side(header(f"Toy transformer (bench/e2e.py: width 512, depth 2), batch 2 × {tokens} tokens, "
                                   "fp32"), variants, clock, reps, sizes) + [""]
    return out


def pixart(reps: int, clock: DecodeClock, depth: int) -> list[str]:
    import comfy_host

    comfy_host.setup_inprocess(Path(tempfile.mkdtemp(prefix="q2s-bench-cpu-step-")))
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models as sm
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge

    cache = Path(tempfile.mkdtemp(prefix="q2s-bench-cpu-step-cache-"))
    bridge.cache_dir = lambda: cache  # a fresh option-table cache: the user's is neither read nor written
    cpu = torch.device("cpu")
    config = sm.PixArtSigma(dict(image_model="pixart_sigma", depth=depth, num_heads=16, patch_size=2,
                                 hidden_size=1152, in_channels=4, micro_condition=False, model_max_length=300))
    config.set_inference_dtype(torch.float32, None)  # what ComfyUI picks for a denoiser on CPU
    base = config.get_model({}, device=cpu)
    tm.init_params(base.diffusion_model, seed=0)
    dense = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    models = {"dense": dense}
    prep = {}
    for option in OPTIONS:
        t0 = time.perf_counter()
        models[option], _ = bridge.apply_config(dense, QuantConfig.uniform(base.diffusion_model, option))
        prep[option] = time.perf_counter() - t0
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 128, 128, generator=g)  # 1024 px: latent 128×128, patch 2 → 4 096 tokens
    small = torch.randn(1, 4, 64, 64, generator=g)  # the warm-up: the same code at 512 px (a quarter of the tokens)
    ctx = torch.randn(1, 300, 4096, generator=g)
    sigma = torch.tensor([1.0])
    variants: dict[str, tuple[Callable[[], object], bool]] = {}
    for label, mp in models.items():
        def step(mp=mp, latent=x):
            comfy.model_management.load_models_gpu([mp])
            return mp.model.apply_model(latent, sigma, c_crossattn=ctx)
        variants[label] = (step, False)
    sizes = {label: module_nbytes(bridge.diffusion_model(mp)) / 2**20 for label, mp in models.items()}
    lines = side_by_side(header(f"Full-size PixArt-Σ (ComfyUI PixArtSigma, depth {depth}, random weights, fp32) at "
                                "1024 px: 1 × 4 096 tokens, through Apply Config's MODEL and BaseModel.apply_model"),
                         variants, clock, reps, sizes,
                         warm_up=lambda: [step(latent=small) for step, _ in variants.values()])
    lines += ["", "Apply Config (option table + packing) per option, s: "
              + ", ".join(f"{o} {s:.0f}" for o, s in prep.items())]
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--toy", action="store_true")
    ap.add_argument("--pixart", action="store_true")
    ap.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096], help="the toy's token counts")
    ap.add_argument("--no-oracle", action="store_true", help="toy: skip the gather-oracle decode variants")
    ap.add_argument("--depth", type=int, default=28, help="PixArt-Σ blocks (28 = the real model)")
    ap.add_argument("--reps", type=int, default=3, help="timed rounds per variant")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    a = ap.parse_args()
    if not (a.layers or a.toy or a.pixart):
        a.layers = a.toy = a.pixart = True
    clock = DecodeClock().install()
    lines: list[str] = []
    parts = ((a.layers, lambda: layer_table(a.reps)),
             (a.toy, lambda: toy(a.reps, clock, tuple(a.tokens), not a.no_oracle)),
             (a.pixart, lambda: pixart(a.reps, clock, a.depth)))
    for wanted, part in parts:
        if wanted:
            lines += part() + [""]
            print("\n".join(lines), flush=True)
            print("-" * 40, flush=True)
    if a.out:
        tmp = a.out.with_name(a.out.name + ".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        tmp.replace(a.out)


if __name__ == "__main__":
    main()
