"""diffusers denoisers through the library API: tiny random-weight DiT (class-conditional, DiT-XL/2's architecture
at small width), PixArt and SD-style U-Net built from configs here (nothing downloaded).

Apply → the forward equals the dequantized dense model's; save → load → identical outputs with packed layers; the
layer classification of each model (counts written out below); a short search, the report and the command line's
``--diffusers``; the README's five-line example as written.
"""

from __future__ import annotations

import copy
import json
import re
from collections import Counter
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers", reason="diffusers is not installed (pip install 'qua2sedimo[diffusers]')")

from diffusers import (  # noqa: E402
    DDIMScheduler,
    DiTTransformer2DModel,
    PixArtTransformer2DModel,
    UNet2DConditionModel,
)

from qua2sedimo.quant import QuantConfig, quantize_  # noqa: E402
from qua2sedimo.quant.layer_table import is_quantized_layer, quantizable_layers  # noqa: E402
from qua2sedimo.quant.packed import PackedWeight  # noqa: E402
from qua2sedimo.search import diffusers_adapter as da  # noqa: E402
from qua2sedimo.search.graph import layer_table  # noqa: E402
from qua2sedimo.search.sampling import config_key  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("dit", "pixart", "unet")


def build(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if name == "dit":
        return DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                     num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    if name == "pixart":
        return PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8,
                                        num_layers=2, cross_attention_dim=16, caption_channels=12, sample_size=8,
                                        patch_size=2).eval()
    return UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=16,
                                attention_head_dim=2, norm_num_groups=4).eval()


def conditioning(name: str, batch: int = 2) -> dict:
    g = torch.Generator().manual_seed(1)
    if name == "dit":
        return {"class_labels": torch.tensor([1, 7])[:batch]}
    if name == "pixart":
        return {"encoder_hidden_states": torch.randn(batch, 5, 12, generator=g),
                "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}
    return {"encoder_hidden_states": torch.randn(batch, 5, 16, generator=g)}


def forward(model: torch.nn.Module, name: str) -> torch.Tensor:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 8, 8, generator=g)
    with torch.no_grad():
        return da.denoise_fn(model)(x, torch.tensor([50, 700]), **conditioning(name))


def mixed_config(model: torch.nn.Module) -> QuantConfig:
    """Every method at 3 and 4 bits, round robin, and a few layers left fp16."""
    cycle = ("uaq-4", "kmeans_c-3", "kmeans_a-4", "uaq-3", "kmeans_c-4", "fp16", "kmeans_a-3")
    names = [la.name for la in quantizable_layers(model)]
    return QuantConfig.from_options(model, {n: cycle[i % len(cycle)] for i, n in enumerate(names)})


# Block category → layers, per model. No layer of a repeated block may be "other".
EXPECTED = {
    # patch embedding; per block: its own timestep embedder (2) + norm1.linear = modulation, q/k/v/out, ff 2;
    # proj_out_1 (final adaLN) and proj_out_2 (final linear) are the out-projection.
    "dit": {"patchify": 1, "modulation": 6, "self-attn": 8, "feedforward": 4, "out-proj": 2},
    # adaln_single: timestep embedder (2) + its linear; caption projection (2); per block SA 4, CA 4, FF 2
    "pixart": {"patchify": 1, "t-embed": 3, "c-embed": 2, "self-attn": 8, "cross-attn": 8, "feedforward": 4,
               "out-proj": 1},
    # 4 Transformer2DModels (down 0, up 1 ×2, mid): proj_in/out, SA 4, CA 4, ff 2 each; 8 resnets (down 1 + 1,
    # up 2 + 2, mid 2: conv1/2 + time projection, 5 with a shortcut); a downsampler and an upsampler
    "unet": {"conv-in": 1, "t-embed": 2, "transformer-proj": 8, "self-attn": 16, "cross-attn": 16,
             "feedforward": 8, "resblock": 8 * 3 + 5, "sample": 2, "conv-out": 1},
}


