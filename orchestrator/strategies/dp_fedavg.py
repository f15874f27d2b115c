"""DP-FedAvg (McMahan et al. 2018): client-level differential privacy for the released models.

The unit of privacy is a whole hospital: whether or not one site took part, the sequence of
global versions looks almost the same, with (epsilon, delta) from an RDP accountant. Each
round:

1. every site clips its whole update to L2 norm ``C`` (``dp_clip_norm`` in the round's
   ``TrainingConfig``), so one site moves the sum by at most ``C``;
2. the orchestrator clips again (a site's clipping is not something it has to trust), sums
   the updates *unweighted* -- sample counts are self-reported and would scale a site's
   contribution past ``C`` -- and the sum carries Gaussian noise of std ``z * C``:

   * ``noise="central"``: the orchestrator adds it to the sum (it is then trusted with the
     raw updates);
   * ``noise="distributed"`` (the default): each site adds a share of std
     ``z * C / sqrt(m)`` to its clipped update, where ``m`` is the fewest updates the round
     can be aggregated with (its quorum), so any sum the orchestrator may form carries at
     least the full noise and the orchestrator never holds an update without noise. More
     reports than ``m`` only add noise. Honest sites are assumed to add their share; secure
     aggregation would also hide the individual shares (not part of this strategy);

3. the noisy sum divided by the number of contributing sites is applied to the global model.

With ``adaptive_clipping`` (Andrew et al. 2021), sites also report whether their update was
within ``C``; the orchestrator moves ``C`` towards the ``target_quantile`` of update norms from
a count noised with std ``clip_count_stddev``, and the update noise is reduced so that both
releases together cost exactly what ``noise_multiplier`` says (``split_noise_multiplier``).
The count is noised by the orchestrator in both noise modes.

Accounting: one Poisson-subsampled Gaussian step per aggregated round at ``sampling_rate``.
It defaults to 1.0, which claims no amplification by sampling and is right for any site
selection; a smaller value is only valid when sites are chosen at random with that
probability *and the choice is not public* -- ``orchestrator.sampling`` derives it from a
published seed, so leave it at 1.0 with that selection. The history of (noise, rate, rounds)
is the strategy's persisted state, so a restarted orchestrator, or one restarted with other
options, composes over every round it ever released. With ``max_epsilon`` the round engine
ends the federation before the round that would cross it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pydantic

from shared.privacy.dp import AdaptiveClipper, add_gaussian_noise, noise_share_std, split_noise_multiplier, system_rng
from shared.protocol import PrivacySpent

from .base import Aggregation, Positive, ServerStep, Strategy, StrategyConfig, StrategyOptions, Weights, add_scaled

if TYPE_CHECKING:
    from shared.privacy.accountant import ClientLevelAccountant

# An honest noise share of std s on d coordinates has norm above s * (sqrt(d) + t) with
# probability at most exp(-t^2 / 2) (Gaussian concentration); t = 10 makes that ~2e-22.
_SHARE_TAIL = 10.0

_CLIP_KEY = "dp/clip_norm"
_HISTORY_KEYS = ("dp/noise_multipliers", "dp/sampling_rates", "dp/rounds")


@dataclass(frozen=True)
class RoundPlan:
    """What the round engine knows about a round before any update arrives.

    ``selected`` is the number of sites asked to train (public, the adaptive count's
    default denominator); ``min_reports`` the fewest updates the engine will aggregate the
    round with, to which distributed noise shares are calibrated.
    """

    selected: int
    min_reports: int

    def __post_init__(self) -> None:
        if not 1 <= self.min_reports <= self.selected:
            raise ValueError(f"need 1 <= min_reports <= selected, got {self.min_reports} and {self.selected}")


class DPFedAvgOptions(StrategyOptions):
    """Defaults: C = 1, z = 1, distributed noise, no amplification claimed, delta 1e-5, no budget."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    clip_norm: Positive = 1.0
    noise_multiplier: Positive = 1.0
    noise: Literal["central", "distributed"] = "distributed"
    adaptive_clipping: bool = False
    target_quantile: float = pydantic.Field(default=0.5, gt=0.0, lt=1.0)
    clip_learning_rate: Positive = 0.2
    max_clip_norm: Positive | None = None
    clip_count_stddev: Positive | None = None
    expected_sites: int | None = pydantic.Field(default=None, ge=1)
    sampling_rate: float = pydantic.Field(default=1.0, gt=0.0, le=1.0)
    delta: float = pydantic.Field(default=1e-5, gt=0.0, lt=1.0)
    max_epsilon: Positive | None = None

    @pydantic.model_validator(mode="after")
    def _adaptive_is_affordable(self) -> "DPFedAvgOptions":
        """The count's noise must leave some noise for the update; say so before any round runs."""
        if self.max_clip_norm is not None and self.max_clip_norm < self.clip_norm:
            raise ValueError(f"max_clip_norm {self.max_clip_norm} is below the initial clip_norm {self.clip_norm}")
        if self.adaptive_clipping:
            if self.count_stddev is None:
                raise ValueError("adaptive_clipping needs clip_count_stddev, or expected_sites for the "
                                 "default expected_sites / 20 (Andrew et al. 2021)")
            try:
                split_noise_multiplier(self.noise_multiplier, self.count_stddev)
            except ValueError as e:
                raise ValueError(f"{e}; raise clip_count_stddev") from None
        return self

    @property
    def count_stddev(self) -> float | None:
        """Std of the noise on the count of unclipped updates (adaptive clipping only)."""
        if self.clip_count_stddev is not None:
            return self.clip_count_stddev
        return self.expected_sites / 20 if self.expected_sites is not None else None

    @property
    def update_noise_multiplier(self) -> float:
        """The part of ``noise_multiplier`` left for the update once the count took its share."""
        if not self.adaptive_clipping:
            return self.noise_multiplier
        assert self.count_stddev is not None  # checked by the validator
        return split_noise_multiplier(self.noise_multiplier, self.count_stddev)


