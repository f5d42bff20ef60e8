"""Smoke tests of the test bed itself: the real ComfyUI host, the tiny models, the test node pack."""

from __future__ import annotations

import re

import pytest
import tiny_models as tm

# ------------------------------------------------------------------------------------- in-process


@pytest.mark.comfy_inproc
@pytest.mark.parametrize("name", tm.DEFAULT_MODELS)
def test_tiny_model_detected_and_samples(name, comfy_inproc, tiny_models):
    import comfy.sample
    import comfy.sd
    import torch

    spec = tm.SPECS[name]
    mp = comfy.sd.load_diffusion_model(str(tiny_models[name]))
    assert type(mp.model.model_config).__name__ == spec.cls
    assert type(mp.model).__name__ == spec.model_base
    # the TAESD the graphs use must match the latent format
    assert type(mp.model.latent_format).__name__ == {"taesd": "SD15", "taesdxl": "SDXL"}[spec.vae]

    latent = torch.zeros(1, 4, spec.latent_px, spec.latent_px)
    noise = comfy.sample.prepare_noise(latent, 0)
    out = comfy.sample.sample(mp, noise, 2, 4.0, "euler", "normal",
                              tm.conditioning_for(spec.arch, 1), tm.conditioning_for(spec.arch, 2),
                              latent, seed=0, disable_pbar=True)
    assert out.shape == latent.shape
    assert torch.isfinite(out).all()
    assert out.abs().sum() > 0


@pytest.mark.comfy_inproc
def test_folder_paths_point_at_base(comfy_inproc, tiny_models):
    import folder_paths

    listed = {n.rsplit(".", 1)[0] for n in folder_paths.get_filename_list("diffusion_models")}
    assert set(tm.DEFAULT_MODELS) <= listed
    assert folder_paths.get_output_directory() == str(comfy_inproc.base / "output")


# ----------------------------------------------------------------------------------------- server


@pytest.mark.comfy_server
def test_server_loads_our_packs(comfy_server):
    info = comfy_server.object_info()
    assert "Qua2SeDiMoTestConditioning" in info
    arch = info["Qua2SeDiMoTestConditioning"]["input"]["required"]["arch"]
    assert set(tm.ARCHES) <= set(arch[1]["options"] if len(arch) > 1 and "options" in arch[1] else arch[0])

    log = comfy_server.log_text()
    for pack in ("qua2sedimo", "qua2sedimo_testnodes"):
        errors = comfy_server.custom_node_errors(pack)
        assert not errors, f"custom node pack {pack} failed to load:\n{errors}"
        # and it was actually tried (ComfyUI lists every pack in its import-time summary)
        assert re.search(rf"seconds: .*custom_nodes[/\\]{pack}\s*$", log, re.M), comfy_server.log_tail(80)
    failed = [ln for ln in comfy_server.import_failures() if "qua2sedimo" in ln]
    assert not failed, "\n".join(failed) + "\n" + comfy_server.log_tail(80)


def _graph(model: str, arch: str, vae: str, px: int, prefix: str) -> dict:
    return {
        "1": {"class_type": "UNETLoader",
              "inputs": {"unet_name": f"{model}.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "Qua2SeDiMoTestConditioning", "inputs": {"arch": arch, "seed": 1}},
        "3": {"class_type": "Qua2SeDiMoTestConditioning", "inputs": {"arch": arch, "seed": 2}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": px, "height": px, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "seed": 0, "steps": 2, "cfg": 4.0, "sampler_name": "euler",
            "scheduler": "normal",
            "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0], "denoise": 1.0}},
        "6": {"class_type": "VAELoader", "inputs": {"vae_name": vae}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["6", 0]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": prefix}},
    }


@pytest.mark.comfy_server
@pytest.mark.parametrize("name", ["sd15_tiny", "pixart_sigma_d1"])
def test_server_samples_tiny_model(comfy_server, name):
    from PIL import Image

    spec = tm.SPECS[name]
    entry = comfy_server.run(_graph(name, spec.arch, spec.vae, spec.image_px, f"host_{name}"), timeout=240)
    assert entry["status"]["status_str"] == "success"
    images = comfy_server.saved_images(entry, "8")
    assert len(images) == 1 and images[0].is_file(), entry["outputs"]
    with Image.open(images[0]) as im:
        assert im.size == (spec.image_px, spec.image_px)
