"""The orchestrator daemon: MQTT in and out around the round engine.

One thread owns everything: it drains the transport's inbox, routes each message (site
status, update reports, update chunks, chunk requests), and ticks the round engine. Bad
input — malformed JSON, unknown types, another federation, a sender that is not the site
whose topic it used, a chunk whose hash is wrong — is logged and dropped; it never stops
the loop.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.architectures import build_onnx, load_user_model
from orchestrator.journal import RoundJournal, RoundRecord
from orchestrator.registry import ModelRegistry, ModelVersion, open_database, pool_metrics
from orchestrator.rounds import RoundEngine, UpdateRejected
from orchestrator.secure_round import SecureRoundError
from orchestrator.strategies import StrategyConfig, make_strategy
from shared.blobs import BlobInbox, BlobOutbox, ChunkError, iter_chunks
from shared.blobstore import BlobStore
from shared.config import OrchestratorSettings
from shared.protocol import (ChunkRequest, EvalMetrics, Message, ModelPublished, OrchestratorStatus, ProtocolError,
                             RoundCommand, RoundSummary, SecAggAdvert, SecAggReveal, SecAggShares, SiteStatus,
                             UpdateAck, UpdateReport, parse_message)
from shared.topics import Topics
from shared.transport import Incoming, Transport

log = logging.getLogger(__name__)

SENDER = "orchestrator"


@dataclass
class _PendingUpload:
    site: str
    report: UpdateReport


class OrchestratorService:
    def __init__(self, settings: OrchestratorSettings) -> None:
        self.settings = settings
        self.topics = Topics(settings.federation)
        state_dir = Path(settings.state_dir)
        conn = open_database(state_dir / "orchestrator.sqlite")
        self.registry = ModelRegistry(conn, BlobStore(state_dir / "blobs"))
        self.journal = RoundJournal(conn)
        self.strategy = make_strategy(StrategyConfig.model_validate(settings.strategy))
        status_offline = OrchestratorStatus(federation=settings.federation, sender=SENDER, state="offline")
        self.transport = Transport(settings, f"fedmq-{settings.federation}-orchestrator",
                                   will=(self.topics.orchestrator_status, status_offline.to_bytes()),
                                   max_message_bytes=settings.chunk_size + 65536)
        self.inbox = BlobInbox(max_blob_bytes=settings.max_blob_bytes)
        self.outbox = BlobOutbox()
        self.presence: dict[str, SiteStatus] = {}
        self.uploads: dict[str, _PendingUpload] = {}
        self._retained: dict[str, bytes] = {}  # topic -> our last retained message, for a broker that lost it
        self.engine = RoundEngine(settings, self.registry, self.journal, self.strategy, self)
        self._traffic_mark = (0, 0)
        self.rejected = 0

    # lifetime -------------------------------------------------------------------------------
    def _initial_model(self) -> bytes:
        s = self.settings
        if s.initial_model is not None:
            return load_user_model(s.initial_model)
        if not s.task_features:
            raise ValueError("set task_features (FEDMQ_TASK_FEATURES) or initial_model so the first model can be built")
        if s.task_input_shape:
            return build_onnx(s.architecture, input_shape=tuple(s.task_input_shape), num_outputs=s.num_outputs,
                              hidden=tuple(s.hidden))
        return build_onnx(s.architecture, num_features=len(s.task_features), num_outputs=s.num_outputs,
                          hidden=tuple(s.hidden))

    def run(self, stop: threading.Event) -> None:
        """Serve until ``stop`` is set or (with ``exit_when_done``) the federation finished.

        An unreachable broker is waited for (the transport logs each attempt); only a refusal
        retrying cannot fix (credentials, certificates) raises ``TransportError``.
        """
        t = self.transport
        for topic in (f"{self.topics.base}/site/+/status", f"{self.topics.base}/site/+/update",
                      f"{self.topics.base}/site/+/request", f"{self.topics.base}/site/+/blob/+/+",
                      f"{self.topics.base}/site/+/secagg"):
            t.subscribe(topic)
        t.start_retrying()
        try:
            # Selection needs the sites' retained statuses, so nothing starts before the broker answers.
            if not t.wait_connected(stop):
                return
            self.status("starting")
            # Reopen the round first: updates queued for us while we were down must find it open.
            self.engine.start(self._initial_model)
            time.sleep(0.5)  # let retained site statuses arrive before the first selection
            while not stop.is_set():
                t.raise_if_refused()
                if t.take_reconnect():
                    self._after_reconnect()
                self._drain(0.2)
                if t.connected.is_set():  # requests made while cut off would all arrive at once
                    self._request_stalled()
                self.engine.tick(self.online())
                if self.engine.state == "finished" and self.settings.exit_when_done:
                    break
        finally:
            if t.connected.is_set() and self.engine.state != "finished":
                self.status("offline", "stopped")  # a clean disconnect does not fire the last will
            t.stop()

    def _after_reconnect(self) -> None:
        """Put back on the broker what a restart without persistence lost, and ask sites for what is missing.

        Our retained messages (status, latest model, last round summary) and the open round's
        command are published again. The command reaches the selected sites again: one holding
        an unacknowledged update resends it at once (an update already stored is only
        acknowledged again, never counted twice), which also completes an upload cut off
        midway; ``_request_stalled`` asks for whatever chunks are still missing after that.
        Without this a report lost with the broker would keep the round open until its deadline.
        """
        for topic, payload in self._retained.items():
            self.transport.publish(topic, payload, retain=True)
        cur = self.engine.current
        if cur is not None:
            log.info("re-announcing round %d attempt %d after the reconnection (reported so far: %s)",
                     cur.record.round, cur.record.attempt, sorted(cur.reported) or "none")
            self.transport.publish(self.topics.round, cur.command.to_bytes(), retain=True)

    def _drain(self, timeout: float) -> None:
        msg = self.transport.get(timeout)
        while msg is not None:
            self.handle(msg)
            msg = self.transport.get(0)

    def online(self) -> set[str]:
        return {s for s, st in self.presence.items() if st.state != "offline"}

    # routing --------------------------------------------------------------------------------
    def handle(self, msg: Incoming) -> None:
        site = self.topics.site_of(msg.topic)
        if site is None:
            return
        try:
            if Topics.is_chunk(msg.topic):
                self._on_chunk(site, msg.payload)
                return
            message = parse_message(msg.payload)
            if message.federation != self.settings.federation:
                raise ProtocolError(f"message is for federation {message.federation!r}, this is "
                                    f"{self.settings.federation!r}")
            if message.sender != site:
                raise ProtocolError(f"sender {message.sender!r} published on site {site!r}'s topic")
            if isinstance(message, SiteStatus):
                self._on_status(site, message)
            elif isinstance(message, UpdateReport):
                self._on_report(site, message)
            elif isinstance(message, ChunkRequest):
                self._on_chunk_request(site, message)
            elif isinstance(message, SecAggAdvert | SecAggShares | SecAggReveal):
                self.engine.on_secure_message(site, message)
            else:
                raise ProtocolError(f"a site may not send {message.type!r} messages")
        except (ProtocolError, ChunkError, SecureRoundError) as e:
            self.rejected += 1
            log.warning("rejected a message from %s on %s: %s", site, msg.topic, e)

    def _on_status(self, site: str, status: SiteStatus) -> None:
        before = self.presence.get(site)
        self.presence[site] = status
        if before is None or before.state != status.state:
            log.info("site %s is %s%s", site, status.state, f" ({status.detail})" if status.detail else "")

    def _already_stored(self, site: str, report: UpdateReport) -> bool:
        """A resend of an update we hold (its ack was lost): acknowledge it again, even if the round closed."""
        stored = next((u for u in self.journal.updates(report.round_id) if u.site == site), None)
        return stored is not None and stored.blob == (report.update.blob_id if report.update else None)

    def _on_report(self, site: str, report: UpdateReport) -> None:
        if self._already_stored(site, report):
            self.ack(site, report, accepted=True)
            return
        try:
            self.engine.check_report(site, report)
        except UpdateRejected as e:
            log.warning("refused the update of %s for %s: %s", site, report.round_id, e)
            self.ack(site, report, accepted=False, reason=str(e))
            return
        if report.update is None:
            self._accept(site, report, None)
            return
        if report.update.blob_id in self.registry.blobs:
            self._accept(site, report, self.registry.blobs.get(report.update.blob_id))
            return
        self.uploads[report.update.blob_id] = _PendingUpload(site, report)
        self._blob_complete(site, self.inbox.expect(report.update))

    def _on_chunk(self, site: str, payload: bytes) -> None:
        self._blob_complete(site, self.inbox.offer(payload))

    def _blob_complete(self, site: str, blob_id: str | None) -> None:
        if blob_id is None:
            return
        data = self.inbox.take(blob_id)
        pending = self.uploads.pop(blob_id, None)
        if pending is None or pending.site != site:
            log.warning("dropped update blob %s from %s: no matching report", blob_id[:12], site)
            return
        self._accept(site, pending.report, data)

    def _accept(self, site: str, report: UpdateReport, data: bytes | None) -> None:
        try:
            self.engine.accept(site, report, data)
        except UpdateRejected as e:
            log.warning("refused the update of %s for %s: %s", site, report.round_id, e)
            self.ack(site, report, accepted=False, reason=str(e))
            return
        self.ack(site, report, accepted=True)
        self.status(self.engine.state)

    def _on_chunk_request(self, site: str, req: ChunkRequest) -> None:
        held = self.outbox.get(req.blob_id)
        if held is None:
            log.warning("%s asked for blob %s which is no longer offered", site, req.blob_id[:12])
            return
        manifest, data = held
        for index, chunk in iter_chunks(data, manifest, req.indices):
            self.transport.publish(self.topics.to_site_chunk(site, manifest.blob_id, index), chunk)

    def _request_stalled(self) -> None:
        for blob_id in self.inbox.stalled(older_than=5.0):
            pending = self.uploads.get(blob_id)
            if pending is None:
                self.inbox.forget(blob_id)
                continue
            req = ChunkRequest(federation=self.settings.federation, sender=SENDER, blob_id=blob_id,
                               indices=self.inbox.missing(blob_id))
            log.info("asking %s again for %d chunks of its update", pending.site, len(req.indices))
            self.transport.publish(self.topics.to_site(pending.site, "request"), req.to_bytes())

    # RoundPublisher -------------------------------------------------------------------------
    def ack(self, site: str, report: UpdateReport, *, accepted: bool, reason: str | None = None) -> None:
        ack = UpdateAck(federation=self.settings.federation, sender=SENDER, round_id=report.round_id,
                        blob_id=report.update.blob_id if report.update else None, accepted=accepted, reason=reason)
        self.transport.publish(self.topics.to_site(site, "ack"), ack.to_bytes())

    def announce(self, command: RoundCommand, blobs: dict[str, bytes]) -> None:
        """Broadcast the delta when there is one (sites without its base ask for the full model)."""
        self._traffic_mark = (self.transport.bytes_sent, self.transport.bytes_received)
        manifests = [command.model] + ([command.model_delta.blob] if command.model_delta else [])
        for manifest in manifests:
            self.outbox.add(manifest, blobs[manifest.blob_id])
        # The command goes first so agents expect the blob before its chunks arrive: chunks
        # that come early are only parked in a bounded buffer, and big models would overflow it.
        self.transport.publish(self.topics.round, command.to_bytes(), retain=True)
        broadcast = manifests[-1]
        for index, chunk in iter_chunks(blobs[broadcast.blob_id], broadcast):
            self.transport.publish(self.topics.broadcast_chunk(broadcast.blob_id, index), chunk)

    def secagg_broadcast(self, message: Message) -> None:
        self.transport.publish(self.topics.secagg, message.to_bytes())

    def secagg_to_site(self, site: str, message: Message) -> None:
        self.transport.publish(self.topics.to_site(site, "secagg"), message.to_bytes())

    def announced_samples(self, site: str) -> int | None:
        """The training-set size a site announces in its status (public: it weights the secure sum)."""
        status = self.presence.get(site)
        return status.num_samples if status else None

    def failed_sites(self, round_id: str) -> dict[str, str]:
        """Sites whose retained status says they failed this round attempt, with what they said."""
        return {site: status.detail for site, status in self.presence.items()
                if status.state == "error" and status.round_id == round_id}

    def model_published(self, version: ModelVersion) -> None:
        msg = ModelPublished(federation=self.settings.federation, sender=SENDER, version=version.version,
                             sha256=version.sha256, parent=version.parent, round=version.round,
                             contributors=version.contributors)
        self._publish_retained(self.topics.model, msg.to_bytes())

    def round_summary(self, record: RoundRecord, evaluated_version: int, new_version: int | None,
                      site_metrics: dict[str, EvalMetrics], personalized: dict[str, EvalMetrics],
                      seconds: dict[str, float]) -> None:
        sent, received = self.transport.bytes_sent, self.transport.bytes_received
        # The privacy spent so far: with the new version, or (evaluation rounds) with the one evaluated.
        privacy = self.registry.get(evaluated_version if new_version is None else new_version).privacy
        msg = RoundSummary(federation=self.settings.federation, sender=SENDER, round=record.round,
                           evaluated_version=evaluated_version, new_version=new_version, site_metrics=site_metrics,
                           pooled=pool_metrics(site_metrics), personalized_metrics=personalized,
                           personalized_pooled=pool_metrics(personalized), bytes_down=sent - self._traffic_mark[0],
                           bytes_up=received - self._traffic_mark[1], seconds=seconds, privacy=privacy)
        self._publish_retained(self.topics.round_summary, msg.to_bytes())

    def status(self, state: str, detail: str = "") -> None:
        cur = self.engine.current if hasattr(self, "engine") else None
        latest = self.registry.latest()
        msg = OrchestratorStatus(
            federation=self.settings.federation, sender=SENDER, state=state,
            round=cur.record.round if cur else None, attempt=cur.record.attempt if cur else None,
            round_id=cur.record.round_id if cur else None, model_version=latest.version if latest else None,
            selected=cur.record.selected if cur else [], reported=sorted(cur.reported) if cur else [],
            deadline=cur.record.deadline if cur else None, detail=detail)
        self._publish_retained(self.topics.orchestrator_status, msg.to_bytes())

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained message and remember it for ``_after_reconnect``."""
        self._retained[topic] = payload
        self.transport.publish(topic, payload, retain=True)
