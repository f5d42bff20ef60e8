"""The example workflows against the real ComfyUI server: served as templates, convertible by the frontend's
rules to their API twins, and run over HTTP (apply → sample, mixed → save, load → sample, load → LoRA → sample)
with clear errors."""

from __future__ import annotations

import json
import os
import re
import urllib.parse

import pytest
import workflow_api as wa

# the file stems are the titles ComfyUI's template browser shows; the numbers give their order
STEMS = ["1. Quantize W4 and sample", "2. Mixed bits and save", "3. Sample a quantized file",
         "4. LoRA on quantized model", "5. Search in background", "6. Search report and build"]
LORA_STEM = STEMS[3]


def _texts(entry: dict) -> list[str]:
    return [t for out in (entry.get("outputs") or {}).values() for t in out.get("text", [])]


def _saved_quantized(entry: dict) -> str:
    for text in _texts(entry):
        m = re.match(r"saved (\S+\.safetensors) ", text)
        if m:
            return m.group(1)
    raise AssertionError(f"no Save Quantized output in {_texts(entry)}")


def test_workflows_are_ui_format_and_twins_exist():
    flows = wa.ui_workflows()
    assert sorted(flows) == sorted(STEMS)
    for stem, ui in flows.items():
        assert {"nodes", "links", "version"} <= set(ui), stem
        ids = {n["id"] for n in ui["nodes"]}
        for link in ui["links"]:
            assert link[1] in ids and link[3] in ids, f"{stem}: dangling link {link}"
        assert any(n["type"].startswith("Qua2SeDiMo") for n in ui["nodes"])
        wa.twin(stem)


# loader node → (index of its model widget, the models folder ComfyUI's Missing Models dialog checks)
MODEL_WIDGETS = {"CheckpointLoaderSimple": (0, "checkpoints"), "CLIPLoader": (0, "text_encoders"),
                 "VAELoader": (0, "vae"), "UNETLoader": (0, "diffusion_models")}


def test_templates_have_titles_thumbnails_and_models():
    """What the template browser shows: the stem is the title (numbered: the order), a square JPEG thumbnail beside
    it, and every public model a loader names listed with its download URL in the node's properties.models."""
    from PIL import Image

    assert STEMS == sorted(STEMS) and [s.split(". ", 1)[0] for s in STEMS] == [str(i + 1) for i in range(len(STEMS))]
    for stem in STEMS:
        assert len(stem) <= 28, f"{stem!r}: longer titles are cut off in the template browser"
        thumb = wa.UI_DIR / f"{stem}.jpg"
        assert thumb.is_file(), f"{thumb} is missing (QUA2SEDIMO_WRITE_THUMBNAILS=1 on tests/test_browser.py)"
        assert thumb.stat().st_size < 40_000, f"{thumb}: keep thumbnails small"
        with Image.open(thumb) as img:
            assert img.format == "JPEG" and img.width == img.height >= 256, (thumb, img.format, img.size)
        for node in wa.ui_workflows()[stem]["nodes"]:
            if node["type"] not in MODEL_WIDGETS:
                continue
            index, folder = MODEL_WIDGETS[node["type"]]
            models = node.get("properties", {}).get("models")
            assert models, f"{stem}: {node['type']} #{node['id']} has no properties.models"
            (model,) = models
            assert model["name"] == node["widgets_values"][index] and model["directory"] == folder, (stem, model)
            assert model["url"].startswith("https://huggingface.co/") and model["url"].endswith("/" + model["name"])


