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
