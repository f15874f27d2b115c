"""The production broker configuration against a real Mosquitto: mutual TLS admits only
the federation's unrevoked certificates, and the ACL keeps every site to its own topics.

Each test pairs what must be blocked with what must get through on the same broker, so a
broker that delivers nothing (or refuses everyone) fails as surely as a leaky one. Instead
of sleeping, tests publish a "fence" after the messages under test and wait for it: the
broker queues a subscriber's messages in order, so once the fence arrived, anything that
was going to arrive before it has.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion
from paho.mqtt.reasoncodes import ReasonCode

from shared.broker import Broker
from shared.broker_acl import CONTAINER_MONITORS, MONITOR_TOPICS, acl_text, start_tls_mosquitto, write_container_example
from shared.config import CommonSettings
from shared.pki import FederationPki, PkiError
from shared.transport import Transport, TransportError, client_tls_context

FED = "fedmq/v1/demo"
TIMEOUT = 5.0


class Peer:
    """A raw paho client with a TLS identity that records what it receives."""

    def __init__(self, broker: Broker, pki: FederationPki | None, identity: str | None, *,
                 cert_of: FederationPki | None = None, tls: bool = True, username: str | None = None,
                 protocol: MQTTProtocolVersion = MQTTProtocolVersion.MQTTv311,
                 will: tuple[str, bytes] | None = None) -> None:
        self.broker = broker
        self.name = f"{identity or 'anon'}-{uuid.uuid4().hex[:8]}"
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=self.name, protocol=protocol,
                                  reconnect_on_failure=False)
        if tls:
            assert pki is not None
            owner = cert_of or pki
            self.client.tls_set(ca_certs=str(pki.ca_cert_path),
                                certfile=str(owner.cert_path(identity)) if identity else None,
                                keyfile=str(owner.key_path(identity)) if identity else None)
        if username:
            self.client.username_pw_set(username)
        if will:
            self.client.will_set(will[0], will[1], qos=1, retain=True)
        self.received: list[tuple[str, bytes]] = []
        self.retained: list[tuple[str, bytes]] = []  # replayed at subscribe, from earlier tests
        self.puback_codes: dict[int, ReasonCode] = {}
        self.subacks: set[int] = set()
        self._cond = threading.Condition()
        self._connack: ReasonCode | None = None
        self._closed = False
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        self.client.on_subscribe = self._on_subscribe

    def _on_connect(self, _c: mqtt.Client, _u: object, _f: object, rc: ReasonCode, _p: object) -> None:
        with self._cond:
            self._connack = rc
            self._cond.notify_all()

    def _on_disconnect(self, *_: object) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        with self._cond:
            (self.retained if msg.retain else self.received).append((msg.topic, bytes(msg.payload)))
            self._cond.notify_all()

    def _on_publish(self, _c: mqtt.Client, _u: object, mid: int, rc: ReasonCode, _p: object) -> None:
        with self._cond:
            self.puback_codes[mid] = rc
            self._cond.notify_all()

    def _on_subscribe(self, _c: mqtt.Client, _u: object, mid: int, _codes: object, _p: object) -> None:
        with self._cond:
            self.subacks.add(mid)
            self._cond.notify_all()

    def try_connect(self) -> bool:
        """True once the broker accepted us; False when it refused (TLS alert, reset, no CONNACK)."""
        try:
            self.client.connect(self.broker.host, self.broker.port, keepalive=30)
        except OSError:  # ssl.SSLError and ConnectionResetError included
            return False
        self.client.loop_start()
        with self._cond:
            self._cond.wait_for(lambda: self._connack is not None or self._closed, TIMEOUT)
            accepted = self._connack is not None and not self._connack.is_failure
        if not accepted:
            self.client.loop_stop()
        return accepted

    def connect(self) -> Peer:
        assert self.try_connect(), f"broker refused {self.name}"
        return self

    def subscribe(self, *topics: str) -> Peer:
        """Subscribe and wait for the SUBACK, so that later publishes find the subscription."""
        rc, mid = self.client.subscribe([(topic, 1) for topic in topics])
        assert rc == mqtt.MQTT_ERR_SUCCESS
        with self._cond:
            assert self._cond.wait_for(lambda: mid in self.subacks, TIMEOUT), f"{self.name}: no SUBACK"
        return self

    def publish(self, topic: str, payload: bytes, *, retain: bool = False) -> int:
        info = self.client.publish(topic, payload, qos=1, retain=retain)
        info.wait_for_publish(TIMEOUT)
        return info.mid

    def wait_for(self, topic: str, payload: bytes) -> None:
        with self._cond:
            ok = self._cond.wait_for(lambda: (topic, payload) in self.received, TIMEOUT)
        assert ok, f"{self.name} never got {topic} {payload!r}; got {self.received}"

    def topics(self) -> set[str]:
        """Topics of the live (not retained) messages received."""
        with self._cond:
            return {topic for topic, _ in self.received}

    def drop_connection(self) -> None:
        """Vanish without DISCONNECT, as a crashed agent does, so the broker sends the will."""
        sock = self.client.socket()
        assert isinstance(sock, socket.socket)
        sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> FederationPki:
    pki = FederationPki.init(tmp_path_factory.mktemp("pki"), "demo", ["broker.example.org"])
    for site in ("hospital-a", "hospital-b"):
        pki.issue_site(site)
    pki.issue_monitor("grafana")  # before the broker starts: its ACL names the monitors issued
    return pki


@pytest.fixture(scope="module")
def broker(pki: FederationPki) -> Iterator[Broker]:
    with start_tls_mosquitto(pki.root) as broker:
        yield broker


@pytest.fixture()
def peers() -> Iterator[list[Peer]]:
    opened: list[Peer] = []
    yield opened
    for peer in opened:
        peer.close()


def test_a_site_sees_broadcasts_and_its_inbox_but_nothing_of_another_site(
        broker: Broker, pki: FederationPki, peers: list[Peer]) -> None:
    def peer(identity: str, **kw: object) -> Peer:
        p = Peer(broker, pki, identity, **kw)  # type: ignore[arg-type]
        peers.append(p)
        return p.connect()

    run = uuid.uuid4().hex[:6]
    orch = peer("orchestrator").subscribe(f"{FED}/site/#")
    # B's retained status exists before A subscribes: retained delivery is ACL-checked too.
    site_b = peer("hospital-b", will=(f"{FED}/site/hospital-b/status", b"offline " + run.encode()))
    site_b.publish(f"{FED}/site/hospital-b/status", b"online " + run.encode(), retain=True)

    a_all = peer("hospital-a").subscribe("#")
    a_fedmq = peer("hospital-a").subscribe("fedmq/#")
    a_nosy = peer("hospital-a").subscribe(f"{FED}/site/hospital-b/#", f"{FED}/orch/to/hospital-b/#",
                                          f"{FED}/site/+/status", f"{FED}/orch/all/#")
    operator = peer("operator").subscribe("#")
    site_b.publish(f"{FED}/site/hospital-b/update/r1/0", b"weights of B")
    site_b.publish(f"{FED}/site/hospital-b/metrics", b"B's accuracy")
    site_b.drop_connection()  # -> last will on B's status topic
    orch.wait_for(f"{FED}/site/hospital-b/status", b"offline " + run.encode())
    orch.publish(f"{FED}/orch/to/hospital-b/ack", b"for B only")
    orch.publish(f"{FED}/orch/to/hospital-a/ack", b"for A")
    orch.publish(f"{FED}/orch/all/round", b"round 1")
    orch.publish(f"{FED}/orch/all/fence", b"done " + run.encode())
    for p in (a_all, a_fedmq, a_nosy, operator):
        p.wait_for(f"{FED}/orch/all/fence", b"done " + run.encode())

    for p in (a_all, a_fedmq):
        assert p.topics() == {f"{FED}/orch/all/fence", f"{FED}/orch/all/round", f"{FED}/orch/to/hospital-a/ack"}
    assert a_nosy.topics() == {f"{FED}/orch/all/fence", f"{FED}/orch/all/round"}
    assert a_all.retained == a_fedmq.retained == a_nosy.retained == []
    assert (f"{FED}/site/hospital-b/status", b"online " + run.encode()) in operator.retained
    # The operator, subscribed the same way, does see everything: the messages did flow.
    assert {f"{FED}/site/hospital-b/status", f"{FED}/site/hospital-b/update/r1/0", f"{FED}/site/hospital-b/metrics",
            f"{FED}/orch/to/hospital-b/ack", f"{FED}/orch/to/hospital-a/ack"} <= operator.topics()
    assert (f"{FED}/site/hospital-b/metrics", b"B's accuracy") in orch.received


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv311, MQTTProtocolVersion.MQTTv5])
def test_forged_publishes_never_reach_anyone(broker: Broker, pki: FederationPki, peers: list[Peer],
                                             protocol: MQTTProtocolVersion) -> None:
    def peer(identity: str, **kw: object) -> Peer:
        p = Peer(broker, pki, identity, protocol=protocol, **kw)  # type: ignore[arg-type]
        peers.append(p)
        return p.connect()

    run = uuid.uuid4().hex[:6].encode()
    orch = peer("orchestrator").subscribe(f"{FED}/#")
    site_b = peer("hospital-b").subscribe(f"{FED}/orch/all/#", f"{FED}/orch/to/hospital-b/#")
    site_a = peer("hospital-a")
    # Claiming another name in CONNECT changes nothing: the certificate's CN is the username.
    a_as_orch = peer("hospital-a", username="orchestrator")
    operator = peer("operator")
    forged = [
        (site_a, f"{FED}/site/hospital-b/update/r1/0", b"poisoned update in B's name"),
        (site_a, f"{FED}/site/hospital-b/status", b"B is offline (lie)"),
        (site_a, f"{FED}/orch/all/round", b"fake round"),
        (site_a, f"{FED}/orch/to/hospital-b/ack", b"fake ack"),
        (a_as_orch, f"{FED}/orch/all/round", b"fake round with username orchestrator"),
        (operator, f"{FED}/site/hospital-a/status", b"operator writing"),
        (operator, f"{FED}/site/operator/status", b"operator posing as a site"),
        (orch, f"{FED}/site/orchestrator/status", b"orchestrator posing as a site"),
    ]
    mids = [(p, p.publish(topic, payload)) for p, topic, payload in forged]
    site_a.publish(f"{FED}/site/hospital-a/update/r1/0", b"A's real update " + run)
    orch.wait_for(f"{FED}/site/hospital-a/update/r1/0", b"A's real update " + run)
    orch.publish(f"{FED}/orch/all/fence", b"done " + run)
    site_b.wait_for(f"{FED}/orch/all/fence", b"done " + run)

    seen = orch.received + orch.retained + site_b.received + site_b.retained
    leaked = {payload for _, payload in seen} & {payload for _, _, payload in forged}
    assert leaked == set()
    assert orch.topics() == {f"{FED}/orch/all/fence", f"{FED}/site/hospital-a/update/r1/0"}
    if protocol == MQTTProtocolVersion.MQTTv5:  # v5 says why; v3.1.1 acks and drops silently
        for p, mid in mids:
            assert p.puback_codes[mid].getName() == "Not authorized"


def test_a_monitor_reads_fleet_state_and_nothing_else(broker: Broker, pki: FederationPki,
                                                     peers: list[Peer]) -> None:
    """Status, summaries, models and alerts reach a monitor; chunks, updates, requests and secagg never do."""
    def peer(identity: str, **kw: object) -> Peer:
        p = Peer(broker, pki, identity, **kw)  # type: ignore[arg-type]
        peers.append(p)
        return p.connect()

    run = uuid.uuid4().hex[:6].encode()
    orch = peer("orchestrator")
    site_b = peer("hospital-b")
    retained = {f"{FED}/orch/all/status": b"collecting " + run, f"{FED}/orch/all/summary": b"round 3 " + run,
                f"{FED}/orch/all/alerts": b"va offline " + run, f"{FED}/orch/all/model": b"v3 " + run,
                f"{FED}/orch/all/round": b"round 4 " + run}
    for topic, payload in retained.items():
        orch.publish(topic, payload, retain=True)
    site_b.publish(f"{FED}/site/hospital-b/status", b"training " + run, retain=True)
    retained[f"{FED}/site/hospital-b/status"] = b"training " + run

    monitor_all = peer("monitor-grafana").subscribe("#")
    monitor_fed = peer("monitor-grafana").subscribe(f"{FED}/#")
    operator = peer("operator").subscribe("#")  # the control: everything below does flow
    forbidden = [
        (orch, f"{FED}/orch/all/blob/{'ab' * 32}/0", b"model chunk"),
        (orch, f"{FED}/orch/all/secagg", b"roster"),
        (orch, f"{FED}/orch/to/hospital-b/ack", b"ack for B"),
        (orch, f"{FED}/orch/to/monitor-grafana/ack", b"into the monitor's inbox"),
        (site_b, f"{FED}/site/hospital-b/update", b"B's update report"),
        (site_b, f"{FED}/site/hospital-b/blob/{'cd' * 32}/0", b"B's update chunk"),
        (site_b, f"{FED}/site/hospital-b/request", b"B asks for chunks"),
        (site_b, f"{FED}/site/hospital-b/secagg", b"B's masked shares"),
    ]
    for sender, topic, payload in forbidden:
        sender.publish(topic, payload)
    site_b.publish(f"{FED}/site/hospital-b/status", b"uploading " + run)
    orch.publish(f"{FED}/orch/all/summary", b"round 4 " + run)
    orch.publish(f"{FED}/orch/all/status", b"fence " + run)  # the last one: once here, the rest arrived
    for p in (monitor_all, monitor_fed, operator):
        p.wait_for(f"{FED}/orch/all/status", b"fence " + run)

    for p in (monitor_all, monitor_fed):
        assert set(retained.items()) <= set(p.retained), f"{p.name} missed retained state: {p.retained}"
        assert p.topics() == {f"{FED}/site/hospital-b/status", f"{FED}/orch/all/summary", f"{FED}/orch/all/status"}
        readable = {f"{FED}/{topic.replace('+', 'hospital-a')}" for topic in MONITOR_TOPICS} | set(retained)
        assert {topic for topic, _ in p.retained} <= readable
    assert {topic for _, topic, _ in forbidden} <= operator.topics()


def test_a_monitor_publishes_nothing(broker: Broker, pki: FederationPki, peers: list[Peer]) -> None:
    def peer(identity: str) -> Peer:
        p = Peer(broker, pki, identity, protocol=MQTTProtocolVersion.MQTTv5)
        peers.append(p)
        return p.connect()

    run = uuid.uuid4().hex[:6].encode()
    operator = peer("operator").subscribe(f"{FED}/#")
    monitor = peer("monitor-grafana")
    attempts = [f"{FED}/orch/all/status", f"{FED}/orch/all/alerts", f"{FED}/orch/all/round",
                f"{FED}/orch/to/hospital-a/ack", f"{FED}/site/hospital-a/status", f"{FED}/site/monitor-grafana/status",
                f"{FED}/site/monitor-grafana/update"]
    mids = [monitor.publish(topic, b"from the monitor " + run) for topic in attempts]
    site_a = peer("hospital-a")
    site_a.publish(f"{FED}/site/hospital-a/status", b"fence " + run)
    operator.wait_for(f"{FED}/site/hospital-a/status", b"fence " + run)

    assert [payload for _, payload in operator.received + operator.retained if payload.endswith(run)] == \
        [b"fence " + run]
    assert [monitor.puback_codes[mid].getName() for mid in mids] == ["Not authorized"] * len(attempts)


def test_monitor_names_cannot_be_site_ids_and_need_the_acl(broker: Broker, pki: FederationPki, tmp_path: Path,
                                                          peers: list[Peer]) -> None:
    with pytest.raises(PkiError, match="names read-only monitors"):
        pki.issue_site("monitor-grafana")
    with pytest.raises(PkiError, match="already has a certificate"):
        pki.issue_monitor("grafana")
    # Issued after this broker wrote its ACL: it connects, but reads no site's state until the ACL names it.
    late = pki.issue_monitor(f"late-{uuid.uuid4().hex[:6]}")
    run = uuid.uuid4().hex[:6].encode()
    site_b, unlisted, listed = Peer(broker, pki, "hospital-b"), Peer(broker, pki, late.name), \
        Peer(broker, pki, "monitor-grafana")
    peers.extend([site_b, unlisted, listed])
    unlisted.connect().subscribe(f"{FED}/#")
    listed.connect().subscribe(f"{FED}/#")
    site_b.connect().publish(f"{FED}/site/hospital-b/status", b"idle " + run)
    listed.wait_for(f"{FED}/site/hospital-b/status", b"idle " + run)
    assert f"{FED}/site/hospital-b/status" not in unlisted.topics()
    assert late.name not in acl_text("demo", ["grafana"]) and f"user {late.name}" in acl_text("demo", [late.name])


def test_connections_without_a_valid_certificate_are_refused(
        broker: Broker, pki: FederationPki, tmp_path: Path, peers: list[Peer]) -> None:
    foreign = FederationPki.init(tmp_path / "foreign", "demo")
    foreign.issue_site("hospital-a")
    attempts = {
        "TLS without client certificate": Peer(broker, pki, None),
        "certificate of another CA": Peer(broker, pki, "hospital-a", cert_of=foreign),
        "plain TCP, anonymous": Peer(broker, None, None, tls=False),
        "plain TCP with a username": Peer(broker, None, None, tls=False, username="orchestrator"),
    }
    peers.extend(attempts.values())
    accepted = [name for name, p in attempts.items() if p.try_connect()]
    assert accepted == []
    legit = Peer(broker, pki, "hospital-a")
    peers.append(legit)
    assert legit.try_connect()


def test_a_revoked_certificate_is_refused_after_sighup(tmp_path: Path, peers: list[Peer]) -> None:
    own = FederationPki.init(tmp_path / "pki", "demo")
    for site in ("hospital-c", "hospital-d"):
        own.issue_site(site)
    with start_tls_mosquitto(own.root) as broker:
        def attempt(identity: str) -> bool:
            p = Peer(broker, own, identity)
            peers.append(p)
            return p.try_connect()

        assert attempt("hospital-c")
        own.revoke("hospital-c")
        assert broker.proc is not None
        os.kill(broker.proc.pid, signal.SIGHUP)  # what `fedmq pki revoke` tells operators to do
        deadline = time.monotonic() + TIMEOUT
        while attempt("hospital-c"):
            assert time.monotonic() < deadline, "mosquitto still accepts a revoked certificate after SIGHUP"
            time.sleep(0.1)
        assert attempt("hospital-d")
        # And a broker started afresh with that CRL refuses it from the start.
        broker.stop()
    with start_tls_mosquitto(own.root) as broker:
        refused = Peer(broker, own, "hospital-c")
        fine = Peer(broker, own, "hospital-d")
        peers.extend([refused, fine])
        assert not refused.try_connect()
        assert fine.try_connect()


def _handshake(broker: Broker, settings: CommonSettings) -> None:
    """A TLS handshake with the broker as fedmq's transport makes it; raises what the transport would see."""
    context = client_tls_context(settings)
    with socket.create_connection((broker.host, broker.port), timeout=TIMEOUT) as raw:
        with context.wrap_socket(raw, server_hostname=broker.host):
            pass