def test_readme_lists_the_shipped_workflows():
    readme = (wa.REPO / "README.md").read_text()
    section = readme.split("## Example workflows", 1)[1].split("\n## ", 1)[0]
    listed = re.findall(r"^\| `([^`]+)\.json` \|", section, re.M)
    assert listed == STEMS, listed
    words = ["one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]
    assert f"holds {words[len(STEMS) - 1]} UI-format workflows" in section


@pytest.mark.comfy_server
def test_templates_are_served(comfy_server):
    listed = comfy_server.get("/workflow_templates")
    assert sorted(listed.get("qua2sedimo", [])) == sorted(STEMS), listed
    for stem in STEMS:
        served = comfy_server.get(f"/api/workflow_templates/qua2sedimo/{urllib.parse.quote(stem)}.json")
        assert served == wa.ui_workflows()[stem]
        thumb = comfy_server.request("GET", f"/api/workflow_templates/qua2sedimo/{urllib.parse.quote(stem)}.jpg")
        assert thumb == (wa.UI_DIR / f"{stem}.jpg").read_bytes()


@pytest.mark.comfy_server
@pytest.mark.parametrize("stem", STEMS)
def test_ui_workflow_converts_to_its_twin(stem, comfy_server):
    api = wa.to_testbed(wa.ui_to_api(wa.ui_workflows()[stem], comfy_server.object_info()), **wa.TWIN_MODEL)
    if os.environ.get("QUA2SEDIMO_WRITE_TWINS"):
        wa.TWIN_DIR.mkdir(exist_ok=True)
        (wa.TWIN_DIR / f"{stem}.json").write_text(json.dumps(api, indent=2) + "\n")
    assert api == wa.twin(stem), f"tests/workflows_api/{stem}.json is stale (QUA2SEDIMO_WRITE_TWINS=1 rewrites it)"


@pytest.mark.comfy_server
def test_example_workflows_run_over_http(comfy_server):
    import numpy as np
    from PIL import Image

    # (a) uniform W4 → apply → sample → save image
    entry = comfy_server.run(wa.twin(STEMS[0]))
    (img_a,) = comfy_server.saved_images(entry)
    arr = np.asarray(Image.open(img_a))
    assert arr.shape == (384, 384, 3) and arr.std() > 0
    assert any(t.startswith("b̄ = 4.") for t in _texts(entry)), _texts(entry)

    # (b) mixed 3/4-bit rules config → apply → save quantized (+ config)
    entry = comfy_server.run(wa.twin(STEMS[1]))
    texts = _texts(entry)
    rel = _saved_quantized(entry)
    qfile = comfy_server.base / "output" / rel
    assert qfile.stat().st_size > 0
    assert any("kmeans_c-3" in t and "uaq-4" in t for t in texts), texts  # it really is mixed
    saved_cfg = [t for t in texts if t.startswith("saved mixed")]
    assert saved_cfg and (comfy_server.base / "models" / "qua2sedimo" / saved_cfg[0].split()[1].rstrip(":")).exists()

    # (c) load the quantized file (listed without a restart) → sample
    listed = comfy_server.object_info("Qua2SeDiMoLoadQuantized")["input"]["required"]
    assert rel in listed["file"][1]["options"]
    graph = wa.to_testbed(wa.twin(STEMS[2]), **{**wa.TWIN_MODEL, "quantized_file": rel})
    entry = comfy_server.run(graph)
    (img_c,) = comfy_server.saved_images(entry)
    assert np.asarray(Image.open(img_c)).shape == (384, 384, 3)
    info = json.loads(next(t for t in _texts(entry) if t.startswith("{")))
    assert info["model"] == "PixArt" and 3.0 < info["avg_bits"] < 4.5

    # (d) the same file → ComfyUI's LoraLoaderModelOnly → sample: strength 0 gives (c)'s image, 1 changes it
    import torch
    from safetensors.torch import save_file

    lora_dir = comfy_server.base / "models" / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    save_file({"diffusion_model.blocks.0.mlp.fc2.lora_up.weight": torch.randn(1152, 4, generator=g) * 0.1,
               "diffusion_model.blocks.0.mlp.fc2.lora_down.weight": torch.randn(4, 4608, generator=g) * 0.1},
              str(lora_dir / "workflow_lora.safetensors"))
    graph = wa.to_testbed(wa.twin(LORA_STEM), **{**wa.TWIN_MODEL, "quantized_file": rel})
    (lora_id,) = [k for k, n in graph.items() if n["class_type"] == "LoraLoaderModelOnly"]
    graph[lora_id]["inputs"]["lora_name"] = "workflow_lora.safetensors"
    images = {}
    for strength in (0.0, 1.0):
        graph[lora_id]["inputs"]["strength_model"] = strength
        (img,) = comfy_server.saved_images(comfy_server.run(graph))
        images[strength] = np.asarray(Image.open(img)).astype(np.int16)
    assert images[1.0].shape == (384, 384, 3)
    assert np.array_equal(images[0.0], np.asarray(Image.open(img_c)).astype(np.int16))
    assert np.abs(images[1.0] - images[0.0]).mean() > 0.1, "the LoRA must change the image"


@pytest.mark.comfy_server
def test_errors_are_clear_over_http(comfy_server):
    import torch
    from comfy_host import ComfyServerError
    from safetensors.torch import save_file

    from qua2sedimo.quant.atomic import atomic_write_text

    base = comfy_server.base
    # a config made for another model (sd15) applied to the PixArt model
    graph = wa.twin(STEMS[0])
    other = {"1": {"class_type": "UNETLoader", "inputs": {"unet_name": "sd15_tiny.safetensors",
                                                          "weight_dtype": "default"}},
             "2": {"class_type": "Qua2SeDiMoUniformConfig", "inputs": {"model": ["1", 0], "option": "uaq-4",
                                                                      "keep": ""}},
             "3": {"class_type": "Qua2SeDiMoSaveConfig", "inputs": {"config": ["2", 0],
                                                                   "filename_prefix": "sd15-other"}}}
    entry = comfy_server.run(other)
    cfg_name = next(t for t in _texts(entry) if t.startswith("saved ")).split()[1].rstrip(":")
    assert (base / "models" / "qua2sedimo" / cfg_name).exists()
    apply_id = next(k for k, n in graph.items() if n["class_type"] == "Qua2SeDiMoApplyConfig")
    cfg_id = graph[apply_id]["inputs"].pop("config")[0]
    del graph[cfg_id]
    graph[apply_id]["inputs"]["config_file"] = cfg_name
    with pytest.raises(ComfyServerError, match="made for another model|layer table"):
        comfy_server.run(graph)

    # a LoRA loaded after quantization (ComfyUI's own loader) runs: applied on the fly to the packed layers
    lora_dir = base / "models" / "loras"
    lora_dir.mkdir(parents=True, exist_ok=True)
    save_file({"diffusion_model.blocks.0.mlp.fc2.lora_up.weight": torch.zeros(1152, 4),
               "diffusion_model.blocks.0.mlp.fc2.lora_down.weight": torch.zeros(4, 4608)},
              str(lora_dir / "tiny_lora.safetensors"))
    graph = wa.twin(STEMS[0])
    sampler = next(k for k, n in graph.items() if n["class_type"] == "KSampler")
    graph["90"] = {"class_type": "LoraLoaderModelOnly",
                   "inputs": {"model": graph[sampler]["inputs"]["model"], "lora_name": "tiny_lora.safetensors",
                              "strength_model": 1.0}}
    graph[sampler]["inputs"]["model"] = ["90", 0]
    assert comfy_server.saved_images(comfy_server.run(graph)), "a LoRA after Load Quantized must run and save images"

    # a tampered quantized file
    bad = base / "output" / "qua2sedimo" / "tampered_q.safetensors"
    bad.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(bad, "not a safetensors file")
    graph = wa.to_testbed(wa.twin(STEMS[2]), **{**wa.TWIN_MODEL, "quantized_file": "qua2sedimo/tampered_q.safetensors"})
    with pytest.raises(ComfyServerError, match="tampered_q.safetensors"):
        comfy_server.run(graph)
