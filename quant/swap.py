"""Evaluate configurations by swapping prepared weights from the option table (no re-quantization).

:class:`ConfigSwapper` installs, per layer, either the original dense module or a packed
``QuantLinear``/``QuantConv2d`` built from the option table into the model's module tree, in place.
Quantized modules are built on first use and cached per ``(layer, option)``, so a repeated option costs
one ``setattr``; only layers whose option changes between consecutive :meth:`ConfigSwapper.apply` calls
are touched, and :meth:`ConfigSwapper.restore` puts every original module back (the very same objects,
whose parameters are never modified).

Memory: the cache holds at most one packed module per ``(layer, option)`` that was ever applied, on the
layer's device (its packed weight — the option table's own tensor when the layer is on the table's device — and a
copy of the bias). If all 6 search options of every layer get used
that is roughly ``Σ_options bits/16`` ≈ 1.3x the fp16 weights, on top of the dense model, which is
kept. :meth:`ConfigSwapper.clear_cache` drops every cached module that is not installed right now.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping

from torch import nn

from .config import QuantConfig, did_you_mean
from .layer_table import (
    LayerInfo,
    is_quantized_layer,
    layer_table_diff,
    layers_fingerprint,
    quantizable_layers,
    weights_fingerprint,
)
from .layers import QuantConv2d, QuantLinear, quantized_module
from .options import FP_OPTION, parse_option
from .table import OptionTable

ConfigLike = Mapping[str, str] | QuantConfig


class ConfigSwapper:
    """Swap quantized layers from an :class:`OptionTable` into ``model`` (in place) per configuration.

    ``apply(config)`` takes ``{layer: option}`` (``"uaq-4"``, ``"kmeans_c-3"``, …, ``"fp16"``) or a
    :class:`QuantConfig`; layers it leaves out stay ``fp16`` (their original module). The result is the
    same module tree, bit for bit in the forward pass, as ``quantize_(copy, config, table)`` would give.
    ``check_weights`` compares the model's weight fingerprint with the table's (hashes all quantizable
    weights once; turn it off when the table was just built from this model). Forward hooks registered
    on an original module do not run while a quantized module stands in its place.
    """

    def __init__(self, model: nn.Module, table: OptionTable, act_bits: int = 16, check_weights: bool = True):
        self.model = model
        self.table = table
        self._act_bits = act_bits
        layers = quantizable_layers(model)
        quantized = [n for n, m in model.named_modules() if is_quantized_layer(m)]
        if quantized:
            raise ValueError(
                f"the model already has quantized layers (e.g. {quantized[0]!r}); build the swapper on the "
                "unquantized model"
            )
        _check_layers(layers, table.layers)
        if check_weights and weights_fingerprint(model, layers) != table.fingerprint:
            raise ValueError(
                "the option table was computed from other weights than this model's (fingerprints differ); "
                "build it with option_table(model)"
            )
        self.layers: list[LayerInfo] = layers
        self._originals: dict[str, nn.Module] = {}
        self._slots: dict[str, tuple[nn.Module, str]] = {}
        for layer in layers:
            parent_name, _, attr = layer.name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            self._slots[layer.name] = (parent, attr)
            self._originals[layer.name] = getattr(parent, attr)
        self._cache: dict[tuple[str, str], QuantLinear | QuantConv2d] = {}
        self._current: dict[str, str] = {layer.name: FP_OPTION for layer in layers}

    # ------------------------------------------------------------------------------------- state
    @property
    def current(self) -> dict[str, str]:
        """The option installed for every layer now (``fp16`` = the original module)."""
        return dict(self._current)

    @property
    def act_bits(self) -> int:
        return self._act_bits

    @act_bits.setter
    def act_bits(self, bits: int) -> None:
        """Activation fake-quant bits of every quantized module, cached or installed (16 = off)."""
        self._act_bits = bits
        for module in self._cache.values():
            module.act_bits = bits

    @property
    def cached(self) -> list[tuple[str, str]]:
        """``(layer, option)`` pairs that have a built quantized module."""
        return list(self._cache)

    def cache_nbytes(self) -> int:
        """Bytes of the cached quantized modules' tensors (packed weights, which may be shared with the option
        table when both live on one device, and biases)."""
        return sum(t.numel() * t.element_size() for m in self._cache.values() for t in m.parameters())

    def clear_cache(self) -> None:
        """Drop cached quantized modules that are not installed right now."""
        keep = {(n, o) for n, o in self._current.items() if o != FP_OPTION}
        self._cache = {k: m for k, m in self._cache.items() if k in keep}

    # ------------------------------------------------------------------------------------ swaps
    def resolve(self, config: ConfigLike) -> dict[str, str]:
        """The full ``{layer: option}`` a config means (missing layers → ``fp16``), validated."""
        options = config.options if isinstance(config, QuantConfig) else config
        if not isinstance(options, Mapping):
            raise TypeError(f"a config must be a mapping layer → option or a QuantConfig, not {type(config).__name__}")
        unknown = [n for n in options if n not in self._current]
        if unknown:
            hint = did_you_mean(unknown[0], self._current)
            raise ValueError(
                f"{len(unknown)} configured name(s) are not quantizable layers of this model, e.g. "
                f"{unknown[0]!r}{hint}"
            )
        full = dict.fromkeys(self._current, FP_OPTION)
        for name, option in options.items():
            if parse_option(option, name) is not None and option not in self.table.entries.get(name, {}):
                raise ValueError(
                    f"the option table has no entry for layer {name!r} {option}; build it with this option "
                    "(option_table(model, options=...) or only=config)"
                )
            full[name] = option
        return full

    def apply(self, config: ConfigLike) -> dict[str, str]:
        """Install ``config`` (layers it leaves out → ``fp16``); returns the layers changed → new option.

        All quantized modules are built before anything is swapped, so a failure leaves the model as it was.
        """
        full = self.resolve(config)
        changed = {n: o for n, o in full.items() if self._current[n] != o}
        modules = {n: self._original_or_quantized(n, o) for n, o in changed.items()}
        for name, module in modules.items():
            parent, attr = self._slots[name]
            setattr(parent, attr, module)
            self._current[name] = changed[name]
        return changed

    def restore(self) -> None:
        """Put every original module back (the same objects as before the first apply)."""
        for name, module in self._originals.items():
            parent, attr = self._slots[name]
            setattr(parent, attr, module)
            self._current[name] = FP_OPTION

    @contextlib.contextmanager
    def applied(self, config: ConfigLike) -> Iterator[nn.Module]:
        """``with swapper.applied(cfg) as model: ...``; the previous configuration returns on exit."""
        previous = dict(self._current)
        self.apply(config)
        try:
            yield self.model
        finally:
            self.apply(previous)

    def __enter__(self) -> ConfigSwapper:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def _original_or_quantized(self, name: str, option: str) -> nn.Module:
        if option == FP_OPTION:
            return self._originals[name]
        module = self._cache.get((name, option))
        if module is None:
            original = self._originals[name]
            module = quantized_module(original, self.table.get(name, option), self._act_bits)
            module.to(original.weight.device)
            module.train(original.training)
            self._cache[(name, option)] = module
        return module


def _check_layers(model_layers: list[LayerInfo], table_layers: list[LayerInfo]) -> None:
    if layers_fingerprint(model_layers) == layers_fingerprint(table_layers):
        mismatched = [
            (a.name, a.dtype, b.dtype) for a, b in zip(model_layers, table_layers, strict=True) if a.dtype != b.dtype
        ]
        if mismatched:
            name, mine, theirs = mismatched[0]
            raise ValueError(
                f"layer {name!r} has dtype {mine} in the model but {theirs} in the option table; "
                "build the table from the model as it is now"
            )
        return
    raise ValueError(
        "the option table belongs to another model (layer tables differ: "
        + layer_table_diff(table_layers, model_layers, "table", "model") + ")"
    )
