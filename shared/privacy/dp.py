"""Client-level differential privacy for federated averaging (DP-FedAvg).

McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models": each site's whole update is clipped to L2 norm ``C`` so that one
site (one hospital, with all of its patients) changes the sum of updates by at
most ``C``; Gaussian noise of standard deviation ``z * C`` on that sum then
gives a guarantee that :mod:`shared.privacy.accountant` turns into
(epsilon, delta).

The noise can be added in two places:

* centrally, by the orchestrator on the aggregated sum
  (:func:`add_gaussian_noise`) -- the orchestrator must then be trusted with
  the un-noised sum;
* distributed, by every site on its own update before secure aggregation
  (:func:`add_noise_share`), each adding N(0, (zC)^2 / n) so that the n shares
  in the sum add up to the full variance while no party ever sees a sum
  without noise.

Randomness always comes from an explicit ``numpy.random.Generator``. Tests pass
a seeded one; a production site must use :func:`system_rng` (seeded from the
operating system's CSPRNG), because noise that an attacker can predict can be
subtracted. Floating-point Gaussian sampling is not hardened against the
precision attacks of Mironov (CCS 2012); that is accepted here as in the
common DP training libraries.

Updates are ``{onnx_initializer_name: float32 ndarray}`` mappings, the same
shape as the UPDATE message carries.
"""

from __future__ import annotations

import math
import numbers
import secrets
from collections.abc import Mapping

import numpy as np

Update = Mapping[str, np.ndarray]


def system_rng() -> np.random.Generator:
    """A generator seeded from the OS CSPRNG, as production noise must be."""
    return np.random.default_rng(secrets.randbits(256))


def global_l2_norm(update: Update) -> float:
    """L2 norm over all tensors jointly, since the privacy unit is the whole update."""
    _validate_update(update)
    return math.sqrt(sum(float(np.sum(np.square(t, dtype=np.float64))) for t in update.values()))


def clip_update(update: Update, max_norm: float) -> tuple[dict[str, np.ndarray], float]:
    """Scale the update down to joint L2 norm ``max_norm`` and return it with the original norm.

    The original norm is returned because adaptive clipping needs to know
    whether this update was clipped. Updates already within the bound are
    returned unchanged (as copies) so that clipping never adds bias to them.
    """
    _check_positive("max_norm", max_norm)
    norm = global_l2_norm(update)
    scale = min(1.0, max_norm / norm) if norm > 0 else 1.0
    clipped = {name: (t * scale).astype(t.dtype, copy=False) for name, t in update.items()}
    return clipped, norm


