"""The option table: every option of every quantizable layer, computed once and cached on disk.

Evaluating a configuration then only swaps prepared packed weights (no re-quantization). The cache is
a safetensors file keyed by a fingerprint of the weights; it is validated when read.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .atomic import atomic_write_with
from .layer_table import LayerInfo, dtype_from_name, quantizable_layers, weights_fingerprint
from .options import OPTIONS, parse_option
from .packed import PackedLayout, PackedWeight
from .quantizers import QUANTIZER_VERSION, QuantizedWeight, quantize_weight

TABLE_FORMAT = "qua2sedimo.option_table"
TABLE_VERSION = 1
ProgressFn = Callable[[int, int, str], None]


class OptionTableCancelled(RuntimeError):
    """Raised when the ``cancel`` callback asks an option-table build to stop."""


@dataclass
class OptionTable:
    """Quantized weights for ``layer → option``, with errors and sizes, for one model's weights."""

    layers: list[LayerInfo]
    entries: dict[str, dict[str, QuantizedWeight]]
    fingerprint: str
    seed: int = 0

    @property
    def options(self) -> tuple[str, ...]:
        """Options present for every layer."""
        sets = [set(v) for v in self.entries.values()]
        common = set.intersection(*sets) if sets else set()
        return tuple(o for o in OPTIONS if o in common) + tuple(sorted(common - set(OPTIONS)))

    def get(self, layer: str, option: str) -> QuantizedWeight:
        try:
            return self.entries[layer][option]
        except KeyError:
            raise KeyError(f"option table has no entry for layer {layer!r}, option {option!r}") from None

    def errors(self, metric: str = "rel_error") -> dict[str, dict[str, float]]:
        """``{layer: {option: error}}`` for ``rel_error`` or ``lp_error``."""
        return {n: {o: getattr(q, metric) for o, q in opts.items()} for n, opts in self.entries.items()}

    # ------------------------------------------------------------------------------------ files
    def save(self, path: str | os.PathLike) -> None:
        """Write the table as one safetensors file (atomically)."""
        tensors: dict[str, torch.Tensor] = {}
        entries = {}
        for name, opts in self.entries.items():
            for option, q in opts.items():
                key = f"{name}/{option}"
                tensors.update(q.packed.to_tensors(f"{key}/"))
                entries[key] = {
                    "layer": name, "option": option, "group_size": q.group_size,
                    "rel_error": q.rel_error, "lp_error": q.lp_error,
                }
        header = {
            "format": TABLE_FORMAT, "version": TABLE_VERSION, "fingerprint": self.fingerprint,
            "seed": self.seed, "layers": [layer.to_json() for layer in self.layers], "entries": entries,
        }
        metadata = {"format": TABLE_FORMAT, "qua2sedimo": json.dumps(header)}
        atomic_write_with(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str | None = None) -> OptionTable:
        """Read and validate a table file; ``fingerprint`` (if given) must match the stored one."""
        path = Path(path)
        fix = f"delete {str(path)!r} and it will be rebuilt"
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                header = json.loads(meta.get("qua2sedimo", "null"))
                if not isinstance(header, dict) or header.get("format") != TABLE_FORMAT:
                    raise ValueError(f"option-table file {path.name!r} has no Qua2SeDiMo header; {fix}")
                if header.get("version") != TABLE_VERSION:
                    version = header.get("version")
                    raise ValueError(f"option-table file {path.name!r} has version {version!r}; {fix}")
                if fingerprint is not None and header.get("fingerprint") != fingerprint:
                    raise ValueError(f"option-table file {path.name!r} belongs to other weights; {fix}")
                layers = [
                    LayerInfo(d["name"], d["kind"], tuple(int(s) for s in d["shape"]), dtype_from_name(d["dtype"]))
                    for d in header["layers"]
                ]
                by_name = {layer.name: layer for layer in layers}
                entries: dict[str, dict[str, QuantizedWeight]] = {}
                for key, e in header["entries"].items():
                    layer = by_name.get(e["layer"])
                    if layer is None:
                        raise ValueError(
                            f"option-table file {path.name!r}: entry {key!r} names an unknown layer; {fix}"
                        )
                    q = _read_entry(f, key, e, layer, path.name, fix)
                    entries.setdefault(layer.name, {})[e["option"]] = q
        except (SafetensorError, OSError, KeyError, TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"option-table file {str(path)!r} is damaged or unreadable ({e!s}); {fix}") from None
        return cls(layers, entries, str(header["fingerprint"]), int(header.get("seed", 0)))


