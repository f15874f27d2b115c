"""Start an MQTT broker we own: Mosquitto when the binary is on PATH, else amqtt in-process.

The demo and the tests both need a broker on a free loopback port with our own
configuration (TCP_NODELAY, a message-size limit, no persistence between runs), so the
launcher lives here rather than in either of them.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)

DEFAULT_MESSAGE_SIZE_LIMIT = 8 * 1024 * 1024


class BrokerStartError(RuntimeError):
    """The broker did not come up; the message says what to check."""


def free_port() -> int:
    """Ask the kernel for an unused TCP port on loopback."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Block until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise BrokerStartError(f"broker process exited with code {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerStartError(f"nothing listens on {host}:{port} after {timeout:.0f}s")


def mosquitto_config(port: int, *, host: str = "127.0.0.1", message_size_limit: int = DEFAULT_MESSAGE_SIZE_LIMIT,
                     extra: str = "", persistence_dir: Path | None = None) -> str:
    """A Mosquitto 2.x configuration for a private, anonymous, loopback broker.

    With ``persistence_dir`` the broker keeps sessions, queued and retained messages there
    across restarts, saved every second so that even a killed broker loses little.
    """
    persistence = ["persistence false"]
    if persistence_dir is not None:
        persistence = ["persistence true", f"persistence_location {persistence_dir}/", "autosave_interval 1"]
        if os.geteuid() == 0:  # as root Mosquitto runs as `mosquitto`, who cannot write the caller's directory
            persistence.append("user root")
    return "\n".join([
        "per_listener_settings false",
        *persistence,
        "log_dest stderr",
        "log_type error",
        "log_type warning",
        f"message_size_limit {message_size_limit}",
        "max_inflight_messages 100",
        "max_queued_messages 10000",
        f"listener {port} {host}",
        "allow_anonymous true",
        "set_tcp_nodelay true",
        extra,
        "",
    ])


@dataclass
class Broker:
    """A running broker; ``url`` is what clients connect to. Stop it with ``stop()`` or ``with``."""

    kind: str
    host: str
    port: int
    proc: subprocess.Popen | None = None
    workdir: Path | None = None
    _tmp: tempfile.TemporaryDirectory | None = field(default=None, repr=False)
    scheme: str = "mqtt"

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}:{self.port}"

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: nothing is saved, clients get no goodbye."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=5)
        self.stop()

    def __enter__(self) -> "Broker":
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def start_mosquitto(port: int | None = None, *, host: str = "127.0.0.1", extra_config: str = "",
                    message_size_limit: int = DEFAULT_MESSAGE_SIZE_LIMIT, timeout: float = 10.0,
                    persistence_dir: Path | None = None) -> Broker:
    """Start ``mosquitto`` with our own config on a free port (or ``port``; to restart one on its port).

    ``persistence_dir`` (kept by the caller, so a restarted broker finds it) turns persistence on.
    """
    return start_mosquitto_with(
        lambda port, _workdir: mosquitto_config(port, host=host, message_size_limit=message_size_limit,
                                                extra=extra_config, persistence_dir=persistence_dir),
        port, host=host, timeout=timeout)


def start_mosquitto_with(config: Callable[[int, Path], str], port: int | None = None, *, host: str = "127.0.0.1",
                         scheme: str = "mqtt", timeout: float = 10.0) -> Broker:
    """Start ``mosquitto`` with the configuration ``config(port, workdir)`` returns.

    Why a callable: a TLS/ACL broker needs its ACL file and persistence directory next to
    the config, in the private workdir that only exists once the broker is being started.
    ``scheme`` is what ``Broker.url`` reports (``mqtts`` for a TLS listener).
    """
    binary = shutil.which("mosquitto") or next(
        (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if os.path.exists(p)), None)
    if binary is None:
        raise BrokerStartError("mosquitto is not installed: run `apt-get install -y mosquitto` "
                               "(or use --broker mqtt://HOST:PORT for a broker you already run)")
    port = port or free_port()
    tmp = tempfile.TemporaryDirectory(prefix="fedmq-mosquitto-")
    conf = Path(tmp.name) / "mosquitto.conf"
    conf.write_text(config(port, Path(tmp.name)))
    stderr = open(Path(tmp.name) / "mosquitto.log", "wb")
    proc = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=stderr)
    broker = Broker("mosquitto", host, port, proc, Path(tmp.name), tmp, scheme=scheme)
    try:
        wait_for_port(host, port, timeout, proc)
    except BrokerStartError as e:
        log_text = (Path(tmp.name) / "mosquitto.log").read_text(errors="replace")
        broker.stop()
        raise BrokerStartError(f"{e}; mosquitto said: {log_text.strip() or '(nothing)'}") from None
    log.info("mosquitto listening on %s:%d", host, port)
    return broker


def start_amqtt(port: int | None = None, *, host: str = "127.0.0.1", timeout: float = 20.0) -> Broker:
    """Start the pure-Python amqtt broker in a child process (MQTT 3.1.1 only, ~6x slower)."""
    port = port or free_port()
    proc = subprocess.Popen([sys.executable, "-m", "shared.amqtt_broker", host, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    broker = Broker("amqtt", host, port, proc)
    try:
        wait_for_port(host, port, timeout, proc)
    except BrokerStartError as e:
        err = proc.stderr.read().decode(errors="replace") if proc.poll() is not None and proc.stderr else ""
        broker.stop()
        raise BrokerStartError(f"{e}; amqtt said: {err.strip()[-2000:] or '(nothing)'}") from None
    log.info("amqtt listening on %s:%d", host, port)
    return broker


def start_embedded_broker(port: int | None = None) -> Broker:
    """Mosquitto when it is installed, else amqtt: the demo's zero-install default."""
    try:
        return start_mosquitto(port)
    except BrokerStartError as e:
        log.warning("%s; falling back to the embedded amqtt broker (MQTT 3.1.1, slower)", e)
        return start_amqtt(port)
