import pytest
import torch
import torch.nn.functional as F
from torch import nn

import qua2sedimo.quant.api as api
from qua2sedimo.quant import (
    METHODS,
    QuantConfig,
    QuantConv2d,
    QuantLinear,
    module_nbytes,
    option_table,
    quantizable_layers,
    quantize_,
    quantize_weight,
)
from qua2sedimo.quant.activations import quantize_conv_input, quantize_tokens
from qua2sedimo.quant.packed import PackedWeight


def tiny_model(dtype=torch.float32):
    torch.manual_seed(0)
    m = nn.Module()
    m.patch = nn.Conv2d(4, 32, 2, stride=2)
    m.blocks = nn.ModuleList(
        nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32, bias=False)) for _ in range(2)
    )
    m.out = nn.Linear(32, 8)

    def forward(x):
        h = m.patch(x).flatten(2).transpose(1, 2)
        for b in m.blocks:
            h = h + b(h)
        return m.out(h)

    m.forward = forward
    return m.to(dtype)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("bits", [3, 4])
def test_linear_matches_dequantized_weight(method, bits):
    lin = nn.Linear(40, 24)
    q = QuantLinear.from_linear(lin, method, bits)
    x = torch.randn(3, 7, 40)
    w = quantize_weight(lin.weight, method, bits).dequantize()
    assert torch.allclose(q(x), F.linear(x, w, lin.bias), atol=1e-5)
    assert set(q.state_dict()) == {"weight", "bias"} and isinstance(q.state_dict()["weight"], PackedWeight)
    assert not any(p.requires_grad for p in q.parameters())  # a frozen packed weight, no dense copy
    lay = q.packing
    assert q.weight.numel() * q.weight.element_size() == lay.nbytes == lay.lut_offset + lay.lut_rows * 2**bits * 4


