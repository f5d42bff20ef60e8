"""The paper's GNN predictor (§3) and an additive ridge baseline, trained on a journal's evaluated configs.

**Features** (:class:`FeatureBuilder`). Every node of the :class:`~.graph.LayerGraph` gets one row:

* layer node: one-hot method (``uaq``, ``kmeans_c``, ``kmeans_a``, ``fp16``), one-hot bits (the options' widths +
  16 for ``fp16``), size ratio ``Q/F`` (the option's bytes over the layer's unquantized bytes, paper accounting),
  the option's error as ``log10(rel_error)`` standardized over the whole option table, the same minus the layer's
  mean over its quantized options (the error *relative to the layer's alternatives*; both scaled by the table's
  std), ``fp16`` a decade below the layer's best option; block position ``(block_index + 1) / (max + 1)`` (0 for
  global layers); ``log(numel)`` standardized over the layers (a refinement: the paper has no size of the layer);
  an is-layer flag and the op-type one-hot;
* combine node: its op one-hot, zeros elsewhere.

Rows are precomputed per (layer, option); a config is a gather (``[n_configs, n_nodes, F]``).

**Model**. FE-MLP (Linear → BN → ReLU → Linear → BN → ReLU, 64-d = hop-0 embedding ``h⁰``) → 4 × GATv2 (1 head,
self-loops, 64-d) each followed by BatchNorm, ReLU and a residual, giving ``h¹ … h⁴``. Hop-wise pooling: ``h_G⁰`` =
mean of ``h⁰`` over the layer nodes; ``h_G^m`` (m ≥ 1) = mean of ``h^m`` over the output nodes of the block units
of hop depth m (``min(hop, 4)``), the mean over all nodes where no unit has that depth. Head: MLP on the
concatenation ``[h_G⁰ … h_G⁴]`` (``readout="concat"``, default) or on ``h_G⁴`` alone (``readout="last"``, the
paper's). The concatenation is a deliberate change: where units of hop ≥ 4 exist (e.g. a self-attention with its
AdaLN linear: hop 5), ``h_G⁴`` pools only their few output nodes, which do not see the whole network; ``h_G⁰``
carries every layer's choice.

The GATv2 is written in plain torch over the edge list, batched over configs that share one graph (messages are a
gather along the node axis, the softmax and sum an ``index_add_``): no extra dependency, and it runs unchanged on
the 14-node tiny graphs and the ~600-node real ones (a dense-adjacency version would need ``[B, N, N, d]``
scores, GBs at N = 568). It computes exactly PyG's ``GATv2Conv(heads=1, add_self_loops=True)`` (tested against it
when torch_geometric is installed).

**Target**. The journal's primary objective ``v`` (lower is better) becomes ``y = −log v`` when every training
``v`` is positive (else ``y = −v``), standardized with the training fold's mean and std: higher is better, like
the paper's ``−FID``. Errors spread over decades on random 3/4-bit configs; the log makes them near-Gaussian.

**Loss**. ``L = mse_weight · MSE(ŷ, z) + rank_weight · mean_{m=0..4} L_rank(z, ‖h_G^m‖₁)``, one backward per step,
gradient-norm clipping at 5, AdamW + cosine schedule (paper §3.6; the released code's discarded LambdaRank gradient
and double backward are not copied). ``L_rank``:

* ``"spearman"``: ``1 − pearson(softrank(s), rank(z))`` — rank-vs-rank (§7.2), soft ranks by pairwise sigmoids of
  the batch-standardized norms (temperature 0.1);
* ``"lambdarank"``: RankNet pairs weighted by ``|ΔNDCG|`` (positions by the current scores, NDCG over the batch),
  relevance ``5·clip((z − q₂₀)/(max z − q₂₀), 0, 1)`` from the training fold — its gradient is the LambdaRank λ;
* ``"hybrid"``: both; ``None``: MSE only.

**Protocol**. Records are shuffled with the seed and cut into ``folds`` test folds; the rest of each fold is split
into training and a validation part (``val_fraction``) for early stopping on the validation loss (best epoch's
weights kept). Per fold and hop are stored: held-out Spearman/Kendall τ, hop moments ``μ^m, σ^m`` of ``‖h_v^m‖₁``
over the pooled nodes of all training graphs, and ``ρ^m`` = held-out Spearman of ``‖h_G^m‖₁`` (the hop weights of
§4.2). The ridge baseline (one-hot layer × option, α chosen on the validation part, refit on training +
validation) uses the same folds. Files are safetensors + JSON, never pickle.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from scipy import stats
from torch import nn

from ..quant.accounting import option_nbytes
from ..quant.atomic import atomic_write_with
from ..quant.layer_table import dtype_from_name
from ..quant.options import FP_OPTION, METHODS, parse_option
from .graph import LayerGraph
from .journal import Record

__all__ = [
    "BaselineEnsemble", "FeatureBuilder", "PredictorConfig", "PredictorEnsemble", "lambdarank_loss",
    "soft_spearman_loss", "torch_threads", "train_baseline", "train_predictor", "training_loss", "with_self_loops",
]

PREDICTOR_FORMAT = "qua2sedimo.predictor"
PREDICTOR_VERSION = 1
RANKINGS = ("spearman", "lambdarank", "hybrid")
_METHODS = (*METHODS, FP_OPTION)
_ERR_FLOOR = 1e-8
_REL_LEVELS = 5.0  # LambdaRank relevance range

ConfigLike = Mapping[str, str]


@contextlib.contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run with ``n`` torch intra-op threads (restored afterwards; ``None``: unchanged). The predictor's tensors are
    small (``[32, N, 64]``): one thread is as fast as two on an idle machine and up to 100× faster on a busy or
    CPU-quota-limited one (no spinning OpenMP workers)."""
    prev = torch.get_num_threads()
    if n is not None:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(prev)


