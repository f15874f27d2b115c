"""The orchestrator daemon: MQTT in and out around the round engine.

One thread owns everything: it drains the transport's inbox, routes each message (site
status, update reports, update chunks, chunk requests), and ticks the round engine. Bad
input — malformed JSON, unknown types, another federation, a sender that is not the site
whose topic it used, a chunk whose hash is wrong — is logged and dropped; it never stops
the loop.

An authenticated site can still be hostile, so what one site can make the orchestrator hold
is bounded: its messages pass a token bucket (``orchestrator/site_limits.py``); it has at
most one upload in flight per round, whose declared size the engine checks against the
round's model before a buffer is allocated; a stalled upload is asked for again a few times,
then dropped; and every upload of a round is released when the round closes or fails.
Every refusal is counted per site and reason and published on the retained status.

Monitoring (docs/monitoring.md): the retained status says the round, of how many, of which
kind, since when; ``orchestrator/alerts.py`` turns what the service sees into the retained
alert set on ``orch/all/alerts``.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from orchestrator.alerts import AlertMonitor
from orchestrator.architectures import build_onnx, load_user_model
from orchestrator.journal import RoundJournal, RoundRecord
from orchestrator.registry import ModelRegistry, ModelVersion, open_database, pool_metrics
from orchestrator.rounds import RoundEngine, UpdateRejected
from orchestrator.secure_round import SecureRoundError
from orchestrator.strategies import StrategyConfig, make_strategy
from orchestrator.site_limits import Refusals, SiteRateLimits
from shared.blobs import CHUNK_HEADER_BYTES, BlobInbox, BlobOutbox, ChunkError, decode_chunk, iter_chunks
from shared.blobstore import BlobStore
from shared.config import OrchestratorSettings
from shared.pki import MONITOR_PREFIX
from shared.protocol import (Alert, AlertState, ChunkRequest, EvalMetrics, Message, ModelPublished, OrchestratorStatus,
                             ProtocolError, RoundCommand, RoundSummary, SecAggAdvert, SecAggReveal, SecAggShares,
                             SiteStatus, UpdateAck, UpdateReport, parse_message)
from shared.topics import Topics
from shared.transport import Incoming, Transport

log = logging.getLogger(__name__)

SENDER = "orchestrator"
REFUSALS_PUBLISH_INTERVAL = 2.0  # seconds between status messages that only update the refusal counts


@dataclass
class _Upload:
    """A site's update for a round: its report was accepted, its chunks are on their way."""

    site: str
    report: UpdateReport
    rerequests: int = 0

    @property
    def blob_id(self) -> str:
        assert self.report.update is not None
        return self.report.update.blob_id


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
        self.uploads: dict[tuple[str, str], _Upload] = {}  # (site, round id) -> its upload in flight
        self.limits = SiteRateLimits(settings.site_messages_per_second, settings.site_message_burst)
        self.refusals = Refusals()
        self._refusals_published = (0, 0.0)  # (refusals.changes, monotonic time) of the last status
        self._last_status = ("starting", "")
        self._retained: dict[str, bytes] = {}  # topic -> our last retained message, for a broker that lost it
        self.engine = RoundEngine(settings, self.registry, self.journal, self.strategy, self)
        self._traffic_mark = (0, 0)
        self.alerts = AlertMonitor(settings.alerts, self._publish_alerts)

    @property
    def rejected(self) -> int:
        """Messages refused so far, all sites and reasons."""
        return self.refusals.total

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
            self.alerts.start()
            # Reopen the round first: updates queued for us while we were down must find it open.
            self.engine.start(self._initial_model)
            latest = self.registry.latest()
            self.alerts.client_privacy(latest.privacy if latest else None)
            time.sleep(0.5)  # let retained site statuses arrive before the first selection
            while not stop.is_set():
                t.raise_if_refused()
                if t.take_reconnect():
                    self._after_reconnect()
                self._drain(0.2)
                if t.connected.is_set():  # requests made while cut off would all arrive at once
                    self._request_stalled()
                self.engine.tick(self.online())
                self.alerts.tick()
                self._publish_refusals()
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
        if site.startswith(MONITOR_PREFIX):
            # A monitor's certificate that the broker's ACL does not name yet has a site's rights
            # there: whatever it publishes is refused here, never taken for a site's word.
            self.refusals.refuse(site, "monitor_identity", f"monitor identities publish nothing; dropped {msg.topic}")
            return
        chunk = Topics.is_chunk(msg.topic)
        # Chunks of the site's own upload in flight are bounded by that upload: never charged.
        if not (chunk and self._uploading(site, msg.payload)) and not self.limits.allow(site):
            self.refusals.refuse(site, "rate_limited", f"more than {self.limits.rate:g} messages/s (burst "
                                 f"{self.limits.burst}); dropped a message on {msg.topic}")
            return
        try:
            if chunk:
                self._on_chunk(site, msg.payload)
                return
            message = parse_message(msg.payload)
            if message.federation != self.settings.federation:
                raise ProtocolError(f"message is for federation {message.federation!r}, this is "
                                    f"{self.settings.federation!r}")
            if message.sender != site:
                self.refusals.refuse(site, "wrong_sender", f"sender {message.sender!r} published on site {site!r}'s "
                                     f"topic {msg.topic}")
                return
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
        except ProtocolError as e:
            self.refusals.refuse(site, "protocol", f"{e} (on {msg.topic})")
        except ChunkError as e:
            self.refusals.refuse(site, "bad_chunk", f"{e} (on {msg.topic})")
        except SecureRoundError as e:
            self.refusals.refuse(site, "secagg", f"{e} (on {msg.topic})")

    def _on_status(self, site: str, status: SiteStatus) -> None:
        before = self.presence.get(site)
        self.presence[site] = status
        if before is None or before.state != status.state:
            log.info("site %s is %s%s", site, status.state, f" ({status.detail})" if status.detail else "")
        self.alerts.site_status(site, status)

    def _already_stored(self, site: str, report: UpdateReport) -> bool:
        """A resend of an update we hold (its ack was lost): acknowledge it again, even if the round closed."""
        stored = next((u for u in self.journal.updates(report.round_id) if u.site == site), None)
        return stored is not None and stored.blob == (report.update.blob_id if report.update else None)

    def _on_report(self, site: str, report: UpdateReport) -> None:
        if self._already_stored(site, report):
            self.ack(site, report, accepted=True)
            return
        upload = self.uploads.get((site, report.round_id))
        if upload is not None:
            if report.update is not None and report.update.blob_id == upload.blob_id:
                return  # a resend of the upload in flight: its chunks are on their way
            self._refuse_report(site, report, "upload_in_flight", f"another update ({upload.blob_id[:12]}) of this "
                                "site for the round is still arriving; a site sends one update per round")
            return
        try:
            self.engine.check_report(site, report)
            if report.update is not None:
                self._check_chunking(report)
        except UpdateRejected as e:
            self._refuse_report(site, report, e.code, str(e))
            return
        if report.update is None:
            self._accept(site, report, None)
            return
        if report.update.blob_id in self.registry.blobs:
            self._accept(site, report, self.registry.blobs.get(report.update.blob_id))
            return
        try:
            complete = self.inbox.expect(report.update)
        except ChunkError as e:
            self._refuse_report(site, report, "update_too_large", str(e))
            return
        self.uploads[(site, report.round_id)] = _Upload(site, report)
        self._blob_complete(complete)

    def _check_chunking(self, report: UpdateReport) -> None:
        """Chunks the transport would drop as oversized could never complete the upload."""
        assert report.update is not None
        largest = self.transport.max_message_bytes - CHUNK_HEADER_BYTES
        if report.update.chunk_size > largest:
            raise UpdateRejected(f"update chunks of {report.update.chunk_size} bytes exceed the {largest} bytes a "
                                 "chunk may carry here; the site's chunk_size must not exceed the orchestrator's",
                                 "bad_manifest")

    def _refuse_report(self, site: str, report: UpdateReport, code: str, reason: str) -> None:
        self.refusals.refuse(site, code, f"update for {report.round_id}: {reason}")
        self.ack(site, report, accepted=False, reason=reason)

    def _uploading(self, site: str, chunk: bytes) -> bool:
        """Whether this chunk belongs to the site's upload in flight."""
        try:
            blob_id = decode_chunk(chunk)[0]
        except ChunkError:
            return False
        return any(u.site == site and u.blob_id == blob_id for u in self.uploads.values())

    def _on_chunk(self, site: str, payload: bytes) -> None:
        blob_id, index = decode_chunk(payload)[:2]
        if not self.inbox.known(blob_id):
            self.refusals.refuse(site, "unknown_blob_chunk", f"chunk {index} of blob {blob_id[:12]}, for which no "
                                 f"upload is in flight; held only in the {self.inbox.max_orphan_bytes}-byte buffer for "
                                 "chunks that overtake their report")
        self._blob_complete(self.inbox.offer(payload))

    def _waiting_for(self, blob_id: str) -> list[_Upload]:
        return [u for u in self.uploads.values() if u.blob_id == blob_id]

    def _blob_complete(self, blob_id: str | None) -> None:
        if blob_id is None:
            return
        waiting = self._waiting_for(blob_id)
        for upload in waiting:
            del self.uploads[(upload.site, upload.report.round_id)]
        try:
            data = self.inbox.take(blob_id)
        except ChunkError as e:
            if not waiting:
                log.warning("dropped update blob %s: %s", blob_id[:12], e)
            for upload in waiting:
                self._refuse_report(upload.site, upload.report, "bad_blob", str(e))
            return
        if not waiting:
            log.warning("dropped update blob %s: no upload waits for it any more", blob_id[:12])
        for upload in waiting:
            self._accept(upload.site, upload.report, data)

    def _accept(self, site: str, report: UpdateReport, data: bytes | None) -> None:
        try:
            self.engine.accept(site, report, data)
        except UpdateRejected as e:
            self._refuse_report(site, report, e.code, str(e))
            return
        self.ack(site, report, accepted=True)
        self.status(self.engine.state)

    def _drop_upload(self, upload: _Upload, reason: str, detail: str) -> None:
        """Forget an upload; its buffer goes too unless another site's upload is the same blob."""
        del self.uploads[(upload.site, upload.report.round_id)]
        if not self._waiting_for(upload.blob_id):
            self.inbox.forget(upload.blob_id)
        self.refusals.refuse(upload.site, reason, f"update {upload.blob_id[:12]} for {upload.report.round_id}: "
                                                  f"{detail}")

    def _on_chunk_request(self, site: str, req: ChunkRequest) -> None:
        held = self.outbox.get(req.blob_id)
        if held is None:
            log.warning("%s asked for blob %s which is no longer offered", site, req.blob_id[:12])
            return
        manifest, data = held
        for index, chunk in iter_chunks(data, manifest, req.indices):
            self.transport.publish(self.topics.to_site_chunk(site, manifest.blob_id, index), chunk)

    def _request_stalled(self) -> None:
        """Ask again for the missing chunks of a stalled upload, at most ``upload_rerequests`` times."""
        for blob_id in self.inbox.stalled(older_than=self.settings.upload_stall_seconds):
            waiting = self._waiting_for(blob_id)
            if not waiting:
                self.inbox.forget(blob_id)
            for upload in waiting:
                if upload.rerequests >= self.settings.upload_rerequests:
                    self._drop_upload(upload, "upload_stalled", f"no new chunk after {upload.rerequests} requests; "
                                      "dropped (a resend of the report starts it over)")
                    continue
                upload.rerequests += 1
                req = ChunkRequest(federation=self.settings.federation, sender=SENDER, blob_id=blob_id,
                                   indices=self.inbox.missing(blob_id))
                log.info("asking %s again for %d chunks of its update (request %d of %d)", upload.site,
                         len(req.indices), upload.rerequests, self.settings.upload_rerequests)
                self.transport.publish(self.topics.to_site(upload.site, "request"), req.to_bytes())

    def _publish_refusals(self) -> None:
        """Republish the status when refusals were counted since the last one (at most every few seconds)."""
        changes, published_at = self._refusals_published
        now = time.monotonic()
        if self.refusals.changes != changes and now - published_at >= REFUSALS_PUBLISH_INTERVAL:
            state, detail = self._last_status
            self.status(self.engine.state, detail if state == self.engine.state else "")

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
        self.alerts.round_announced(command.round, command.attempt)
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
        self.journal.record_summary(record.round_id, msg)  # for `fedmq report`: the topic keeps only the last one
        self._publish_retained(self.topics.round_summary, msg.to_bytes())
        self.alerts.round_summary(msg)

    def round_ended(self, record: RoundRecord, failure: str | None = None) -> None:
        """Release the uploads still arriving for a round that closed or failed, and parked chunks; alert a failure."""
        if failure is not None:
            self.alerts.round_failed(record.round, record.attempt, failure)
        for upload in [u for u in self.uploads.values() if u.report.round_id == record.round_id]:
            self._drop_upload(upload, "round_ended", "the round ended before the upload completed")
        # Chunks parked for want of a report cannot belong to the next round: it is not announced yet.
        self.inbox.drop_orphans()

    def status(self, state: str, detail: str = "") -> None:
        self._last_status = (state, detail)
        self._refusals_published = (self.refusals.changes, time.monotonic())
        cur = self.engine.current if hasattr(self, "engine") else None
        latest = self.registry.latest()
        msg = OrchestratorStatus(
            federation=self.settings.federation, sender=SENDER, state=state,
            round=cur.record.round if cur else None, attempt=cur.record.attempt if cur else None,
            round_id=cur.record.round_id if cur else None, model_version=latest.version if latest else None,
            selected=cur.record.selected if cur else [], reported=sorted(cur.reported) if cur else [],
            deadline=cur.record.deadline if cur else None, detail=detail, refusals=self.refusals.snapshot(),
            rounds_total=self.settings.rounds, kind=cur.record.kind if cur else None,
            started_at=cur.record.announced_at if cur else None)
        self._publish_retained(self.topics.orchestrator_status, msg.to_bytes())

    def _publish_alerts(self, alerts: list[Alert]) -> None:
        msg = AlertState(federation=self.settings.federation, sender=SENDER, alerts=alerts)
        self._publish_retained(self.topics.alerts, msg.to_bytes())

    def _publish_retained(self, topic: str, payload: bytes) -> None:
        """Publish a retained message and remember it for ``_after_reconnect``."""
        self._retained[topic] = payload
        self.transport.publish(topic, payload, retain=True)
