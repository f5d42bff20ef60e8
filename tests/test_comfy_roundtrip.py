"""Apply a mixed config → sample → save → load → sample, on the real ComfyUI host, five architectures."""

from __future__ import annotations

import random

import pytest
import torch

ARCH = {"sd15_tiny": "sd15", "sdxl_vega_narrow": "sdxl", "pixart_alpha_d1": "pixart",
        "pixart_sigma_d1": "pixart", "hydit_tiny": "hydit"}
LATENT = {"pixart": 48}


def _sample(mp, arch: str, seed: int = 0):
    import comfy.sample
    import tiny_models as tm

    side = LATENT.get(arch, 8)
    latent = torch.zeros(1, 4, side, side)
    noise = comfy.sample.prepare_noise(latent, seed)
    pos, neg = tm.conditioning_for(arch, seed=1), tm.conditioning_for(arch, seed=2)
    return comfy.sample.sample(mp, noise, 2, 3.0, "euler", "normal", pos, neg, latent, seed=seed,
                               disable_pbar=True)


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("name", list(ARCH))
def test_mixed_config_round_trip(name, comfy_inproc, tiny_models, tmp_path):
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import OPTIONS, QuantConfig, quantizable_layers
    from qua2sedimo.quant.accounting import dtype_bits

    bridge.register_folders()
    mp = comfy.sd.load_diffusion_model(str(tiny_models[name]))
    dm = bridge.diffusion_model(mp)
    layers = quantizable_layers(dm)
    # a mixed 3/4-bit config over every option, on 18 layers (quantizing all of them with all six
    # options costs minutes on CPU; the option table is the same code either way)
    rng = random.Random(0)
    chosen = rng.sample([la.name for la in layers[1:-1]], 18 if len(layers) > 24 else len(layers) - 2)
    cfg = QuantConfig.from_options(dm, {n: OPTIONS[i % len(OPTIONS)] for i, n in enumerate(chosen)})
    before = {k: v.clone() for k, v in dm.state_dict().items()}

    qmp, summary = bridge.apply_config(mp, cfg)
    assert summary["bytes_after"] < summary["bytes_before"]
    assert all(torch.equal(before[k], v) for k, v in dm.state_dict().items()), "input MODEL was mutated"
    img1 = _sample(qmp, ARCH[name])
    assert torch.isfinite(img1).all()

    path = tmp_path / "q.safetensors"
    header = bridge.save_quantized(qmp, path)
    assert sum(i["option"] != "fp16" for i in header["layers"].values()) == len(chosen)
    loaded = bridge.load_quantized(path)
    assert type(loaded.model.model_config) is type(mp.model.model_config)
    img2 = _sample(loaded, ARCH[name])
    assert torch.equal(img1, img2), "sampling after save/load differs"

    # file size = packed accounting of the quantized layers + every other tensor (within 1 %)
    qdm = bridge.diffusion_model(qmp)
    quant_names = {n for n, o in cfg.options.items() if o != "fp16"}
    other = sum(v.numel() * v.element_size() for k, v in before.items()
                if k.rsplit(".", 1)[0] not in quant_names or not k.endswith(".weight"))
    packed = cfg.nbytes("stored") - sum(la.numel * dtype_bits(la.dtype) // 8 for la in layers
                                        if la.name not in quant_names)
    expected = packed + other
    assert abs(path.stat().st_size - expected) / expected < 0.01
    assert qdm is not dm