@pytest.mark.parametrize("option", ["uaq-4", "uaq-3", "kmeans_c-4", "kmeans_c-3", "kmeans_a-2", "uaq-8", "uaq-4/g16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cpu_forward_is_bit_identical_to_the_gather_oracle(option, dtype):
    """The CPU forward (fast decode) gives exactly F.linear on the weight the gather oracle decodes (same math)."""
    from qua2sedimo.quant.kernels import reference as ref

    spec, _, group = option.partition("/g")
    method, bits = spec.split("-")
    lin = nn.Linear(48, 37).to(dtype)
    q = QuantLinear.from_linear(lin, method, int(bits), group_size=int(group) if group else None)
    x = torch.randn(2, 5, 48).to(dtype)
    cdt = ref.compute_dtype(x)
    dense = ref.dequantize(q.weight, cdt)
    want = F.linear(x.to(cdt), dense, lin.bias.to(cdt)).to(dtype)
    assert torch.equal(q(x), want)
    assert torch.equal(q.weight.dequantize(torch.float32), ref.dequantize(q.weight, torch.float32))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_linear_half_precision(dtype):
    lin = nn.Linear(64, 32).to(dtype)
    q = QuantLinear.from_linear(lin, "uaq", 4)
    x = torch.randn(5, 64, dtype=dtype)
    ref = F.linear(x.float(), q.dequantized_weight(torch.float32), lin.bias.float())
    out = q(x)
    assert out.dtype == dtype
    assert (out.float() - ref).norm() / ref.norm() < 1e-2


@pytest.mark.parametrize(
    "kw", [dict(), dict(stride=2, padding=1), dict(padding=2, dilation=2), dict(groups=2, padding=1),
           dict(padding=1, padding_mode="reflect")]
)
def test_conv_matches_dequantized_weight(kw):
    conv = nn.Conv2d(8, 12, 3, **kw)
    q = QuantConv2d.from_conv(conv, "kmeans_c", 4)
    x = torch.randn(2, 8, 9, 9)
    ref_conv = nn.Conv2d(8, 12, 3, **kw)
    with torch.no_grad():
        ref_conv.weight.copy_(q.dequantized_weight())
        ref_conv.bias.copy_(conv.bias)
    assert torch.allclose(q(x), ref_conv(x), atol=1e-5)


def test_cached_weight_gives_the_same_result():
    lin = nn.Linear(32, 16)
    q = QuantLinear.from_linear(lin, "kmeans_a", 3)
    x = torch.randn(4, 32)
    y = q(x)
    q.cache_weight = True
    assert torch.allclose(q(x), y, atol=1e-6) and q._cached is not None
    q.to(torch.float64)
    assert q._cached is None


def test_quantize_in_place_and_summary():
    m = tiny_model()
    x = torch.randn(2, 4, 8, 8)
    y = m.forward(x)
    cfg = QuantConfig.from_options(m, {"blocks.0.0": "kmeans_c-4", "blocks.0.2": "uaq-4", "blocks.1.0": "kmeans_a-4",
                                       "blocks.1.2": "kmeans_c-3", "patch": "uaq-4"})
    s = quantize_(m, cfg)
    assert isinstance(m.blocks[0][0], QuantLinear) and isinstance(m.patch, QuantConv2d)
    assert type(m.out) is nn.Linear  # fp16 = kept dense
    assert s["bytes_after"] < s["bytes_before"] and s["counts"]["fp16"] == 1
    assert s["avg_bits"] == pytest.approx(cfg.avg_bits())
    assert (m.forward(x) - y).norm() / y.norm() < 0.1
    # the config still matches the quantized model, and re-applying it is a no-op
    cfg.check_model(m)
    quantize_(m, cfg, act_bits=8)
    assert m.blocks[0][0].act_bits == 8
    with pytest.raises(ValueError, match="'patch' is already quantized as uaq-4"):
        quantize_(m, QuantConfig.uniform(m, "uaq-3"))


def test_memory_equals_packed_accounting():
    m = tiny_model(torch.float16)
    cfg = QuantConfig.uniform(m, "kmeans_c-3", keep=("out",))
    dense = module_nbytes(m)
    weights = sum(layer.numel * 2 for layer in quantizable_layers(m) if cfg.options[layer.name] != "fp16")
    quantize_(m, cfg)
    # everything else (biases, the fp16 layer) is unchanged; quantized weights cost exactly the packed bytes
    kept = cfg.nbytes("stored") - sum(layer.numel * 2 for layer in cfg.layers if cfg.options[layer.name] == "fp16")
    assert module_nbytes(m) == dense - weights + kept


def test_quantize_from_table_does_not_requantize(monkeypatch):
    m = tiny_model()
    table = option_table(m, options=("uaq-3", "kmeans_c-4"))
    monkeypatch.setattr(api, "quantize_weight", lambda *a, **k: pytest.fail("re-quantized"))
    cfg = QuantConfig.uniform(m, "kmeans_c-4")
    quantize_(m, cfg, table=table)
    assert torch.equal(m.blocks[1][2].weight.codes, table.get("blocks.1.2", "kmeans_c-4").codes)
    with pytest.raises(ValueError, match="lacks .* entries"):
        quantize_(tiny_model(), QuantConfig.uniform(m, "kmeans_a-3"), table=table)


def test_config_for_another_model_is_rejected():
    other = nn.Sequential(nn.Linear(3, 3))
    with pytest.raises(ValueError, match="made for another model"):
        quantize_(tiny_model(), QuantConfig.uniform(other, "uaq-4"))


def test_activation_fake_quant():
    x = torch.randn(2, 5, 64)
    q = quantize_tokens(x, 6)
    for row in q.reshape(-1, 64):
        assert row.unique().numel() <= 64
    assert (q - x).abs().max() < (x.amax(-1) - x.amin(-1)).max() / 63
    assert torch.equal(quantize_tokens(x, 16), x)
    c = quantize_conv_input(torch.randn(2, 3, 8, 8), 8)
    assert c[0, 0].unique().numel() <= 256
    lin = nn.Linear(64, 16)
    q8 = QuantLinear.from_linear(lin, "uaq", 4, act_bits=8)
    q16 = QuantLinear.from_linear(lin, "uaq", 4)
    diff = (q8(x) - q16(x)).norm() / q16(x).norm()
    assert 0 < diff < 0.02
    with pytest.raises(ValueError, match="unsupported activation bits 4"):
        QuantLinear.from_linear(lin, "uaq", 4, act_bits=4)


def test_bad_shapes_are_named():
    lin = nn.Linear(16, 8)
    q = QuantLinear.from_linear(lin, "uaq", 4)
    with pytest.raises(ValueError, match="input has 15 features, this layer expects 16"):
        q(torch.randn(2, 15))
    other = quantize_weight(torch.randn(8, 32), "uaq", 4)
    with pytest.raises(ValueError, match="does not fit this layer"):
        q.load_quantized(other)
    with pytest.raises(ValueError, match="only Linear and Conv2d"):
        api.quantized_module(nn.Embedding(3, 4), other)