def test_clients_refuse_a_revoked_broker_certificate(tmp_path: Path) -> None:
    """Whoever kept a replaced broker certificate and key cannot pose as the broker to fedmq clients."""
    own = FederationPki.init(tmp_path / "pki", "demo")
    own.issue_site("hospital-a")
    shutil.copytree(own.root, tmp_path / "old-pki")  # the broker identity about to be replaced
    FederationPki.init(own.root, "demo", ["mqtt.example.org"], force=True)  # reissue: the old one is revoked
    site = CommonSettings(federation="demo", tls_ca=own.ca_cert_path, tls_cert=own.cert_path("hospital-a"),
                          tls_key=own.key_path("hospital-a"))
    with start_tls_mosquitto(tmp_path / "old-pki") as old_broker:
        with pytest.raises(ssl.SSLCertVerificationError, match="revoked"):
            _handshake(old_broker, site)  # crl.pem beside ca.crt is used by default
        # Control: without the CRL the very same handshake goes through.
        bare = tmp_path / "bare" / "ca.crt"
        bare.parent.mkdir()
        shutil.copy(own.ca_cert_path, bare)
        _handshake(old_broker, site.model_copy(update={"tls_ca": bare}))
    with start_tls_mosquitto(own.root) as broker:
        # The current broker certificate passes the CRL check, through the real transport too.
        with Transport(site.model_copy(update={"broker_url": broker.url}), f"crl-{uuid.uuid4().hex[:8]}",
                       persistent_session=False) as transport:
            assert transport.connected.is_set()
    other = FederationPki.init(tmp_path / "other", "demo")
    with pytest.raises(TransportError, match="not signed by the federation CA.*FEDMQ_TLS_CRL"):
        client_tls_context(site.model_copy(update={"tls_crl": other.crl_path}))


def test_container_example_is_the_generated_config(tmp_path: Path) -> None:
    shipped = Path(__file__).resolve().parents[1] / "containers" / "mosquitto"
    for path in write_container_example(tmp_path):
        assert (shipped / path.name).read_text() == path.read_text(), \
            f"containers/mosquitto/{path.name} is stale: run `python -m shared.broker_acl`"
    assert "require_certificate true" in (shipped / "mosquitto.conf").read_text()
    assert "crlfile /mosquitto/certs/crl.pem" in (shipped / "mosquitto.conf").read_text(), "revoked sites must stay out"
    assert acl_text(monitors=CONTAINER_MONITORS) == (shipped / "acl").read_text()
    assert "user monitor-exporter" in (shipped / "acl").read_text(), "compose's exporter must be admitted"
