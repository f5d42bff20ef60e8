import math

import pytest
import torch

from qua2sedimo.quant import METHODS, paper_nbytes, quantize_weight, quantizers, stored_nbytes
from qua2sedimo.quant.packing import unpack_codes
from qua2sedimo.quant.quantizers import LP_NORM, UAQ_ALPHAS, kmeans_codes


def weight(n_out=48, k_in=96, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, k_in, generator=g) * 0.02
    w[torch.rand(n_out, k_in, generator=g) < 0.01] *= 8
    return w.to(dtype)


def ref_uaq_row(w, bits):
    """The released code's per-channel loop, written independently."""
    qmax = 2**bits - 1
    best, best_q = math.inf, None
    for alpha in UAQ_ALPHAS:
        mx, mn = alpha * float(w.max()), alpha * float(w.min())
        delta = (mx - mn) / qmax
        z = round(-mn / delta)
        q = (torch.clamp(torch.round(w / delta) + z, 0, qmax) - z) * delta
        score = float((w - q).abs().pow(LP_NORM).mean())
        if score < best:
            best, best_q = score, q
    return best_q


@pytest.mark.parametrize("bits", [3, 4])
def test_uaq_matches_reference_loop(bits):
    w = weight()
    q = quantize_weight(w, "uaq", bits).dequantize()
    ref = torch.stack([ref_uaq_row(row.double(), bits) for row in w.double()]).float()
    assert torch.allclose(q, ref, atol=1e-6, rtol=0)


@pytest.mark.parametrize("method", ["kmeans_c", "kmeans_a"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_kmeans_is_a_lloyd_fixed_point(method, bits):
    w = weight()
    qw = quantize_weight(w, method, bits, seed=1)
    q = qw.dequantize()
    lut = qw.lut.float()
    assert lut.shape == ((48 if method == "kmeans_c" else 1), 2**bits)
    rows = w if method == "kmeans_c" else w.reshape(1, -1)
    qrows = q if method == "kmeans_c" else q.reshape(1, -1)
    for r in range(rows.shape[0]):
        x, xq, c = rows[r], qrows[r], lut[r]
        # every weight maps to its nearest centroid ...
        nearest = (x[:, None] - c[None, :]).abs().min(dim=1).values
        assert torch.allclose((x - xq).abs(), nearest, atol=1e-6)
        # ... and every used centroid is the mean of its weights
        for v in xq.unique():
            assert abs(float(x[xq == v].mean()) - float(v)) < 1e-5


def test_kmeans_c_beats_or_matches_sklearn():
    sklearn = pytest.importorskip("sklearn.cluster")
    w = weight(16, 256)
    for bits in (3, 4):
        ours = (quantize_weight(w, "kmeans_c", bits).dequantize() - w).pow(2).mean(dim=1)
        ref = []
        for i, row in enumerate(w.double().numpy()):
            km = sklearn.KMeans(n_clusters=2**bits, max_iter=100, random_state=i).fit(row.reshape(-1, 1))
            ref.append(((km.cluster_centers_[km.labels_, 0] - row) ** 2).mean())
        assert float(ours.mean()) <= 1.02 * float(torch.tensor(ref).mean())


def test_kmeans_beats_uaq_and_more_bits_help():
    w = weight()
    err = {(m, b): quantize_weight(w, m, b).rel_error for m in METHODS for b in (3, 4)}
    assert err[("kmeans_c", 4)] < err[("uaq", 4)]
    assert err[("kmeans_c", 3)] < err[("uaq", 3)]
    for m in METHODS:
        assert err[(m, 4)] < err[(m, 3)]


def test_errors_are_the_documented_ones():
    w = weight()
    qw = quantize_weight(w, "kmeans_a", 3)
    d = w - qw.dequantize()
    assert qw.rel_error == pytest.approx(float(d.pow(2).sum() / w.pow(2).sum()), rel=1e-5)
    assert qw.lp_error == pytest.approx(float(d.abs().pow(2.4).mean()), rel=1e-5)


def test_conv_weight_per_output_channel():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 4, 3, 3, generator=g)
    qw = quantize_weight(w, "kmeans_c", 4)
    assert qw.dequantize().shape == w.shape
    assert qw.lut.shape == (8, 16) and qw.k_in == 36
    assert qw.rel_error < 0.02


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_dtypes_round_trip(dtype, method):
    w = weight(dtype=dtype)
    qw = quantize_weight(w, method, 4)
    assert qw.dequantize().dtype == dtype and qw.lut.dtype == dtype
    assert qw.rel_error < 0.05


@pytest.mark.parametrize("method", METHODS)
def test_seeded_and_deterministic(method):
    w = weight()
    a, b = quantize_weight(w, method, 3, seed=7), quantize_weight(w, method, 3, seed=7)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.lut, b.lut)


