"""The edge agent daemon: one hospital's outbound-only participant in a federation.

It connects out to the broker (nothing listens at the hospital), announces itself on a
retained status topic with a last will that marks it offline (the monitoring contract of
docs/monitoring.md: heartbeat, round progress, last error with a code, data summary,
resources), and follows the
orchestrator's retained round command: fetch the model (verified by sha256), score it on
the local test set, train on local data, send the update, keep it until acknowledged.
A restarted agent resends an unacknowledged update instead of losing or redoing its work.

Privacy: when the round asks for client-level DP (``dp_clip_norm``), the update is clipped
(and, with distributed noise, given this site's noise share) before it leaves; a train round
asking for less than the site's own floor (``dp_max_clip_norm``, ``dp_min_noise_share_std``)
is refused before any work, and nothing leaves for it. The site's own
sample-level DP-SGD budget comes from its settings alone; the agent charges a round's steps to
its persisted ledger before training and refuses rounds that would exceed the budget. In a
secure-aggregation round the trained update leaves only masked (``edge_agent/secure_update.py``).
"""

from __future__ import annotations

import json
import logging
import os
import resource
import threading
import time
import zlib
from pathlib import Path
from importlib.metadata import PackageNotFoundError, version

import numpy as np

from edge_agent.data import DataError, LocalDataset, load_dataset, summarize
from edge_agent.secure_update import SecureUpdate, SecureUpdateError, SiteIdentity
from edge_agent.state import AgentState
from edge_agent.trainer import DPSGDConfig, TrainingError, check_private_training, evaluate, finetune, planned_steps, \
    train, use_threads, warm_up
from shared.blobs import BlobInbox, BlobOutbox, ChunkError, iter_chunks, make_manifest
from shared.blobstore import BlobStoreError
from shared.codec import CodecError, apply_model_delta, encode_tensors
from shared.compression import ErrorFeedback
from shared.config import AgentSettings
from shared.onnx_executor import OnnxExecutorError, running_stat_names
from shared.onnx_model import (float_initializers, load_model_bytes, model_to_bytes, replace_initializers, sha256_hex,
                               unpack_model)
from shared.privacy.dp import add_noise_with_std, clip_update, system_rng
from shared.privacy.secagg_layout import MASKED_MEDIA_TYPE, UpdateLayout, quantize_update, site_weight
from shared.protocol import (AgentResources, BlobManifest, ChunkRequest, ErrorInfo, EvalMetrics, OrchestratorStatus,
                             PrivacySpent, ProtocolError, RoundCommand, RoundProgress, SecAggRoster, SecAggShares,
                             SecAggUnmask, SiteState, SiteStatus, TaskSpec, TrainingConfig, UpdateAck, UpdateReport,
                             parse_message)
from shared.topics import Topics
from shared.transport import Incoming, Transport

log = logging.getLogger(__name__)

UPDATE_MEDIA_TYPE = "application/x-fedmq-tensors"
CLOCK_SKEW_GRACE = 120.0  # seconds a hospital clock may lag the orchestrator's before a round counts as over
PROGRESS_PHASES = ("downloading", "evaluating", "training", "uploading")

try:
    AGENT_VERSION = version("fedmq")
except PackageNotFoundError:  # running from a source tree that was not installed
    AGENT_VERSION = "0+source"


def round_seed(seed: int, site: str, round_no: int) -> int:
    """Different sites must not draw identical batches; the same site and round always do."""
    return (seed * 1_000_003 + round_no * 1009 + zlib.crc32(site.encode())) & 0x7FFFFFFF


