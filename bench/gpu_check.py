"""One prepared GPU check of the Triton LUT kernels (≤ 5 minutes on one H100/H200), printing markdown tables:

1. correctness against the reference backend, on the device, of the fused kernel (every tile shape at 3/4 bits
   bf16, table and affine decode, split-K off and on; the main tiles also in fp16 and at 2/8 bits; the 16-token
   main tile also with the gather table decode; one-hot rows that must return the table's entries exactly under the
   ``prmt`` and the gather decode) and of the dequant kernel (word-wise and byte-wise rows);
2. time ratio bf16 cuBLAS / quantized (``kernels.linear``, the dispatch a model gets) at M ∈ {1, 16, 64, 256, 4096,
   8192} for the PixArt (1152/4608), SDXL (640/1280/5120) and Flux (3072/12288) shapes at 3 and 4 bits, and the
   fused GEMM's time with the gather table decode over the ``prmt`` one at 16 tokens on the Flux shapes, and the
   dequant + cuBLAS path at M = 4096/8192 by chunk size (the large-M dispatch's one tunable);
3. ``quantize_weight`` of all six options on the PixArt-Σ shapes on the GPU and the CPU side by side (the option
   table quantizes on the GPU where the model is), with the share of identical code bytes;
4. one denoiser step and peak memory, dense bf16 vs quantized (uaq-4: affine decode; kmeans_c-3: table decode), of a
   full-size random-weight PixArt-Σ built with ComfyUI's classes (1024 px: 4096 tokens, batch 2), with the weight
   bytes by packed accounting.

``--dry-run`` runs every part on CPU with tiny sizes (Triton under its interpreter, a 1-block PixArt-Σ, 2 timing
repeats): a check that the script works, not a measurement.

    python bench/gpu_check.py [--dry-run] [--skip-model] [--out docs/gpu-check-latest.md]

The model step needs the ComfyUI host of the tests (``make host``; its environment file sets ``COMFY_DIR``) and is
skipped with one line without it.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

if "--dry-run" in sys.argv:  # must precede the import of the Triton kernel module
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))  # tiny_models / comfy_host: ComfyUI's classes

from qua2sedimo.quant import QuantLinear, kernels, module_nbytes  # noqa: E402
from qua2sedimo.quant.kernels import reference as ref  # noqa: E402
from qua2sedimo.quant.kernels import triton_lut as tri  # noqa: E402
from qua2sedimo.quant.packed import PackedLayout, PackedWeight  # noqa: E402
from qua2sedimo.quant.packing import pack_codes  # noqa: E402

M_VALUES = (1, 16, 64, 256, 4096, 8192)
BITS = (3, 4)


def random_weight(n: int, k: int, bits: int, method: str, dtype: torch.dtype, device: str,
                  seed: int = 0) -> PackedWeight:
    """Random codes and a table of ``method``'s kind: UAQ affine per channel, K-Means-C sorted per channel, K-Means-A
    one per layer."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g, dtype=torch.uint8)
    levels = torch.arange(1 << bits, dtype=torch.float32)
    if method == "uaq":
        zero = torch.round(torch.rand(n, 1, generator=g) * (1 << bits))
        lut = (levels[None, :] - zero) * (torch.rand(n, 1, generator=g) * 0.02 + 1e-3)
    else:
        lut = torch.randn(1 if method == "kmeans_a" else n, 1 << bits, generator=g).sort(dim=1).values * 0.05
    layout = PackedLayout(method, bits, (n, k), dtype)
    return PackedWeight.from_parts(pack_codes(codes, bits), lut.to(dtype), layout).to(device)


def timer(device: str, reps: int) -> Callable[[Callable[[], object]], float]:
    """Median seconds of ``fn`` (CUDA events; wall clock on CPU)."""

    def run(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(reps):
            if device == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end) / 1e3)
            else:
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return sorted(times)[len(times) // 2]

    return run


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.double()
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-30))


# ----------------------------------------------------------------------------------------------- 1. correctness


