"""A hostile but authenticated site against a running federation: refused, counted, bounded.

One federation runs ROUNDS rounds over the session's Mosquitto: an orchestrator and two honest
agents in this process, plus two sites the test drives with bare transports publishing on their
own site topics, as a compromised hospital server could:

* ``site-h``, the hostile site. It announces itself, so it is selected every round, and attacks
  one way per round (see ``ATTACKS``): a flood of update reports with new blob ids, oversized
  and forged declarations and chunks for unknown blobs, NaN / Inf / 1e30 updates, a valid update
  replayed and followed by a second one and by reports for past and future rounds, an upload
  that never sends its chunks.
* ``site-p``, a puppet that holds every round open until the test has checked the orchestrator's
  answer to the attack, then reports an error for the round ("go on without me"), as does the
  hostile site when it sent nothing usable. Honest rounds then close at once, not at their deadline.

The federation runs once (module fixture); each test checks one attack's refusals (count per
reason, the reason in the ack), and the rest check what must hold whatever the attacks: the
honest sites' rounds complete, the lineage is contiguous, each version's contributors are
exactly the accepted updates (nothing stored twice, no refused update on disk), and the upload
buffers the orchestrator holds stay within one update bound per site plus its early-chunk buffer.
"""

from __future__ import annotations

import json
import math
import os
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import EdgeAgent
from fedmq.inprocess import run_federation
from orchestrator.architectures import build_onnx
from orchestrator.registry import ModelRegistry
from shared.blobs import iter_chunks, make_manifest
from shared.codec import CompressionSettings, encode_tensors, max_update_bytes
from shared.config import AgentSettings, CommonSettings, OrchestratorSettings
from shared.onnx_model import float_initializers, load_model_bytes
from shared.protocol import (BlobManifest, ChunkRequest, OrchestratorStatus, ProtocolError, RoundCommand, SiteStatus,
                             TrainingConfig, UpdateAck, UpdateReport, parse_message)
from shared.topics import Topics
from shared.transport import Transport
from tests.mqtt_helpers import retained

HONEST = ("site-a", "site-b")
HOSTILE, PUPPET = "site-h", "site-p"
ATTACKS = ("flood", "oversized", "poison", "replay", "stall")
ROUNDS = len(ATTACKS)
FLOOD = 1000  # update reports with a new blob id each, in one burst
UNKNOWN_CHUNKS = 120  # chunks of 200 KiB for blobs nobody announced: more than the early-chunk buffer holds
CHUNK_SIZE = 256 * 1024
MAX_BLOB_BYTES = 16 * 1024 * 1024  # as in the probe that found the unbounded allocations
RATE, BURST = 100.0, 300  # per-site message budget of this federation (defaults: 200/s, 2000)
STALL_SECONDS, REREQUESTS = 0.5, 2
TRAINING = TrainingConfig(local_steps=5, batch_size=16, learning_rate=0.1, loss="bce_logits", seed=7)
MEDIA = "application/x-fedmq-tensors"


def _rss() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))


