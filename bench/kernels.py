"""Speed of the LUT weight kernels against dense matmul on diffusion-model GEMM shapes.

Run: ``python bench/kernels.py [--device cuda|cpu] [--quick] [--bits 3 4] [--m 1 16 ...] [--out FILE.md]``

Convention: a shape is ``(N, K) = (out_features, in_features)`` of an ``nn.Linear`` (Conv2d: ``Cout``,
``Cin*kh*kw``); the weight is ``W [N, K]`` and ``y [M, N] = x [M, K] @ W^T`` with ``M`` = tokens × batch.

Columns (times in ms, median): dense ``F.linear`` baselines (GPU: fp16 and bf16, L2-flushed
``triton.testing.do_bench``; CPU: fp32, ``time.perf_counter`` after warm-up), the fused Triton LUT GEMM (GPU
only, forced for every M), Triton dequant + ``F.linear`` ("deq+mm"; CPU: reference dequant + ``F.linear``),
and the reference ``linear``. Ratios ``×`` = baseline time / quantized time (> 1: faster than dense;
GPU ratios use the baseline of the activation dtype). ``auto`` is the path ``kernels.linear`` dispatches to.
``err`` is the largest relative error of the quantized paths against the reference.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from qua2sedimo.quant.kernels import reference as ref
from qua2sedimo.quant.packed import PackedLayout, PackedWeight
from qua2sedimo.quant.packing import pack_codes

# (name, N = out_features, K = in_features)
SHAPES = [
    ("PixArt attn.proj, cross-attn q/o", 1152, 1152),
    ("PixArt attn.qkv (fused)", 3456, 1152),
    ("PixArt mlp.fc1", 4608, 1152),
    ("PixArt mlp.fc2", 1152, 4608),
    ("PixArt adaLN t_block", 6912, 1152),
    ("SDXL attn q/k/v/o @640", 640, 640),
    ("SDXL cross-attn k/v @640", 640, 2048),
    ("SDXL GEGLU proj @640", 5120, 640),
    ("SDXL ff.out @640", 640, 2560),
    ("SDXL attn q/k/v/o @1280", 1280, 1280),
    ("SDXL GEGLU proj @1280", 10240, 1280),
    ("SDXL ff.out @1280", 1280, 5120),
]
QUICK_SHAPES = ["PixArt attn.proj, cross-attn q/o", "PixArt mlp.fc1", "SDXL attn q/k/v/o @1280"]
M_VALUES = [1, 16, 64, 1024, 4096, 8192]
QUICK_M_CPU = [1, 64, 1024]
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def machine_info(device: str) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        f"date {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"torch {torch.__version__}",
        f"python {platform.python_version()}",
        f"CPU {cpu} ({torch.get_num_threads()} threads)",
    ]
    if device == "cuda":
        import triton

        parts += [f"GPU {torch.cuda.get_device_name()}", f"triton {triton.__version__}"]
    return ", ".join(parts)


def time_cpu(fn: Callable[[], object], min_time: float = 0.25, max_reps: int = 30) -> float:
    """Median wall time (ms) after one warm-up call; repeats until ``min_time`` s or ``max_reps``."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < 3 or (time.perf_counter() - start < min_time and len(times) < max_reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def time_cuda(fn: Callable[[], object]) -> float:
    """Median time (ms) from ``triton.testing.do_bench`` (flushes L2 between runs)."""
    import triton.testing

    return float(triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))


def make_quantized(n: int, k: int, bits: int, table: str, lut_dtype: torch.dtype, device: str) -> PackedWeight:
    g = torch.Generator().manual_seed(n * 7 + k + bits)
    codes = pack_codes(torch.randint(0, 1 << bits, (n, k), generator=g), bits)
    rows = n if table == "channel" else 1
    lut = (torch.randn(rows, 1 << bits, generator=g) * 0.02).sort(dim=1).values.to(lut_dtype)
    layout = PackedLayout("kmeans_c" if table == "channel" else "kmeans_a", bits, (n, k), lut_dtype)
    return PackedWeight.from_parts(codes, lut, layout).to(device)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    b = b.float()
    return ((a.float() - b).norm() / b.norm()).item()


