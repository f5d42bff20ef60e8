"""The ComfyUI bridge in-process: progress bar, Cancel, LoRA refusal, packed memory on load (peak RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _load(tiny_models, name="pixart_sigma_d1"):
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge

    bridge.register_folders()
    return comfy.sd.load_diffusion_model(str(tiny_models[name]))


@pytest.mark.comfy_inproc
def test_progress_bar_and_cancel(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    import comfy.model_management as mm
    import comfy.utils

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path)
    mp = _load(tiny_models, "sd15_tiny")
    cfg = QuantConfig.uniform(bridge.diffusion_model(mp), "uaq-3")
    n_layers = len(cfg.options)

    # Cancel is pressed once the 3rd layer is reported; what the bar shows is read from ComfyUI's hook, which
    # ComfyUI 0.33 throttles (first and last step always, others ≥100 ms apart), so only those are asserted on it
    reported, calls = [], []
    progress_call = bridge.Progress.__call__

    def report(self, done, total, label=""):
        reported.append(done)
        progress_call(self, done, total, label)
        if done == 3:
            mm.interrupt_current_processing(True)

    monkeypatch.setattr(bridge.Progress, "__call__", report)
    old_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: calls.append((v, t, node_id)))
    try:
        with pytest.raises(mm.InterruptProcessingException):
            bridge.apply_config(mp, cfg, node_id="17")
        mm.interrupt_current_processing(False)
        # Cancel is noticed at the next progress report, after the 4th entry finished: that one is kept too
        assert reported == [0, 1, 2, 3, 4]
        assert calls[0] == (0, n_layers, "17") and all(v <= 3 for v, _, _ in calls)
        assert {c[2] for c in calls} == {"17"}
        (cached,) = tmp_path.iterdir()  # finished layers were kept
        calls.clear()
        qmp, summary = bridge.apply_config(mp, cfg, node_id="17")
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        mm.interrupt_current_processing(False)
    assert calls[0][:2] == (4, n_layers) and calls[-1][:2] == (n_layers, n_layers)
    assert summary["counts"] == {"uaq-3": n_layers}
    assert cached.exists()


@pytest.mark.comfy_inproc
def test_lora_before_apply_config_is_baked(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    import comfy.sd
    import torch

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path)
    mp = _load(tiny_models)
    name = "blocks.0.mlp.fc2"
    w = bridge.diffusion_model(mp).get_submodule(name).weight
    g = torch.Generator().manual_seed(0)
    lora = {f"diffusion_model.{name}.lora_up.weight": torch.randn(w.shape[0], 4, generator=g),
            f"diffusion_model.{name}.lora_down.weight": torch.randn(4, w.shape[1], generator=g)}
    cfg = QuantConfig.from_options(bridge.diffusion_model(mp), {name: "uaq-4"})

    qmp, _ = bridge.apply_config(mp, cfg)
    lmp, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 1.0)  # LoRA first, then quantize: baked in
    qlmp, _ = bridge.apply_config(lmp, cfg)
    plain = bridge.diffusion_model(qmp).get_submodule(name)
    baked = bridge.diffusion_model(qlmp).get_submodule(name)
    assert not torch.equal(plain.weight.lut, baked.weight.lut)
    assert not qlmp.patches, "baked patches must not be applied a second time"
    ref = comfy.lora.calculate_weight(lmp.patches[f"diffusion_model.{name}.weight"], w.detach().float().clone(), name)
    assert not torch.equal(ref, w.float())
    err = (baked.weight.dequantize(torch.float32) - ref).pow(2).sum() / ref.pow(2).sum()
    assert err < 0.02, "the quantized layer must approximate the LoRA-patched weight"


def _tiny_lora(dm, name: str, rank: int = 4, seed: int = 0) -> dict:
    import torch

    w = dm.get_submodule(name).weight
    g = torch.Generator().manual_seed(seed)
    return {f"diffusion_model.{name}.lora_up.weight": torch.randn(w.shape[0], rank, generator=g),
            f"diffusion_model.{name}.lora_down.weight": torch.randn(rank, w.shape[1], generator=g)}


@pytest.mark.comfy_inproc
def test_bypass_lora_before_apply_config_is_refused(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    """'Load LoRA (Bypass)' (ComfyUI ≥ 0.33) adds forward injections, not weight patches: Apply Config refuses
    a MODEL carrying them instead of dropping the LoRA silently (after Apply Config it works:
    test_lora_quantized.py)."""
    import comfy.sd

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig

    if not hasattr(comfy.sd, "load_bypass_lora_for_models"):
        pytest.skip("this ComfyUI has no bypass LoRA (added after 0.3.75)")
    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path)
    mp = _load(tiny_models)
    dm = bridge.diffusion_model(mp)
    name = "blocks.0.mlp.fc2"
    lora = _tiny_lora(dm, name)
    cfg = QuantConfig.from_options(dm, {name: "uaq-4"})

    bmp, _ = comfy.sd.load_bypass_lora_for_models(mp, None, lora, 1.0, 1.0)
    assert bmp.injections, "the bypass LoRA was expected to add forward injections"
    with pytest.raises(ValueError, match="normal 'Load LoRA' node before Qua2SeDiMo Apply Config"):
        bridge.apply_config(bmp, cfg)



@pytest.mark.comfy_inproc
def test_apply_config_shares_no_mutable_state_with_the_source(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    """The quantized MODEL has its own module tree, Parameter objects (same storage: no memory), BaseModel
    patcher state and backups; moving it (what ComfyUI's loading/offloading does) leaves the source untouched."""
    import torch

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig
    from qua2sedimo.quant.packed import PackedWeight

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path)
    mp = _load(tiny_models)
    dm = bridge.diffusion_model(mp)
    qmp, _ = bridge.apply_config(mp, QuantConfig.from_options(dm, {"blocks.0.mlp.fc2": "uaq-4"}))
    src_params = dict(mp.model.named_parameters())
    new_params = dict(qmp.model.named_parameters())
    packed = {k for k, p in new_params.items() if isinstance(p, PackedWeight)}
    assert packed == {"diffusion_model.blocks.0.mlp.fc2.weight"}
    shared = [k for k in new_params if k in src_params and k not in packed]
    assert shared and not any(new_params[k] is src_params[k] for k in shared)
    assert all(new_params[k].data_ptr() == src_params[k].data_ptr() for k in shared), "dense weights copied"
    assert not any(a is b for a in qmp.model.modules() for b in mp.model.modules())
    for attr in bridge._PATCHER_STATE_ON_MODEL:
        mine, theirs = getattr(qmp.model, attr, None), getattr(mp.model, attr, None)
        assert mine is None or not isinstance(mine, (dict, set, list)) or mine is not theirs, attr
    assert qmp.backup is not mp.backup and qmp.object_patches_backup is not mp.object_patches_backup
    assert getattr(qmp, "cached_patcher_init", None) is None, "a rebuild from the FP loader would drop quantization"

    before = {k: v.detach().clone() for k, v in src_params.items()}
    qmp.model.to(torch.float64)  # stands in for ComfyUI moving the quantized model between devices
    assert all(p.dtype == torch.float64 for k, p in qmp.model.named_parameters() if k in shared)
    assert all(p.dtype == torch.uint8 for k, p in qmp.model.named_parameters() if k in packed)  # bytes stay bytes
    after = dict(mp.model.named_parameters())
    assert all(after[k] is src_params[k] and torch.equal(after[k], before[k]) for k in before)
    assert all(p.dtype == before[k].dtype for k, p in after.items())


