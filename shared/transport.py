"""The MQTT transport both sides use: one paho client, QoS 1, reconnects, a thread-safe inbox.

Why a wrapper: every fedmq client needs the same things — TCP_NODELAY (without it small
messages wait ~40 ms for Nagle), a persistent session so QoS 1 messages queued while a
hospital link was down are delivered after reconnection, resubscription on reconnect,
TLS with client certificates, a size limit on what it accepts, and byte counters for the
benchmarks. paho's callbacks run on its network thread; the transport only queues what
arrives, so the owner processes messages on its own thread and long work (training) never
blocks keepalives.

Two ways to connect. ``start(timeout)`` tries once and raises ``TransportError`` at once when
the broker is unreachable: tests and tools want a bounded answer. The daemons use
``start_retrying()``: a hospital server may boot before its network or the broker, so an
unreachable broker is retried with capped, jittered exponential backoff (one log line per
attempt, with the reason and the next delay) for as long as the daemon runs. Only a refusal
retrying cannot fix (bad credentials, not authorized, an untrusted or refused certificate)
ends it: ``raise_if_refused()`` raises it on the owner's thread. Lost connections are retried
the same way, and ``take_reconnect()`` tells the owner once per new connection so it can
re-publish what a broker that lost everything (no persistence) no longer holds.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from types import TracebackType
from urllib.parse import urlparse

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from shared.blobs import chunk_packet_bytes, largest_chunk_size
from shared.config import CommonSettings
from shared.pki import PkiError, crl_beside, load_ca_certificate, load_verified_crl

log = logging.getLogger(__name__)

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
INBOX_FULL_LOG_INTERVAL = 10.0  # seconds between log lines about a full incoming queue

# CONNACK reason codes that may pass with time (a busy or restarting broker); any other refusal
# (bad user name or password, not authorized, banned, bad protocol...) needs an operator.
RETRYABLE_REFUSALS = frozenset({0x80, 0x88, 0x89, 0x97, 0x9F})
X509_V_ERR_CERT_NOT_YET_VALID = 9  # a wrong clock at boot, until NTP has run: retry


class TransportError(RuntimeError):
    """The broker could not be reached or refused us; the message says what to check."""


def client_tls_context(settings: CommonSettings) -> ssl.SSLContext:
    """TLS as paho's ``tls_set`` sets it up (CA, client certificate, host name check), plus the federation CRL.

    Why the CRL here too: ``fedmq pki init --force`` revokes a replaced broker certificate, and
    whoever kept its key must not be able to pose as the broker. The CRL (``tls_crl``, or the
    crl.pem beside ``tls_ca``) is checked to be the CA's and current before it is used, so a
    wrong file gives a clear error instead of a failed handshake; it is read once, at start.
    """
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(settings.tls_ca) if settings.tls_ca
                                         else None)
    if settings.tls_cert is not None:
        context.load_cert_chain(str(settings.tls_cert), str(settings.tls_key) if settings.tls_key else None)
    crl = settings.tls_crl or (crl_beside(settings.tls_ca) if settings.tls_ca else None)
    if crl is not None:
        if settings.tls_ca is None:
            raise TransportError("tls_crl needs tls_ca: a CRL is checked against the CA that signed it")
        try:
            load_verified_crl(crl, load_ca_certificate(settings.tls_ca))
        except PkiError as e:
            raise TransportError(f"{e} (FEDMQ_TLS_CRL)") from None
        context.load_verify_locations(cafile=str(crl))
        context.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
    return context


@dataclass(frozen=True)
class Incoming:
    topic: str
    payload: bytes
    retained: bool


@dataclass(frozen=True)
class BrokerAddress:
    host: str
    port: int
    tls: bool

    @classmethod
    def parse(cls, url: str) -> "BrokerAddress":
        """``mqtt://host:port`` (plain) or ``mqtts://host:port`` (TLS)."""
        parsed = urlparse(url)
        if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
            raise ValueError(f"broker URL {url!r} is not of the form mqtt://HOST:PORT or mqtts://HOST:PORT")
        tls = parsed.scheme in ("mqtts", "ssl")
        return cls(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)


