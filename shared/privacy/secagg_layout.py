"""How a model update becomes the one vector secure aggregation sums, and how the sum comes back.

Agent and orchestrator must lay the vector out identically or the sum is garbage, so both
use :class:`UpdateLayout`: the aggregated tensors (every float initializer except the ones
sites keep local, FedBN) flattened in name order, restricted to the round's shared index
set when ``index_fraction`` is set, followed by one coordinate holding the site's weight.
Summing ``(w_i * update_i, w_i)`` and dividing by the last coordinate gives the weighted
mean without the orchestrator learning any ``w_i`` or ``update_i``.

Site numbers (Shamir x-coordinates and mask signs) are 1-based positions in the round's
``selected`` list, which every party receives in the same round command.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shared.privacy.secagg import KeyAdvertisement, RoundConfig, quantize, round_index_set
from shared.protocol import SecAggKeys, SecureAggregationRound

MASKED_MEDIA_TYPE = "application/x-fedmq-secagg-masked"
"""Media type of a masked update blob: the round's vector of little-endian uint32, uncompressible by design."""


class UnknownSite(ValueError):
    """A message names a site that is not part of the round."""


class RoundSites:
    """Round-local site numbers 1..n (Shamir x-coordinates, mask signs) in the order of ``selected``."""

    def __init__(self, selected: Sequence[str]) -> None:
        self._numbers = {site: number for number, site in enumerate(selected, start=1)}
        self._names = {number: site for site, number in self._numbers.items()}

    def __contains__(self, site: object) -> bool:
        return site in self._numbers

    def number(self, site: str) -> int:
        if site not in self._numbers:
            raise UnknownSite(f"{site!r} is not part of this round")
        return self._numbers[site]

    def name(self, number: int) -> str:
        return self._names[number]

    def advertisement(self, keys: SecAggKeys) -> KeyAdvertisement:
        """The protocol's view of a site's advertised keys."""
        return KeyAdvertisement(self.number(keys.site), keys.encryption_public, keys.mask_public, keys.signature)


def round_config(round_id: str, settings: SecureAggregationRound, vector_length: int) -> RoundConfig:
    """The protocol parameters every party derives from the same round command."""
    return RoundConfig(round_id=round_id.encode(), threshold=settings.threshold, vector_length=vector_length)


@dataclass(frozen=True)
class UpdateLayout:
    names: tuple[str, ...]
    shapes: Mapping[str, tuple[int, ...]]
    indices: np.ndarray | None  # positions into the flattened tensors, or None for all of them

    @classmethod
    def for_round(cls, shapes: Mapping[str, tuple[int, ...]], local_parameters: Collection[str],
                  settings: SecureAggregationRound) -> UpdateLayout:
        names = tuple(sorted(set(shapes) - set(local_parameters)))
        if not names:
            raise ValueError("no aggregated tensors: every initializer is kept local")
        sizes = {n: int(np.prod(shapes[n], dtype=np.int64)) for n in names}
        offsets = dict(zip(names, np.cumsum([0, *sizes.values()])[:-1].tolist(), strict=True))
        indices = None
        if settings.index_fraction is not None and settings.index_fraction < 1:
            dense = [n for n in names if n in settings.dense_tensors]
            sparse = [n for n in names if n not in settings.dense_tensors]
            candidates = np.concatenate([np.arange(offsets[n], offsets[n] + sizes[n]) for n in sparse]) \
                if sparse else np.zeros(0, dtype=np.int64)
            chosen = np.zeros(0, dtype=np.int64)
            if candidates.size:
                k = max(1, round(settings.index_fraction * candidates.size))
                chosen = candidates[round_index_set(bytes.fromhex(settings.index_seed), candidates.size, k)]
            always = [np.arange(offsets[n], offsets[n] + sizes[n]) for n in dense]
            indices = np.sort(np.concatenate([chosen, *always])).astype(np.int64)
        return cls(names, {n: tuple(shapes[n]) for n in names}, indices)

    @property
    def model_size(self) -> int:
        return sum(int(np.prod(s, dtype=np.int64)) for s in self.shapes.values())

    @property
    def vector_length(self) -> int:
        """Coordinates each site sends: the selected positions plus the weight."""
        return (self.model_size if self.indices is None else self.indices.size) + 1

    def pack(self, update: Mapping[str, np.ndarray], weight: float) -> np.ndarray:
        """``(weight * update[indices], weight)`` as float64, ready for :func:`quantize`."""
        missing = [n for n in self.names if n not in update]
        if missing:
            raise ValueError(f"update lacks aggregated tensors {missing}")
        for n in self.names:
            if tuple(np.shape(update[n])) != self.shapes[n]:
                raise ValueError(f"tensor {n!r} has shape {np.shape(update[n])}, the model has {self.shapes[n]}")
        flat = np.concatenate([np.asarray(update[n], dtype=np.float64).ravel() for n in self.names])
        if self.indices is not None:
            flat = flat[self.indices]
        return np.append(flat * weight, weight)

    def received(self, update: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """What of ``update`` the sum carries: values at the index set, zeros elsewhere and on local tensors.

        Error feedback keeps the difference for the next round, so that positions outside
        this round's random index set are sent later instead of never.
        """
        flat = np.concatenate([np.asarray(update[n], dtype=np.float32).ravel() for n in self.names])
        if self.indices is not None:
            kept = np.zeros_like(flat)
            kept[self.indices] = flat[self.indices]
            flat = kept
        out = {name: np.zeros_like(np.asarray(value, dtype=np.float32)) for name, value in update.items()}
        offset = 0
        for n in self.names:
            size = int(np.prod(self.shapes[n], dtype=np.int64))
            out[n] = flat[offset:offset + size].reshape(self.shapes[n])
            offset += size
        return out

    def unpack(self, total: np.ndarray) -> tuple[dict[str, np.ndarray], float]:
        """The weighted mean update (zeros outside the index set) and the summed weight."""
        if total.shape != (self.vector_length,):
            raise ValueError(f"sum has shape {total.shape}, the layout has {self.vector_length} coordinates")
        weight = float(total[-1])
        if not weight > 0:
            raise ValueError(f"the summed weight is {weight}: no contribution to average")
        mean = total[:-1] / weight
        if self.indices is not None:
            dense = np.zeros(self.model_size, dtype=np.float64)
            dense[self.indices] = mean
            mean = dense
        out, offset = {}, 0
        for n in self.names:
            size = int(np.prod(self.shapes[n], dtype=np.int64))
            out[n] = mean[offset:offset + size].reshape(self.shapes[n]).astype(np.float32)
            offset += size
        return out, weight


def site_weight(settings: SecureAggregationRound, num_samples: int) -> float:
    """This site's weight in the sum: its share of the announced samples, or 1 (uniform).

    Any common scale gives the same mean (the sum is divided by the summed weight); the
    announced total just keeps every weight near or below 1, inside the fixed-point range.
    """
    if settings.weighting == "uniform":
        return 1.0
    weight = num_samples / settings.sample_total
    if weight > settings.bound:
        raise ValueError(f"this site's {num_samples} samples are {weight:.3g}x the announced total "
                         f"{settings.sample_total}, beyond the secure-aggregation bound {settings.bound}; "
                         "restart the agent so it announces its current row count")
    return weight


def quantize_update(vector: np.ndarray, settings: SecureAggregationRound, num_sites: int,
                    rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Fixed-point ring vector (stochastic rounding, unbiased) and how many coordinates saturated."""
    saturated = int(np.count_nonzero(np.abs(vector) > settings.bound))
    return quantize(vector, settings.bound, num_sites, rng), saturated
