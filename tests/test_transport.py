"""The MQTT transport against a real Mosquitto: delivery, chunks, sessions, wills, limits, reconnects."""

from __future__ import annotations

import logging
import random
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.blobs import BlobInbox, chunk_packet_bytes, iter_chunks, make_manifest
from shared.broker import Broker, free_port, start_mosquitto
from shared.broker_acl import start_tls_mosquitto
from shared.config import CommonSettings
from shared.pki import FederationPki
from shared.topics import Topics
from shared.transport import Backoff, BrokerAddress, Incoming, Transport, TransportError

WAIT = 10.0  # seconds before a message that should arrive is declared lost

MakeTransport = Callable[..., Transport]


def _topics() -> Topics:
    return Topics(f"t-{uuid.uuid4().hex[:12]}")


def _settings(url: str, version: str = "5", **kwargs: object) -> CommonSettings:
    return CommonSettings(broker_url=url, mqtt_version=version, keepalive=5, **kwargs)


@pytest.fixture()
def make_transport() -> Iterator[MakeTransport]:
    """Builds (and at teardown stops) transports; ``start=False`` leaves the connecting to the test."""
    made: list[Transport] = []

    def make(url: str, *, version: str = "5", client_id: str | None = None, start: bool = True,
             **kwargs: object) -> Transport:
        t = Transport(_settings(url, version), client_id or f"c-{uuid.uuid4().hex[:10]}", **kwargs)
        made.append(t)
        return t.start(timeout=WAIT) if start else t

    yield make
    for t in made:
        try:
            t.stop()
        except Exception:  # already stopped or never connected
            pass


