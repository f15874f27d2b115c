"""Which online sites take part in a round.

Selection is a pure function of (seed, round number, set of online sites), so
a restarted orchestrator re-derives the same cohort for the same round and an
audit can recompute who was asked to train.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

# Keeps products such as 0.7 * 10 == 7.000000000000001 from rounding up to 8.
_EPS = 1e-9


class NotEnoughSites(RuntimeError):
    """Raised rather than running a round too small to aggregate or to be robust."""

    def __init__(self, online: int, needed: int) -> None:
        super().__init__(f"{online} site(s) online, but at least {needed} needed for this round")
        self.online = online
        self.needed = needed


def select_sites(
    online: Sequence[str],
    *,
    fraction: float | None = None,
    count: int | None = None,
    minimum: int = 1,
    seed: int,
    round_number: int,
) -> list[str]:
    """Pick the round's sites, returned sorted.

    ``fraction`` asks for ceil(fraction * online) sites, ``count`` for at most
    ``count``; either is raised to ``minimum`` (the strategy's quorum, e.g. a
    trimmed mean's ``min_updates``) and capped at the number online. With
    neither, every online site trains. Input order and duplicates do not
    matter because the online set is sorted before sampling.
    """
    if fraction is not None and count is not None:
        raise ValueError("give either fraction or count, not both")
    if fraction is not None and not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if count is not None and count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if minimum < 1:
        raise ValueError(f"minimum must be >= 1, got {minimum}")
    if seed < 0 or round_number < 0:
        raise ValueError(f"seed and round_number must be >= 0, got {seed} and {round_number}")
    candidates = sorted(set(online))
    if len(candidates) < minimum:
        raise NotEnoughSites(len(candidates), minimum)
    if fraction is not None:
        wanted = math.ceil(fraction * len(candidates) - _EPS)
    elif count is not None:
        wanted = count
    else:
        return candidates
    size = min(len(candidates), max(wanted, minimum))
    rng = np.random.default_rng([seed, round_number])
    chosen = rng.choice(len(candidates), size=size, replace=False)
    return [candidates[i] for i in sorted(chosen)]
