"""Coordinate-wise median (Yin et al. 2018): robust to a minority of bad updates."""

from __future__ import annotations

import numpy as np

from .base import CoordinateWiseStrategy


class Median(CoordinateWiseStrategy):
    """Each coordinate of the aggregated update is the unweighted median over sites.

    With an even number of sites the two middle values are averaged, as in
    ``np.median`` and Flower's FedMedian. Holds all updates in memory.
    """

    name = "median"

    def _reduce_coordinates(self, stacked: np.ndarray) -> np.ndarray:
        return np.median(stacked, axis=0)