def _expect(t: Transport, topic: str | None = None, timeout: float = WAIT) -> Incoming:
    """The next message (on ``topic`` if given), or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        msg = t.get(timeout=left)
        if msg is not None and (topic is None or msg.topic == topic):
            return msg
    pytest.fail(f"no message{' on ' + topic if topic else ''} within {timeout}s")


def _subscribed(pub: Transport, sub: Transport, topic_filter: str, probe_topic: str,
                timeout: float = WAIT) -> None:
    """Subscribe and wait until the broker really routes to us (a probe arrives), then drain probes."""
    sub.subscribe(topic_filter)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pub.publish(probe_topic, b"probe")
        msg = sub.get(timeout=0.3)
        if msg is not None and msg.topic == probe_topic:
            while sub.get(timeout=0.3) is not None:
                pass
            return
    pytest.fail(f"subscription to {topic_filter} not effective within {timeout}s")


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_publish_subscribe(mosquitto: Broker, make_transport: MakeTransport, version: str) -> None:
    topics = _topics()
    sub = make_transport(mosquitto.url, version=version)
    pub = make_transport(mosquitto.url, version=version)
    _subscribed(pub, sub, topics.everything, topics.round)
    topic = topics.site("site-a", "update")
    pub.publish(topic, b"hello").wait_for_publish(WAIT)
    msg = _expect(sub)
    assert (msg.topic, msg.payload, msg.retained) == (topic, b"hello", False)
    assert pub.bytes_sent >= 5 and sub.bytes_received >= 5


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_retained_message_reaches_a_late_subscriber(mosquitto: Broker, make_transport: MakeTransport,
                                                    version: str) -> None:
    topics = _topics()
    pub = make_transport(mosquitto.url, version=version)
    pub.publish(topics.model, b"v7", retain=True).wait_for_publish(WAIT)
    sub = make_transport(mosquitto.url, version=version)
    sub.subscribe(topics.model)
    msg = _expect(sub, topics.model)
    assert msg.payload == b"v7" and msg.retained
    pub.publish(topics.model, b"", retain=True).wait_for_publish(WAIT)  # clear it


def test_three_mib_blob_in_one_mib_chunks(mosquitto: Broker, make_transport: MakeTransport) -> None:
    topics = _topics()
    data = random.Random(3).randbytes(3 * 1024 * 1024 + 123)
    manifest = make_manifest(data, "application/onnx", chunk_size=1024 * 1024)
    assert manifest.count == 4
    sub = make_transport(mosquitto.url, max_message_bytes=chunk_packet_bytes(1024 * 1024))  # above the default
    pub = make_transport(mosquitto.url)
    _subscribed(pub, sub, topics.broadcast_chunks, topics.broadcast_chunk("probe", 0))
    for index, payload in iter_chunks(data, manifest):
        pub.publish(topics.broadcast_chunk(manifest.blob_id, index), payload)
    inbox = BlobInbox(max_blob_bytes=16 * 1024 * 1024)
    assert inbox.expect(manifest) is None
    done = None
    for _ in range(manifest.count):
        done = inbox.offer(_expect(sub).payload) or done
    assert done == manifest.blob_id
    assert inbox.take(done) == data
    assert sub.rejected_oversized == 0
    assert sub.bytes_received >= len(data)


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_persistent_session_receives_what_was_sent_while_away(mosquitto: Broker, make_transport: MakeTransport,
                                                              version: str) -> None:
    topics = _topics()
    topic = topics.to_site("site-a", "ack")
    client_id = f"site-a-{uuid.uuid4().hex[:8]}"
    pub = make_transport(mosquitto.url, version=version)
    first = make_transport(mosquitto.url, version=version, client_id=client_id)
    _subscribed(pub, first, topics.to_site_all("site-a"), topics.to_site("site-a", "probe"))
    first.stop()
    assert not first.connected.is_set()
    for i in range(3):
        pub.publish(topic, f"while away {i}".encode()).wait_for_publish(WAIT)
    again = make_transport(mosquitto.url, version=version, client_id=client_id)
    got = [_expect(again, topic).payload for _ in range(3)]
    assert got == [b"while away 0", b"while away 1", b"while away 2"]


def test_non_persistent_session_forgets(mosquitto: Broker, make_transport: MakeTransport) -> None:
    """The counterpart: without a persistent session nothing is kept, so the test above is meaningful."""
    topics = _topics()
    topic = topics.to_site("site-a", "ack")
    client_id = f"site-a-{uuid.uuid4().hex[:8]}"
    pub = make_transport(mosquitto.url)
    first = make_transport(mosquitto.url, client_id=client_id, persistent_session=False)
    _subscribed(pub, first, topic, topic)
    first.stop()
    pub.publish(topic, b"lost").wait_for_publish(WAIT)
    again = make_transport(mosquitto.url, client_id=client_id, persistent_session=False)
    assert again.get(timeout=1.0) is None


@pytest.mark.parametrize("version", ["5", "3.1.1"])
def test_last_will_on_abrupt_loss(mosquitto: Broker, make_transport: MakeTransport, version: str) -> None:
    topics = _topics()
    will_topic = topics.site("site-a", "status")
    observer = make_transport(mosquitto.url, version=version)
    observer.subscribe(will_topic)
    agent = make_transport(mosquitto.url, version=version, will=(will_topic, b"offline"))
    agent.publish(will_topic, b"online", retain=True).wait_for_publish(WAIT)
    assert _expect(observer, will_topic).payload == b"online"
    agent.stop(graceful=False)
    assert _expect(observer, will_topic).payload == b"offline"
    late = make_transport(mosquitto.url, version=version)
    late.subscribe(will_topic)
    msg = _expect(late, will_topic)
    assert msg.payload == b"offline" and msg.retained
    observer.publish(will_topic, b"", retain=True).wait_for_publish(WAIT)


def test_graceful_stop_does_not_fire_the_will(mosquitto: Broker, make_transport: MakeTransport) -> None:
    topics = _topics()
    will_topic = topics.site("site-b", "status")
    observer = make_transport(mosquitto.url)
    agent = make_transport(mosquitto.url, will=(will_topic, b"offline"))
    _subscribed(agent, observer, will_topic, will_topic)
    agent.stop()
    assert observer.get(timeout=1.5) is None


def test_oversized_message_dropped_and_counted(mosquitto: Broker, make_transport: MakeTransport) -> None:
    topics = _topics()
    topic = topics.site("site-a", "update")
    sub = make_transport(mosquitto.url, max_message_bytes=1000)
    pub = make_transport(mosquitto.url)
    _subscribed(pub, sub, topic, topic)
    pub.publish(topic, b"x" * 1001)
    pub.publish(topic, b"small")
    msg = _expect(sub, topic)
    assert msg.payload == b"small"
    assert sub.rejected_oversized == 1
    assert sub.bytes_received >= 1001 + 5


def test_resubscribes_after_broker_restart(fresh_mosquitto: Broker, make_transport: MakeTransport) -> None:
    topics = _topics()
    topic = topics.round
    port = fresh_mosquitto.port
    sub = make_transport(fresh_mosquitto.url)
    pub = make_transport(fresh_mosquitto.url)
    _subscribed(pub, sub, topic, topic)
    fresh_mosquitto.stop()
    assert _wait_disconnected(sub, WAIT), "the subscriber did not notice the broker going away"
    restarted = start_mosquitto(port=port)
    try:
        assert sub.connected.wait(40), "the subscriber did not reconnect within 40 s"
        assert pub.connected.wait(40), "the publisher did not reconnect within 40 s"
        # the restarted broker has no memory of the session: only a resubscription routes this
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            pub.publish(topic, b"after restart")
            msg = sub.get(timeout=0.5)
            if msg is not None:
                assert (msg.topic, msg.payload) == (topic, b"after restart")
                break
        else:
            pytest.fail("no message after the broker restart: the transport did not resubscribe")
    finally:
        sub.stop()
        pub.stop()
        restarted.stop()


def _wait_disconnected(t: Transport, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while t.connected.is_set():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def test_unreachable_broker_is_a_clear_error() -> None:
    url = f"mqtt://127.0.0.1:{free_port()}"
    transport = Transport(_settings(url), "lonely")
    with pytest.raises(TransportError) as info:
        transport.start(timeout=5)
    message = str(info.value)
    assert url in message and "cannot reach the MQTT broker" in message and "FEDMQ_BROKER_URL" in message


def test_broker_address_parse() -> None:
    assert BrokerAddress.parse("mqtt://broker.example:1884") == BrokerAddress("broker.example", 1884, False)
    assert BrokerAddress.parse("mqtt://10.0.0.1") == BrokerAddress("10.0.0.1", 1883, False)
    assert BrokerAddress.parse("mqtts://broker.example") == BrokerAddress("broker.example", 8883, True)
    assert BrokerAddress.parse("mqtts://h:9999") == BrokerAddress("h", 9999, True)
    for bad in ("http://broker:1883", "broker:1883", "mqtt://", ""):
        with pytest.raises(ValueError, match="is not of the form mqtt://HOST:PORT"):
            BrokerAddress.parse(bad)


def test_bad_broker_url_in_settings_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="'http://x:1883' is not of the form"):
        Transport(_settings("http://x:1883"), "c1")


def test_tcp_nodelay_is_set(mosquitto: Broker, make_transport: MakeTransport) -> None:
    t = make_transport(mosquitto.url)
    sock = t._client.socket()
    assert sock is not None
    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0


@pytest.mark.parametrize("limit", [{"inbox_max_messages": 5}, {"inbox_max_bytes": 5 * 1000}])
def test_full_inbox_drops_and_counts_without_blocking(mosquitto: Broker, make_transport: MakeTransport,
                                                      limit: dict, caplog: pytest.LogCaptureFixture) -> None:
    """An owner that falls behind loses new messages (counted, logged once), never paho's network thread."""
    topics = _topics()
    topic = topics.site("site-a", "blob/x/0")
    sub = Transport(_settings(mosquitto.url, **limit), f"c-{uuid.uuid4().hex[:10]}")
    pub = make_transport(mosquitto.url)
    with sub:
        _subscribed(pub, sub, f"{topics.base}/site/site-a/#", topics.site("site-a", "probe"))
        received_before = sub.bytes_received
        for i in range(20):
            pub.publish(topic, bytes([i]) * 1000)
        deadline = time.monotonic() + WAIT
        while sub.bytes_received < received_before + 20 * 1000 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert sub.bytes_received >= received_before + 20 * 1000, "the network thread stopped reading"
        assert sub.dropped_inbox_full == 15
        kept = []
        while (msg := sub.get(timeout=0.3)) is not None:
            kept.append(msg.payload[0])
        assert kept == [0, 1, 2, 3, 4], "the oldest messages are kept, the newest dropped"
        pub.publish(topic, b"after")
        assert _expect(sub, topic).payload == b"after", "a drained queue accepts messages again"
    assert caplog.text.count("incoming queue full") == 1, "the drops are logged once per interval, not per message"


