"""Norm bounding (Sun et al. 2019, "Can You Really Backdoor Federated Learning?")."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping

import numpy as np

from .base import (
    Aggregation,
    Positive,
    ServerStep,
    Strategy,
    StrategyOptions,
    WeightedAverage,
)


class NormBoundingOptions(StrategyOptions):
    """No default: a sensible bound depends on the model and local training length."""

    max_norm: Positive


class ClippedWeightedAverage(WeightedAverage):
    """Weighted average of updates each scaled down to L2 norm <= max_norm.

    The norm spans all aggregated tensors (the update as one vector), so an
    attacker cannot hide a large change by spreading it over layers. Still
    streaming: the norm is computed per update before it is folded in.
    """

    def __init__(
        self,
        strategy: str,
        global_weights: Mapping[str, np.ndarray],
        names: Collection[str],
        server_step: ServerStep,
        max_norm: float,
    ) -> None:
        super().__init__(strategy, global_weights, names, server_step)
        self._max_norm = max_norm

    def _scale(self, update: Mapping[str, np.ndarray]) -> float:
        norm = math.sqrt(
            sum(float(np.sum(np.square(update[name], dtype=np.float64))) for name in self._names)
        )
        return min(1.0, self._max_norm / norm) if norm > 0 else 1.0


class NormBounding(Strategy):
    """Clip each update to ``max_norm``, then weighted FedAvg.

    Sample counts are self-reported, so a site can still enlarge its weight;
    clipping bounds the size of its push, not its share of the average.
    """

    name = "norm_bounding"
    Options = NormBoundingOptions
    options: NormBoundingOptions

    def _new_aggregation(
        self, global_weights: Mapping[str, np.ndarray], names: set[str]
    ) -> Aggregation:
        return ClippedWeightedAverage(
            self.name, global_weights, names, self._server_step, self.options.max_norm
        )
