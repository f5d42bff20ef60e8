import json

import pytest
import torch
from torch import nn

from qua2sedimo.quant import QuantConfig, quantizable_layers, quantize_weight


def tiny(width=32, dtype=torch.float16):
    torch.manual_seed(0)
    m = nn.Sequential()
    m.add_module("patch", nn.Conv2d(4, width, 2, stride=2))
    m.add_module("blocks", nn.ModuleList([nn.Linear(width, width) for _ in range(3)]))
    m.add_module("final_layer", nn.Linear(width, 8))
    return m.to(dtype)


def test_uniform_with_keep():
    m = tiny()
    cfg = QuantConfig.uniform(m, "uaq-4", keep=("final_layer", "patch*"))
    assert cfg.options["final_layer"] == "fp16" and cfg.options["patch"] == "fp16"
    assert cfg.counts()["uaq-4"] == 3
    with pytest.raises(ValueError, match="matches no layer.*did you mean 'final_layer'"):
        QuantConfig.uniform(m, "uaq-4", keep=("final_layr",))
    with pytest.raises(ValueError, match="invalid option 'uaq4'"):
        QuantConfig.uniform(m, "uaq4")


def test_from_options():
    m = tiny()
    cfg = QuantConfig.from_options(m, {"blocks.0": "kmeans_c-3", "blocks.1": "kmeans_a-4"})
    assert cfg.options == {
        "patch": "fp16", "blocks.0": "kmeans_c-3", "blocks.1": "kmeans_a-4", "blocks.2": "fp16", "final_layer": "fp16"
    }
    with pytest.raises(ValueError, match="did you mean 'blocks.0'"):
        QuantConfig.from_options(m, {"blocks.00": "uaq-4"})
    with pytest.raises(ValueError, match="unknown quantization method 'gptq' for layer 'blocks.0'"):
        QuantConfig.from_options(m, {"blocks.0": "gptq-4"})


def test_json_round_trip_and_validation(tmp_path):
    m = tiny()
    cfg = QuantConfig.from_options(m, {"blocks.2": "kmeans_c-3"}, default="uaq-4", meta={"note": "x"})
    again = QuantConfig.from_json(cfg.to_json(), model=m)
    assert again.options == cfg.options and again.meta["note"] == "x" and again.fingerprint == cfg.fingerprint
    cfg.save(tmp_path / "c.json")
    assert QuantConfig.load(tmp_path / "c.json", model=m).options == cfg.options
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]

    other = tiny(width=48)
    with pytest.raises(ValueError, match="made for another model.*other shapes"):
        QuantConfig.from_json(cfg.to_json(), model=other)
    data = json.loads(cfg.to_json())
    data["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        QuantConfig.from_dict(data)
    data = json.loads(cfg.to_json())
    data["layers"][0]["shape"] = [1, 2]
    with pytest.raises(ValueError, match="fingerprint does not match"):
        QuantConfig.from_dict(data)
    with pytest.raises(ValueError, match="not valid JSON"):
        QuantConfig.from_json("{")
    with pytest.raises(ValueError, match="not a Qua2SeDiMo config"):
        QuantConfig.from_json("{}")
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="cannot read config file"):
        QuantConfig.load(tmp_path / "bad.json")


def test_avg_bits_matches_real_quantization():
    m = tiny(width=64)
    cfg = QuantConfig.from_options(m, {"blocks.0": "kmeans_c-3", "blocks.1": "uaq-4", "blocks.2": "kmeans_a-3"})
    layers = {layer.name: layer for layer in quantizable_layers(m)}
    modules = dict(m.named_modules())
    paper = stored = n = 0
    for name, option in cfg.options.items():
        w = modules[name].weight
        n += w.numel()
        if option == "fp16":
            paper += w.numel() * 2
            stored += w.numel() * 2
        else:
            method, bits = option.split("-")
            q = quantize_weight(w, method, int(bits))
            paper += q.paper_nbytes
            stored += q.nbytes
    assert cfg.avg_bits(m) == pytest.approx(8 * paper / n)
    assert cfg.avg_bits(m, "stored") == pytest.approx(8 * stored / n)
    assert cfg.nbytes() == stored
    assert len(layers) == 5


