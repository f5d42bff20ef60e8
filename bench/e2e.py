"""One denoiser step of a tiny PixArt-like transformer: dense vs quantized, time and memory.

Run: ``python bench/e2e.py [--device cuda] [--width 1152 --depth 4 --tokens 1024]``
Memory is the model's bytes (parameters + buffers); on CUDA also the peak allocated during the step.
On CPU, ``bench/cpu_step.py`` times this model (and full-size PixArt-Σ through ComfyUI) dense vs quantized side by
side, round-robin, with the decode's share of the step.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import torch
from torch import nn

from qua2sedimo.quant import QuantConfig, module_nbytes, quantize_


class Block(nn.Module):
    def __init__(self, w: int, ctx: int):
        super().__init__()
        self.qkv, self.proj = nn.Linear(w, 3 * w), nn.Linear(w, w)
        self.q, self.kv, self.cproj = nn.Linear(w, w), nn.Linear(ctx, 2 * w), nn.Linear(w, w)
        self.fc1, self.fc2 = nn.Linear(w, 4 * w), nn.Linear(4 * w, w)
        self.heads = 16

    def attn(self, q, k, v):
        b, n, c = q.shape
        h = self.heads
        q, k, v = (t.reshape(b, -1, h, c // h).transpose(1, 2) for t in (q, k, v))
        return nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, c)

    def forward(self, x, y):
        q, k, v = self.qkv(x).chunk(3, -1)
        x = x + self.proj(self.attn(q, k, v))
        k, v = self.kv(y).chunk(2, -1)
        x = x + self.cproj(self.attn(self.q(x), k, v))
        return x + self.fc2(nn.functional.gelu(self.fc1(x)))


class TinyDiT(nn.Module):
    def __init__(self, width: int, depth: int, ctx: int = 512):
        super().__init__()
        self.blocks = nn.ModuleList(Block(width, ctx) for _ in range(depth))

    def forward(self, x, y):
        for b in self.blocks:
            x = b(x, y)
        return x


def step_time(model, x, y, device, reps: int = 5) -> float:
    with torch.no_grad():
        model(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(reps):
            model(x, y)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return (time.perf_counter() - t0) / reps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--depth", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=256)
    a = ap.parse_args()
    device = torch.device(a.device)
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    torch.manual_seed(0)
    x = torch.randn(2, a.tokens, a.width, device=device, dtype=dtype)
    y = torch.randn(2, 120, 512, device=device, dtype=dtype)
    rows = []
    for label, option in (("dense", None), ("uaq-4", "uaq-4"), ("kmeans_c-3", "kmeans_c-3")):
        model = TinyDiT(a.width, a.depth).to(dtype)
        if option:
            quantize_(model, QuantConfig.uniform(model, option))
        model.to(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        t = step_time(model, x, y, device)
        peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
        rows.append((label, t, module_nbytes(model) / 2**20, peak))
    print(f"End-to-end step — {datetime.date.today()}, {device} "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else platform.machine()}, "
          f"torch {torch.__version__}, width {a.width}, depth {a.depth}, tokens {a.tokens}, batch 2, {dtype}")
    print("\n| model | step ms | vs dense | weights MiB | peak MiB |\n|---|---|---|---|---|")
    for label, t, mib, peak in rows:
        print(f"| {label} | {t * 1e3:.1f} | {rows[0][1] / t:.2f}× | {mib:.1f} | {peak:.0f} |")


if __name__ == "__main__":
    main()
