"""Mixed-precision configurations: layer → option, tied to a model's layer table, JSON I/O."""

from __future__ import annotations

import difflib
import fnmatch
import json
import os
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from . import accounting
from .atomic import atomic_write_text
from .layer_table import LayerInfo, dtype_from_name, layer_table_diff, layers_fingerprint, quantizable_layers
from .options import FP_OPTION, parse_option

CONFIG_FORMAT = "qua2sedimo.config"
CONFIG_VERSION = 1

ModelLike = nn.Module | Iterable[LayerInfo]


def did_you_mean(name: str, names: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``names``, or ``""``: the hint of every "unknown name" error."""
    close = difflib.get_close_matches(str(name), list(names), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def rule_matches(pattern: str, name: str, tags: Mapping[str, Iterable[str]] | None = None) -> bool:
    """Whether a rule pattern selects layer ``name``: a name glob, or ``@tag`` against the layer's tags."""
    if not pattern.startswith("@"):
        return fnmatch.fnmatchcase(name, pattern)
    if tags is None:
        raise ValueError(f"rule {pattern!r} selects by op type/category: pass the layer tags "
                         "(search.graph.layer_tags(model)), or use a glob over layer names")
    want = pattern[1:].strip().lower()
    return any(t.lower() == want for t in tags.get(name, ()))


@dataclass
class QuantConfig:
    """A per-layer choice of quantization option for one model architecture.

    ``options`` maps every quantizable layer name to ``method-bits`` or ``fp16``; ``layers`` holds the
    layer table it was made for (names, shapes, dtypes) and ``fingerprint`` identifies it.
    """

    options: dict[str, str]
    layers: list[LayerInfo]
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [layer.name for layer in self.layers]
        if set(names) != set(self.options):
            missing = sorted(set(names) - set(self.options))[:5]
            extra = sorted(set(self.options) - set(names))[:5]
            raise ValueError(f"config options must cover exactly the model's layers (missing {missing}, extra {extra})")
        for name, option in self.options.items():
            parse_option(option, name)

    # ------------------------------------------------------------------------------- constructors
    @classmethod
    def uniform(cls, model: ModelLike, option: str, keep: Iterable[str] = (), meta: dict | None = None) -> QuantConfig:
        """Every layer gets ``option``; layers matching a ``keep`` name or glob pattern stay ``fp16``."""
        layers = quantizable_layers(model)
        if not layers:
            raise ValueError("the model has no quantizable Linear/Conv2d layers")
        parse_option(option)
        keep = list(keep)
        names = [layer.name for layer in layers]
        for pattern in keep:
            if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
                raise ValueError(f"keep pattern {pattern!r} matches no layer{did_you_mean(pattern, names)}")
        options = {
            n: FP_OPTION if any(fnmatch.fnmatchcase(n, p) for p in keep) else option for n in names
        }
        return cls(options, layers, dict(meta or {}, rule="uniform", option=option, keep=keep))

    @classmethod
    def from_options(
        cls, model: ModelLike, mapping: Mapping[str, str], default: str = FP_OPTION, meta: dict | None = None
    ) -> QuantConfig:
        """Options for named layers; every other layer gets ``default`` (``fp16`` unless told)."""
        layers = quantizable_layers(model)
        if not layers:
            raise ValueError("the model has no quantizable Linear/Conv2d layers")
        names = [layer.name for layer in layers]
        unknown = [n for n in mapping if n not in set(names)]
        if unknown:
            raise ValueError(
                f"{len(unknown)} layer name(s) are not quantizable layers of this model, e.g. "
                f"{unknown[0]!r}{did_you_mean(unknown[0], names)}; list them with quantizable_layers(model)"
            )
        parse_option(default)
        options = {n: mapping.get(n, default) for n in names}
        return cls(options, layers, dict(meta or {}))

    @classmethod
    def from_rules(
        cls, model: ModelLike, rules: Iterable[tuple[str, str]], default: str = FP_OPTION, meta: dict | None = None,
        tags: Mapping[str, Iterable[str]] | None = None,
    ) -> QuantConfig:
        """Options by rules ``(pattern, option)``, first match wins; unmatched layers get ``default``.

        A pattern is a glob over layer names (``"*.mlp.fc2"``) or ``@tag``: a layer whose ``tags`` (its op type and
        block category from the layer table, e.g. ``@feedforward``, ``@self-attn``, ``@FF-2``, ``@modulation``;
        case-insensitive) include it — portable across architectures whatever they name their layers.
        ``search.graph.layer_tags(model)`` gives the tags. A pattern that matches no layer is an error, so typos
        do not pass silently.
        """
        layers = quantizable_layers(model)
        if not layers:
            raise ValueError("the model has no quantizable Linear/Conv2d layers")
        names = [layer.name for layer in layers]
        rules = list(rules)
        for pattern, option in rules:
            parse_option(option, pattern)
            if not any(rule_matches(pattern, n, tags) for n in names):
                vocabulary = sorted({f"@{t}" for ts in (tags or {}).values() for t in ts})
                near = did_you_mean(pattern, vocabulary if pattern.startswith("@") else names)
                raise ValueError(f"rule pattern {pattern!r} matches no layer{near}")
        parse_option(default)
        options = {n: next((o for p, o in rules if rule_matches(p, n, tags)), default) for n in names}
        return cls(options, layers, dict(meta or {}, rule="rules", rules=[list(r) for r in rules], default=default))

    @staticmethod
    def parse_rules(text: str) -> list[tuple[str, str]]:
        """``pattern = option`` lines (``#`` comments, blank lines ignored) → rule list."""
        rules = []
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.split("#", 1)[0].strip()
            if not line:
                continue
            if line.count("=") != 1:
                raise ValueError(f"rule line {lineno} {raw.strip()!r}: write 'pattern = option', e.g. '*.fc2 = uaq-3' "
                                 "or '@feedforward = kmeans_c-3'")
            pattern, option = (s.strip() for s in line.split("="))
            parse_option(option, f"rule line {lineno}")
            rules.append((pattern, option))
        return rules

    # ---------------------------------------------------------------------------------- queries
    @property
    def fingerprint(self) -> str:
        return layers_fingerprint(self.layers)

    def counts(self) -> Counter:
        """How many layers take each option."""
        return Counter(self.options.values())

    def avg_bits(self, model: ModelLike | None = None, accounting_mode: str = "paper") -> float:
        """Average bits per weight b̄ over the quantizable layers (paper accounting by default:
        codes at b bits plus scale/codebook overhead; ``"stored"`` counts the real packed bytes)."""
        if model is not None:
            self.check_model(model)
        return accounting.average_bits(
            ((layer.shape, self.options[layer.name], layer.dtype) for layer in self.layers), accounting_mode
        )

    def nbytes(self, accounting_mode: str = "stored") -> int:
        """Bytes of the quantizable layers under this config."""
        return sum(
            accounting.option_nbytes(layer.shape, self.options[layer.name], layer.dtype, accounting_mode)
            for layer in self.layers
        )

    def check_model(self, model: ModelLike) -> None:
        """Raise ``ValueError`` if this config was made for a model with another layer table."""
        theirs = quantizable_layers(model)
        if layers_fingerprint(theirs) == self.fingerprint:
            return
        raise ValueError(
            "this config was made for another model (layer tables differ: "
            + layer_table_diff(self.layers, theirs, "config", "model")
            + "). Build a config for this model (e.g. QuantConfig.uniform) or load the matching one."
        )

    # ------------------------------------------------------------------------------------- JSON
    def to_dict(self) -> dict:
        return {
            "format": CONFIG_FORMAT,
            "version": CONFIG_VERSION,
            "fingerprint": self.fingerprint,
            "meta": self.meta,
            "layers": [dict(layer.to_json(), option=self.options[layer.name]) for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, data: Mapping, model: ModelLike | None = None, source: str = "config") -> QuantConfig:
        """Validate and build a config from its JSON object; with ``model``, check it matches."""
        if not isinstance(data, Mapping) or data.get("format") != CONFIG_FORMAT:
            raise ValueError(f"{source} is not a Qua2SeDiMo config (missing format {CONFIG_FORMAT!r})")
        version = data.get("version")
        if version != CONFIG_VERSION:
            raise ValueError(
                f"{source} has config version {version!r}; this release reads version {CONFIG_VERSION}. "
                "Update the node pack or re-create the config."
            )
        raw_layers = data.get("layers")
        if not isinstance(raw_layers, list) or not raw_layers:
            raise ValueError(f"{source} has no 'layers' list")
        layers, options = [], {}
        for i, item in enumerate(raw_layers):
            try:
                name, kind, shape = item["name"], item["kind"], tuple(int(s) for s in item["shape"])
                dtype, option = dtype_from_name(item["dtype"]), item["option"]
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{source}: layer entry {i} is malformed ({e!s})") from None
            if not isinstance(name, str) or name in options:
                raise ValueError(f"{source}: layer entry {i} has a missing or duplicate name {name!r}")
            parse_option(option, name)
            layers.append(LayerInfo(name, str(kind), shape, dtype))
            options[name] = option
        cfg = cls(options, layers, dict(data.get("meta") or {}))
        if data.get("fingerprint") not in (None, cfg.fingerprint):
            raise ValueError(f"{source}: fingerprint does not match its layer list (the file was edited or damaged)")
        if model is not None:
            cfg.check_model(model)
        return cfg

    @classmethod
    def from_json(cls, text: str, model: ModelLike | None = None, source: str = "config") -> QuantConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"{source} is not valid JSON: {e}") from None
        return cls.from_dict(data, model=model, source=source)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON, atomically."""
        atomic_write_text(path, self.to_json())

    @classmethod
    def load(cls, path: str | os.PathLike, model: ModelLike | None = None) -> QuantConfig:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ValueError(f"cannot read config file {str(path)!r}: {e}") from None
        return cls.from_json(text, model=model, source=f"config file {path.name!r}")
