"""The toy DiT of the graph, predictor and score tests, and a synthetic journal over its layers (fast, CPU)."""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from qua2sedimo.quant.options import OPTIONS
from qua2sedimo.search.graph import LayerGraph, trace_graph
from qua2sedimo.search.journal import Record


class Attn(nn.Module):
    def __init__(self, d: int, fused: bool, manual: bool):
        super().__init__()
        self.fused, self.manual = fused, manual
        if fused:
            self.qkv = nn.Linear(d, 3 * d)
        else:
            self.to_q, self.to_k, self.to_v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.qkv(x).chunk(3, dim=-1) if self.fused else (self.to_q(x), self.to_k(x), self.to_v(x))
        if self.manual:  # decomposed, query-chunked attention written into a preallocated output
            out = torch.zeros_like(q)
            for i in range(0, q.shape[1], 2):
                w = torch.einsum("bid,bjd->bij", q[:, i:i + 2], k).mul(q.shape[-1] ** -0.5).softmax(-1)
                out[:, i:i + 2] = torch.bmm(w, v)
        else:
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out)


class CrossAttn(nn.Module):
    def __init__(self, d: int):
        super().__init__()
        self.q_linear, self.kv_linear, self.proj = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k, v = self.kv_linear(y).chunk(2, dim=-1)
        return self.proj(F.scaled_dot_product_attention(self.q_linear(x), k, v))


class Block(nn.Module):
    def __init__(self, d: int, fused: bool, manual: bool):
        super().__init__()
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(d, 2 * d))
        self.norm = nn.LayerNorm(d, elementwise_affine=False)
        self.attn = Attn(d, fused, manual)
        self.cross_attn = CrossAttn(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(t)[:, None].chunk(2, dim=-1)
        x = x + self.attn(self.norm(x) * (1 + scale) + shift)  # modulation → one combine node
        x = x + self.cross_attn(x, y)
        return x + self.mlp(self.norm(x))


class ToyDiT(nn.Module):
    def __init__(self, d: int = 16, depth: int = 2, fused: bool = True, manual: bool = False):
        super().__init__()
        self.x_embedder = nn.Linear(4, d)
        self.t_embedder = nn.Sequential(nn.Linear(8, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Sequential(nn.Linear(12, d), nn.GELU(), nn.Linear(d, d))
        self.blocks = nn.ModuleList([Block(d, fused, manual) for _ in range(depth)])
        self.final_layer = nn.Linear(d, 4)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x, t, y = self.x_embedder(x), self.t_embedder(t), self.y_embedder(y)
        for block in self.blocks:
            x = block(x, y, t)
        return self.final_layer(x)


def toy_inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 6, 4, generator=g), torch.randn(1, 8, generator=g), torch.randn(1, 5, 12, generator=g)


def trace_toy(model: nn.Module) -> LayerGraph:
    x, t, y = toy_inputs()
    return trace_graph(model, lambda: model(x, t, y))


def toy_graph(depth: int = 1) -> LayerGraph:
    """The traced graph of a small ToyDiT (width 8), as the predictor tests use it."""
    return trace_toy(ToyDiT(d=8, depth=depth))


SENSITIVE = ("blocks.0.mlp.0", "blocks.0.mlp.2")  # the FF unit dominates the objective
INSENSITIVE = ("y_embedder.0", "y_embedder.2")  # the c-embed unit does not matter at all
PAIR = ("blocks.0.attn.qkv", "blocks.0.attn.proj")  # interaction: both at 3 bits costs extra


def make_synthetic(n: int = 160, seed: int = 0, noise: float = 0.03):
    """(graph, errors, records): objective = Σ_l s_l·err(l, option) + interaction, times log-normal noise."""
    graph = toy_graph()
    rng = np.random.default_rng(seed)
    names = [la.name for la in graph.layers]
    mult = {"uaq": 1.0, "kmeans_c": 0.6, "kmeans_a": 1.5}
    errors = {nm: {o: mult[o.split("-")[0]] * (0.02 if o.endswith("-4") else 0.1) * rng.uniform(0.8, 1.25)
                   for o in OPTIONS} for nm in names}
    sens = {nm: (8.0 if nm in SENSITIVE else 0.0 if nm in INSENSITIVE else rng.uniform(0.2, 1.0)) for nm in names}
    records = []
    for i in range(n):
        p = rng.uniform()
        cfg = {nm: f"{rng.choice(['uaq', 'kmeans_c', 'kmeans_a'])}-{3 if rng.uniform() < p else 4}" for nm in names}
        v = sum(sens[nm] * errors[nm][cfg[nm]] for nm in names)
        if all(cfg[nm].endswith("-3") for nm in PAIR):
            v += 0.4
        v *= math.exp(rng.normal(0, noise))
        records.append(Record(i, i, f"k{i}", cfg, 3.5, 0, {"err": v}, v, {}, "random", 0.0))
    return graph, errors, records


FAST = dict(  # quick predictor training settings
    folds=3, epochs=40, min_epochs=10, patience=10)
