"""reference vs an fp64 oracle, Triton (interpreter on CPU) vs the oracle, backend registry."""

from __future__ import annotations

import itertools
import os
import warnings

import torch

if not torch.cuda.is_available():  # must precede the import of the Triton kernel module
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from qua2sedimo.quant import kernels  # noqa: E402
from qua2sedimo.quant.kernels import reference as ref  # noqa: E402
from qua2sedimo.quant.packed import PackedLayout, PackedWeight  # noqa: E402
from qua2sedimo.quant.packing import pack_codes, unpack_codes  # noqa: E402

try:
    from qua2sedimo.quant.kernels import triton_lut as tri
except Exception as exc:  # triton not installed / broken
    tri, TRITON_SKIP = None, f"triton backend not importable: {exc!r}"
else:
    TRITON_SKIP = (
        "" if (torch.cuda.is_available() or tri.INTERPRET) else "needs CUDA or TRITON_INTERPRET=1 at import"
    )
needs_triton = pytest.mark.skipif(bool(TRITON_SKIP), reason=TRITON_SKIP or "n/a")
DEV = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}
GS = 32  # group size of the group-wise tables in these tests


# ----------------------------------------------------------------------------------------------- helpers


def make_weight(n, k, bits, kind, *, lut_dtype=torch.float32, seed=0, device="cpu", group_size=GS):
    """Random codes, their packing and a table of ``kind`` (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 1 << bits, (n, k), generator=g)
    rows = {"layer": 1, "channel": n, "group": n * -(-k // group_size)}[kind]
    lut = torch.randn(rows, 1 << bits, generator=g).to(lut_dtype)
    return codes.to(device), pack_codes(codes, bits).to(device), lut.to(device)


METHOD_OF_KIND = {"layer": "kmeans_a", "channel": "kmeans_c", "group": "uaq"}


def pw(packed, lut, bits, n, k, kind, group_size=GS):
    """The :class:`PackedWeight` of packed codes and a table of ``kind``."""
    layout = PackedLayout(METHOD_OF_KIND[kind], bits, (n, k), lut.dtype, group_size if kind == "group" else None,
                          lut_dtype=lut.dtype)
    return PackedWeight.from_parts(packed, lut, layout)


def oracle_weight(packed, lut, bits, n, k, kind, group_size=GS):
    """fp64 ``W[n, k]`` built independently: ``unpack_codes`` + explicit table-row indices."""
    c = unpack_codes(packed.cpu(), bits, k).long()
    n_idx = torch.arange(n)[:, None].expand(n, k)
    if kind == "layer":
        r = torch.zeros_like(c)
    elif kind == "channel":
        r = n_idx
    else:
        r = n_idx * -(-k // group_size) + (torch.arange(k) // group_size)[None, :]
    return lut.cpu().double()[r, c]


def oracle_linear(x, w64, bias=None):
    y = x.cpu().double() @ w64.T
    return y if bias is None else y + bias.cpu().double()


def rel_err(a, b):
    b = b.double().cpu()
    return ((a.double().cpu() - b).norm() / b.norm()).item()


# ----------------------------------------------------------------------------------------------- reference


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["layer", "channel", "group"])
@pytest.mark.parametrize("k", [1, 13, 72, 100])
def test_reference_dequantize_exact(bits, kind, k):
    n = 9
    codes, packed, lut = make_weight(n, k, bits, kind, seed=k + bits)
    assert torch.equal(unpack_codes(packed, bits, k), codes.int())
    weight = pw(packed, lut, bits, n, k, kind)
    w = ref.dequantize(weight)
    assert w.dtype == lut.dtype and w.shape == (n, k)
    assert torch.equal(w.double(), oracle_weight(packed, lut, bits, n, k, kind))
    assert ref.dequantize(weight, dtype=torch.float16).dtype == torch.float16
    assert torch.equal(weight.codes, packed) and torch.equal(weight.lut, lut)  # views of the one tensor


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_u8_matches_packing(bits):
    for k in (1, 5, 8, 13, 64, 100):
        codes = torch.randint(0, 1 << bits, (6, k))
        packed = pack_codes(codes, bits)
        got = ref.unpack_u8(packed, bits, k)
        assert got.dtype == torch.uint8 and torch.equal(got.int(), unpack_codes(packed, bits, k))


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 12),
    k=st.integers(1, 70),
    bits=st.sampled_from([2, 3, 4, 8]),
    kind=st.sampled_from(["layer", "channel", "group"]),
    group_size=st.sampled_from([8, 16, 64]),
    bounds=st.tuples(st.integers(-13, 13), st.integers(-13, 13)),
    seed=st.integers(0, 2**16),
)
def test_reference_dequantize_rows_property(n, k, bits, kind, group_size, bounds, seed):
    _, packed, lut = make_weight(n, k, bits, kind, seed=seed, group_size=group_size)
    full = oracle_weight(packed, lut, bits, n, k, kind, group_size)
    rows = slice(*bounds)
    got = ref.dequantize(pw(packed, lut, bits, n, k, kind, group_size), torch.float64, rows=rows)
    assert torch.equal(got, full[rows])


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_unpack_fast_matches_unpack_u8(bits):
    for k in (1, 5, 7, 8, 13, 64, 100, 1001):
        codes = torch.randint(0, 1 << bits, (6, k))
        packed = pack_codes(codes, bits)
        got = ref.unpack_fast(packed, bits, k)
        assert got.dtype == torch.uint8 and torch.equal(got, ref.unpack_u8(packed, bits, k))
        assert torch.equal(ref.unpack_fast(packed[2:5], bits, k), ref.unpack_u8(packed[2:5], bits, k))


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["layer", "channel", "group"])
@pytest.mark.parametrize("lut_dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [1, 13, 71, 100])
def test_dequantize_fast_bit_identical(bits, kind, lut_dtype, k, monkeypatch):
    """The CPU fast decode equals the gather oracle bit for bit: every table kind, width, table dtype, odd K,
    output dtypes, row slices, several decode blocks (block smaller than the rows) and a reused ``out``."""
    n = 11
    _, packed, lut = make_weight(n, k, bits, kind, lut_dtype=lut_dtype, seed=7 * k + bits, group_size=8)
    weight = pw(packed, lut, bits, n, k, kind, group_size=8)
    for block in (1 << 20, 2 * k, 1):
        monkeypatch.setattr(ref, "DECODE_WEIGHTS", block)
        for dtype in (None, torch.float32, torch.float16, torch.bfloat16, torch.float64):
            for rows in (None, slice(3, 10), slice(5, 5), slice(-2, None)):
                want = ref.dequantize(weight, dtype, rows)
                got = ref.dequantize_fast(weight, dtype, rows)
                assert got.dtype == want.dtype and torch.equal(got, want), (block, dtype, rows)
        out = torch.full((7, k), float("nan"), dtype=torch.float32)
        assert ref.dequantize_fast(weight, torch.float32, slice(3, 10), out=out) is out
        assert torch.equal(out, ref.dequantize(weight, torch.float32, slice(3, 10)))


def test_dequantize_fast_rejects_bad_out():
    _, packed, lut = make_weight(4, 10, 4, "channel")
    weight = pw(packed, lut, 4, 4, 10, "channel")
    for bad in (torch.empty(4, 9), torch.empty(4, 10, dtype=torch.float16), torch.empty(10, 4).T):
        with pytest.raises(ValueError, match="out must be a contiguous"):
            ref.dequantize_fast(weight, torch.float32, out=bad)


@pytest.mark.parametrize("kind", ["layer", "channel", "group"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_reference_linear_chunks_match_dense(kind, dtype):
    """Chunked linear (one reused decode buffer) equals F.linear on the oracle's dense weight, chunk by chunk."""
    n, k, bits = 37, 50, 3
    _, packed, lut = make_weight(n, k, bits, kind, lut_dtype=dtype, seed=11)
    weight = pw(packed, lut, bits, n, k, kind)
    x, bias = torch.randn(5, k).to(dtype), torch.randn(n).to(dtype)
    dense = ref.dequantize(weight, torch.float32)
    want = torch.cat([torch.nn.functional.linear(x.float(), dense[r:r + 8], bias.float()[r:r + 8])
                      for r in range(0, n, 8)], dim=1).to(dtype)
    assert torch.equal(ref.linear(x, weight, bias, chunk_rows=8), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("kind", ["layer", "channel", "group"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_lut_linear_vs_oracle(dtype, kind, with_bias):
    n, k, bits = 24, 100, 3 if kind == "channel" else 4
    _, packed, lut = make_weight(n, k, bits, kind, seed=3)
    x = torch.randn(2, 3, k).to(dtype)
    bias = torch.randn(n).to(dtype) if with_bias else None
    y = ref.linear(x, pw(packed, lut, bits, n, k, kind), bias)
    assert y.dtype == dtype and y.shape == (2, 3, n)
    w64 = oracle_weight(packed, lut, bits, n, k, kind)
    assert rel_err(y, oracle_linear(x, w64, bias)) < TOL[dtype]


@pytest.mark.parametrize("chunk_rows", [1, 7, 23, 24, 1000])
def test_reference_chunking_matches_unchunked(chunk_rows):
    n, k, bits = 24, 72, 4
    _, packed, lut = make_weight(n, k, bits, "channel", seed=5)
    x, bias = torch.randn(5, k), torch.randn(n)
    weight = pw(packed, lut, bits, n, k, "channel")
    full = ref.linear(x, weight, bias)
    got = ref.linear(x, weight, bias, chunk_rows=chunk_rows)
    torch.testing.assert_close(got, full, rtol=1e-5, atol=1e-5)  # gemv vs gemm summation order


def test_reference_default_chunk_bounds_weights(monkeypatch):
    n, k, bits = 40, 64, 3
    _, packed, lut = make_weight(n, k, bits, "layer", seed=6)
    x = torch.randn(4, k)
    weight = pw(packed, lut, bits, n, k, "layer")
    expected = ref.linear(x, weight)
    calls = []
    real = ref.dequantize_fast  # what ref.linear decodes with (bit-identical to ref.dequantize, tested above)

    def spy(*args, **kw):
        w = real(*args, **kw)
        calls.append(w.numel())
        return w

    monkeypatch.setattr(ref, "CHUNK_WEIGHTS", 10 * k)
    monkeypatch.setattr(ref, "dequantize_fast", spy)
    got = ref.linear(x, weight)
    assert calls == [10 * k] * 4
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def _bad_calls():
    _, p4, lut4 = make_weight(8, 20, 4, "channel")
    x = torch.randn(3, 20)
    w4 = pw(p4, lut4, 4, 8, 20, "channel")
    lay = w4.packing
    parts = PackedWeight.from_parts
    return {
        "codes dtype": (lambda: parts(p4.to(torch.int32), lut4, lay), r"codes are torch.int32 .*expected uint8"),
        "codes shape": (lambda: parts(p4[:, :-1], lut4, lay), r"expected uint8 \(8, 10\)"),
        "codes 1-D": (lambda: parts(p4.reshape(-1), lut4, lay), r"expected uint8 \(8, 10\)"),
        "bits": (lambda: PackedLayout("kmeans_c", 5, (8, 20), torch.float32), r"unsupported bit width 5"),
        "lut levels": (lambda: parts(p4, lut4[:, :8], lay), r"table is torch.float32 \(8, 8\), expected .*\(8, 16\)"),
        "lut rows": (lambda: parts(p4, lut4[:3], lay), r"table is torch.float32 \(3, 16\), expected"),
        "lut rows group": (
            lambda: parts(p4, lut4[:3], PackedLayout("uaq", 4, (8, 20), torch.float32, 8)), r"expected .*\(24, 16\)",
        ),
        "lut dtype": (lambda: parts(p4, lut4.long(), lay), r"table is torch.int64"),
        "lut non-finite": (lambda: parts(p4, lut4.clone().fill_(float("nan")), lay), r"NaN/Inf"),
        "x last dim": (lambda: ref.linear(torch.randn(3, 21), w4), r"expected last dimension K=20"),
        "x int": (lambda: ref.linear(torch.ones(3, 20, dtype=torch.int64), w4), r"floating-point"),
        "bias shape": (lambda: ref.linear(x, w4, torch.randn(7)), r"bias of shape \(7,\).*expected \(8,\)"),
        "chunk_rows": (lambda: ref.linear(x, w4, chunk_rows=0), r"chunk_rows must be a positive int"),
        "k_in": (lambda: PackedLayout("uaq", 4, (8, 0), torch.float32), r"positive integers"),
        "dense dtype": (lambda: PackedLayout("uaq", 4, (8, 20), torch.int8), r"must be floating point"),
        "group_size": (lambda: PackedLayout("uaq", 4, (8, 20), torch.float32, -1), r"group_size must be None or"),
        "group method": (lambda: PackedLayout("kmeans_c", 4, (8, 20), torch.float32, 8), r"only defined for 'uaq'"),
        "rows step": (lambda: ref.dequantize(w4, rows=slice(0, 8, 2)), r"contiguous slice"),
        "rows type": (lambda: ref.dequantize(w4, rows=[0, 1]), r"rows must be a slice"),
        "raw size": (lambda: PackedWeight.wrap(torch.zeros(3, dtype=torch.uint8), lay), r"uint8 bytes, got"),
    }


def test_kernels_take_packed_weights_only():
    _, p4, lut4 = make_weight(8, 20, 4, "channel")
    with pytest.raises(TypeError, match="expected a PackedWeight"):
        kernels.linear(torch.randn(2, 20), p4)


@pytest.mark.parametrize("case", list(_bad_calls()))
def test_reference_errors(case):
    fn, match = _bad_calls()[case]
    with pytest.raises(ValueError, match=match):
        fn()


# ----------------------------------------------------------------------------------------------- triton


def _guarded(t: torch.Tensor, fill) -> torch.Tensor:
    """``t`` as a view into a wider buffer whose extra columns hold ``fill`` (catches reads past the row)."""
    buf = torch.full((t.shape[0], t.shape[1] + 24), fill, dtype=t.dtype, device=t.device)
    buf[:, : t.shape[1]] = t
    return buf[:, : t.shape[1]]


def _poisoned_out(rows: int, cols: int, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """NaN-filled ``[rows, cols]`` output view plus its guard buffer (extra rows/cols must stay NaN)."""
    buf = torch.full((rows + 3, cols + 24), float("nan"), dtype=dtype, device=DEV)
    return buf, buf[:rows, :cols]


def _assert_written_exactly(buf: torch.Tensor, out: torch.Tensor) -> None:
    assert not out.isnan().any(), "output not fully written"
    guard = buf.isnan()
    guard[: out.shape[0], : out.shape[1]] = True
    assert guard.all(), "kernel wrote outside the output view"


# every decode (2/3/4/8 bits, table and affine), M = 1, 7, 16, 33 (token tiles 16/32/64), K with and without a tail
# tile; n = 40 leaves a partial weight tile
FUSED_CASES = [
    *itertools.product([3, 4], ["channel", "layer"], [1, 7, 16, 33], [64, 320], [40]),
    *itertools.product([2, 8], ["channel"], [7], [160], [72]),
]


def affine_table(n, bits, dtype, seed=0):
    """A UAQ table (per channel ``(level - zero) * delta``), as :func:`quant.quantizers.uaq_codes` builds it."""
    g = torch.Generator().manual_seed(seed)
    zero = torch.round(torch.rand(n, 1, generator=g) * (1 << bits))
    delta = torch.rand(n, 1, generator=g) * 0.1 + 1e-3
    return ((torch.arange(1 << bits)[None, :] - zero) * delta).to(dtype)


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,kind,m,k,n", FUSED_CASES)
def test_triton_fused_vs_oracle(bits, kind, m, k, n, dtype):
    seed = bits * 1_000_003 + m * 1009 + k * 31 + n + (kind == "layer")
    _, packed, lut = make_weight(n, k, bits, kind, seed=seed, lut_dtype=dtype, device=DEV)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed)).to(dtype).to(DEV)
    bias = torch.randn(n, dtype=dtype, device=DEV) if m != 7 else None
    buf, out = _poisoned_out(m, n, dtype)
    tri.fused_into(_guarded(x, float("nan")), _guarded(packed, 0xFF), _guarded(lut, float("nan")), bits, k, bias, out)
    _assert_written_exactly(buf, out)
    assert rel_err(out, oracle_linear(x, oracle_weight(packed, lut, bits, n, k, kind), bias)) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits,m,k", [(3, 1, 320), (3, 33, 64), (4, 7, 320), (4, 16, 64), (2, 5, 160), (8, 5, 64)])
def test_triton_fused_affine_vs_oracle(bits, m, k, dtype):
    """UAQ tables decode with one FMA from the table's ends: within the dtype's tolerance of the stored table."""
    n = 40
    codes, packed, _ = make_weight(n, k, bits, "channel", seed=bits + m + k, device=DEV)
    lut = affine_table(n, bits, dtype, seed=m).to(DEV)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype).to(DEV)
    bias = torch.randn(n, dtype=dtype, device=DEV)
    buf, out = _poisoned_out(m, n, dtype)
    tri.fused_into(_guarded(x, float("nan")), _guarded(packed, 0xFF), lut, bits, k, bias, out, affine=True)
    _assert_written_exactly(buf, out)
    assert rel_err(out, oracle_linear(x, oracle_weight(packed, lut, bits, n, k, "channel"), bias)) < TOL[dtype]


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("kind", ["channel", "layer"])
@pytest.mark.parametrize("n,k", [(40, 72), (72, 100), (33, 200), (5, 3)])
def test_triton_dequant_vs_reference(bits, kind, n, k, dtype):
    _, packed, lut = make_weight(n, k, bits, kind, seed=n * k + bits, device=DEV)
    buf, out = _poisoned_out(n, k, dtype)
    tri.dequant_into(_guarded(packed, 0xFF), _guarded(lut, float("nan")), bits, k, out)
    _assert_written_exactly(buf, out)
    expected = ref.dequantize(pw(packed, lut, bits, n, k, kind), dtype=dtype)
    if tri.INTERPRET and dtype == torch.bfloat16:  # the interpreter truncates fp32 -> bf16 (GPU rounds)
        torch.testing.assert_close(out, expected, rtol=2**-7, atol=0)
    else:
        assert torch.equal(out, expected)
    weight = pw(packed, lut.to(dtype), bits, n, k, kind)
    assert torch.equal(tri.dequantize(weight), ref.dequantize(weight))


@needs_triton
@pytest.mark.parametrize(
    "lut_dtype,x_dtype",
    [
        (torch.float16, torch.float16),
        (torch.bfloat16, torch.bfloat16),
        (torch.bfloat16, torch.float32),
        (torch.float32, torch.float16),
    ],
)
def test_triton_public_lut_linear_dtypes(lut_dtype, x_dtype):
    n, k, bits = 40, 100, 3
    _, packed, lut = make_weight(n, k, bits, "channel", lut_dtype=lut_dtype, seed=11, device=DEV)
    x = torch.randn(2, 5, k).to(x_dtype).to(DEV)
    bias = torch.randn(n, device=DEV).to(x_dtype)
    weight = pw(packed, lut, bits, n, k, "channel")
    y = tri.linear(x, weight, bias)
    assert y.shape == (2, 5, n) and y.dtype == x_dtype
    w64 = oracle_weight(packed, lut, bits, n, k, "channel")
    assert rel_err(y, oracle_linear(x.reshape(-1, k), w64, bias).reshape(2, 5, n)) < TOL[x_dtype]
    rows = slice(3, 31)
    torch.testing.assert_close(
        tri.dequantize(weight, rows=rows),
        ref.dequantize(weight, rows=rows),
        rtol=0,
        atol=0,
    )


@needs_triton
@pytest.mark.parametrize("config", [(16, 32, 32, 1), (16, 32, 32, 4), (32, 64, 64, 2), (16, 64, 256, 1),
                                    (64, 32, 128, 3)])
@pytest.mark.parametrize("affine", [False, True])
def test_triton_fused_tile_configs(config, affine):
    """Every tile shape, split-K off and on (fp32 partials summed), table and affine decode."""
    m, n, k, bits = 33, 72, 320, 3
    _, packed, lut = make_weight(n, k, bits, "channel", seed=21, lut_dtype=torch.float16, device=DEV)
    lut = affine_table(n, bits, torch.float16).to(DEV) if affine else lut
    x = torch.randn(m, k, device=DEV).half()
    bias = torch.randn(n, device=DEV).half()
    buf, out = _poisoned_out(m, n, torch.float16)
    tri.fused_into(x, packed, lut, bits, k, bias, out, config=tri.FusedConfig(*config), affine=affine)
    _assert_written_exactly(buf, out)
    expected = oracle_linear(x, oracle_weight(packed, lut, bits, n, k, "channel"), bias)
    assert rel_err(out, expected) < TOL[torch.float16]


def ptx_prmt(a: int, b: int, c: int) -> int:
    """``prmt.b32 d, a, b, c`` (default mode) as the PTX ISA defines it: ``tmp64 = b:a``; byte i of ``d`` is byte
    ``c[4i+2 : 4i]`` of ``tmp64``, or the sign of that byte replicated when ``c[4i+3]`` is set."""
    tmp = ((b & 0xFFFFFFFF) << 32) | (a & 0xFFFFFFFF)
    d = 0
    for i in range(4):
        sel = (c >> (4 * i)) & 0xF
        byte = (tmp >> (8 * (sel & 7))) & 0xFF
        if sel & 8:
            byte = 0xFF if byte & 0x80 else 0
        d |= byte << (8 * i)
    return d - (1 << 32) if d >= 1 << 31 else d


if tri is not None:
    import triton
    import triton.language as tl

    @triton.jit
    def _prmt_kernel(a_ptr, b_ptr, s_ptr, out_ptr, EMULATE: tl.constexpr, N: tl.constexpr):
        i = tl.arange(0, N)
        tl.store(out_ptr + i, tri._prmt(tl.load(a_ptr + i), tl.load(b_ptr + i), tl.load(s_ptr + i), EMULATE))


@needs_triton
@pytest.mark.parametrize("emulate", [True, False] if torch.cuda.is_available() else [True])
def test_prmt_follows_the_ptx_definition(emulate):
    """The byte permute of the register table lookup (emulated on CPU, PTX on a GPU) against the ISA's definition:
    random words and selectors (sign mode included, upper selector bits ignored) and the identities."""
    g = torch.Generator().manual_seed(5)
    n = 512
    a, b, sel = (torch.randint(-(2**31), 2**31, (n,), generator=g, dtype=torch.int64).to(torch.int32)
                 for _ in range(3))
    sel[:6] = torch.tensor([0x3210, 0x7654, 0x5140, 0x7362, 0x9D8C, 0xBFAE], dtype=torch.int32)
    out = torch.empty(n, dtype=torch.int32)
    dev = [t.to(DEV) for t in (a, b, sel, out)]
    _prmt_kernel[(1,)](*dev, EMULATE=emulate, N=n)
    got = dev[3].cpu().tolist()
    want = [ptx_prmt(x, y, z) for x, y, z in zip(a.tolist(), b.tolist(), sel.tolist(), strict=True)]
    assert got == want
    assert got[0] == a[0].item() and got[1] == b[1].item()


@needs_triton
def test_table_mode_picks_the_register_lookup_for_3_and_4_bit_tables():
    interp = 2 if tri.INTERPRET else 1
    assert tri.table_mode(4, False, torch.bfloat16, "prmt") == interp
    assert tri.table_mode(3, False, torch.float16, "prmt") == interp
    assert tri.table_mode(4, True, torch.float16, "prmt") == 0  # UAQ: the affine decode
    assert tri.table_mode(2, False, torch.float16, "prmt") == 0
    assert tri.table_mode(4, False, torch.float32, "prmt") == 0
    assert tri.table_mode(4, False, torch.float16, "gather") == 0
    with pytest.raises(ValueError, match="'prmt' or 'gather'"):
        tri.table_mode(4, False, torch.float16, "shuffle")


@needs_triton
def test_table_mode_keeps_the_gather_on_rocm_and_old_triton(monkeypatch):
    """``prmt`` is PTX: a ROCm build (``torch.version.hip``) compiling for AMD keeps the gather decode; so does a
    Triton without tuple arguments (3.2)."""
    monkeypatch.setattr(tri, "INTERPRET", False)
    monkeypatch.setattr(torch.version, "hip", "6.2.0", raising=False)
    assert tri.table_mode(4, False, torch.float16, "prmt") == 0
    monkeypatch.setattr(torch.version, "hip", None, raising=False)
    assert tri.table_mode(4, False, torch.float16, "prmt") == 1
    monkeypatch.setattr(tri, "TUPLE_ARGS", False)  # Triton 3.2: no tuple arguments
    assert tri.table_mode(4, False, torch.float16, "prmt") == 0


def test_table_decode_setting_is_validated_at_import():
    import subprocess
    import sys

    env = dict(os.environ, QUA2SEDIMO_TABLE_DECODE="fast", TRITON_INTERPRET="1")
    proc = subprocess.run([sys.executable, "-c", "import qua2sedimo.quant.kernels.triton_lut"], env=env,
                          capture_output=True, text=True, timeout=120)
    if "No module named 'triton'" in proc.stderr:
        pytest.skip("triton not installed")
    assert proc.returncode != 0 and "QUA2SEDIMO_TABLE_DECODE must be 'prmt' or 'gather'" in proc.stderr


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("bits", [3, 4])
@pytest.mark.parametrize("affine,decode", [(False, "prmt"), (False, "gather"), (True, None)])
def test_triton_fused_decodes_every_code_position(bits, affine, decode, dtype):
    """The word-wise decode, weight by weight: one-hot tokens pick single input columns (every position of a code in
    its 32-bit words: residues 0..31, both lo words of a 3-bit hi word) out of the main 16-token tile, whole K-blocks
    and the partial last one, rows past the last tile's edge; table decodes give the table's entry exactly, affine
    ones within about one unit in the last place of the largest entry."""
    n, k = 130, 576  # 16-token tiles: 2-4 whole K-blocks, then a 64-wide partial one
    codes, packed, lut = make_weight(n, k, bits, "channel", seed=bits, lut_dtype=dtype, device=DEV)
    lut = affine_table(n, bits, dtype, seed=bits).to(DEV) if affine else lut
    expected_w = lut.gather(1, codes.long()).to(dtype)  # [n, k]
    for first in (0, 16, 512):
        cols = torch.tensor([(first + r * 33) % k for r in range(16)])
        x = torch.zeros(16, k, dtype=dtype)
        x[torch.arange(16), cols] = 1
        out = torch.empty(16, n, dtype=dtype, device=DEV)
        cfg = tri.FusedConfig(16, *tri.tiles_for(16, affine)[0], split_k=2)  # split 2 ends with the partial block
        tri.fused_into(x.to(DEV), packed, lut, bits, k, None, out, config=cfg, affine=affine, decode=decode)
        want = expected_w[:, cols].t()
        atol = 0.0 if not affine else 2 * torch.finfo(dtype).eps * float(lut.abs().max())
        torch.testing.assert_close(out, want, rtol=0, atol=atol)


@needs_triton
def test_triton_split_k_matches_unsplit():
    m, n, k, bits = 5, 40, 320, 4
    _, packed, lut = make_weight(n, k, bits, "layer", seed=3, lut_dtype=torch.float16, device=DEV)
    x = torch.randn(m, k, device=DEV).half()
    outs = []
    for split in (1, 3, 10):  # 10 blocks of 32: one K-step per split
        out = torch.empty(m, n, dtype=torch.float16, device=DEV)
        outs.append(tri.fused_into(x, packed, lut, bits, k, None, out, config=tri.FusedConfig(16, 32, 32, split)))
    torch.testing.assert_close(outs[1], outs[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(outs[2], outs[0], rtol=2e-3, atol=2e-3)


@needs_triton
def test_fused_config_rejects_bad_tiles():
    with pytest.raises(ValueError, match="BM, BN >= 16 and BK a multiple of 32"):
        tri.FusedConfig(8, 16, 32)
    with pytest.raises(ValueError, match="BM, BN >= 16 and BK a multiple of 32"):
        tri.FusedConfig(16, 16, 48)
    with pytest.raises(ValueError, match="split_k must be >= 1"):
        tri.FusedConfig(16, 32, 32, 0)


@needs_triton
@pytest.mark.parametrize("model", ["pixart", "sdxl", "flux"])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_plan_covers_two_waves(model, m):
    """Every PixArt/SDXL/Flux layer shape gets >= 2 waves of 132 SMs, K split into whole K-blocks, none empty."""
    for n, k in tri.MODEL_SHAPES[model]:
        cfg = tri.plan(m, n, k, sms=132)
        blocks = -(-k // cfg.bk)
        per = -(-blocks // cfg.split_k)
        assert -(-blocks // per) == cfg.split_k, cfg  # no empty split
        programs = -(-n // cfg.bn) * -(-m // cfg.bm) * cfg.split_k
        assert programs >= 2 * 132, (n, k, cfg, programs)
        assert cfg.bm == tri.token_tile(m)


@needs_triton
@pytest.mark.parametrize("model", ["pixart", "sdxl", "flux"])
@pytest.mark.parametrize("m", [1, 16, 64])
def test_plan_covers_two_waves_affine(model, m):
    """The UAQ (affine) decode's own 16-token tiles also give every layer shape >= 2 waves, no empty split."""
    for n, k in tri.MODEL_SHAPES[model]:
        cfg = tri.plan(m, n, k, sms=132, affine=True)
        assert (cfg.bn, cfg.bk) in tri.tiles_for(cfg.bm, affine=True)
        blocks = -(-k // cfg.bk)
        per = -(-blocks // cfg.split_k)
        assert -(-blocks // per) == cfg.split_k, cfg
        assert -(-n // cfg.bn) * -(-m // cfg.bm) * cfg.split_k >= 2 * 132, (n, k, cfg)


@needs_triton
def test_triton_fused_rejects_fp32_and_unaligned_rows():
    _, packed, lut = make_weight(8, 64, 4, "channel", device=DEV)
    out = torch.empty(2, 8, device=DEV)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        tri.fused_into(torch.randn(2, 64, device=DEV), packed, lut, 4, 64, None, out)
    _, packed, lut = make_weight(8, 100, 4, "channel", device=DEV)  # 50-byte rows
    with pytest.raises(ValueError, match="4-byte boundaries"):
        tri.fused_into(torch.randn(2, 100, device=DEV).half(), packed, lut.half(), 4, 100, None, out.half())


@needs_triton
@pytest.mark.parametrize("case", ["fp32", "unaligned", "uaq"])
def test_triton_linear_dispatch(monkeypatch, case):
    """fp32 activations and unaligned rows take dequantize + matmul; UAQ weights the affine fused decode."""
    k = 100 if case == "unaligned" else 64
    n, bits = 24, 3
    _, packed, lut = make_weight(n, k, bits, "channel", seed=5, lut_dtype=torch.float16, device=DEV)
    lut = affine_table(n, bits, torch.float16).to(DEV) if case == "uaq" else lut
    weight = PackedWeight.from_parts(packed, lut, PackedLayout("uaq" if case == "uaq" else "kmeans_c", bits, (n, k),
                                                               torch.float16))
    x = torch.randn(3, k, device=DEV).to(torch.float32 if case == "fp32" else torch.float16)
    calls = []
    real = tri.fused_into
    monkeypatch.setattr(tri, "fused_into", lambda *a, **kw: calls.append(kw.get("affine")) or real(*a, **kw))
    y = tri.linear(x, weight)
    assert calls == ([True] if case == "uaq" else [])
    expected = oracle_linear(x, oracle_weight(packed, lut, bits, n, k, "channel"))
    assert y.dtype == x.dtype and rel_err(y, expected) < TOL[torch.float16]


@needs_triton
@pytest.mark.parametrize("chunk_rows", [None, 16])
def test_triton_large_m_uses_dequant_matmul(monkeypatch, chunk_rows):
    m, n, k, bits = 9, 40, 72, 4
    _, packed, lut = make_weight(n, k, bits, "channel", seed=41, device=DEV)
    x, bias = torch.randn(m, k, device=DEV), torch.randn(n, device=DEV)
    monkeypatch.setattr(tri, "FUSED_MAX_M", 8)

    def boom(*a, **kw):
        raise AssertionError("fused kernel must not run above FUSED_MAX_M")

    monkeypatch.setattr(tri, "fused_into", boom)
    y = tri.linear(x, pw(packed, lut, bits, n, k, "channel"), bias, chunk_rows=chunk_rows)
    assert rel_err(y, oracle_linear(x, oracle_weight(packed, lut, bits, n, k, "channel"), bias)) < 1e-5


@needs_triton
def test_triton_errors(monkeypatch):
    _, packed, lut = make_weight(8, 64, 4, "group", device=DEV, group_size=32)
    grouped = pw(packed, lut, 4, 8, 64, "group", 32)
    channel = pw(packed, lut[:8], 4, 8, 64, "channel")
    x = torch.randn(2, 64, device=DEV)
    with pytest.raises(ValueError, match="group-wise tables are only supported by the reference backend"):
        tri.linear(x, grouped)
    with pytest.raises(ValueError, match="group-wise tables are only supported by the reference backend"):
        tri.dequantize(grouped)
    with pytest.raises(ValueError, match="float16/bfloat16/float32"):
        tri.linear(x.double(), channel)
    with pytest.raises(ValueError, match="expected last dimension K=64"):
        tri.linear(x[:, :63], channel)
    assert tri.linear(x[:0], channel).shape == (0, 8)
    assert not tri.supports(grouped, torch.float32, torch.device(DEV))
    assert not tri.supports(channel, torch.float64, torch.device(DEV))
    if DEV == "cpu":
        monkeypatch.setattr(tri, "INTERPRET", False)
        assert not tri.supports(channel, torch.float32, torch.device("cpu"))
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            tri.linear(x, channel)


# ----------------------------------------------------------------------------------------------- registry


@pytest.fixture
def fresh_registry(monkeypatch):
    monkeypatch.setattr(kernels, "_warned", set())
    monkeypatch.setattr(kernels, "_disabled", set())
    monkeypatch.setattr(kernels, "_triton_state", dict(kernels._triton_state))
    monkeypatch.setattr(kernels, "_registry", list(kernels._registry))
    monkeypatch.delenv(kernels.BACKEND_ENV, raising=False)
    return monkeypatch


def _channel_weight(n=16, k=32, bits=4, device=DEV):
    _, packed, lut = make_weight(n, k, bits, "channel", device=device)
    return pw(packed, lut, bits, n, k, "channel")


def test_registry_env_override(fresh_registry):
    mp = fresh_registry
    w = _channel_weight(device="cpu")
    assert kernels.select(w, torch.float32, "cpu") is kernels.REFERENCE
    mp.setenv(kernels.BACKEND_ENV, "reference")
    assert kernels.select(w, torch.float32, "cuda") is kernels.REFERENCE
    mp.setenv(kernels.BACKEND_ENV, "bogus")
    with pytest.raises(ValueError, match="QUA2SEDIMO_BACKEND='bogus' is not one of"):
        kernels.select(w, torch.float32, "cpu")
    assert "reference" in kernels.available_backends()


@needs_triton
def test_registry_forced_triton(fresh_registry):
    mp = fresh_registry
    mp.setenv(kernels.BACKEND_ENV, "triton")
    w = _channel_weight()
    assert kernels.select(w, torch.float32) is kernels.TRITON
    assert "triton" in kernels.available_backends()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        assert kernels.select(w, torch.float32, "meta") is kernels.REFERENCE
        assert kernels.select(w, torch.float32, "meta") is kernels.REFERENCE
    assert len(rec) == 1 and "cannot run on meta" in str(rec[0].message)
    # capabilities: group-wise tables and float64 go to the reference
    _, packed, lut = make_weight(16, 64, 3, "group", device=DEV)
    assert kernels.select(pw(packed, lut, 3, 16, 64, "group"), torch.float32) is kernels.REFERENCE
    assert kernels.select(w, torch.float64) is kernels.REFERENCE
    if DEV == "cpu":
        mp.setattr(tri, "INTERPRET", False)
        with pytest.warns(RuntimeWarning, match="TRITON_INTERPRET=1"):
            assert kernels.select(w, torch.float32, "cpu") is kernels.REFERENCE


def test_registry_import_failure_falls_back(fresh_registry):
    mp = fresh_registry
    mp.setattr(kernels, "_triton_state", {"module": None, "error": ImportError("no triton here")})
    w = _channel_weight(device="cpu")
    with pytest.warns(RuntimeWarning, match="triton backend unavailable.*no triton here"):
        assert kernels.select(w, torch.float32, "cuda") is kernels.REFERENCE
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once only
        assert kernels.select(w, torch.float32, "cuda") is kernels.REFERENCE
    assert kernels.available_backends() == ["reference"]


@needs_triton
def test_registry_runtime_failure_disables_that_kind_of_call(fresh_registry):
    mp = fresh_registry
    mp.setenv(kernels.BACKEND_ENV, "triton")
    w = _channel_weight()
    x = torch.randn(3, 32, device=DEV)

    def broken(*a, **kw):
        raise RuntimeError("PTX compile failed")

    mp.setattr(tri, "linear", broken)
    with pytest.warns(RuntimeWarning, match="PTX compile failed"):
        y = kernels.linear(x, w)
    torch.testing.assert_close(y, ref.linear(x, w))
    assert kernels.select(w, torch.float32) is kernels.REFERENCE  # that kind of call: no longer triton
    assert kernels.select(w, torch.float16) is kernels.TRITON  # other activation dtypes still are


@needs_triton
def test_registry_dispatch(fresh_registry):
    mp = fresh_registry
    mp.setenv(kernels.BACKEND_ENV, "triton")
    n, k = 16, 64
    _, packed, lut = make_weight(n, k, 3, "channel", device=DEV)
    w = pw(packed, lut, 3, n, k, "channel")
    x = torch.randn(4, k, device=DEV)
    calls = []
    real = tri.linear
    mp.setattr(tri, "linear", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(kernels.linear(x, w), ref.linear(x, w))
    assert calls == [1]
    _, gpacked, glut = make_weight(n, k, 3, "group", device=DEV)
    grouped = pw(gpacked, glut, 3, n, k, "group")
    torch.testing.assert_close(kernels.linear(x, grouped), ref.linear(x, grouped))
    kernels.linear(x.double(), w)
    assert calls == [1]
    assert torch.equal(kernels.dequantize(grouped, torch.float64), ref.dequantize(grouped, torch.float64))
    with pytest.raises(ValueError, match="expected last dimension K=64"):
        kernels.linear(x[:, :5], w)


def test_registry_register_backend_first(fresh_registry):
    w = _channel_weight(device="cpu")
    seen = []
    custom = kernels.Backend("custom", lambda w, x_dtype, device, m: m is not None and m <= 2,
                             lambda x, w, b=None, c=None: seen.append(x.shape[0]) or ref.linear(x, w, b),
                             ref.dequantize, accelerator_only=False)
    kernels.register_backend(custom)
    kernels.linear(torch.randn(2, 32), w)
    kernels.linear(torch.randn(5, 32), w)  # outside its M range: the reference
    assert seen == [2] and kernels.available_backends()[0] == "custom"


def test_registry_default_cpu_is_reference(fresh_registry):
    _, packed, lut = make_weight(16, 40, 4, "layer")
    w = pw(packed, lut, 4, 16, 40, "layer")
    x = torch.randn(2, 40, dtype=torch.float16)
    y = kernels.linear(x, w)
    assert y.dtype == torch.float16
    torch.testing.assert_close(y, ref.linear(x, w), rtol=0, atol=0)
    assert torch.equal(w.dequantize(), ref.dequantize(w, torch.float32))


def test_kernels_use_no_triton_library_jit_functions():
    """Triton's own library functions (``tl.zeros``, ``tl.cdiv``, ``tl.sum``…) are ``@jit`` functions decorated when
    triton is first imported; when torch._dynamo (diffusers, ComfyUI) imported it before TRITON_INTERPRET was set,
    they stay compiled-mode functions and the interpreter fails on them ("Cannot call @triton.jit'd outside of the
    scope of a kernel"). The kernels use builtins only."""
    import inspect
    import re

    import triton.language.standard as std
    from triton.runtime.jit import JITFunction

    library = {n for n, v in vars(std).items()
               if isinstance(v, JITFunction) or type(v).__name__ == "InterpretedFunction"}
    source = inspect.getsource(__import__("qua2sedimo.quant.kernels.triton_lut", fromlist=["x"]))
    used = set(re.findall(r"\btl\.([a-z_0-9]+)\s*\(", source))
    assert library and not (used & library), sorted(used & library)
