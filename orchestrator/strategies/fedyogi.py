"""FedYogi (Reddi et al. 2021, "Adaptive Federated Optimization")."""

from __future__ import annotations

import numpy as np

from .base import AdaptiveServerOptimizer
from .fedadam import FedAdamOptions


class FedYogi(AdaptiveServerOptimizer):
    """v = v - (1 - b2) * delta^2 * sign(v - delta^2).

    Unlike Adam, v moves by an additive amount towards delta^2, so a single
    large update cannot blow up (or a quiet round collapse) the effective
    learning rate as fast; Reddi et al. found it the most robust variant.
    Same options as FedAdam.
    """

    name = "fedyogi"
    Options = FedAdamOptions
    options: FedAdamOptions

    def _update_second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        v -= (1.0 - self.options.beta2) * delta_sq * np.sign(v - delta_sq)