def _read_entry(f, key: str, entry: dict, layer: LayerInfo, fname: str, fix: str) -> QuantizedWeight:
    """One table entry, validated: its codes and table fit the layer and option, its errors are finite."""
    try:
        method, bits = parse_option(entry["option"], layer.name)
        packing = PackedLayout(method, bits, layer.shape, layer.dtype, entry.get("group_size"))
        packed = PackedWeight.from_parts(f.get_tensor(f"{key}/codes"), f.get_tensor(f"{key}/lut"), packing)
        q = QuantizedWeight(packed, rel_error=float(entry["rel_error"]), lp_error=float(entry["lp_error"]))
    except ValueError as e:
        raise ValueError(f"option-table file {fname!r}: layer {layer.name!r} {entry.get('option')}: {e}; {fix}") \
            from None
    if not (math.isfinite(q.rel_error) and math.isfinite(q.lp_error)):
        raise ValueError(f"option-table file {fname!r}: layer {layer.name!r} {q.option} has non-finite errors; {fix}")
    return q


def option_table(
    model: nn.Module,
    options: Iterable[str] = OPTIONS,
    *,
    cache_dir: str | os.PathLike | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: ProgressFn | None = None,
    cancel: Callable[[], bool] | None = None,
    only: Mapping[str, str] | None = None,
) -> OptionTable:
    """Compute every ``option`` of every quantizable layer of ``model`` (errors and sizes included).

    With ``cache_dir`` the table is read from / written to
    ``option-table-<fingerprint>-q<QUANTIZER_VERSION>.safetensors`` there; options missing from a cached
    table are computed and the file is extended. ``progress`` receives ``(done, total, label)``; when
    ``cancel()`` returns True, :class:`OptionTableCancelled` is raised; finished entries are saved (atomically)
    so the next call resumes. ``device`` (e.g. ``"cuda"``) is where quantization runs.
    ``only`` (``{layer: option}``, e.g. a config's options) restricts the work to those entries.
    """
    options = tuple(options)
    for option in options:
        if parse_option(option) is None:
            raise ValueError("'fp16' is not a quantization option; leave it out of the option table")
    layers = quantizable_layers(model)
    if not layers:
        raise ValueError("the model has no quantizable Linear/Conv2d layers, so there is nothing to quantize")
    fingerprint = weights_fingerprint(model, layers)
    path = (Path(cache_dir) / f"option-table-{fingerprint}-q{QUANTIZER_VERSION}.safetensors"
            if cache_dir is not None else None)
    if path is not None and path.exists():
        table = OptionTable.load(path, fingerprint)
        if table.seed != seed:
            table = OptionTable(layers, {}, fingerprint, seed)
    else:
        table = OptionTable(layers, {}, fingerprint, seed)
    modules = dict(model.named_modules())
    wanted = [(layer, o) for layer in layers for o in options if only is None or only.get(layer.name) == o]
    todo = [(layer, o) for layer, o in wanted if o not in table.entries.get(layer.name, {})]
    total = len(wanted)
    done = total - len(todo)
    if progress:
        progress(done, total, "cached" if done else "start")
    computed = 0
    try:
        for layer, option in todo:
            if cancel is not None and cancel():
                raise OptionTableCancelled(f"option table cancelled after {done} of {total} entries")
            method, bits = parse_option(option)
            weight = modules[layer.name].weight.detach()
            if device is not None:
                weight = weight.to(device)
            q = quantize_weight(weight, method, bits, seed=seed, name=layer.name)
            q.packed = q.packed.cpu()
            table.entries.setdefault(layer.name, {})[option] = q
            computed += 1
            done += 1
            if progress:
                progress(done, total, f"{layer.name} {option}")
    finally:  # cancelled or failed: keep what is done, the next call resumes from there
        if path is not None and computed:
            table.save(path)
    return table
