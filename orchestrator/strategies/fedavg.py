"""FedAvg (McMahan et al. 2017): the sample-weighted mean of the updates."""

from __future__ import annotations

from .base import Strategy


class FedAvg(Strategy):
    """new = global + sum(n_i * d_i) / sum(n_i); the base class's default rule.

    It exists as its own name so configs and model versions say ``fedavg``
    explicitly, and so FedProx can inherit it.
    """

    name = "fedavg"
