"""Shared machinery for aggregation strategies.

A strategy is split in two like Flower's ``serverapp.strategy``: a long-lived
``Strategy`` (validated options plus any server optimizer state that must
survive between rounds and restarts) and a per-round ``Aggregation`` that
receives updates one at a time as the codec decodes them. Keeping the round
object separate lets the orchestrator drop a failed round without touching
the strategy's state, which only changes when a round is finished.

Every concrete strategy is built from three reusable pieces defined here:

* ``WeightedAverage``: the streaming, sample-weighted mean of the updates.
  Memory is O(model size) no matter how many sites report.
* ``CoordinateWise``: collects every update, then reduces each coordinate
  (median, trimmed mean). Robust statistics need all values at once, so
  memory is O(sites x model size); this is inherent, not an oversight.
* ``ServerOptimizer``: turns the aggregated update into the server step using
  per-tensor buffers (momentum, Adam moments) persisted via ``state()``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Collection, Mapping
from typing import Annotated, Any, ClassVar

import numpy as np
import pydantic

Weights = dict[str, np.ndarray]

ServerStep = Callable[[Weights], Weights]
"""Maps the aggregated update (float64) to the step added to the global weights."""

UnitInterval = Annotated[float, pydantic.Field(ge=0.0, lt=1.0)]
Positive = Annotated[float, pydantic.Field(gt=0.0)]

_STEP_KEY = "step"
# Elements per slice when folding an update or applying the step: bounds the float64
# temporaries to a few MiB instead of twice the largest tensor.
_CHUNK = 1 << 16


def add_scaled(total: np.ndarray, values: np.ndarray, factor: float) -> None:
    """``total += factor * values`` in float64, slice by slice (same result as one expression)."""
    flat_total = total.reshape(-1)
    flat = np.asarray(values).reshape(-1)
    for start in range(0, flat.size, _CHUNK):
        flat_total[start:start + _CHUNK] += factor * flat[start:start + _CHUNK].astype(np.float64)


def _apply_step(weight: np.ndarray, step: np.ndarray) -> np.ndarray:
    """``(weight + step)`` summed in float64, stored in ``weight``'s dtype, slice by slice."""
    step = np.asarray(step)
    if step.shape != weight.shape:  # a broadcast step: one expression, as before
        return (weight.astype(np.float64) + step).astype(weight.dtype)
    out = np.empty(weight.shape, dtype=weight.dtype)
    flat_out, flat_weight, flat_step = out.reshape(-1), weight.reshape(-1), step.reshape(-1)
    for start in range(0, flat_out.size, _CHUNK):
        part = slice(start, start + _CHUNK)
        flat_out[part] = np.add(flat_weight[part], flat_step[part], dtype=np.float64)
    return out


class StrategyConfig(pydantic.BaseModel):
    """Serializable identity of a strategy, stored with every model version.

    Storing the full option set (defaults included, see ``Strategy.config``)
    means a model version can be reproduced even if defaults change later.
    """

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = "fedavg"
    options: dict[str, float | int | str | bool | list[str]] = {}


class StrategyOptions(pydantic.BaseModel):
    """Base for per-strategy options; frozen so a running strategy cannot drift."""

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True)


class NotEnoughUpdates(RuntimeError):
    """Raised by ``finish()`` when too few sites reported for the rule to be meaningful."""

    def __init__(self, strategy: str, received: int, needed: int) -> None:
        super().__init__(
            f"strategy {strategy!r} needs at least {needed} update(s) to aggregate, "
            f"got {received}"
        )
        self.received = received
        self.needed = needed


