"""LoRA, merges and offloading on a quantized MODEL, through ComfyUI's own loaders and model patcher.

The reference for every image is the *dequantized* model — the same layers with their packed weights replaced by the
dense weights they decode to — given the same LoRA by ComfyUI's normal dense patching. A LoRA on the quantized model
is applied without re-quantizing: as a low-rank branch next to the LUT GEMM (plain LoRAs) or on the dequantized
weight in the forward pass (everything else, and ComfyUI's low-VRAM mode).
"""

from __future__ import annotations

import pytest
import torch

ALL = ("sd15_tiny", "sdxl_vega_narrow", "pixart_alpha_d1", "pixart_sigma_d1", "hydit_tiny", "wan21_tiny",
       "wan22_tiny", "sd3_tiny", "sd35_tiny", "hunyuan_video_tiny", "flux_dev_tiny", "flux_schnell_tiny")


def _close(got: torch.Tensor, ref: torch.Tensor) -> None:
    """Equal within float tolerance, relative to the latents' scale (un-normalised latents reach ~1e4; two float32
    computations of one image in another summation order differ by ~1e-6 of that)."""
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


def _differ(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).norm() / b.norm()) > 1e-3


def _version() -> str:
    import comfy_host

    return comfy_host.host_version()


def _load(comfy_inproc, name):
    import comfy.sd
    import tiny_models as tm

    from qua2sedimo.nodes import comfy_bridge as bridge

    spec = tm.SPECS[name]
    if not spec.available_on(_version()):
        pytest.skip(f"{name}: ComfyUI {_version()}'s detection fixes this architecture's width")
    bridge.register_folders()
    files = tm.ensure_models(comfy_inproc.base / "models", [name])
    mp = comfy.sd.load_diffusion_model(str(files[f"diffusion_models/{name}.safetensors"]))
    return mp, spec


def _mixed_config(dm):
    """All six options over every Linear layer and two Conv2d layers (the UNets' other convolutions stay dense: they
    only make the CPU test slower, the conv path is the same)."""
    from qua2sedimo.quant import OPTIONS, QuantConfig, quantizable_layers

    layers = quantizable_layers(dm)
    names = [la.name for la in layers if la.kind == "linear"] + [la.name for la in layers if la.kind == "conv2d"][:2]
    return QuantConfig.from_options(dm, {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(names)})


def _dequantized_twin(mp, cfg):
    """An independent quantized copy of ``mp`` whose packed weights are replaced by their dense decoding."""
    from torch import nn

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant.packed import PackedWeight

    twin, _ = bridge.apply_config(mp, cfg)
    for module in bridge.diffusion_model(twin).modules():
        if isinstance(getattr(module, "weight", None), PackedWeight):
            module.weight = nn.Parameter(module.weight.dequantize(), requires_grad=False)
    return twin


def _lora(dm, cfg, rank: int = 4, seed: int = 0) -> dict:
    """A random LoRA (ComfyUI's generic key format) on every quantized layer, Linear and Conv2d, with an alpha."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, option in cfg.options.items():
        if option == "fp16":
            continue
        w = dm.get_submodule(name).weight
        scale = 0.5 / max(1.0, float(w.shape[1]) ** 0.5)
        up_shape = (w.shape[0], rank, *([1] * (w.dim() - 2)))
        out[f"diffusion_model.{name}.lora_up.weight"] = torch.randn(up_shape, generator=g) * scale
        out[f"diffusion_model.{name}.lora_down.weight"] = torch.randn(rank, *w.shape[1:], generator=g) * scale
        out[f"diffusion_model.{name}.alpha"] = torch.tensor(float(rank) / 2)
    return out


def _sample(bridge, model, spec, seed=3):
    import tiny_models as tm

    pos, neg = tm.conditioning_for(spec.arch, seed=1), tm.conditioning_for(spec.arch, seed=2)
    return bridge.sample_latents(model, pos, neg, seed=seed, steps=1, cfg=1.0, sampler_name="euler",
                                 scheduler="normal", width=spec.image_px, height=spec.image_px)


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("name", ALL)
def test_lora_on_quantized_matches_the_dequantized_model(comfy_inproc, tmp_path, monkeypatch, name):
    """Strengths 0, 0.5, 1 on the low-rank branch, strength 1 on the dequantize-and-patch path: the image equals
    the dequantized model's with the same LoRA patched densely by ComfyUI."""
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge

    mp, spec = _load(comfy_inproc, name)
    cfg = _mixed_config(bridge.diffusion_model(mp))
    qmp, _ = bridge.apply_config(mp, cfg)
    twin = _dequantized_twin(mp, cfg)
    lora = _lora(bridge.diffusion_model(mp), cfg)
    got = {}
    for strength in (0.0, 0.5, 1.0):
        lq, _ = comfy.sd.load_lora_for_models(qmp, None, lora, strength, 0.0)
        ld, _ = comfy.sd.load_lora_for_models(twin, None, lora, strength, 0.0)
        assert len(lq.patches) == len(ld.patches) == sum(o != "fp16" for o in cfg.options.values())
        got[strength] = _sample(bridge, lq, spec)
        _close(got[strength], _sample(bridge, ld, spec))
    monkeypatch.setenv(bridge.LORA_PATH_ENV, "dequant")
    lq, _ = comfy.sd.load_lora_for_models(qmp, None, lora, 1.0, 0.0)
    _close(_sample(bridge, lq, spec), got[1.0])
    assert _differ(got[1.0], got[0.0]) and _differ(got[0.5], got[0.0]), "the LoRA must change the image"
    assert torch.equal(got[0.0], _sample(bridge, qmp, spec))  # strength 0, and the model is left as it was


