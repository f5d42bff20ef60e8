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

import contextlib
import functools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from . import accounting
from .kernels import reference
from .options import check_method_bits
from .packing import pack_codes

UAQ_ALPHAS: tuple[float, ...] = tuple(round(1.0 - 0.1 * i, 1) for i in range(10))
LP_NORM = 2.4


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
#
# Each row is sorted once. On a sorted row a Lloyd step is a binary search of the k−1 midpoints plus
# prefix-sum look-ups, O(k log K) per row instead of O(kK). Initialisation works on a coreset of the
# sorted row (atoms = exact sub-sums; single weights at both tails, where the outliers are): seeded
# k-means++ draws on a small coreset and a quantile initialisation each take a few Lloyd steps on a
# finer coreset, the lowest-SSE one per row continues with Lloyd steps on the full row. The sort,
# the prefix sums and the final assignment are the only passes over all weights.

KMEANS_MAX_ITER = 12  # Lloyd steps on the fine coreset (K-Means-C; later steps gain ≲ 1 % of the error)
KMEANS_A_MAX_ITER = 300  # K-Means-A is one row, its steps cost microseconds: exact steps to a fixed point
KMEANS_DRAWS = 4  # k-means++ draws per row (scikit-learn's default for k-means++ is 1)
KMEANS_COARSE_ITER = 8  # Lloyd steps on the coreset for every initialisation
_SEED_ATOMS = 32  # coreset size for the k-means++ draws
_LLOYD_ATOMS = 128  # coreset size for the coarse Lloyd steps
_FINE_ATOM = 8  # the fine coreset's atoms hold at most this many adjacent sorted weights
_OMEGA = 1.8  # over-relaxation while a row's assignment still changes (plain steps then settle it)
_BLOCK = 16  # prefix sums are fp32 inside blocks of this many sorted weights, fp64 across blocks
_LOG_BLOCK = _BLOCK.bit_length() - 1


@contextlib.contextmanager
def _one_torch_thread(device: torch.device):
    """Run torch's CPU ops on one thread: the k-means steps are many small ops, and with the cores
    shared every parallel region can stall for a scheduler slice (5-15x slower on a loaded 2-core
    machine); the large passes (sort, codes) are split over threads explicitly."""
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _order_key16(bits: torch.Tensor) -> torch.Tensor:
    """Order-preserving int16 key of fp16/bf16 bit patterns (an involution: it is its own inverse)."""
    key = bits >> 15
    return key.bitwise_and_(0x7FFF).bitwise_xor_(bits)