@pytest.mark.comfy_inproc
def test_shipped_model_rebuilds_without_pickling_comfy_objects(comfy_inproc, tiny_models):
    """What a Ray worker receives: the MODEL as plain parts, its BaseModel and model config rebuilt from class +
    attributes (ComfyUI 0.33's model config answers None for missing attributes, which breaks plain pickle)."""
    pytest.importorskip("ray")
    import pickle

    import comfy.supported_models
    import torch

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.nodes.search_remote import dumps_on_cpu

    config = pickle.loads(dumps_on_cpu(comfy.supported_models.SD15({})))
    assert type(config) is comfy.supported_models.SD15
    assert config.unet_config == comfy.supported_models.SD15({}).unet_config
    mp = _load(tiny_models)
    fc2 = bridge.diffusion_model(mp).get_submodule("blocks.0.mlp.fc2").weight
    mp.add_patches({"diffusion_model.blocks.0.mlp.fc2.weight": ("diff", (torch.ones_like(fc2),))}, 0.5)
    rebuilt = bridge.rebuild_model(pickle.loads(dumps_on_cpu(bridge.ship_model(mp))))
    assert type(rebuilt.model) is type(mp.model) and rebuilt.model is not mp.model
    assert rebuilt.patches.keys() == mp.patches.keys() and rebuilt.size == mp.size
    assert not hasattr(rebuilt.model, "dynamic_pins") or rebuilt.model.dynamic_pins is not mp.model.__dict__.get(
        "dynamic_pins")
    ref, got = mp.model.state_dict(), rebuilt.model.state_dict()
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


