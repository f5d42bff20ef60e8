"""``quantize_(model, config)``: replace a model's layers by packed quantized layers, in place."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

from torch import nn

from .config import QuantConfig
from .layer_table import dense_only_layers, is_quantized_layer
from .layers import quantized_module
from .options import parse_option
from .quantizers import QuantizedWeight, quantize_weight
from .table import OptionTable

LayerFactory = Callable[[nn.Module, QuantizedWeight, int], nn.Module]


def module_nbytes(model: nn.Module) -> int:
    """Bytes of all parameters and buffers of ``model``."""
    tensors = list(model.parameters()) + list(model.buffers())
    return sum(t.numel() * t.element_size() for t in tensors)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def quantize_(
    model: nn.Module,
    config: QuantConfig,
    table: OptionTable | None = None,
    act_bits: int = 16,
    seed: int = 0,
    progress: Callable[[int, int, str], None] | None = None,
    make_layer: LayerFactory = quantized_module,
) -> dict:
    """Quantize ``model`` in place as ``config`` says (layers marked ``fp16`` stay dense).

    Prepared weights come from ``table`` when given (no re-quantization), else each layer is
    quantized now. Layers that are already quantized with the requested option are kept (only their
    ``act_bits`` is updated); a layer quantized differently is an error. ``make_layer(dense_module, q, act_bits)``
    builds each quantized layer (default: :class:`QuantLinear`/:class:`QuantConv2d`; a host framework passes its own
    layer classes). Returns a summary with bytes before/after, ``avg_bits`` and the per-layer options.
    """
    config.check_model(model)
    if table is not None:
        missing = [n for n, o in config.options.items() if o != "fp16" and o not in table.entries.get(n, {})]
        if missing:
            raise ValueError(
                f"the option table lacks {len(missing)} configured entries (e.g. layer {missing[0]!r} "
                f"{config.options[missing[0]]}); build it with these options or pass table=None"
            )
    before = module_nbytes(model)
    todo = [(n, o) for n, o in config.options.items() if o != "fp16"]
    for i, (name, option) in enumerate(todo):
        module = model.get_submodule(name)
        if is_quantized_layer(module):
            if module.weight.packing.option != option:
                raise ValueError(
                    f"layer {name!r} is already quantized as {module.weight.packing.option}, the config asks {option}; "
                    "start from the unquantized model"
                )
            module.act_bits = act_bits
            continue
        method, bits = parse_option(option, name)
        if table is not None:
            q = table.get(name, option)
        else:
            q = quantize_weight(module.weight, method, bits, seed, name=name)
        new = make_layer(module, q, act_bits)
        new.to(module.weight.device)
        _set_submodule(model, name, new)
        if progress:
            progress(i + 1, len(todo), name)
    after = module_nbytes(model)
    dense_only = [{"name": d.name, "type": d.type_name, "weights": d.numel} for d in dense_only_layers(model)]
    return {
        "dense_only": dense_only,  # weight layers of kinds we cannot quantize (kept dense, e.g. Conv3d)
        "bytes_before": before,
        "bytes_after": after,
        "avg_bits": config.avg_bits(),
        "avg_bits_stored": config.avg_bits(accounting_mode="stored"),
        "options": dict(config.options),
        "counts": dict(Counter(config.options.values())),
        "act_bits": act_bits,
    }
