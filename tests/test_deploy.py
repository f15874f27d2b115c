"""``fedmq agent deploy | status | remove`` against a real engine: Podman's Docker-compatible
service on a socket of the test's own, a TLS broker container on a Podman network, and
the agent image built by the container tests' scripts.

Checked the way a hospital's admin would: the agent gets healthy, ``status`` says so, an
upgrade replaces the container but keeps the state volume's content, a broken upgrade is
rolled back, ``remove`` keeps the state volume unless ``--purge``. Without an engine the
message says how to start Podman's service.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from docker.errors import NotFound

from edge_agent.deploy import AgentDeployment, DeployError, _healthy_within, connect, deploy, run_health_check, status
from fedmq.cli import app
from shared.pki import FEDMQ_CONTAINER_UID, FederationPki
from tests.test_containers import FEDERATION, PROJECT, Deployment, Podman
from tests.test_containers import images_fixture, podman_fixture  # noqa: F401  (the fixtures, shared)

DATA = PROJECT / "fedmq" / "data" / "heart_disease"
IMAGE = "localhost/fedmq-agent:latest"


@pytest.fixture(scope="module")
def engine(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`podman system service` on a socket of our own, stopped by its PID at the end."""
    sock = tmp_path_factory.mktemp("engine") / "podman.sock"
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"], env=podman.env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                connect(f"unix://{sock}").close()
                break
            except DeployError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        yield f"unix://{sock}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)


@pytest.fixture()
def site(podman: Podman, images: None, tmp_path: Path) -> Iterator[tuple[Deployment, AgentDeployment]]:
    """A broker on a network of the test's own, and what a hospital holds: its CSVs and its certificates."""
    site_id = f"deploy-{uuid.uuid4().hex[:6]}"
    pki = FederationPki.init(tmp_path / "pki", FEDERATION, ["broker"])
    pki.issue_site(site_id)
    pki.give_keys_to_containers(["broker"])
    data, certs = tmp_path / "data", tmp_path / "certs"
    data.mkdir()
    certs.mkdir()
    shutil.copy(DATA / "cleveland_train.csv", data / "train.csv")
    shutil.copy(DATA / "cleveland_test.csv", data / "test.csv")
    for path in (pki.ca_cert_path, pki.cert_path(site_id), pki.key_path(site_id)):
        shutil.copy(path, certs / path.name)
    dep = Deployment(podman, pki)
    try:
        dep.start_broker()
        yield dep, AgentDeployment(site_id=site_id, data_dir=data, certs_dir=certs, image=IMAGE, network=dep.network,
                                   env={"FEDMQ_BROKER_URL": "mqtts://broker:8883", "FEDMQ_FEDERATION": FEDERATION})
    finally:
        for name in (f"fedmq-agent-{site_id}", f"fedmq-agent-{site_id}-previous"):
            podman("rm", "-f", "-t", "0", name, check=False)
        podman("volume", "rm", "-f", f"fedmq-agent-{site_id}-state", check=False)
        podman("rmi", f"localhost/fedmq-agent:{site_id}", check=False)
        dep.remove()


def _exec(podman: Podman, container: str, script: str) -> str:
    return podman("exec", container, "sh", "-c", script)


