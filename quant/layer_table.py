"""The quantizable layers of a torch model: names, kinds, weight shapes, dtypes and fingerprints."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from .packed import PackedWeight

QUANTIZABLE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv2d)


@dataclass(frozen=True)
class LayerInfo:
    """One quantizable weight layer: module name, ``"linear"``/``"conv2d"``, weight shape and dtype."""

    name: str
    kind: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n

    def to_json(self) -> dict:
        return {"name": self.name, "kind": self.kind, "shape": list(self.shape), "dtype": dtype_name(self.dtype)}


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, str(name), None)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"unknown floating dtype {name!r}")
    return dtype


def _layer_of(name: str, module: nn.Module) -> LayerInfo | None:
    weight = getattr(module, "weight", None)
    if isinstance(weight, PackedWeight):  # a quantized layer describes the dense weight it replaces
        packing = weight.packing
        return LayerInfo(name, "conv2d" if len(packing.shape) == 4 else "linear", packing.shape, packing.dtype)
    if isinstance(module, QUANTIZABLE_TYPES) or is_linear_like(module):
        weight = getattr(module, "weight", None)
        if isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and weight.dim() >= 2:
            kind = "conv2d" if isinstance(module, nn.Conv2d) else "linear"
            return LayerInfo(name, kind, tuple(weight.shape), weight.dtype)
    return None


def is_quantized_layer(module: nn.Module) -> bool:
    """Whether ``module``'s weight is a packed quantized weight (a quant layer or a host framework's layer)."""
    return isinstance(getattr(module, "weight", None), PackedWeight)


def is_linear_like(module: nn.Module) -> bool:
    """A Linear that is not an ``nn.Linear`` subclass (e.g. ComfyUI 0.33's mixed-precision ops, whose weight is a
    quantized tensor): ``in_features``/``out_features`` and a 2-D weight of that shape."""
    weight = getattr(module, "weight", None)
    n_in, n_out = getattr(module, "in_features", None), getattr(module, "out_features", None)
    return (isinstance(n_in, int) and isinstance(n_out, int) and isinstance(weight, torch.Tensor)
            and tuple(weight.shape) == (n_out, n_in))


def quantizable_layers(model: nn.Module | Iterable[LayerInfo]) -> list[LayerInfo]:
    """Every Linear/Conv2d weight layer of ``model`` in module order (or a given layer list)."""
    if not isinstance(model, nn.Module):
        return list(model)
    return [info for name, mod in model.named_modules() if (info := _layer_of(name, mod)) is not None]


@dataclass(frozen=True)
class DenseOnlyLayer:
    """A weight layer this package cannot quantize (Conv3d, Conv1d, Embedding, …): it stays dense, and says so."""

    name: str
    type_name: str
    numel: int


def dense_only_layers(model: nn.Module) -> list[DenseOnlyLayer]:
    """Modules with a ≥ 2-D floating weight that are not quantizable layers (e.g. Wan's and HunyuanVideo's Conv3d
    patch embeddings), in module order; quantized layers and 1-D (norm) weights are not listed."""
    out = []
    for name, mod in model.named_modules():
        weight = getattr(mod, "weight", None)
        if (name and isinstance(weight, torch.Tensor) and weight.dtype.is_floating_point and weight.dim() >= 2
                and _layer_of(name, mod) is None):
            out.append(DenseOnlyLayer(name, type(mod).__name__, weight.numel()))
    return out


def layers_fingerprint(layers: Iterable[LayerInfo]) -> str:
    """Fingerprint of a layer table (names and shapes): identifies a model architecture."""
    items = [[layer.name, list(layer.shape)] for layer in layers]
    return hashlib.blake2b(json.dumps(items).encode(), digest_size=12).hexdigest()


def weights_fingerprint(model: nn.Module, layers: Iterable[LayerInfo] | None = None) -> str:
    """Fingerprint of the layer table *and* the weight values (keys the on-disk option-table cache)."""
    h = hashlib.blake2b(digest_size=16)
    modules = dict(model.named_modules())
    for layer in layers if layers is not None else quantizable_layers(model):
        w = modules[layer.name].weight.detach()
        h.update(json.dumps(layer.to_json()).encode())
        h.update(w.contiguous().cpu().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def layer_table_diff(mine: Sequence[LayerInfo], theirs: Sequence[LayerInfo], mine_name: str,
                     theirs_name: str) -> str:
    """What differs between two layer tables, for error messages (``"layer order differs"`` if only the order)."""
    a = {layer.name: tuple(layer.shape) for layer in mine}
    b = {layer.name: tuple(layer.shape) for layer in theirs}
    missing = [n for n in a if n not in b]
    extra = [n for n in b if n not in a]
    reshaped = [n for n in a if n in b and a[n] != b[n]]
    details = []
    if missing:
        details.append(f"{len(missing)} {mine_name} layer(s) absent from the {theirs_name} (e.g. {missing[0]!r})")
    if extra:
        details.append(f"{len(extra)} {theirs_name} layer(s) not in the {mine_name} (e.g. {extra[0]!r})")
    if reshaped:
        n = reshaped[0]
        details.append(f"{len(reshaped)} layer(s) with other shapes (e.g. {n!r}: {list(a[n])} vs {list(b[n])})")
    return "; ".join(details or ["layer order differs"])