class Aggregation(ABC):
    """One round of aggregation; updates arrive one at a time.

    Validation happens completely before an update is folded in, so a rejected
    update leaves the round untouched and the site may resend a corrected one.
    ``global_weights`` is held by reference and must not be mutated until
    ``finish()`` returns.
    """

    def __init__(
        self,
        strategy: str,
        global_weights: Mapping[str, np.ndarray],
        names: Collection[str],
        server_step: ServerStep,
        min_updates: int = 1,
    ) -> None:
        self._strategy = strategy
        self._global = global_weights
        self._names = tuple(sorted(names))
        self._server_step = server_step
        self._min_updates = min_updates
        self._sites: set[str] = set()
        self._finished = False

    @property
    def count(self) -> int:
        """Number of accepted updates, for the orchestrator's quorum decisions."""
        return len(self._sites)

    def add(self, site_id: str, num_samples: int, update: Mapping[str, np.ndarray]) -> None:
        """Fold in one site's update (local weights minus global weights).

        Tensors of the global model that are not aggregated this round (e.g.
        FedBN normalization layers) may be present and are ignored, so sites
        need not know which layers the server keeps local.
        """
        if self._finished:
            raise RuntimeError("this round is already finished; start a new one with begin_round()")
        if site_id in self._sites:
            raise ValueError(f"site {site_id!r} already contributed an update to this round")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int | np.integer):
            raise ValueError(
                f"site {site_id!r}: num_samples must be an integer, "
                f"got {type(num_samples).__name__}"
            )
        if num_samples < 1:
            raise ValueError(f"site {site_id!r}: num_samples must be >= 1, got {num_samples}")
        unknown = sorted(set(update) - set(self._global))
        if unknown:
            raise ValueError(f"site {site_id!r}: update has tensors not in the model: {unknown}")
        missing = [name for name in self._names if name not in update]
        if missing:
            raise ValueError(f"site {site_id!r}: update is missing tensors: {missing}")
        checked = {name: self._check_tensor(site_id, name, update[name]) for name in self._names}
        self._accept(int(num_samples), checked)
        self._sites.add(site_id)

    def finish(self) -> Weights:
        """Return the next global weights; non-aggregated tensors are copied unchanged."""
        if self._finished:
            raise RuntimeError("finish() was already called for this round")
        if self.count < self._min_updates:
            raise NotEnoughUpdates(self._strategy, self.count, self._min_updates)
        step = self._server_step(self._reduce())
        self._finished = True
        new: Weights = {}
        for name, weight in self._global.items():
            if name in step:
                new[name] = _apply_step(weight, step[name])
            else:
                new[name] = np.array(weight, copy=True)
        return new

    def _check_tensor(self, site_id: str, name: str, value: np.ndarray) -> np.ndarray:
        array = np.asarray(value)
        expected = self._global[name].shape
        if array.shape != expected:
            raise ValueError(
                f"site {site_id!r}: tensor {name!r} has shape {array.shape}, expected {expected}"
            )
        if not np.issubdtype(array.dtype, np.floating):
            raise ValueError(
                f"site {site_id!r}: tensor {name!r} has dtype {array.dtype}, "
                "expected floating point"
            )
        if not np.isfinite(array).all():
            raise ValueError(f"site {site_id!r}: tensor {name!r} contains NaN or infinite values")
        return array

    @abstractmethod
    def _accept(self, num_samples: int, update: Mapping[str, np.ndarray]) -> None:
        """Fold in an already validated update restricted to the aggregated tensors."""

    @abstractmethod
    def _reduce(self) -> Weights:
        """Aggregated update per aggregated tensor, in float64; may reuse the round's buffers."""


class WeightedAverage(Aggregation):
    """Streaming sample-weighted mean: sum(n_i * d_i) / sum(n_i).

    Sums are kept in float64 because hundreds of float32 updates weighted by
    sample counts in the thousands would otherwise lose low-order bits. Peak
    memory is the sums (2x the float32 model), one decoded update and the new
    weights: updates are folded and the step applied in slices, and ``finish``
    divides the sums in place rather than copying them.
    """

    def __init__(
        self,
        strategy: str,
        global_weights: Mapping[str, np.ndarray],
        names: Collection[str],
        server_step: ServerStep,
        min_updates: int = 1,
    ) -> None:
        super().__init__(strategy, global_weights, names, server_step, min_updates)
        self._sums = {
            name: np.zeros(global_weights[name].shape, dtype=np.float64) for name in self._names
        }
        self._total = 0
        self._divided = False

    def _scale(self, update: Mapping[str, np.ndarray]) -> float:
        """Factor applied to an update before weighting; clipping strategies override it."""
        return 1.0

    def _accept(self, num_samples: int, update: Mapping[str, np.ndarray]) -> None:
        factor = num_samples * self._scale(update)
        for name, total in self._sums.items():
            add_scaled(total, update[name], factor)
        self._total += num_samples

    def _reduce(self) -> Weights:
        # In place: the sums are not needed once the round is finished. Only once, should
        # a failed server step make the caller retry finish().
        if not self._divided:
            for total in self._sums.values():
                total /= self._total
            self._divided = True
        return self._sums


class CoordinateWise(Aggregation):
    """Keeps every update, then reduces each coordinate across sites.

    Robust statistics such as the median need all values of a coordinate at
    once, so this holds O(sites x model size) memory. Updates are copied
    because the codec may reuse its decode buffers.
    """

    def __init__(
        self,
        strategy: str,
        global_weights: Mapping[str, np.ndarray],
        names: Collection[str],
        server_step: ServerStep,
        reduce: Callable[[np.ndarray], np.ndarray],
        min_updates: int = 1,
    ) -> None:
        super().__init__(strategy, global_weights, names, server_step, min_updates)
        self._reducer = reduce
        self._collected: dict[str, list[np.ndarray]] = {name: [] for name in self._names}

    def _accept(self, num_samples: int, update: Mapping[str, np.ndarray]) -> None:
        for name, values in self._collected.items():
            values.append(np.array(update[name], copy=True))

    def _reduce(self) -> Weights:
        return {
            name: self._reducer(np.stack(values).astype(np.float64))
            for name, values in self._collected.items()
        }