def test_deploy_status_upgrade_rollback_remove(engine: str, site: tuple[Deployment, AgentDeployment],
                                               podman: Podman) -> None:
    _, spec = site
    assert spec.certs_dir is not None
    client = connect(engine)
    key = spec.certs_dir / f"{spec.site_id}.key"
    with pytest.raises(DeployError, match=f"chown {FEDMQ_CONTAINER_UID}:{FEDMQ_CONTAINER_UID} {key}"):
        deploy(client, spec)
    os.chown(key, FEDMQ_CONTAINER_UID, FEDMQ_CONTAINER_UID)

    first = deploy(client, spec, wait=120)
    st = status(client, spec.site_id)
    assert (st.state, st.image, st.state_volume) == ("running", IMAGE, f"fedmq-agent-{spec.site_id}-state")
    assert st.ok and st.check is not None and st.check.startswith("ok: idle"), st
    attrs = first.attrs
    assert attrs["HostConfig"]["RestartPolicy"]["Name"] == "unless-stopped"
    assert attrs["Config"]["Healthcheck"]["Test"][-5:] == ["fedmq", "agent", "health", "--state-dir", "/state"]
    mounts = {m["Destination"]: m for m in attrs["Mounts"]}
    assert not mounts["/data"]["RW"] and not mounts["/certs"]["RW"] and mounts["/state"]["RW"]
    # Read-only for real: the agent cannot touch the hospital's data.
    assert "Read-only file system" in podman("exec", first.name, "sh", "-c", "touch /data/x 2>&1 || true")
    _exec(podman, first.name, "echo kept > /state/marker")

    # Upgrade to another image: a new container on the same state volume.
    upgraded = f"localhost/fedmq-agent:{spec.site_id}"
    subprocess.run(["podman", "build", "-t", upgraded, "--label", "org.fedmq.test=upgrade", "-f", "-"],
                   input=f"FROM {IMAGE}\n", text=True, env=podman.env, check=True, capture_output=True, timeout=120)
    second = deploy(client, replace(spec, image=upgraded), wait=120)
    assert second.id != first.id
    st = status(client, spec.site_id)
    assert (st.state, st.image) == ("running", upgraded) and st.ok, st
    assert _exec(podman, second.name, "cat /state/marker") == "kept"
    names = podman("ps", "-a", "--format", "{{.Names}}").split()
    assert [n for n in names if spec.site_id in n] == [f"fedmq-agent-{spec.site_id}"]

    # An upgrade whose agent cannot get healthy is rolled back to the running version. Its agent
    # waits for a broker it cannot reach (as a hospital server booting before its network must),
    # so it never reports connected; the log lines in the message say why.
    broken = replace(spec, env={**spec.env, "FEDMQ_BROKER_URL": "mqtts://no-such-broker:8883"})
    rolled_back = "(?s)did not get healthy.*not connected to the broker.*no-such-broker.*runs again and is healthy"
    with pytest.raises(DeployError, match=rolled_back):
        deploy(client, broken, wait=20)
    st = status(client, spec.site_id)
    assert (st.state, st.image) == ("running", upgraded), st
    assert _exec(podman, st.name, "cat /state/marker") == "kept"

    # The CLI: status in words, then remove keeps the volume until --purge.
    runner = CliRunner()
    shown = runner.invoke(app, ["agent", "status", "--site-id", spec.site_id, "--engine", engine])
    assert shown.exit_code == 0, shown.output
    assert "running" in shown.output and upgraded in shown.output and "check now: ok" in shown.output
    removed = runner.invoke(app, ["agent", "remove", "--site-id", spec.site_id, "--engine", engine])
    assert removed.exit_code == 0, removed.output
    assert podman("ps", "-a", "-q", "--filter", f"name=fedmq-agent-{spec.site_id}") == ""
    podman("volume", "exists", f"fedmq-agent-{spec.site_id}-state")  # kept
    gone = runner.invoke(app, ["agent", "status", "--site-id", spec.site_id, "--engine", engine])
    assert gone.exit_code == 1 and "fedmq agent deploy" in gone.output
    purged = runner.invoke(app, ["agent", "remove", "--site-id", spec.site_id, "--purge", "--engine", engine])
    assert purged.exit_code == 0 and f"volume fedmq-agent-{spec.site_id}-state" in purged.output
    with pytest.raises(AssertionError):
        podman("volume", "inspect", f"fedmq-agent-{spec.site_id}-state")


class _ExitingContainer:
    """An agent container that exits just as its health check starts, so that the engine has
    already dropped the exec session (Podman: 404 "no such exec session"). A stand-in for the
    SDK's container (nothing here crosses MQTT): against the real engine this race is what
    made the rollback test fail now and then, and it cannot be timed deterministically."""

    name = "fedmq-agent-site-a"

    def __init__(self, *, removed: bool = False) -> None:
        self.status = "running"
        self.attrs: dict[str, Any] = {"State": {"ExitCode": 0}, "RestartCount": 0}
        self.removed = removed
        self.exited = False

    def reload(self) -> None:
        if self.exited and self.removed:
            raise NotFound("no such container")

    def exec_run(self, cmd: list[str]) -> None:
        assert cmd[:3] == ["fedmq", "agent", "health"]
        self.exited = True
        self.status, self.attrs = "exited", {"State": {"ExitCode": 1}, "RestartCount": 0}
        raise NotFound("404 Client Error: Not Found", explanation="no such exec session")