def unfixable_connect_error(error: OSError) -> str | None:
    """What to fix when a failed connection attempt cannot succeed by retrying; None when it may.

    An unreachable host, a refused or reset connection or a DNS failure can pass (the network
    or the broker is still coming up); a certificate the other side rejects does not.
    """
    if isinstance(error, ssl.SSLCertVerificationError):
        if error.verify_code == X509_V_ERR_CERT_NOT_YET_VALID:
            return None
        return (f"the broker's certificate is not trusted ({error.verify_message}): check that FEDMQ_TLS_CA is "
                "the federation CA and that the host in FEDMQ_BROKER_URL is named in the broker's certificate")
    if isinstance(error, ssl.SSLError) and "ALERT" in (error.reason or ""):
        return _tls_refused(str(error.reason))
    return None


def _tls_refused(alert: str) -> str:
    return (f"the broker refused our TLS certificate ({alert}): check that FEDMQ_TLS_CERT and FEDMQ_TLS_KEY are "
            "this client's certificate and key, issued by the federation CA and not revoked")


class Backoff:
    """Capped exponential delays with jitter: ``uniform(d/2, d)`` for ``d = min(cap, base * 2**n)``.

    The jitter spreads the reconnections of many sites that lost the same broker at the same
    moment, so a restarted broker is not hit by all of them at once.
    """

    def __init__(self, base: float, cap: float, rng: random.Random | None = None) -> None:
        self.base = base
        self.cap = max(cap, base)
        self.attempts = 0
        self._rng = rng or random.Random()

    def next(self) -> float:
        ceiling = min(self.cap, self.base * 2 ** min(self.attempts, 30))
        self.attempts += 1
        return self._rng.uniform(ceiling / 2, ceiling)

    def reset(self) -> None:
        self.attempts = 0


class _Client(mqtt.Client):
    """paho's client, remembering why the last connection attempt failed (paho's retry loop swallows it)."""

    last_error: OSError | None = None

    def reconnect(self) -> mqtt.MQTTErrorCode:
        try:
            rc = super().reconnect()
        except OSError as e:
            self.last_error = e
            raise
        self.last_error = None
        return rc