class DPFedAvg(Strategy):
    """Clip, sum unweighted, noise (centrally or in shares), average, account; see the module docstring.

    ``rng`` is for tests only: production noise comes from :func:`system_rng`, because noise
    an attacker can predict can be subtracted.
    """

    name = "dp_fedavg"
    Options = DPFedAvgOptions
    options: DPFedAvgOptions

    def __init__(self, options: Mapping[str, Any] | None = None, *,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__(options)
        self._rng = rng if rng is not None else system_rng()
        self._clipper: AdaptiveClipper | None = None
        self._accountant = self._new_accountant()
        self._last_clip: float | None = None
        self._plan = self.default_plan()
        self._stop_cache: tuple[int, str | None] | None = None
        self._reset_clip(self.options.clip_norm)

    # configuration --------------------------------------------------------------------
    def config(self) -> StrategyConfig:
        """As the base class, without unset options (a StrategyConfig holds no nulls)."""
        return StrategyConfig(name=self.name, options=self.options.model_dump(exclude_none=True))

    @property
    def clip_norm(self) -> float:
        """The bound sites must clip to in the next round."""
        return self._clipper.clip_norm if self._clipper else self.options.clip_norm

    def default_plan(self) -> RoundPlan:
        """Without the engine's plan: ``expected_sites`` (else one) sites asked, one needed.

        One needed site is the safe side for distributed noise: each share then carries the
        whole noise. Callers without a plan that use adaptive clipping should set
        ``expected_sites``, the count's denominator.
        """
        sites = self.options.expected_sites or 1
        return RoundPlan(selected=sites, min_reports=1)

    def round_overrides(self, plan: RoundPlan) -> dict[str, Any]:
        """The clip bound (and distributed noise share) every site must apply this round."""
        share = self._share_std(plan) if self.options.noise == "distributed" else 0.0
        return {"dp_clip_norm": self.clip_norm, "dp_noise_share_std": share}

    def training_overrides(self) -> dict[str, Any]:
        """:meth:`round_overrides` for :meth:`default_plan`; the round engine passes its own plan."""
        return self.round_overrides(self.default_plan())

    def _share_std(self, plan: RoundPlan) -> float:
        return noise_share_std(self.options.update_noise_multiplier, self.clip_norm, plan.min_reports)

    # rounds ---------------------------------------------------------------------------
    def begin_round(self, global_weights: Mapping[str, np.ndarray], *, aggregated_names: set[str] | None = None,
                    plan: RoundPlan | None = None) -> Aggregation:
        """As ``Strategy.begin_round``; ``plan`` tells the round's size (default: :meth:`default_plan`)."""
        self._plan = plan or self.default_plan()
        return super().begin_round(global_weights, aggregated_names=aggregated_names)

    def _new_aggregation(self, global_weights: Mapping[str, np.ndarray], names: set[str]) -> Aggregation:
        plan, clip = self._plan, self.clip_norm
        if self.options.noise == "central":
            bound, noise = clip, self.options.update_noise_multiplier
            min_updates = 1
        else:
            dims = sum(int(np.prod(global_weights[n].shape, dtype=np.int64)) for n in names)
            bound = clip + self._share_std(plan) * (math.sqrt(dims) + _SHARE_TAIL)
            noise, min_updates = 0.0, plan.min_reports

        def finished(unclipped: int) -> None:
            self._finish_round(clip, unclipped, plan)

        return PrivateSum(self.name, global_weights, names, self._server_step, min_updates=min_updates,
                          bound=bound, clip_norm=clip, noise_multiplier=noise, rng=self._rng, on_finish=finished)

    def _finish_round(self, clip: float, unclipped: int, plan: RoundPlan) -> None:
        """The round's release happened: charge the accountant and move the clip bound."""
        self._accountant.step()
        self._last_clip = clip
        if self._clipper is not None:
            denominator = self.options.expected_sites or plan.selected
            self._clipper.update(unclipped, denominator, self._rng)

    # privacy --------------------------------------------------------------------------
    def privacy_spent(self) -> PrivacySpent:
        """Client-level (epsilon, delta) of every version released so far."""
        o = self.options
        return PrivacySpent(level="client", mechanism=f"dp_fedavg/{o.noise}", epsilon=self._accountant.epsilon(),
                            delta=o.delta, steps=self._accountant.steps, noise_multiplier=o.noise_multiplier,
                            sampling_rate=o.sampling_rate, clip_norm=self._last_clip or self.clip_norm,
                            max_epsilon=o.max_epsilon)

    def stop_reason(self) -> str | None:
        """Why no further round may run (the budget would be crossed), else None.

        The engine asks on every tick while no round is open; the answer only changes when a
        round is charged, so it is computed once per accountant state.
        """
        steps = self._accountant.steps
        if self._stop_cache is None or self._stop_cache[0] != steps:
            self._stop_cache = (steps, self._budget_check())
        return self._stop_cache[1]

    def _budget_check(self) -> str | None:
        from shared.privacy.accountant import PrivacyBudget

        if self.options.max_epsilon is None:
            return None
        budget = PrivacyBudget(self._accountant, self.options.max_epsilon)
        if not budget.would_exceed(1):
            return None
        return (f"privacy budget spent: another round would raise the federation's client-level epsilon from "
                f"{self._accountant.epsilon():.4g} to {self._accountant.epsilon_after(1):.4g}, above max_epsilon="
                f"{budget.max_epsilon:.4g} (delta={self.options.delta:g}, {self._accountant.steps} rounds at "
                f"noise_multiplier={self.options.noise_multiplier:g}). To train on, raise the dp_fedavg option "
                "max_epsilon (a weaker guarantee for every hospital) and restart the orchestrator; a larger "
                "noise_multiplier makes each further round cheaper")

    # state ----------------------------------------------------------------------------
    def state(self) -> dict[str, np.ndarray]:
        """The accountant's history (noise, sampling rate, rounds) and the current clip bound."""
        history = np.array(self._accountant.history(), dtype=np.float64).reshape(-1, 3)
        state = {key: history[:, i].copy() for i, key in enumerate(_HISTORY_KEYS)}
        state[_CLIP_KEY] = np.array(self.clip_norm, dtype=np.float64)
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore :meth:`state`; an empty mapping starts a fresh accountant."""
        self._accountant = self._new_accountant()
        self._last_clip = None
        self._stop_cache = None
        if not state:
            self._reset_clip(self.options.clip_norm)
            return
        expected = {*_HISTORY_KEYS, _CLIP_KEY}
        if set(state) != expected:
            raise ValueError(f"server state for {self.name!r} must have exactly {sorted(expected)}, "
                             f"got {sorted(state)}; was it written by another strategy?")
        columns = [np.asarray(state[k], dtype=np.float64) for k in _HISTORY_KEYS]
        if len({c.shape for c in columns}) != 1 or columns[0].ndim != 1:
            raise ValueError(f"server state {list(_HISTORY_KEYS)} must be 1-d arrays of one length")
        rounds = columns[2]
        if not (np.all(np.isfinite(rounds)) and np.all(rounds >= 0) and np.all(rounds == np.round(rounds))):
            raise ValueError("server state 'dp/rounds' must hold non-negative whole numbers")
        self._accountant.restore([(float(z), float(q), int(n)) for z, q, n in zip(*columns)])
        clip = float(np.asarray(state[_CLIP_KEY]))
        if not (math.isfinite(clip) and clip > 0):
            raise ValueError(f"server state {_CLIP_KEY!r} must be a positive number, got {clip}")
        # A fixed bound comes from the options (they may have been changed on purpose); an adaptive one
        # continues from where the last round left it.
        self._reset_clip(clip if self.options.adaptive_clipping else self.options.clip_norm)

    def _new_accountant(self) -> ClientLevelAccountant:
        # Imported here: dp-accounting pulls in SciPy, seconds of start-up that only this strategy needs.
        from shared.privacy.accountant import ClientLevelAccountant

        return ClientLevelAccountant(self.options.noise_multiplier, self.options.sampling_rate, self.options.delta)

    def _reset_clip(self, clip: float) -> None:
        o = self.options
        self._clipper = AdaptiveClipper(clip, o.target_quantile, o.clip_learning_rate, o.count_stddev,
                                        o.max_clip_norm) if o.adaptive_clipping else None


class PrivateSum(Aggregation):
    """Unweighted sum of updates each clipped to ``bound``, plus optional central noise, over the count.

    Sample counts are validated by the base class but ignored: a site's weight must not grow
    with a number it reports itself, or its influence on the sum would exceed the clip bound.
    """

    def __init__(self, strategy: str, global_weights: Mapping[str, np.ndarray], names: Collection[str],
                 server_step: ServerStep, *, min_updates: int, bound: float, clip_norm: float,
                 noise_multiplier: float, rng: np.random.Generator,
                 on_finish: Callable[[int], None]) -> None:
        super().__init__(strategy, global_weights, names, server_step, min_updates)
        self._sums = {name: np.zeros(global_weights[name].shape, dtype=np.float64) for name in self._names}
        self._bound = bound
        self._clip_norm = clip_norm
        self._noise_multiplier = noise_multiplier
        self._rng = rng
        self._on_finish = on_finish
        self._unclipped: set[str] = set()

    def record_clipping(self, site_id: str, unclipped: bool) -> None:
        """A contributing site's report of whether its update was within the clip bound."""
        if site_id not in self._sites:
            raise ValueError(f"site {site_id!r} has not contributed an update to this round")
        if unclipped:
            self._unclipped.add(site_id)
        else:
            self._unclipped.discard(site_id)

    def add_secure_mean(self, sites: Collection[str], mean: Mapping[str, np.ndarray],
                        unclipped: Mapping[str, bool]) -> None:
        """The unweighted mean of the sites' clipped (and noised) updates, as secure aggregation reveals it.

        The orchestrator cannot re-clip updates it never sees: the bound rests on the sites'
        clipping, which is the trust model of distributed DP with secure aggregation.
        """
        if self.count:
            raise RuntimeError("a secure mean replaces the individual updates; this round already has some")
        if not sites:
            raise ValueError("a secure mean needs at least one contributing site")
        for name, total in self._sums.items():
            value = np.asarray(mean[name], dtype=np.float64)
            if value.shape != total.shape or not np.isfinite(value).all():
                raise ValueError(f"secure mean tensor {name!r} has the wrong shape or non-finite values")
            total += value * len(sites)
        self._sites.update(sites)
        self._unclipped.update(s for s, within in unclipped.items() if within)

    def finish(self) -> Weights:
        """As ``Aggregation.finish``; then the strategy charges the round and moves its clip bound."""
        new = super().finish()
        self._on_finish(len(self._unclipped))
        return new

    def _accept(self, num_samples: int, update: Mapping[str, np.ndarray]) -> None:
        norm = math.sqrt(sum(float(np.sum(np.square(update[n], dtype=np.float64))) for n in self._names))
        scale = min(1.0, self._bound / norm) if norm > 0 else 1.0
        for name, total in self._sums.items():
            add_scaled(total, update[name], scale)

    def _reduce(self) -> Weights:
        total = self._sums
        if self._noise_multiplier > 0:
            total = add_gaussian_noise(total, self._noise_multiplier, self._clip_norm, self._rng)
        return {name: value / self.count for name, value in total.items()}
