"""The quantized safetensors format reads strictly: a tampered layer dtype or table dtype is refused, not used."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qua2sedimo.quant import quantize_weight
from qua2sedimo.quant.format import load_quantized_file, save_quantized_file
from qua2sedimo.quant.packed import PackedWeight


def _write(path, dtype=torch.float16):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = quantize_weight(w, "kmeans_c", 4)
    header = {"layers": {"fc": {"option": "kmeans_c-4", "kind": "linear", "shape": [16, 32], "dtype": "float16",
                                "act_bits": 16, "group_size": None}}}
    save_quantized_file(path, {"fc.weight": q.packed}, header)


def _rewrite(path, edit_header=None, edit_tensors=None):
    """Rewrite a written file in place with its header and/or tensors edited (as a damaged or tampered file)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["qua2sedimo"])
    if edit_header is not None:
        edit_header(header)
    if edit_tensors is not None:
        edit_tensors(tensors)
    save_file(tensors, str(path), metadata=dict(meta, qua2sedimo=json.dumps(header)))


def _tamper(path, *, dtype_name=None, lut_dtype=None):
    def header(h):
        if dtype_name is not None:
            h["layers"]["fc"]["dtype"] = dtype_name

    def tensors(t):
        if lut_dtype is not None:
            t["fc.lut"] = t["fc.lut"].to(lut_dtype)

    _rewrite(path, header, tensors)


def test_written_file_loads(tmp_path):
    _write(tmp_path / "q.safetensors")
    tensors, header = load_quantized_file(tmp_path / "q.safetensors")
    assert isinstance(tensors["fc.weight"], PackedWeight) and set(tensors) == {"fc.weight"}
    assert tensors["fc.weight"].lut.dtype == torch.float16 and header["layers"]["fc"]["dtype"] == "float16"
    with safe_open(str(tmp_path / "q.safetensors"), framework="pt") as f:  # serialised as codes + table
        assert set(f.keys()) == {"fc.codes", "fc.lut"}


@pytest.mark.parametrize("name", ["float8_e4m3fn", "float64"])
def test_tampered_layer_dtype_is_refused(tmp_path, name):
    path = tmp_path / "q.safetensors"
    _write(path)
    _tamper(path, dtype_name=name)
    with pytest.raises(ValueError, match=f"layer 'fc' has dtype '{name}'.*tampered"):
        load_quantized_file(path)


def test_table_dtype_must_match_the_layer(tmp_path):
    path = tmp_path / "q.safetensors"
    _write(path)
    _tamper(path, lut_dtype=torch.float8_e4m3fn)
    with pytest.raises(ValueError, match="table is torch.float8_e4m3fn .* expected torch.float16"):
        load_quantized_file(path)


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("fc.bias"), "1 tensor.* listed in the header are missing, e.g. 'fc.bias'"),
    (lambda t: t.pop("out.weight"), "missing, e.g. 'out.weight'"),
    (lambda t: t.update({"evil.weight": torch.zeros(2)}), "not listed in the header, e.g. 'evil.weight'"),
])
def test_the_full_tensor_set_is_checked(tmp_path, change, message):
    """A quantized layer's bias or a dense layer missing used to load silently (wrong outputs, or a raw KeyError)."""
    path = tmp_path / "q.safetensors"
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).half()
    q = quantize_weight(w, "kmeans_c", 4)
    header = {"layers": {"fc": {"option": "kmeans_c-4", "kind": "linear", "shape": [16, 32], "dtype": "float16",
                                "act_bits": 16, "group_size": None}}}
    save_quantized_file(path, {"fc.weight": q.packed, "fc.bias": torch.zeros(16).half(),
                               "out.weight": torch.ones(4, 16).half()}, header)
    assert set(load_quantized_file(path)[0]) == {"fc.weight", "fc.bias", "out.weight"}
    _rewrite(path, edit_tensors=change)
    with pytest.raises(ValueError, match=message):
        load_quantized_file(path)


@pytest.mark.parametrize("entry", [{"shape": ["16", "²"]}, {"shape": None}, {"option": None}, {"shape": [16]}])
def test_malformed_layer_entry_is_a_clear_error(tmp_path, entry):
    path = tmp_path / "q.safetensors"
    _write(path)
    _rewrite(path, lambda h: h["layers"]["fc"].update(entry))
    with pytest.raises(ValueError, match="(malformed header entry|invalid option).*'fc'|'fc'.*malformed header entry"):
        load_quantized_file(path)


@pytest.mark.parametrize("layers", ["[]", '{"fc": 3}', '"x"'])
def test_malformed_layer_table_is_a_clear_error(tmp_path, layers):
    path = tmp_path / "q.safetensors"
    _write(path)
    _rewrite(path, lambda h: h.update(layers=json.loads(layers)))
    with pytest.raises(ValueError, match="no valid layer table"):
        load_quantized_file(path)


# ------------------------------------------------------------------------------------- atomic writes


def test_written_files_follow_the_umask(tmp_path):
    import os

    from qua2sedimo.quant.atomic import atomic_write_text

    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a.json", "{}")
        os.umask(0o077)
        atomic_write_text(tmp_path / "b.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # like ComfyUI's outputs, not mkstemp's 0600
    assert (tmp_path / "b.json").stat().st_mode & 0o777 == 0o600


_WRITER = """
import sys, time
from qua2sedimo.quant.atomic import atomic_path
with atomic_path(sys.argv[1]) as tmp:
    tmp.write_bytes(b"x" * 1_000_000)
    print("writing", flush=True)
    time.sleep(60)
"""


def _start_writer(target):
    import subprocess
    import sys

    p = subprocess.Popen([sys.executable, "-c", _WRITER, str(target)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "writing"
    return p


def test_temp_files_of_killed_writers_are_swept_live_ones_kept(tmp_path):
    """kill -9 during a save used to leak a full-size temporary file per kill, never swept."""
    import signal

    from qua2sedimo.quant.atomic import atomic_write_text, sweep_stale_temps

    killed = _start_writer(tmp_path / "model.safetensors")
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    leaked = [p.name for p in tmp_path.iterdir()]
    assert len(leaked) == 1 and leaked[0].startswith(".model.safetensors.") and leaked[0].endswith(".tmp")
    live = _start_writer(tmp_path / "other.safetensors")  # the next write into the folder sweeps it
    try:
        temps = [p.name for p in tmp_path.iterdir()]
        assert len(temps) == 1 and temps[0].startswith(".other.safetensors.")
        atomic_write_text(tmp_path / "config.json", "{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted([*temps, "config.json"])  # a live one stays
        assert sweep_stale_temps(tmp_path) == []
    finally:
        live.kill()
        live.wait()
    assert [p.name for p in sweep_stale_temps(tmp_path)][0].startswith(".other.safetensors.")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