class EdgeAgent:
    def __init__(self, settings: AgentSettings) -> None:
        self.settings = settings
        self.site = settings.site_id
        self.topics = Topics(settings.federation)
        self.state = AgentState(settings.state_dir)
        self.command: RoundCommand | None = None
        self._data: tuple[TaskSpec, LocalDataset] | None = None
        self._summary = summarize(settings.data_train, settings.data_test, settings.label_column)
        self._rows = self._summary.rows_train if self._summary else None
        # Monitoring (docs/monitoring.md). The last will is built now, before connecting: it says
        # when this process started its connection, and has no heartbeat (its time of death is unknown).
        self.connected_at = time.time()
        self._progress: RoundProgress | None = None
        self._last_error: ErrorInfo | None = None
        self._rounds_total: int | None = None  # from the orchestrator's retained status
        self._status_published = -float("inf")
        self._cpu_sample = (time.monotonic(), time.process_time())
        self._round_notes: list[str] = []  # what this round did, for its one log line
        self._fetching: BlobManifest | None = None  # the model blob being downloaded, for its progress
        offline = self._status_message("offline", will=True)
        self.transport = Transport(settings, f"fedmq-{settings.federation}-{self.site}",
                                   will=(self.topics.site(self.site, "status"), offline.to_bytes()),
                                   max_message_bytes=settings.chunk_size + 65536)
        # Bounded: the inbox holds only the current round's model blobs (older ones are forgotten when
        # a command replaces them) plus a bounded buffer of early chunks; the outbox only this site's updates.
        self.inbox = BlobInbox(max_blob_bytes=settings.max_blob_bytes)
        self.outbox = BlobOutbox(max_bytes=settings.max_blob_bytes)
        self.feedback = ErrorFeedback(Path(settings.state_dir) / "residual.npz")
        self._drop_unsent_feedback()
        self.current_state: SiteState = "online"
        self._status_detail = ""
        self._deferred: RoundCommand | None = None
        self.secure: SecureUpdate | None = None  # this site's part in the open secure-aggregation round
        self._ack_due: float | None = None
        self._last_heartbeat = 0.0
        self.rejected = 0

    # lifetime -------------------------------------------------------------------------------
    def run(self, stop: threading.Event) -> None:
        self._write_heartbeat(False)  # a previous container's heartbeat must not vouch for this one
        use_threads(self.settings.torch_threads)  # before warm_up: torch's first parallel work fixes its pools
        warm_up()
        t = self.transport
        t.subscribe(self.topics.round)
        t.subscribe(self.topics.broadcast_chunks)
        t.subscribe(self.topics.secagg)
        t.subscribe(self.topics.orchestrator_status)  # "round 4 of 20" in this site's status and log
        t.subscribe(self.topics.to_site_all(self.site))
        # A hospital server may boot before its network or the broker: the transport keeps
        # trying (and says so); the status below goes out once it is connected.
        t.start_retrying()
        self.set_status("idle")
        if self.state.record.pending is not None:
            log.info("an update for %s was not acknowledged before the restart; it will be sent again",
                     self.state.record.pending.report.round_id)
            self._ack_due = time.monotonic() + 2.0  # the retained round command usually triggers it sooner
        try:
            while not stop.is_set():
                t.raise_if_refused()
                if t.take_reconnect():
                    self._after_reconnect()
                msg = t.get(0.2)
                if msg is not None:
                    self.handle(msg)
                self._housekeeping()
        finally:
            if t.connected.is_set():
                self.set_status("offline", "stopped")  # a clean disconnect does not fire the last will
            t.stop()

    def _after_reconnect(self) -> None:
        """Put back what a broker that lost everything (no persistence) no longer holds.

        Gone may be our retained status, the orchestrator's subscriptions, and the ack or the
        update in flight: publish the status again and resend an unacknowledged update at once
        (the orchestrator acknowledges a copy it already stored without counting it again). A
        download in progress goes on: ``_housekeeping`` asks for its missing chunks.
        """
        self.set_status(self.current_state, self._status_detail)
        if self.state.record.pending is not None:
            log.info("reconnected with the update for %s unacknowledged; sending it again",
                     self.state.record.pending.report.round_id)
            self._publish_pending()

    def _housekeeping(self) -> None:
        now = time.monotonic()
        if now - self._last_heartbeat > self.settings.heartbeat_seconds:
            self._last_heartbeat = now
            self._write_heartbeat(self.transport.connected.is_set())
        if not self.transport.connected.is_set():
            return  # resends and chunk requests made while cut off would all arrive at once
        if now - self._status_published >= self.settings.heartbeat_seconds:
            self.set_status(self.current_state, self._status_detail)  # the heartbeat monitors see
        if self._ack_due is not None and now > self._ack_due:
            log.warning("no acknowledgement for our update yet; sending it again")
            self._publish_pending()
        for blob_id in self.inbox.stalled(older_than=3.0):
            req = ChunkRequest(federation=self.settings.federation, sender=self.site, blob_id=blob_id,
                               indices=self.inbox.missing(blob_id))
            log.info("asking for %d missing chunks of model blob %s", len(req.indices), blob_id[:12])
            self.transport.publish(self.topics.site(self.site, "request"), req.to_bytes())

    def _write_heartbeat(self, connected: bool) -> None:
        """What ``fedmq agent health`` reads; replaced atomically so a reader never sees half a file."""
        path = self.state.health_file()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"time": time.time(), "connected": connected, "state": self.current_state,
                                   "model_version": self.state.record.model_version}))
        os.replace(tmp, path)

    def _status_message(self, state: SiteState, detail: str = "", *, will: bool = False) -> SiteStatus:
        """This site's retained status; ``will``: the last will, which has no heartbeat and no resources."""
        active = self.state.record.model_version
        cmd = self.command
        error = self._last_error if state == "error" else None
        # An error names the round it cost (the orchestrator stops waiting for us), heartbeat after heartbeat.
        round_id = cmd.round_id if cmd else error.round_id if error else None
        return SiteStatus(federation=self.settings.federation, sender=self.site, state=state,
                          agent_version=AGENT_VERSION, model_version=active, round_id=round_id,
                          num_samples=self._data[1].num_train if self._data else self._rows, detail=detail,
                          privacy=self._sample_privacy(), connected_at=self.connected_at,
                          heartbeat_at=None if will else time.time(),
                          heartbeat_seconds=self.settings.heartbeat_seconds, active_model_version=active,
                          candidate_model_version=cmd.model_version if cmd and cmd.model_version != active else None,
                          progress=self._progress if state in PROGRESS_PHASES else None,
                          last_error=self._last_error, data=self._summary,
                          resources=None if will else self._resources())

    def _resources(self) -> AgentResources:
        """CPU used since the previous status (percent of one core), resident memory, free disk of the state dir."""
        wall, cpu = time.monotonic(), time.process_time()
        last_wall, last_cpu = self._cpu_sample
        self._cpu_sample = (wall, cpu)
        percent = 100.0 * (cpu - last_cpu) / (wall - last_wall) if wall > last_wall else 0.0
        try:
            with open("/proc/self/statm") as f:
                rss = int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):  # not Linux: the peak is what the stdlib offers
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        try:
            disk = os.statvfs(self.settings.state_dir)
            free = disk.f_bavail * disk.f_frsize
        except OSError:
            free = 0
        return AgentResources(cpu_percent=max(0.0, percent), rss_bytes=rss, disk_free_bytes=free)

    def _sample_privacy(self) -> PrivacySpent | None:
        """What this site's DP-SGD has spent so far (None when it does not use DP-SGD)."""
        return self.state.record.dp_sgd_spent if self.settings.dp_sgd else None

    def set_status(self, state: SiteState, detail: str = "") -> None:
        """Publish this site's retained status; a state that is not a round phase ends the round's progress."""
        if self._progress is not None and self._progress.phase != state:
            self._progress = None
        self.current_state, self._status_detail = state, detail
        self._status_published = time.monotonic()
        self.transport.publish(self.topics.site(self.site, "status"), self._status_message(state, detail).to_bytes(),
                               retain=True)

    def _report_progress(self, progress: RoundProgress, detail: str, *, force: bool = False) -> None:
        """Show how far the round's phase is; at most one status per ``progress_interval`` unless ``force``.

        Only a phase's start is forced (the state changes). Progress held back by the throttle
        is not lost: the next status (at the latest the heartbeat) carries it.
        """
        self._progress = progress
        if force or time.monotonic() - self._status_published >= self.settings.progress_interval:
            self.set_status(progress.phase, detail)

    def _progress_of(self, cmd: RoundCommand | UpdateReport, phase: str, **counts: int) -> RoundProgress:
        return RoundProgress(round_id=cmd.round_id, round=cmd.round, rounds_total=self._rounds_total, phase=phase,
                             **counts)

    def _fail(self, code: str, message: str, round_id: str | None) -> None:
        """Report an error on the status, with its stable code and what to do (``ERROR_CODES``)."""
        message = self._without_local_paths(message)
        self._last_error = ErrorInfo.of(code, message[:2000], round_id)
        self.set_status("error", message)

    def _without_local_paths(self, message: str) -> str:
        """The text with this agent's configured files and their folders named by setting, not by path.

        Errors from libraries (a missing certificate file, say) quote paths; the status topic is
        read by the whole federation, which has no business knowing the hospital's file layout.
        """
        s = self.settings
        names: dict[str, str] = {}
        for setting in ("data_train", "data_test", "state_dir", "tls_ca", "tls_cert", "tls_key", "tls_crl",
                        "identity_cert", "identity_key", "identity_ca", "identity_crl"):
            path = getattr(s, setting)
            if path is None:
                continue
            for variant in (Path(path), Path(path).resolve()):
                names.setdefault(str(variant), f"<{setting}>")
                if len(variant.parent.parts) > 2:  # not "/" nor a top-level folder like /tmp
                    names.setdefault(str(variant.parent), f"<folder of {setting}>")
        for text in sorted(names, key=len, reverse=True):
            message = message.replace(text, names[text])
        return message

    def _round_name(self, round_no: int) -> str:
        return f"round {round_no}/{self._rounds_total}" if self._rounds_total else f"round {round_no}"

    # routing --------------------------------------------------------------------------------
    def handle(self, msg: Incoming) -> None:
        try:
            if Topics.is_chunk(msg.topic):
                self._on_chunk(msg.payload)
                return
            message = parse_message(msg.payload)
            if message.federation != self.settings.federation:
                raise ProtocolError(f"message is for federation {message.federation!r}, this agent is in "
                                    f"{self.settings.federation!r}")
            if message.sender != "orchestrator":
                raise ProtocolError(f"only the orchestrator may send on {msg.topic}, not {message.sender!r}")
            if isinstance(message, RoundCommand):
                self._on_round(message)
            elif isinstance(message, UpdateAck):
                self._on_ack(message)
            elif isinstance(message, ChunkRequest):
                self._on_chunk_request(message)
            elif isinstance(message, SecAggRoster | SecAggShares | SecAggUnmask):
                self._on_secure_step(message)
            elif isinstance(message, OrchestratorStatus) and message.rounds_total is not None:
                self._rounds_total = message.rounds_total
        except (ProtocolError, ChunkError) as e:
            self.rejected += 1
            log.warning("rejected a message on %s: %s", msg.topic, e)

    def _on_round(self, cmd: RoundCommand) -> None:
        if self.state.is_complete(cmd.round_id):
            return
        self._forget_other_blobs(cmd)
        pending = self.state.record.pending
        if pending is not None:
            if pending.report.round_id != cmd.round_id:
                # Settle the earlier update first (its ack may have been lost in a restart): its
                # error-feedback residual must be committed or discarded before the next encode.
                self._deferred = cmd
            self._publish_pending()
            return
        if cmd.deadline + CLOCK_SKEW_GRACE < time.time():
            # A retained command outlives its round (e.g. after the federation finished).
            self.set_status("idle", f"round {cmd.round} closed before this agent could join")
            return
        if self.site not in cmd.selected:
            self.command = None
            self.set_status("idle", f"not selected for round {cmd.round}")
            return
        if self.command is not None and self.command.round_id == cmd.round_id:
            return
        self.command = cmd
        if cmd.model_sha256 in self.state.blobs:
            self._round_notes = [f"model v{cmd.model_version} (held already)"]
            self._run_round()
            return
        delta = cmd.model_delta
        if delta is not None and delta.base_sha256 in self.state.blobs:
            self._round_notes = [f"model v{cmd.model_version} (delta {_kb(delta.blob.size)})"]
            self._fetching = delta.blob
            self._report_progress(self._progress_of(cmd, "downloading", bytes_total=delta.blob.size),
                                  f"model v{cmd.model_version}", force=True)
            self._blob_complete(self.inbox.expect(delta.blob))
        else:
            self._fetch_full_model(cmd)

    def _forget_other_blobs(self, cmd: RoundCommand) -> None:
        """Release the buffers of model blobs an earlier command announced: this round will not use them."""
        wanted = {cmd.model.blob_id} | ({cmd.model_delta.blob.blob_id} if cmd.model_delta else set())
        for blob_id in self.inbox.pending():
            if blob_id not in wanted:
                log.info("no longer collecting model blob %s: round %s replaced its round", blob_id[:12], cmd.round_id)
                self.inbox.forget(blob_id)

    def _fetch_full_model(self, cmd: RoundCommand) -> None:
        """Without a usable base, ask for the whole (packed) model; it is broadcast only when there is no delta."""
        if cmd.model_delta is not None:
            req = ChunkRequest(federation=self.settings.federation, sender=self.site, blob_id=cmd.model.blob_id)
            self.transport.publish(self.topics.site(self.site, "request"), req.to_bytes())
        self._round_notes = [f"model v{cmd.model_version} (whole model {_kb(cmd.model.size)})"]
        self._fetching = cmd.model
        self._report_progress(self._progress_of(cmd, "downloading", bytes_total=cmd.model.size),
                              f"model v{cmd.model_version}", force=True)
        self._blob_complete(self.inbox.expect(cmd.model))

    def _on_chunk(self, payload: bytes) -> None:
        blob_id = self.inbox.offer(payload)
        fetching, progress = self._fetching, self._progress
        if (blob_id is None and fetching is not None and progress is not None and progress.phase == "downloading"
                and time.monotonic() - self._status_published >= self.settings.progress_interval):
            missing = len(self.inbox.missing(fetching.blob_id)) * fetching.chunk_size
            self._report_progress(progress.model_copy(update={"bytes_done": max(0, fetching.size - missing)}),
                                  self._status_detail)
        self._blob_complete(blob_id)

    def _blob_complete(self, blob_id: str | None) -> None:
        if blob_id is None:
            return
        data = self.inbox.take(blob_id)
        cmd = self.command
        if cmd is None:
            return
        try:
            model = self._materialize(cmd, blob_id, data)
        except (CodecError, OnnxExecutorError, BlobStoreError) as e:
            log.warning("could not rebuild model v%d from what arrived (%s); fetching the whole model",
                        cmd.model_version, e)
            self._fetch_full_model(cmd)
            return
        if model is None:
            return
        if sha256_hex(model) != cmd.model_sha256:
            log.error("model v%d rebuilt with the wrong sha256; fetching the whole model", cmd.model_version)
            self._fetch_full_model(cmd)
            return
        self.state.blobs.put(model)
        self._run_round()

    def _materialize(self, cmd: RoundCommand, blob_id: str, data: bytes) -> bytes | None:
        """The ONNX file of the announced version, from the packed model or from our base plus the delta."""
        if blob_id == cmd.model.blob_id:
            return unpack_model(data, max_bytes=self.settings.max_blob_bytes)
        delta = cmd.model_delta
        if delta is None or blob_id != delta.blob.blob_id:
            return None
        base = load_model_bytes(self.state.blobs.get(delta.base_sha256), max_bytes=self.settings.max_blob_bytes)
        weights = float_initializers(base)
        limit = 4 * sum(w.size for w in weights.values())
        return model_to_bytes(replace_initializers(base, apply_model_delta(weights, data, max_decoded_bytes=limit)))

    def _on_ack(self, ack: UpdateAck) -> None:
        pending = self.state.record.pending
        if pending is None or pending.report.round_id != ack.round_id:
            return
        self._ack_due = None
        self.state.complete(ack.round_id)
        held = self.feedback.pending
        if held is not None and held[0] == ack.round_id:
            # A refused update was never applied: its residual must not move on either.
            (self.feedback.commit if ack.accepted else self.feedback.discard)(ack.round_id)
        if ack.accepted:
            log.info("round %d: update accepted", pending.report.round)
            self.set_status("idle", f"update for {ack.round_id} accepted")
        else:
            log.error("round %d: update refused by the orchestrator: %s", pending.report.round, ack.reason)
            self._fail("update.refused", f"update for {ack.round_id} refused: {ack.reason}", ack.round_id)
        deferred, self._deferred = self._deferred, None
        if deferred is not None:
            self._on_round(deferred)

    def _on_secure_step(self, message: SecAggRoster | SecAggShares | SecAggUnmask) -> None:
        """Answer the orchestrator's next secure-aggregation step for the round this site is in."""
        session = self.secure
        if session is None or message.round_id != session.round_id:
            if isinstance(message, SecAggUnmask) and self.site in message.survivors:
                log.warning("asked to unmask %s, but this agent no longer holds that round's keys (restarted?); "
                            "the other sites' shares stand in for ours", message.round_id)
            return
        try:
            if isinstance(message, SecAggRoster):
                if self.site not in {k.site for k in message.keys}:
                    raise SecureUpdateError("the roster does not include this site's keys (they came too late)")
                self.transport.publish(self.topics.site(self.site, "secagg"), session.on_roster(message).to_bytes())
            elif isinstance(message, SecAggShares):
                blob = session.on_shares(message)
                report = session.report.model_copy(
                    update={"update": make_manifest(blob, MASKED_MEDIA_TYPE, self.settings.chunk_size)})
                self.state.set_pending(report, blob)
                self._publish_pending()
                self._log_round(report.round, f"masked update {_kb(len(blob))} sent")
            elif self.site in message.survivors:
                self.transport.publish(self.topics.site(self.site, "secagg"), session.on_unmask(message).to_bytes())
                self.secure = None
            else:
                log.warning("round %s went on without this site's masked update", message.round_id)
                self.secure = None
        except SecureUpdateError as e:
            log.error("secure aggregation, round %s: %s", message.round_id, e)
            self.secure = None
            self._fail("secagg.failed", f"secure aggregation: {e}", message.round_id)

    def _on_chunk_request(self, req: ChunkRequest) -> None:
        held = self.outbox.get(req.blob_id)
        if held is None:
            pending = self.state.record.pending
            if pending is None or pending.blob != req.blob_id:
                log.warning("asked for blob %s which this agent no longer holds", req.blob_id[:12])
                return
            data = self.state.blobs.get(pending.blob)
            held = (pending.report.update, data)
            self.outbox.add(*held)
        manifest, data = held
        for index, chunk in iter_chunks(data, manifest, req.indices):
            self.transport.publish(self.topics.site_chunk(self.site, manifest.blob_id, index), chunk)

    # work -----------------------------------------------------------------------------------
    def _dataset(self, task: TaskSpec) -> LocalDataset:
        if self._data is None or self._data[0] != task:
            # The task names the label: now its balance can be summarized (before the load, which may fail).
            self._summary = summarize(self.settings.data_train, self.settings.data_test,
                                      self.settings.label_column or task.label)
            self._data = (task, load_dataset(self.settings.data_train, self.settings.data_test, task,
                                             self.settings.label_column))
        return self._data[1]

    def _personalize(self, model_bytes: bytes, cmd: RoundCommand) -> bytes:
        """The global model with this site's own values of the tensors it keeps local (FedBN)."""
        own = {k: v for k, v in self.state.local_parameters().items() if k in cmd.training.local_parameters}
        if not own:
            return model_bytes
        model = load_model_bytes(model_bytes, max_bytes=self.settings.max_blob_bytes)
        return model_to_bytes(replace_initializers(model, own))

    def _drop_unsent_feedback(self) -> None:
        """Error feedback staged for an update that was never saved as pending never left: forget it.

        Happens after a crash between encoding and saving, and when a secure round ends before
        this site's masked update could be sent.
        """
        held = self.feedback.pending
        pending = self.state.record.pending
        if held is not None and (pending is None or pending.report.round_id != held[0]):
            self.feedback.discard(held[0])

    def _run_round(self) -> None:
        """Evaluate, train and send for the current round; whatever goes wrong becomes the site's error status.

        Expected failures carry their monitoring code (bad data, training, a privacy rule); any
        other exception is a bug, logged with its traceback and reported as ``agent.internal``:
        the agent goes on with the next round rather than ending a hospital's process.
        """
        cmd = self.command
        assert cmd is not None
        self._fetching = None
        try:
            prepared = self._prepare_update(cmd)
        except (DataError, TrainingError) as e:
            log.error("cannot take part in %s: %s", cmd.round_id, e)
            self._fail(e.code, e.public if isinstance(e, DataError) else str(e), cmd.round_id)
            self.command = None
            return
        except OnnxExecutorError as e:
            log.error("cannot take part in %s: the model cannot run here: %s", cmd.round_id, e)
            self._fail("model.unusable", f"model v{cmd.model_version} cannot run here: {e}", cmd.round_id)
            self.command = None
            return
        except Exception as e:  # a bug must cost one round, not the hospital's agent
            log.exception("unexpected error in %s; reported as agent.internal, the agent goes on", cmd.round_id)
            self._fail("agent.internal", f"unexpected {type(e).__name__} in round {cmd.round}; the agent's log has "
                       "the traceback", cmd.round_id)
            self.command = None
            return
        report, blob, delta = prepared
        if cmd.kind == "train" and cmd.training.secure_aggregation is not None:
            self._begin_secure(cmd, delta, report)
            return
        self.state.set_pending(report, blob)
        self._publish_pending()
        self._log_round(report.round, f"{'update' if blob is not None else 'evaluation'} "
                        f"{_kb(len(blob)) + ' ' if blob is not None else ''}sent")

    def _prepare_update(self, cmd: RoundCommand) -> tuple[UpdateReport, bytes | None, dict[str, np.ndarray]]:
        """Score the round's model and (in a train round) train: the report, the encoded update, the raw delta."""
        self._drop_unsent_feedback()
        global_bytes = self.state.blobs.get(cmd.model_sha256)
        self.state.set_model(cmd.model_version, cmd.model_sha256)
        cfg = cmd.training
        seed = round_seed(cfg.seed, self.site, cmd.round)
        if cmd.kind == "train":
            check_client_dp_floor(self.settings, cmd)
        data = self._dataset(cmd.task)
        dp = self._charge_dp_sgd(cmd, data)
        start_bytes = self._personalize(global_bytes, cmd)
        evaluation = personalized = None
        if data.x_test is not None:
            scorings = 1 + bool(cfg.finetune_steps or start_bytes is not global_bytes)
            self._report_progress(self._progress_of(cmd, "evaluating", steps_total=scorings),
                                  f"model v{cmd.model_version}", force=True)
            evaluation = self._score(global_bytes, data, cfg.loss, "global")
            self._round_notes.append(_score_note(evaluation))
            if scorings == 2:
                self._report_progress(self._progress_of(cmd, "evaluating", steps_done=1, steps_total=2),
                                      f"model v{cmd.model_version}")
                tuned = finetune(start_bytes, data.x_train, data.y_train, cfg, seed=seed, dp=dp) \
                    if cfg.finetune_steps else start_bytes
                personalized = self._score(tuned, data, cfg.loss, "personalized")
        else:
            self._round_notes.append("no test set")
        blob = None
        manifest = None
        unclipped = None
        delta: dict[str, np.ndarray] = {}
        metrics: dict[str, float] = {}
        seconds = 0.0
        if cmd.kind == "train":
            detail = f"round {cmd.round}"
            total = planned_steps(data.num_train, cfg)
            self._report_progress(self._progress_of(cmd, "training", steps_total=total), detail, force=True)

            def on_step(done: int, planned: int) -> None:
                self._report_progress(self._progress_of(cmd, "training", steps_done=done, steps_total=planned),
                                      detail)

            result = train(load_model_bytes(start_bytes), data.x_train, data.y_train, cfg, seed=seed, dp=dp,
                           on_step=on_step)
            delta = result.delta
            self._round_notes.append(_training_note(result.metrics, result.seconds))
            if cfg.local_parameters:
                local = set(cfg.local_parameters)
                self.state.save_local_parameters({k: result.weights[k] for k in local})
                # Never averaged, so never sent: zeros cost nothing once sparsified or compressed.
                delta = {k: np.zeros_like(v) if k in local else v for k, v in delta.items()}
            if cfg.dp_clip_norm is not None:
                delta, unclipped = _clip_and_noise(delta, cfg)
            metrics, seconds = result.metrics, result.seconds
            if cfg.secure_aggregation is None:
                blob = self._encode_update(delta, cmd)
                manifest = make_manifest(blob, UPDATE_MEDIA_TYPE, self.settings.chunk_size)
        report = UpdateReport(federation=self.settings.federation, sender=self.site, round_id=cmd.round_id,
                              round=cmd.round, base_version=cmd.model_version, num_samples=data.num_train,
                              update=manifest, train_metrics=metrics, evaluation=evaluation,
                              personalized=personalized, train_seconds=seconds, dp_unclipped=unclipped,
                              privacy=self._sample_privacy())
        return report, blob, delta

    def _log_round(self, round_no: int, last: str) -> None:
        """One INFO line per round saying what this site did: what a hospital reads in its own log."""
        log.info("%s: %s", self._round_name(round_no), "; ".join([*self._round_notes, last]))
        self._round_notes = []

    def _begin_secure(self, cmd: RoundCommand, delta: dict[str, np.ndarray], report: UpdateReport) -> None:
        """Quantize the update into the round's shared layout and advertise this site's keys for it."""
        sa = cmd.training.secure_aggregation
        assert sa is not None
        try:
            identity = SiteIdentity.from_settings(self.settings)
            layout = UpdateLayout.for_round({k: v.shape for k, v in delta.items()}, cmd.training.local_parameters, sa)
            if layout.indices is not None and sa.error_feedback:
                delta = self.feedback.stage(delta, update_id=cmd.round_id, sent=layout.received)
            vector = layout.pack(delta, site_weight(sa, report.num_samples))
            rng = np.random.default_rng(round_seed(cmd.training.seed, self.site, cmd.round))
            quantized, saturated = quantize_update(vector, sa, len(cmd.selected), rng)
        except (SecureUpdateError, ValueError) as e:
            log.error("cannot take part in %s: %s", cmd.round_id, e)
            self._fail("secagg.failed", f"secure aggregation: {e}", cmd.round_id)
            self.command = None
            return
        if saturated:
            log.warning("round %d: %d update coordinates exceed the secure-aggregation bound %g and were clipped "
                        "to it; ask the orchestrator for a larger secure_aggregation.bound", cmd.round, saturated,
                        sa.bound)
        report = report.model_copy(update={"train_metrics": {**report.train_metrics,
                                                             "secagg_saturated": float(saturated)}})
        self.secure = SecureUpdate(self.site, cmd, quantized, report, identity)
        self.transport.publish(self.topics.site(self.site, "secagg"), self.secure.advert().to_bytes())
        self.set_status("uploading", f"round {cmd.round}: secure aggregation keys sent")

    def _score(self, model: bytes, data: LocalDataset, loss: str, which: str) -> EvalMetrics | None:
        """The model's test metrics; None (the round goes on without them) when they are not finite."""
        try:
            return evaluate(model, data.x_test, data.y_test, loss)
        except TrainingError as e:
            log.error("no %s evaluation this round: %s", which, e)
            return None

    def _charge_dp_sgd(self, cmd: RoundCommand, data: LocalDataset) -> DPSGDConfig | None:
        """Charge this round's DP-SGD steps to the site's ledger before any of them is taken.

        Raises ``TrainingError`` (the round is refused, nothing is sent) when the settings cannot
        be followed privately or the steps would take epsilon past ``dp_sgd_max_epsilon``.
        """
        s = self.settings
        if not s.dp_sgd:
            return None
        assert s.dp_sgd_noise_multiplier is not None and s.dp_sgd_max_epsilon is not None  # s.dp_sgd
        private = DPSGDConfig(clip_norm=s.dp_sgd_clip_norm, noise_multiplier=s.dp_sgd_noise_multiplier)
        cfg = cmd.training
        tuning = cfg.finetune_steps if data.x_test is not None else 0
        steps = tuning + (planned_steps(data.num_train, cfg) if cmd.kind == "train" else 0)
        if steps == 0:  # an evaluation round without fine-tuning touches no training record
            return private
        check_private_training(data.num_train, cfg)
        # Imported here: dp-accounting pulls in SciPy, seconds of start-up only DP-SGD sites need.
        from shared.privacy.accountant import PrivacyBudget, PrivacyBudgetExceeded, SampleLevelAccountant

        accountant = SampleLevelAccountant(s.dp_sgd_noise_multiplier, cfg.batch_size, data.num_train,
                                           s.dp_sgd_delta)
        accountant.restore(self.state.dp_sgd_history())
        try:
            epsilon = PrivacyBudget(accountant, s.dp_sgd_max_epsilon).charge(steps)
        except PrivacyBudgetExceeded as e:
            raise TrainingError(f"privacy budget spent: round {cmd.round} was refused because {e}; this site "
                                "sends no update and trains no more unless its operator raises dp_sgd_max_epsilon "
                                "(a weaker guarantee for its patients)", "privacy.budget_spent") from None
        spent = PrivacySpent(level="sample", mechanism="dp_sgd", epsilon=epsilon, delta=s.dp_sgd_delta,
                             steps=accountant.steps, noise_multiplier=s.dp_sgd_noise_multiplier,
                             sampling_rate=accountant.sampling_rate, clip_norm=s.dp_sgd_clip_norm,
                             max_epsilon=s.dp_sgd_max_epsilon)
        self.state.charge_dp_sgd(accountant.history(), spent)
        log.info("round %d: charged %d DP-SGD steps; sample-level epsilon %.4g of %.4g (delta %g)", cmd.round, steps,
                 epsilon, s.dp_sgd_max_epsilon, s.dp_sgd_delta)
        return private

    def _encode_update(self, delta: dict, cmd: RoundCommand) -> bytes:
        """Compress as the round asks; with error feedback, what is not sent now is carried to later rounds."""
        settings = cmd.training.compression
        rng = np.random.default_rng(round_seed(cmd.training.seed, self.site, cmd.round))
        if settings.mode == "sparse":
            graph = load_model_bytes(self.state.blobs.get(cmd.model_sha256)).graph
            settings = settings.model_copy(
                update={"dense_tensors": tuple(sorted(set(settings.dense_tensors) | running_stat_names(graph)))})
        if settings.mode == "sparse" and settings.error_feedback:
            return self.feedback.encode(delta, settings, update_id=cmd.round_id, rng=rng)
        return encode_tensors(delta, settings, rng=rng)

    def _publish_pending(self) -> None:
        pending = self.state.record.pending
        assert pending is not None
        report = pending.report
        detail = f"round {report.round}"
        # The report first, so the orchestrator expects the chunks (see OrchestratorService.announce).
        self.transport.publish(self.topics.site(self.site, "update"), report.to_bytes())
        size = report.update.size if pending.blob is not None and report.update is not None else 0
        if pending.blob is not None and report.update is not None:
            data = self.state.blobs.get(pending.blob)
            self.outbox.add(report.update, data)
            self._report_progress(self._progress_of(report, "uploading", bytes_total=size), detail, force=True)
            for index, chunk in iter_chunks(data, report.update):
                self.transport.publish(self.topics.site_chunk(self.site, pending.blob, index), chunk)
                self._report_progress(self._progress_of(report, "uploading", bytes_total=size,
                                                        bytes_done=min(size, (index + 1) * report.update.chunk_size)),
                                      detail)
        self._ack_due = time.monotonic() + self.settings.ack_timeout
        self._report_progress(self._progress_of(report, "uploading", bytes_done=size, bytes_total=size), detail)