def _in_row_blocks(fn: Callable[[slice], None], n_rows: int, size: int, threads: int) -> None:
    """Run ``fn`` on row blocks in ``threads`` threads (for NumPy work, which releases the GIL)."""
    n = min(threads, n_rows)
    if n <= 1 or size < 1 << 16:
        fn(slice(0, n_rows))
        return
    step = -(-n_rows // n)
    with ThreadPoolExecutor(n) as pool:
        list(pool.map(fn, [slice(i, min(i + step, n_rows)) for i in range(0, n_rows, step)]))


def _sort_numpy_rows(a: np.ndarray, kind: str, threads: int) -> None:
    """Sort the rows of ``a`` in place."""
    _in_row_blocks(lambda rows: a[rows].sort(axis=1, kind=kind), a.shape[0], a.size, threads)


def _sorted_rows(w: torch.Tensor, width: int, threads: int) -> torch.Tensor:
    """Rows of ``w`` ([R, K]) sorted ascending into fp32 ``[R, width]``, padded with each row's maximum.

    16-bit CPU weights are sorted as order-preserving int16 keys with NumPy's radix sort (several times
    faster than a comparison sort), other CPU weights with NumPy's SIMD sort, other devices with torch.
    """
    r, k = w.shape
    xs = torch.empty(r, width, device=w.device)
    if w.device.type == "cpu" and w.dtype in (torch.float16, torch.bfloat16):
        key = _order_key16(w.contiguous().view(torch.int16))
        _sort_numpy_rows(key.numpy(), "stable", threads)
        xs[:, :k] = _order_key16(key).view(w.dtype)
    elif w.device.type == "cpu":
        x = w.to(torch.float32, copy=True)
        _sort_numpy_rows(x.numpy(), "quicksort", threads)
        xs[:, :k] = x
    else:
        xs[:, :k] = w.float().sort(dim=1).values
    xs[:, k:] = xs[:, k - 1 : k]
    return xs


def _block_prefix(xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prefix sums of padded sorted rows: ``xs[r, :e].sum() ≈ off[r, e >> _LOG_BLOCK] + loc[r, e]``.

    ``loc`` (fp32) sums inside a block only, ``off`` (fp64) over whole blocks: no full-width fp64 pass,
    and a segment's sum is accurate to ~1e-7 of the sums of the blocks it touches (enough to steer the
    Lloyd steps; the final means use :func:`_exact_prefix_at`).
    """
    r, width = xs.shape
    blocks = xs.view(r, width >> _LOG_BLOCK, _BLOCK)
    loc = blocks.cumsum(dim=2).sub_(blocks)
    off = torch.zeros(r, width >> _LOG_BLOCK, dtype=torch.float64, device=xs.device)
    off[:, 1:] = blocks[:, :-1].sum(dim=2).double().cumsum(dim=1)
    return off, loc.view(r, width)


def _prefix_at(off: torch.Tensor, loc: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """``xs[r, :e[r, i]].sum()`` from :func:`_block_prefix` (fp64)."""
    return off.gather(1, e >> _LOG_BLOCK) + loc.gather(1, e)


def _exact_prefix_at(xs: torch.Tensor, off: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
    """Like :func:`_prefix_at`, with the partial block summed in fp64 (exact for segments within a block)."""
    b = e >> _LOG_BLOCK
    vals = xs.view(xs.shape[0], -1, _BLOCK)[torch.arange(xs.shape[0], device=xs.device)[:, None], b]
    inside = torch.arange(_BLOCK, device=xs.device) < (e & (_BLOCK - 1))[..., None]
    return off.gather(1, b) + torch.where(inside, vals, 0.0).double().sum(dim=2)


@functools.lru_cache(maxsize=64)
def _atom_bounds(k_in: int, n_atoms: int, max_size: int | None = None) -> torch.Tensor:
    """Boundaries, in a sorted row of ``k_in`` weights, of a coreset of about ``n_atoms`` atoms: single
    weights at both tails, growing geometrically (logit spacing) towards the median, at most
    ``max_size`` weights each (if given)."""
    if k_in <= n_atoms:
        return torch.arange(k_in + 1)
    z = math.log(2 * k_in)
    b = (torch.sigmoid(torch.linspace(-z, z, n_atoms + 1, dtype=torch.float64)) * k_in).round().long()
    b[0], b[-1] = 0, k_in
    if max_size:
        b = torch.cat([b, torch.arange(0, k_in, max_size)])
    return torch.unique(b)


def _coreset(xs: torch.Tensor, off: torch.Tensor, loc: torch.Tensor, k_in: int, n_atoms: int,
             max_size: int | None = None):
    """Atoms of every sorted row: ``(means [R, M], cumulative counts [M+1], cumulative sums [R, M+1])``
    (fp32; single-weight atoms are exact)."""
    bounds = _atom_bounds(k_in, n_atoms, max_size).to(off.device)
    psum = _prefix_at(off, loc, bounds.expand(off.shape[0], -1))
    cnt = bounds.diff()
    a = torch.where(cnt == 1, xs[:, bounds[:-1]], (psum.diff(dim=1) / cnt).float())
    return a, bounds.float(), psum.float()


def _kmeanspp(a: torch.Tensor, pcnt: torch.Tensor, n_draws: int, n_clusters: int, gen: torch.Generator):
    """``n_draws`` seeded k-means++ (D² sampling) draws on the weighted atoms ``a`` ([R, M] sorted,
    cumulative weights ``pcnt`` [M+1]) of every row: sorted seeds ``[R, n_draws, k]``."""
    r, m = a.shape
    w = pcnt.diff()
    u = torch.rand(r, n_draws, generator=gen, device=a.device) * pcnt[-1]
    c = a.gather(1, torch.searchsorted(pcnt[1:], u, right=True).clamp_max_(m - 1))
    seeds = [c]
    pot = (a[:, None, :] - c[:, :, None]).square_().mul_(w)
    for _ in range(1, n_clusters):
        cdf = pot.cumsum(dim=2)
        u = torch.rand(r, n_draws, 1, generator=gen, device=a.device).mul_(cdf[:, :, -1:])
        c = a.gather(1, torch.searchsorted(cdf, u, right=True).clamp_max_(m - 1).view(r, n_draws))
        seeds.append(c)
        pot = torch.minimum(pot, (a[:, None, :] - c[:, :, None]).square_().mul_(w))
    return torch.stack(seeds, dim=2).sort(dim=2).values


def _segments(a: torch.Tensor, pcnt: torch.Tensor, psum: torch.Tensor, c: torch.Tensor, t: torch.Tensor):
    """Nearest-centroid segments of the sorted atoms ``a`` ([R, M]) for sorted centroids ``c``
    ([R, G, k]: G candidate sets per row); atoms below a midpoint go left. ``t`` is a ``[R, G, k+1]``
    buffer whose first/last columns hold ∓inf. Returns ``(edges [R, G, k+1], counts, sums [R, G, k])``."""
    r, g, k = c.shape
    t[..., 1:-1] = (c[..., 1:] + c[..., :-1]) * 0.5
    e = torch.searchsorted(a, t.view(r, -1))
    cn = pcnt.gather(1, e).view(r, g, k + 1).diff(dim=2)
    sm = psum.gather(1, e).view(r, g, k + 1).diff(dim=2)
    return e.view(r, g, k + 1), cn, sm


def _means(cn: torch.Tensor, sm: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """Segment means; an empty segment keeps its centroid."""
    return torch.where(cn > 0, sm / cn, c)


def _coreset_lloyd(xs: torch.Tensor, off: torch.Tensor, loc: torch.Tensor, k_in: int,
                   atoms: tuple[int, int | None], c: torch.Tensor, n_iter: int):
    """At most ``n_iter`` over-relaxed Lloyd steps for the candidate centroids ``c`` ([R, G, k]) on a
    coreset of every sorted row; returns them with their coreset score ``Σ_j s_j²/n_j`` ([R, G];
    SSE = Σx² − score).

    While a row's assignment changes, its centroids move ``_OMEGA`` times the Lloyd step; once it did
    not change they take plain steps, and a plain step that changes nothing is a Lloyd fixed point
    (the loop ends early when every row is at one).
    """
    a, pcnt, psum = _coreset(xs, off, loc, k_in, *atoms)
    r, g, k = c.shape
    pcnt = pcnt.expand(r, -1)
    lo, hi = a[:, :1, None], a[:, -1:, None]
    t = torch.empty(r, g, k + 1, device=c.device)
    t[..., 0], t[..., -1] = -math.inf, math.inf
    prev = torch.full((r, g, k + 1), -1, dtype=torch.long, device=c.device)
    plain = torch.zeros(r, g, dtype=torch.bool, device=c.device)
    for it in range(n_iter):
        e, cn, sm = _segments(a, pcnt, psum, c, t)
        mean = _means(cn, sm, c)
        stable = (e == prev).all(dim=2)
        if it % 4 == 3 and bool((stable & plain).all()):
            break
        c = torch.where(stable[..., None], mean, torch.lerp(c, mean, _OMEGA).clamp_(lo, hi)).sort(dim=2).values
        plain, prev = stable, e
    _, cn, sm = _segments(a, pcnt, psum, c, t)
    return c, torch.where(cn > 0, sm * sm / cn, 0.0).sum(dim=2)


def _ceil_to(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Smallest value of ``dtype`` ≥ ``t`` (so ``w >= result`` ⇔ ``w >= t`` for weights of that dtype)."""
    r = t.to(dtype)
    return torch.where(r.to(t.dtype) < t, torch.nextafter(r, torch.full_like(r, math.inf)), r)


def _codes(w: torch.Tensor, t: torch.Tensor, threads: int) -> torch.Tensor:
    """``codes[r, i] = #{j : w[r, i] >= t[r, j]}`` as uint8 (``t`` fp32, sorted per row).

    On CPU the comparisons run in NumPy over row blocks in torch's threads (NumPy's SIMD compare is
    several times faster than torch's broadcast compare), 16-bit weights as order-preserving int16 keys.
    """
    if w.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        w = w.float()
    t = _ceil_to(t, w.dtype)
    if w.device.type != "cpu":
        codes = torch.zeros(w.shape, dtype=torch.uint8, device=w.device)
        for j in range(t.shape[1]):
            codes += w >= t[:, j : j + 1]
        return codes
    if w.dtype != torch.float32:
        w, t = _order_key16(w.contiguous().view(torch.int16)), _order_key16(t.view(torch.int16))
    wn, tn = w.contiguous().numpy(), t.numpy()
    codes = np.zeros(wn.shape, dtype=np.uint8)

    def run(rows: slice) -> None:
        hit = np.empty(codes[rows].shape, dtype=np.bool_)
        for j in range(tn.shape[1]):
            np.greater_equal(wn[rows], tn[rows, j : j + 1], out=hit)
            codes[rows] += hit.view(np.uint8)

    _in_row_blocks(run, wn.shape[0], wn.size, threads)
    return torch.from_numpy(codes)


def kmeans_codes(
    w: torch.Tensor, bits: int, seed: int = 0, max_iter: int = KMEANS_MAX_ITER, fine_atom: int = _FINE_ATOM
):
    """1-D k-means with ``2^bits`` centroids on every row of ``w`` (``[R, K]``, any float dtype) at once.

    The best (lowest SSE) of ``KMEANS_DRAWS`` seeded k-means++ draws and a quantile initialisation after
    ``KMEANS_COARSE_ITER`` Lloyd steps on a coreset of the row continues with at most ``max_iter`` Lloyd
    steps on a fine coreset (atoms of ≤ ``fine_atom`` adjacent sorted weights; 1 = the row itself).
    The final assignment gives the codes (every weight → its nearest centroid) and the table holds the
    exact means of those segments. A row whose assignment stops changing is a Lloyd fixed point; like
    scikit-learn (which stops at a tolerance), long rows may stop just short of one.
    Returns ``(codes uint8 [R, K], centroids fp32 [R, 2^bits])``.
    """
    threads = torch.get_num_threads()
    with _one_torch_thread(w.device):
        return _kmeans_codes(w, bits, seed, max_iter, fine_atom, threads)


def _kmeans_codes(w: torch.Tensor, bits: int, seed: int, max_iter: int, fine_atom: int, threads: int):
    n_clusters = 1 << bits
    r, k = w.shape
    xs = _sorted_rows(w, (k // _BLOCK + 1) * _BLOCK, threads)
    off, loc = _block_prefix(xs)
    gen = torch.Generator(device=w.device).manual_seed(int(seed))

    a, pcnt, _ = _coreset(xs, off, loc, k, _SEED_ATOMS)
    seeds = _kmeanspp(a, pcnt, KMEANS_DRAWS, n_clusters, gen)
    pos = ((torch.arange(n_clusters, device=w.device) + 0.5) * (k / n_clusters)).long()
    seeds = torch.cat([seeds, xs[:, None, pos]], dim=1)
    c, score = _coreset_lloyd(xs, off, loc, k, (_LLOYD_ATOMS, None), seeds, KMEANS_COARSE_ITER)
    c = c[torch.arange(r, device=w.device), score.argmax(dim=1), None]
    c, _ = _coreset_lloyd(xs, off, loc, k, (_LLOYD_ATOMS, fine_atom), c, max_iter)

    # final assignment on the full sorted rows and its exact segment means
    c = c[:, 0]
    t = (c[:, 1:] + c[:, :-1]) * 0.5
    e = torch.searchsorted(xs, t).clamp_max_(k)
    e = torch.cat([e.new_zeros(r, 1), e, e.new_full((r, 1), k)], dim=1)
    means = _means(e.diff(dim=1), _exact_prefix_at(xs, off, e).diff(dim=1), c.double())
    return _codes(w, t, threads), means.float()


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
        codes, lut = kmeans_codes(weight.detach().reshape(n_out, k_in), bits, seed=seed)
    else:
        one_row = weight.detach().reshape(1, -1)
        codes, lut = kmeans_codes(one_row, bits, seed=seed, max_iter=KMEANS_A_MAX_ITER, fine_atom=1)
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
