"""The round state machine: wait for sites, announce, collect, aggregate, version, repeat.

States: ``waiting`` (not enough sites online) -> ``collecting`` (round announced; updates
arrive until every selected site reported, or the deadline passed with a quorum) ->
aggregation (synchronous) -> ``waiting`` for the next round. A round that misses its quorum
is logged and retried as a new attempt with a fresh selection, never silently skipped.
After the last round an ``evaluating`` round asks every online site to score the final
version; then ``finished``. A differentially private strategy (``dp_fedavg``) can end training
earlier: the round that would take the federation's epsilon past its budget is never announced.
With secure aggregation a train round's collection runs the protocol's phases instead
(``orchestrator/secure_round.py``): it closes when the masked sum is unmasked, or fails and
is retried when too few sites remain.

Everything needed to resume lives in the journal and the registry: a restarted engine
reopens the open attempt with the updates already stored. When the state directory fails
(a full disk, a damaged file) nothing half-written is kept: an update that cannot be stored
is refused with the reason, a round that cannot be opened is tried again on a later tick,
and a round that cannot be closed stops the engine with a ``StorageError`` saying what to do
(the strategy may already have advanced, so only a restart from the registry is safe).
"""

from __future__ import annotations

import io
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import Protocol

import numpy as np
import onnx

from orchestrator.journal import RoundJournal, RoundRecord
from orchestrator.registry import ModelRegistry, ModelVersion, StorageError, guarded_storage, pool_metrics
from orchestrator.sampling import NotEnoughSites, select_sites
from orchestrator.secure_round import SecAggPublisher, SecureRound, SecureRoundError
from orchestrator.strategies import SECURE_SUM_STRATEGIES, Aggregation, Strategy
from orchestrator.strategies.dp_fedavg import DPFedAvg, PrivateSum, RoundPlan
from shared.blobs import make_manifest
from shared.codec import CodecError, decode_tensors, encode_model_delta, max_update_bytes
from shared.onnx_executor import OnnxModule, running_stat_names, running_variance_names
from shared.onnx_model import float_initializers, load_model_bytes, model_to_bytes, pack_model, replace_initializers
from shared.config import OrchestratorSettings
from shared.pki import FederationTrust
from shared.privacy.secagg_layout import UpdateLayout
from shared.protocol import (BlobManifest, EvalMetrics, ModelDelta, RoundCommand, SecAggAdvert, SecAggReveal,
                             SecAggShares, SecureAggregationRound, TaskSpec, TrainingConfig, UpdateReport)

log = logging.getLogger(__name__)


class RoundPublisher(SecAggPublisher, Protocol):
    """What the engine asks of the network side (the service implements it over MQTT)."""

    def announced_samples(self, site: str) -> int | None: ...
    def failed_sites(self, round_id: str) -> dict[str, str]: ...
    def announce(self, command: RoundCommand, blobs: dict[str, bytes]) -> None: ...
    def model_published(self, version: ModelVersion) -> None: ...
    def round_summary(self, record: RoundRecord, evaluated_version: int, new_version: int | None,
                      site_metrics: dict[str, EvalMetrics], personalized: dict[str, EvalMetrics],
                      seconds: dict[str, float]) -> None: ...
    def status(self, state: str, detail: str = "") -> None: ...
    def round_ended(self, record: RoundRecord, failure: str | None = None) -> None:
        """The attempt closed, or failed (``failure``, it will be retried): what still arrives for it can be let go,
        and monitors hear of a failure."""


class UpdateRejected(ValueError):
    """An update the engine will not use; the reason goes back to the site in its ack.

    ``code`` names the kind of refusal in a word, for the per-site refusal counts.
    """

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Open:
    record: RoundRecord
    command: RoundCommand
    expected_shapes: dict[str, tuple[int, ...]]
    reported: set[str] = field(default_factory=set)
    secure: SecureRound | None = None

    @cached_property
    def max_update_bytes(self) -> int:
        """The most bytes an honest encoder can send as an update of this round's model."""
        return max_update_bytes(self.expected_shapes)


DELTA_WORTH_IT = 0.9  # send the exact delta only when it is clearly smaller than the packed model


def dense_bytes(shapes: dict[str, tuple[int, ...]]) -> int:
    """What an update for these tensors occupies densified as float32: the decoder's allocation bound."""
    return 4 * sum(int(np.prod(s, dtype=np.int64)) for s in shapes.values())