class Strategy(ABC):
    """A named, option-validated aggregation rule.

    The default rule is the weighted average applied as-is (FedAvg); other
    strategies override ``_new_aggregation`` (how updates are combined) and/or
    ``_server_step`` (how the combined update moves the global weights).
    """

    name: ClassVar[str]
    Options: ClassVar[type[pydantic.BaseModel]] = StrategyOptions

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        given = dict(options or {})
        accepted = sorted(self.Options.model_fields)
        unknown = sorted(set(given) - set(accepted))
        if unknown:
            raise ValueError(
                f"strategy {self.name!r} does not accept option(s) {unknown}; "
                f"accepted options: {accepted or 'none'}"
            )
        try:
            self.options = self.Options.model_validate(given)
        except pydantic.ValidationError as exc:
            raise ValueError(f"invalid options for strategy {self.name!r}: {exc}") from exc

    @property
    def min_updates(self) -> int:
        """Fewest updates the rule can aggregate; use it as the sampling minimum."""
        return 1

    def config(self) -> StrategyConfig:
        """Full configuration including defaults, so a model version records what ran."""
        return StrategyConfig(name=self.name, options=self.options.model_dump())

    def training_overrides(self) -> dict[str, Any]:
        """Settings the sites' local training must use for this strategy to be correct."""
        return {}

    def begin_round(
        self,
        global_weights: Mapping[str, np.ndarray],
        *,
        aggregated_names: set[str] | None = None,
    ) -> Aggregation:
        """Start a round; ``aggregated_names`` excludes local-only tensors (FedBN)."""
        names = set(global_weights) if aggregated_names is None else set(aggregated_names)
        if not names:
            raise ValueError("no tensors to aggregate: aggregated_names is empty")
        unknown = sorted(names - set(global_weights))
        if unknown:
            raise ValueError(f"aggregated_names not in the global weights: {unknown}")
        not_float = sorted(
            name for name in names if not np.issubdtype(global_weights[name].dtype, np.floating)
        )
        if not_float:
            raise ValueError(
                f"tensors {not_float} are not floating point; exclude them via aggregated_names"
            )
        return self._new_aggregation(global_weights, names)

    def state(self) -> dict[str, np.ndarray]:
        """Server state to persist between rounds; stateless rules have none."""
        return {}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Restore ``state()``; rejecting foreign state catches a strategy mix-up on restart."""
        if state:
            raise ValueError(
                f"strategy {self.name!r} keeps no server state, got entries {sorted(state)}"
            )

    def _new_aggregation(
        self, global_weights: Mapping[str, np.ndarray], names: set[str]
    ) -> Aggregation:
        return WeightedAverage(
            self.name, global_weights, names, self._server_step, self.min_updates
        )

    def _server_step(self, delta: Weights) -> Weights:
        return delta


class CoordinateWiseStrategy(Strategy):
    """Robust rules that reduce each coordinate over all sites' updates.

    They ignore sample counts on purpose: counts are self-reported, and a
    weighted median would let one site claiming many samples pick the result.
    """

    def _new_aggregation(
        self, global_weights: Mapping[str, np.ndarray], names: set[str]
    ) -> Aggregation:
        return CoordinateWise(
            self.name,
            global_weights,
            names,
            self._server_step,
            self._reduce_coordinates,
            self.min_updates,
        )

    @abstractmethod
    def _reduce_coordinates(self, stacked: np.ndarray) -> np.ndarray:
        """Reduce ``stacked`` (sites first) over axis 0."""


class ServerOptimizer(Strategy):
    """Strategies that treat the aggregated update as a pseudo-gradient.

    Each aggregated tensor gets one array per name in ``buffers`` (float64),
    created on first use so FedBN-excluded tensors never get any. ``state()``
    flattens them to ``"<buffer>/<tensor>"`` plus a 0-d ``"step"`` counter of
    applied server steps: plain arrays, so the orchestrator can store them
    with ``np.savez`` and reload without pickle.
    """

    buffers: ClassVar[tuple[str, ...]]

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        super().__init__(options)
        self._buffers: dict[str, dict[str, np.ndarray]] = {b: {} for b in self.buffers}
        self._steps = 0

    def begin_round(
        self,
        global_weights: Mapping[str, np.ndarray],
        *,
        aggregated_names: set[str] | None = None,
    ) -> Aggregation:
        """As ``Strategy.begin_round``, but fail early if loaded state does not fit the model."""
        aggregation = super().begin_round(global_weights, aggregated_names=aggregated_names)
        for buffer, tensors in self._buffers.items():
            for name, value in tensors.items():
                if name in global_weights and value.shape != global_weights[name].shape:
                    raise ValueError(
                        f"server state {buffer}/{name} has shape {value.shape}, "
                        f"but the model tensor has shape {global_weights[name].shape}"
                    )
        return aggregation

    def state(self) -> dict[str, np.ndarray]:
        """Copies of all buffers and the step counter."""
        flat = {_STEP_KEY: np.array(self._steps, dtype=np.int64)}
        for buffer, tensors in self._buffers.items():
            for name, value in tensors.items():
                flat[f"{buffer}/{name}"] = value.copy()
        return flat

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Replace all buffers; an empty mapping resets to a fresh optimizer."""
        if not state:
            self._buffers = {b: {} for b in self.buffers}
            self._steps = 0
            return
        if _STEP_KEY not in state:
            raise ValueError(f"server state for {self.name!r} lacks the {_STEP_KEY!r} counter")
        step = np.asarray(state[_STEP_KEY])
        if step.shape != () or not np.issubdtype(step.dtype, np.integer) or step < 0:
            raise ValueError(f"server state {_STEP_KEY!r} must be a non-negative 0-d integer array")
        buffers: dict[str, dict[str, np.ndarray]] = {b: {} for b in self.buffers}
        for key, value in state.items():
            if key == _STEP_KEY:
                continue
            buffer, _, name = key.partition("/")
            if buffer not in buffers or not name:
                raise ValueError(
                    f"unexpected server state entry {key!r} for {self.name!r}; expected "
                    f"{_STEP_KEY!r} or '<buffer>/<tensor>' with buffer in {list(self.buffers)}"
                )
            array = np.array(value, dtype=np.float64)
            if not np.isfinite(array).all():
                raise ValueError(f"server state entry {key!r} contains NaN or infinite values")
            buffers[buffer][name] = array
        names = {b: set(tensors) for b, tensors in buffers.items()}
        if len({frozenset(n) for n in names.values()}) > 1:
            raise ValueError(f"server state buffers cover different tensors: {names}")
        for name in next(iter(names.values())):
            shapes = {buffers[b][name].shape for b in self.buffers}
            if len(shapes) > 1:
                raise ValueError(f"server state buffers for {name!r} disagree in shape: {shapes}")
        self._buffers = buffers
        self._steps = int(step)

    def _server_step(self, delta: Weights) -> Weights:
        step: Weights = {}
        for name, value in delta.items():
            tensors = {
                buffer: self._buffers[buffer].setdefault(
                    name, self._initial_buffer(buffer, value.shape)
                )
                for buffer in self.buffers
            }
            step[name] = self._step_tensor(value, tensors)
        self._steps += 1
        return step

    def _initial_buffer(self, buffer: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float64)

    @abstractmethod
    def _step_tensor(self, delta: np.ndarray, buffers: dict[str, np.ndarray]) -> np.ndarray:
        """Update ``buffers`` in place for one tensor and return its server step."""


