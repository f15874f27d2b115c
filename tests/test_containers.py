"""The federation in containers: the images built from the local Debian base, then a broker
(mutual TLS + ACL), the orchestrator and two hospital agents on a Podman network, each run
from its service definition in compose.yaml (image, environment, mounts), so what is
tested is what the demo ships.

The scenario is the one a hospital network meets: two rounds complete, one hospital's
agent container is killed in the middle of a round, the round still completes on its
quorum, the container is started again, and the agent rejoins with its state volume intact
and catches up to the federation's current model. We watch it all as the ``operator``
identity over TLS through the broker's port published on 127.0.0.1, like a person would.

Cold (no base image, wheelhouse or images yet) the builds take about 10 minutes on 2 cores;
warm the scripts reuse what is current and the test takes about 3 minutes. The host packages
of containers/host-packages (Podman, and iptables for its network backend among them) are
installed when any is missing and we are root with apt-get (CI); otherwise the test is skipped.
"""

from __future__ import annotations

import json
import logging
import os
import re
import socket
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from fedmq.cli import app
from fedmq.demo import heart_features
from shared.config import CommonSettings
from shared.pki import FederationPki, PkiError
from shared.protocol import (ModelPublished, OrchestratorStatus, ProtocolError, RoundCommand, RoundSummary,
                             SiteStatus, parse_message)
from shared.topics import Topics
from shared.transport import Transport, TransportError

log = logging.getLogger(__name__)

PROJECT = Path(__file__).resolve().parents[1]
CONTAINERS = PROJECT / "containers"
COMPOSE = yaml.safe_load((PROJECT / "compose.yaml").read_text())
FEDERATION = COMPOSE["x-client-env"]["FEDMQ_FEDERATION"]
HOSPITALS = ("cleveland", "hungary", "switzerland", "va")
# Seconds per build script: a cold base image, a cold wheelhouse, cold images on 2 cores.
BUILD_STEPS = (("build-base.sh", 900), ("wheelhouse.sh", 1200), ("build-images.sh", 1800))
# What the host needs (one package a line), the list that scripts/setup.sh --containers installs too.
PODMAN_PACKAGES = tuple(name for line in (CONTAINERS / "host-packages").read_text().splitlines()
                        if (name := line.partition("#")[0].strip()))


def _progress(request: pytest.FixtureRequest, message: str) -> None:
    """A line on the terminal even while pytest captures output: the builds take minutes."""
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"[containers] {message}")
    log.info(message)