def _disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class Sampler:
    """Largest upload buffers and queued bytes the orchestrator holds, and RSS, while a block runs."""

    def __init__(self, orchestrator) -> None:
        self.orchestrator = orchestrator
        self.held = self.queued = self.uploads = 0
        self.rss_before = self.rss = _rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            try:  # the orchestrator's thread mutates these while we read them
                self.held = max(self.held, self.orchestrator.inbox.held_bytes)
                self.uploads = max(self.uploads, len(self.orchestrator.uploads))
            except RuntimeError:
                continue
            self.queued = max(self.queued, self.orchestrator.transport.inbox_bytes)
            self.rss = max(self.rss, _rss())

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class Site:
    """A site the test drives: its own MQTT client, publishing only on its own site topics."""

    def __init__(self, url: str, federation: str, site: str) -> None:
        self.federation, self.site = federation, site
        self.topics = Topics(federation)
        self.transport = Transport(CommonSettings(broker_url=url, federation=federation, inbox_max_messages=100_000),
                                   f"fedmq-{federation}-{site}", persistent_session=False)
        self.commands: dict[int, RoundCommand] = {}
        self.acks: list[UpdateAck] = []
        self.requests: list[ChunkRequest] = []

    def start(self) -> None:
        self.transport.start()
        self.transport.subscribe(self.topics.round)
        self.transport.subscribe(self.topics.to_site_all(self.site))
        self.status("idle", retain=True)

    def status(self, state: str, round_id: str | None = None, *, sender: str | None = None,
               retain: bool = False) -> None:
        msg = SiteStatus(federation=self.federation, sender=sender or self.site, state=state, agent_version="test",
                         round_id=round_id, num_samples=10)
        self.transport.publish(self.topics.site(self.site, "status"), msg.to_bytes(), retain=retain)

    def pump(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while (msg := self.transport.get(max(0.0, deadline - time.monotonic()))) is not None:
            if Topics.is_chunk(msg.topic):
                continue
            try:
                parsed = parse_message(msg.payload)
            except ProtocolError:
                continue
            if isinstance(parsed, RoundCommand):
                self.commands[parsed.round] = parsed
            elif isinstance(parsed, UpdateAck):
                self.acks.append(parsed)
            elif isinstance(parsed, ChunkRequest):
                self.requests.append(parsed)
            if time.monotonic() >= deadline:
                return

    def until(self, condition, what: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.site}: no {what} within {timeout}s")
            self.pump(0.1)

    def round(self, number: int) -> RoundCommand:
        self.until(lambda: number in self.commands, f"command for round {number}", timeout=60)
        return self.commands[number]

    def report(self, cmd: RoundCommand, manifest: BlobManifest | None, *, round_id: str | None = None,
               round_no: int | None = None, sender: str | None = None) -> UpdateReport:
        report = UpdateReport(federation=self.federation, sender=sender or self.site,
                              round_id=round_id or cmd.round_id, round=round_no or cmd.round,
                              base_version=cmd.model_version, num_samples=10, update=manifest)
        self.transport.publish(self.topics.site(self.site, "update"), report.to_bytes())
        return report

    def chunks(self, data: bytes, manifest: BlobManifest) -> None:
        for index, chunk in iter_chunks(data, manifest):
            self.transport.publish(self.topics.site_chunk(self.site, manifest.blob_id, index), chunk)

    def upload(self, cmd: RoundCommand, data: bytes) -> UpdateReport:
        manifest = make_manifest(data, MEDIA, CHUNK_SIZE)
        report = self.report(cmd, manifest)
        self.chunks(data, manifest)
        return report

    def ack_for(self, blob_id: str | None, round_id: str, count: int = 1) -> list[UpdateAck]:
        matching = lambda: [a for a in self.acks if a.blob_id == blob_id and a.round_id == round_id]  # noqa: E731
        self.until(lambda: len(matching()) >= count, f"ack for {blob_id and blob_id[:12]} in {round_id}")
        return matching()


def _fake_manifest(size: int, chunk_size: int = CHUNK_SIZE) -> BlobManifest:
    """A declaration for bytes that do not exist: a new random blob id each time."""
    count = max(1, math.ceil(size / chunk_size))
    return BlobManifest(blob_id=secrets.token_hex(32), size=size, chunk_size=chunk_size,
                        chunk_sha256=[secrets.token_hex(32) for _ in range(count)], media_type=MEDIA)


def _dense(shapes: dict, value: float, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {k: (rng.normal(size=s) * value).astype(np.float32) for k, s in shapes.items()}


def _with_last_value(update: bytes, bits: bytes) -> bytes:
    """A dense float32 update (no zstd) whose last value is replaced by the given bit pattern."""
    return update[:-4] + bits


@dataclass
class Observed:
    orch: OrchestratorSettings
    bound: int  # most bytes one update of the model may take
    refusals: dict[str, dict[str, int]] = field(default_factory=dict)
    acks: dict[str, list[UpdateAck]] = field(default_factory=dict)
    figures: dict[str, float] = field(default_factory=dict)
    final_status: OrchestratorStatus | None = None
    requests: int = 0
    presence_a: str = ""
    hostile_stored: int = 0
    leftover_uploads: int = -1
    leftover_held: int = -1
    agent_inboxes: dict[str, int] = field(default_factory=dict)
    commands: dict[int, RoundCommand] = field(default_factory=dict)
    agent: AgentSettings | None = None
    honest_rate: dict[str, float] = field(default_factory=dict)


def _write_site(path: Path, rng: np.random.Generator, n: int) -> None:
    x = rng.normal(size=(n, 2))
    y = (x @ np.array([1.5, -1.0]) > 0).astype(int)
    path.write_text("x1,x2,label\n" + "".join(f"{a:.6f},{b:.6f},{c}\n" for (a, b), c in zip(x, y)))


def _wait(condition, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout}s")
        time.sleep(0.02)


@pytest.fixture(scope="module")
def observed(mosquitto, tmp_path_factory) -> Observed:
    root = tmp_path_factory.mktemp("hostile")
    rng = np.random.default_rng(13)
    for site in HONEST:
        _write_site(root / f"{site}_train.csv", rng, 80)
        _write_site(root / f"{site}_test.csv", rng, 40)
    model = build_onnx("mlp", num_features=2, num_outputs=1, hidden=(512, 512), seed=0)
    (root / "initial.onnx").write_bytes(model)
    shapes = {k: v.shape for k, v in float_initializers(load_model_bytes(model)).items()}
    federation = f"hostile-{int(time.time() * 1000) % 10**7}"
    common = {"broker_url": mosquitto.url, "federation": federation, "chunk_size": CHUNK_SIZE,
              "max_blob_bytes": MAX_BLOB_BYTES}
    orch = OrchestratorSettings(
        **common, state_dir=root / "orchestrator", rounds=ROUNDS, min_sites=4, quorum=2,
        task_features=["x1", "x2"], task_label="label", standardize=False, initial_model=root / "initial.onnx",
        training=TRAINING, round_timeout=30.0, final_evaluation=False, upload_stall_seconds=STALL_SECONDS,
        upload_rerequests=REREQUESTS, site_messages_per_second=RATE, site_message_burst=BURST)
    agents = [AgentSettings(**common, site_id=s, state_dir=root / s, data_train=root / f"{s}_train.csv",
                            data_test=root / f"{s}_test.csv") for s in HONEST]
    obs = Observed(orch=orch, bound=max_update_bytes(shapes))
    hostile, puppet = Site(mosquitto.url, federation, HOSTILE), Site(mosquitto.url, federation, PUPPET)
    monitor = Transport(CommonSettings(broker_url=mosquitto.url, federation=federation, inbox_max_messages=100_000),
                        f"fedmq-{federation}-traffic-monitor", persistent_session=False)
    started = time.monotonic()
    with run_federation(orch, agents) as fed, monitor:
        for site in HONEST:
            monitor.subscribe(f"{Topics(federation).base}/site/{site}/#")
        o = fed.orchestrator
        hostile.start()
        puppet.start()

        def refused(reason: str) -> int:
            return o.refusals.count(HOSTILE, reason)

        def settle(cmd: RoundCommand, *, hostile_reported: bool = False) -> None:
            """Let the round close without the test's sites: both say they sit it out."""
            if not hostile_reported:
                hostile.status("error", cmd.round_id)
                _wait(lambda: (p := o.presence.get(HOSTILE)) is not None and p.round_id == cmd.round_id,
                      "hostile's sit-out seen")
            puppet.status("error", cmd.round_id)

        # Round 1: one upload within the bound, then FLOOD more, each with a new blob id.
        cmd = hostile.round(1)
        disk_before = _disk(orch.state_dir)
        with Sampler(o) as flood:
            hostile.report(cmd, _fake_manifest(obs.bound))
            for _ in range(FLOOD):
                hostile.report(cmd, _fake_manifest(obs.bound))
            _wait(lambda: refused("upload_in_flight") + refused("rate_limited") >= FLOOD, "flood processed")
            _wait(lambda: refused("upload_stalled") + refused("round_ended") == 1, "stalled upload dropped")
        obs.figures.update(flood_held_max=flood.held, flood_queued_max=flood.queued, flood_uploads_max=flood.uploads,
                           flood_rss_growth=flood.rss - flood.rss_before,
                           flood_disk_growth=_disk(orch.state_dir) - disk_before)
        obs.refusals["flood"] = dict(o.refusals.snapshot()[HOSTILE])
        time.sleep(BURST / RATE)  # the hostile site's bucket fills up again before the next attack
        settle(cmd)

        # Round 2: oversized and forged declarations, chunks for blobs nobody announced.
        cmd = hostile.round(2)
        before = Counter(o.refusals.snapshot()[HOSTILE])
        huge = hostile.report(cmd, _fake_manifest(MAX_BLOB_BYTES + 1)).update
        over = hostile.report(cmd, _fake_manifest(obs.bound + 1)).update
        wide = hostile.report(cmd, _fake_manifest(obs.bound, chunk_size=64 * 1024 * 1024)).update
        forged = hostile.report(cmd, _fake_manifest(1000), sender="site-a").update
        hostile.status("offline", sender="site-a")
        with Sampler(o) as orphans:
            for _ in range(UNKNOWN_CHUNKS):
                blob = secrets.token_hex(32)
                payload = os.urandom(200 * 1024)
                manifest = BlobManifest(blob_id=blob, size=len(payload), chunk_size=len(payload),
                                        chunk_sha256=[secrets.token_hex(32)], media_type=MEDIA)
                hostile.chunks(payload, manifest)
            _wait(lambda: refused("unknown_blob_chunk") >= UNKNOWN_CHUNKS, "unknown chunks processed")
        obs.figures.update(orphans_held_max=orphans.held, orphan_buffer=o.inbox.max_orphan_bytes)
        obs.acks["oversized"] = [hostile.ack_for(m.blob_id, cmd.round_id)[0] for m in (huge, over, wide)]
        _wait(lambda: refused("wrong_sender") - before["wrong_sender"] == 2, "forgeries refused")
        assert not [a for a in hostile.acks if a.blob_id == forged.blob_id], "a forged report got an answer"
        obs.presence_a = o.presence["site-a"].state
        obs.refusals["oversized"] = dict(Counter(o.refusals.snapshot()[HOSTILE]) - before)
        settle(cmd)

        # Round 3: updates that decode to NaN, to Inf, and to a finite but absurd 1e30.
        cmd = hostile.round(3)
        before = Counter(o.refusals.snapshot()[HOSTILE])
        plain = CompressionSettings(zstd_level=0)
        ones = encode_tensors({k: np.ones(s, np.float32) for k, s in shapes.items()}, plain)
        absurd = _dense(shapes, 1e-3, rng)
        absurd[next(iter(absurd))][...] = 1e30
        poisons = {"nan": _with_last_value(ones, np.float32(np.nan).tobytes()),
                   "inf": _with_last_value(ones, np.float32(np.inf).tobytes()),
                   "1e30": encode_tensors(absurd, plain)}
        obs.acks["poison"] = []
        for data in poisons.values():
            report = hostile.upload(cmd, data)
            obs.acks["poison"] += hostile.ack_for(report.update.blob_id, cmd.round_id)
        obs.refusals["poison"] = dict(Counter(o.refusals.snapshot()[HOSTILE]) - before)
        settle(cmd)

        # Round 4: a valid update with a corrupt chunk first, replayed; a second update; past and future rounds.
        cmd = hostile.round(4)
        before = Counter(o.refusals.snapshot()[HOSTILE])
        valid = encode_tensors(_dense(shapes, 1e-3, rng), CompressionSettings())
        manifest = make_manifest(valid, MEDIA, CHUNK_SIZE)
        hostile.report(cmd, manifest)
        corrupt = bytearray(next(iter_chunks(valid, manifest))[1])
        corrupt[-1] ^= 0xFF
        hostile.transport.publish(hostile.topics.site_chunk(HOSTILE, manifest.blob_id, 0), bytes(corrupt))
        hostile.chunks(valid, manifest)
        first = hostile.ack_for(manifest.blob_id, cmd.round_id)
        hostile.report(cmd, manifest)  # a resend, as after a lost ack
        hostile.chunks(valid, manifest)
        replayed = hostile.ack_for(manifest.blob_id, cmd.round_id, count=2)
        second = hostile.report(cmd, make_manifest(encode_tensors(_dense(shapes, 2e-3, rng), CompressionSettings()),
                                                   MEDIA, CHUNK_SIZE))
        past = hostile.report(cmd, _fake_manifest(1000), round_id=hostile.commands[1].round_id, round_no=1)
        future = hostile.report(cmd, _fake_manifest(1000), round_id=f"{federation}-r99-a1", round_no=99)
        obs.acks["replay"] = (first + replayed[1:] + hostile.ack_for(second.update.blob_id, cmd.round_id)
                              + hostile.ack_for(past.update.blob_id, past.round_id)
                              + hostile.ack_for(future.update.blob_id, future.round_id))
        obs.hostile_stored = sum(u.site == HOSTILE for u in o.journal.updates(cmd.round_id))
        obs.refusals["replay"] = dict(Counter(o.refusals.snapshot()[HOSTILE]) - before)
        settle(cmd, hostile_reported=True)

        # Round 5: an upload whose chunks never come.
        cmd = hostile.round(5)
        before = Counter(o.refusals.snapshot()[HOSTILE])
        requests_before = len(hostile.requests)
        stalled = hostile.report(cmd, _fake_manifest(obs.bound))
        _wait(lambda: refused("upload_stalled") > before["upload_stalled"], "stalled upload dropped")
        hostile.pump(2 * STALL_SECONDS)  # no further request may come after the drop
        obs.requests = sum(r.blob_id == stalled.update.blob_id for r in hostile.requests[requests_before:])
        obs.refusals["stall"] = dict(Counter(o.refusals.snapshot()[HOSTILE]) - before)
        settle(cmd)

        fed.wait_finished(timeout=60)
        obs.leftover_uploads, obs.leftover_held = len(o.uploads), o.inbox.held_bytes
        obs.agent_inboxes = {s: a.inbox.held_bytes for s, a in fed.agents.items()}
        final = o.refusals.snapshot()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:  # the retained status catches up within a few seconds
            obs.final_status = retained(mosquitto.url, federation, Topics(federation).orchestrator_status,
                                        OrchestratorStatus)
            if obs.final_status.refusals == final:
                break
            time.sleep(0.5)
        obs.refusals["total"] = final
        obs.figures["seconds"] = time.monotonic() - started
        sent = Counter()
        while (msg := monitor.get(0.2)) is not None:
            sent[Topics(federation).site_of(msg.topic)] += 1
        obs.honest_rate = {s: sent[s] / obs.figures["seconds"] for s in HONEST}
    hostile.transport.stop()
    puppet.transport.stop()
    obs.commands, obs.agent = hostile.commands, agents[0]
    # The figures for docs/reliability.md: `python -m pytest -q -s tests/faults/test_hostile_site.py`.
    print("hostile-site figures:", json.dumps({"update_bound": obs.bound, **obs.figures, "refusals": obs.refusals,
                                               "honest_messages_per_second": obs.honest_rate}))
    return obs


# --- each attack ------------------------------------------------------------------------------


def test_a_flood_of_reports_holds_one_upload_and_is_refused_then_rate_limited(observed):
    r = observed.refusals["flood"]
    assert r["upload_in_flight"] + r["rate_limited"] == FLOOD, r
    assert r["upload_in_flight"] >= BURST - 2, "reports within the budget are refused one by one, with a reason"
    assert r["rate_limited"] > 0, "beyond the budget they are dropped unparsed"
    assert r.get("upload_stalled", 0) + r.get("round_ended", 0) == 1, "the one upload in flight was let go"
    f = observed.figures
    sites = len(HONEST) + 1
    # The orchestrator held at most one upload buffer per site (one update bound each), not one per report.
    assert f["flood_uploads_max"] <= sites
    assert f["flood_held_max"] <= sites * observed.bound, (f["flood_held_max"], observed.bound)
    assert f["flood_rss_growth"] < 128 * 1024 * 1024, "before the bounds, these reports asked for 1000 buffers"
    assert f["flood_disk_growth"] < 4 * 1024 * 1024, "refused reports leave nothing on disk"


def test_oversized_and_forged_declarations_are_refused_before_anything_is_allocated(observed):
    r = observed.refusals["oversized"]
    assert r["update_too_large"] == 2 and r["bad_manifest"] == 1 and r["wrong_sender"] == 2, r
    huge, over, wide = observed.acks["oversized"]
    assert not huge.accepted and f"at most {observed.bound} bytes" in huge.reason
    assert not over.accepted and f"declared as {observed.bound + 1} bytes" in over.reason
    assert not wide.accepted and "chunk_size must not exceed the orchestrator's" in wide.reason
    assert observed.presence_a != "offline", "a status forged in another site's name changed its presence"


def test_chunks_for_unknown_blobs_stay_within_the_early_chunk_buffer(observed):
    assert observed.refusals["oversized"]["unknown_blob_chunk"] == UNKNOWN_CHUNKS
    f = observed.figures
    assert UNKNOWN_CHUNKS * 200 * 1024 > f["orphan_buffer"], "the test must overflow the buffer"
    assert f["orphans_held_max"] <= f["orphan_buffer"] + (len(HONEST) + 1) * observed.bound


def test_nan_inf_and_absurd_values_are_refused_with_a_reason(observed):
    r = observed.refusals["poison"]
    assert r == {"bad_update": 2, "absurd_values": 1}, r
    nan, inf, huge = observed.acks["poison"]
    assert not nan.accepted and "NaN or Inf" in nan.reason
    assert not inf.accepted and "NaN or Inf" in inf.reason
    assert not huge.accepted and "magnitude 1e+30, above max_update_abs=1e+06" in huge.reason


def test_replays_are_idempotent_and_second_updates_past_and_future_rounds_refused(observed):
    r = observed.refusals["replay"]
    assert r == {"bad_chunk": 1, "already_reported": 1, "round_not_open": 2}, r
    first, replayed, second, past, future = observed.acks["replay"]
    assert first.accepted and replayed.accepted, "a resend of a stored update is acknowledged again"
    assert observed.hostile_stored == 1, "the replay was stored once"
    assert not second.accepted and "already has an update stored" in second.reason
    assert not past.accepted and "is not open" in past.reason
    assert not future.accepted and "-r99-a1 is not open" in future.reason


def test_a_stalled_upload_is_asked_for_a_bounded_number_of_times_then_dropped(observed):
    assert observed.refusals["stall"] == {"upload_stalled": 1}, observed.refusals["stall"]
    assert observed.requests == REREQUESTS


# --- whatever the attacks -----------------------------------------------------------------------


def test_honest_rounds_complete_with_a_contiguous_lineage_and_exact_contributors(observed):
    registry = ModelRegistry.open(observed.orch.state_dir)
    versions = registry.list()
    assert [v.version for v in versions] == list(range(ROUNDS + 1))
    assert [v.parent for v in versions[1:]] == list(range(ROUNDS))
    assert [v.round for v in versions[1:]] == list(range(1, ROUNDS + 1))
    stored = registry.conn.execute("SELECT r.round, u.site, u.blob FROM updates u JOIN rounds r USING (round_id) "
                                   "WHERE r.state = 'done'").fetchall()
    for v in versions[1:]:
        accepted = {site for rnd, site, _ in stored if rnd == v.round}
        assert set(v.contributors) == accepted, (v.round, v.contributors, accepted)
        expected = set(HONEST) | ({HOSTILE} if ATTACKS[v.round - 1] == "replay" else set())
        assert accepted == expected, (v.round, accepted)
    # Only accepted updates, models and strategy state reached the blob store: no refused upload.
    kept = {blob for _, _, blob in stored} | {v.sha256 for v in versions} | {v.strategy_state for v in versions}
    on_disk = {p.name for p in (observed.orch.state_dir / "blobs").rglob("*") if p.is_file()}
    assert on_disk <= kept, on_disk - kept


def test_uploads_and_buffers_are_released_when_rounds_end(observed):
    assert observed.leftover_uploads == 0 and observed.leftover_held == 0
    assert all(held == 0 for held in observed.agent_inboxes.values()), observed.agent_inboxes


def test_refusals_are_on_the_retained_status(observed):
    status = observed.final_status
    assert status is not None and status.refusals == observed.refusals["total"]
    assert set(status.refusals) == {HOSTILE}, "honest sites were never refused"
    counts = status.refusals[HOSTILE]
    assert {"upload_in_flight", "rate_limited", "update_too_large", "wrong_sender", "unknown_blob_chunk",
            "bad_update", "absurd_values", "bad_chunk", "already_reported", "round_not_open",
            "upload_stalled"} <= set(counts), counts


def test_honest_sites_stay_far_below_the_message_budget(observed):
    """What the budget must allow: an honest site's messages per second over the whole run (chunks included)."""
    assert all(rate < RATE / 5 for rate in observed.honest_rate.values()), observed.honest_rate
    assert observed.figures["seconds"] < 60, observed.figures


def test_an_agent_collects_only_the_current_rounds_model_blobs(observed, tmp_path):
    """A model download a newer round command made useless is released, not kept (and asked for) forever."""
    agent = EdgeAgent(observed.agent.model_copy(update={"state_dir": tmp_path / "agent"}))
    older, newer = observed.commands[1], observed.commands[2]
    agent.inbox.expect(older.model)  # round 1's download was under way ...
    assert agent.inbox.held_bytes == older.model.size
    agent._on_round(newer)  # ... when round 2 was announced
    wanted = {newer.model.blob_id} | ({newer.model_delta.blob.blob_id} if newer.model_delta else set())
    assert set(agent.inbox.pending()) <= wanted and agent.inbox.pending(), agent.inbox.pending()
    assert agent.inbox.held_bytes == sum(m.size for m in (newer.model, newer.model_delta and newer.model_delta.blob)
                                         if m is not None and m.blob_id in agent.inbox.pending())
    assert agent.outbox.max_bytes == observed.agent.max_blob_bytes
