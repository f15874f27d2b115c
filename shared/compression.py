"""Which values a site sends: top-k selection, quantization and error feedback.

The wire format is ``shared.codec``'s business; this module decides what goes into it.
Top-k with error feedback (the residual of what was not sent is added to the next
update) is what lets aggressive sparsification converge like plain SGD, so the residual
is treated as durable state with an explicit commit point.
"""

from __future__ import annotations

import logging
import os
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from shared import codec

log = logging.getLogger(__name__)

INT8_LEVELS = 127  # symmetric: -127..127, so zero is exact and the range has no bias


def topk_size(numel: int, settings: codec.CompressionSettings) -> int:
    """How many elements of a tensor to keep; at least one so no tensor goes silent."""
    if numel == 0:
        return 0
    if settings.topk_count is not None:
        return min(settings.topk_count, numel)
    assert settings.topk_fraction is not None, "CompressionSettings guarantees one of the two in sparse mode"
    return max(1, min(numel, round(settings.topk_fraction * numel)))


def select_topk(flat: np.ndarray, k: int) -> np.ndarray:
    """Sorted flat indices of the ``k`` largest magnitudes, identical on every run and platform.

    ``np.partition`` finds the k-th magnitude; ties at that threshold go to the lowest
    indices rather than to whatever order introselect leaves them in. Exact zeros are
    never selected (sending them costs bytes and carries nothing), so fewer than ``k``
    indices come back when the tensor has fewer than ``k`` non-zeros.
    """
    if not 0 <= k <= flat.size:
        raise ValueError(f"k={k} outside 0..{flat.size}")
    if k == 0:
        return np.empty(0, dtype=np.int64)
    magnitude = np.abs(flat)
    threshold = np.partition(magnitude, flat.size - k)[flat.size - k]
    keep = magnitude > threshold
    if threshold > 0:
        ties = np.flatnonzero(magnitude == threshold)[: k - int(np.count_nonzero(keep))]
        keep[ties] = True
    return np.flatnonzero(keep)


def quantize_int8(values: np.ndarray, *, rng: np.random.Generator | None = None) -> tuple[np.ndarray, np.float32]:
    """Symmetric int8 with one float32 scale (max-abs / 127) per tensor.

    Round-to-nearest (error <= scale/2) by default; with ``rng``, stochastic rounding
    (error < scale but unbiased: E[q * scale] == value), which keeps many small
    coordinates from being rounded to zero round after round.
    """
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = np.float32(peak / INT8_LEVELS)
    with np.errstate(over="ignore"):
        largest = np.float32(INT8_LEVELS) * scale
    if not np.isfinite(largest):
        raise ValueError(f"magnitude {peak} is too large for int8 quantization")
    if scale == 0:
        return np.zeros(values.shape, dtype=np.int8), np.float32(0)
    scaled = values.astype(np.float64) / float(scale)
    rounded = np.rint(scaled) if rng is None else np.floor(scaled + rng.random(scaled.shape))
    return np.clip(rounded, -INT8_LEVELS, INT8_LEVELS).astype(np.int8), scale


def dequantize_int8(quantized: np.ndarray, scale: np.float32) -> np.ndarray:
    """Inverse of quantize_int8; the decoder uses this same function so both sides agree."""
    return quantized.astype(np.float32) * np.float32(scale)


def to_float16(values: np.ndarray) -> np.ndarray:
    """float16 copy, refusing values beyond its range instead of silently sending Inf."""
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    if not np.isfinite(half).all():
        raise ValueError(f"values beyond the float16 range (+-{float(np.finfo(np.float16).max)})")
    return half


# --- error feedback ---------------------------------------------------------------------


class ErrorFeedbackStateError(RuntimeError):
    """The encode / commit / discard protocol was not followed."""


