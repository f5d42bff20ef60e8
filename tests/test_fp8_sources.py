"""Sources in ComfyUI's own quantized formats: a legacy ``scaled_fp8`` checkpoint (ComfyUI 0.3.x loads it with its
fp8 ops; 0.33 converts it to its per-layer ``comfy_quant`` float8 format) is dequantized per layer before our
3/4-bit quantization, with the same codes and tables as quantizing the dequantized dense weights directly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file

FP8_LAYERS = ("blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2")


def _scaled_fp8_file(src, path) -> dict[str, torch.Tensor]:
    """Write ``src`` with FP8_LAYERS as scaled fp8 (per-tensor scale); returns their dense (dequantized) weights."""
    sd = load_file(str(src))
    dense = {}
    for name in FP8_LAYERS:
        w = sd[f"{name}.weight"].float()
        scale = (w.abs().max() / 448.0).reshape(())
        q = (w / scale).to(torch.float8_e4m3fn)
        sd[f"{name}.weight"] = q
        sd[f"{name}.scale_weight"] = scale
        dense[name] = q.float() * scale
    sd["scaled_fp8"] = torch.empty(0, dtype=torch.float8_e4m3fn)
    save_file(sd, str(path))
    return dense


@pytest.mark.comfy_inproc
def test_scaled_fp8_source_quantizes_like_its_dense_weights(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig, quantize_weight

    bridge.register_folders()
    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "cache")
    dense = _scaled_fp8_file(tiny_models["pixart_sigma_d1"], tmp_path / "fp8.safetensors")
    mp = comfy.sd.load_diffusion_model(str(tmp_path / "fp8.safetensors"))
    dm = bridge.diffusion_model(mp)
    formats = {n: bridge.stored_format(dm.get_submodule(n)) for n in FP8_LAYERS}
    assert all(f in ("scaled_fp8", "comfy_quant:float8_e4m3fn") or (f or "").startswith("comfy_quant:")
               for f in formats.values()), formats
    # (0.3.x stores every layer of such a model in fp8, the file's fp16 layers with scale 1: what it computes with)

    options = {"blocks.0.attn.qkv": "uaq-4", "blocks.0.mlp.fc1": "kmeans_c-3", "blocks.0.mlp.fc2": "kmeans_a-4",
               "blocks.0.attn.proj": "uaq-3"}
    qmp, summary = bridge.apply_config(mp, QuantConfig.from_options(dm, options))
    assert {k: v for k, v in summary["counts"].items() if k != "fp16"} == {"uaq-4": 1, "kmeans_c-3": 1, "kmeans_a-4": 1,
                                                                        "uaq-3": 1}
    qdm = bridge.diffusion_model(qmp)
    dtype = bridge.compute_dtype(mp)
    for name in FP8_LAYERS:
        method, bits = options[name].rsplit("-", 1)
        ref = quantize_weight(dense[name].to(dtype), method, int(bits), name=name)
        layer = qdm.get_submodule(name)
        assert torch.equal(layer.weight.codes, ref.codes) and torch.equal(layer.weight.lut, ref.lut), name
        assert layer.weight.packing.dtype == dtype
        # the dequantized fp8 weight is what was quantized, not the raw fp8 values (off by the scale)
        err = (layer.weight.dequantize(torch.float32) - dense[name]).pow(2).sum() / dense[name].pow(2).sum()
        assert err < 0.05, (name, float(err))
    # the quantized model runs, and Save → Load gives the same layers
    path = tmp_path / "q.safetensors"
    bridge.save_quantized(qmp, path)
    loaded = bridge.diffusion_model(bridge.load_quantized(path))
    for name in FP8_LAYERS:
        assert torch.equal(loaded.get_submodule(name).weight.codes, qdm.get_submodule(name).weight.codes)


@pytest.mark.comfy_inproc
def test_unreadable_stored_format_is_refused_clearly(comfy_inproc):
    from torch import nn

    from qua2sedimo.nodes import comfy_bridge as bridge

    class PackedElsewhere(torch.Tensor):  # stands in for a layout a newer comfy-kitchen adds
        pass

    layer = nn.Linear(8, 4)
    layer.quant_format = "future_w2"
    layer._parameters["weight"] = torch.zeros(4, 8).as_subclass(PackedElsewhere)
    assert bridge.stored_format(layer) == "comfy_quant:future_w2"
    with pytest.raises(ValueError, match="'blocks.9.ff' is stored in ComfyUI's quantized format 'comfy_quant:fut"):
        bridge.source_weight(layer, "blocks.9.ff", torch.float16)


@pytest.mark.comfy_inproc
def test_search_on_an_fp8_source_uses_the_dequantized_weights(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    """The search's option table holds the same codes as Apply Config on the fp8 model; its FP config computes what
    the fp8 model computes (denoise error ≈ 0 against the fp8 model's own trajectory states)."""
    import comfy.sd
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import search_jobs as jobs
    from qua2sedimo.quant import QuantConfig

    bridge.register_folders()
    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "cache")
    _scaled_fp8_file(tiny_models["pixart_sigma_d1"], tmp_path / "fp8.safetensors")
    mp = comfy.sd.load_diffusion_model(str(tmp_path / "fp8.safetensors"))
    pos, neg = tm.conditioning_for("pixart", seed=1), tm.conditioning_for("pixart", seed=2)
    ctx = jobs.prepare(mp, pos, neg, jobs.SearchSpec(n_seeds=1, n_states=2, steps=2, width=384, height=384))
    names = [la.name for la in ctx.layers]
    assert ctx.evaluate({n: "fp16" for n in names})["denoise_error"] < 1e-4
    w4 = ctx.evaluate({n: "uaq-4" for n in names})["denoise_error"]
    w3 = ctx.evaluate({n: "uaq-3" for n in names})["denoise_error"]
    assert 0 < w4 < w3 < 10
    dm = bridge.diffusion_model(mp)
    qdm = bridge.diffusion_model(bridge.apply_config(mp, QuantConfig.from_options(dm, {FP8_LAYERS[0]: "uaq-4"}))[0])
    entry = ctx.table.get(FP8_LAYERS[0], "uaq-4")
    assert torch.equal(entry.codes, qdm.get_submodule(FP8_LAYERS[0]).weight.codes)