# -- podman ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Podman:
    """The podman CLI with the project's settings (runc, cgroupfs, no systemd)."""

    env: dict[str, str] = field(default_factory=lambda: {
        **os.environ, "CONTAINERS_CONF": str(CONTAINERS / "podman" / "containers.conf")})

    def __call__(self, *args: str, timeout: float = 120.0, check: bool = True) -> str:
        proc = subprocess.run(["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout,
                              check=False)
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
        return proc.stdout.strip()

    def logs(self, container: str, lines: int = 40) -> str:
        """A container's last log lines, stdout and stderr (where the fedmq daemons log) together."""
        proc = subprocess.run(["podman", "logs", "--tail", str(lines), container], env=self.env, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=60, check=False)
        return proc.stdout


def _install_host_packages(request: pytest.FixtureRequest) -> None:
    """Install each missing host package where we may (root with apt-get, as in CI); skip where we may not.

    Package by package rather than "is podman there": a machine with podman but without
    iptables fails every `podman build` ("netavark: No such file or directory").
    """
    _progress(request, f"checking the host packages ({' '.join(PODMAN_PACKAGES)}); installing what is missing")
    proc = subprocess.run(["bash", str(PROJECT / "scripts" / "apt-install.sh"), *PODMAN_PACKAGES],
                          capture_output=True, text=True, timeout=1200, check=False)
    for line in proc.stdout.splitlines():
        _progress(request, line)
    if proc.returncode == 3:
        pytest.skip(f"the container tests need system packages: {proc.stderr.strip()}")
    if proc.returncode != 0:
        pytest.fail(f"scripts/apt-install.sh {' '.join(PODMAN_PACKAGES)} failed (exit {proc.returncode}): "
                    f"{proc.stderr.strip()[-2000:]}")


@pytest.fixture(scope="session", name="podman")
def podman_fixture(request: pytest.FixtureRequest) -> Podman:
    _install_host_packages(request)
    if os.geteuid() != 0:
        pytest.skip("the container tests need root: rootful podman, and keys handed to the container users")
    return Podman()


def _build_images(logs: Path) -> dict[str, float]:
    """Run the three build scripts once per session; each reuses what is current. Returns seconds per step.

    Remembered in the session's temp directory rather than in memory, because
    tests/test_deploy.py imports this module a second time under another name.
    """
    done = logs / "container-builds.json"
    if done.exists():
        return json.loads(done.read_text())
    podman = Podman()
    seconds = {}
    for script, timeout in BUILD_STEPS:
        started = time.monotonic()
        log_path = logs / f"{script}.log"
        with log_path.open("w") as out:
            proc = subprocess.run(["bash", str(CONTAINERS / script)], env=podman.env, stdout=out,
                                  stderr=subprocess.STDOUT, timeout=timeout, check=False)
        if proc.returncode != 0:
            tail = "\n".join(log_path.read_text().splitlines()[-30:])
            pytest.fail(f"containers/{script} failed (exit {proc.returncode}); its last lines:\n{tail}")
        seconds[script] = time.monotonic() - started
    done.write_text(json.dumps(seconds))
    return seconds


@pytest.fixture(scope="session", name="images")
def images_fixture(podman: Podman, request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> None:
    """localhost/fedmq-{agent,orchestrator,broker}:latest, current with this tree."""
    _progress(request, "building the base image, wheelhouse and images (cold: ~10 min; warm: seconds)")
    for script, seconds in _build_images(tmp_path_factory.getbasetemp()).items():
        _progress(request, f"containers/{script}: {seconds:.0f}s")


# -- compose.yaml's services under podman -----------------------------------------------------------

_DEFAULT = re.compile(r"\$\{(\w+):-([^}]*)\}")


@dataclass
class Deployment:
    """Containers, volumes and a network of one test, all named ``<prefix>-...``, removed at the end."""

    podman: Podman
    pki: FederationPki
    prefix: str = field(default_factory=lambda: f"fedmq-test-{uuid.uuid4().hex[:8]}")
    containers: list[str] = field(default_factory=list)
    volumes: set[str] = field(default_factory=set)

    @property
    def network(self) -> str:
        return self.prefix

    def name(self, service: str) -> str:
        return f"{self.prefix}-{service}"

    def run(self, service: str, env: dict[str, str] | None = None, ports: tuple[str, ...] = ()) -> str:
        """``podman run`` a compose.yaml service: its image, environment and mounts, the test's own names."""
        spec = COMPOSE["services"][service]
        args = ["run", "-d", "--name", self.name(service), "--network", self.network, "--network-alias", service]
        for key, value in {**spec.get("environment", {}), **(env or {})}.items():
            args += ["-e", f"{key}={value}"]
        for entry in spec.get("volumes", []):
            source, target, *mode = entry.split(":")
            if source.startswith("./pki/"):
                source = str(self.pki.root / source.removeprefix("./pki/"))
            elif source.startswith("./"):
                source = str(PROJECT / source.removeprefix("./"))
            else:
                source = f"{self.prefix}-{source}"
                self.volumes.add(source)
            args += ["-v", ":".join([source, target, *mode])]
        for port in ports:
            args += ["-p", port]
        self.containers.append(self.name(service))
        return self.podman(*args, _DEFAULT.sub(lambda m: os.environ.get(m[1], m[2]), spec["image"]))

    def start_broker(self) -> int:
        """The broker with its port published on 127.0.0.1 (a free port); returns the port."""
        self.podman("network", "create", self.network)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.run("broker", ports=(f"127.0.0.1:{port}:8883",))
        return port

    def logs(self) -> str:
        return "\n".join(f"--- {c} ---\n{self.podman.logs(c)}" for c in self.containers)

    def remove(self) -> None:
        for container in self.containers:
            self.podman("rm", "-f", "-v", "-t", "0", container, check=False)
        for volume in self.volumes:
            self.podman("volume", "rm", "-f", volume, check=False)
        self.podman("network", "rm", "-f", self.network, check=False)


@pytest.fixture()
def deployment(podman: Podman, images: None, tmp_path: Path) -> Iterator[Deployment]:
    """A fresh PKI whose keys belong to the container users, and cleanup whatever happens."""
    pki = FederationPki.init(tmp_path / "pki", FEDERATION, ["broker"])
    for site in HOSPITALS:
        pki.issue_site(site)
    pki.give_keys_to_containers()
    dep = Deployment(podman, pki)
    try:
        yield dep
    finally:
        print(dep.logs())  # pytest shows teardown output only when the test failed
        dep.remove()


# -- the operator's view ---------------------------------------------------------------------------

class Operator:
    """The federation's retained and live control messages, as the ``operator`` identity receives them."""

    def __init__(self, pki: FederationPki, port: int, timeout: float = 30.0) -> None:
        settings = CommonSettings(broker_url=f"mqtts://127.0.0.1:{port}", federation=FEDERATION,
                                  tls_ca=pki.ca_cert_path, tls_cert=pki.cert_path("operator"),
                                  tls_key=pki.key_path("operator"))
        self.transport = Transport(settings, f"fedmq-test-operator-{uuid.uuid4().hex[:6]}", persistent_session=False)
        deadline = time.monotonic() + timeout
        while True:  # the broker container needs a moment before its port answers
            try:
                self.transport.start(timeout=5)
                break
            except TransportError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        topics = Topics(FEDERATION)
        for topic in (topics.round, topics.orchestrator_status, topics.round_summary, topics.model,
                      f"{topics.base}/site/+/status"):
            self.transport.subscribe(topic)
        self.sites: dict[str, list[tuple[float, SiteStatus]]] = {}
        self.orchestrator: OrchestratorStatus | None = None
        self.command: RoundCommand | None = None
        self.summaries: dict[int, RoundSummary] = {}
        self.models: dict[int, ModelPublished] = {}

    def site(self, site: str) -> SiteStatus | None:
        history = self.sites.get(site)
        return history[-1][1] if history else None

    def status(self, site: str) -> SiteStatus:
        """The site's latest status, which must have arrived by now."""
        latest = self.site(site)
        assert latest is not None, f"no status from {site} yet"
        return latest

    def wait(self, what: str, condition: Callable[[], object], timeout: float) -> float:
        """Take in messages until ``condition()`` holds; returns when (monotonic). Fails after ``timeout``."""
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                sites = {s: (st.state, st.model_version, st.round_id) for s in self.sites if (st := self.site(s))}
                orch = self.orchestrator
                raise AssertionError(f"{what}: not seen within {timeout:.0f}s; orchestrator "
                                     f"{orch and (orch.state, orch.round, orch.detail)}, sites {sites}, "
                                     f"rounds done {sorted(self.summaries)}")
            msg = self.transport.get(0.2)
            if msg is None:
                continue
            try:
                message = parse_message(msg.payload)
            except ProtocolError:
                continue
            if isinstance(message, SiteStatus):
                self.sites.setdefault(message.sender, []).append((time.monotonic(), message))
            elif isinstance(message, OrchestratorStatus):
                self.orchestrator = message
            elif isinstance(message, RoundCommand):
                self.command = message
            elif isinstance(message, RoundSummary) and message.new_version is not None:
                self.summaries[message.round] = message
            elif isinstance(message, ModelPublished):
                self.models[message.version] = message
        return time.monotonic()

    def close(self) -> None:
        self.transport.stop()


# -- the test --------------------------------------------------------------------------------------

ROUNDS = 4
ROUND_TIMEOUT = 30
# Slower local training than compose.yaml's 100 steps, so that the kill lands while the
# agent is still training (seconds) and not after it already reported.
TRAINING = '{"local_steps":4000,"batch_size":4,"learning_rate":0.005,"loss":"bce"}'


def test_federation_in_containers_survives_a_killed_agent(deployment: Deployment, podman: Podman) -> None:
    dep = deployment
    port = dep.start_broker()
    operator = Operator(dep.pki, port)
    try:
        dep.run("orchestrator", env={"FEDMQ_ROUNDS": str(ROUNDS), "FEDMQ_MIN_SITES": "2", "FEDMQ_QUORUM": "1",
                                     "FEDMQ_ROUND_TIMEOUT": str(ROUND_TIMEOUT), "FEDMQ_TRAINING": TRAINING})
        started = time.monotonic()
        dep.run("cleveland")
        idle = operator.wait("cleveland's first 'idle' status",
                             lambda: (st := operator.site("cleveland")) is not None and st.state == "idle", 180)
        log.info("agent container cold start (podman run -> retained 'idle'): %.1fs", idle - started)
        dep.run("hungary")

        operator.wait("two completed rounds", lambda: {1, 2} <= set(operator.summaries), 300)
        assert set(operator.models[2].contributors) == {"cleveland", "hungary"}

        def cleveland_training_round_3() -> bool:
            st, cmd = operator.site("cleveland"), operator.command
            return (cmd is not None and cmd.round == 3 and st is not None and st.state == "training"
                    and st.round_id == cmd.round_id)

        operator.wait("cleveland training in round 3", cleveland_training_round_3, 120)
        podman("kill", dep.name("cleveland"))
        operator.wait("cleveland's last will", lambda: operator.status("cleveland").state == "offline", 30)
        operator.wait("round 3 closed on its quorum", lambda: 3 in operator.summaries, ROUND_TIMEOUT + 60)
        assert set(operator.models[3].contributors) == {"hungary"}, "the kill came after cleveland had reported"

        restarted = time.monotonic()
        podman("start", dep.name("cleveland"))
        back_at = operator.wait("cleveland back", lambda: operator.sites["cleveland"][-1][0] > restarted
                                and operator.status("cleveland").state != "offline", 180)
        log.info("agent container restart (podman start -> status online): %.1fs", back_at - restarted)
        back = operator.status("cleveland")
        # Its state volume survived the kill: it comes back knowing the model it trained on.
        assert back.model_version == 2, f"cleveland came back with model {back.model_version}, not v2"

        operator.wait("the federation finished", lambda: operator.orchestrator is not None
                      and operator.orchestrator.state == "finished", 300)
        latest = max(operator.models)
        assert latest == ROUNDS
        assert set(operator.models[4].contributors) == {"cleveland", "hungary"}
        operator.wait("cleveland caught up", lambda: operator.status("cleveland").model_version == latest, 60)
        assert operator.status("hungary").model_version == latest
        assert podman("inspect", "--format", "{{.State.Status}}", dep.name("orchestrator")) == "running"
    finally:
        operator.close()


def test_compose_gives_each_hospital_only_its_own_data() -> None:
    """What the demo promises, checked on compose.yaml itself (no engine needed)."""
    services = COMPOSE["services"]
    orchestrator = services["orchestrator"]["environment"]
    assert json.loads(orchestrator["FEDMQ_TASK_FEATURES"]) == heart_features()  # the CSV header, in order
    assert orchestrator["FEDMQ_MIN_SITES"] == str(len(HOSPITALS))
    assert json.loads(orchestrator["FEDMQ_TRAINING"]) == {"local_steps": 100, "batch_size": 4,
                                                          "learning_rate": 0.005, "loss": "bce"}
    assert {name for name, s in services.items() if "demo" in s.get("profiles", [])} == set(HOSPITALS)
    for site in HOSPITALS:
        mounts = {target: (source, mode) for source, target, *mode in
                  (entry.split(":") for entry in services[site]["volumes"])}
        data = {target: source for target, (source, _) in mounts.items() if target.startswith("/data/")}
        assert data == {"/data/train.csv": f"./fedmq/data/heart_disease/{site}_train.csv",
                        "/data/test.csv": f"./fedmq/data/heart_disease/{site}_test.csv"}
        assert all((PROJECT / source).is_file() for source in data.values())
        assert mounts["/certs/client.key"][0] == f"./pki/sites/{site}.key"
        assert mounts["/certs/crl.pem"][0] == "./pki/crl.pem", "revoked peers are refused only with the CRL"
        assert all(mode == ["ro"] for target, (_, mode) in mounts.items() if target != "/state")
        assert mounts["/state"][0] == f"{site}-state" and f"{site}-state" in COMPOSE["volumes"]
        assert services[site]["environment"]["FEDMQ_SITE_ID"] == site


def test_pki_hands_keys_to_the_container_users(tmp_path: Path) -> None:
    """`--container-owners`: each key the containers read belongs to the user that reads it, still 0600."""
    root = tmp_path / "pki"
    runner = CliRunner()
    init = runner.invoke(app, ["pki", "init", str(root), "--federation", FEDERATION, "--container-owners"])
    issue = runner.invoke(app, ["pki", "issue-site", str(root), "va", "--container-owners"])
    if os.geteuid() != 0:
        assert init.exit_code == 1 and "needs root" in init.output and "podman unshare" in init.output
        return
    assert init.exit_code == 0 and issue.exit_code == 0, init.output + issue.output
    owners = {name: ((root / name).stat().st_uid, (root / name).stat().st_gid, (root / name).stat().st_mode & 0o777)
              for name in ("broker.key", "orchestrator.key", "sites/va.key", "operator.key", "ca.key")}
    assert owners == {"broker.key": (1883, 1883, 0o600), "orchestrator.key": (10001, 10001, 0o600),
                      "sites/va.key": (10001, 10001, 0o600), "operator.key": (0, 0, 0o600), "ca.key": (0, 0, 0o600)}
    with pytest.raises(PkiError, match="does not exist: issue that identity first"):
        FederationPki(root).give_keys_to_containers(["hungary"])


def test_secure_aggregation_in_containers_signs_with_the_agents_tls_identities(deployment: Deployment) -> None:
    """Turning secure aggregation on needs nothing but the flag: each agent signs with its mounted TLS key."""
    dep = deployment
    port = dep.start_broker()
    operator = Operator(dep.pki, port)
    sites = ("cleveland", "hungary", "switzerland")
    try:
        dep.run("orchestrator", env={"FEDMQ_ROUNDS": "2", "FEDMQ_MIN_SITES": str(len(sites)),
                                     "FEDMQ_SECURE_AGGREGATION__ENABLED": "true"})
        for site in sites:
            dep.run(site)
        operator.wait("two secure rounds", lambda: {1, 2} <= set(operator.summaries), 300)
        assert set(operator.models[2].contributors) == set(sites)
        logs = dep.podman.logs(dep.name("orchestrator"), lines=2000)
        assert "round 1: securely aggregated 3 sites" in logs and "round 2: securely aggregated 3 sites" in logs
        assert "refused" not in logs and "rejected" not in logs, logs
    finally:
        operator.close()