class Transport:
    """A connected MQTT client. Use as a context manager, or call ``start()`` and ``stop()``."""

    def __init__(self, settings: CommonSettings, client_id: str, *, will: tuple[str, bytes] | None = None,
                 max_message_bytes: int | None = None, persistent_session: bool = True) -> None:
        self.settings = settings
        self.address = BrokerAddress.parse(settings.broker_url)
        self.client_id = client_id
        self.max_message_bytes = max_message_bytes or settings.chunk_size + 4096
        # Bounded: paho's network thread must never block, so when the owner falls behind new
        # messages are dropped and counted (QoS 1 senders resend what is not acknowledged, and
        # missing chunks are asked for again).
        self.inbox: queue.Queue[Incoming] = queue.Queue(maxsize=settings.inbox_max_messages)
        self.inbox_max_bytes = settings.inbox_max_bytes
        self._inbox_bytes = 0
        self._inbox_lock = threading.Lock()
        self.dropped_inbox_full = 0
        self._full_logged_at = -math.inf
        self.connected = threading.Event()
        self._disconnected = threading.Event()
        self._last_publish: mqtt.MQTTMessageInfo | None = None
        self.bytes_sent = 0
        self.bytes_received = 0
        self.rejected_oversized = 0
        self._lock = threading.Lock()
        self._subscriptions: dict[str, int] = {}
        self._connect_error: str | None = None
        self._refused: str | None = None
        self._connections = 0
        self._reconnected = threading.Event()
        self._backoff = Backoff(settings.reconnect_min_delay, settings.reconnect_max_delay)
        self._v5 = settings.mqtt_version == "5"
        protocol = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        self._client = _Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                               clean_session=None if self._v5 else not persistent_session)
        self._persistent = persistent_session
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)
        self._schedule_retry(settings.reconnect_min_delay)
        if settings.username:
            self._client.username_pw_set(settings.username,
                                         settings.password.get_secret_value() if settings.password else None)
        if self.address.tls:
            self._configure_tls()
        if will is not None:
            self._client.will_set(will[0], will[1], qos=1, retain=True)
        self._client.on_socket_open = self._on_socket_open
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_log = self._on_log
        self._client.on_message = self._on_message

    def _configure_tls(self) -> None:
        s = self.settings
        for name, path in (("tls_ca", s.tls_ca), ("tls_cert", s.tls_cert), ("tls_key", s.tls_key)):
            if path is not None and not path.is_file():
                raise TransportError(f"{name} file {path} does not exist; check FEDMQ_{name.upper()}")
        try:
            self._client.tls_set_context(client_tls_context(s))
        except (ssl.SSLError, ValueError) as e:
            raise TransportError(f"cannot use the TLS files (FEDMQ_TLS_CA {s.tls_ca}, FEDMQ_TLS_CERT {s.tls_cert}, "
                                 f"FEDMQ_TLS_KEY {s.tls_key}): {e}; check that they are PEM files and that the key "
                                 "belongs to the certificate") from None

    # paho callbacks (network thread) -------------------------------------------------------
    @staticmethod
    def _on_socket_open(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:  # a unix or websocket transport has no such option
            log.debug("TCP_NODELAY not set: %s", e)

    def _schedule_retry(self, delay: float) -> None:
        """paho's retry loop waits ``min_delay`` before its next attempt: ours, jittered, each time."""
        self._client.reconnect_delay_set(min_delay=delay, max_delay=delay)  # type: ignore[arg-type]

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: mqtt.ConnectFlags,
                    reason: mqtt.ReasonCode, properties: Properties | None) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            if reason.value not in RETRYABLE_REFUSALS:
                self._refused = (f"the broker at {self.settings.broker_url} refused {self.client_id}: {reason}. "
                                 "Retrying cannot fix this: check FEDMQ_USERNAME / FEDMQ_PASSWORD or the client "
                                 "certificate, the broker's ACL and its log")
                log.error("%s", self._refused)
            else:
                log.warning("broker %s:%d refused %s for now: %s", self.address.host, self.address.port,
                            self.client_id, reason)
            return
        refusal = self._packet_limit_refusal(properties)
        if refusal is not None:  # every chunk we sent would make the broker drop us: a reconnect loop
            self._refused = refusal
            log.error("%s", refusal)
            client.disconnect()
            return
        self._backoff.reset()
        self._connections += 1
        client.on_log = None  # only needed before the broker accepts us; it costs a formatted line per packet
        # Under the lock, so a concurrent subscribe() is either in this snapshot or sees us connected.
        with self._lock:
            for topic, qos in self._subscriptions.items():
                client.subscribe(topic, qos)
            self._disconnected.clear()
            self.connected.set()
        if self._connections == 1:
            log.info("%s connected to %s:%d", self.client_id, self.address.host, self.address.port)
            return
        log.info("%s reconnected to %s:%d (%s)", self.client_id, self.address.host, self.address.port,
                 "the broker kept our session" if flags.session_present
                 else "the broker had no session for us: subscriptions renewed")
        self._reconnected.set()

    def _packet_limit_refusal(self, properties: Properties | None) -> str | None:
        """Why our chunks cannot pass the broker's announced Maximum Packet Size (MQTT 5 CONNACK); None if they can."""
        limit = getattr(properties, "MaximumPacketSize", None)
        needed = chunk_packet_bytes(self.settings.chunk_size)
        if limit is None or needed <= limit:
            return None
        fits = largest_chunk_size(limit)
        fix = (f"set FEDMQ_CHUNK_SIZE to at most {fits}" if fits >= 1024 else
               f"raise the broker's maximum packet size to at least {chunk_packet_bytes(1024)} bytes")
        return (f"the broker at {self.settings.broker_url} accepts at most {limit} bytes per message, and chunks of "
                f"FEDMQ_CHUNK_SIZE={self.settings.chunk_size} bytes travel in messages of up to {needed}: {fix} "
                "(the same for the orchestrator and every site), or raise the broker's limit")

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                       properties: Properties | None) -> None:
        self.connected.clear()
        self._disconnected.set()
        client.on_log = self._on_log
        if reason.is_failure:
            delay = self._backoff.next()
            self._schedule_retry(delay)
            log.warning("%s lost the broker at %s (%s); reconnecting in %.1f s", self.client_id,
                        self.settings.broker_url, reason, delay)

    def _on_log(self, client: mqtt.Client, userdata: object, level: int, message: str) -> None:
        """Catch a TLS alert read before the broker accepted us: paho reports only "connection lost".

        With TLS 1.3 the broker checks our certificate after the handshake, so its refusal
        (unknown CA, revoked, expired) arrives as an alert on the first read.
        """
        if level == mqtt.MQTT_LOG_ERR and "ALERT" in message and not self.connected.is_set():
            self._refused = f"cannot connect to the broker at {self.settings.broker_url}: {_tls_refused(message)}"
            log.error("%s", self._refused)

    def _on_connect_fail(self, client: mqtt.Client, userdata: object) -> None:
        error = self._client.last_error
        unfixable = unfixable_connect_error(error) if error is not None else None
        if unfixable is not None:
            self._refused = f"cannot connect to the broker at {self.settings.broker_url}: {unfixable}"
            log.error("%s", self._refused)
            return
        delay = self._backoff.next()
        self._schedule_retry(delay)
        log.warning("broker at %s not reachable (%s); retrying in %.1f s", self.settings.broker_url,
                    error or "connection failed", delay)

    def _on_message(self, client: mqtt.Client, userdata: object, msg: mqtt.MQTTMessage) -> None:
        size = len(msg.payload)
        self.bytes_received += size
        if size > self.max_message_bytes:
            self.rejected_oversized += 1
            log.error("dropped a %d-byte message on %s: larger than the %d-byte limit", size, msg.topic,
                      self.max_message_bytes)
            return
        with self._inbox_lock:
            if self._inbox_bytes + size <= self.inbox_max_bytes:
                try:
                    self.inbox.put_nowait(Incoming(msg.topic, msg.payload, bool(msg.retain)))
                    self._inbox_bytes += size
                    return
                except queue.Full:
                    pass
            self.dropped_inbox_full += 1
            dropped = self.dropped_inbox_full
        now = time.monotonic()
        if now - self._full_logged_at >= INBOX_FULL_LOG_INTERVAL:
            self._full_logged_at = now
            log.error("%s: incoming queue full (%d messages, %d bytes held; limits %d and %d): dropped a message on "
                      "%s, %d dropped so far. The process falls behind what it receives: look for a site flooding "
                      "it, or raise FEDMQ_INBOX_MAX_MESSAGES / FEDMQ_INBOX_MAX_BYTES", self.client_id,
                      self.inbox.qsize(), self._inbox_bytes, self.inbox.maxsize, self.inbox_max_bytes, msg.topic,
                      dropped)

    # lifecycle ------------------------------------------------------------------------------
    def _connect_options(self) -> dict[str, object]:
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS if self._persistent else 0
        return {"keepalive": self.settings.keepalive, "properties": props,
                "clean_start": not self._persistent if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY}

    def start(self, timeout: float = 15.0) -> "Transport":
        """Connect now (tests, tools); raises ``TransportError`` if the broker is unreachable or not accepting us."""
        self._refused = None
        try:
            self._client.connect(self.address.host, self.address.port, **self._connect_options())
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"cannot reach the MQTT broker at {self.settings.broker_url}: {e}. Is it running, "
                                 "and do FEDMQ_BROKER_URL and the TLS files point at it?") from None
        self._client.loop_start()
        deadline = time.monotonic() + timeout
        while not self.connected.wait(min(0.1, max(0.0, deadline - time.monotonic()))):
            if self._refused is not None or time.monotonic() >= deadline:
                self.stop()
                if self._refused is not None:
                    raise TransportError(self._refused)
                why = self._connect_error or "no answer"
                raise TransportError(f"the broker at {self.settings.broker_url} did not accept {self.client_id}: "
                                     f"{why}. Check credentials, certificates and the broker log.")
        return self

    def start_retrying(self) -> "Transport":
        """Start connecting in the background; an unreachable broker is retried until ``stop()`` (daemons).

        Returns at once. ``connected`` is set once the broker accepted us; a refusal that
        retrying cannot fix is raised by ``raise_if_refused()``, which the owner calls in its loop.
        """
        self._refused = None
        self._client.connect_async(self.address.host, self.address.port, **self._connect_options())
        self._client.loop_start()
        return self

    def wait_connected(self, stop: threading.Event) -> bool:
        """Block until connected (True) or ``stop`` is set (False); raises a refusal retrying cannot fix."""
        while not stop.is_set():
            self.raise_if_refused()
            if self.connected.wait(0.2):
                return True
        return False

    def raise_if_refused(self) -> None:
        """Raise ``TransportError`` if the broker refused us for a reason retrying cannot fix."""
        if self._refused is not None:
            raise TransportError(self._refused)

    def take_reconnect(self) -> bool:
        """True once after the client connected again (a lost connection came back) since the last call.

        Why the owner needs it: a broker restarted without persistence has lost retained
        messages, sessions and queued messages; the owner re-publishes its state and asks again
        for what it is missing. Calling it on the owner's thread keeps all that work there.
        """
        if not self._reconnected.is_set():
            return False
        self._reconnected.clear()
        return True

    def stop(self, *, graceful: bool = True, timeout: float = 5.0) -> None:
        """Disconnect. ``graceful=False`` drops the socket so the broker fires our last will.

        A graceful stop first lets the broker acknowledge what we published (a last status must
        not be lost) and waits for the DISCONNECT to go out: stopping the network thread
        earlier would close the socket under it, and the broker would fire the will.
        """
        if graceful and self.connected.is_set():
            last = self._last_publish
            if last is not None:
                try:
                    last.wait_for_publish(timeout)
                except (RuntimeError, ValueError):  # not connected any more: nothing to wait for
                    pass
            self._client.disconnect()
            if not self._disconnected.wait(timeout):
                log.warning("%s: the broker did not confirm the disconnect within %.0fs", self.client_id, timeout)
        elif graceful:
            self._client.disconnect()  # not connected: this only ends paho's retrying
        else:
            sock = self._client.socket()
            if sock is not None:
                sock.close()
        self._client.loop_stop()
        self.connected.clear()

    def __enter__(self) -> "Transport":
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    # messaging ------------------------------------------------------------------------------
    def subscribe(self, topic: str, qos: int = 1) -> None:
        """Subscribe now and again after every reconnect."""
        with self._lock:
            self._subscriptions[topic] = qos
            connected = self.connected.is_set()
        if connected:
            self._client.subscribe(topic, qos)

    def publish(self, topic: str, payload: bytes, *, retain: bool = False, qos: int = 1) -> mqtt.MQTTMessageInfo:
        """Queue a message (paho keeps it across reconnects until the broker acknowledges it)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_PAYLOAD_SIZE:
            raise TransportError(f"payload of {len(payload)} bytes is too large for MQTT")
        self.bytes_sent += len(payload)
        self._last_publish = info
        return info

    @property
    def inbox_bytes(self) -> int:
        """Payload bytes received and not yet taken by ``get``."""
        return self._inbox_bytes

    def get(self, timeout: float | None = None) -> Incoming | None:
        try:
            msg = self.inbox.get(timeout=timeout)
        except queue.Empty:
            return None
        with self._inbox_lock:
            self._inbox_bytes -= len(msg.payload)
        return msg
