"""The paper's three data-free weight quantizers, vectorized over output channels.

Every result is *packed codes + lookup table*: UAQ's per-channel scale/zero-point becomes a table
``lut[c, q] = (q − z_c)·Δ_c``, K-Means-C stores its centroids per channel, K-Means-A one table. So
``dequantize()`` is a gather, and one kernel family and one file format serve all methods.

* UAQ: asymmetric min-max per output channel with the paper's clip search over α ∈ {1.0, 0.9, …, 0.1},
  keeping the candidate with the lowest mean ``|w − q(w)|^2.4``; round to nearest (ties to even).
* K-Means: exact 1-D Lloyd iterations on *sorted* rows with prefix sums, so one iteration costs
  O(rows · 2^b · log n) instead of O(rows · n · 2^b); several initialisations (quantiles, uniform
  range, seeded k-means++) run to convergence and the lowest-SSE one is kept per row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from . import accounting
from .kernels import reference
from .options import check_method_bits
from .packing import pack_codes

UAQ_ALPHAS: tuple[float, ...] = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))
LP_NORM = 2.4
KMEANS_MAX_ITER = 300


@dataclass
class QuantizedWeight:
    """A quantized weight: packed codes ``[N, packed_length(K, bits)]`` + table ``[R, 2^bits]``."""

    codes: torch.Tensor
    lut: torch.Tensor
    method: str
    bits: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    group_size: int | None = None
    rel_error: float = float("nan")
    lp_error: float = float("nan")
    extra: dict = field(default_factory=dict)

    @property
    def option(self) -> str:
        return f"{self.method}-{self.bits}"

    @property
    def n_out(self) -> int:
        return int(self.shape[0])

    @property
    def k_in(self) -> int:
        return accounting.n_out_k_in(self.shape)[1]

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Dense weight (same shape and, by default, dtype as the original) by a table gather."""
        w = reference.dequantize(self.codes, self.lut, self.bits, self.n_out, self.k_in, self.group_size,
                                 dtype or self.dtype)
        return w.reshape(self.shape)

    @property
    def nbytes(self) -> int:
        """Bytes really stored (packed codes + tables)."""
        return self.codes.numel() * self.codes.element_size() + self.lut.numel() * self.lut.element_size()

    @property
    def paper_nbytes(self) -> int:
        """The paper's accounting (indices at b bits + scale/codebook overhead at the original precision)."""
        prec = accounting.dtype_bits(self.dtype)
        return accounting.paper_nbytes(self.shape, self.method, self.bits, prec, self.group_size)

    @property
    def fp_nbytes(self) -> int:
        return self.codes.shape[0] * self.k_in * accounting.dtype_bits(self.dtype) // 8


def lut_dtype_for(dtype: torch.dtype) -> torch.dtype:
    """Tables are stored at the weight's own precision (fp16/bf16/fp32)."""
    return dtype if dtype in (torch.float16, torch.bfloat16, torch.float32) else torch.float32


def check_weight(weight: torch.Tensor, name: str = "") -> None:
    """Reject weights that cannot be quantized, with a message naming the layer and the fix."""
    at = f"layer {name!r}: " if name else ""
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{at}expected a torch.Tensor weight, got {type(weight).__name__}")
    if not weight.dtype.is_floating_point:
        raise ValueError(f"{at}weight dtype {weight.dtype} is not floating point; pass the float weight")
    if weight.dim() < 2:
        raise ValueError(
            f"{at}weight of shape {tuple(weight.shape)} has fewer than 2 dimensions; only Linear/Conv "
            "weights [out, in, ...] are quantized (keep biases and norms in full precision)"
        )
    if weight.numel() == 0:
        raise ValueError(f"{at}weight is empty (shape {tuple(weight.shape)})")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError(f"{at}weight contains NaN or Inf values; fix or re-export the checkpoint first")


# --------------------------------------------------------------------------------------------- UAQ


