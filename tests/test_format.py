"""The quantized safetensors format reads strictly: a tampered layer dtype or table dtype is refused, not used."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from qua2sedimo.quant import quantize_weight
from qua2sedimo.quant.format import load_quantized_file, save_quantized_file


def _write(path, dtype=torch.float16):
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(0)).to(dtype)
    q = quantize_weight(w, "kmeans_c", 4)
    header = {"layers": {"fc": {"option": "kmeans_c-4", "kind": "linear", "shape": [16, 32], "dtype": "float16",
                                "act_bits": 16, "group_size": None}}}
    save_quantized_file(path, {"fc.codes": q.codes, "fc.lut": q.lut}, header)


def _tamper(path, *, dtype_name=None, lut_dtype=None):
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta["qua2sedimo"])
    if dtype_name is not None:
        header["layers"]["fc"]["dtype"] = dtype_name
    if lut_dtype is not None:
        tensors["fc.lut"] = tensors["fc.lut"].to(lut_dtype)
    save_file(tensors, str(path), metadata=dict(meta, qua2sedimo=json.dumps(header)))


def test_written_file_loads(tmp_path):
    _write(tmp_path / "q.safetensors")
    tensors, header = load_quantized_file(tmp_path / "q.safetensors")
    assert tensors["fc.lut"].dtype == torch.float16 and header["layers"]["fc"]["dtype"] == "float16"


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
