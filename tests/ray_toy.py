"""A small torch objective for the Ray executor tests, importable by Ray workers (tests/ is on their path).

``ToyFactory(cache_dir)()`` builds the model, its option table (from ``cache_dir``: the driver computes it
first, workers load it) and fixed inputs, and returns ``evaluate(options) → {"denoise_error", "aux"}``: the
relative output error of the model with the config's quantized layers swapped in, like the real objective.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from torch import nn

from qua2sedimo.quant import option_table, quantizable_layers
from qua2sedimo.quant.swap import ConfigSwapper


def toy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 128), nn.GELU(), nn.Linear(128, 128), nn.GELU(), nn.Linear(128, 32))


def toy_layers():
    return quantizable_layers(toy_model())


class ToyEvaluate:
    def __init__(self, cache_dir: str, delay: float, fail_on: int | None):
        self.model = toy_model()
        table = option_table(self.model, cache_dir=cache_dir)
        self.swapper = ConfigSwapper(self.model, table)
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(16, 64, generator=g)
        with torch.no_grad():
            self.ref = self.model(self.x)
        self.delay, self.fail_on = delay, fail_on
        self.calls = 0
        self.last_timings: dict[str, float] = {}

    def __call__(self, options):
        self.calls += 1
        if self.fail_on is not None and options.get("__fail__") == "yes":
            raise ValueError("the toy objective was told to fail")
        t0 = time.perf_counter()
        self.swapper.apply({k: v for k, v in options.items() if not k.startswith("__")})
        with torch.no_grad():
            out = self.model(self.x)
        time.sleep(self.delay)
        err = float((out - self.ref).pow(2).sum() / self.ref.pow(2).sum())
        self.last_timings = {"forward": time.perf_counter() - t0}
        return {"denoise_error": err, "max_abs": float((out - self.ref).abs().max())}


class ToyFactory:
    def __init__(self, cache_dir: str | Path, delay: float = 0.0, fail_on: int | None = None,
                 fail_init: bool = False):
        self.cache_dir, self.delay, self.fail_on, self.fail_init = str(cache_dir), delay, fail_on, fail_init

    def __call__(self) -> ToyEvaluate:
        if self.fail_init:
            raise FileNotFoundError("toy model weights are missing on this worker")
        return ToyEvaluate(self.cache_dir, self.delay, self.fail_on)