# -- waiting for the broker, reconnections, refusals ------------------------------------------

def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{what} within {timeout}s")
        time.sleep(0.05)


def test_start_retrying_waits_for_a_broker_that_comes_up_later(caplog: pytest.LogCaptureFixture) -> None:
    """A daemon started before the broker keeps trying, says so each time, and connects once it is up."""
    caplog.set_level(logging.WARNING, logger="shared.transport")
    port = free_port()
    url = f"mqtt://127.0.0.1:{port}"
    transport = Transport(_settings(url, reconnect_min_delay=0.1, reconnect_max_delay=0.4), "early-bird")
    broker: Broker | None = None
    try:
        transport.start_retrying()
        _wait_for(lambda: caplog.text.count(f"broker at {url} not reachable") >= 3, WAIT, "no retries logged")
        assert "Connection refused" in caplog.text and "retrying in" in caplog.text
        assert not transport.connected.is_set()
        transport.raise_if_refused()  # an absent broker is not a refusal
        broker = start_mosquitto(port=port)
        assert transport.wait_connected(threading.Event()), "never connected"
        assert not transport.take_reconnect(), "the first connection is not a reconnection"
        broker.kill()
        broker = start_mosquitto(port=port)
        _wait_for(transport.take_reconnect, WAIT, "no reconnection reported")
        assert not transport.take_reconnect(), "one reconnection is reported once"
    finally:
        transport.stop()
        if broker is not None:
            broker.stop()


