"""FedAdagrad (Reddi et al. 2021, "Adaptive Federated Optimization")."""

from __future__ import annotations

import numpy as np

from .base import AdaptiveOptions, AdaptiveServerOptimizer, UnitInterval


class FedAdagradOptions(AdaptiveOptions):
    """No beta2: Adagrad never forgets. beta1 defaults to 0 (no momentum) as in Flower."""

    beta1: UnitInterval = 0.0


class FedAdagrad(AdaptiveServerOptimizer):
    """v = v + delta^2: the step size only shrinks, which suits short federations."""

    name = "fedadagrad"
    Options = FedAdagradOptions
    options: FedAdagradOptions

    def _update_second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v += delta_sq
