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

    calls = []

    def cancel_after_three(value, total, preview, node_id=None):
        calls.append((value, total, node_id))
        if value == 3:
            mm.interrupt_current_processing(True)

    old_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(cancel_after_three)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            bridge.apply_config(mp, cfg, node_id="17")
        mm.interrupt_current_processing(False)
        assert calls[0][:2] == (0, n_layers) and calls[-1][0] == 3 and {c[2] for c in calls} == {"17"}
        (cached,) = tmp_path.iterdir()  # finished layers were kept
        calls.clear()
        comfy.utils.set_progress_bar_global_hook(lambda v, t, p, node_id=None: calls.append((v, t, node_id)))
        qmp, summary = bridge.apply_config(mp, cfg, node_id="17")
    finally:
        comfy.utils.set_progress_bar_global_hook(old_hook)
        mm.interrupt_current_processing(False)
    # Cancel is noticed at the next progress report, after the 4th entry finished: that one is kept too
    assert calls[0][:2] == (4, n_layers) and calls[-1][:2] == (n_layers, n_layers)
    assert summary["counts"] == {"uaq-3": n_layers}
    assert cached.exists()


@pytest.mark.comfy_inproc
def test_lora_after_quantization_is_refused_before_is_baked(comfy_inproc, tiny_models, tmp_path, monkeypatch):
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
    with pytest.raises(ValueError, match="Load the LoRA on the full-precision MODEL"):
        comfy.sd.load_lora_for_models(qmp, None, lora, 1.0, 1.0)
    with pytest.raises(ValueError, match="Load the LoRA on the full-precision MODEL"):
        comfy.sd.load_lora_for_models(qmp.clone(), None, lora, 1.0, 1.0)  # clones keep refusing

    lmp, _ = comfy.sd.load_lora_for_models(mp, None, lora, 1.0, 1.0)  # LoRA first, then quantize: baked in
    qlmp, _ = bridge.apply_config(lmp, cfg)
    plain = bridge.diffusion_model(qmp).get_submodule(name)
    baked = bridge.diffusion_model(qlmp).get_submodule(name)
    assert not torch.equal(plain.lut, baked.lut)
    assert not qlmp.patches, "baked patches must not be applied a second time"
    ref = comfy.lora.calculate_weight(lmp.patches[f"diffusion_model.{name}.weight"], w.detach().float().clone(), name)
    assert not torch.equal(ref, w.float())
    err = (baked.dequantized_weight(torch.float32) - ref).pow(2).sum() / ref.pow(2).sum()
    assert err < 0.02, "the quantized layer must approximate the LoRA-patched weight"


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