def _dump_state(state: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **state)
    return buf.getvalue()


def _load_state(data: bytes) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        return {k: z[k] for k in z.files}


def project_running_variances(graph, weights: dict[str, np.ndarray], round_no: int) -> dict[str, np.ndarray]:
    """Aggregated weights with every BatchNorm running variance at least zero (a negative one makes all outputs NaN).

    Noise (DP), sparsification or a hostile site can push an averaged variance below zero. The
    projection touches only the released weights, so it is post-processing: it costs no privacy.
    """
    projected = dict(weights)
    for name in sorted(running_variance_names(graph) & weights.keys()):
        negative = int(np.count_nonzero(weights[name] < 0))
        if negative:
            log.warning("round %d: %d running-variance values of %s fell below zero; set to zero", round_no,
                        negative, name)
            projected[name] = np.maximum(weights[name], 0).astype(weights[name].dtype)
    return projected


class RoundEngine:
    def __init__(self, settings: OrchestratorSettings, registry: ModelRegistry, journal: RoundJournal,
                 strategy: Strategy, publisher: RoundPublisher, clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.registry = registry
        self.journal = journal
        self.strategy = strategy
        self.publisher = publisher
        self.clock = clock
        self.state = "waiting"
        self.current: _Open | None = None
        self._waiting_logged = False
        self._storage_problem: str | None = None  # what the state directory refused last, told once
        # Client-level DP needs more of the engine than the generic Strategy interface offers: the
        # round's size for noise shares, the sites' clipping reports, the budget, the privacy record.
        self._private = strategy if isinstance(strategy, DPFedAvg) else None
        self._ca: FederationTrust | None = None  # the CA and CRL site identities are checked against
        if settings.secure_aggregation.enabled:
            if strategy.name not in SECURE_SUM_STRATEGIES:
                raise ValueError(f"strategy {strategy.name!r} needs each site's update, but secure aggregation "
                                 f"reveals only their sum; use one of {sorted(SECURE_SUM_STRATEGIES)}")
            assert settings.identity_ca is not None  # OrchestratorSettings checks it
            self._ca = FederationTrust.load(settings.identity_ca, settings.secure_aggregation.identity_crl)

    # start-up ---------------------------------------------------------------------------------
    def start(self, initial_model: Callable[[], bytes]) -> None:
        """Create version 0 if the registry is empty, restore strategy state, reopen an open round.

        Raises ``StorageError`` when the registry cannot be used (the latest model or the
        strategy state is missing or corrupted, the disk is full): resuming from it would
        publish wrong results.
        """
        with guarded_storage(self.settings.state_dir, "resume from the registry"):
            self._start(initial_model)

    def _start(self, initial_model: Callable[[], bytes]) -> None:
        latest = self.registry.latest()
        if latest is None:
            model = initial_model()
            load_model_bytes(model, max_bytes=self.settings.max_blob_bytes)
            with self.registry.conn:
                latest = self.registry.add_version(model, parent=None, round=None, contributors={},
                                                   strategy=self.strategy.config().model_dump(),
                                                   training=self.settings.training.model_dump(), note="initial model")
            log.info("registered the initial model as version 0 (sha256 %s)", latest.sha256[:12])
            self.publisher.model_published(latest)
        else:
            self.registry.model_bytes(latest.version)  # verified now rather than when the next round opens
            if latest.strategy_state:
                self.strategy.load_state(_load_state(self.registry.blobs.get(latest.strategy_state)))
        record = self.journal.open_round()
        if record is not None and TrainingConfig.model_validate(record.training).secure_aggregation is not None:
            detail = ("the orchestrator restarted during secure aggregation, whose keys live only in memory; "
                      "retrying the round with fresh keys")
            log.warning("round %d attempt %d: %s", record.round, record.attempt, detail)
            self.journal.fail(record.round_id, detail)
            self.publisher.round_ended(record, detail)
            record = None
        if record is not None:
            grace = min(self.settings.round_timeout, 60.0)
            if record.deadline < self.clock() + grace:
                self.journal.extend(record.round_id, self.clock() + grace)
                record = self.journal.get(record.round_id)
            log.info("resuming round %d attempt %d (%s) after a restart", record.round, record.attempt,
                     record.round_id)
            self._open(record)

    # helpers --------------------------------------------------------------------------------
    def _task(self) -> TaskSpec:
        return TaskSpec(features=self.settings.task_features, label=self.settings.task_label,
                        standardize=self.settings.standardize, input_shape=self.settings.task_input_shape)

    def _plan(self, selected: list[str]) -> RoundPlan:
        """A train round's size: sites asked, and the fewest reports ``tick`` will aggregate it with."""
        return RoundPlan(selected=len(selected), min_reports=min(self.settings.effective_quorum, len(selected)))

    def _training(self, model: bytes, selected: list[str], kind: str) -> TrainingConfig:
        """The configured training settings plus what the strategy and personalization add."""
        overrides = dict(self._private.round_overrides(self._plan(selected)) if self._private
                         else self.strategy.training_overrides())
        parsed = load_model_bytes(model) if self.settings.fedbn or self.settings.secure_aggregation.enabled else None
        if self.settings.fedbn:
            overrides["local_parameters"] = sorted(OnnxModule(parsed).batchnorm_names())
        if self.settings.secure_aggregation.enabled and kind == "train":
            overrides["secure_aggregation"] = self._secure_round_settings(selected, parsed.graph)
        return self.settings.training.model_copy(update=overrides) if overrides else self.settings.training

    def _secure_round_settings(self, selected: list[str], graph: onnx.GraphProto) -> SecureAggregationRound:
        """The round's secure-aggregation parameters: a fresh index seed, the threshold, the weights' scale."""
        cfg = self.settings.secure_aggregation
        majority = len(selected) // 2 + 1
        threshold = max(cfg.threshold or majority, majority, 2)
        if cfg.threshold is not None and cfg.threshold < threshold:
            log.warning("secure aggregation threshold %d raised to %d: it must be a strict majority of the %d "
                        "selected sites, or the orchestrator could unmask a single update", cfg.threshold,
                        threshold, len(selected))
        samples = {s: self.publisher.announced_samples(s) for s in selected}
        weighting = "uniform" if self._private else "samples"
        unknown = sorted(s for s, n in samples.items() if not n)
        if weighting == "samples" and unknown:
            log.warning("sites %s announced no sample count: this secure round weighs every site equally", unknown)
            weighting = "uniform"
        return SecureAggregationRound(
            threshold=threshold, bound=cfg.bound, index_fraction=cfg.index_fraction,
            error_feedback=cfg.error_feedback,
            dense_tensors=sorted(running_stat_names(graph)) if cfg.index_fraction else [],
            index_seed=secrets.token_hex(32), weighting=weighting,
            sample_total=max(1, sum(n or 0 for n in samples.values())), phase_timeout=cfg.phase_timeout)

    def _downlink(self, version: ModelVersion, model: bytes) -> tuple[BlobManifest, ModelDelta | None, dict[str, bytes]]:
        """The packed full model, and the exact delta from its parent (what most sites hold)."""
        packed = pack_model(model)
        full = make_manifest(packed, "application/onnx+zstd", self.settings.chunk_size)
        blobs = {full.blob_id: packed}
        if version.parent is None:
            return full, None, blobs
        parent = self.registry.get(version.parent)
        base = float_initializers(load_model_bytes(self.registry.model_bytes(parent.version)))
        data = encode_model_delta(base, float_initializers(load_model_bytes(model)))
        if len(data) > DELTA_WORTH_IT * len(packed):  # dense training changes nearly every weight
            return full, None, blobs
        manifest = make_manifest(data, "application/x-fedmq-model-delta", self.settings.chunk_size)
        blobs[manifest.blob_id] = data
        return full, ModelDelta(base_version=parent.version, base_sha256=parent.sha256, blob=manifest), blobs

    def _open(self, record: RoundRecord) -> None:
        version = self.registry.get(record.base_version)
        model = self.registry.model_bytes(version.version)
        shapes = {k: v.shape for k, v in float_initializers(load_model_bytes(model)).items()}
        full, delta, blobs = self._downlink(version, model)
        command = RoundCommand(
            federation=self.settings.federation, sender="orchestrator", round=record.round, attempt=record.attempt,
            round_id=record.round_id, kind=record.kind, model_version=version.version, model_sha256=version.sha256,
            model=full, model_delta=delta, selected=record.selected,
            training=TrainingConfig.model_validate(record.training), task=self._task(), deadline=record.deadline)
        secure = None
        if command.training.secure_aggregation is not None:
            assert self._ca is not None, "secure aggregation rounds need the federation CA"
            layout = UpdateLayout.for_round(shapes, command.training.local_parameters,
                                            command.training.secure_aggregation)
            secure = SecureRound(command, layout, self._ca, self.clock)
        self.current = _Open(record, command, shapes, reported=self._readable_updates(record), secure=secure)
        self.state = "collecting" if record.kind == "train" else "evaluating"
        self.publisher.announce(command, blobs)
        self.publisher.status(self.state)

    def _readable_updates(self, record: RoundRecord) -> set[str]:
        """Sites whose stored update for this attempt is intact; one whose file was lost or damaged is dropped.

        The site was acknowledged and no longer holds it, so the round goes on without it (the
        deadline and the quorum decide) rather than stopping at aggregation on every restart.
        """
        readable = set()
        for update in self.journal.updates(record.round_id):
            if update.blob is not None and update.blob not in self.registry.blobs:
                log.warning("round %d: the stored update of %s (%s) is missing or corrupted in %s; dropped, the round "
                            "goes on without it", record.round, update.site, update.blob[:12], self.registry.blobs.root)
                self.journal.drop_update(record.round_id, update.site)
                continue
            readable.add(update.site)
        return readable

    def _next_round(self) -> int:
        latest = self.registry.latest()
        return (latest.round or 0) + 1 if latest else 1

    # the machine ----------------------------------------------------------------------------
    def tick(self, online: set[str]) -> None:
        """Advance the machine; the service calls this often (every few hundred ms)."""
        if self.state == "finished":
            return
        if self.current is None:
            self._maybe_announce(online)
            return
        rec = self.current.record
        selected = set(rec.selected)
        secure = self.current.secure
        if secure is not None:
            phase = secure.phase
            secure.advance(self.publisher, min(self.settings.effective_quorum, len(selected)),
                           failed=self.publisher.failed_sites(rec.round_id).keys())
            if secure.phase == "done":
                self._close()
            elif secure.phase == "failed":
                self._fail(secure.failure or "secure aggregation failed")
            elif secure.phase != phase:
                self.publisher.status(self.state, f"secure aggregation: {secure.phase} phase, waiting for "
                                                  f"{secure.waiting_for}")
            return
        failed = {s: d for s, d in self.publisher.failed_sites(rec.round_id).items()
                  if s in selected and s not in self.current.reported}
        quorum = min(self.settings.effective_quorum if rec.kind == "train" else 1, len(selected))
        if self.current.reported >= selected:
            self._close()
        elif failed and self.current.reported | failed.keys() >= selected and len(self.current.reported) >= quorum:
            log.warning("round %d: aggregating without %s, which reported errors: %s", rec.round, sorted(failed),
                        failed)
            self._close()
        elif failed and len(selected) - len(failed) < quorum:
            # Waiting for the deadline cannot help: too few sites are left to reach the quorum.
            self._fail(f"cannot reach its quorum of {quorum}: sites {sorted(failed)} reported errors "
                       f"({'; '.join(f'{s}: {d}' for s, d in sorted(failed.items()))}); fix them (see their logs) or "
                       "lower the quorum")
        elif self.clock() >= rec.deadline:
            if len(self.current.reported) >= quorum:
                log.warning("round %d: deadline passed with %d/%d reports (quorum %d); aggregating without %s",
                            rec.round, len(self.current.reported), len(selected), quorum,
                            sorted(selected - self.current.reported))
                self._close()
            else:
                self._fail(f"missed its quorum: {len(self.current.reported)}/{len(selected)} reports by the "
                           f"deadline, {quorum} needed; missing {sorted(selected - self.current.reported)}")

    def _fail(self, detail: str) -> None:
        """End the open attempt without a new version; the next tick announces a fresh attempt."""
        assert self.current is not None
        rec = self.current.record
        try:
            with guarded_storage(self.settings.state_dir, f"record that round {rec.round} failed"):
                self.journal.fail(rec.round_id, detail)
        except StorageError as e:
            self._storage_failed(self.state, f"{e}; trying again")  # the attempt stays open until it is recorded
            return
        log.error("round %d attempt %d %s; retrying", rec.round, rec.attempt, detail)
        self.current = None
        self.publisher.round_ended(rec, detail)
        self.state = "waiting"
        self.publisher.status("waiting", f"round {rec.round} attempt {rec.attempt} {detail}")

    def _maybe_announce(self, online: set[str]) -> None:
        round_no = self._next_round()
        latest = self.registry.latest()
        assert latest is not None
        spent = self._private.stop_reason() if self._private and round_no <= self.settings.rounds else None
        if round_no > self.settings.rounds or spent:
            evaluated = bool(self.journal.done("evaluate")) and self.journal.done("evaluate")[-1].base_version \
                == latest.version
            if not self.settings.final_evaluation or evaluated:
                self.state = "finished"
                if spent:
                    detail = f"stopped before round {round_no} of {self.settings.rounds}: {spent}"
                    log.warning("%s; final version %d", detail, latest.version)
                else:
                    detail = f"{self.settings.rounds} rounds done"
                self.publisher.status("finished", f"{detail}; final version {latest.version}")
                return
            kind, minimum = "evaluate", 1
        else:
            kind, minimum = "train", max(self.settings.min_sites, self.strategy.min_updates)
        try:
            selected = select_sites(sorted(online), fraction=self.settings.sample_fraction if kind == "train" else None,
                                    count=self.settings.sample_count if kind == "train" else None, minimum=minimum,
                                    seed=self.settings.sampling_seed, round_number=round_no)
        except NotEnoughSites as e:
            if not self._waiting_logged:
                log.info("waiting for sites before round %d: %s", round_no, e)
                self.publisher.status("waiting", str(e))
                self._waiting_logged = True
            return
        self._waiting_logged = False
        attempt = self.journal.attempts(round_no, kind) + 1
        if attempt > self.settings.max_attempts:
            self.state = "finished"
            self.publisher.status("finished", f"round {round_no} failed {self.settings.max_attempts} attempts; "
                                              "check the sites' logs and raise max_attempts or round_timeout")
            log.error("giving up: round %d failed %d attempts", round_no, self.settings.max_attempts)
            return
        tag = "eval" if kind == "evaluate" else "r"
        try:
            with guarded_storage(self.settings.state_dir, f"open round {round_no}"):
                record = self.journal.begin(
                    round_id=f"{self.settings.federation}-{tag}{round_no}-a{attempt}", round=round_no,
                    attempt=attempt, kind=kind, base_version=latest.version, selected=selected,
                    training=self._training(self.registry.model_bytes(latest.version), selected,
                                            kind).model_dump(mode="json"),
                    deadline=self.clock() + self.settings.round_timeout)
        except StorageError as e:
            self._storage_failed("waiting", f"{e}; trying again")
            return
        self._storage_problem = None
        log.info("round %d attempt %d (%s): model v%d to %s", round_no, attempt, kind, latest.version, selected)
        self._open(record)

    # updates ----------------------------------------------------------------------------------
    def check_report(self, site: str, report: UpdateReport) -> RoundRecord:
        """Reject a report that does not belong to the open round before fetching its blob."""
        cur = self.current
        if cur is None or report.round_id != cur.record.round_id:
            raise UpdateRejected(f"round {report.round_id} is not open (open: "
                                 f"{cur.record.round_id if cur else 'none'})", "round_not_open")
        if site not in cur.record.selected:
            raise UpdateRejected(f"site {site} was not selected for round {report.round_id}", "not_selected")
        if site in cur.reported:
            raise UpdateRejected(f"site {site} already has an update stored for round {report.round_id}; a site "
                                 "sends one update per round", "already_reported")
        if report.base_version != cur.record.base_version:
            raise UpdateRejected(f"update is based on version {report.base_version}, the round uses "
                                 f"{cur.record.base_version}", "wrong_base")
        if cur.record.kind == "train" and (report.update is None or report.num_samples <= 0):
            raise UpdateRejected("a training report needs an update and a positive sample count", "incomplete")
        if cur.record.kind != "train" and report.update is not None:
            raise UpdateRejected("an evaluation round takes scores only, no update", "incomplete")
        if cur.record.kind == "train" and cur.command.training.dp_clip_norm is not None \
                and report.dp_unclipped is None:
            raise UpdateRejected("this round applies client-level differential privacy: the report must say "
                                 "whether the update was within dp_clip_norm (dp_unclipped); upgrade the agent",
                                 "incomplete")
        if report.update is not None:
            self._check_declared_size(report.update.size)
        return cur.record

    def _check_declared_size(self, size: int) -> None:
        """Refuse an update larger than the round's model allows before a byte of it is held."""
        cur = self.current
        assert cur is not None
        if cur.secure is not None:
            expected = 4 * cur.secure.layout.vector_length
            if size != expected:
                raise UpdateRejected(f"masked update declared as {size} bytes; this secure round's masked updates are "
                                     f"exactly {expected} bytes", "update_too_large" if size > expected else
                                     "bad_update")
        elif size > cur.max_update_bytes:
            raise UpdateRejected(f"update declared as {size} bytes; an encoded update of model "
                                 f"v{cur.record.base_version} takes at most {cur.max_update_bytes} bytes",
                                 "update_too_large")

    def on_secure_message(self, site: str, message: SecAggAdvert | SecAggShares | SecAggReveal) -> None:
        """A site's key advertisement, sealed shares or unmasking shares; SecureRoundError if unusable."""
        cur = self.current
        if cur is None or cur.secure is None or message.round_id != cur.record.round_id:
            raise SecureRoundError(f"round {message.round_id} is not an open secure-aggregation round")
        if isinstance(message, SecAggAdvert):
            cur.secure.on_advert(site, message)
        elif isinstance(message, SecAggShares):
            cur.secure.on_shares(site, message)
        else:
            cur.secure.on_reveal(site, message)

    def accept(self, site: str, report: UpdateReport, update: bytes | None) -> bool:
        """Validate and store an update; returns False when it was a duplicate (already stored)."""
        record = self.check_report(site, report)
        secure = self.current.secure
        if secure is not None:
            if update is None:
                raise UpdateRejected("a secure-aggregation round needs the masked update", "incomplete")
            try:
                secure.accept_masked(site, update)
            except SecureRoundError as e:
                raise UpdateRejected(str(e), "secagg") from None
        elif update is not None:
            try:
                shapes = self.current.expected_shapes
                decoded = decode_tensors(update, shapes, max_decoded_bytes=dense_bytes(shapes))
            except CodecError as e:
                raise UpdateRejected(f"update does not decode against model v{record.base_version}: {e}",
                                     "bad_update") from None
            self._check_magnitude(decoded)
        try:
            with guarded_storage(self.settings.state_dir, f"store the update of {site}"):
                blob = self.registry.blobs.put(update) if update is not None else None
                fresh = self.journal.add_update(record.round_id, site, blob, report)
        except StorageError as e:
            self._storage_failed(self.state, str(e))
            raise UpdateRejected(f"the orchestrator could not store it ({e}); it is not counted", "storage") from None
        self.current.reported.add(site)
        if fresh:
            log.info("round %d: update from %s (%d samples)", record.round, site, report.num_samples)
        return fresh

    def _check_magnitude(self, update: dict[str, np.ndarray]) -> None:
        """A finite but huge value (say 1e30) would wreck the global model under any averaging strategy."""
        limit = self.settings.max_update_abs
        for name, values in update.items():
            largest = float(np.max(np.abs(values))) if values.size else 0.0
            if largest > limit:
                raise UpdateRejected(f"tensor {name!r} holds a value of magnitude {largest:.3g}, above max_update_abs="
                                     f"{limit:g}; an honest update is far smaller (raise FEDMQ_MAX_UPDATE_ABS only "
                                     "if this model really needs it)", "absurd_values")

    def _storage_failed(self, state: str, detail: str) -> None:
        """Tell the operator (log and status) what the state directory refused, once until it changes."""
        if detail != self._storage_problem:
            log.error("%s", detail)
            self.publisher.status(state, detail)
        self._storage_problem = detail

    # closing ----------------------------------------------------------------------------------
    def _close(self) -> None:
        """Aggregate, version and record the round; ``StorageError`` (after telling the operator) if it cannot."""
        try:
            with guarded_storage(self.settings.state_dir, "record the round's result"):
                self._close_round()
        except StorageError as e:
            self._storage_failed(self.state, f"{e}; stopping: restart the orchestrator once that is fixed, the "
                                             "open round resumes with the updates it has")
            raise

    def _close_round(self) -> None:
        assert self.current is not None
        rec = self.current.record
        updates = self.journal.updates(rec.round_id)
        site_metrics = {u.site: u.report.evaluation for u in updates if u.report.evaluation is not None}
        personalized = {u.site: u.report.personalized for u in updates if u.report.personalized is not None}
        started = time.perf_counter()
        new_version: ModelVersion | None = None
        if rec.kind == "train":
            self.publisher.status("aggregating")
            secure = self.current.secure
            new_version = self._aggregate(rec, updates) if secure is None else self._aggregate_secure(rec, updates,
                                                                                                        secure)
        else:
            with self.registry.conn:
                self.journal.close(rec.round_id, None)
        with self.registry.conn:
            for site, m in site_metrics.items():
                self.registry.record_evaluation(rec.base_version, site, m, personalized.get(site))
        seconds = {"aggregate": time.perf_counter() - started,
                   "train_max": max((u.report.train_seconds for u in updates), default=0.0),
                   "wall": self.clock() - rec.announced_at}
        pooled = pool_metrics(site_metrics)
        log.info("round %d done: v%d scored pooled accuracy %s%s", rec.round, rec.base_version,
                 f"{pooled.accuracy:.3f}" if pooled and pooled.accuracy is not None else "n/a",
                 f"; new version v{new_version.version}" if new_version else "")
        self.current = None
        self.state = "waiting"
        self.publisher.round_ended(rec)
        if new_version is not None:
            self.publisher.model_published(new_version)
        self.publisher.round_summary(rec, rec.base_version, new_version.version if new_version else None,
                                     site_metrics, personalized, seconds)

    def _begin_aggregation(self, rec: RoundRecord) -> tuple[onnx.ModelProto, Aggregation]:
        """The round's base model and the strategy's aggregation over every tensor the sites do not keep local."""
        base_model = load_model_bytes(self.registry.model_bytes(rec.base_version))
        weights = float_initializers(base_model)
        aggregated = set(weights) - set(TrainingConfig.model_validate(rec.training).local_parameters)
        aggregation = (self._private.begin_round(weights, aggregated_names=aggregated, plan=self._plan(rec.selected))
                       if self._private else self.strategy.begin_round(weights, aggregated_names=aggregated))
        return base_model, aggregation

    def _aggregate(self, rec: RoundRecord, updates: list) -> ModelVersion:
        base_model, aggregation = self._begin_aggregation(rec)
        shapes = {k: v.shape for k, v in float_initializers(base_model).items()}
        for u in updates:
            delta = decode_tensors(self.registry.blobs.get(u.blob), shapes, max_decoded_bytes=dense_bytes(shapes))
            aggregation.add(u.site, u.num_samples, delta)
            if isinstance(aggregation, PrivateSum) and u.report.dp_unclipped is not None:
                aggregation.record_clipping(u.site, u.report.dp_unclipped)
        return self._new_version(rec, base_model, aggregation.finish(), {u.site: u.num_samples for u in updates})

    def _aggregate_secure(self, rec: RoundRecord, updates: list, secure: SecureRound) -> ModelVersion:
        """The strategy's server step on the unmasked mean: the only thing secure aggregation reveals."""
        result = secure.result
        assert result is not None
        base_model, aggregation = self._begin_aggregation(rec)
        if isinstance(aggregation, PrivateSum):
            reports = {u.site: u.report for u in updates}
            aggregation.add_secure_mean(result.contributors, result.mean,
                                        {s: bool(reports[s].dp_unclipped) for s in result.contributors
                                         if s in reports})
        else:
            # The mean stands for every survivor: one fold with weight 1 is the mean itself.
            aggregation.add("secure-sum", 1, result.mean)
        samples = {u.site: u.num_samples for u in updates}
        log.info("round %d: securely aggregated %d sites (summed weight %.4g)", rec.round, len(result.contributors),
                 result.weight)
        return self._new_version(rec, base_model, aggregation.finish(),
                                 {s: samples.get(s, 0) for s in result.contributors})

    def _new_version(self, rec: RoundRecord, base_model, new_weights: dict[str, np.ndarray],
                     contributors: dict[str, int]) -> ModelVersion:
        new_weights = project_running_variances(base_model.graph, new_weights, rec.round)
        model = model_to_bytes(replace_initializers(base_model, new_weights))
        state = self.strategy.state()
        state_sha = self.registry.blobs.put(_dump_state(state)) if state else None
        privacy = self._private.privacy_spent() if self._private else None
        with self.registry.conn:
            version = self.registry.add_version(
                model, parent=rec.base_version, round=rec.round, contributors=contributors,
                strategy=self.strategy.config().model_dump(), training=rec.training, strategy_state=state_sha,
                privacy=privacy)
            self.journal.close(rec.round_id, version.version)
        if privacy is not None:
            log.info("round %d: client-level epsilon %.4g at delta %g after %d DP rounds (%s)", rec.round,
                     privacy.epsilon, privacy.delta, privacy.steps, privacy.mechanism)
        return version