def _force_load_budget(monkeypatch, budget: int) -> None:
    """Make ComfyUI load models with ``budget`` bytes of device memory (partial loading / low-VRAM on a CPU)."""
    import comfy.model_management as mm

    real = mm.LoadedModel.model_load

    def model_load(self, lowvram_model_memory=0, force_patch_weights=False):
        return real(self, budget, force_patch_weights)

    monkeypatch.setattr(mm.LoadedModel, "model_load", model_load)
    mm.unload_all_models()


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("name", ["sd15_tiny", "pixart_sigma_d1"])
def test_partial_and_novram_loading_with_a_lora(comfy_inproc, tmp_path, monkeypatch, name):
    """ComfyUI's partial loading (half the model fits) and its no-VRAM mode (nothing fits): the low-VRAM layers get
    ComfyUI's own LoRA weight functions, applied to the dequantized weight; images equal the fully loaded model's."""
    import comfy.model_management as mm
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant.packed import PackedWeight

    mp, spec = _load(comfy_inproc, name)
    cfg = _mixed_config(bridge.diffusion_model(mp))
    qmp, _ = bridge.apply_config(mp, cfg)
    lq, _ = comfy.sd.load_lora_for_models(qmp, None, _lora(bridge.diffusion_model(mp), cfg), 1.0, 0.0)
    mm.unload_all_models()
    full, plain = _sample(bridge, lq, spec), _sample(bridge, qmp, spec)
    for budget in (lq.model_size() // 2, 1):
        _force_load_budget(monkeypatch, budget)
        got = _sample(bridge, lq, spec)
        modules = list(bridge.diffusion_model(lq).modules())
        lowvram = [m for m in modules if isinstance(getattr(m, "weight", None), PackedWeight) and m.weight_function]
        assert lq.model.model_lowvram and lowvram, "the partial-load path must have been taken"
        _close(got, full)
        torch.testing.assert_close(_sample(bridge, qmp, spec), plain, rtol=0, atol=0)
    mm.unload_all_models()


@pytest.mark.comfy_inproc
def test_merge_and_bypass_lora_on_a_quantized_model(comfy_inproc, tmp_path, monkeypatch):
    """A model merge (dense weights as patches) and, where ComfyUI has it, 'Load LoRA (Bypass)' (a forward
    injection, our packed layer's forward wrapped) on a quantized MODEL equal the dequantized model's."""
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge

    mp, spec = _load(comfy_inproc, "pixart_sigma_d1")
    cfg = _mixed_config(bridge.diffusion_model(mp))
    qmp, _ = bridge.apply_config(mp, cfg)
    twin = _dequantized_twin(mp, cfg)
    patches = mp.get_key_patches("diffusion_model.")  # ModelMergeSimple(quantized, dense, ratio 0.3)
    merged_q, merged_d = qmp.clone(), twin.clone()
    for m in (merged_q, merged_d):
        for key, value in patches.items():
            m.add_patches({key: value}, 0.7, 0.3)
    _close(_sample(bridge, merged_q, spec), _sample(bridge, merged_d, spec))
    if hasattr(comfy.sd, "load_bypass_lora_for_models"):
        lora = _lora(bridge.diffusion_model(mp), cfg)
        bq, _ = comfy.sd.load_bypass_lora_for_models(qmp, None, lora, 1.0, 0.0)
        ld, _ = comfy.sd.load_lora_for_models(twin, None, lora, 1.0, 0.0)
        _close(_sample(bridge, bq, spec), _sample(bridge, ld, spec))


@pytest.mark.comfy_inproc
def test_saving_a_quantized_model_with_a_lora_is_refused(comfy_inproc, tmp_path, monkeypatch):
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge

    mp, _ = _load(comfy_inproc, "pixart_sigma_d1")
    cfg = _mixed_config(bridge.diffusion_model(mp))
    qmp, _ = bridge.apply_config(mp, cfg)
    lq, _ = comfy.sd.load_lora_for_models(qmp, None, _lora(bridge.diffusion_model(mp), cfg), 1.0, 0.0)
    with pytest.raises(ValueError, match="carries LoRA or other weight patches"):
        bridge.save_quantized(lq, tmp_path / "q.safetensors")
    assert not (tmp_path / "q.safetensors").exists()
    bridge.save_quantized(qmp, tmp_path / "q.safetensors")
