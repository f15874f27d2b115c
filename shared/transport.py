"""The MQTT transport both sides use: one paho client, QoS 1, reconnects, a thread-safe inbox.

Why a wrapper: every fedmq client needs the same things — TCP_NODELAY (without it small
messages wait ~40 ms for Nagle), a persistent session so QoS 1 messages queued while a
hospital link was down are delivered after reconnection, resubscription on reconnect,
TLS with client certificates, a size limit on what it accepts, and byte counters for the
benchmarks. paho's callbacks run on its network thread; the transport only queues what
arrives, so the owner processes messages on its own thread and long work (training) never
blocks keepalives.
"""

from __future__ import annotations

import logging
import math
import queue
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

from shared.config import CommonSettings
from shared.pki import PkiError, crl_beside, load_ca_certificate, load_verified_crl

log = logging.getLogger(__name__)

SESSION_EXPIRY_SECONDS = 7 * 24 * 3600
INBOX_FULL_LOG_INTERVAL = 10.0  # seconds between log lines about a full incoming queue


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
        self._v5 = settings.mqtt_version == "5"
        protocol = mqtt.MQTTv5 if self._v5 else mqtt.MQTTv311
        self._client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol,
                                   clean_session=None if self._v5 else not persistent_session)
        self._persistent = persistent_session
        self._client.max_inflight_messages_set(100)
        self._client.max_queued_messages_set(0)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
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
        self._client.on_message = self._on_message

    def _configure_tls(self) -> None:
        s = self.settings
        for name, path in (("tls_ca", s.tls_ca), ("tls_cert", s.tls_cert), ("tls_key", s.tls_key)):
            if path is not None and not path.is_file():
                raise TransportError(f"{name} file {path} does not exist; check FEDMQ_{name.upper()}")
        self._client.tls_set_context(client_tls_context(s))

    # paho callbacks (network thread) -------------------------------------------------------
    @staticmethod
    def _on_socket_open(client: mqtt.Client, userdata: object, sock: socket.socket) -> None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as e:  # a unix or websocket transport has no such option
            log.debug("TCP_NODELAY not set: %s", e)

    def _on_connect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                    properties: Properties | None) -> None:
        if reason.is_failure:
            self._connect_error = str(reason)
            log.error("broker %s:%d refused %s: %s", self.address.host, self.address.port, self.client_id, reason)
            return
        # Under the lock, so a concurrent subscribe() is either in this snapshot or sees us connected.
        with self._lock:
            for topic, qos in self._subscriptions.items():
                client.subscribe(topic, qos)
            self._disconnected.clear()
            self.connected.set()
        log.info("%s connected to %s:%d", self.client_id, self.address.host, self.address.port)

    def _on_disconnect(self, client: mqtt.Client, userdata: object, flags: object, reason: mqtt.ReasonCode,
                       properties: Properties | None) -> None:
        self.connected.clear()
        self._disconnected.set()
        if reason.is_failure:
            log.warning("%s lost the broker (%s); reconnecting", self.client_id, reason)

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
    def start(self, timeout: float = 15.0) -> "Transport":
        """Connect and start the network thread; raises ``TransportError`` if not connected in time."""
        props = None
        if self._v5:
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = SESSION_EXPIRY_SECONDS if self._persistent else 0
        try:
            self._client.connect(self.address.host, self.address.port, keepalive=self.settings.keepalive,
                                 clean_start=not self._persistent if self._v5 else mqtt.MQTT_CLEAN_START_FIRST_ONLY,
                                 properties=props)
        except (OSError, ssl.SSLError) as e:
            raise TransportError(f"cannot reach the MQTT broker at {self.settings.broker_url}: {e}. Is it running, "
                                 "and do FEDMQ_BROKER_URL and the TLS files point at it?") from None
        self._client.loop_start()
        if not self.connected.wait(timeout):
            self.stop()
            why = self._connect_error or "no answer"
            raise TransportError(f"the broker at {self.settings.broker_url} did not accept {self.client_id}: {why}. "
                                 "Check credentials, certificates and the broker log.")
        return self

    def stop(self, *, graceful: bool = True, timeout: float = 5.0) -> None:
        """Disconnect. ``graceful=False`` drops the socket so the broker fires our last will.

        A graceful stop first lets the broker acknowledge what we published (a last status must
        not be lost) and waits for the DISCONNECT to go out: stopping the network thread
        earlier would close the socket under it, and the broker would fire the will.
        """
        if graceful:
            last = self._last_publish
            if last is not None and self.connected.is_set():
                try:
                    last.wait_for_publish(timeout)
                except (RuntimeError, ValueError):  # not connected any more: nothing to wait for
                    pass
            self._client.disconnect()
            if not self._disconnected.wait(timeout):
                log.warning("%s: the broker did not confirm the disconnect within %.0fs", self.client_id, timeout)
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