def check_correctness(device: str, dry: bool) -> list[str]:
    rows = ["| kernel | variant | rel. error | tolerance | ok |", "|---|---|---|---|---|"]
    n, k = (72, 320) if dry else (1000, 2048)  # partial weight tiles, K split into several blocks
    main = {(16, *tri.TILES_M16[0]), (16, *tri.TILES_M16_AFFINE[0]), (32, *tri.TILES[0]), (64, *tri.TILES[0])}

    def wanted(cfg: tri.FusedConfig, bits: int, dtype: torch.dtype) -> bool:
        """Every tile at 3/4 bits bf16; the main tiles also in fp16 and at 2/8 bits (bounds the JIT time)."""
        is_main = (cfg.bm, cfg.bn, cfg.bk) in main
        return (bits in (3, 4) and (dtype == torch.bfloat16 or is_main)) or (is_main and dtype == torch.bfloat16)

    variants = [v for v in tri.fused_variants() if wanted(v[0], v[1], v[3])]
    if dry:
        variants = [v for v in tri.fused_variants()
                    if v[0].bm == 16 and (v[0].bn, v[0].bk) == (32, 32) and v[3] == torch.float16]
    # the table decode of the dispatch (prmt) everywhere; the gather decode too on the 16-token main tile
    variants = [(*v, None) for v in variants] + [
        (v[0], v[1], v[2], v[3], "gather") for v in variants
        if not v[2] and v[1] in (3, 4) and (v[0].bm, v[0].bn, v[0].bk) == (16, *tri.TILES_M16[0])]
    bad = 0
    for cfg, bits, affine, dtype, decode in variants:
        w = random_weight(n, k, bits, "uaq" if affine else "kmeans_c", dtype, device, seed=bits)
        m = min(cfg.bm, 7 if dry else cfg.bm) - (cfg.bm > 16)  # a partial token tile
        x = torch.randn(m, k, device=device, dtype=dtype)
        expected = F.linear(x.double(), ref.dequantize(w, torch.float64))
        kind = "affine" if affine else "table-gather" if decode == "gather" else "table"
        for split in (1, 3):
            out = torch.empty(m, n, dtype=dtype, device=device)
            c = tri.fused_config(cfg.bm, cfg.bn, cfg.bk, split)
            tri.fused_into(x, w.codes, w.lut, bits, k, None, out, config=c, affine=affine, decode=decode)
            e, tol = rel_err(out, expected), (2e-3 if dtype == torch.float16 else 1e-2)
            bad += e >= tol
            rows.append(f"| fused | {cfg.bm}x{cfg.bn}x{cfg.bk} split {split} {bits}b {kind} {str(dtype)[6:]} | "
                        f"{e:.1e} | {tol:.0e} | {'ok' if e < tol else 'FAIL'} |")
    # the table decodes, weight by weight: one-hot tokens must return the table's entries exactly
    n1, k1 = (40, 256) if dry else (512, 2048)
    for bits in BITS:
        for decode in ("prmt", "gather"):
            w = random_weight(n1, k1, bits, "kmeans_c", torch.bfloat16, device, seed=7 + bits)
            dense = ref.dequantize(w, torch.bfloat16)
            same = True
            for first in (0, 16):  # columns at every residue mod 32: every code position of the packed words
                cols = torch.tensor([(first + r * 33) % k1 for r in range(16)], device=device)
                x = torch.zeros(16, k1, device=device, dtype=torch.bfloat16)
                x[torch.arange(16, device=device), cols] = 1
                out = torch.empty(16, n1, dtype=torch.bfloat16, device=device)
                tri.fused_into(x, w.codes, w.lut, bits, k1, None, out,
                               config=tri.fused_config(16, *tri.TILES_M16[0]), decode=decode)
                same = same and torch.equal(out, dense[:, cols].t())
            bad += not same
            rows.append(f"| fused one-hot | {bits}b table-{decode} bf16 | {'0' if same else 'differs'} | exact | "
                        f"{'ok' if same else 'FAIL'} |")
    for bits in (2, 3, 4, 8):
        for kk in (k, k + 1):  # word-aligned rows, byte-wise rows
            w = random_weight(n, kk, bits, "kmeans_c", torch.bfloat16, device, seed=kk)
            same = torch.equal(tri.dequantize(w), ref.dequantize(w))
            bad += not same
            rows.append(f"| dequant | {bits}b K={kk} bf16 | {'0' if same else 'differs'} | exact | "
                        f"{'ok' if same else 'FAIL'} |")
    rows.append(f"\n{'all kernels match the reference' if not bad else f'{bad} FAILED'}")
    return rows


# ----------------------------------------------------------------------------------------------- 2. speed