def test_no_quantizable_layers():
    with pytest.raises(ValueError, match="no quantizable"):
        QuantConfig.uniform(nn.Sequential(nn.ReLU()), "uaq-4")


def test_from_rules_first_match_wins():
    m = tiny()
    rules = QuantConfig.parse_rules("""
        # feed-forward-ish layers at 3 bits, the rest at 4
        blocks.0 = kmeans_c-3
        blocks.* = uaq-4   # later rule, blocks.0 already taken
        patch = fp16
    """)
    assert rules == [("blocks.0", "kmeans_c-3"), ("blocks.*", "uaq-4"), ("patch", "fp16")]
    cfg = QuantConfig.from_rules(m, rules, default="kmeans_a-4")
    assert cfg.options == {"patch": "fp16", "blocks.0": "kmeans_c-3", "blocks.1": "uaq-4", "blocks.2": "uaq-4",
                           "final_layer": "kmeans_a-4"}
    assert cfg.meta["rule"] == "rules" and cfg.meta["default"] == "kmeans_a-4"
    assert QuantConfig.from_json(cfg.to_json(), model=m).options == cfg.options


def test_rules_errors_name_the_line_and_pattern():
    m = tiny()
    with pytest.raises(ValueError, match="rule line 2 .*pattern = option"):
        QuantConfig.parse_rules("blocks.0 = uaq-4\nblocks.1 uaq-4")
    with pytest.raises(ValueError, match="invalid option 'uaq-5x'"):
        QuantConfig.parse_rules("blocks.0 = uaq-5x")
    with pytest.raises(ValueError, match="'blocks.9' matches no layer"):
        QuantConfig.from_rules(m, [("blocks.9", "uaq-4")])


def test_rules_by_op_type_and_category():
    """'@feedforward' selects by the layer table's category whatever the architecture names its layers."""
    m = tiny()
    tags = {"patch": ("patchify", "patchify", "linear"), "blocks.0": ("FF-1", "feedforward", "linear"),
            "blocks.1": ("FF-2", "feedforward", "linear"), "blocks.2": ("SA-QKV", "self-attn", "linear"),
            "final_layer": ("out-proj", "out-proj", "linear")}
    rules = QuantConfig.parse_rules("@ff-2 = uaq-3\n@feedforward = kmeans_c-3\n*layer = fp16")
    cfg = QuantConfig.from_rules(m, rules, default="uaq-4", tags=tags)
    assert cfg.options == {"patch": "uaq-4", "blocks.0": "kmeans_c-3", "blocks.1": "uaq-3", "blocks.2": "uaq-4",
                           "final_layer": "fp16"}
    with pytest.raises(ValueError, match="'@feedfwd' matches no layer.*did you mean '@feedforward'"):
        QuantConfig.from_rules(m, [("@feedfwd", "uaq-3")], tags=tags)
    with pytest.raises(ValueError, match="pass the layer tags"):
        QuantConfig.from_rules(m, [("@feedforward", "uaq-3")])


def test_layer_tags_of_a_real_layer_table():
    from qua2sedimo.search.graph import layer_tags

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn, self.mlp = nn.Linear(8, 24), nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([Block()])

    net = Net()
    tags = layer_tags(net)
    assert tags["blocks.0.mlp.2"] == ("FF-2", "feedforward", "linear")
    cfg = QuantConfig.from_rules(net, [("@feedforward", "kmeans_c-3")], default="uaq-4", tags=tags)
    assert cfg.options == {"blocks.0.attn": "uaq-4", "blocks.0.mlp.0": "kmeans_c-3", "blocks.0.mlp.2": "kmeans_c-3"}


@pytest.mark.parametrize("spelling", ["uaq-03", "uaq-٤", "uaq-４", "uaq-+4", "uaq- 4"])
def test_options_are_ascii_and_canonical(spelling):
    """'uaq-03' or 'uaq-٤' must not become a second spelling of an option (duplicate cache entries)."""
    from qua2sedimo.quant.options import parse_option

    assert parse_option("uaq-4") == ("uaq", 4)
    with pytest.raises(ValueError, match="ASCII digits without leading zeros"):
        parse_option(spelling)