# ------------------------------------------------------------------------------------------------ features
class FeatureBuilder:
    """Node features of configs of one graph (see the module docstring for the layout).

    ``errors[layer][option]`` is the option's relative error (``OptionTable.errors()``); ``sizes[layer][option]``
    its bytes (default: paper accounting from the layer's shape and dtype). ``options`` defaults to the options
    present in ``errors`` plus ``fp16``.
    """

    def __init__(self, graph: LayerGraph, errors: Mapping[str, Mapping[str, float]],
                 sizes: Mapping[str, Mapping[str, int]] | None = None, options: Sequence[str] | None = None):
        self.graph = graph
        names = [la.name for la in graph.layers]
        missing = [n for n in names if n not in errors]
        if missing:
            raise ValueError(f"no errors for {len(missing)} layers of the graph (first {missing[0]!r}); "
                             "build the features from the model's option table")
        if options is None:
            seen = dict.fromkeys(o for n in names for o in errors[n])
            options = [o for o in seen if o != FP_OPTION]
        options = [o for o in dict.fromkeys(options) if o != FP_OPTION] + [FP_OPTION]
        parsed = {o: parse_option(o) for o in options}
        self.options: tuple[str, ...] = tuple(options)
        self.layer_names: tuple[str, ...] = tuple(names)
        self._opt = {o: i for i, o in enumerate(self.options)}
        self._lidx = {n: i for i, n in enumerate(names)}
        bits_vocab = sorted({p[1] for p in parsed.values() if p is not None}) + [16]
        op_vocab = sorted({(n.kind, n.op) for n in graph.nodes})
        self.feature_names: tuple[str, ...] = (
            *(f"method:{m}" for m in _METHODS), *(f"bits:{b}" for b in bits_vocab), "size_ratio", "log_error",
            "rel_log_error", "block_pos", "log_numel", "is_layer", *(f"op:{k}:{o}" for k, o in op_vocab))
        col = {f: i for i, f in enumerate(self.feature_names)}
        n_l, n_o, n_f = len(names), len(self.options), len(self.feature_names)

        # sizes and validity
        numel = np.array([math.prod(la.shape) for la in graph.layers], dtype=np.float64)
        nbytes = np.zeros((n_l, n_o), dtype=np.int64)
        valid = np.zeros((n_l, n_o), dtype=bool)
        logerr = np.full((n_l, n_o), np.nan)
        for i, la in enumerate(graph.layers):
            dtype = dtype_from_name(la.dtype)
            for j, o in enumerate(self.options):
                if o == FP_OPTION:
                    valid[i, j] = True
                elif o in errors[la.name]:
                    valid[i, j] = True
                    logerr[i, j] = math.log10(max(float(errors[la.name][o]), _ERR_FLOOR))
                else:
                    continue
                given = None if sizes is None else sizes.get(la.name, {}).get(o)
                nbytes[i, j] = int(given) if given is not None else option_nbytes(la.shape, o, dtype)
        q = logerr[:, :-1]
        if not np.isfinite(q).any():
            raise ValueError("the errors hold no quantized option")
        mu, sd = float(np.nanmean(q)), float(np.nanstd(q)) or 1.0
        layer_mean = np.where(np.isfinite(q).any(1), np.nanmean(np.where(np.isfinite(q), q, np.nan), 1), mu)
        layer_min = np.where(np.isfinite(q).any(1), np.nanmin(np.where(np.isfinite(q), q, np.inf), 1), mu)
        logerr[:, -1] = layer_min - 1.0  # fp16: a decade below the layer's best option
        full_bytes = nbytes[:, -1].astype(np.float64)
        max_block = max((la.block_index for la in graph.layers), default=-1)
        lnum = np.log(numel)
        lnum = (lnum - lnum.mean()) / (lnum.std() or 1.0)

        rows = np.zeros((n_l, n_o, n_f), dtype=np.float32)
        for j, o in enumerate(self.options):
            p = parsed[o]
            rows[:, j, col[f"method:{p[0] if p else FP_OPTION}"]] = 1
            rows[:, j, col[f"bits:{p[1] if p else 16}"]] = 1
            rows[:, j, col["size_ratio"]] = nbytes[:, j] / full_bytes
            rows[:, j, col["log_error"]] = (logerr[:, j] - mu) / sd
            rows[:, j, col["rel_log_error"]] = (logerr[:, j] - layer_mean) / sd
        for i, la in enumerate(graph.layers):
            rows[i, :, col["block_pos"]] = (la.block_index + 1) / (max_block + 1) if max_block >= 0 else 0.0
            rows[i, :, col["log_numel"]] = lnum[i]
            rows[i, :, col["is_layer"]] = 1
            rows[i, :, col[f"op:layer:{la.op_type}"]] = 1
        rows[~valid] = 0
        static = np.zeros((len(graph.nodes), n_f), dtype=np.float32)
        for k, n in enumerate(graph.nodes):
            static[k, col[f"op:{n.kind}:{n.op}"]] = 1
        self._set(torch.from_numpy(rows), torch.from_numpy(static), torch.from_numpy(nbytes),
                  torch.from_numpy(numel.astype(np.int64)), torch.from_numpy(valid))

    def _set(self, rows: torch.Tensor, static: torch.Tensor, nbytes: torch.Tensor, numel: torch.Tensor,
             valid: torch.Tensor) -> None:
        self.rows, self.static, self.nbytes, self.numel, self.valid = rows, static, nbytes, numel, valid
        self.layer_nodes = torch.tensor([self.graph.index(n) for n in self.layer_names], dtype=torch.long)

    @classmethod
    def from_table(cls, graph: LayerGraph, table: Any, options: Sequence[str] | None = None,
                   accounting: str = "paper") -> FeatureBuilder:
        """Features from an :class:`~..quant.table.OptionTable` (errors = ``rel_error``)."""
        errors = table.errors("rel_error")
        sizes = None
        if accounting == "stored":
            sizes = {n: {o: q.nbytes for o, q in opts.items()} for n, opts in table.entries.items()}
        return cls(graph, errors, sizes, options)

    @property
    def n_features(self) -> int:
        return len(self.feature_names)

    @property
    def quant_options(self) -> tuple[str, ...]:
        """The options other than ``fp16``."""
        return self.options[:-1]

    def option_index(self, option: str) -> int:
        try:
            return self._opt[option]
        except KeyError:
            raise ValueError(f"option {option!r} is not among the predictor's options {list(self.options)}") from None

    def layer_index(self, name: str) -> int:
        try:
            return self._lidx[name]
        except KeyError:
            raise ValueError(f"layer {name!r} is not a layer of the predictor's graph") from None

    def encode(self, configs: Sequence[ConfigLike]) -> torch.Tensor:
        """``[n_configs, n_layers]`` option indices; every config must name every layer."""
        out = torch.empty((len(configs), len(self.layer_names)), dtype=torch.long)
        for b, cfg in enumerate(configs):
            try:
                out[b] = torch.tensor([self._opt[cfg[n]] for n in self.layer_names])
            except KeyError as e:
                missing = [n for n in self.layer_names if n not in cfg]
                what = f"misses layer {missing[0]!r}" if missing else f"uses an unknown option ({e})"
                raise ValueError(f"config {b} {what}; options known: {list(self.options)}") from None
        bad = ~self.valid.gather(1, out.T).T
        if bool(bad.any()):
            b, i = (int(v) for v in bad.nonzero()[0])
            raise ValueError(f"config {b}: layer {self.layer_names[i]!r} has no option "
                             f"{self.options[int(out[b, i])]!r} in the option table")
        return out

    def build(self, idx: torch.Tensor) -> torch.Tensor:
        """Node features ``[n_configs, n_nodes, F]`` of encoded configs ``idx [n_configs, n_layers]``."""
        x = self.static.unsqueeze(0).repeat(idx.shape[0], 1, 1)
        x[:, self.layer_nodes] = self.rows[torch.arange(idx.shape[1]).unsqueeze(0), idx]
        return x

    def __call__(self, configs: Sequence[ConfigLike]) -> torch.Tensor:
        return self.build(self.encode(configs))

    def sub_features(self, nodes: Sequence[int], layers: Sequence[int], idx: torch.Tensor) -> torch.Tensor:
        """Features ``[V, len(nodes), F]`` of a node subset; ``layers[k]`` (layer indices, nodes among ``nodes``)
        take options ``idx[:, k]``."""
        pos = {n: i for i, n in enumerate(nodes)}
        x = self.static[list(nodes)].unsqueeze(0).repeat(idx.shape[0], 1, 1)
        cols = [pos[int(self.layer_nodes[li])] for li in layers]
        x[:, cols] = self.rows[torch.tensor(list(layers)).unsqueeze(0), idx]
        return x

    def config_bytes(self, idx: torch.Tensor, layers: Sequence[int] | None = None) -> tuple[torch.Tensor, int]:
        """(bytes per config ``[n]``, weights) of encoded configs over ``layers`` (all layers by default)."""
        li = torch.arange(idx.shape[1]) if layers is None else torch.tensor(list(layers))
        nb = self.nbytes[li.unsqueeze(0), idx].sum(1)
        return nb, int(self.numel[li].sum())

    # -- persistence
    def state(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {"features.rows": self.rows, "features.static": self.static, "features.nbytes": self.nbytes,
                   "features.numel": self.numel, "features.valid": self.valid.to(torch.uint8)}
        meta = {"options": list(self.options), "layers": list(self.layer_names),
                "feature_names": list(self.feature_names)}
        return tensors, meta

    @classmethod
    def from_state(cls, graph: LayerGraph, tensors: Mapping[str, torch.Tensor], meta: Mapping) -> FeatureBuilder:
        fb = cls.__new__(cls)
        fb.graph = graph
        fb.options, fb.layer_names = tuple(meta["options"]), tuple(meta["layers"])
        fb.feature_names = tuple(meta["feature_names"])
        if list(fb.layer_names) != [la.name for la in graph.layers]:
            raise ValueError("predictor file: the feature layers differ from its graph's layers")
        fb._opt = {o: i for i, o in enumerate(fb.options)}
        fb._lidx = {n: i for i, n in enumerate(fb.layer_names)}
        rows = tensors["features.rows"]
        want = (len(fb.layer_names), len(fb.options), len(fb.feature_names))
        if tuple(rows.shape) != want or tuple(tensors["features.static"].shape) != (len(graph.nodes), want[2]):
            raise ValueError(f"predictor file: feature tensors have shape {tuple(rows.shape)}, expected {want}")
        fb._set(rows.float(), tensors["features.static"].float(), tensors["features.nbytes"].long(),
                tensors["features.numel"].long(), tensors["features.valid"].bool())
        return fb


# ----------------------------------------------------------------------------------------------------- GNN
def with_self_loops(edges: Sequence[tuple[int, int]], n: int) -> tuple[torch.Tensor, torch.Tensor]:
    src = [s for s, d in edges if s != d] + list(range(n))
    dst = [d for s, d in edges if s != d] + list(range(n))
    return torch.tensor(src, dtype=torch.long), torch.tensor(dst, dtype=torch.long)


class GATv2(nn.Module):
    """GATv2 (Brody et al.), one head, on ``x [B, N, d]`` with one edge list (self-loops included) for all B:
    ``e_ij = aᵀ LeakyReLU(W_l x_j + W_r x_i)``, softmax over the in-edges of i, ``out_i = Σ_j α_ij W_l x_j + b``.
    Parameter names and values match PyG's ``GATv2Conv``."""

    def __init__(self, d_in: int, d_out: int, negative_slope: float = 0.2):
        super().__init__()
        self.lin_l, self.lin_r = nn.Linear(d_in, d_out), nn.Linear(d_in, d_out)
        self.att = nn.Parameter(torch.empty(1, 1, d_out))
        self.bias = nn.Parameter(torch.zeros(d_out))
        self.negative_slope = negative_slope
        nn.init.xavier_uniform_(self.lin_l.weight)
        nn.init.xavier_uniform_(self.lin_r.weight)
        nn.init.zeros_(self.lin_l.bias)
        nn.init.zeros_(self.lin_r.bias)
        nn.init.xavier_uniform_(self.att)

    def forward(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        d = self.bias.shape[0]
        both = F.linear(x, torch.cat([self.lin_l.weight, self.lin_r.weight]), torch.cat([self.lin_l.bias,
                                                                                          self.lin_r.bias]))
        xl, xr = both[..., :d], both[..., d:]
        xj = xl.index_select(1, src)
        e = F.leaky_relu(xj + xr.index_select(1, dst), self.negative_slope) @ self.att.view(-1)  # [B, E]
        idx = dst.unsqueeze(0).expand(b, -1)
        emax = torch.full((b, n), -torch.inf, dtype=e.dtype, device=e.device)
        emax = emax.scatter_reduce(1, idx, e.detach(), "amax", include_self=True)
        w = torch.exp(e - emax.gather(1, idx))
        denom = torch.zeros((b, n), dtype=e.dtype, device=e.device).index_add(1, dst, w)
        alpha = w / denom.gather(1, idx)
        out = torch.zeros((b, n, d), dtype=xl.dtype, device=xl.device).index_add(1, dst, alpha.unsqueeze(-1) * xj)
        return out + self.bias


class GNN(nn.Module):
    """FE-MLP → ``layers`` × (GATv2 → BN → ReLU → + residual) → hop-wise pooling → MLP head."""

    def __init__(self, n_features: int, hop_pool: torch.Tensor, hidden: int = 64, layers: int = 4,
                 readout: str = "concat"):
        super().__init__()
        if readout not in ("concat", "last"):
            raise ValueError(f"readout must be 'concat' or 'last', got {readout!r}")
        self.readout, self.n_layers = readout, layers
        self.embed = nn.Sequential(nn.Linear(n_features, hidden), nn.BatchNorm1d(hidden), nn.ReLU(),
                                   nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.ReLU())
        self.convs = nn.ModuleList(GATv2(hidden, hidden) for _ in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden) for _ in range(layers))
        d_head = hidden * (layers + 1 if readout == "concat" else 1)
        self.head = nn.Sequential(nn.Linear(d_head, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                  nn.Linear(hidden, 1))
        # [layers + 1, N], rows sum to 1; derived from the graph, so not part of the saved weights
        self.register_buffer("hop_pool", hop_pool.float().clone(), persistent=False)

    @staticmethod
    def _bn(bn: nn.BatchNorm1d, h: torch.Tensor) -> torch.Tensor:
        return bn(h.reshape(-1, h.shape[-1])).reshape(h.shape)

    def node_embeddings(self, x: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                        upto: int | None = None) -> list[torch.Tensor]:
        """``[h⁰, …, h^upto]``, each ``[B, N, hidden]``."""
        h = x
        for mod in self.embed:
            h = self._bn(mod, h) if isinstance(mod, nn.BatchNorm1d) else mod(h)
        hs = [h]
        for conv, bn in list(zip(self.convs, self.norms, strict=True))[: self.n_layers if upto is None else upto]:
            h = F.relu(self._bn(bn, conv(h, src, dst))) + h
            hs.append(h)
        return hs

    def pool(self, hs: list[torch.Tensor]) -> torch.Tensor:
        """Hop graph embeddings ``[B, layers + 1, hidden]``."""
        return torch.stack([torch.einsum("n,bnd->bd", self.hop_pool[m], h) for m, h in enumerate(hs)], 1)

    def predict(self, hg: torch.Tensor) -> torch.Tensor:
        z = hg.flatten(1) if self.readout == "concat" else hg[:, -1]
        return self.head(z).squeeze(-1)


def hop_pool_matrix(graph: LayerGraph, hops: int) -> tuple[torch.Tensor, list[bool]]:
    """``[hops + 1, N]`` mean-pooling weights: hop 0 over the layer nodes, hop m over the output nodes of the
    block units of depth ``min(hop, hops) == m`` (all nodes when there is none); and whether each hop has units."""
    n = len(graph.nodes)
    sets: list[set[int]] = [{i for i, nd in enumerate(graph.nodes) if nd.kind == "layer"}]
    sets += [set() for _ in range(hops)]
    for u in graph.units("block"):
        m = min(u.hop, hops)
        if m > 0:
            sets[m].add(graph.index(u.output_node))
    has = [bool(s) for s in sets]
    pool = torch.zeros((hops + 1, n))
    for m, s in enumerate(sets):
        members = sorted(s) if s else range(n)
        pool[m, list(members)] = 1.0 / len(members)
    return pool, has


# -------------------------------------------------------------------------------------------------- losses
def _pearson(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Pearson correlation along dim 0 (per column)."""
    a, b = a - a.mean(0), b - b.mean(0)
    return (a * b).sum(0) / (a.norm(dim=0) * b.norm(dim=0) + 1e-12)


def _standardize(s: torch.Tensor) -> torch.Tensor:
    return (s - s.mean(0)) / (s.std(0) + 1e-8)


def soft_spearman_loss(scores: torch.Tensor, target: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """``1 − pearson(softrank(scores), rank(target))``, soft ranks = Σ_j σ((s_i − s_j)/τ) of the standardized
    scores. ``scores`` is ``[B]`` or ``[B, H]`` (one loss per column, averaged)."""
    s = _standardize(scores.unsqueeze(-1) if scores.dim() == 1 else scores)  # [B, H]
    soft_rank = torch.sigmoid((s.unsqueeze(1) - s.unsqueeze(0)) / temperature).sum(1)  # [B, H]
    ranks = torch.from_numpy(stats.rankdata(target.detach().cpu().numpy())).to(s).unsqueeze(-1)
    return (1.0 - _pearson(soft_rank, ranks.expand_as(soft_rank))).mean()


def lambdarank_loss(scores: torch.Tensor, relevance: torch.Tensor, sigma: float = 1.0) -> torch.Tensor:
    """LambdaRank as a loss: ``Σ_{r_i > r_j} |ΔNDCG_ij| · log(1 + e^{−σ(s_i − s_j)})`` over the batch (standardized
    s, positions from the current ranking, gains ``2^r − 1``); its gradient is the λ of Burges et al.
    ``scores`` is ``[B]`` or ``[B, H]`` (one loss per column, averaged)."""
    s = _standardize(scores.unsqueeze(-1) if scores.dim() == 1 else scores)  # [B, H]
    rel = relevance.to(s)
    n = s.shape[0]
    with torch.no_grad():
        order = torch.argsort(s, dim=0, descending=True)
        pos = torch.empty_like(s).scatter_(0, order, torch.arange(1, n + 1, dtype=s.dtype).unsqueeze(1)
                                           .expand_as(s).contiguous())
        gain = 2.0 ** rel - 1.0  # [B]
        disc = 1.0 / torch.log2(1.0 + pos)  # [B, H]
        ideal = (torch.sort(gain, descending=True).values / torch.log2(torch.arange(2, n + 2, dtype=s.dtype))).sum()
        delta = ((gain.unsqueeze(1) - gain.unsqueeze(0)).abs().unsqueeze(-1)
                 * (disc.unsqueeze(1) - disc.unsqueeze(0)).abs()) / ideal.clamp_min(1e-12)  # [B, B, H]
        pairs = (rel.unsqueeze(1) > rel.unsqueeze(0)).to(s.dtype).unsqueeze(-1)
    if not bool(pairs.any()):
        return s.sum() * 0.0
    loss = F.softplus(-sigma * (s.unsqueeze(1) - s.unsqueeze(0))) * delta * pairs
    return loss.sum() / (pairs.sum() * s.shape[1])


# ---------------------------------------------------------------------------------------- targets, folds
@dataclass
class TargetTransform:
    """``v → z``: ``y = −log v`` (``log=True``) or ``−v``, then ``z = (y − mean)/std``; relevance from q₂₀/max."""

    log: bool
    mean: float
    std: float
    q20: float = 0.0
    zmax: float = 1.0

    @classmethod
    def fit(cls, v: np.ndarray) -> TargetTransform:
        log = bool(np.all(v > 0))
        y = -np.log(v) if log else -v
        t = cls(log, float(y.mean()), float(y.std()) or 1.0)
        z = t(v)
        t.q20, t.zmax = float(np.quantile(z, 0.2)), float(z.max())
        return t

    def __call__(self, v: np.ndarray) -> np.ndarray:
        y = -np.log(np.maximum(v, 1e-300)) if self.log else -v
        return (y - self.mean) / self.std

    def inverse(self, z: np.ndarray) -> np.ndarray:
        y = z * self.std + self.mean
        return np.exp(-y) if self.log else -y

    def relevance(self, z: torch.Tensor) -> torch.Tensor:
        return _REL_LEVELS * ((z - self.q20) / max(self.zmax - self.q20, 1e-12)).clamp(0.0, 1.0)

    def to_json(self) -> dict:
        return {"log": self.log, "mean": self.mean, "std": self.std, "q20": self.q20, "zmax": self.zmax}


def _clean_records(records: Sequence[Record]) -> tuple[list[dict[str, str]], np.ndarray]:
    configs, values = [], []
    for r in records:
        v = float(r.primary)
        if math.isfinite(v):
            configs.append(dict(r.options))
            values.append(v)
    if len(configs) < 10:
        raise ValueError(f"{len(configs)} records with a finite objective: the predictor needs at least 10")
    return configs, np.asarray(values, dtype=np.float64)


@dataclass(frozen=True)
class Split:
    train: np.ndarray
    val: np.ndarray
    test: np.ndarray


MIN_TEST_FOLD = 5  # held-out configs per fold below which fewer folds are used (a rank correlation of 2 is NaN)


def fold_count(n: int, folds: int) -> int:
    """Folds actually used for ``n`` records: at most ``folds``, at least 2, and each test fold holding
    ``MIN_TEST_FOLD`` records where ``n`` allows (10 configs with 5 folds → 2 folds of 5, not 5 folds of 2 whose
    held-out Spearman is undefined and would zero every sensitivity score)."""
    if folds < 2 or n < 2:
        raise ValueError(f"folds must be between 2 and the number of records ({n}), got {folds}")
    return max(2, min(folds, n // MIN_TEST_FOLD))


def make_folds(n: int, folds: int, seed: int, val_fraction: float) -> list[Split]:
    """Seeded K-fold test splits (``fold_count(n, folds)`` of them); a ``val_fraction`` of each fold's rest is its
    validation part."""
    folds = fold_count(n, folds)
    perm = np.random.default_rng(seed).permutation(n)
    parts = np.array_split(perm, folds)
    out = []
    for k in range(folds):
        rest = np.concatenate([p for i, p in enumerate(parts) if i != k])
        rest = rest[np.random.default_rng([seed, k]).permutation(len(rest))]
        n_val = max(2, int(round(val_fraction * len(rest)))) if val_fraction > 0 else 0
        out.append(Split(np.sort(rest[n_val:]), np.sort(rest[:n_val]), np.sort(parts[k])))
    return out


def _rank_metrics(pred: np.ndarray, z: np.ndarray) -> dict[str, float]:
    if len(z) < 3 or np.ptp(pred) == 0 or np.ptp(z) == 0:
        return {"spearman": float("nan"), "kendall": float("nan")}
    return {"spearman": float(stats.spearmanr(pred, z).statistic),
            "kendall": float(stats.kendalltau(pred, z).statistic)}


def _summarize(per_fold: list[dict], oof_pred: np.ndarray, z_all: np.ndarray) -> dict:
    def mean_of(getter: Callable[[dict], float]) -> dict[str, float]:
        vals = np.array([getter(f) for f in per_fold], dtype=np.float64)
        return {"mean": float(np.nanmean(vals)), "std": float(np.nanstd(vals))}

    out: dict[str, Any] = {"folds": per_fold, "final": {
        k: mean_of(lambda f, k=k: f["final"][k]) for k in ("spearman", "kendall")}}
    n_hops = len(per_fold[0].get("hops", []))
    out["hops"] = [{k: mean_of(lambda f, m=m, k=k: f["hops"][m][k]) for k in ("spearman", "kendall")}
                   for m in range(n_hops)]
    out["pooled"] = _rank_metrics(oof_pred, z_all)  # out-of-fold predictions of all records at once
    return out


# -------------------------------------------------------------------------------------------- ensemble
@dataclass
class FoldModel:
    model: GNN
    transform: TargetTransform
    mu: np.ndarray  # [hops + 1] mean of ‖h_v^m‖₁ over pooled nodes of the training graphs
    sigma: np.ndarray
    rho: np.ndarray  # [hops + 1] held-out Spearman of ‖h_G^m‖₁ vs the target


@dataclass
class PredictorEnsemble:
    """The fold predictors of one graph; ``metrics`` holds the held-out rank correlations."""

    graph: LayerGraph
    features: FeatureBuilder
    folds: list[FoldModel]
    hyper: dict
    metrics: dict = field(default_factory=dict)
    has_units: list[bool] = field(default_factory=list)
    threads: int | None = 1  # torch threads while predicting (:func:`torch_threads`); not saved

    def __post_init__(self) -> None:
        self.src, self.dst = with_self_loops(self.graph.edges, len(self.graph.nodes))

    @property
    def hops(self) -> int:
        return int(self.hyper["layers"])

    @property
    def rho(self) -> np.ndarray:
        """``[n_folds, hops + 1]`` hop weights (held-out Spearman per hop)."""
        return np.stack([f.rho for f in self.folds])

    def _chunks(self, idx: torch.Tensor, chunk: int) -> list[torch.Tensor]:
        return list(torch.split(idx, chunk)) if len(idx) else []

    @torch.no_grad()
    def _run(self, configs: Sequence[ConfigLike] | torch.Tensor, fn: Callable, chunk: int = 256) -> list:
        idx = configs if isinstance(configs, torch.Tensor) else self.features.encode(configs)
        out = []
        with torch_threads(self.threads):
            for f in self.folds:
                f.model.eval()
                out.append([fn(f, self.features.build(c)) for c in self._chunks(idx, chunk)])
        return out

    def predict_z(self, configs: Sequence[ConfigLike] | torch.Tensor) -> np.ndarray:
        """Standardized predictions ``[n_folds, n_configs]`` (higher is better)."""
        res = self._run(configs, lambda f, x: f.model.predict(f.model.pool(
            f.model.node_embeddings(x, self.src, self.dst))))
        return np.stack([torch.cat(r).numpy() if r else np.zeros(0) for r in res])

    def predict(self, configs: Sequence[ConfigLike] | torch.Tensor) -> np.ndarray:
        """Predicted objective (in its own units; lower is better) of each config: the folds' mean in y space."""
        z = self.predict_z(configs)
        ys = np.stack([z[k] * f.transform.std + f.transform.mean for k, f in enumerate(self.folds)]).mean(0)
        t = self.folds[0].transform
        return np.exp(-ys) if t.log else -ys

    def graph_embeddings(self, configs: Sequence[ConfigLike] | torch.Tensor) -> torch.Tensor:
        """Hop graph embeddings ``[n_folds, n_configs, hops + 1, hidden]``."""
        res = self._run(configs, lambda f, x: f.model.pool(f.model.node_embeddings(x, self.src, self.dst)))
        return torch.stack([torch.cat(r) for r in res])

    def hop_embeddings(self, configs: Sequence[ConfigLike] | torch.Tensor) -> torch.Tensor:
        """Node embeddings ``[n_folds, n_configs, hops + 1, n_nodes, hidden]`` (memory grows with all five)."""
        res = self._run(configs, lambda f, x: torch.stack(f.model.node_embeddings(x, self.src, self.dst), 1), 64)
        return torch.stack([torch.cat(r) for r in res])

    @torch.no_grad()
    def subgraph_norms(self, nodes: Sequence[str], output: str, hop: int, layers: Sequence[str],
                       idx: torch.Tensor, chunk: int = 4096) -> np.ndarray:
        """``‖h^hop(output)‖₁`` per fold ``[n_folds, V]`` of the *isolated* subgraph induced by ``nodes`` (paper
        §4.2) whose ``layers`` take options ``idx [V, len(layers)]``; other nodes carry their fixed features."""
        hop = min(int(hop), self.hops)
        node_idx = sorted(self.graph.index(n) for n in nodes)
        pos = {n: i for i, n in enumerate(node_idx)}
        edges = [(pos[s], pos[d]) for s, d in self.graph.edges if s in pos and d in pos]
        src, dst = with_self_loops(edges, len(node_idx))
        lidx = [self.features.layer_index(n) for n in layers]
        out_pos = pos[self.graph.index(output)]
        res = np.zeros((len(self.folds), len(idx)))
        with torch_threads(self.threads):
            for k, f in enumerate(self.folds):
                f.model.eval()
                start = 0
                for c in self._chunks(idx, chunk):
                    x = self.features.sub_features(node_idx, lidx, c)
                    h = f.model.node_embeddings(x, src, dst, upto=hop)[hop]
                    res[k, start:start + len(c)] = h[:, out_pos].abs().sum(-1).numpy()
                    start += len(c)
        return res

    @torch.no_grad()
    def context_norms(self, output: str, hop: int, layers: Sequence[str], idx: torch.Tensor,
                      context: ConfigLike, chunk: int = 256) -> np.ndarray:
        """Like :meth:`subgraph_norms` but in the whole graph, the other layers set to ``context``."""
        hop = min(int(hop), self.hops)
        base = self.features.encode([context])[0]
        full = base.unsqueeze(0).repeat(len(idx), 1)
        full[:, [self.features.layer_index(n) for n in layers]] = idx
        o = self.graph.index(output)
        res = self._run(full, lambda f, x: f.model.node_embeddings(x, self.src, self.dst, upto=hop)[hop][:, o]
                        .abs().sum(-1), chunk)
        return np.stack([torch.cat(r).numpy() for r in res])

    # -- persistence
    def save(self, path: str | os.PathLike) -> Path:
        """Write the ensemble (graph, features, fold weights, moments, metrics) as one safetensors file."""
        tensors, fmeta = self.features.state()
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        folds = []
        for k, f in enumerate(self.folds):
            for name, t in f.model.state_dict().items():
                tensors[f"fold{k}.{name}"] = t.detach().contiguous().cpu()
            folds.append({"transform": f.transform.to_json(), "mu": f.mu.tolist(), "sigma": f.sigma.tolist(),
                          "rho": f.rho.tolist()})
        header = {"format": PREDICTOR_FORMAT, "version": PREDICTOR_VERSION, "hyper": self.hyper,
                  "graph": self.graph.to_dict(), "features": fmeta, "folds": folds, "metrics": self.metrics,
                  "has_units": self.has_units}
        meta = {"format": PREDICTOR_FORMAT, "qua2sedimo": json.dumps(header)}
        target = Path(path)
        atomic_write_with(target, lambda tmp: save_file(tensors, str(tmp), metadata=meta))
        return target

    @classmethod
    def load(cls, path: str | os.PathLike) -> PredictorEnsemble:
        """Read and validate a file written by :meth:`save`."""
        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as fh:
                header = json.loads((fh.metadata() or {}).get("qua2sedimo", "null"))
                if not isinstance(header, dict) or header.get("format") != PREDICTOR_FORMAT:
                    raise ValueError(f"{path.name!r} is not a Qua2SeDiMo predictor file")
                if header.get("version") != PREDICTOR_VERSION:
                    raise ValueError(f"{path.name!r}: predictor version {header.get('version')!r}, "
                                     f"this release reads {PREDICTOR_VERSION}")
                tensors = {k: fh.get_tensor(k) for k in fh.keys()}  # noqa: SIM118
        except (OSError, SafetensorError, json.JSONDecodeError) as e:
            raise ValueError(f"predictor file {str(path)!r} is unreadable ({e})") from None
        graph = LayerGraph.from_dict(header["graph"])
        features = FeatureBuilder.from_state(graph, tensors, header["features"])
        hyper = header["hyper"]
        pool, _ = hop_pool_matrix(graph, int(hyper["layers"]))
        folds = []
        for k, fj in enumerate(header["folds"]):
            model = GNN(features.n_features, pool, hyper["hidden"], hyper["layers"], hyper["readout"])
            prefix = f"fold{k}."
            model.load_state_dict({n[len(prefix):]: t for n, t in tensors.items() if n.startswith(prefix)})
            model.eval()
            folds.append(FoldModel(model, TargetTransform(**fj["transform"]), np.asarray(fj["mu"]),
                                   np.asarray(fj["sigma"]), np.asarray(fj["rho"])))
        return cls(graph, features, folds, hyper, header.get("metrics") or {}, list(header.get("has_units") or []))


# -------------------------------------------------------------------------------------------- training
def _rank_term(kind: str | None, s: torch.Tensor, z: torch.Tensor, t: TargetTransform) -> torch.Tensor:
    if kind == "spearman":
        return soft_spearman_loss(s, z)
    if kind == "lambdarank":
        return lambdarank_loss(s, t.relevance(z))
    return soft_spearman_loss(s, z) + lambdarank_loss(s, t.relevance(z))


def training_loss(model: GNN, x: torch.Tensor, z: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                  t: TargetTransform, ranking: str | None, mse_weight: float, rank_weight: float,
                  hops: Sequence[int]) -> torch.Tensor:
    """``mse_weight · MSE + rank_weight · ranking term`` over the hop norms ``hops`` (the module docstring's L)."""
    hg = model.pool(model.node_embeddings(x, src, dst))
    loss = mse_weight * F.mse_loss(model.predict(hg), z) if mse_weight else hg.sum() * 0.0
    if ranking is not None and rank_weight:
        norms = hg.abs().sum(-1)  # [B, hops + 1]
        loss = loss + rank_weight * _rank_term(ranking, norms[:, list(hops)], z, t)
    return loss


def _train_fold(features: FeatureBuilder, pool: torch.Tensor, src: torch.Tensor, dst: torch.Tensor,
                idx: torch.Tensor, v: np.ndarray, split: Split, *, config: PredictorConfig,
                log: Callable[[str], None] | None, fold: int) -> tuple[FoldModel, dict, np.ndarray]:
    t = TargetTransform.fit(v[split.train])
    z_all = torch.from_numpy(t(v)).float()
    x_tr, z_tr = features.build(idx[split.train]), z_all[split.train]
    x_val, z_val = features.build(idx[split.val]), z_all[split.val]
    hops = list(range(config.layers + 1))
    ranking, mse_w, rank_w, seed = config.ranking, config.mse_weight, config.rank_weight, config.seed
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed * 1009 + fold)
        model = GNN(features.n_features, pool, config.hidden, config.layers, config.readout)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay, foreach=True)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=config.epochs)
    gen = torch.Generator().manual_seed(seed * 7919 + fold)
    n = len(split.train)
    n_batches = max(1, math.ceil(n / config.batch_size))
    best, best_state, best_epoch, bad = math.inf, None, 0, 0
    epoch = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        perm = torch.randperm(n, generator=gen)
        for b in torch.tensor_split(perm, n_batches):
            loss = training_loss(model, x_tr[b], z_tr[b], src, dst, t, ranking, mse_w, rank_w, hops)
            opt.zero_grad(set_to_none=True)
            loss.backward()  # the only backward: MSE and ranking gradients together
            nn.utils.clip_grad_norm_(model.parameters(), config.clip)
            opt.step()
        sched.step()
        if len(split.val) >= 2:
            model.eval()
            with torch.no_grad():
                val = float(training_loss(model, x_val, z_val, src, dst, t, ranking, mse_w, rank_w, hops))
            if val < best - 1e-6:
                best, best_epoch, bad = val, epoch, 0
                best_state = {k: v.clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
                if epoch >= config.min_epochs and bad >= config.patience:
                    break
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    with torch.no_grad():
        hs = model.node_embeddings(x_tr, src, dst)
        sel = [pool[m] > 0 for m in hops]
        norms = [hs[m][:, sel[m]].abs().sum(-1) for m in hops]
        mu = np.array([float(nm.mean()) for nm in norms])
        sigma = np.array([float(nm.std()) or 1.0 for nm in norms])
        x_te = features.build(idx[split.test])
        hg = model.pool(model.node_embeddings(x_te, src, dst))
        pred = model.predict(hg).numpy()
        hop_norms = hg.abs().sum(-1).numpy()
    z_te = z_all[split.test].numpy()
    final = _rank_metrics(pred, z_te)
    hop_m = [_rank_metrics(hop_norms[:, m], z_te) for m in hops]
    rho = np.nan_to_num(np.array([h["spearman"] for h in hop_m]))
    metrics = {"final": final, "hops": hop_m, "epochs": epoch, "best_epoch": best_epoch,
               "n_train": int(n), "n_val": len(split.val), "n_test": len(split.test)}
    if log:
        log(f"fold {fold}: {epoch} epochs (best {best_epoch}), held-out spearman {final['spearman']:.3f}, "
            f"hops {[round(h['spearman'], 3) for h in hop_m]}")
    # out-of-fold predictions on the common y = −log v scale
    y_pred = pred * t.std + t.mean
    return FoldModel(model, t, mu, sigma, rho), metrics, y_pred


@dataclass(frozen=True)
class PredictorConfig:
    """How the GNN ensemble is trained (see the module docstring); ``folds``, ``seed`` and ``val_fraction`` also
    cut the ridge baseline's folds, so both models see the same splits."""

    folds: int = 5
    seed: int = 0
    epochs: int = 300
    ranking: str | None = "spearman"  # one of RANKINGS, or None for MSE only
    hidden: int = 64
    layers: int = 4  # GATv2 layers = hops
    readout: str = "concat"  # "concat" (all hop embeddings) or "last" (the paper's)
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 20  # early stopping: epochs without a better validation loss
    min_epochs: int = 20
    val_fraction: float = 0.15
    mse_weight: float = 1.0
    rank_weight: float = 1.0
    clip: float = 5.0  # gradient-norm clipping
    threads: int | None = 1  # torch intra-op threads while training and predicting (:func:`torch_threads`)

    def __post_init__(self) -> None:
        if self.ranking is not None and self.ranking not in RANKINGS:
            raise ValueError(f"ranking must be one of {RANKINGS} or None, got {self.ranking!r}")

    def hyper(self) -> dict:
        """The settings a predictor file records (all but ``threads``)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k != "threads"}


def train_predictor(graph: LayerGraph, features: FeatureBuilder, records: Sequence[Record],
                    config: PredictorConfig = PredictorConfig(), *,
                    log: Callable[[str], None] | None = None) -> PredictorEnsemble:
    """Train the ``config.folds`` GNNs on ``records`` (their ``primary`` objective, lower is better) — see the
    module docstring for features, target, loss and protocol. Deterministic for a given ``config.seed``."""
    if features.graph is not graph and features.graph.fingerprint != graph.fingerprint:
        raise ValueError("the features were built for another graph")
    configs, v = _clean_records(records)
    idx = features.encode(configs)
    hyper = {**config.hyper(), "n_records": len(configs)}
    pool, has_units = hop_pool_matrix(graph, config.layers)
    src, dst = with_self_loops(graph.edges, len(graph.nodes))
    splits = make_folds(len(configs), config.folds, config.seed, config.val_fraction)
    hyper["folds_used"] = len(splits)
    if log and len(splits) < config.folds:
        log(f"{len(configs)} configs: {len(splits)} folds instead of {config.folds} (≥ {MIN_TEST_FOLD} held out per "
            "fold)")
    fold_models, per_fold = [], []
    oof = np.zeros(len(configs))
    t0 = time.perf_counter()
    with torch_threads(config.threads):
        for k, split in enumerate(splits):
            fm, m, y_pred = _train_fold(features, pool, src, dst, idx, v, split, config=config, log=log, fold=k)
            fold_models.append(fm)
            per_fold.append(m)
            oof[split.test] = y_pred
    y_all = -np.log(np.maximum(v, 1e-300)) if fold_models[0].transform.log else -v
    metrics = _summarize(per_fold, oof, y_all)
    metrics["seconds"] = time.perf_counter() - t0
    return PredictorEnsemble(graph, features, fold_models, hyper, metrics, has_units, config.threads)


# ------------------------------------------------------------------------------------------ ridge baseline
def _one_hot(idx: torch.Tensor, n_options: int) -> np.ndarray:
    n, n_l = idx.shape
    x = np.zeros((n, n_l * n_options))
    x[np.arange(n)[:, None], np.arange(n_l)[None] * n_options + idx.numpy()] = 1.0
    return x


def _ridge(x: np.ndarray, y: np.ndarray, alpha: float) -> tuple[np.ndarray, float]:
    xm, ym = x.mean(0), y.mean()
    xc = x - xm
    coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(x.shape[1]), xc.T @ (y - ym))
    return coef, float(ym - xm @ coef)


@dataclass
class BaselineEnsemble:
    """Ridge regression on layer × option one-hots per fold (an additive model of the transformed target)."""

    features: FeatureBuilder
    coefs: list[np.ndarray]
    intercepts: list[float]
    alphas: list[float]
    transforms: list[TargetTransform]
    metrics: dict = field(default_factory=dict)

    def predict_z(self, configs: Sequence[ConfigLike] | torch.Tensor) -> np.ndarray:
        idx = configs if isinstance(configs, torch.Tensor) else self.features.encode(configs)
        x = _one_hot(idx, len(self.features.options))
        return np.stack([x @ c + b for c, b in zip(self.coefs, self.intercepts, strict=True)])

    def predict(self, configs: Sequence[ConfigLike] | torch.Tensor) -> np.ndarray:
        z = self.predict_z(configs)
        ys = np.stack([z[k] * t.std + t.mean for k, t in enumerate(self.transforms)]).mean(0)
        return np.exp(-ys) if self.transforms[0].log else -ys

    def effects(self) -> dict[str, dict[str, float]]:
        """Mean coefficient (standardized target units, higher = better) per layer and option."""
        c = np.mean(self.coefs, 0).reshape(len(self.features.layer_names), len(self.features.options))
        return {n: {o: float(c[i, j]) for j, o in enumerate(self.features.options)}
                for i, n in enumerate(self.features.layer_names)}

    def to_dict(self) -> dict:
        return {"format": PREDICTOR_FORMAT + ".ridge", "layers": list(self.features.layer_names),
                "options": list(self.features.options), "coefs": [c.tolist() for c in self.coefs],
                "intercepts": self.intercepts, "alphas": self.alphas,
                "transforms": [t.to_json() for t in self.transforms], "metrics": self.metrics}

    @classmethod
    def from_dict(cls, data: Mapping, features: FeatureBuilder) -> BaselineEnsemble:
        if data.get("format") != PREDICTOR_FORMAT + ".ridge":
            raise ValueError("not a Qua2SeDiMo ridge baseline")
        if list(data["layers"]) != list(features.layer_names) or list(data["options"]) != list(features.options):
            raise ValueError("the ridge baseline was fitted on other layers or options")
        return cls(features, [np.asarray(c) for c in data["coefs"]], list(data["intercepts"]), list(data["alphas"]),
                   [TargetTransform(**t) for t in data["transforms"]], dict(data.get("metrics") or {}))


def train_baseline(features: FeatureBuilder, records: Sequence[Record], config: PredictorConfig = PredictorConfig(),
                   *, alphas: Sequence[float] = (0.01, 0.1, 1.0, 10.0, 100.0)) -> BaselineEnsemble:
    """The additive baseline on the same folds as :func:`train_predictor` with the same ``config`` (its ``folds``,
    ``seed``, ``val_fraction``): α by validation MSE, then refit on training + validation; metrics on the test
    fold."""
    configs, v = _clean_records(records)
    idx = features.encode(configs)
    x = _one_hot(idx, len(features.options))
    splits = make_folds(len(configs), config.folds, config.seed, config.val_fraction)
    coefs, icpts, chosen, transforms, per_fold = [], [], [], [], []
    oof = np.zeros(len(configs))
    for split in splits:
        t = TargetTransform.fit(v[split.train])
        z = t(v)
        alpha = alphas[0]
        if len(split.val) >= 2 and len(alphas) > 1:
            errs = []
            for a in alphas:
                c, b = _ridge(x[split.train], z[split.train], a)
                errs.append(float(np.mean((x[split.val] @ c + b - z[split.val]) ** 2)))
            alpha = alphas[int(np.argmin(errs))]
        fit = np.concatenate([split.train, split.val])
        c, b = _ridge(x[fit], z[fit], alpha)
        pred = x[split.test] @ c + b
        oof[split.test] = pred * t.std + t.mean
        coefs.append(c)
        icpts.append(b)
        chosen.append(float(alpha))
        transforms.append(t)
        per_fold.append({"final": _rank_metrics(pred, z[split.test]), "hops": [], "alpha": float(alpha),
                         "n_train": len(fit), "n_test": len(split.test)})
    y_all = -np.log(np.maximum(v, 1e-300)) if transforms[0].log else -v
    return BaselineEnsemble(features, coefs, icpts, chosen, transforms, _summarize(per_fold, oof, y_all))