def check_speed(device: str, dry: bool) -> list[str]:
    shapes = [(name, n, k) for name, ss in tri.MODEL_SHAPES.items() for n, k in ss]
    m_values = (1, 16, 40) if dry else M_VALUES
    if dry:
        shapes = [("tiny", 72, 320)]
    run = timer(device, 2 if dry else 20)
    dtype = torch.bfloat16
    head = "| model | N×K | bits | " + " | ".join(f"M={m}" for m in m_values) + " |"
    rows = ["time ratio bf16 cuBLAS / quantized (> 1: quantized is faster)", "", head,
            "|---|---|---|" + "---|" * len(m_values)]
    for name, n, k in shapes:
        dense = torch.randn(n, k, device=device, dtype=dtype)
        for bits in BITS:
            w = random_weight(n, k, bits, "kmeans_c", dtype, device, seed=n + k + bits)
            cells = []
            for m in m_values:
                x = torch.randn(m, k, device=device, dtype=dtype)
                t_dense = run(lambda x=x, d=dense: F.linear(x, d))
                t_quant = run(lambda x=x, w=w: kernels.linear(x, w))
                cells.append(f"{t_dense / t_quant:.2f}")
            rows.append(f"| {name} | {n}×{k} | {bits} | " + " | ".join(cells) + " |")
    rows += ["", "fused GEMM, 16 tokens, table decodes: time gather / prmt (> 1: the register lookup is faster)", "",
             "| N×K | bits | gather / prmt |", "|---|---|---|"]
    for n, k in ((72, 320),) if dry else ((3072, 12288), (12288, 3072)):
        for bits in BITS:
            w = random_weight(n, k, bits, "kmeans_c", dtype, device, seed=n + bits)
            x = torch.randn(16, k, device=device, dtype=dtype)
            out = torch.empty(16, n, device=device, dtype=dtype)
            t = {d: run(lambda d=d, w=w, x=x, out=out, n=n, k=k, bits=bits:
                        tri.fused_into(x, w.codes, w.lut, bits, k, None, out, decode=d)) for d in ("prmt", "gather")}
            rows.append(f"| {n}×{k} | {bits} | {t['gather'] / t['prmt']:.2f} |")
    chunks = (1 << 21, 1 << 22, 1 << 23, 1 << 24)  # weights dequantized per cuBLAS call (default: CHUNK_WEIGHTS)
    rows += ["", "large M, dequant + cuBLAS, 4 bits: time ratio bf16 / quantized by chunk size (weights per chunk; "
             f"the default is {ref.CHUNK_WEIGHTS >> 20} Mi: a chunk that stays in L2 is read back from there)", "",
             "| N×K | M | " + " | ".join(f"{c >> 20} Mi" for c in chunks) + " |", "|---|---|" + "---|" * len(chunks)]
    for n, k in ((72, 320),) if dry else ((3072, 12288), (12288, 3072)):
        dense = torch.randn(n, k, device=device, dtype=dtype)
        w = random_weight(n, k, 4, "kmeans_c", dtype, device, seed=n)
        for m in (40,) if dry else (4096, 8192):
            x = torch.randn(m, k, device=device, dtype=dtype)
            t_dense = run(lambda x=x, d=dense: F.linear(x, d))
            cells = []
            for c in chunks:
                r = max(1, c // k)
                cells.append(f"{t_dense / run(lambda x=x, w=w, r=r: tri.linear(x, w, chunk_rows=r)):.2f}")
            rows.append(f"| {n}×{k} | {m} | " + " | ".join(cells) + " |")
    return rows


# ----------------------------------------------------------------------------------------------- 3. quantizers


def check_quantizers(device: str, dry: bool) -> list[str]:
    """``quantize_weight`` (what the option table runs per layer) of all six options on the PixArt-Σ Linear shapes,
    on the device and on the CPU side by side, and how many codes the two agree on."""
    from qua2sedimo.quant.quantizers import quantize_weight  # noqa: PLC0415

    shapes = ((40, 64),) if dry else ((4608, 1152), (1152, 4608), (1152, 1152))
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(n, k, generator=g).half() for n, k in shapes]
    total = sum(w.numel() for w in weights)
    rows = [f"PixArt-Σ shapes {', '.join(f'{n}×{k}' for n, k in shapes)} ({total / 1e6:.1f} M fp16 weights)", "",
            "| option | device s | ns/weight | CPU s | CPU / device | same codes |", "|---|---|---|---|---|---|"]
    for method in ("uaq", "kmeans_c", "kmeans_a"):
        for bits in BITS[::-1]:
            times, codes = {}, {}
            for dev in (device, "cpu"):
                ws = [w.to(dev) for w in weights]
                quantize_weight(ws[0], method, bits)  # warm-up (kernels, allocator)
                if dev == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                out = [quantize_weight(w, method, bits) for w in ws]
                if dev == "cuda":
                    torch.cuda.synchronize()
                times[dev] = time.perf_counter() - t0
                codes[dev] = torch.cat([q.codes.cpu().reshape(-1) for q in out])
            same = float((codes[device] == codes["cpu"]).double().mean())
            rows.append(f"| {method}-{bits} | {times[device]:.2f} | {times[device] / total * 1e9:.1f} | "
                        f"{times['cpu']:.2f} | {times['cpu'] / times[device]:.1f}× | {same:.4%} of bytes |")
    return rows


# ----------------------------------------------------------------------------------------------- 4. model step