def test_group_wise_uaq():
    w = weight(16, 128)
    per_channel = quantize_weight(w, "uaq", 3)
    grouped = quantize_weight(w, "uaq", 3, group_size=32)
    assert grouped.lut.shape == (16 * 4, 8)
    assert grouped.rel_error < per_channel.rel_error
    assert grouped.nbytes == stored_nbytes(w.shape, "uaq", 3, w.dtype, group_size=32)
    with pytest.raises(ValueError, match="does not divide"):
        quantize_weight(w, "uaq", 3, group_size=48)
    with pytest.raises(ValueError, match="only defined for 'uaq'"):
        quantize_weight(w, "kmeans_c", 3, group_size=32)


def test_constant_and_tiny_rows():
    w = torch.zeros(4, 8)
    w[1] = 0.5
    for m in METHODS:
        assert torch.equal(quantize_weight(w, m, 3).dequantize(), w)
    small = torch.randn(3, 5)  # fewer weights per channel than 2^4 centroids
    assert torch.allclose(quantize_weight(small, "kmeans_c", 4).dequantize(), small)


@pytest.mark.parametrize(
    ("method", "bits", "expected"),
    [("uaq", 4, 4.03), ("kmeans_c", 4, 4.22), ("kmeans_a", 4, 4.00), ("uaq", 3, 3.03), ("kmeans_c", 3, 3.11)],
)
def test_paper_accounting_example(method, bits, expected):
    # paper.md §1.6: a 1152x1152 fp16 linear layer.
    n = 1152 * 1152
    assert 8 * paper_nbytes((1152, 1152), method, bits, 16) / n == pytest.approx(expected, abs=0.005)


def test_sizes_match_accounting():
    w = weight(dtype=torch.float16)
    for m in METHODS:
        for b in (3, 4):
            qw = quantize_weight(w, m, b)
            assert qw.nbytes == stored_nbytes(w.shape, m, b, torch.float16)
            assert qw.paper_nbytes == paper_nbytes(w.shape, m, b, 16)
            assert qw.fp_nbytes == w.numel() * 2