def _kb(size: int) -> str:
    return f"{size / 1000:.1f} kB"


def _score_note(metrics: EvalMetrics | None) -> str:
    """The round's test score for the agent's log."""
    if metrics is None:
        return "test metrics not finite"
    if metrics.accuracy is not None:
        return f"test accuracy {metrics.accuracy:.3f} on {metrics.num_examples} rows"
    return f"test loss {metrics.loss:.4g} on {metrics.num_examples} rows"


def _training_note(metrics: dict[str, float], seconds: float) -> str:
    """What training did, for the agent's log (no loss under DP-SGD: the metrics do not carry it)."""
    note = f"trained {int(metrics.get('steps', 0))} steps in {seconds:.1f} s"
    return note + (f", loss {metrics['loss_last']:.3g}" if "loss_last" in metrics else "")


def check_client_dp_floor(settings: AgentSettings, cmd: RoundCommand) -> None:
    """Refuse (``TrainingError``) a train round whose client-level DP is weaker than this site's floor.

    Why here and first: the floor is the hospital's, not the federation's, so the round command
    cannot lower it, and a refused round must cost no training, no DP-SGD budget and no message
    but the error status. Central noise is added by the orchestrator, out of the site's sight,
    so for the floor it counts as no noise.
    """
    max_clip, min_std = settings.dp_max_clip_norm, settings.dp_min_noise_share_std
    if max_clip is None:
        return
    cfg = cmd.training
    clip = cfg.dp_clip_norm
    short = []
    if clip is None:
        short.append("no client-level DP at all")
    elif clip > max_clip:
        short.append(f"a clip norm of {clip:g}")
    if min_std is not None and clip is not None and cfg.dp_noise_share_std < min_std:
        short.append(f"a noise share std of {cfg.dp_noise_share_std:g}" if cfg.dp_noise_share_std
                     else "no noise added by the sites (no distributed noise)")
    if not short:
        return
    required = f"updates clipped to an L2 norm of at most {max_clip:g} (FEDMQ_DP_MAX_CLIP_NORM)"
    ask = f"a dp_fedavg clip_norm of at most {max_clip:g}"
    lower = "raise FEDMQ_DP_MAX_CLIP_NORM"
    if min_std is not None:
        required += f" with a distributed noise share std of at least {min_std:g} (FEDMQ_DP_MIN_NOISE_SHARE_STD)"
        ask += (" with noise 'distributed' and a noise_multiplier of at least "
                f"{min_std:g} * sqrt(quorum) / clip_norm (each site's share is noise_multiplier * clip_norm / "
                "sqrt(quorum))")
        lower = "lower FEDMQ_DP_MIN_NOISE_SHARE_STD or " + lower
    raise TrainingError(f"this site requires client-level DP: {required}; round {cmd.round} ({cmd.round_id}) asks "
                        f"for {' and '.join(short)}, so it was refused and nothing was sent; ask the federation for "
                        f"{ask}, or {lower} (a weaker guarantee for this site's patients)", "privacy.floor")


def _clip_and_noise(delta: dict[str, np.ndarray], cfg: TrainingConfig) -> tuple[dict[str, np.ndarray], bool]:
    """Client-level DP as the round asks: clip the whole update, add this site's noise share if any.

    Returns the update to send and whether it was within the bound before clipping (adaptive
    clipping counts those). The share goes only on tensors that are averaged: noise on the
    zeros of FedBN's local tensors would cost bytes and protect nothing.
    """
    assert cfg.dp_clip_norm is not None
    try:
        clipped, norm = clip_update(delta, cfg.dp_clip_norm)
    except (TypeError, ValueError) as e:
        raise TrainingError(f"cannot clip the update for client-level privacy: {e}") from None
    shared = {k: v for k, v in clipped.items() if k not in cfg.local_parameters}
    if cfg.dp_noise_share_std > 0 and shared:
        clipped.update(add_noise_with_std(shared, cfg.dp_noise_share_std, system_rng()))
    return clipped, norm <= cfg.dp_clip_norm