def add_gaussian_noise(
    aggregate_sum: Update, noise_multiplier: float, clip_norm: float, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """Central DP: noise the SUM of clipped updates with std ``noise_multiplier * clip_norm``.

    The std is calibrated to the sum because ``clip_norm`` bounds one site's
    contribution to the sum; divide by the number (or expected number) of sites
    only after noising.
    """
    _check_non_negative("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    return _add_noise(aggregate_sum, noise_multiplier * clip_norm, rng)


def noise_share_std(noise_multiplier: float, clip_norm: float, num_sites: int) -> float:
    """Per-site std for distributed noise: n independent shares sum to std ``z * C``.

    ``num_sites`` must be the smallest number of contributions that can end up
    in the sum -- with secure aggregation that is its threshold ``t``, not the
    number of sites invited -- otherwise dropouts leave the sum under-noised.
    """
    _check_non_negative("noise_multiplier", noise_multiplier)
    _check_positive("clip_norm", clip_norm)
    if not isinstance(num_sites, int) or num_sites < 1:
        raise ValueError(f"num_sites must be a positive int, got {num_sites!r}")
    return noise_multiplier * clip_norm / math.sqrt(num_sites)


def add_noise_share(
    clipped_update: Update,
    noise_multiplier: float,
    clip_norm: float,
    num_sites: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """Distributed DP: add this site's share of the aggregate noise to its clipped update."""
    return _add_noise(clipped_update, noise_share_std(noise_multiplier, clip_norm, num_sites), rng)


def add_noise_with_std(update: Update, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Add N(0, std^2) to every coordinate, where ``std`` was calibrated by another party.

    A site in a federation does not choose its own noise share: the orchestrator computes
    it with :func:`noise_share_std` from the round's clip bound and the fewest sites that
    can end up in the sum, and sends only the std.
    """
    _check_non_negative("std", std)
    return _add_noise(update, std, rng)


def _add_noise(update: Update, std: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    _validate_update(update)
    if not isinstance(rng, np.random.Generator):
        raise TypeError(f"rng must be a numpy.random.Generator, got {type(rng).__name__}")
    return {
        name: (t + rng.normal(0.0, std, size=t.shape)).astype(t.dtype, copy=False)
        for name, t in update.items()
    }


def split_noise_multiplier(noise_multiplier: float, count_noise_std: float) -> float:
    """Noise multiplier left for the update when adaptive clipping also releases a noised count.

    Andrew et al. 2021 (Sec. 3): the clipped-count query has sensitivity 1/2,
    so releasing both is as private as one Gaussian query with
    z^-2 = z_update^-2 + (2 * sigma_b)^-2. Solving for ``z_update`` keeps the
    total guarantee equal to the ``noise_multiplier`` the accountant was told.
    """
    _check_positive("noise_multiplier", noise_multiplier)
    _check_positive("count_noise_std", count_noise_std)
    remainder = noise_multiplier**-2 - (2.0 * count_noise_std) ** -2
    if remainder <= 0:
        raise ValueError(
            f"count_noise_std={count_noise_std} is too small for noise_multiplier="
            f"{noise_multiplier}: need 2 * count_noise_std > noise_multiplier"
        )
    return remainder**-0.5


class AdaptiveClipper:
    """Quantile-tracking clip norm (Andrew et al. 2021, "Differentially Private Learning with Adaptive Clipping").

    A fixed clip norm is either too small (biasing every update) or too large
    (drowning the signal in noise), and the right value drifts during
    training. Each round the orchestrator learns a noised count of sites whose
    update norm was within the current bound and moves the bound
    geometrically towards the ``target_quantile`` of the norm distribution:
    ``C <- C * exp(-learning_rate * (frac_unclipped - target_quantile))``.

    The count is divided by ``expected_sites`` (public), not by the realised
    number, which is what gives the count query its sensitivity of 1/2 (see
    :func:`split_noise_multiplier` for the privacy cost). Andrew et al. suggest
    ``count_noise_std = expected_sites / 20``.
    """

    def __init__(
        self,
        initial_clip: float,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        count_noise_std: float = 0.0,
        max_clip: float | None = None,
    ) -> None:
        _check_positive("initial_clip", initial_clip)
        if max_clip is not None:
            _check_positive("max_clip", max_clip)
        if not 0.0 < target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {target_quantile}")
        _check_positive("learning_rate", learning_rate)
        _check_non_negative("count_noise_std", count_noise_std)
        self._clip = float(initial_clip)
        self.target_quantile = float(target_quantile)
        self.learning_rate = float(learning_rate)
        self.count_noise_std = float(count_noise_std)
        self.max_clip = max_clip

    @property
    def clip_norm(self) -> float:
        """The bound the sites must use this round."""
        return self._clip

    def update(self, unclipped_count: float, expected_sites: int, rng: np.random.Generator) -> float:
        """Advance the clip norm from this round's count of unclipped updates; return the new norm.

        A site's bit is ``original_norm <= clip_norm`` with the norm returned by
        :func:`clip_update`; the count is the (securely aggregated) sum of bits.

        ``rng`` draws the count noise; with ``count_noise_std == 0`` the count is
        used as is (no privacy for it -- only for tests and trusted settings).
        """
        if not isinstance(expected_sites, int) or expected_sites < 1:
            raise ValueError(f"expected_sites must be a positive int, got {expected_sites!r}")
        _check_non_negative("unclipped_count", unclipped_count)
        noised = unclipped_count + rng.normal(0.0, self.count_noise_std)
        fraction = noised / expected_sites
        self._clip *= math.exp(-self.learning_rate * (fraction - self.target_quantile))
        if self.max_clip is not None:
            # Noise scales with the clip: when few updates fit, an unbounded clip chases its own noise.
            self._clip = min(self._clip, self.max_clip)
        return self._clip


def _validate_update(update: Update) -> None:
    if not isinstance(update, Mapping) or not update:
        raise ValueError("update must be a non-empty mapping of name -> ndarray")
    for name, tensor in update.items():
        if not isinstance(tensor, np.ndarray) or not np.issubdtype(tensor.dtype, np.floating):
            raise TypeError(f"update[{name!r}] must be a floating-point numpy array")
        if not np.all(np.isfinite(tensor)):
            raise ValueError(f"update[{name!r}] contains NaN or infinity")


def _check_positive(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")


def _check_non_negative(name: str, value: float) -> None:
    if not (isinstance(value, numbers.Real) and math.isfinite(value) and value >= 0):
        raise ValueError(f"{name} must be a non-negative finite number, got {value!r}")
