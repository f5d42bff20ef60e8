"""LoRA on a quantized model through ComfyUI: the low-rank branch against dequantize-and-patch, 0/1/3 LoRAs.

Run (needs a ComfyUI host: ``set -a; . .venv/.qua2sedimo-host.env; set +a``):
``python bench/lora.py [--model pixart_sigma_d1] [--px 384] [--rank 16] [--repeats 5] [--out FILE.md]``

Each row runs in its own process (a clean peak RSS): ComfyUI in-process on the CPU (or CUDA with ``--device cuda``),
the tiny model built with ComfyUI's classes, Apply Config (uniform K-Means-C 4-bit), N random LoRAs (rank
``--rank``, every quantized layer) loaded with ComfyUI's LoRA loader, then one sampling step (cfg 1: one denoiser
call) timed ``--repeats`` times after a warm-up. Paths: ``branch`` (``y = LUT-GEMM(x) + Σ s·up(down(x))``),
``dequant`` (dequantize, ComfyUI's ``calculate_weight``, ``F.linear``), ``dense`` (the unquantized model with
ComfyUI's own patching, for reference). Peak memory: the process's max RSS (CPU) or ``max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # the tests' ComfyUI host helpers and tiny-model builders


def one(args: argparse.Namespace) -> dict:
    import comfy_host
    import tiny_models as tm

    base = Path(tempfile.mkdtemp(prefix="q2s-bench-lora-"))
    comfy_host.setup_inprocess(base)
    import comfy.model_management as mm
    import comfy.sd
    import torch

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig

    os.environ[bridge.LORA_PATH_ENV] = "dequant" if args.path == "dequant" else "branch"
    bridge.register_folders()
    src = base / f"{args.model}.safetensors"
    tm.build_and_save(args.model, src)
    spec = tm.SPECS[args.model]
    mp = comfy.sd.load_diffusion_model(str(src))
    dm = bridge.diffusion_model(mp)
    cfg = QuantConfig.uniform(dm, "kmeans_c-4")
    model = mp if args.path == "dense" else bridge.apply_config(mp, cfg)[0]
    for i in range(args.loras):
        g = torch.Generator().manual_seed(i)
        lora = {}
        for name in cfg.options:
            w = dm.get_submodule(name).weight
            if w.dim() != 2:
                continue
            lora[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(w.shape[0], args.rank, generator=g) * 0.01
            lora[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(args.rank, w.shape[1], generator=g) * 0.01
        model, _ = comfy.sd.load_lora_for_models(model, None, lora, 0.8, 0.0)
    pos, neg = tm.conditioning_for(spec.arch, seed=1), tm.conditioning_for(spec.arch, seed=2)

    def step():
        return bridge.sample_latents(model, pos, neg, seed=3, steps=1, cfg=1.0, sampler_name="euler",
                                     scheduler="normal", width=args.px, height=args.px)

    step()  # warm-up: loads (and, on the dense path, patches) the model
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e3)
    cuda = mm.get_torch_device().type == "cuda"
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"path": args.path, "loras": args.loras, "step_ms": statistics.median(times), "peak_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="pixart_sigma_d1")
    ap.add_argument("--px", type=int, default=384)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--path", choices=("branch", "dequant", "dense"), help=argparse.SUPPRESS)
    ap.add_argument("--loras", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.path is not None:
        print(json.dumps(one(args)))
        return
    rows = []
    for loras in (0, 1, 3):
        for path in ("dense", "branch", "dequant"):
            if loras == 0 and path == "dequant":
                continue  # no patches: both quantized paths are the plain LUT layer
            cmd = [sys.executable, __file__, "--model", args.model, "--px", str(args.px), "--rank", str(args.rank),
                   "--repeats", str(args.repeats), "--path", path, "--loras", str(loras)]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    dense = {r["loras"]: r for r in rows if r["path"] == "dense"}
    lines = [f"LoRA on a quantized {args.model} ({args.px}px, rank {args.rank}, uniform kmeans_c-4), one sampling step,"
             f" {platform.node()} ({platform.processor() or platform.machine()}, {os.cpu_count()} CPUs), "
             f"load average {os.getloadavg()[0]:.2f}, {datetime.date.today()}:", "",
             "| LoRAs | path | step ms | × dense step | peak MiB | peak − dense MiB |", "|---|---|---|---|---|---|"]
    for r in rows:
        d = dense[r["loras"]]
        lines.append(f"| {r['loras']} | {r['path']} | {r['step_ms']:.0f} | {r['step_ms'] / d['step_ms']:.2f} | "
                     f"{r['peak_mib']:.0f} | {r['peak_mib'] - d['peak_mib']:+.0f} |")
    text = "\n".join(lines)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
