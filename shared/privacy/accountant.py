"""Privacy accounting on top of Google's ``dp-accounting`` RDP accountant.

The Renyi-DP analysis of the Poisson-subsampled Gaussian mechanism (Abadi et
al. 2016; Mironov, Talwar, Zhang 2019) is subtle enough that it is taken from
the library rather than re-derived here; this module only fixes how the
project's two mechanisms map onto it and turns the result into a budget that
the orchestrator and the edge agent can enforce.

* Client level (DP-FedAvg): one step per federated round; the sampling rate is
  the probability that a site takes part in a round (1.0 when every hospital
  participates every round); neighbouring datasets differ by one whole site.
* Sample level (DP-SGD on one site): one step per optimizer step with Poisson
  sampling at rate ``expected_batch_size / dataset_size``; neighbouring
  datasets differ by one record. Fixed-size shuffled batches are *not* what
  this analysis covers, which is why :mod:`edge_agent.dp_sgd` samples Poisson
  batches.

Epsilon is reported with the library's conversion from RDP (Canonne, Kamath,
Steinke 2020, Prop. 12), which is tighter than the original conversion
(Mironov 2017, Prop. 3) used by older published tables; :meth:`rdp_curve`
exposes the raw curve for audits that want to reproduce those tables.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant


class PrivacyBudgetExceeded(RuntimeError):
    """Another step would push epsilon past the configured budget; training must stop."""


class _SubsampledGaussianAccountant:
    """Composition of ``steps`` Poisson-subsampled Gaussian mechanisms at a fixed delta."""

    def __init__(self, noise_multiplier: float, sampling_rate: float, delta: float) -> None:
        _check_noise_multiplier(noise_multiplier)
        _check_sampling_rate(sampling_rate)
        _check_delta(delta)
        self.noise_multiplier = float(noise_multiplier)
        self.sampling_rate = float(sampling_rate)
        self.delta = float(delta)
        self._steps = 0
        self._earlier: dict[tuple[float, float], int] = {}

    @property
    def steps(self) -> int:
        """Steps (rounds or optimizer steps) charged so far, including earlier ones."""
        return self._steps + sum(self._earlier.values())

    def step(self, count: int = 1) -> None:
        """Record ``count`` more releases of the mechanism."""
        _check_steps("count", count)
        self._steps += count

    def add_earlier_steps(self, noise_multiplier: float, sampling_rate: float, count: int) -> None:
        """Charge ``count`` steps taken earlier with other parameters (noise, sampling rate).

        A site's dataset or batch size, or a federation's noise, can change between runs; a
        record's privacy loss composes over every step it was exposed to, so that history is
        kept and composed rather than forgotten or re-priced at today's parameters.
        """
        _check_noise_multiplier(noise_multiplier)
        _check_sampling_rate(sampling_rate)
        _check_steps("count", count)
        key = (float(noise_multiplier), float(sampling_rate))
        if key == (self.noise_multiplier, self.sampling_rate):
            self._steps += count
        elif count:
            self._earlier[key] = self._earlier.get(key, 0) + count

    def history(self) -> list[tuple[float, float, int]]:
        """``(noise_multiplier, sampling_rate, steps)`` of everything charged: what to persist.

        Give it back to :meth:`restore` after a restart. Order does not matter: RDP composes
        by addition.
        """
        segments = [(z, q, n) for (z, q), n in self._earlier.items()]
        if self._steps:
            segments.append((self.noise_multiplier, self.sampling_rate, self._steps))
        return segments

    def restore(self, history: list[tuple[float, float, int]]) -> None:
        """Charge a persisted :meth:`history` again, e.g. when a restarted process rebuilds its accountant."""
        for noise_multiplier, sampling_rate, count in history:
            self.add_earlier_steps(noise_multiplier, sampling_rate, count)

    def epsilon(self) -> float:
        """Epsilon spent so far at this accountant's delta."""
        return self.epsilon_after(0)

    def epsilon_after(self, additional_steps: int) -> float:
        """Epsilon that ``additional_steps`` more steps would bring, without charging them."""
        _check_steps("additional_steps", additional_steps)
        return float(self._composed(self._steps + additional_steps).get_epsilon(self.delta))

    def rdp_curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(orders, RDP values) of the steps so far, for audit logs and cross-checks."""
        accountant = self._composed(self._steps)
        return accountant.orders, accountant.rdp

    def _composed(self, steps: int) -> RdpAccountant:
        # Recomposed from scratch so that "what if" queries never mutate state.
        accountant = RdpAccountant()
        for (noise_multiplier, sampling_rate), count in self._earlier.items():
            accountant.compose(_event(noise_multiplier, sampling_rate), count)
        if steps:
            accountant.compose(_event(self.noise_multiplier, self.sampling_rate), steps)
        return accountant


class ClientLevelAccountant(_SubsampledGaussianAccountant):
    """DP-FedAvg accounting: one :meth:`step` per aggregation round.

    ``noise_multiplier`` is the one on the *sum* of clipped updates (std =
    ``z * C``), whether the noise was added centrally or in shares.
    """


class SampleLevelAccountant(_SubsampledGaussianAccountant):
    """DP-SGD accounting for one site: one :meth:`step` per optimizer step on Poisson batches."""

    def __init__(
        self, noise_multiplier: float, expected_batch_size: int, dataset_size: int, delta: float
    ) -> None:
        if not isinstance(dataset_size, int) or dataset_size < 1:
            raise ValueError(f"dataset_size must be a positive int, got {dataset_size!r}")
        if not isinstance(expected_batch_size, int) or not 1 <= expected_batch_size <= dataset_size:
            raise ValueError(
                f"expected_batch_size must be an int in [1, dataset_size={dataset_size}], "
                f"got {expected_batch_size!r}"
            )
        super().__init__(noise_multiplier, expected_batch_size / dataset_size, delta)


class PrivacyBudget:
    """An epsilon ceiling over an accountant: refuse the step that would cross it.

    The orchestrator asks :meth:`would_exceed` before starting a round (and
    ends the federation when it says yes); the edge agent calls :meth:`charge`
    before training, which raises instead of training past the budget.
    """

    def __init__(self, accountant: _SubsampledGaussianAccountant, max_epsilon: float) -> None:
        if not isinstance(accountant, _SubsampledGaussianAccountant):
            raise TypeError("accountant must be a ClientLevelAccountant or SampleLevelAccountant")
        if not (math.isfinite(max_epsilon) and max_epsilon > 0):
            raise ValueError(f"max_epsilon must be a positive finite number, got {max_epsilon!r}")
        self.accountant = accountant
        self.max_epsilon = float(max_epsilon)

    @property
    def spent(self) -> bool:
        """True once not even one more step fits in the budget."""
        return self.would_exceed(1)

    def would_exceed(self, next_steps: int = 1) -> bool:
        """Whether ``next_steps`` more steps would push epsilon above the budget."""
        return self.accountant.epsilon_after(next_steps) > self.max_epsilon

    def charge(self, steps: int = 1) -> float:
        """Charge ``steps`` to the accountant if they fit and return the new epsilon."""
        if self.would_exceed(steps):
            raise PrivacyBudgetExceeded(
                f"{steps} more step(s) would raise epsilon from {self.accountant.epsilon():.4g} "
                f"to {self.accountant.epsilon_after(steps):.4g}, above the budget "
                f"{self.max_epsilon:.4g} (delta={self.accountant.delta:g})"
            )
        self.accountant.step(steps)
        return self.accountant.epsilon()


def noise_multiplier_for(
    target_epsilon: float, delta: float, sampling_rate: float, steps: int
) -> float:
    """Smallest noise multiplier whose ``steps`` Poisson-sampled steps stay within ``target_epsilon``.

    Uses the library's own calibration (Brent's method over its epsilon), which
    guarantees the returned value does not overshoot the target.
    """
    if not (math.isfinite(target_epsilon) and target_epsilon > 0):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon!r}")
    _check_delta(delta)
    _check_sampling_rate(sampling_rate)
    _check_steps("steps", steps)
    if steps == 0:
        raise ValueError("steps must be >= 1 to calibrate noise")
    try:
        return float(
            dp_accounting.calibrate_dp_mechanism(
                RdpAccountant,
                lambda z: dp_accounting.SelfComposedDpEvent(_event(z, sampling_rate), steps),
                target_epsilon,
                delta,
            )
        )
    except dp_accounting.mechanism_calibration.NoBracketIntervalFoundError as err:
        raise ValueError(
            f"no noise multiplier reaches epsilon={target_epsilon} at delta={delta} "
            f"over {steps} steps with sampling rate {sampling_rate}"
        ) from err


def _event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(
        sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)
    )


def _check_noise_multiplier(value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"noise_multiplier must be a positive finite number, got {value!r}")


def _check_sampling_rate(value: float) -> None:
    if not (math.isfinite(value) and 0 < value <= 1):
        raise ValueError(f"sampling_rate must be in (0, 1], got {value!r}")


def _check_delta(value: float) -> None:
    if not (math.isfinite(value) and 0 < value < 1):
        raise ValueError(f"delta must be in (0, 1), got {value!r}")


def _check_steps(name: str, value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{name} must be a non-negative int, got {value!r}")