class AdaptiveOptions(StrategyOptions):
    """Options shared by the adaptive optimizers of Reddi et al. (2021)."""

    server_lr: Positive = 0.1
    beta1: UnitInterval = 0.9
    tau: Positive = 1e-9


class AdaptiveServerOptimizer(ServerOptimizer):
    """FedAdam / FedYogi / FedAdagrad, differing only in the second-moment update.

    Follows Algorithm 2 of Reddi et al. 2021: m = b1*m + (1-b1)*delta, then
    the variant's v update, then step = server_lr * m / (sqrt(v) + tau).
    m starts at 0 and v at tau^2, the paper's initialisation (Flower starts v
    at 0; with the default tau both are 0 to machine precision). No Adam bias
    correction is applied, as in the paper and FLamby (Flower's FedAdam adds
    one), so the first step has magnitude ~server_lr * (1-b1)/sqrt(1-b2).
    """

    buffers = ("m", "v")
    options: AdaptiveOptions

    def _initial_buffer(self, buffer: str, shape: tuple[int, ...]) -> np.ndarray:
        if buffer == "v":
            return np.full(shape, self.options.tau**2, dtype=np.float64)
        return super()._initial_buffer(buffer, shape)

    def _step_tensor(self, delta: np.ndarray, buffers: dict[str, np.ndarray]) -> np.ndarray:
        m, v = buffers["m"], buffers["v"]
        beta1 = self.options.beta1
        m *= beta1
        m += (1.0 - beta1) * delta
        self._update_second_moment(v, delta * delta)
        return self.options.server_lr * m / (np.sqrt(v) + self.options.tau)

    @abstractmethod
    def _update_second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> None:
        """Update ``v`` in place from the squared aggregated update."""

