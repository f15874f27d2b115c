"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization")."""

from __future__ import annotations

import numpy as np

from .base import AdaptiveOptions, AdaptiveServerOptimizer, UnitInterval


class FedAdamOptions(AdaptiveOptions):
    """Flower's defaults (server_lr 0.1, beta2 0.99); FLamby used server_lr 0.01."""

    beta2: UnitInterval = 0.99


class FedAdam(AdaptiveServerOptimizer):
    """v = b2 * v + (1 - b2) * delta^2: an exponential average of squared updates."""

    name = "fedadam"
    Options = FedAdamOptions
    options: FedAdamOptions

    def _update_second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        beta2 = self.options.beta2
        v *= beta2
        v += (1.0 - beta2) * delta_sq