def uaq_codes(w: torch.Tensor, bits: int, alphas: tuple[float, ...] = UAQ_ALPHAS):
    """UAQ with clip search on rows of ``w`` (fp32 ``[R, K]``) → ``(codes int32 [R,K], lut fp32 [R,2^b])``."""
    qmax = (1 << bits) - 1
    wmax = w.amax(dim=1)
    wmin = w.amin(dim=1)
    best_err = torch.full_like(wmax, float("inf"))
    best_delta = torch.ones_like(wmax)
    best_zero = torch.zeros_like(wmax)
    for alpha in alphas:
        delta = (alpha * wmax - alpha * wmin) / qmax
        delta = torch.where(delta > 0, delta, torch.ones_like(delta))
        zero = torch.round(-(alpha * wmin) / delta)
        q = (torch.clamp(torch.round(w / delta[:, None]) + zero[:, None], 0, qmax) - zero[:, None])
        err = (w - q * delta[:, None]).abs_().pow_(LP_NORM).mean(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_delta = torch.where(better, delta, best_delta)
        best_zero = torch.where(better, zero, best_zero)
    codes = torch.clamp(torch.round(w / best_delta[:, None]) + best_zero[:, None], 0, qmax).to(torch.int32)
    levels = torch.arange(qmax + 1, device=w.device, dtype=w.dtype)
    lut = (levels[None, :] - best_zero[:, None]) * best_delta[:, None]
    const = wmax == wmin  # constant rows: exact table, code 0
    if bool(const.any()):
        lut[const] = wmin[const, None]
        codes[const] = 0
    return codes, lut


# ------------------------------------------------------------------------------------------ k-means


def _segment_stats(cs: torch.Tensor, cs2: torch.Tensor, edges: torch.Tensor):
    """Counts, sums and sums of squares of the sorted-row segments ``[edges[j], edges[j+1])``."""
    lo, hi = edges[:, :-1], edges[:, 1:]
    cnt = (hi - lo).to(cs.dtype)
    s = cs.gather(1, hi) - cs.gather(1, lo)
    s2 = cs2.gather(1, hi) - cs2.gather(1, lo)
    return cnt, s, s2


def _edges(xs: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Segment edges of sorted rows ``xs`` for sorted ``centroids`` (nearest-centroid assignment)."""
    bounds = (centroids[:, 1:] + centroids[:, :-1]) * 0.5
    idx = torch.searchsorted(xs, bounds.to(xs.dtype).contiguous())
    r, k = xs.shape
    zero = torch.zeros(r, 1, dtype=idx.dtype, device=xs.device)
    full = torch.full((r, 1), k, dtype=idx.dtype, device=xs.device)
    return torch.cat([zero, idx, full], dim=1)


def _lloyd(xs, cs, cs2, centroids, max_iter: int):
    """Exact Lloyd iterations on sorted rows until no assignment changes; returns (centroids, sse).

    Converged rows are dropped from the working set whenever it halves, so the cost follows
    the typical row, not the slowest one (a converged row is a fixed point, so keeping it is harmless).
    """
    out = centroids.double().clone()
    rows = torch.arange(xs.shape[0], device=xs.device)
    x, s1, s2, c = xs, cs, cs2, out.clone()
    edges = _edges(x, c)
    for _ in range(max_iter):
        cnt, s, _ = _segment_stats(s1, s2, edges)
        c = torch.where(cnt > 0, s / cnt.clamp_min(1), c).sort(dim=1).values
        new_edges = _edges(x, c)
        moving = (new_edges != edges).any(dim=1)
        edges = new_edges
        n_moving = int(moving.sum())
        if n_moving == 0:
            break
        if n_moving < 0.5 * x.shape[0]:
            out[rows[~moving]] = c[~moving]
            rows, x, s1, s2, c, edges = (t[moving] for t in (rows, x, s1, s2, c, edges))
    out[rows] = c
    cnt, s, sq = _segment_stats(cs, cs2, _edges(xs, out))
    sse = (sq - torch.where(cnt > 0, s * s / cnt.clamp_min(1), torch.zeros_like(s))).sum(dim=1)
    return out, sse


def _kmeanspp_init(xs: torch.Tensor, n_clusters: int, gen: torch.Generator, max_points: int = 512):
    """Seeded greedy k-means++ (as scikit-learn: ``2 + ln k`` candidates per step, keep the one that
    lowers the potential most) for every row at once, on a subsample of the sorted rows that keeps
    both tails whole (outliers matter most to k-means) and strides through the bulk."""
    tail = max_points // 8
    stride = max(1, (xs.shape[1] - 2 * tail) // (max_points - 2 * tail))
    if stride == 1:
        sub = xs
    else:
        sub = torch.cat([xs[:, :tail], xs[:, tail:-tail:stride], xs[:, -tail:]], dim=1).contiguous()
    r, k = sub.shape
    trials = 2 + int(math.log(n_clusters))
    rows = torch.arange(r, device=xs.device)
    first = torch.randint(0, k, (r,), generator=gen, device=xs.device)
    centers = [sub[rows, first]]
    d2 = (sub - centers[0][:, None]) ** 2
    for _ in range(1, n_clusters):
        cdf = d2.cumsum(dim=1)
        u = torch.rand(r, trials, generator=gen, device=xs.device, dtype=cdf.dtype) * cdf[:, -1:]
        cand = sub.gather(1, torch.searchsorted(cdf, u).clamp_max(k - 1))
        new_d2 = torch.minimum(d2[:, None, :], (sub[:, None, :] - cand[:, :, None]) ** 2)
        best = new_d2.sum(dim=2).argmin(dim=1)
        d2 = new_d2[rows, best]
        centers.append(cand[rows, best])
    return torch.stack(centers, dim=1).sort(dim=1).values


def kmeans_codes(w: torch.Tensor, bits: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER):
    """1-D k-means with ``2^bits`` centroids on every row of ``w`` (fp32 ``[R, K]``) at once.

    Returns ``(codes int32 [R, K], centroids fp32 [R, 2^bits])`` (sorted centroids).
    """
    n_clusters = 1 << bits
    r, k = w.shape
    xs = w.sort(dim=1).values.contiguous()
    xd = xs.double()
    zero = torch.zeros(r, 1, dtype=torch.float64, device=w.device)
    cs = torch.cat([zero, xd.cumsum(dim=1)], dim=1)
    cs2 = torch.cat([zero, (xd * xd).cumsum(dim=1)], dim=1)
    gen = torch.Generator(device=w.device).manual_seed(int(seed))
    pos = ((torch.arange(n_clusters, device=w.device, dtype=torch.float64) + 0.5) * k / n_clusters).long()
    inits = [
        xs[:, pos.clamp_max(k - 1)],  # quantiles
        _kmeanspp_init(xs, n_clusters, gen),  # seeded greedy k-means++, two draws
        _kmeanspp_init(xs, n_clusters, gen),
    ]
    best_c, best_sse = None, None
    for init in inits:
        c, sse = _lloyd(xs, cs, cs2, init, max_iter)
        if best_c is None:
            best_c, best_sse = c, sse
        else:
            better = sse < best_sse
            best_c = torch.where(better[:, None], c, best_c)
            best_sse = torch.where(better, sse, best_sse)
    centroids = best_c.to(w.dtype)
    bounds = ((best_c[:, 1:] + best_c[:, :-1]) * 0.5).to(w.dtype).contiguous()
    codes = torch.searchsorted(bounds, w.contiguous()).to(torch.int32)
    return codes, centroids


# ------------------------------------------------------------------------------------------ public


def quantize_weight(
    weight: torch.Tensor,
    method: str,
    bits: int,
    seed: int = 0,
    group_size: int | None = None,
    name: str = "",
) -> QuantizedWeight:
    """Quantize a Linear/Conv weight (``[out, in, ...]``) with one method and bit width.

    ``group_size`` (UAQ only) quantizes groups of that many input weights per output channel.
    Errors are measured against the dequantized *stored* tables: ``rel_error = ‖W−Q‖²/‖W‖²``
    and the paper's ``lp_error = mean |W−Q|^2.4``.
    """
    check_method_bits(method, bits, name)
    check_weight(weight, name)
    at = f"layer {name!r}: " if name else ""
    shape = tuple(weight.shape)
    n_out, k_in = accounting.n_out_k_in(shape)
    w = weight.detach().reshape(n_out, k_in).float()
    if group_size:
        if method != "uaq":
            raise ValueError(f"{at}group-wise quantization is only defined for 'uaq', not {method!r}")
        if group_size <= 0 or k_in % group_size:
            raise ValueError(
                f"{at}group size {group_size} does not divide the {k_in} input weights per channel; "
                "choose a divisor (e.g. 64 or 128) or leave group_size unset"
            )
        groups = w.reshape(n_out * (k_in // group_size), group_size)
        codes, lut = uaq_codes(groups, bits)
        codes = codes.reshape(n_out, k_in)
    elif method == "uaq":
        codes, lut = uaq_codes(w, bits)
    elif method == "kmeans_c":
        codes, lut = kmeans_codes(w, bits, seed=seed)
    else:
        codes, lut = kmeans_codes(w.reshape(1, -1), bits, seed=seed)
        codes = codes.reshape(n_out, k_in)
    qw = QuantizedWeight(
        codes=pack_codes(codes, bits),
        lut=lut.to(lut_dtype_for(weight.dtype)).contiguous(),
        method=method,
        bits=bits,
        shape=shape,
        dtype=weight.dtype,
        group_size=group_size or None,
    )
    deq = qw.dequantize(torch.float32).reshape(n_out, k_in)
    diff = w - deq
    norm = float(w.pow(2).sum())
    qw.rel_error = float(diff.pow(2).sum()) / norm if norm > 0 else float(diff.pow(2).sum())
    qw.lp_error = float(diff.abs().pow(LP_NORM).mean())
    return qw
