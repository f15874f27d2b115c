"""Aggregation strategies, selected by name from a ``StrategyConfig``."""

from __future__ import annotations

from .base import Aggregation, NotEnoughUpdates, Strategy, StrategyConfig, Weights
from .dp_fedavg import DPFedAvg, RoundPlan
from .fedadagrad import FedAdagrad
from .fedadam import FedAdam
from .fedavg import FedAvg
from .fedavgm import FedAvgM
from .fedprox import FedProx
from .fedyogi import FedYogi
from .median import Median
from .norm_bounding import NormBounding
from .trimmed_mean import TrimmedMean

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (
        FedAvg,
        FedProx,
        FedAvgM,
        FedAdam,
        FedYogi,
        FedAdagrad,
        Median,
        TrimmedMean,
        NormBounding,
        DPFedAvg,
    )
}

SECURE_SUM_STRATEGIES = frozenset({"fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "dp_fedavg"})
"""Strategies whose server step needs only the (weighted) mean of the updates, so they work with secure
aggregation; median, trimmed mean and norm bounding look at every update and cannot."""


def make_strategy(config: StrategyConfig) -> Strategy:
    """Build the strategy a config or a recorded model version names."""
    try:
        cls = STRATEGIES[config.name]
    except KeyError:
        raise ValueError(
            f"unknown strategy {config.name!r}; known strategies: {sorted(STRATEGIES)}"
        ) from None
    return cls(config.options)


__all__ = [
    "SECURE_SUM_STRATEGIES",
    "STRATEGIES",
    "Aggregation",
    "DPFedAvg",
    "FedAdagrad",
    "FedAdam",
    "FedAvg",
    "FedAvgM",
    "FedProx",
    "FedYogi",
    "Median",
    "NormBounding",
    "NotEnoughUpdates",
    "RoundPlan",
    "Strategy",
    "StrategyConfig",
    "TrimmedMean",
    "Weights",
    "make_strategy",
]
