"""FedAvgM (Hsu et al. 2019): FedAvg with server-side momentum."""

from __future__ import annotations

import numpy as np

from .base import Positive, ServerOptimizer, StrategyOptions, UnitInterval


class FedAvgMOptions(StrategyOptions):
    """Momentum defaults to 0.9 as in Hsu et al.; Flower's 0 would make this FedAvg."""

    server_lr: Positive = 1.0
    momentum: UnitInterval = 0.9


class FedAvgM(ServerOptimizer):
    """v = momentum * v + avg_delta; new = global + server_lr * v.

    Momentum smooths the drift between rounds when sites' data are non-IID.
    Equivalent to Flower's form with pseudo-gradient -avg_delta.
    """

    name = "fedavgm"
    Options = FedAvgMOptions
    options: FedAvgMOptions
    buffers = ("momentum",)

    def _step_tensor(self, delta: np.ndarray, buffers: dict[str, np.ndarray]) -> np.ndarray:
        velocity = buffers["momentum"]
        velocity *= self.options.momentum
        velocity += delta
        return self.options.server_lr * velocity