def test_a_container_exiting_as_its_health_check_starts_is_unhealthy_not_an_error() -> None:
    assert run_health_check(_ExitingContainer()) == (
        False, "the agent exited (exit code 1, 0 restarts so far); its health check could not run: "
               "no such exec session")
    assert run_health_check(_ExitingContainer(removed=True)) == (
        False, "the container is gone (its health check could not run: no such exec session)")
    # The deployment's wait: what it reports is the exit, which the rollback message then carries.
    said: list[str] = []
    assert _healthy_within(_ExitingContainer(), time.monotonic(), 30, said.append) == (
        False, "the agent exited (exit code 1, 0 restarts so far)")
    assert said == ["waiting up to 30s for fedmq-agent-site-a to connect and report healthy"]


def test_an_unreachable_engine_says_how_to_start_one(tmp_path: Path) -> None:
    with pytest.raises(DeployError, match=rf"no container engine socket at {tmp_path}/none.sock: is Docker running"):
        connect(f"unix://{tmp_path}/none.sock")
    # A socket file nobody listens on (a stopped service leaves one behind).
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as s:
        s.bind(str(stale))
    with pytest.raises(DeployError, match="cannot talk to the container engine") as e:
        connect(str(stale))
    assert "podman system service --time=0" in str(e.value)
    result = CliRunner().invoke(app, ["agent", "status", "--site-id", "x", "--engine", f"unix://{tmp_path}/none.sock"])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "--engine unix:///PATH" in result.output.replace("\n", " ")


def test_deployment_mistakes_are_caught_before_anything_runs(tmp_path: Path) -> None:
    data, certs = tmp_path / "data", tmp_path / "certs"
    data.mkdir()
    certs.mkdir()
    (data / "train.csv").write_text("a,label\n1,0\n")
    for name in ("ca.crt", "site-a.crt", "site-a.key"):
        (certs / name).write_text("x")
    os.chmod(certs / "site-a.key", 0o644)
    base = AgentDeployment(site_id="site-a", data_dir=data, certs_dir=certs,
                           env={"FEDMQ_BROKER_URL": "mqtts://broker:8883"})
    env = base.validate()
    assert env["FEDMQ_TLS_KEY"] == "/certs/site-a.key" and "FEDMQ_DATA_TEST" not in env
    assert env["FEDMQ_SITE_ID"] == "site-a" and env["FEDMQ_STATE_DIR"] == "/state"
    cases: dict[str, tuple[dict[str, Any], str]] = {
        "no broker": ({"env": {}}, "pass --broker"),
        "TLS without certificates": ({"certs_dir": None}, "uses TLS: pass --certs-dir"),
        "misspelt setting": ({"env": {**base.env, "FEDMQ_BROKER": "x"}}, r"unknown agent settings \['FEDMQ_BROKER'\]"),
        "missing CSV": ({"env": {**base.env, "FEDMQ_DATA_TEST": "/data/test.csv"}}, f"{data}/test.csv does not exist"),
        "file outside the mounts": ({"env": {**base.env, "FEDMQ_DATA_TRAIN": "/srv/train.csv"}},
                                    "outside the mounted directories"),
        "another site's id": ({"env": {**base.env, "FEDMQ_SITE_ID": "site-b"}}, "contradicts the deployment"),
        "bad site id": ({"site_id": "Site A"}, "site id 'Site A' is not valid"),
        "no data directory": ({"data_dir": tmp_path / "nope"}, "data directory .* does not exist"),
    }
    for what, (change, message) in cases.items():
        with pytest.raises(DeployError, match=message):
            replace(base, **change).validate()
            pytest.fail(what)
    os.chmod(certs / "site-a.key", 0o600)
    if os.geteuid() != FEDMQ_CONTAINER_UID:
        with pytest.raises(DeployError, match=f"runs as uid {FEDMQ_CONTAINER_UID}"):
            base.validate()
    assert base.validate(check_key_owner=False)["FEDMQ_TLS_CA"] == "/certs/ca.crt"
