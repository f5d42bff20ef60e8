import copy
import random

import pytest
import torch
from torch import nn

from qua2sedimo.quant import QuantConfig, QuantConv2d, QuantLinear, option_table, quantize_
from qua2sedimo.quant.swap import ConfigSwapper

OPTS = ("uaq-4", "kmeans_c-3", "kmeans_a-4", "uaq-3")


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch = nn.Conv2d(4, 16, 3, padding=1)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16, bias=False))
                                    for _ in range(2))
        self.out = nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x).flatten(2).transpose(1, 2)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = Tiny().eval()
    table = option_table(model, OPTS)
    x = torch.randn(2, 4, 6, 6)
    return model, table, x


NAMES = ["patch", "blocks.0.0", "blocks.0.2", "blocks.1.0", "blocks.1.2", "out"]


def random_config(rng: random.Random) -> dict[str, str]:
    return {n: rng.choice(OPTS + ("fp16",)) for n in NAMES}


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_swapped_outputs_match_quantize_bit_for_bit(setup):
    model, table, x = setup
    before = state(model)
    originals = {n: model.get_submodule(n) for n in NAMES}
    rng = random.Random(1)
    with ConfigSwapper(model, table) as sw:
        for _ in range(6):
            cfg = random_config(rng)
            sw.apply(cfg)
            ref = copy.deepcopy(originals_model(model, originals))
            quantize_(ref, QuantConfig.from_options(ref, cfg), table)
            with torch.no_grad():
                assert torch.equal(model(x), ref(x))
            for n, o in cfg.items():
                mod = model.get_submodule(n)
                assert (mod is originals[n]) == (o == "fp16")
                if o != "fp16":
                    assert isinstance(mod, QuantLinear | QuantConv2d) and mod.option == o
    # restored exactly, parameters untouched
    assert all(model.get_submodule(n) is originals[n] for n in NAMES)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def originals_model(model: nn.Module, originals: dict[str, nn.Module]) -> nn.Module:
    """A deep copy of ``model`` with the original dense layers in place."""
    ref = copy.deepcopy(model)
    for n, m in originals.items():
        parent, _, attr = n.rpartition(".")
        setattr(ref.get_submodule(parent) if parent else ref, attr, copy.deepcopy(m))
    return ref


def test_only_changed_layers_touched_and_cache_reused(setup):
    model, table, _ = setup
    sw = ConfigSwapper(model, table, check_weights=False)
    cfg1 = {"patch": "uaq-4", "out": "kmeans_c-3"}
    assert sw.apply(cfg1) == cfg1
    q_patch = model.patch
    cfg2 = {"patch": "uaq-4", "out": "kmeans_a-4", "blocks.0.0": "uaq-3"}
    assert sw.apply(cfg2) == {"out": "kmeans_a-4", "blocks.0.0": "uaq-3"}
    assert model.patch is q_patch
    assert sw.apply(cfg1) == {"out": "kmeans_c-3", "blocks.0.0": "fp16"}
    assert sw.apply(cfg1) == {}
    assert len(sw.cached) == 4
    sw.apply({"out": "kmeans_c-3"})
    assert model.patch is not q_patch and isinstance(model.patch, nn.Conv2d)
    sw.apply(cfg1)
    assert model.patch is q_patch  # cached module reused
    assert sw.cache_nbytes() > 0
    sw.clear_cache()
    assert sorted(sw.cached) == [("out", "kmeans_c-3"), ("patch", "uaq-4")]
    sw.restore()
    assert sw.current == dict.fromkeys(NAMES, "fp16")


def test_context_manager_returns_previous_config(setup):
    model, table, x = setup
    sw = ConfigSwapper(model, table, check_weights=False)
    with torch.no_grad():
        fp = model(x)
        sw.apply({"patch": "uaq-3"})
        outer = model(x)
        with sw.applied(QuantConfig.uniform(model, "kmeans_c-3")) as m:
            assert m is model and all(o == "kmeans_c-3" for o in sw.current.values())
            assert not torch.equal(model(x), outer)
        assert sw.current["patch"] == "uaq-3" and sw.current["out"] == "fp16"
        assert torch.equal(model(x), outer)
        sw.restore()
        assert torch.equal(model(x), fp)


def test_errors_leave_model_unchanged(setup):
    model, table, _ = setup
    sw = ConfigSwapper(model, table, check_weights=False)
    sw.apply({"out": "uaq-4"})
    with pytest.raises(ValueError, match="did you mean 'blocks.1.0'"):
        sw.apply({"block.1.0": "uaq-4"})
    with pytest.raises(ValueError, match="no entry for layer 'patch' kmeans_a-3"):
        sw.apply({"patch": "kmeans_a-3", "out": "fp16"})
    with pytest.raises(ValueError, match="invalid option"):
        sw.apply({"patch": "uaq4"})
    assert sw.current["out"] == "uaq-4" and isinstance(model.out, QuantLinear)
    sw.restore()


def test_table_of_other_model_or_weights_rejected(setup):
    model, table, _ = setup
    other = Tiny()
    with pytest.raises(ValueError, match="other weights"):
        ConfigSwapper(other, table)
    ConfigSwapper(other, table, check_weights=False)  # same architecture: allowed when told
    smaller = Tiny()
    smaller.out = nn.Linear(16, 4)
    with pytest.raises(ValueError, match="other shapes"):
        ConfigSwapper(smaller, table, check_weights=False)
    quantized = copy.deepcopy(model)
    quantize_(quantized, QuantConfig.from_options(quantized, {"out": "uaq-4"}), table)
    with pytest.raises(ValueError, match="already has quantized layers"):
        ConfigSwapper(quantized, table)


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA"))]


@pytest.mark.parametrize("device", DEVICES)
def test_half_precision_device_and_dtype_follow_layer(device):
    torch.manual_seed(3)
    model = Tiny().to(device, torch.bfloat16)
    table = option_table(model, ("uaq-4",))
    sw = ConfigSwapper(model, table)
    sw.apply(QuantConfig.uniform(model, "uaq-4"))
    for n in NAMES:
        mod = model.get_submodule(n)
        assert mod.weight_dtype == torch.bfloat16 and mod.weight.device == sw._originals[n].weight.device
        assert mod.weight.codes.device.type == device and mod.weight.lut.device.type == device
        if mod.bias is not None:
            assert mod.bias.dtype == torch.bfloat16
    ref = originals_model(model, sw._originals)
    quantize_(ref, QuantConfig.uniform(ref, "uaq-4"), table)
    x = torch.randn(1, 4, 4, 4, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        assert torch.equal(model(x), ref(x))
    sw.act_bits = 8
    ref_a8 = originals_model(model, sw._originals)
    quantize_(ref_a8, QuantConfig.uniform(ref_a8, "uaq-4"), table, act_bits=8)
    with torch.no_grad():
        assert torch.equal(model(x), ref_a8(x))
    sw.restore()