_RSS_SCRIPT = textwrap.dedent("""
    import json, resource, sys
    sys.path.insert(0, {tests!r})
    import comfy_host
    comfy_host.setup_inprocess({base!r})
    import comfy.sd, torch
    from qua2sedimo.nodes import comfy_bridge as bridge
    bridge.register_folders()
    torch.zeros(1)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    if {quantized!r}:
        model = bridge.load_quantized(__import__("pathlib").Path({path!r}))
    else:
        model = comfy.sd.load_diffusion_model({path!r})
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    size = sum(t.numel() * t.element_size() for t in bridge.diffusion_model(model).state_dict().values())
    print(json.dumps({{"peak_kib": after - before, "resident_bytes": size}}))
""")


def _peak_rss(base: Path, path: Path, quantized: bool) -> dict:
    code = _RSS_SCRIPT.format(tests=str(TESTS), base=str(base), path=str(path), quantized=quantized)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(os.environ))
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.comfy_inproc
def test_load_quantized_stays_packed_peak_rss(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    """Loading a W4 file raises peak RSS by about the packed size, far below what the dense model costs
    (measured side by side in fresh processes, so the ratio does not depend on the machine)."""
    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path)
    mp = _load(tiny_models)
    qmp, _ = bridge.apply_config(mp, QuantConfig.uniform(bridge.diffusion_model(mp), "uaq-4"))
    qfile = tmp_path / "w4.safetensors"
    bridge.save_quantized(qmp, qfile)

    dense = _peak_rss(comfy_inproc.base, tiny_models["pixart_sigma_d1"], quantized=False)
    packed = _peak_rss(comfy_inproc.base, qfile, quantized=True)
    assert packed["resident_bytes"] <= 0.3 * dense["resident_bytes"]
    # the peak during load stays near the packed size: no dense copy of the quantized layers is made
    assert packed["peak_kib"] * 1024 <= 1.5 * qfile.stat().st_size + 16 * 2**20, (packed, qfile.stat().st_size)
    assert packed["peak_kib"] <= 0.5 * dense["peak_kib"], (packed, dense)


@pytest.mark.comfy_inproc
def test_load_quantized_lists_only_our_models(comfy_inproc, tiny_models, tmp_path, monkeypatch):
    """Caches, journals, Ray import links, links out of the folder and other safetensors are not offered."""
    import folder_paths
    import torch
    from safetensors.torch import save_file

    from qua2sedimo.nodes import comfy_bridge as bridge
    from qua2sedimo.quant import QuantConfig

    monkeypatch.setattr(bridge, "cache_dir", lambda: tmp_path / "tables")
    mp = _load(tiny_models)
    cfg = QuantConfig.from_options(bridge.diffusion_model(mp), {"blocks.0.mlp.fc2": "uaq-4"})
    qmp, _ = bridge.apply_config(mp, cfg)
    ours = bridge.config_dir()
    out = Path(folder_paths.get_output_directory())
    bridge.save_quantized(qmp, out / "listing-test_00001_q.safetensors")
    (ours / "cache").mkdir(parents=True, exist_ok=True)
    save_file({"x": torch.zeros(2)}, str(ours / "cache" / "option-table-listing-test.safetensors"))
    save_file({"x": torch.zeros(2)}, str(out / "listing-test-other.safetensors"))
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    bridge.save_quantized(qmp, outside / "secret_q.safetensors")
    (ours / "listing-test-link").symlink_to(outside, target_is_directory=True)
    folder_paths.filename_list_cache.clear()
    try:
        names = [n for n in bridge.list_quantized() if "listing-test" in n]
    finally:
        (ours / "listing-test-link").unlink()
        for f in (out / "listing-test_00001_q.safetensors", out / "listing-test-other.safetensors",
                  ours / "cache" / "option-table-listing-test.safetensors"):
            f.unlink()
        folder_paths.filename_list_cache.clear()
    assert names == ["listing-test_00001_q.safetensors"], names
