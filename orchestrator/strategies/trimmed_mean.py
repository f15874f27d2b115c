"""Coordinate-wise trimmed mean (Yin et al. 2018)."""

from __future__ import annotations

import math
from typing import Annotated

import numpy as np
import pydantic

from .base import CoordinateWiseStrategy, StrategyOptions

# Keeps products such as 0.3 * 10 == 2.9999999999999996 from flooring to 2.
_EPS = 1e-9


class TrimmedMeanOptions(StrategyOptions):
    """``trim_fraction`` is cut from each end; 0.2 matches Flower's FedTrimmedAvg."""

    trim_fraction: Annotated[float, pydantic.Field(ge=0.0, lt=0.5)] = 0.2


class TrimmedMean(CoordinateWiseStrategy):
    """Per coordinate, drop the floor(trim_fraction * n) largest and smallest values, mean the rest.

    Unweighted and holds all updates in memory. A round needs enough sites
    that at least one value is trimmed at each end; otherwise the rule would
    quietly fall back to a plain mean with no robustness, so ``finish()``
    raises ``NotEnoughUpdates`` instead.
    """

    name = "trimmed_mean"
    Options = TrimmedMeanOptions
    options: TrimmedMeanOptions

    @property
    def min_updates(self) -> int:
        """Smallest n with floor(trim_fraction * n) >= 1 (1 when nothing is trimmed)."""
        fraction = self.options.trim_fraction
        return 1 if fraction == 0 else math.ceil(1 / fraction - _EPS)

    def _reduce_coordinates(self, stacked: np.ndarray) -> np.ndarray:
        n = stacked.shape[0]
        cut = math.floor(self.options.trim_fraction * n + _EPS)
        return np.sort(stacked, axis=0)[cut : n - cut].mean(axis=0)