def test_start_retrying_ends_when_stopped_before_any_broker_answers() -> None:
    transport = Transport(_settings(f"mqtt://127.0.0.1:{free_port()}", reconnect_min_delay=0.1), "given-up")
    transport.start_retrying()
    stop = threading.Event()
    stop.set()
    assert transport.wait_connected(stop) is False
    transport.stop()
    assert not transport.connected.is_set()


def test_a_refusal_retrying_cannot_fix_is_raised_not_retried() -> None:
    """Not authorized is an operator's problem: the daemon must stop with the reason, not retry forever."""
    with start_mosquitto(extra_config="allow_anonymous false") as closed:
        settings = _settings(closed.url, reconnect_min_delay=0.1, reconnect_max_delay=0.2)
        bounded = Transport(settings, "stranger")
        with pytest.raises(TransportError, match="refused stranger: Not authorized. Retrying cannot fix this"):
            bounded.start(timeout=WAIT)
        daemon = Transport(settings, "stranger-daemon").start_retrying()
        try:
            with pytest.raises(TransportError, match="FEDMQ_USERNAME / FEDMQ_PASSWORD"):
                daemon.wait_connected(threading.Event())
        finally:
            daemon.stop()


@pytest.mark.parametrize("case", ["untrusted broker certificate", "client certificate of another CA"])
def test_a_certificate_refusal_is_not_retried(tmp_path: Path, case: str) -> None:
    pki = FederationPki.init(tmp_path / "pki", "demo")
    pki.issue_site("hospital-a")
    foreign = FederationPki.init(tmp_path / "foreign", "demo")
    foreign.issue_site("hospital-a")
    if case == "untrusted broker certificate":
        ca, identity, expected = foreign, pki, "broker's certificate is not trusted.*FEDMQ_TLS_CA"
    else:
        ca, identity, expected = pki, foreign, "refused our TLS certificate.*UNKNOWN_CA.*FEDMQ_TLS_CERT"
    with start_tls_mosquitto(pki.root) as broker:
        settings = _settings(broker.url, tls_ca=ca.ca_cert_path, tls_cert=identity.cert_path("hospital-a"),
                             tls_key=identity.key_path("hospital-a"), reconnect_min_delay=0.1)
        daemon = Transport(settings, "hospital-a").start_retrying()
        try:
            with pytest.raises(TransportError, match=expected):
                daemon.wait_connected(threading.Event())
        finally:
            daemon.stop()


def test_a_key_that_is_not_the_certificates_is_a_clear_error(tmp_path: Path) -> None:
    pki = FederationPki.init(tmp_path / "pki", "demo")
    pki.issue_site("hospital-a")
    pki.issue_site("hospital-b")
    settings = _settings("mqtts://127.0.0.1:8883", tls_ca=pki.ca_cert_path, tls_cert=pki.cert_path("hospital-a"),
                         tls_key=pki.key_path("hospital-b"))
    with pytest.raises(TransportError, match="cannot use the TLS files.*the key belongs to the certificate"):
        Transport(settings, "hospital-a")


def test_backoff_doubles_up_to_its_cap_with_jitter() -> None:
    backoff = Backoff(0.5, 4.0, random.Random(7))
    delays = [backoff.next() for _ in range(8)]
    ceilings = [0.5, 1.0, 2.0, 4.0, 4.0, 4.0, 4.0, 4.0]
    assert all(c / 2 <= d <= c for d, c in zip(delays, ceilings)), delays
    assert len({round(d, 6) for d in delays[3:]}) == 5, "capped delays must still be jittered"
    backoff.reset()
    assert backoff.next() <= 0.5