def test_bad_input_names_the_layer():
    with pytest.raises(ValueError, match="'blk.0'.*not floating"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32), "uaq", 4, name="blk.0")
    w = torch.ones(4, 4)
    w[0, 0] = float("nan")
    with pytest.raises(ValueError, match="'blk.1'.*NaN"):
        quantize_weight(w, "uaq", 4, name="blk.1")
    with pytest.raises(ValueError, match="fewer than 2 dimensions"):
        quantize_weight(torch.ones(8), "uaq", 4)
    with pytest.raises(ValueError, match="unsupported bit width 5"):
        quantize_weight(torch.ones(4, 4), "uaq", 5)
    with pytest.raises(ValueError, match="unknown quantization method 'gptq'"):
        quantize_weight(torch.ones(4, 4), "gptq", 4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("method", METHODS)
def test_cuda_matches_cpu(method):
    w = weight()
    cpu = quantize_weight(w, method, 4)
    gpu = quantize_weight(w.cuda(), method, 4)
    assert gpu.rel_error == pytest.approx(cpu.rel_error, rel=0.05)


def test_kmeans_c_long_rows_match_sklearn_and_store_exact_means():
    # rows longer than the coreset (the fast path): error vs scikit-learn, and every table entry is the
    # exact mean of the weights coded to it
    sklearn = pytest.importorskip("sklearn.cluster")
    w = weight(6, 4608, seed=3, dtype=torch.float16)
    wf = w.float()
    for bits in (3, 4):
        qw = quantize_weight(w, "kmeans_c", bits)
        codes = unpack_codes(qw.codes, bits, 4608).long()
        lut = kmeans_codes(w, bits)[1]
        for r in range(w.shape[0]):
            for j in codes[r].unique():
                assert float(wf[r][codes[r] == j].double().mean()) == pytest.approx(float(lut[r, j]), abs=1e-7)
        ours = (qw.dequantize(torch.float32) - wf).pow(2).mean(dim=1)
        ref = []
        for i, row in enumerate(wf.double().numpy()):
            km = sklearn.KMeans(n_clusters=2**bits, max_iter=100, random_state=i).fit(row.reshape(-1, 1))
            ref.append(((km.cluster_centers_[km.labels_, 0] - row) ** 2).mean())
        assert float(ours.mean()) <= 1.02 * float(torch.tensor(ref).mean())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kmeans_c_same_result_for_any_thread_count(dtype):
    # rows are split over threads; the random draws are made up front, so the split must not matter
    w = weight(300, 700, dtype=dtype)
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = kmeans_codes(w, 4, seed=5)
        torch.set_num_threads(3)
        three = kmeans_codes(w, 4, seed=5)
    finally:
        torch.set_num_threads(n)
    assert torch.get_num_threads() == n
    assert torch.equal(one[0], three[0]) and torch.equal(one[1], three[1])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kmeans_numpy_paths_match_torch_paths(dtype):
    # CPU sorts and compares in NumPy (order-preserving int16 keys for 16-bit weights); other devices
    # use torch: both must agree exactly
    w = weight(40, 300, dtype=dtype)
    w[0, :5] = 0.0
    w[1, :5] = -0.0
    keys = quantizers._order_keys(w)
    assert torch.equal(quantizers._sorted_rows(w, keys), quantizers._sorted_rows(w, None))
    t = torch.sort(torch.randn(40, 15) * 0.03, dim=1).values
    t[:, 3] = w[:, 7].float()  # thresholds exactly on weights
    t[:2, 4] = 0.0  # ... and on +0 with −0 and +0 weights in the row (the keys order −0 below +0)
    assert torch.equal(quantizers._codes(w, keys, t), quantizers._codes(w, None, t))


@pytest.mark.parametrize("m", [1, 2, 3, 7, 33, 100, 336])
def test_count_below_matches_searchsorted(m):
    g = torch.Generator().manual_seed(m)
    a = torch.randint(-5, 5, (6, m), generator=g).float().sort(dim=1).values
    t = torch.randint(-7, 7, (6, 9), generator=g).float()  # ties with the atoms, below and above all
    assert torch.equal(quantizers._count_below(a, t), torch.searchsorted(a, t))


@pytest.mark.parametrize("bits", [3, 4])
def test_kmeans_error_sums_from_sorted_rows(bits):
    # K-Means errors come from the sorted rows (segments × stored table): same as the dense computation
    w = weight(20, 700, dtype=torch.bfloat16)
    w[3, :9] = 0.0
    w[4, :9] = -0.0
    qw = quantize_weight(w, "kmeans_c", bits)
    d = (w.float() - qw.dequantize(torch.float32)).double()
    assert qw.rel_error == pytest.approx(float(d.pow(2).sum() / w.double().pow(2).sum()), rel=1e-5)
    assert qw.lp_error == pytest.approx(float(d.abs().pow(LP_NORM).mean()), rel=1e-5)


def test_errors_match_the_dequantized_weight_for_every_method():
    w = weight(32, 256, dtype=torch.float16)
    for method, group in [("uaq", None), ("uaq", 64), ("kmeans_c", None), ("kmeans_a", None)]:
        qw = quantize_weight(w, method, 3, group_size=group)
        d = (w.float() - qw.dequantize(torch.float32)).double()
        assert qw.rel_error == pytest.approx(float(d.pow(2).sum() / w.double().pow(2).sum()), rel=1e-5)
        assert qw.lp_error == pytest.approx(float(d.abs().pow(LP_NORM).mean()), rel=1e-5)


def test_finite_check_only_rejects_nan_and_inf():
    big = torch.full((4, 4), 3e38)  # the fast sum overflows; the exact check must still accept it
    assert quantize_weight(big, "uaq", 4).codes.shape == (4, 2)
    w = weight(8, 16)
    w[3, 5] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        quantize_weight(w, "kmeans_c", 4)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kmeans_compiled_steps_match_python(monkeypatch, dtype):
    # the Lloyd steps run compiled by TorchScript where it is available (no Python, no GIL between the row
    # blocks' threads); the same functions run as Python where it is not: both must agree exactly
    assert quantizers._compiled()[1] is not quantizers._kmeans_steps  # the compiled path is the one measured
    w = weight(40, 700, dtype=dtype)
    fast = [kmeans_codes(w, b, seed=2) for b in (3, 4)] + [quantize_weight(w, "kmeans_a", 3)]
    monkeypatch.setattr(quantizers, "_compiled", lambda: (quantizers._draws, quantizers._kmeans_steps))
    slow = [kmeans_codes(w, b, seed=2) for b in (3, 4)] + [quantize_weight(w, "kmeans_a", 3)]
    for (c1, l1), (c2, l2) in zip(fast[:2], slow[:2], strict=True):
        assert torch.equal(c1, c2) and torch.equal(l1, l2)
    assert torch.equal(fast[2].codes, slow[2].codes) and torch.equal(fast[2].lut, slow[2].lut)


def test_uaq_rows_of_huge_spread_keep_their_scale():
    """A row spread over ~1e30 overflowed the clip search (|w−q|^2.4 in fp32) and dequantized to 0…15."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    w[1] = 1e30 * torch.randn(64, generator=torch.Generator().manual_seed(1))
    q = quantize_weight(w, "uaq", 4)
    d = q.dequantize()
    assert torch.isfinite(q.lut).all() and math.isfinite(q.rel_error) and math.isfinite(q.lp_error)
    d, w = d.double(), w.double()
    assert ((d[1] - w[1]).square().sum() / w[1].square().sum()) < 0.05  # was ≈ 1 (all of it lost)
    assert ((d[0] - w[0]).square().sum() / w[0].square().sum()) < 0.05


@pytest.mark.parametrize("method", ["uaq", "kmeans_c", "kmeans_a"])
def test_fp16_weights_at_the_edge_of_the_range_give_finite_tables(method):
    """UAQ on fp16 rows reaching ±65504 put Inf in the fp16 table (a level just past the range)."""
    w = torch.randn(4, 64, generator=torch.Generator().manual_seed(0)) * 0.05
    w[2] = torch.linspace(-65504, 65504, 64)
    q = quantize_weight(w.half(), method, 4)
    assert q.lut.dtype == torch.float16 and torch.isfinite(q.lut).all()
    assert torch.isfinite(q.dequantize()).all() and math.isfinite(q.rel_error) and q.rel_error < 0.05


def _uaq_rows(kind: str, n: int, k: int, seed: int) -> torch.Tensor:
    """Rows of different shapes of distribution for the UAQ search tests."""
    g = torch.Generator().manual_seed(seed)
    if kind == "gauss-outliers":
        w = torch.randn(n, k, generator=g) * 0.02
        w[torch.rand(n, k, generator=g) < 2e-3] *= 10
    elif kind == "heavy-tails":  # Student-t with 2 degrees of freedom: clipping matters
        w = torch.randn(n, k, generator=g) / torch.sqrt(torch.rand(n, k, generator=g).mul_(2).add_(1e-3))
    elif kind == "uniform":
        w = torch.rand(n, k, generator=g) - 0.3
    elif kind == "few-values":  # ties at rounding midpoints are likely
        w = torch.randint(-8, 9, (n, k), generator=g).float() * 0.125
    else:  # "mixed": per-row scales over 8 decades (within fp16), a constant row, a one-outlier row
        w = torch.randn(n, k, generator=g) * torch.logspace(-4, 3.5, n)[:, None]
        w[0] = 0.5
        w[1, 3] = 1e4
    return w


@pytest.mark.parametrize("kind", ["gauss-outliers", "heavy-tails", "uniform", "few-values", "mixed"])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_uaq_pruned_clip_search_picks_what_scoring_every_candidate_picks(kind, bits):
    """The clip search scores few candidates per row (bounds rule the rest out): same codes and tables as the
    oracle that scores all ten, bit for bit, on rows that cross several blocks and threads."""
    w = _uaq_rows(kind, 300, 257, seed=bits).half().float()
    fast, slow = quantizers.uaq_codes(w, bits), quantizers.uaq_codes_reference(w, bits)
    assert torch.equal(fast[0], slow[0]) and torch.equal(fast[1], slow[1])


@pytest.mark.parametrize("kind", ["gauss-outliers", "few-values", "mixed"])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_uaq_codes_are_uint8_and_the_released_rounding(kind, bits):
    """The codes come straight out as uint8 (no int32 copy to pack) with the released code's values
    ``clamp(round(w / Δ) + z, 0, qmax)`` for every clip candidate's step and zero point."""
    w = _uaq_rows(kind, 40, 129, seed=bits).float()
    assert quantizers.uaq_codes(w, bits)[0].dtype == torch.uint8
    qmax = (1 << bits) - 1
    wmax, wmin, _, delta, zero = quantizers._uaq_setup(w, qmax, quantizers.UAQ_ALPHAS)
    varied = wmax > wmin
    for a in range(delta.shape[0]):
        codes, _ = quantizers._uaq_table(w, wmax, wmin, delta[a], zero[a], qmax)
        want = torch.clamp(torch.round(w / delta[a][:, None]) + zero[a][:, None], 0, qmax).to(torch.int32)
        assert codes.dtype == torch.uint8 and torch.equal(codes[varied].int(), want[varied])
        assert not codes[~varied].any()


@pytest.mark.parametrize("kind", ["gauss-outliers", "heavy-tails", "uniform", "few-values", "mixed"])
def test_uaq_score_bounds_never_exceed_the_scores(kind):
    w = _uaq_rows(kind, 64, 130, seed=7).float()
    qmax = 15
    wmax, wmin = w.amax(dim=1), w.amin(dim=1)
    scale = torch.maximum(wmax.abs(), wmin.abs()).clamp_min(1e-30)
    delta, zero = quantizers._uaq_candidates(wmax, wmin, qmax, UAQ_ALPHAS)
    bounds = quantizers._UaqBounds(w, delta, zero, scale, qmax)
    rows = torch.arange(w.shape[0])
    extremes = bounds.extremes(wmax, wmin)
    scores, tight = [], []
    for a in range(len(UAQ_ALPHAS)):
        score = quantizers._uaq_lp_errors(w, delta[a], zero[a], scale, qmax).double()
        # fp32 rounding: the search's margin and per-row slack (rows quantized to ulp-level errors need the slack)
        limit = score * (1 + quantizers._MARGIN) + quantizers._SLACK * bounds.factor[:, a]
        for bound, at in ((bounds.moments(a), rows), (bounds.moments(a, rows[::3]), rows[::3]), (extremes[:, a], rows)):
            assert (bound <= limit[at]).all()
        scores.append(score)
        tight.append(bounds.moments(a))
    best = torch.stack(scores).argmin(dim=0)
    ratio = torch.stack(tight)[best, rows] / torch.stack(scores)[best, rows]
    assert (ratio > 0.9).float().mean() > 0.9  # and not trivial where it matters: at the best candidate


@pytest.mark.parametrize("kind", ["gauss-outliers", "heavy-tails", "uniform", "few-values", "mixed"])
@pytest.mark.parametrize("bits", [3, 4])
def test_uaq_fast_scores_are_within_their_stated_error(kind, bits):
    """The search compares exp/log scores and trusts them to a relative _FAST_REL: measured ≥ 10x inside it."""
    w = _uaq_rows(kind, 64, 1152, seed=5).half().float()
    qmax = (1 << bits) - 1
    _, _, scale, delta, zero = quantizers._uaq_setup(w, qmax, UAQ_ALPHAS)
    for a in range(len(UAQ_ALPHAS)):
        exact = quantizers._uaq_lp_errors(w, delta[a], zero[a], scale, qmax).double()
        fast = quantizers._uaq_lp_errors_fast(w, delta[a], zero[a], scale, qmax).double()
        assert ((fast - exact).abs() <= exact * quantizers._FAST_REL / 10 + quantizers._FAST_ABS).all()


def test_uaq_choice_survives_fast_scores_off_by_their_stated_error(monkeypatch):
    """Fast scores off by up to ±_FAST_REL (the worst the search allows for) must not change the choice: rows whose
    best candidates are that close get exact scores. Rows picked where the best candidate's exact score is within
    2e-5 of a later candidate's, which the perturbation (later candidates lower) puts ahead: without the rule the
    choice changes, so the test can fail."""
    qmax = 7
    w = torch.randn(200_000, 32, generator=torch.Generator().manual_seed(0))
    _, _, scale, delta, zero = quantizers._uaq_setup(w, qmax, UAQ_ALPHAS)
    s = torch.stack([quantizers._uaq_lp_errors(w, delta[a], zero[a], scale, qmax) for a in range(10)]).double()
    v, i = s.topk(2, dim=0, largest=False)
    w = w[((v[1] - v[0]) < 2e-5 * v[0]) & (i[0] < i[1])]
    assert len(w) >= 5
    ref = quantizers.uaq_codes_reference(w, 3)
    real, rel = quantizers._uaq_lp_errors_fast, quantizers._FAST_REL

    def off(w, delta, *rest):  # relative ±_FAST_REL by clip factor: 1 − 0.8·_FAST_REL at α = 0.1, 1 + it at α = 1
        alpha = delta * qmax / (w.amax(dim=1) - w.amin(dim=1))
        return real(w, delta, *rest) * (1 + rel * (2 * alpha - 1))

    monkeypatch.setattr(quantizers, "_uaq_lp_errors_fast", off)
    codes, lut = quantizers.uaq_codes(w, 3)
    assert torch.equal(codes, ref[0]) and torch.equal(lut, ref[1])
    monkeypatch.setattr(quantizers, "_FAST_REL", 0.0)  # no exact scores for close rows: the choice changes
    assert not torch.equal(quantizers.uaq_codes(w, 3)[1], ref[1])


def test_uaq_clip_search_scores_few_candidates(monkeypatch):
    """What makes UAQ fast: on PixArt-like rows ~2 scores per row by exp/log, not 10, and the pow on a few rows."""
    scored, fast = [], []
    real = quantizers._uaq_lp_errors
    monkeypatch.setattr(quantizers, "_uaq_lp_errors", lambda w, *a: scored.append(w.shape[0]) or real(w, *a))
    real_fast = quantizers._uaq_lp_errors_fast
    monkeypatch.setattr(quantizers, "_uaq_lp_errors_fast", lambda w, *a: fast.append(w.shape[0]) or real_fast(w, *a))
    w = _uaq_rows("gauss-outliers", 512, 1152, seed=0).half().float()
    quantizers.uaq_codes(w, 4)
    assert sum(scored) / 512 < 2.0
    # now nearly all scores are exp/log ones, ~2.3 per row, and the pow runs on a few rows only
    assert sum(fast) / 512 < 3.0 and sum(scored) / 512 < 0.1


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("group", [None, 64])
def test_uaq_error_sums_in_the_row_blocks_match_the_whole_tensor_ones(dtype, group):
    """UAQ's error metrics come from its row blocks while they are in cache: the same as the whole-tensor
    computation (to fp32 summation order) on a layer of several blocks over two threads; and a row whose squared
    errors pass fp32's range still gets finite errors (the fp64 fallback)."""
    w = _uaq_rows("gauss-outliers", 1100, 640, seed=2).to(dtype)
    if dtype == torch.float32:
        w[5] *= 1e21  # squares ~1e40: Inf in fp32
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        qw = quantize_weight(w, "uaq", 3, group_size=group)
    finally:
        torch.set_num_threads(threads)
    codes, _ = quantizers.uaq_codes(w.float().reshape(-1, group or 640), 3)
    sq, lp, norm = quantizers._error_sums(w.float(), codes.reshape(1100, 640), qw.lut.float(), group)
    assert math.isfinite(qw.lp_error) and math.isfinite(qw.rel_error)
    assert qw.rel_error == pytest.approx(sq / norm, rel=1e-6)
    assert qw.lp_error == pytest.approx(lp / w.numel(), rel=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_uaq_candidates_are_the_released_per_alpha_values(bits):
    """The ten steps and zero points come from one broadcast op: the same fp32 values as the released loop's
    ``(α·max − α·min) / qmax`` and ``round(−α·min / Δ)`` with Python-float α."""
    qmax = (1 << bits) - 1
    w = _uaq_rows("mixed", 300, 64, seed=bits).float()
    wmax, wmin = w.amax(dim=1), w.amin(dim=1)
    delta, zero = quantizers._uaq_candidates(wmax, wmin, qmax, UAQ_ALPHAS)
    for i, a in enumerate(UAQ_ALPHAS):
        d = (a * wmax - a * wmin) / qmax
        d = torch.where(d > 0, d, torch.ones_like(d))
        assert torch.equal(delta[i], d) and torch.equal(zero[i], torch.round(-(a * wmin) / d))


def test_uaq_under_inference_mode_on_row_threads():
    """ComfyUI runs nodes under inference mode: the clip search's row threads (a layer big enough to split) must not
    write into a tensor made under it ("Inplace update to inference tensor outside InferenceMode")."""
    w = _uaq_rows("gauss-outliers", 256, 512, seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with torch.inference_mode():
            codes, lut = quantizers.uaq_codes(w, 4)
    finally:
        torch.set_num_threads(threads)
    ref = quantizers.uaq_codes_reference(w, 4)
    assert torch.equal(codes, ref[0]) and torch.equal(lut, ref[1])
