"""The trained reference model (``nodes/reference_model.py``) on the real host: built by ComfyUI's SD3 class,
trained a few steps through its own ``apply_model``, saved in fp16, detected and sampled by ComfyUI; its nodes."""

from __future__ import annotations

import json

import pytest
import torch

STEPS = 12


@pytest.fixture(scope="module")
def trained(comfy_inproc, tmp_path_factory):
    from qua2sedimo.nodes import reference_model as rm

    root = tmp_path_factory.mktemp("reference")
    return rm.train(root, steps=STEPS, log=lambda m: None), root


@pytest.mark.comfy_inproc
def test_trained_file_is_fp16_sd3_and_cached(trained):
    from safetensors import safe_open

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes import reference_model as rm

    t, root = trained
    assert t.path.parent.name == f"{rm.VERSION}-s{STEPS}"
    with safe_open(str(t.path), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
        assert f.metadata()["qua2sedimo_reference"] == rm.VERSION
    model, _ = bridge.load_model_file(t.path)
    assert type(model.model.model_config).__name__ == "SD3" and type(model.model).__name__ == "SD3"
    assert t.meta["train"]["steps"] == STEPS and len(t.meta["loss_by_tenth"]) == 10
    assert json.loads((t.path.parent / "meta.json").read_text()) == t.meta
    mtime = t.path.stat().st_mtime_ns
    again = rm.train(root, steps=STEPS, log=lambda m: None)  # the cache: nothing is retrained
    assert again.cached and not t.cached and again.path == t.path and t.path.stat().st_mtime_ns == mtime


@pytest.mark.comfy_inproc
def test_training_is_deterministic_and_lowers_the_loss(trained, tmp_path):
    from qua2sedimo.nodes import reference_model as rm

    t, _ = trained
    other = rm.train(tmp_path, steps=STEPS, log=lambda m: None)
    assert other.path.read_bytes() == t.path.read_bytes()
    assert t.meta["loss_by_tenth"][-1] < t.meta["loss_by_tenth"][0]


@pytest.mark.comfy_inproc
def test_bad_step_counts_are_refused(comfy_inproc, tmp_path, monkeypatch):
    from qua2sedimo.nodes import reference_model as rm

    with pytest.raises(ValueError, match="steps"):
        rm.train(tmp_path, steps=0)
    monkeypatch.setenv(rm.STEPS_ENV, "many")
    with pytest.raises(ValueError, match=rm.STEPS_ENV):
        rm.default_steps()
    monkeypatch.setenv(rm.STEPS_ENV, "7")
    assert rm.default_steps() == 7


@pytest.mark.comfy_inproc
def test_nodes_condition_on_the_class_and_decode_pixels(comfy_inproc):
    from qua2sedimo.nodes import reference_model as rm
    from qua2sedimo.search import digits

    cond_node, decode_node = rm.node_classes()
    (three,) = cond_node.execute("3").args[0]
    (none,) = cond_node.execute("none").args[0]
    ctx, pooled = digits.class_table(rm.CONTEXT_DIM, rm.POOLED_DIM, rm.CLASS_TOKENS, rm.SEED).lookup(
        torch.tensor([3]))
    assert torch.equal(three[0], ctx) and torch.equal(three[1]["pooled_output"], pooled)
    assert none[0].abs().sum() == 0
    # a LATENT as KSampler returns it (SD3's process_out of the model-space pixels) decodes to those pixels
    data = digits.load_digits_data(32)
    x = data.train_images[:2]
    import comfy.latent_formats

    latent = comfy.latent_formats.SD3().process_out(digits.image_to_latent(x))
    (img,) = decode_node.execute({"samples": latent}, 2).args
    assert img.shape == (2, 64, 64, 3)
    assert torch.allclose(img[:, ::2, ::2, 0], ((x[:, 0] + 1) / 2), atol=1e-5)
    with pytest.raises(ValueError, match="16-channel"):
        decode_node.execute({"samples": torch.zeros(1, 4, 8, 8)}, 1)


@pytest.mark.comfy_inproc
def test_evaluate_samples_every_variant_with_the_same_seeds(trained, tmp_path):
    from PIL import Image

    from qua2sedimo.nodes import reference_model as rm

    t, _ = trained
    summary = rm.evaluate(t.path, {"fp": "fp", "w4": "uaq-4"}, tmp_path, samples=20, grid_columns=10,
                          log=lambda m: None)
    assert json.loads((tmp_path / "digits-quality.json").read_text()) == summary
    fp, w4 = summary["variants"]["fp"], summary["variants"]["w4"]
    assert fp["n"] == w4["n"] == 20 and fp["avg_bits"] is None and 4.0 <= w4["avg_bits"] < 4.5
    assert fp["fid"] != w4["fid"]
    assert Image.open(tmp_path / "digits-grid.png").size == (3 * (10 * 34 + 2), 3 * (2 * 34 + 2))