class _PendingMeta(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    update_id: str = Field(min_length=1)
    residual_names: list[str] | None  # None: committing leaves the residual unchanged


class _StateMeta(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid", frozen=True)

    version: Literal[1]
    residual_names: list[str]
    pending: _PendingMeta | None


@dataclass(frozen=True)
class _Pending:
    update_id: str
    data: bytes
    residual: dict[str, np.ndarray] | None  # None: committing leaves the residual unchanged


class ErrorFeedback:
    """Residual store for top-k with error feedback, with a two-phase commit.

    Commit point: ``encode`` computes the update and the residual that will be current
    once the orchestrator has that update, and persists both as *pending* next to the
    still-current residual before returning the bytes. ``commit(update_id)`` (on the
    orchestrator's acknowledgement) promotes the pending residual; ``discard(update_id)``
    (update rejected, round abandoned) drops it. A crash anywhere in between leaves the
    pending update on disk: after restart ``pending`` returns the same id and bytes, the
    agent re-sends them and commits on the acknowledgement, which is exact as long as the
    orchestrator counts at most one update per site and round (an idempotent re-send).
    Residual mass is therefore never lost (persisting the new residual before sending
    would lose it if the send never happens) and never counted twice (keeping the old
    residual after a delivered update would send it again). A second ``encode`` while an
    update is pending is refused for the same reason.

    Error feedback only runs when ``settings.mode == "sparse"`` and
    ``settings.error_feedback``; other updates go through the same protocol but leave the
    residual as it is. The state file is an ``.npz`` (no pickle) replaced atomically; a
    corrupt file is logged and treated as empty, since a lost residual only costs a little
    accuracy, whereas refusing to start would cost the whole site.
    """

    def __init__(self, path: Path | None) -> None:
        """``path`` is the state file in the agent's state dir; None keeps state in memory only."""
        self._path = path
        self._residual: dict[str, np.ndarray] = {}
        self._pending: _Pending | None = None
        if path is not None and path.exists():
            self._load(path)

    @property
    def residual(self) -> dict[str, np.ndarray]:
        """Copy of the committed residual, for inspection and tests."""
        return {name: array.copy() for name, array in self._residual.items()}

    @property
    def pending(self) -> tuple[str, bytes] | None:
        """(update_id, bytes) of the update awaiting commit or discard, surviving restarts."""
        return None if self._pending is None else (self._pending.update_id, self._pending.data)

    def encode(self, delta: Mapping[str, np.ndarray], settings: codec.CompressionSettings, *, update_id: str,
               rng: np.random.Generator | None = None) -> bytes:
        """Encode ``delta`` (plus the residual when error feedback applies) and make it pending."""
        if self._pending is not None:
            raise ErrorFeedbackStateError(f"update {self._pending.update_id!r} is still pending; "
                                          "commit() or discard() it before encoding another")
        if not isinstance(update_id, str) or not update_id:
            raise ValueError(f"update_id must be a non-empty string, got {update_id!r}")
        if not isinstance(settings, codec.CompressionSettings):
            raise codec.CodecError(f"settings must be CompressionSettings, got {type(settings).__name__}")
        codec.check_tensors(delta)
        if settings.mode != "sparse" or not settings.error_feedback:
            data = codec.encode_tensors(delta, settings, rng=rng)
            self._pending = _Pending(update_id, data, None)
        else:
            corrected = {name: array + self._residual_for(name, array.shape) for name, array in delta.items()}
            data = codec.encode_tensors(corrected, settings, rng=rng)
            # Subtract what the receiver will decode, quantization error included, by decoding it.
            shapes = {name: array.shape for name, array in corrected.items()}
            decoded_bytes = sum(4 * array.size for array in corrected.values())
            for name, decoded in codec.iter_decoded(data, shapes, max_decoded_bytes=decoded_bytes):
                corrected[name] -= decoded
            stale = sorted(self._residual.keys() - delta.keys())
            if stale:
                log.warning("dropping error-feedback residual for tensors no longer in the update: %s", stale)
            self._pending = _Pending(update_id, data, corrected)
        self._save()
        return data

    def stage(self, delta: Mapping[str, np.ndarray], *, update_id: str,
              sent: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Error feedback for an encoding outside the codec: secure aggregation's shared index set.

        Adds the residual to ``delta`` and returns that corrected update to send; ``sent`` maps
        it to what the receiver will get (zeros where nothing is sent), and the difference
        becomes the pending residual, committed or discarded as after ``encode``. The caller
        keeps the bytes it sends, so the pending update carries none.
        """
        if self._pending is not None:
            raise ErrorFeedbackStateError(f"update {self._pending.update_id!r} is still pending; "
                                          "commit() or discard() it before staging another")
        if not isinstance(update_id, str) or not update_id:
            raise ValueError(f"update_id must be a non-empty string, got {update_id!r}")
        codec.check_tensors(delta)
        corrected = {name: array + self._residual_for(name, array.shape) for name, array in delta.items()}
        received = sent(corrected)
        residual = {name: (array - received[name]).astype(np.float32) for name, array in corrected.items()}
        self._pending = _Pending(update_id, b"", residual)
        self._save()
        return corrected

    def commit(self, update_id: str) -> None:
        """The orchestrator has update ``update_id``: its residual becomes the current one."""
        pending = self._take_pending(update_id)
        if pending.residual is not None:
            self._residual = pending.residual
        self._save()

    def discard(self, update_id: str) -> None:
        """Update ``update_id`` will never count: keep the residual it was built from."""
        self._take_pending(update_id)
        self._save()

    def reset(self) -> None:
        """Forget the residual and any pending update, e.g. when a new training run starts."""
        self._residual = {}
        self._pending = None
        if self._path is not None:
            self._path.unlink(missing_ok=True)

    def _take_pending(self, update_id: str) -> _Pending:
        if self._pending is None:
            raise ErrorFeedbackStateError(f"no update is pending (asked for {update_id!r})")
        if self._pending.update_id != update_id:
            raise ErrorFeedbackStateError(f"pending update is {self._pending.update_id!r}, not {update_id!r}")
        pending, self._pending = self._pending, None
        return pending

    def _residual_for(self, name: str, shape: tuple[int, ...]) -> np.ndarray | float:
        residual = self._residual.get(name)
        if residual is None:
            return 0.0
        if residual.shape != shape:
            log.warning("error-feedback residual for %r has shape %s, update has %s; starting it from zero",
                        name, residual.shape, shape)
            return 0.0
        return residual

    def _save(self) -> None:
        if self._path is None:
            return
        pending = self._pending
        residual_names = list(self._residual)
        pending_names = None if pending is None or pending.residual is None else list(pending.residual)
        meta = _StateMeta(version=1, residual_names=residual_names,
                          pending=None if pending is None else _PendingMeta(update_id=pending.update_id,
                                                                            residual_names=pending_names))
        arrays = {"meta": np.frombuffer(meta.model_dump_json().encode(), dtype=np.uint8)}
        arrays.update({f"r{i}": self._residual[name] for i, name in enumerate(residual_names)})
        if pending is not None:
            arrays["pending_data"] = np.frombuffer(pending.data, dtype=np.uint8)
            if pending.residual is not None:
                arrays.update({f"p{i}": array for i, array in enumerate(pending.residual.values())})
        self._path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self._path.with_name(self._path.name + ".tmp")
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self._path)
        directory = os.open(self._path.parent, os.O_RDONLY)
        try:
            os.fsync(directory)
        finally:
            os.close(directory)

    def _load(self, path: Path) -> None:
        try:
            archive = np.load(path, allow_pickle=False)
            if not isinstance(archive, np.lib.npyio.NpzFile):
                raise ValueError("not an npz archive")
            with archive:
                meta = _StateMeta.model_validate_json(archive["meta"].tobytes())
                residual = _read_arrays(archive, "r", meta.residual_names)
                pending = None
                if meta.pending is not None:
                    pending_residual = (None if meta.pending.residual_names is None
                                        else _read_arrays(archive, "p", meta.pending.residual_names))
                    pending = _Pending(meta.pending.update_id, archive["pending_data"].tobytes(), pending_residual)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
            log.warning("error-feedback state %s is unreadable (%s: %s); starting from an empty residual",
                        path, type(exc).__name__, exc)
            return
        self._residual, self._pending = residual, pending


def _read_arrays(archive: np.lib.npyio.NpzFile, prefix: str, names: list[str]) -> dict[str, np.ndarray]:
    arrays = {}
    for i, name in enumerate(names):
        array = archive[f"{prefix}{i}"]
        if array.dtype != np.float32 or not np.isfinite(array).all():
            raise ValueError(f"residual {name!r} is not finite float32")
        arrays[name] = array
    return arrays
