"""The headline construction: a knapsack at a budget over the predictor's *marginal effects*.

The paper's hop-norm unit scores seed a first knapsack; then, ``rounds`` times, every (layer, option) is scored by
how much the predicted log objective improves when that layer alone takes the option around the current config,
and the knapsack is solved again over those scores. The config with the best predicted objective wins.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Protocol

import numpy as np

from ..quant.layer_table import LayerInfo
from .construct import Construction, knapsack
from .scores import VariantScore

__all__ = ["Predictor", "marginal_scores", "predicted_knapsack"]


class Predictor(Protocol):
    """What the construction needs of a trained predictor (``PredictorEnsemble``, ``BaselineEnsemble``)."""

    def predict(self, configs: Sequence[Mapping[str, str]]) -> np.ndarray:
        """The predicted objective (lower is better) of each config."""
        ...


def marginal_scores(predictor: Predictor, op_scores: Sequence[VariantScore],
                    context: Mapping[str, str]) -> list[VariantScore]:
    """Per layer and option: how much the predicted log objective improves when that layer alone takes the
    option, all other layers as in ``context`` (higher is better). Summed over layers this is a first-order
    model of the predictor around ``context``, so a knapsack over it minimizes the predicted objective."""
    units = {s.unit: s for s in op_scores}
    configs, keys = [dict(context)], []
    for unit, s in units.items():
        for v in {x.variant for x in op_scores if x.unit == unit}:
            configs.append({**context, s.members[0]: v[0]})
            keys.append((unit, v))
    pred = np.log(np.maximum(predictor.predict(configs), 1e-30))
    base = pred[0]
    return [VariantScore(u, "op", units[u].op_type, units[u].block_category, units[u].block_index,
                         tuple(units[u].members), v, float(base - p))
            for (u, v), p in zip(keys, pred[1:], strict=True)]


def predicted_knapsack(predictor: Predictor, op_scores: Sequence[VariantScore], layers: Sequence[LayerInfo], *,
                       target_bits: float | None = None, max_bytes: int | None = None,
                       rounds: int = 3) -> Construction:
    """The knapsack at a budget over the predictor's marginal effects, re-linearized around its own answer:
    start from the knapsack over the paper's unit scores, then ``rounds`` times score every (layer, option)
    around the current config and solve again; the config with the best predicted objective wins."""
    c = knapsack(op_scores, layers, target_bits=target_bits, max_bytes=max_bytes)
    best, best_pred = c, float(predictor.predict([c.options])[0])
    for _ in range(rounds):
        c = knapsack(marginal_scores(predictor, op_scores, c.options), layers, target_bits=target_bits,
                     max_bytes=max_bytes)
        pred = float(predictor.predict([c.options])[0])
        if pred < best_pred:
            best, best_pred = c, pred
    return best
