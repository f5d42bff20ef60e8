"""Layer graph: classification, traced DAG, units, export (toy modules) + the five real tiny architectures."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from toys import ToyDiT, trace_toy

from qua2sedimo.quant import QuantConfig, quantizable_layers, quantize_
from qua2sedimo.quant.layer_table import layers_fingerprint
from qua2sedimo.search.graph import LayerGraph, block_path, classify_layer, layer_table, trace_graph


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, emb: int):
        super().__init__()
        self.in_layers = nn.Sequential(nn.GroupNorm(2, cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb, cout))
        self.out_layers = nn.Sequential(nn.GroupNorm(2, cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip_connection = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.in_layers(x)
        h += self.emb_layers(emb)[..., None, None]  # in place, like ComfyUI's scale-shift variant
        return self.skip_connection(x) + self.out_layers(h)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.op = nn.Conv2d(c, c, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class ToyUNet(nn.Module):
    """conv-in → ResBlock → Downsample → ResBlock → upsample + concat skip → ResBlock(shortcut) → conv-out."""

    def __init__(self, c: int = 8, emb: int = 16):
        super().__init__()
        self.time_embed = nn.Sequential(nn.Linear(4, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.input_blocks = nn.ModuleList([nn.Sequential(nn.Conv2d(3, c, 3, padding=1)),
                                           nn.ModuleList([ResBlock(c, c, emb)]), nn.ModuleList([Downsample(c)])])
        self.middle_block = nn.ModuleList([ResBlock(c, c, emb)])
        self.output_blocks = nn.ModuleList([nn.ModuleList([ResBlock(2 * c, c, emb)])])
        self.out = nn.Sequential(nn.GroupNorm(2, c), nn.SiLU(), nn.Conv2d(c, 3, 3, padding=1))

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        emb = self.time_embed(t)
        h0 = self.input_blocks[0](x)
        h1 = self.input_blocks[1][0](h0, emb)
        h = self.middle_block[0](self.input_blocks[2][0](h1), emb)
        h = torch.cat([F.interpolate(h, scale_factor=2.0), h1], dim=1)
        return self.out(self.output_blocks[0][0](h, emb))


def trace_unet(model: nn.Module | None = None) -> LayerGraph:
    model = model or ToyUNet()
    g = torch.Generator().manual_seed(1)
    x, t = torch.randn(1, 3, 8, 8, generator=g), torch.randn(1, 4, generator=g)
    return trace_graph(model, lambda: model(x, t))


def check_graph(graph: LayerGraph, model: nn.Module) -> None:
    """Invariants every traced graph must satisfy."""
    names = [la.name for la in quantizable_layers(model)]
    assert [la.name for la in graph.layers] == names
    assert Counter(n.name for n in graph.nodes if n.kind == "layer") == Counter(names)
    assert graph.is_acyclic()
    assert all(s < d for s, d in graph.edges)
    assert graph.fingerprint == layers_fingerprint(quantizable_layers(model))
    for level in ("op", "block"):
        units = graph.units(level)
        assert Counter(m for u in units for m in u.members) == Counter(names), level
        assert all(u.output_node in u.nodes and set(u.members) <= set(u.nodes) for u in units)
        assert len({u.name for u in units}) == len(units)
    assert all(u.hop == 0 and u.output_node == u.name for u in graph.units("op"))
    graph.validate()


def preds(graph: LayerGraph, name: str) -> set[str]:
    return set(graph.predecessors(name))


# ----------------------------------------------------------------------------------- classification


@pytest.mark.parametrize("name, kind, op, cat", [
    ("t_block.1", "linear", "adaln", "t-embed"),
    ("x_embedder.proj", "conv2d", "patchify", "patchify"),
    ("t_embedder.mlp.2", "linear", "t-embed", "t-embed"),
    ("y_embedder.y_proj.fc1", "linear", "c-embed", "c-embed"),
    ("csize_embedder.mlp.0", "linear", "v-embed", "t-embed"),
    ("blocks.3.attn.qkv", "linear", "SA-QKV", "self-attn"),
    ("blocks.3.attn.proj", "linear", "SA-Out", "self-attn"),
    ("blocks.3.cross_attn.q_linear", "linear", "CA-Q", "cross-attn"),
    ("blocks.3.cross_attn.kv_linear", "linear", "CA-KV", "cross-attn"),
    ("blocks.3.mlp.fc1", "linear", "FF", "feedforward"),
    ("final_layer.linear", "linear", "out-proj", "out-proj"),
    ("mlp_t5.2", "linear", "c-embed", "c-embed"),
    ("pooler.q_proj", "linear", "pool", "c-embed"),
    ("extra_embedder.0", "linear", "v-embed", "t-embed"),
    ("blocks.7.attn1.Wqkv", "linear", "SA-QKV", "self-attn"),
    ("blocks.7.attn2.kv_proj", "linear", "CA-KV", "cross-attn"),
    ("blocks.7.attn2.out_proj", "linear", "CA-Out", "cross-attn"),
    ("blocks.7.default_modulation.1", "linear", "adaln", "modulation"),
    ("blocks.30.skip_linear", "linear", "skip", "skip"),
    ("final_layer.adaLN_modulation.1", "linear", "adaln", "out-proj"),
    ("time_embed.0", "linear", "t-embed", "t-embed"),
    ("label_emb.0.2", "linear", "v-embed", "t-embed"),
    ("input_blocks.0.0", "conv2d", "conv-in", "conv-in"),
    ("input_blocks.1.0.in_layers.2", "conv2d", "res-conv1", "resblock"),
    ("input_blocks.1.0.emb_layers.1", "linear", "time-proj", "resblock"),
    ("output_blocks.2.0.skip_connection", "conv2d", "res-skip", "resblock"),
    ("input_blocks.3.0.op", "conv2d", "downsample", "sample"),
    ("input_blocks.4.1.proj_in", "linear", "proj-in", "transformer-proj"),
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_out.0", "linear", "SA-Out", "self-attn"),
    ("input_blocks.4.1.transformer_blocks.0.attn2.to_k", "linear", "CA-K", "cross-attn"),
    ("middle_block.1.transformer_blocks.0.ff.net.0.proj", "linear", "FF", "feedforward"),
    ("out.2", "conv2d", "conv-out", "conv-out"),
    ("something.weird", "linear", "other", "other"),
])
def test_classify_layer(name, kind, op, cat):
    assert classify_layer(name, kind) == (op, cat)


def test_classify_uses_module_classes():
    assert classify_layer("output_blocks.2.1.conv", "conv2d", ["", "", "", "Upsample", ""]) == ("upsample", "sample")
    assert classify_layer("output_blocks.2.1.conv", "conv2d")[0] == "other"


@pytest.mark.parametrize("name, outer, inner", [
    ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "input_blocks.4", "input_blocks.4.1.transformer_blocks.0"),
    ("input_blocks.4.0.in_layers.2", "input_blocks.4", "input_blocks.4.0"),
    ("input_blocks.0.0", "input_blocks.0", "input_blocks.0"),
    ("middle_block.2.in_layers.2", "middle_block", "middle_block.2"),
    ("blocks.12.attn.qkv", "blocks.12", "blocks.12"),
    ("t_block.1", "", ""),
    ("t_embedder.mlp.0", "", ""),
])
def test_block_path(name, outer, inner):
    assert block_path(name) == (outer, inner)


def test_layer_table_ff_roles_and_block_index():
    table = {la.name: la for la in layer_table(ToyDiT(depth=3))}
    assert table["blocks.2.mlp.0"].op_type == "FF-1" and table["blocks.2.mlp.2"].op_type == "FF-2"
    assert [table[f"blocks.{i}.attn.qkv"].block_index for i in range(3)] == [0, 1, 2]
    assert table["t_embedder.0"].block_index == -1 and table["t_embedder.0"].block == ""
    assert table["blocks.1.adaLN_modulation.1"].block_category == "modulation"


def test_swiglu_down_projection_is_ff2_and_refiners_are_blocks():
    class FF(nn.Module):  # Lumina 2 / LLaMA order: w1 (gate), w2 (down), w3 (up)
        def __init__(self):
            super().__init__()
            self.w1, self.w2, self.w3 = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 16)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.feed_forward = FF()

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.noise_refiner = nn.ModuleList([Block()])
            self.layers = nn.ModuleList([Block(), Block()])

    table = {la.name: la for la in layer_table(Net())}
    assert {n: la.op_type for n, la in table.items() if n.startswith("layers.1")} == {
        "layers.1.feed_forward.w1": "FF-1", "layers.1.feed_forward.w2": "FF-2", "layers.1.feed_forward.w3": "FF-1"}
    assert [table[f"{b}.feed_forward.w1"].block_index for b in ("noise_refiner.0", "layers.0", "layers.1")] == [0, 1, 2]


def test_attention_class_overrides_the_attn2_name():
    # SD3.5's x_block.attn2 is a second self-attention (class SelfAttention), the U-Net's attn2 a cross-attention
    sd35 = ["ModuleList", "JointBlock", "DismantledBlock", "SelfAttention", "Linear"]
    assert classify_layer("joint_blocks.0.x_block.attn2.qkv", "linear", sd35) == ("SA-QKV", "self-attn")
    unet = ["", "", "", "", "", "CrossAttention", ""]
    assert classify_layer("input_blocks.4.1.transformer_blocks.0.attn2.to_k", "linear", unet) == ("CA-K", "cross-attn")
    assert classify_layer("input_blocks.4.1.transformer_blocks.0.attn1.to_k", "linear", unet) == ("SA-K", "self-attn")


# ---------------------------------------------------------------------------------------- toy DAGs


def test_toy_dit_edges():
    model = ToyDiT()
    graph = trace_toy(model)
    check_graph(graph, model)
    assert graph.meta == {"dropped_edges": 0, "unexecuted": []}
    assert preds(graph, "x_embedder") == set() and preds(graph, "t_embedder.2") == {"t_embedder.0"}
    assert preds(graph, "blocks.0.adaLN_modulation.1") == {"t_embedder.2"}
    mod = "blocks.0/modulate_0"
    assert preds(graph, mod) == {"x_embedder", "blocks.0.adaLN_modulation.1"}
    assert preds(graph, "blocks.0.attn.qkv") == {mod}
    qk, av = "blocks.0.attn/matmul_0", "blocks.0.attn/matmul_1"
    assert preds(graph, qk) == {"blocks.0.attn.qkv"} and preds(graph, av) == {"blocks.0.attn.qkv", qk}
    assert preds(graph, "blocks.0.attn.proj") == {av}
    assert preds(graph, "blocks.0/add_0") == {"x_embedder", "blocks.0.attn.proj"}
    assert preds(graph, "blocks.0.cross_attn.kv_linear") == {"y_embedder.2"}
    assert preds(graph, "blocks.0.cross_attn.q_linear") == {"blocks.0/add_0"}
    assert preds(graph, "blocks.0.cross_attn/matmul_0") == {"blocks.0.cross_attn.q_linear",
                                                              "blocks.0.cross_attn.kv_linear"}
    assert preds(graph, "blocks.0.mlp.0") == {"blocks.0/add_1"}  # the norm is no node
    assert preds(graph, "blocks.1/modulate_0") == {"blocks.0/add_2", "blocks.1.adaLN_modulation.1"}
    assert preds(graph, "final_layer") == {"blocks.1/add_2"}
    per_block = {"modulate": 1, "matmul": 4, "add": 3}
    assert graph.combine_counts() == {k: 2 * v for k, v in per_block.items()}
    assert graph.op_type_counts() == {"patchify": 1, "t-embed": 2, "c-embed": 2, "adaln": 2, "SA-QKV": 2,
                                      "SA-Out": 2, "CA-Q": 2, "CA-KV": 2, "CA-Out": 2, "FF-1": 2, "FF-2": 2,
                                      "out-proj": 1}
    # longest path from a source: t_embedder.0 → .2 → adaLN → modulate → qkv → Q·Kᵀ → ·V → proj
    assert graph.depths()[graph.index("blocks.0.attn.proj")] == 7


def test_attention_implementations_give_one_graph():
    ref = trace_toy(ToyDiT(fused=False))
    for manual in (False, True):
        graph = trace_toy(ToyDiT(fused=False, manual=manual))
        assert [n.name for n in graph.nodes] == [n.name for n in ref.nodes]
        assert graph.edges == ref.edges
    assert preds(ref, "blocks.0.attn/matmul_0") == {"blocks.0.attn.to_q", "blocks.0.attn.to_k"}
    assert preds(ref, "blocks.0.attn/matmul_1") == {"blocks.0.attn.to_v", "blocks.0.attn/matmul_0"}


def test_toy_dit_units():
    model = ToyDiT()
    graph = trace_toy(model)
    units = {u.name: u for u in graph.units("block")}
    assert set(units) == {"patchify", "t-embed", "c-embed", "out-proj",
                          *(f"blocks.{i}/{c}" for i in range(2)
                            for c in ("modulation", "self-attn", "cross-attn", "feedforward"))}
    sa = units["blocks.0/self-attn"]
    assert sa.members == ("blocks.0.attn.qkv", "blocks.0.attn.proj")
    assert sa.output_node == "blocks.0.attn.proj" and sa.hop == 3  # qkv → qk → av → proj
    assert set(sa.nodes) == {*sa.members, "blocks.0.attn/matmul_0", "blocks.0.attn/matmul_1"}
    mod = units["blocks.0/modulation"]  # adaLN modulation: its own unit, not part of the attention
    assert mod.members == ("blocks.0.adaLN_modulation.1",) and mod.hop == 0
    ca = units["blocks.0/cross-attn"]
    assert ca.output_node == "blocks.0.cross_attn.proj" and ca.hop == 3 and ca.block_index == 0
    assert units["blocks.1/feedforward"].hop == 1 and units["blocks.1/feedforward"].block_index == 1
    assert units["t-embed"].hop == 1 and units["t-embed"].output_node == "t_embedder.2"
    assert units["patchify"].hop == 0 and units["patchify"].category == "patchify"


def test_toy_unet_resblock_and_concat():
    model = ToyUNet()
    graph = trace_unet(model)
    check_graph(graph, model)
    ops = graph.op_type_counts()
    assert ops == {"t-embed": 2, "conv-in": 1, "res-conv1": 3, "time-proj": 3, "res-conv2": 3, "downsample": 1,
                   "res-skip": 1, "conv-out": 1}
    assert graph.combine_counts() == {"add": 6}  # per ResBlock: h += emb, skip + h
    rb = "input_blocks.1.0."
    assert preds(graph, rb + "in_layers.2") == {"input_blocks.0.0"}
    assert preds(graph, "input_blocks.1.0/add_0") == {rb + "in_layers.2", rb + "emb_layers.1"}
    assert preds(graph, rb + "out_layers.2") == {"input_blocks.1.0/add_0"}
    assert preds(graph, "input_blocks.1.0/add_1") == {"input_blocks.0.0", rb + "out_layers.2"}
    # concat: both producers feed the convolutions that read it
    cat_in = {"middle_block.0/add_1", "input_blocks.1.0/add_1"}
    assert preds(graph, "output_blocks.0.0.in_layers.2") == cat_in
    assert preds(graph, "output_blocks.0.0.skip_connection") == cat_in
    units = {u.name: u for u in graph.units("block")}
    up = units["output_blocks.0.0/resblock"]  # conv path + shortcut joined at their add
    assert up.output_node == "output_blocks.0.0/add_1" and up.hop == 3 and len(up.members) == 4
    assert units["input_blocks.1.0/resblock"].output_node == rb + "out_layers.2"
    assert units["input_blocks.1.0/resblock"].hop == 2
    assert units["input_blocks.2.0/sample"].members == ("input_blocks.2.0.op",)
    assert {"t-embed", "conv-in", "conv-out"} <= set(units)


def test_quantized_layers_give_the_same_graph():
    model = ToyDiT()
    ref = trace_toy(model)
    quantize_(model, QuantConfig.uniform(model, "uaq-4"), act_bits=8)
    assert type(model.blocks[0].attn.qkv).__name__ == "QuantLinear"
    graph = trace_toy(model)
    assert graph.nodes == ref.nodes and graph.edges == ref.edges and graph.fingerprint == ref.fingerprint


def test_reused_module_unexecuted_layer_and_functional_weight():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.unused, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            h = self.a(self.b(self.a(x)))  # a runs twice: the second input edge b → a would close a cycle
            return F.linear(h, self.head.weight, self.head.bias)  # head used without calling the module

    model = Net()
    graph = trace_graph(model, lambda: model(torch.randn(2, 4)))
    check_graph(graph, model)
    assert graph.meta == {"dropped_edges": 1, "unexecuted": ["unused"]}
    assert preds(graph, "b") == {"a"} and preds(graph, "head") == {"a"} and preds(graph, "unused") == set()


def test_in_place_modulation_is_one_node():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.emb_layers, self.conv2 = nn.Linear(4, 4), nn.Linear(4, 8), nn.Linear(4, 4)

        def forward(self, x, e):
            h = self.conv1(x)
            scale, shift = self.emb_layers(e).chunk(2, dim=-1)
            h *= 1 + scale
            h += shift
            return self.conv2(h)

    model = Net()
    graph = trace_graph(model, lambda: model(torch.randn(2, 4), torch.randn(2, 4)))
    assert graph.combine_counts() == {"modulate": 1}
    assert preds(graph, "conv2") == {"/modulate_0"} and preds(graph, "/modulate_0") == {"conv1", "emb_layers"}


# ------------------------------------------------------------------------------------------- export


def test_json_round_trip_and_validation():
    graph = trace_unet()
    back = LayerGraph.from_json(graph.to_json())
    assert back.layers == graph.layers and back.nodes == graph.nodes and back.edges == graph.edges
    assert back.units("block") == graph.units("block") and back.fingerprint == graph.fingerprint
    data = json.loads(graph.to_json())
    data["fingerprint"] = "0" * 24
    with pytest.raises(ValueError, match="fingerprint"):
        LayerGraph.from_dict(data)
    data = json.loads(graph.to_json())
    data["edges"].append([5, 2])
    with pytest.raises(ValueError, match="edge"):
        LayerGraph.from_dict(data)
    data = json.loads(graph.to_json())
    data["nodes"] = data["nodes"][1:]
    with pytest.raises(ValueError):
        LayerGraph.from_dict(data)
    with pytest.raises(ValueError, match="format"):
        LayerGraph.from_dict({"layers": []})
    with pytest.raises(ValueError, match="level"):
        graph.units("layer")


def test_dot_output():
    graph = trace_toy(ToyDiT())
    dot = graph.to_dot()
    assert dot.startswith('digraph "layer_graph" {') and dot.rstrip().endswith("}")
    assert dot.count(" -> ") == len(graph.edges)
    assert all(f'n{i} [' in dot for i in range(len(graph.nodes)))
    assert 'label="blocks.0"' in dot and 'shape=box' in dot and 'label="matmul"' in dot


# -------------------------------------------------------------------------------- real architectures

ARCH = {"sd15_tiny": "sd15", "sdxl_vega_narrow": "sdxl", "pixart_alpha_d1": "pixart",
        "pixart_sigma_d1": "pixart", "hydit_tiny": "hydit"}
LATENT = {"pixart": 40}  # PixArt's position embedding needs (H + W) / 2 > 32


def _trace_comfy(mp, arch: str) -> LayerGraph:
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge

    side = LATENT.get(arch, 8)
    x = torch.randn(1, 4, side, side, generator=torch.Generator().manual_seed(0))
    cond, extras = tm.conditioning_for(arch)[0]
    conds = {k: v.cond for k, v in mp.model.extra_conds(cross_attn=cond, noise=x, device="cpu", **extras).items()}
    context = conds.pop("c_crossattn")
    return trace_graph(bridge.diffusion_model(mp),
                       lambda: mp.model.apply_model(x, torch.tensor([1.0]), c_crossattn=context, **conds))


def _modules(dm: nn.Module, cls: str) -> list[nn.Module]:
    return [m for m in dm.modules() if type(m).__name__ == cls]


def _expected_unet(dm: nn.Module) -> tuple[Counter, Counter, int]:
    """Layer op types, combine ops and block units of an LDM U-Net, from its module structure."""
    res, st = _modules(dm, "ResBlock"), _modules(dm, "SpatialTransformer")
    btb = _modules(dm, "BasicTransformerBlock")
    shortcut = sum(not isinstance(r.skip_connection, nn.Identity) for r in res)
    down = sum(hasattr(m, "op") and isinstance(m.op, nn.Conv2d) for m in _modules(dm, "Downsample"))
    up = sum(hasattr(m, "conv") for m in _modules(dm, "Upsample"))
    label = dm.label_emb is not None if hasattr(dm, "label_emb") else False
    ops = Counter({"t-embed": 2, "v-embed": 2 * label, "conv-in": 1, "conv-out": 1, "res-conv1": len(res),
                   "time-proj": len(res), "res-conv2": len(res), "res-skip": shortcut, "proj-in": len(st),
                   "proj-out": len(st), "downsample": down, "upsample": up})
    for role in ("Q", "K", "V", "Out"):
        ops.update({f"SA-{role}": len(btb), f"CA-{role}": len(btb)})
    ops.update({"FF-1": len(btb), "FF-2": len(btb)})
    combine = Counter({"add": 2 * len(res) + len(st) + 3 * len(btb) + label, "matmul": 4 * len(btb)})
    units = 3 + len(res) + 2 * len(st) + 3 * len(btb) + down + up  # t-embed, conv-in, conv-out + blocks
    return ops, combine, units


def _expected_pixart(dm: nn.Module) -> tuple[Counter, Counter, int]:
    depth, micro = len(dm.blocks), bool(dm.micro_conditioning)
    ops = Counter({"adaln": 1, "patchify": 1, "t-embed": 2, "c-embed": 2, "v-embed": 4 * micro, "out-proj": 1})
    ops.update({k: depth for k in ("SA-QKV", "SA-Out", "CA-Q", "CA-KV", "CA-Out", "FF-1", "FF-2")})
    # per block: modulate ×2 (SA/FF input), matmul ×4 (QKᵀ, ·V twice), gate mul ×2, residual add ×3;
    # global: final modulation, t + size embeddings
    combine = Counter({"modulate": 2 * depth + 1, "matmul": 4 * depth, "mul": 2 * depth, "add": 3 * depth + micro})
    units = 3 * depth + 4 + micro  # SA, CA, FF per block; t-embed, c-embed, patchify, out-proj (+ size embedders)
    return ops, combine, units


def _expected_hydit(dm: nn.Module) -> tuple[Counter, Counter, int]:
    depth = len(dm.blocks)
    skip = sum(b.skip_linear is not None for b in dm.blocks)
    ops = Counter({"c-embed": 2, "pool": 4, "patchify": 1, "t-embed": 2, "v-embed": 2, "out-proj": 1,
                   "adaln": depth + 1, "skip": skip})
    ops.update({k: depth for k in ("SA-QKV", "SA-Out", "CA-Q", "CA-KV", "CA-Out", "FF-1", "FF-2")})
    # per block: norm1(x) + shift, 3 residual adds, 4 attention matmuls; global: pooler attention, t + extra,
    # final modulation
    combine = Counter({"add": 4 * depth + 1, "matmul": 4 * depth + 2, "modulate": 1})
    units = 4 * depth + skip + 5  # SA, CA, FF, modulation per block; text embedder, pooler, t-embed, patchify, out-proj
    return ops, combine, units


EXPECTED = {"sd15": _expected_unet, "sdxl": _expected_unet, "pixart": _expected_pixart, "hydit": _expected_hydit}


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("name", list(ARCH))
def test_real_architecture_graph(name, comfy_inproc, tiny_models):
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge

    mp = comfy.sd.load_diffusion_model(str(tiny_models[name]))
    dm = bridge.diffusion_model(mp)
    graph = _trace_comfy(mp, ARCH[name])
    check_graph(graph, dm)
    assert graph.meta == {"dropped_edges": 0, "unexecuted": []}
    ops, combine, n_units = EXPECTED[ARCH[name]](dm)
    assert Counter(graph.op_type_counts()) == +ops
    assert Counter(graph.combine_counts()) == +combine
    assert len(graph.units("op")) == len(graph.layers)
    assert len(graph.units("block")) == n_units
    assert "other" not in graph.op_type_counts()
    hops = {(u.category, u.hop) for u in graph.units("block") if u.category in ("cross-attn", "feedforward")}
    assert hops == {("cross-attn", 3), ("feedforward", 1)}
    # Hunyuan's AdaLN linear is a unit of its own now, so every self-attention unit is qkv → qk → av → out
    assert {u.hop for u in graph.units("block") if u.category == "self-attn"} == {3}
    back = LayerGraph.from_json(graph.to_json())
    assert back.units("block") == graph.units("block")
    assert graph.to_dot().count(" -> ") == len(graph.edges)


@pytest.mark.comfy_inproc
def test_hunyuan_long_skips(comfy_inproc):
    import comfy.ops
    import tiny_models as tm
    from comfy.ldm.hydit.models import HunYuanDiT

    dm = tm.init_params(HunYuanDiT(depth=4, hidden_size=64, num_heads=2, text_states_dim=64, text_states_dim_t5=64,
                                   operations=comfy.ops.disable_weight_init))
    kw = dict(context=torch.randn(1, 77, 64), text_embedding_mask=torch.ones(1, 77),
              encoder_hidden_states_t5=torch.randn(1, 256, 64), text_embedding_mask_t5=torch.ones(1, 256))
    graph = trace_graph(dm, lambda: dm(torch.randn(1, 4, 8, 8), torch.tensor([10.0]), **kw))
    check_graph(graph, dm)
    ops, combine, n_units = _expected_hydit(dm)
    assert ops["skip"] == 1 and Counter(graph.op_type_counts()) == +ops
    assert Counter(graph.combine_counts()) == +combine and len(graph.units("block")) == n_units
    # block 3 concatenates block 2's output with block 0's (the long skip) before skip_linear
    assert preds(graph, "blocks.3.skip_linear") == {"blocks.2/add_3", "blocks.0/add_3"}