def pixart_sigma(depth: int, device: str, dtype: torch.dtype) -> torch.nn.Module:
    """Random-weight PixArt-Σ built with ComfyUI's classes, allocated on ``device``."""
    import comfy_host  # noqa: PLC0415

    comfy_host.setup_inprocess()
    import comfy.supported_models as sm  # noqa: PLC0415

    config = dict(image_model="pixart_sigma", depth=depth, num_heads=16, patch_size=2, hidden_size=1152,
                  in_channels=4, micro_condition=False, model_max_length=300)
    dm = sm.PixArtSigma(config).get_model({}, device=device).diffusion_model.to(dtype)
    g = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in dm.parameters():
            if p.dim() >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=g)
            else:
                p.normal_(0, 0.02, generator=g)
        for b in dm.buffers():
            if b.is_floating_point():
                b.zero_()
    return dm


def quantize_random(model: torch.nn.Module, method: str, bits: int) -> torch.nn.Module:
    """Every Linear replaced by a :class:`QuantLinear` with random codes/tables of ``method`` (speed and memory are
    what is measured here, not quality; the quantizers are benchmarked in ``bench/quantizers.py``)."""
    for name, mod in list(model.named_modules()):
        for child_name, child in list(mod.named_children()):
            if isinstance(child, torch.nn.Linear):
                w = random_weight(child.out_features, child.in_features, bits, method, child.weight.dtype,
                                  str(child.weight.device), seed=hash((name, child_name)) % 2**31)
                q = QuantLinear(child.in_features, child.out_features, method, bits, child.bias is not None,
                                child.weight.dtype, device="meta")
                q.weight = torch.nn.Parameter(w, requires_grad=False)
                if child.bias is not None:
                    q.bias = torch.nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(mod, child_name, q)
    return model


def check_model(device: str, dry: bool) -> list[str]:
    import comfy_host  # noqa: PLC0415

    reason = comfy_host.host_unavailable_reason()
    if reason:
        return [f"skipped: {reason} (the model is built with ComfyUI's classes; `make host` installs them)"]
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    depth, side = (1, 64) if dry else (28, 128)  # 1024 px: latent 128×128, patch 2 → 4096 tokens (≥ 512 px: its
    # position embedding divides by round(side / 64))
    batch = 2
    run = timer(device, 1 if dry else 5)
    x = torch.randn(batch, 4, side, side, device=device, dtype=dtype)
    t = torch.full((batch,), 500.0, device=device, dtype=dtype)
    ctx = torch.randn(batch, 300, 4096, device=device, dtype=dtype)
    rows = [f"PixArt-Σ, depth {depth}, {batch}×{(side // 2) ** 2} tokens, {dtype}", "",
            "| model | step ms | vs dense | weight MiB | peak MiB |", "|---|---|---|---|---|"]
    base = None
    for label, method, bits in ((f"dense {str(dtype)[6:]}", None, 0), ("uaq-4", "uaq", 4),
                                ("kmeans_c-3", "kmeans_c", 3)):
        model = pixart_sigma(depth, device, dtype)
        if method:
            quantize_random(model, method, bits)
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        with torch.no_grad():
            step = run(lambda model=model: model(x, t, ctx))
        peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
        base = base or step
        rows.append(f"| {label} | {step * 1e3:.1f} | {base / step:.2f}× | {module_nbytes(model) / 2**20:.1f} | "
                    f"{peak:.0f} |")
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, Triton interpreter: the script works")
    ap.add_argument("--skip-model", action="store_true", help="kernels only (no PixArt-Σ step)")
    ap.add_argument("--out", type=Path, help="also write the tables here")
    args = ap.parse_args(argv)
    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (use --dry-run to exercise the script on CPU)", file=sys.stderr)
        return 2
    if not args.dry_run:
        os.environ.setdefault(kernels.BACKEND_ENV, "auto")
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (dry run: not a measurement)"
    import triton  # noqa: PLC0415

    t0 = time.perf_counter()
    parts = [f"# GPU check — {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {name}, "
             f"torch {torch.__version__}, triton {triton.__version__}"]
    for title, fn in (("Correctness", check_correctness), ("Speed", check_speed), ("Quantizers", check_quantizers),
                      ("Model step", check_model)):
        if title == "Model step" and args.skip_model:
            continue
        t = time.perf_counter()
        try:
            body = fn(device, args.dry_run)
        except Exception:  # one prepared run on a lent GPU: a broken part must not lose the others' tables
            body = ["FAILED with an exception:", "", "```", traceback.format_exc().rstrip(), "```"]
        parts.append(f"\n## {title} ({time.perf_counter() - t:.0f} s)\n\n" + "\n".join(body))
        print(parts[-1], flush=True)
    parts.append(f"\ntotal {time.perf_counter() - t0:.0f} s")
    print(parts[-1])
    if args.out:
        tmp = args.out.with_suffix(args.out.suffix + ".tmp")
        tmp.write_text("\n".join(parts) + "\n")
        tmp.replace(args.out)
    return 0 if not any("FAILED" in part for part in parts[1:]) else 1


if __name__ == "__main__":
    sys.exit(main())
