"""The quantized-model file: one safetensors file of packed codes, tables and dense tensors.

Header metadata (``__metadata__``): ``format`` = ``qua2sedimo.quantized``, ``qua2sedimo`` = JSON with
``format_version``, per-layer ``{option, kind, shape, dtype, act_bits, group_size}``, the config, the source
fingerprint and the list of tensors. A quantized layer ``L`` (its ``L.weight`` a
:class:`~.packed.PackedWeight` in memory) is stored as ``L.codes`` (uint8) and ``L.lut`` (+ ``L.bias``), a dense
tensor under its usual key. Everything read is validated; nothing is unpickled.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .atomic import atomic_write_with
from .layer_table import dtype_from_name, dtype_name, is_quantized_layer, quantizable_layers
from .options import FP_OPTION, parse_option
from .packed import PackedLayout, PackedWeight

FILE_FORMAT = "qua2sedimo.quantized"
FILE_VERSION = 1
WRITTEN_DTYPES = (torch.float16, torch.bfloat16, torch.float32)  # of quantized layers


def save_quantized_file(path: str | os.PathLike, tensors: dict[str, torch.Tensor], header: dict) -> None:
    """Write ``tensors`` and the JSON ``header`` (needs ``layers``) atomically."""
    if "layers" not in header:
        raise ValueError("the header needs a 'layers' table")
    data = {}
    for key, value in tensors.items():
        if isinstance(value, PackedWeight):
            data.update(value.to_tensors(key.removesuffix("weight")))
        else:
            data[key] = value.detach().contiguous().cpu()
    header = dict(header, format_version=FILE_VERSION, tensors=sorted(data))  # the full set, checked on reading
    meta = {"format": FILE_FORMAT, "qua2sedimo": json.dumps(header)}
    atomic_write_with(path, lambda tmp: save_file(data, str(tmp), metadata=meta))


def layer_entries(model: torch.nn.Module) -> dict[str, dict]:
    """The header's ``layers`` of a model with quantized layers: each packed layer's option, kind, dense shape and
    dtype, ``act_bits`` and group size, and every other quantizable layer as ``fp16`` (kept dense). Raises
    ``ValueError`` when nothing is quantized (the caller's message says how to quantize)."""
    layers = {}
    for name, mod in model.named_modules():
        if is_quantized_layer(mod):
            packing = mod.weight.packing
            layers[name] = {"option": packing.option, "kind": "conv2d" if len(packing.shape) == 4 else "linear",
                            "shape": list(packing.shape), "dtype": dtype_name(packing.dtype),
                            "act_bits": int(getattr(mod, "act_bits", 16)), "group_size": packing.group_size}
    if not layers:
        raise ValueError("holds no quantized layers")
    for info in quantizable_layers(model):
        layers.setdefault(info.name, {"option": FP_OPTION, "kind": info.kind, "shape": list(info.shape),
                                      "dtype": dtype_name(info.dtype)})
    return layers


def read_header(path: str | os.PathLike) -> dict:
    """The validated header of a quantized file (cheap: reads no tensor data)."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            keys = set(f.keys())
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path.name!r} is not a readable safetensors file ({e!s})") from None
    if meta.get("format") != FILE_FORMAT:
        raise ValueError(
            f"{path.name!r} is not a Qua2SeDiMo quantized model (no '{FILE_FORMAT}' header); "
            "load ordinary checkpoints with ComfyUI's own loaders"
        )
    try:
        header = json.loads(meta["qua2sedimo"])
    except (KeyError, json.JSONDecodeError) as e:
        raise ValueError(f"{path.name!r} has a damaged Qua2SeDiMo header ({e!s})") from None
    if header.get("format_version") != FILE_VERSION:
        raise ValueError(
            f"{path.name!r} has format version {header.get('format_version')!r}; this release reads "
            f"{FILE_VERSION}. Update the node pack."
        )
    layers = header.get("layers")
    if not isinstance(layers, dict) or not all(isinstance(v, dict) for v in layers.values()):
        raise ValueError(f"{path.name!r}: header has no valid layer table (field 'layers'; file damaged)")
    _check_tensor_set(path, header.get("tensors"), keys)
    for name, info in layers.items():
        if parse_option(info.get("option", ""), name) is None:
            continue
        for part in ("codes", "lut"):
            if f"{name}.{part}" not in keys:
                raise ValueError(f"{path.name!r}: quantized layer {name!r} has no '{part}' tensor (file damaged)")
    return header


def _dim(value) -> int:
    """A shape entry: a non-negative int written as a JSON number (no strings, no '²')."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"shape entry {value!r} is not a non-negative integer")
    return value


def _check_tensor_set(path: Path, listed, keys: set[str]) -> None:
    """The file holds exactly the tensors its header lists (files written before the list existed are checked
    per quantized layer only)."""
    if listed is None:
        return
    if not isinstance(listed, list) or not all(isinstance(k, str) for k in listed):
        raise ValueError(f"{path.name!r}: header field 'tensors' is not a list of names (file damaged)")
    missing, extra = sorted(set(listed) - keys), sorted(keys - set(listed))
    if missing:
        raise ValueError(f"{path.name!r}: {len(missing)} tensor(s) listed in the header are missing, e.g. "
                         f"{missing[0]!r} (file damaged or truncated: save it again)")
    if extra:
        raise ValueError(f"{path.name!r}: {len(extra)} tensor(s) not listed in the header, e.g. {extra[0]!r} "
                         "(file tampered)")


def load_quantized_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """Read all tensors and the header; every quantized layer ``L`` comes back as one validated
    :class:`~.packed.PackedWeight` under ``L.weight`` (its ``L.codes``/``L.lut`` are not returned)."""
    path = Path(path)
    header = read_header(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise ValueError(f"{path.name!r}: tensor data is damaged ({e!s})") from None
    for name, info in header["layers"].items():
        packing = _packing(path, name, info)
        if packing is None:
            continue
        try:
            packed = PackedWeight.from_parts(tensors.pop(f"{name}.codes"), tensors.pop(f"{name}.lut"), packing)
        except ValueError as e:
            raise ValueError(f"{path.name!r}: layer {name!r}: {e} (file damaged or tampered)") from None
        tensors[f"{name}.weight"] = packed
    return tensors, header


def _packing(path: Path, name: str, info: dict) -> PackedLayout | None:
    """The layout a header entry describes (None for a dense layer); a malformed entry is a clear error."""
    try:
        parsed = parse_option(info["option"], name)
        if parsed is None:
            return None
        shape = tuple(_dim(s) for s in info["shape"])
        dtype = dtype_from_name(info["dtype"])
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path.name!r}: layer {name!r} has a malformed header entry "
                         f"(option/shape/dtype: {e!s}; file damaged)") from None
    if dtype not in WRITTEN_DTYPES:  # e.g. a tampered float8: the layer would compute in it silently
        raise ValueError(f"{path.name!r}: layer {name!r} has dtype {info['dtype']!r}; quantized layers are written "
                         f"as {', '.join(str(d).removeprefix('torch.') for d in WRITTEN_DTYPES)} (file tampered)")
    try:
        return PackedLayout(*parsed, shape, dtype, info.get("group_size"))
    except ValueError as e:
        raise ValueError(f"{path.name!r}: layer {name!r} has a malformed header entry ({e!s}; file damaged)") from None