@pytest.mark.parametrize("name", MODELS)
def test_layer_classification(name):
    table = layer_table(build(name))
    assert dict(Counter(n.block_category for n in table)) == EXPECTED[name]
    assert not [n.name for n in table if n.block and n.block_category == "other"]
    ops = {n.name.split("transformer_blocks.0.", 1)[-1]: n.op_type for n in table if "transformer_blocks.0." in n.name}
    assert ops["attn1.to_q"] == "SA-Q" and ops["attn1.to_out.0"] == "SA-Out"
    assert ops["ff.net.0.proj"] == "FF-1" and ops["ff.net.2"] == "FF-2"
    if name != "dit":
        assert ops["attn2.to_k"] == "CA-K"


@pytest.mark.parametrize("name", MODELS)
def test_apply_equals_dequantized_dense(name):
    model = build(name)
    fp = forward(model, name)
    q = copy.deepcopy(model)
    config = mixed_config(q)
    quantize_(q, config)
    dense = copy.deepcopy(model)
    n_quantized = 0
    for la in quantizable_layers(q):
        mod = q.get_submodule(la.name)
        if is_quantized_layer(mod):
            dense.get_submodule(la.name).weight.data = mod.dequantized_weight()
            n_quantized += 1
    assert n_quantized == sum(o != "fp16" for o in config.options.values()) > 0
    out = forward(q, name)
    torch.testing.assert_close(out, forward(dense, name), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(out, fp, atol=1e-4)  # the quantization did change the outputs


@pytest.mark.parametrize("name", MODELS)
def test_save_load_identical(name, tmp_path):
    q = build(name)
    config = mixed_config(q)
    quantize_(q, config)
    path = tmp_path / "q.safetensors"
    da.save_quantized(q, path, config)
    built_on: list[str] = []  # where the model's layers are allocated while loading: meta only, no dense copy
    init = torch.nn.Linear.reset_parameters

    def record(self):
        built_on.append(self.weight.device.type)
        init(self)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(torch.nn.Linear, "reset_parameters", record)
        loaded = da.load_quantized(path)
    assert built_on and set(built_on) == {"meta"}
    assert type(loaded) is type(q)
    for n, o in config.options.items():
        assert isinstance(loaded.get_submodule(n).weight, PackedWeight) == (o != "fp16")
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    assert loaded.qua2sedimo_config.options == config.options
    assert torch.equal(forward(loaded, name), forward(q, name))


def test_load_refuses_a_file_without_diffusers_header(tmp_path):
    from qua2sedimo.quant.format import save_quantized_file

    q = build("dit")
    quantize_(q, QuantConfig.uniform(q, "uaq-4"))
    save_quantized_file(tmp_path / "q.safetensors", q.state_dict(), {"layers": {}})
    with pytest.raises(ValueError, match="not saved from a diffusers model"):
        da.load_quantized(tmp_path / "q.safetensors")


def test_unknown_conditioning_is_named():
    with pytest.raises(ValueError, match="'prompt_embeds'.*does not take"):
        da.prepare_search(build("dit"), DDIMScheduler(), {"prompt_embeds": torch.zeros(1, 3)})


def _uniform_bits(model, option: str) -> float:
    return QuantConfig.uniform(model, option).avg_bits()


@pytest.mark.parametrize("name", ["dit", "pixart"])
def test_search_and_report(name, tmp_path):
    model = build(name)
    before = forward(model, name)
    negative = {"class_labels": torch.tensor([10, 10])} if name == "dit" else None  # DiT's null class: CFG
    spec = da.DiffusersSpec(steps=3, n_states=4, n_seeds=2, options=("uaq-3", "uaq-4"),
                            guidance_scale=1.0 if negative is None else 2.0)
    cond = conditioning(name)
    ctx = da.prepare_search(model, DDIMScheduler(), cond, spec=spec, negative=negative)
    assert len(ctx.states) == 4 and ctx.evaluate({la.name: "fp16" for la in ctx.layers})["denoise_error"] < 1e-10
    journal = tmp_path / "j.sqlite"
    res = da.run_diffusers_search(ctx, journal, max_configs=10)
    assert (res.status, res.done, res.new) == ("done", 10, 10)
    assert torch.equal(forward(model, name), before)  # the model's own layers are back
    target = (_uniform_bits(model, "uaq-3") + _uniform_bits(model, "uaq-4")) / 2
    analysis = da.analyse(ctx, journal, targets=(target,), folds=2, epochs=20)
    assert not any(is_quantized_layer(m) for m in model.modules())
    knap = analysis.configs[f"knapsack op @ {target:g} bits"]
    assert knap.avg_bits() <= target + 1e-9
    sources = Counter(r.source for r in analysis.records)
    assert sources["random"] == 10 and sum(n for s, n in sources.items() if s.startswith("constructed")) >= 1
    keys = {r.config_key for r in analysis.records}  # the uniform baselines (unless a construction was one)
    assert all(config_key({la.name: o for la in ctx.layers}) in keys for o in ("uaq-3", "uaq-4"))
    data = analysis.report.to_json()
    assert data["evaluated"] == 10 and data["constructed"]
    assert {la.name for la in analysis.graph.layers} == set(knap.options)


def test_cli_diffusers_folder(tmp_path, capsys):
    from qua2sedimo.nodes.cli import main

    folder = tmp_path / "dit"
    build("dit").save_pretrained(folder / "transformer")
    DDIMScheduler().save_pretrained(folder / "scheduler")
    model = build("dit")
    target = (_uniform_bits(model, "uaq-3") + _uniform_bits(model, "uaq-4")) / 2
    args = ["search", "--diffusers", str(folder), "--class-labels", "1,7", "--journal", str(tmp_path / "j.sqlite"),
            "--configs", "10", "--steps", "3", "--n-states", "4", "--report", str(tmp_path / "report"),
            "--target-bits", f"{target:.4f}"]
    assert main(args) == 0
    summary = json.loads(capsys.readouterr().out)
    assert (summary["status"], summary["done"], summary["model"]) == ("done", 10, "DiTTransformer2DModel")
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["evaluated"] == 10
    configs = [QuantConfig.load(p, model=model) for p in summary["report"]["configs"]]
    assert len(configs) == 2 and min(c.avg_bits() for c in configs) <= target
    assert main(args) == 0  # resumes: nothing new to evaluate
    assert json.loads(capsys.readouterr().out)["new"] == 0
    with pytest.raises(SystemExit, match="--diffusers runs the denoise_error objective"):
        main(["search", "--diffusers", str(folder), "--prompt", "a cat", "--journal", str(tmp_path / "k.sqlite")])


def test_readme_example_runs_as_written(tmp_path, monkeypatch):
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    section = text.split("## Python / diffusers", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert len(code.strip().splitlines()) == 5
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    model = scope["model"]
    assert (tmp_path / "dit-w4.safetensors").exists()
    assert all(isinstance(model.get_submodule(n).weight, PackedWeight) for n in scope["config"].options)


def test_only_the_adapter_imports_diffusers():
    hits = [p.relative_to(ROOT).as_posix() for d in ("quant", "search", "nodes") for p in (ROOT / d).rglob("*.py")
            if re.search(r"^\s*(?:import diffusers|from diffusers)", p.read_text(encoding="utf-8"), re.M)]
    assert hits == ["search/diffusers_adapter.py"]


def test_search_folder_takes_the_journal_lock_before_loading(tmp_path):
    """A journal another search writes fails at once, before the folder is even read (defect 9's rule for the
    diffusers path): with the lock held elsewhere a missing folder is not what is reported."""
    from qua2sedimo.search.diffusers_adapter import search_folder
    from qua2sedimo.search.journal import JournalLocked
    from qua2sedimo.search.journal_file import JournalFile

    journal = tmp_path / "busy.sqlite"
    other = JournalFile(journal)
    other.acquire_lock()
    try:
        with pytest.raises(JournalLocked):
            search_folder(tmp_path / "no-such-folder", journal, class_labels="1")
    finally:
        other.release_lock()
    with pytest.raises(ValueError, match="not a diffusers folder"):
        search_folder(tmp_path / "no-such-folder", journal, class_labels="1")
