"""FedProx (Li et al. 2020): FedAvg aggregation, proximal term on the sites."""

from __future__ import annotations

from typing import Annotated, Any

import pydantic

from .base import StrategyOptions
from .fedavg import FedAvg


class FedProxOptions(StrategyOptions):
    """``mu`` weights the (mu/2)*||w - w_global||^2 term added to each site's loss.

    0.01 is a middle value of the grid {0.001, 0.01, 0.1, 1} in the paper;
    Flower defaults to 0, which silently degenerates to FedAvg.
    """

    mu: Annotated[float, pydantic.Field(ge=0.0)] = 0.01


class FedProx(FedAvg):
    """The server side is plain FedAvg; only the sites' training changes."""

    name = "fedprox"
    Options = FedProxOptions
    options: FedProxOptions

    def training_overrides(self) -> dict[str, Any]:
        """The agent applies the proximal term, so it must be told ``mu`` every round."""
        return {"proximal_mu": self.options.mu}