def bench_case(name: str, n: int, k: int, m: int, bits: int, args: argparse.Namespace) -> dict:
    dev = args.device
    xdt = DTYPES[args.dtype] if dev == "cuda" else torch.float32
    ldt = xdt if dev == "cuda" else torch.float16  # tables are stored in 16 bit
    pw = make_quantized(n, k, bits, args.table, ldt, dev)
    codes, lut = pw.codes, pw.lut
    x = torch.randn(m, k, device=dev).to(xdt)
    w = ref.dequantize(pw, dtype=xdt)
    row: dict = {"layer": name, "NxK": f"{n}×{k}", "M": m, "bits": bits}
    y_ref = ref.linear(x, pw)
    errs = []
    if dev == "cuda":
        from qua2sedimo.quant.kernels import triton_lut as tri

        for tag, dt in DTYPES.items():
            wb, xb = w.to(dt), x.to(dt)
            row[f"{tag} ms"] = time_cuda(lambda wb=wb, xb=xb: F.linear(xb, wb))
        out = torch.empty(m, n, dtype=xdt, device=dev)
        fused = lambda: tri.fused_into(x, codes, lut, bits, k, None, out)  # noqa: E731
        deq_mm = lambda: F.linear(x, tri.dequantize(pw, dtype=xdt))  # noqa: E731
        errs += [rel_err(fused(), y_ref), rel_err(deq_mm(), y_ref)]
        row["fused ms"] = time_cuda(fused)
        row["deq+mm ms"] = time_cuda(deq_mm)
        row["ref ms"] = time_cuda(lambda: ref.linear(x, pw))
        row["auto"] = "fused" if m <= tri.FUSED_MAX_M else "deq+mm"
        base = row[f"{args.dtype} ms"]
        quant = ("fused", "deq+mm", "ref")
    else:
        row["fp32 ms"] = time_cpu(lambda: F.linear(x, w))
        deq_mm = lambda: F.linear(x, ref.dequantize(pw, dtype=xdt))  # noqa: E731
        errs.append(rel_err(deq_mm(), y_ref))
        row["deq+mm ms"] = time_cpu(deq_mm)
        row["ref ms"] = time_cpu(lambda: ref.linear(x, pw))
        row["auto"] = "ref"
        base = row["fp32 ms"]
        quant = ("deq+mm", "ref")
    for q in quant:
        row[f"{q} ×"] = base / row[f"{q} ms"]
    row["err"] = max(errs)
    return row


def to_markdown(rows: list[dict]) -> str:
    cols = list(rows[0])
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            v = r[c]
            if c == "err":
                cells.append(f"{v:.1e}")
            elif isinstance(v, float):
                cells.append(f"{v:.3f}" if c.endswith("ms") else f"{v:.2f}")
            else:
                cells.append(str(v))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    ap.add_argument("--device", choices=["cuda", "cpu"], default=default_device)
    ap.add_argument("--quick", action="store_true", help="3 shapes; on CPU also M in {1, 64, 1024}")
    ap.add_argument("--bits", type=int, nargs="+", default=[3, 4], choices=[2, 3, 4, 8])
    ap.add_argument("--m", type=int, nargs="+", help=f"token counts (default {M_VALUES})")
    ap.add_argument("--table", choices=["channel", "layer"], default="channel", help="table rows")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="GPU activation dtype")
    ap.add_argument("--out", type=Path, help="also write the markdown report here")
    args = ap.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        ap.error("--device cuda: no CUDA device available")
    shapes = [s for s in SHAPES if not args.quick or s[0] in QUICK_SHAPES]
    m_values = args.m or (QUICK_M_CPU if args.quick and args.device == "cpu" else M_VALUES)

    t0 = time.perf_counter()
    rows = []
    for name, n, k in shapes:
        for m in m_values:
            for bits in args.bits:
                rows.append(bench_case(name, n, k, m, bits, args))
                print(f"  {name} M={m} {bits}-bit done", file=sys.stderr, flush=True)
    act = args.dtype if args.device == "cuda" else "fp32 (tables fp16)"
    report = "\n".join(
        [
            f"# LUT kernel benchmark ({args.device}, {args.table} tables, activations {act})",
            "",
            machine_info(args.device),
            "",
            "Shapes are (N, K) = (out_features, in_features); y[M, N] = x[M, K] @ W^T. "
            "Ratios × = dense baseline time / quantized time.",
            "",
            to_markdown(rows),
            "",
            f"total bench time {time.perf_counter() - t0:.0f} s",
        ]
    )
    print(report)
    if args.out:
        args.out.write_text(report + "\n")


if __name__ == "__main__":
    main()
