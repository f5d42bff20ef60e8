"""Unit scores (paper §4.2); ``search.insights`` aggregates them (§4.3).

A unit variant ``g`` (the unit's layers set to one option each) is scored per fold predictor ``f`` from the L1 norm
of its output node's embedding at the unit's hop depth ``m = min(hop, layers)``:

    S(g) = Σ_f ρ_f^m · (‖h_f^m(v_out)‖₁ − μ_f^m) / σ_f^m

with ``ρ_f^m`` the fold's held-out Spearman of the hop-m graph embedding norm and ``μ_f^m, σ_f^m`` the moments of
``‖h_v^m‖₁`` over the hop-m pooled nodes of its training graphs. As in the paper, ``h^m(v_out)`` is computed on the
unit **in isolation**: the subgraph induced by the unit's nodes (its layers and the combine nodes between them) with
the variant's features; nothing outside the unit enters (our traced units may have upstream neighbours outside the
unit within m hops, e.g. the residual stream into an ``add``; the isolated evaluation ignores them by design, so a
score depends on the unit's own choices only). ``context=`` evaluates in the whole graph instead, the other layers
set to that config. Positive scores mean a better objective than the typical configuration.

Op-level units are single layers (hop 0); block-level units enumerate every option combination of their layers
(``len(options)^k``). Units with more than ``max_variants`` combinations are *sampled* (seeded; the uniform variants
always included) and marked ``sampled=True``.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .graph import LayerGraph, Unit
from .predictor import PredictorEnsemble

__all__ = ["UnitScore", "VariantScore", "unit_scores", "unit_variants"]


@dataclass(frozen=True)
class VariantScore:
    """A score for one variant (one option per member layer) of one unit: what config construction reads
    (``search.construct.UnitScoreLike``)."""

    unit: str
    level: str  # "op" | "block"
    op_type: str  # the layer's op type (op level); the output node's op type or combine op (block level)
    block_category: str
    block_index: int
    members: tuple[str, ...]  # the unit's layer names (as ``graph.Unit.members``)
    variant: tuple[str, ...]  # one option per member
    score: float


@dataclass(frozen=True)
class UnitScore(VariantScore):
    """The score of one variant of one unit, with the variant's size and the hop depth scored."""

    bits: float  # average bits of the variant over the unit's layers
    nbytes: int  # bytes of the unit's layers under the variant
    hop: int  # hop depth used (min(unit hop, predictor layers))
    sampled: bool = False  # the unit's variants were sampled, not enumerated
    n_variants: int = 0  # all variants of the unit (len(options) ** len(members))

    @property
    def layers(self) -> tuple[str, ...]:
        return self.members

    def to_json(self) -> dict:
        return {"unit": self.unit, "level": self.level, "op_type": self.op_type,
                "block_category": self.block_category, "block_index": self.block_index,
                "members": list(self.members),
                "variant": list(self.variant), "score": self.score, "bits": self.bits, "nbytes": self.nbytes,
                "hop": self.hop, "sampled": self.sampled, "n_variants": self.n_variants}


def unit_variants(k: int, n_options: int, max_variants: int, seed: int | Sequence[int] = 0) -> tuple[np.ndarray, bool]:
    """Option-index combinations ``[V, k]``: all ``n_options^k`` in lexicographic order if ≤ ``max_variants``,
    else ``max_variants`` distinct ones drawn with ``seed`` (the ``n_options`` uniform ones first). Returns
    (variants, sampled)."""
    total = n_options ** k
    if total <= max_variants:
        return np.array(list(itertools.product(range(n_options), repeat=k)), dtype=np.int64).reshape(total, k), False
    rng = np.random.default_rng(seed)
    chosen: dict[tuple[int, ...], None] = {(o,) * k: None for o in range(min(n_options, max_variants))}
    while len(chosen) < max_variants:
        for row in rng.integers(0, n_options, size=(max_variants, k)):
            chosen.setdefault(tuple(int(v) for v in row), None)
            if len(chosen) >= max_variants:
                break
    return np.array(list(chosen), dtype=np.int64), True


def _op_type(graph: LayerGraph, unit: Unit) -> str:
    if unit.level == "op":
        return graph.layer(unit.members[0]).op_type
    return graph.nodes[graph.index(unit.output_node)].op


def unit_scores(ensemble: PredictorEnsemble, graph: LayerGraph | None = None, level: str = "block",
                options: Sequence[str] | None = None, max_variants: int = 7776, seed: int = 0,
                context: Mapping[str, str] | None = None) -> list[UnitScore]:
    """Score every variant of every unit of ``level`` (see the module docstring), units in layer order and
    variants in enumeration order. ``options`` defaults to the predictor's quantized options."""
    graph = ensemble.graph if graph is None else graph
    if graph is not ensemble.graph and graph.fingerprint != ensemble.graph.fingerprint:
        raise ValueError("the graph is not the one the predictor was trained on")
    graph = ensemble.graph  # node indices of the predictor's own graph
    fb = ensemble.features
    options = list(fb.quant_options if options is None else options)
    opt_idx = torch.tensor([fb.option_index(o) for o in options])
    if not options:
        raise ValueError("no options to score")
    rho = ensemble.rho  # [F, hops + 1]
    mu = np.stack([f.mu for f in ensemble.folds])
    sigma = np.stack([f.sigma for f in ensemble.folds])
    out: list[UnitScore] = []
    for u_i, unit in enumerate(graph.units(level)):
        k = len(unit.members)
        hop = min(unit.hop, ensemble.hops)
        var, sampled = unit_variants(k, len(options), max_variants, (seed, u_i))
        idx = opt_idx[torch.from_numpy(var)]
        if context is None:
            norms = ensemble.subgraph_norms(unit.nodes, unit.output_node, hop, unit.members, idx)
        else:
            norms = ensemble.context_norms(unit.output_node, hop, unit.members, idx, context)
        score = (rho[:, hop, None] * (norms - mu[:, hop, None]) / sigma[:, hop, None]).sum(0)
        layers = [fb.layer_index(n) for n in unit.members]
        nbytes, numel = fb.config_bytes(idx, layers)
        op_type = _op_type(graph, unit)
        for v in range(len(var)):
            out.append(UnitScore(unit.name, level, op_type, unit.category, unit.block_index, tuple(unit.members),
                                 tuple(options[j] for j in var[v]), float(score[v]),
                                 8.0 * float(nbytes[v]) / numel, int(nbytes[v]), hop, sampled,
                                 len(options) ** k))
    return out
