"""The paper's random configuration sampler (§2.2) and stable config keys.

Per configuration a probability ``p ~ U(a_l, a_u)`` (default ``U(0, 1)``) is drawn; every layer then independently
takes the lowest bit width with probability ``p`` (else the next one) and a method uniformly among the allowed
methods at that width. Mixing ``p`` over configurations spreads the average bit width over the whole range.

:class:`ConfigSampler` turns this into an infinite deterministic stream: config ``i`` comes from
``numpy.random.default_rng([seed, i])`` alone, so a resumed search (or another worker) reproduces it exactly.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence

import numpy as np

from ..quant.config import did_you_mean
from ..quant.options import FP_OPTION, METHODS, OPTIONS, SEARCH_BITS, format_option, parse_option

__all__ = ["ConfigSampler", "config_key", "option_set", "sample_config"]


def config_key(options: Mapping[str, str]) -> str:
    """Stable identity of a configuration: sha256 (hex) of its canonical JSON (sorted keys, no spaces)."""
    if not isinstance(options, Mapping) or not options:
        raise ValueError("config_key needs a non-empty mapping layer name → option")
    text = json.dumps(dict(options), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def option_set(methods: Iterable[str] = METHODS, bits: Iterable[int] = SEARCH_BITS) -> tuple[str, ...]:
    """Options of every method at every width, e.g. ``option_set(("uaq",), (3, 4))`` → ``("uaq-3", "uaq-4")``."""
    methods, bits = list(dict.fromkeys(methods)), sorted(set(bits))
    if not methods or not bits:
        raise ValueError("option_set needs at least one method and one bit width")
    return tuple(format_option(m, b) for b in bits for m in methods)


class _Plan:
    """Validated sampler inputs, prepared once: layer order, the methods per bit width, ties and kept layers."""

    def __init__(
        self,
        layer_names: Sequence[str],
        options: Sequence[str],
        keep: Iterable[str],
        bits_choices: Sequence[int] | None,
        p_range: tuple[float, float],
        tie: Mapping[str, str] | None,
    ) -> None:
        if isinstance(layer_names, str):
            raise ValueError("layer_names must be a list of layer names, not one string")
        names = list(layer_names)
        if not names:
            raise ValueError("no layers to sample: pass the model's quantizable layer names (see quantizable_layers)")
        bad = [n for n in names if not isinstance(n, str) or not n]
        if bad:
            raise ValueError(f"layer names must be non-empty strings, got {bad[0]!r}")
        if len(set(names)) != len(names):
            dup = next(n for n in names if names.count(n) > 1)
            raise ValueError(f"layer name {dup!r} appears more than once: pass each layer once")
        name_set = set(names)

        if isinstance(options, str):
            raise ValueError(f"options must be a list of options such as {list(OPTIONS[:2])}, not one string")
        by_bits: dict[int, list[str]] = {}
        for option in dict.fromkeys(options):  # keep order, drop repeats
            if option == FP_OPTION:
                raise ValueError(f"{FP_OPTION!r} is not a sampled option: list layers kept unquantized in keep=")
            parsed = parse_option(option)  # ValueError names the bad option and the valid forms
            assert parsed is not None
            by_bits.setdefault(parsed[1], []).append(option)
        if not by_bits:
            raise ValueError(f"no options to sample from: pass e.g. options={list(OPTIONS)}")

        if bits_choices is None:
            bits = sorted(by_bits)
        else:
            bits = list(dict.fromkeys(int(b) for b in bits_choices))
            if not bits:
                raise ValueError("bits_choices is empty: pass e.g. (3, 4), the lowest-bit width first")
            missing = [b for b in bits if b not in by_bits]
            if missing:
                raise ValueError(
                    f"no option with {missing[0]} bits among options {list(dict.fromkeys(options))}: "
                    f"add e.g. 'uaq-{missing[0]}' to options or drop {missing[0]} from bits_choices"
                )
        if len(bits) > 2:
            raise ValueError(f"bits_choices {bits}: the paper's sampler mixes at most two bit widths, e.g. (3, 4)")
        self.bits = bits
        self.methods = [by_bits[b] for b in bits]

        lo, hi = (float(x) for x in p_range)
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"p_range {p_range!r} must satisfy 0 <= low <= high <= 1 (the paper uses (0, 1))")
        self.p_range = (lo, hi)

        if isinstance(keep, str):
            keep = [keep]
        kept: set[str] = set()
        for pattern in dict.fromkeys(keep):
            matched = {pattern} if pattern in name_set else {n for n in names if fnmatch.fnmatchcase(n, pattern)}
            if not matched:
                raise ValueError(
                    f"keep names {pattern!r}, which is not one of the layers{did_you_mean(pattern, names)}: "
                    "pass layer names or glob patterns (e.g. 'final_layer*')"
                )
            kept |= matched
        self.keep = frozenset(kept)

        self.tie: dict[str, str] = {}
        for follower, leader in dict(tie or {}).items():
            for n in (follower, leader):
                if n not in name_set:
                    raise ValueError(f"tie names {n!r}, which is not one of the layers{did_you_mean(n, names)}")
            if leader in (tie or {}):
                raise ValueError(f"tie: leader {leader!r} is itself tied to another layer; tie to the final leader")
            if follower == leader:
                raise ValueError(f"tie: layer {follower!r} is tied to itself")
            self.tie[follower] = leader
        self.names = names

    def draw(self, rng: np.random.Generator) -> dict[str, str]:
        n = len(self.names)
        p = rng.uniform(*self.p_range) if self.p_range[0] < self.p_range[1] else self.p_range[0]
        u_bits = rng.random(n)
        u_method = rng.random(n)
        if len(self.bits) == 1:
            which = np.zeros(n, dtype=np.int64)
        else:
            which = (u_bits >= p).astype(np.int64)  # 0 → lowest width (probability p), 1 → the other one
        out: dict[str, str] = {}
        for name, w, u in zip(self.names, which.tolist(), u_method.tolist(), strict=True):
            if name in self.keep:
                out[name] = FP_OPTION
                continue
            choices = self.methods[w]
            out[name] = choices[min(int(u * len(choices)), len(choices) - 1)]
        for follower, leader in self.tie.items():
            if follower not in self.keep:
                out[follower] = out[leader]
        return out


def sample_config(
    layer_names: Sequence[str],
    rng: np.random.Generator,
    options: Sequence[str] = OPTIONS,
    keep: Iterable[str] = (),
    bits_choices: Sequence[int] | None = None,
    p_range: tuple[float, float] = (0.0, 1.0),
    tie: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """One random configuration (layer → option) by the paper's sampler.

    ``p ~ U(p_range)`` is the chance of the first (lowest) width of ``bits_choices`` (default: the widths present in
    ``options``, lowest first, i.e. (3, 4)); the method is uniform among ``options`` at the drawn width. Layers in
    ``keep`` (names or glob patterns) get ``fp16``; ``tie`` maps follower → leader layers that copy the leader's
    choice (the paper's DiT timestep MLPs). Draws are made for every layer, so ``keep``/``tie`` do not shift the
    other layers' choices.
    """
    return _Plan(layer_names, options, keep, bits_choices, p_range, tie).draw(rng)


class ConfigSampler:
    """Deterministic infinite stream of random configs: config ``i`` depends on ``(seed, i)`` only.

    Put :meth:`settings` into the journal's run settings so a resumed run's indices mean the same configs.
    """

    def __init__(
        self,
        layer_names: Sequence[str],
        seed: int = 42,
        options: Sequence[str] = OPTIONS,
        keep: Iterable[str] = (),
        bits_choices: Sequence[int] | None = None,
        p_range: tuple[float, float] = (0.0, 1.0),
        tie: Mapping[str, str] | None = None,
    ) -> None:
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.seed = int(seed)
        self._plan = _Plan(layer_names, options, keep, bits_choices, p_range, tie)
        self.options = tuple(o for ms in self._plan.methods for o in ms)

    @property
    def layer_names(self) -> list[str]:
        return list(self._plan.names)

    def settings(self) -> dict:
        """JSON-able description of the stream (seed, options, widths, p range, kept and tied layers)."""
        return {
            "sampler": "paper-random",
            "seed": self.seed,
            "options": list(self.options),
            "bits_choices": list(self._plan.bits),
            "p_range": list(self._plan.p_range),
            "keep": sorted(self._plan.keep),
            "tie": dict(sorted(self._plan.tie.items())),
        }

    def config(self, i: int) -> dict[str, str]:
        """The ``i``-th configuration of the stream."""
        if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or i < 0:
            raise ValueError(f"sample index must be a non-negative integer, got {i!r}")
        return self._plan.draw(np.random.default_rng([self.seed, int(i)]))

    def stream(self, start: int = 0, stop: int | None = None) -> Iterator[tuple[int, dict[str, str]]]:
        """Yield ``(i, config)`` for ``i = start, start+1, …`` (up to ``stop`` exclusive, or forever)."""
        i = start
        while stop is None or i < stop:
            yield i, self.config(i)
            i += 1

    def pending(
        self, done: Collection[int], stop: int | None = None, start: int = 0
    ) -> Iterator[tuple[int, dict[str, str]]]:
        """Like :meth:`stream` but skipping indices in ``done`` (e.g. ``journal.done_indices()``) — resume."""
        done = set(done)
        i = start
        while stop is None or i < stop:
            if i not in done:
                yield i, self.config(i)
            i += 1

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        return self.stream()

    def __repr__(self) -> str:
        return f"ConfigSampler({len(self._plan.names)} layers, seed={self.seed}, options={list(self.options)})"

