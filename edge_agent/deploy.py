"""``fedmq agent deploy | status | remove``: the agent as a container on a hospital's server.

Why through the Docker Engine API (the ``docker`` SDK) instead of shelling out to a CLI:
the same calls drive Docker and Podman (whose service speaks the same API on a unix
socket), no CLI version or output format gets in the way, and every failure arrives as an
exception that we turn into one line saying what to do next. The SDK and the settings
models are imported where they are used: ``fedmq agent health`` runs every 30 s inside
each container and should not pay for them.

What a deployment is: one container ``fedmq-agent-<site>`` running the agent image with
the hospital's data directory read-only at /data, its certificates read-only at /certs,
a named state volume at /state (the agent's models and unacknowledged update), restart
policy ``unless-stopped`` and the health check ``fedmq agent health --state-dir /state``.
Deploying over an existing container is the upgrade: the image is verified (or pulled),
the old container is stopped and kept aside, a new one starts on the *same* state volume,
and only once the new agent reports healthy is the old container removed; otherwise the
old one is started again.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Annotated, TypeVar

import typer
from rich.console import Console

from shared.pki import FEDMQ_CONTAINER_UID
from shared.topics import check_name

if TYPE_CHECKING:
    import docker
    from docker.models.containers import Container

DEFAULT_IMAGE = "localhost/fedmq-agent:latest"
DATA_DIR = "/data"
CERTS_DIR = "/certs"
STATE_DIR = "/state"
HEALTH_COMMAND = ["fedmq", "agent", "health", "--state-dir", STATE_DIR]
# The agent stops after its current step on SIGTERM; a training step can take a while.
STOP_TIMEOUT = 30
LABEL_SITE = "org.fedmq.site"
LABEL_VOLUME = "org.fedmq.state-volume"
LOCAL_SOCKETS = ("/var/run/docker.sock", "/run/podman/podman.sock")
ENGINE_HINT = ("is Docker running? For Podman run `podman system service --time=0 unix:///PATH &` "
               "and pass --engine unix:///PATH")
_NS = 1_000_000_000

Progress = Callable[[str], None]


class DeployError(RuntimeError):
    """A deployment step failed; the message says what to do next."""


def container_name(site_id: str) -> str:
    return f"fedmq-agent-{site_id}"


def default_volume(site_id: str) -> str:
    return f"fedmq-agent-{site_id}-state"


# -- the engine ---------------------------------------------------------------------------------

def engine_url(engine: str | None) -> str:
    """The engine's API URL: a bare socket path becomes ``unix://PATH``.

    Without one, the first local socket that exists (Docker's, then rootful and rootless
    Podman's), so that a hospital server with either engine needs no option at all.
    """
    if engine:
        return f"unix://{engine}" if engine.startswith("/") else engine
    candidates = [*LOCAL_SOCKETS]
    if os.environ.get("XDG_RUNTIME_DIR"):
        candidates.append(f"{os.environ['XDG_RUNTIME_DIR']}/podman/podman.sock")
    found = next((path for path in candidates if Path(path).exists()), LOCAL_SOCKETS[0])
    return f"unix://{found}"


def connect(engine: str | None = None, timeout: float = 120.0) -> docker.DockerClient:
    """A client for the engine at ``engine`` (see ``engine_url``), checked with a ping."""
    import docker
    import requests
    from docker.errors import DockerException

    url = engine_url(engine)
    if url.startswith("unix://") and not Path(url.removeprefix("unix://")).exists():
        raise DeployError(f"no container engine socket at {url.removeprefix('unix://')}: {ENGINE_HINT}")
    try:
        client = docker.DockerClient(base_url=url, timeout=int(timeout))
        client.ping()
    except (DockerException, requests.RequestException) as e:
        raise DeployError(f"cannot talk to the container engine at {url} ({e}): {ENGINE_HINT}") from None
    return client


def _rootless(client: docker.DockerClient) -> bool:
    """Rootless engines map container uids to other host uids, so host ownership says little."""
    return any("rootless" in opt for opt in client.info().get("SecurityOptions") or [])


# -- what to deploy -----------------------------------------------------------------------------

def read_env_file(path: Path) -> dict[str, str]:
    """Docker's ``--env-file`` format: ``KEY=VALUE`` per line, ``#`` comments, no quoting."""
    try:
        lines = path.read_text().splitlines()
    except OSError as e:
        raise DeployError(f"cannot read the env file {path}: {e.strerror}") from None
    env: dict[str, str] = {}
    for number, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            raise DeployError(f"{path}:{number}: expected KEY=VALUE, got {line!r}")
        env[key.strip()] = value
    return env


def _check_setting_names(env: Mapping[str, str]) -> None:
    """Catch misspelt settings here: the agent would silently ignore an unknown FEDMQ_ variable."""
    from shared.config import AgentSettings

    known = set(AgentSettings.model_fields) | {"config"}
    unknown = sorted(k for k in env if k.startswith("FEDMQ_")
                     and k.removeprefix("FEDMQ_").lower().split("__")[0] not in known)
    if unknown:
        raise DeployError(f"unknown agent settings {unknown}; the agent's settings are "
                          f"{sorted('FEDMQ_' + k.upper() for k in known)}")


@dataclass(frozen=True)
class AgentDeployment:
    """One hospital's agent container: what ``deploy`` creates or upgrades to.

    ``env`` holds the agent's settings (``FEDMQ_*``); ``with_defaults`` adds the ones
    that follow from the mounts. ``state_volume=None`` keeps the volume of the container
    being upgraded (or the default ``fedmq-agent-<site>-state`` for a first install).
    """

    site_id: str
    data_dir: Path
    image: str = DEFAULT_IMAGE
    certs_dir: Path | None = None
    env: dict[str, str] = field(default_factory=dict)
    network: str | None = None
    state_volume: str | None = None

    @property
    def name(self) -> str:
        return container_name(self.site_id)

    def with_defaults(self) -> dict[str, str]:
        """The container's environment: derived settings, overridden by ``env``."""
        derived = {"FEDMQ_SITE_ID": self.site_id, "FEDMQ_STATE_DIR": STATE_DIR,
                   "FEDMQ_DATA_TRAIN": f"{DATA_DIR}/train.csv"}
        if (self.data_dir / "test.csv").is_file():
            derived["FEDMQ_DATA_TEST"] = f"{DATA_DIR}/test.csv"
        if self.certs_dir is not None:
            derived |= {"FEDMQ_TLS_CA": f"{CERTS_DIR}/ca.crt", "FEDMQ_TLS_CERT": f"{CERTS_DIR}/{self.site_id}.crt",
                        "FEDMQ_TLS_KEY": f"{CERTS_DIR}/{self.site_id}.key"}
        for key, fixed in (("FEDMQ_SITE_ID", self.site_id), ("FEDMQ_STATE_DIR", STATE_DIR)):
            if self.env.get(key, fixed) != fixed:
                raise DeployError(f"{key}={self.env[key]} contradicts the deployment ({fixed}); "
                                  f"drop it from the environment")
        return derived | self.env

    def validate(self, *, check_key_owner: bool = True) -> dict[str, str]:
        """Check on this host what the container will need; returns its environment.

        Paths under /data and /certs are checked against the mounted directories, so a
        wrong file name fails here and not minutes later in the agent's log.
        """
        from shared.transport import BrokerAddress

        try:
            check_name("site id", self.site_id)
        except ValueError as e:
            raise DeployError(str(e)) from None
        if not self.data_dir.is_dir():
            raise DeployError(f"data directory {self.data_dir} does not exist; pass --data-dir with the "
                              f"hospital's CSV files")
        env = self.with_defaults()
        _check_setting_names(env)
        if "FEDMQ_BROKER_URL" not in env:
            raise DeployError("no broker: pass --broker mqtts://HOST:PORT (or FEDMQ_BROKER_URL in the env file)")
        try:
            tls = BrokerAddress.parse(env["FEDMQ_BROKER_URL"]).tls
        except ValueError as e:
            raise DeployError(str(e)) from None
        if tls and self.certs_dir is None:
            raise DeployError(f"{env['FEDMQ_BROKER_URL']} uses TLS: pass --certs-dir with ca.crt, "
                              f"{self.site_id}.crt and {self.site_id}.key")
        files = {key: self.host_path(key, env[key]) for key in
                 ("FEDMQ_DATA_TRAIN", "FEDMQ_DATA_TEST", "FEDMQ_TLS_CA", "FEDMQ_TLS_CERT", "FEDMQ_TLS_KEY")
                 if key in env}
        if check_key_owner and "FEDMQ_TLS_KEY" in files:
            _check_readable_by_agent(files["FEDMQ_TLS_KEY"])
        return env

    def host_path(self, key: str, inside: str) -> Path:
        """The host file behind the container path ``inside`` (setting ``key``), which must exist."""
        mounts = {DATA_DIR: self.data_dir, **({CERTS_DIR: self.certs_dir} if self.certs_dir else {})}
        seen = ", ".join(f"{host} at {target}" for target, host in mounts.items())
        path = PurePosixPath(inside)
        for target, host in mounts.items():
            if path.is_relative_to(target):
                found = host / path.relative_to(target)
                if not found.is_file():
                    raise DeployError(f"{key}={inside} but {found} does not exist (the agent sees {seen})")
                return found
        raise DeployError(f"{key}={inside} is outside the mounted directories: the agent sees {seen}")


def _check_readable_by_agent(key: Path) -> None:
    """The agent runs as uid 10001 and the key is mounted as it is: make sure it can read it."""
    st = key.stat()
    readable = (st.st_uid == FEDMQ_CONTAINER_UID and st.st_mode & stat.S_IRUSR
                or st.st_gid == FEDMQ_CONTAINER_UID and st.st_mode & stat.S_IRGRP
                or st.st_mode & stat.S_IROTH)
    if not readable:
        raise DeployError(f"the agent runs as uid {FEDMQ_CONTAINER_UID} and could not read {key} (owner uid "
                          f"{st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}): run `chown {FEDMQ_CONTAINER_UID}:"
                          f"{FEDMQ_CONTAINER_UID} {key}` (or issue it with `fedmq pki issue-site ... "
                          f"--container-owners`)")


# -- deploy -------------------------------------------------------------------------------------

def _find(client: docker.DockerClient, name: str) -> Container | None:
    from docker.errors import NotFound

    try:
        return client.containers.get(name)
    except NotFound:
        return None


def ensure_image(client: docker.DockerClient, image: str, *, pull: bool, progress: Progress) -> str:
    """The image's id, pulling it when asked to or when it is not here yet."""
    from docker.errors import APIError, ImageNotFound

    if not pull:
        try:
            return client.images.get(image).id
        except ImageNotFound:
            progress(f"{image} is not on this host; pulling it")
    else:
        progress(f"pulling {image}")
    try:
        return client.images.pull(image).id
    except (APIError, ImageNotFound) as e:
        raise DeployError(f"image {image} is not on this host and could not be pulled ({e.explanation or e}): "
                          f"build it with containers/build-images.sh, or `docker load` it from a file") from None


def _healthy_within(container: Container, started: float, seconds: float, progress: Progress) -> tuple[bool, str]:
    """Run the health check until it passes, the container stops, or ``seconds`` pass.

    Only heartbeats written since ``started`` (monotonic, taken before the container was
    created) count: the state volume still holds the heartbeat of the container this one
    replaces, which would otherwise pass for a minute whatever the new agent does.
    """
    deadline = time.monotonic() + seconds
    output = "the agent did not report yet"
    progress(f"waiting up to {seconds:.0f}s for {container.name} to connect and report healthy")
    while time.monotonic() < deadline:
        container.reload()
        exited = _exited(container)
        if exited is not None:
            return False, exited
        ok, output = run_health_check(container, max_age=time.monotonic() - started)
        if ok:
            return True, output
        time.sleep(1.0)
    return False, output


def _exited(container: Container) -> str | None:
    """How the agent ended if its container stopped or restarted since it started; None while it runs."""
    restarts = int(container.attrs.get("RestartCount") or 0)
    if container.status == "running" and not restarts:
        return None
    return f"the agent exited (exit code {container.attrs['State']['ExitCode']}, {restarts} restarts so far)"


def run_health_check(container: Container, max_age: float | None = None) -> tuple[bool, str]:
    """The image's health check, run now (engines without systemd never schedule it).

    ``max_age``: seconds after which a heartbeat counts as stale (the command's default is 60).
    A container that exits as the check starts takes its exec session with it: the engine
    answers 404 ("no such exec session") or 409 (not running). That is "not healthy", said with
    the container's state, rather than an error that would replace what the caller reports (a
    deployment's rollback, a status).
    """
    from docker.errors import APIError, NotFound

    try:
        result = container.exec_run([*HEALTH_COMMAND, *(["--max-age", f"{max_age:.1f}"] if max_age is not None else [])])
    except APIError as e:
        try:
            container.reload()
        except NotFound:
            return False, f"the container is gone (its health check could not run: {e.explanation or e})"
        state = _exited(container) or f"the container is {container.status}"
        return False, f"{state}; its health check could not run: {e.explanation or e}"
    return result.exit_code == 0, result.output.decode(errors="replace").strip()


def _tail(container: Container, lines: int) -> list[str]:
    return container.logs(tail=lines).decode(errors="replace").splitlines()


def deploy(client: docker.DockerClient, spec: AgentDeployment, *, pull: bool = False, wait: float = 90.0,
           progress: Progress = lambda _: None) -> Container:
    """Install or upgrade the site's agent container (see the module docstring).

    ``wait`` seconds for the new agent to pass its health check (0: do not wait). An
    upgrade whose new container does not get healthy is rolled back.
    """
    from docker.errors import DockerException, NotFound
    from docker.types import Healthcheck, Mount

    env = spec.validate(check_key_owner=not _rootless(client))
    image_id = ensure_image(client, spec.image, pull=pull, progress=progress)
    if spec.network is not None:
        try:
            client.networks.get(spec.network)
        except NotFound:
            raise DeployError(f"network {spec.network} does not exist: create it with "
                              f"`docker network create {spec.network}` (or `podman network create`)") from None
    old = _find(client, spec.name)
    volume = spec.state_volume or (old.labels.get(LABEL_VOLUME) if old else None) or default_volume(spec.site_id)
    try:
        client.volumes.get(volume)
    except NotFound:
        client.volumes.create(volume, labels={LABEL_SITE: spec.site_id})
        progress(f"created the state volume {volume}")
    previous = f"{spec.name}-previous"
    if old is not None:
        stale = _find(client, previous)
        if stale is not None:
            stale.remove(force=True)
        progress(f"stopping {spec.name} ({old.attrs['Config']['Image']}); up to {STOP_TIMEOUT}s for the agent "
                 f"to finish its current step")
        old.stop(timeout=STOP_TIMEOUT)
        old.rename(previous)
    mounts = [Mount(DATA_DIR, str(spec.data_dir.resolve()), type="bind", read_only=True),
              Mount(STATE_DIR, volume, type="volume")]
    if spec.certs_dir is not None:
        mounts.append(Mount(CERTS_DIR, str(spec.certs_dir.resolve()), type="bind", read_only=True))
    try:
        progress(f"starting {spec.name} from {spec.image} ({image_id.removeprefix('sha256:')[:12]})")
        started = time.monotonic()
        new = client.containers.run(
            spec.image, name=spec.name, detach=True, environment=env, mounts=mounts, network=spec.network,
            restart_policy={"Name": "unless-stopped"},
            healthcheck=Healthcheck(test=["CMD", *HEALTH_COMMAND], interval=30 * _NS, timeout=10 * _NS,
                                    retries=3, start_period=60 * _NS),
            labels={LABEL_SITE: spec.site_id, LABEL_VOLUME: volume})
        if wait > 0:
            ok, detail = _healthy_within(new, started, wait, progress)
            if not ok:
                log = "\n  ".join(_tail(new, 15))
                raise DeployError(f"the new agent did not get healthy within {wait:.0f}s: {detail} (--wait 0 "
                                  f"deploys without waiting). Its last log lines:\n  {log}")
            progress(f"healthy: {detail}")
    except (DeployError, DockerException) as e:
        # containers.run may have created the container before failing to start it.
        failed = _find(client, spec.name)
        if failed is not None:
            failed.remove(force=True)
        if old is None:
            raise DeployError(str(e)) from None
        old.rename(spec.name)
        progress(f"rolling back: starting the previous container ({old.attrs['Config']['Image']}) again")
        restarted = time.monotonic()
        old.start()
        again = "runs again"
        if wait > 0:
            ok, detail = _healthy_within(old, restarted, wait, progress)
            again = f"runs again and is healthy ({detail})" if ok else f"runs again but is not healthy: {detail}"
        raise DeployError(f"{e}\nthe previous container ({old.attrs['Config']['Image']}) {again}") from None
    if old is not None:
        old.remove()
    return new


# -- status and remove --------------------------------------------------------------------------

@dataclass(frozen=True)
class AgentStatus:
    """What ``fedmq agent status`` shows about one site's container."""

    name: str
    state: str
    health: str
    check: str | None
    image: str
    image_id: str
    started_at: str
    restarts: int
    exit_code: int
    state_volume: str
    logs: list[str]

    @property
    def ok(self) -> bool:
        return self.state == "running" and self.check is not None and self.check.startswith("ok")


def status(client: docker.DockerClient, site_id: str, *, lines: int = 10) -> AgentStatus:
    """The container's state, the engine's health verdict, a health check run now, and its log tail."""
    container = _find(client, container_name(site_id))
    if container is None:
        raise DeployError(f"no container {container_name(site_id)} on this engine: deploy it with "
                          f"`fedmq agent deploy --site-id {site_id} ...`")
    state = container.attrs["State"]
    check = None
    if container.status == "running":
        ok, output = run_health_check(container)
        check = output if ok else f"failing: {output}"
    return AgentStatus(
        name=container.name, state=container.status, health=(state.get("Health") or {}).get("Status", "none"),
        check=check, image=container.attrs["Config"]["Image"], image_id=container.attrs["Image"][:19],
        started_at=state.get("StartedAt", ""), restarts=int(container.attrs.get("RestartCount") or 0),
        exit_code=int(state.get("ExitCode") or 0), state_volume=container.labels.get(LABEL_VOLUME, "?"),
        logs=_tail(container, lines))


def remove(client: docker.DockerClient, site_id: str, *, purge: bool = False,
           progress: Progress = lambda _: None) -> list[str]:
    """Stop and remove the site's container; ``purge`` also deletes its state volume. Returns what went."""
    from docker.errors import NotFound

    name = container_name(site_id)
    container = _find(client, name)
    volume = container.labels.get(LABEL_VOLUME, default_volume(site_id)) if container else default_volume(site_id)
    removed = []
    if container is not None:
        progress(f"stopping {name} (up to {STOP_TIMEOUT}s)")
        container.stop(timeout=STOP_TIMEOUT)
        container.remove()
        removed.append(f"container {name}")
    if purge:
        try:
            client.volumes.get(volume).remove()
            removed.append(f"volume {volume}")
        except NotFound:
            pass
    if not removed:
        raise DeployError(f"nothing to remove: no container {name}" + (f" and no volume {volume}" if purge else ""))
    return removed


# -- command line -------------------------------------------------------------------------------

app = typer.Typer(help="Run the agent as a container (Docker, or Podman's Docker-compatible service).")
console = Console(stderr=True)

SiteOption = Annotated[str, typer.Option("--site-id", help="This hospital's site id (the certificate's CN).")]
EngineOption = Annotated[str | None, typer.Option(
    "--engine", envvar="DOCKER_HOST",
    help="Engine API: unix:///PATH, a socket path, or tcp://HOST:PORT (default: the local Docker or Podman "
         "socket).")]


def _parse_pairs(pairs: Sequence[str]) -> dict[str, str]:
    env = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise DeployError(f"--env {pair!r}: expected KEY=VALUE")
        env[key] = value
    return env


T = TypeVar("T")


def _run(action: Callable[[], T]) -> T:
    """Run a deployment step; a DeployError becomes a one-line message and exit code 1."""
    try:
        return action()
    except DeployError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None


@app.command("deploy")
def deploy_command(
    site_id: SiteOption,
    data_dir: Annotated[Path, typer.Option(help="Directory with the site's CSVs, mounted read-only at /data "
                                                "(train.csv and test.csv unless the env says otherwise).")],
    broker: Annotated[str | None, typer.Option(help="Broker URL mqtts://HOST:PORT (FEDMQ_BROKER_URL).")] = None,
    federation: Annotated[str | None, typer.Option(help="Federation id (FEDMQ_FEDERATION).")] = None,
    certs_dir: Annotated[Path | None, typer.Option(
        help="Directory with ca.crt, SITE.crt and SITE.key, mounted read-only at /certs.")] = None,
    image: Annotated[str, typer.Option(help="Agent image.")] = DEFAULT_IMAGE,
    env_file: Annotated[Path | None, typer.Option(help="More settings, one KEY=VALUE per line.")] = None,
    env: Annotated[list[str] | None, typer.Option("--env", "-e", help="One more setting KEY=VALUE (repeatable).")]
    = None,
    network: Annotated[str | None, typer.Option(help="Container network to join.")] = None,
    state_volume: Annotated[str | None, typer.Option(
        help="Named volume for /state (default: the current container's, else fedmq-agent-SITE-state).")] = None,
    pull: Annotated[bool, typer.Option(help="Pull the image even if it is present (a moving tag).")] = False,
    wait: Annotated[float, typer.Option(help="Seconds to wait for the agent to get healthy (0: don't).")] = 90.0,
    engine: EngineOption = None,
) -> None:
    """Install the agent container, or upgrade it keeping its state volume (rolled back if unhealthy)."""
    settings = _run(lambda: read_env_file(env_file)) if env_file else {}
    settings |= {k: v for k, v in (("FEDMQ_BROKER_URL", broker), ("FEDMQ_FEDERATION", federation)) if v}
    settings |= _run(lambda: _parse_pairs(env or []))
    spec = AgentDeployment(site_id=site_id, data_dir=data_dir, image=image, certs_dir=certs_dir, env=settings,
                           network=network, state_volume=state_volume)
    client = _run(lambda: connect(engine))
    container = _run(lambda: deploy(client, spec, pull=pull, wait=wait, progress=console.print))
    console.print(f"[green]{container.name}[/green] runs {image}; `fedmq agent status --site-id {site_id}` "
                  f"shows how it is doing")


@app.command("status")
def status_command(site_id: SiteOption, lines: Annotated[int, typer.Option(help="Log lines to show.")] = 10,
                   engine: EngineOption = None) -> None:
    """State, health, image, start time and last log lines of the agent container (exit 1 unless healthy)."""
    client = _run(lambda: connect(engine))
    st = _run(lambda: status(client, site_id, lines=lines))
    out = Console()
    out.print(f"[bold]{st.name}[/bold]", highlight=False)
    for label, value in [("state", f"{st.state}" + (f" (exit code {st.exit_code})" if st.state != "running" else "")),
                         ("health", f"{st.health} (engine); check now: {st.check or 'not running'}"),
                         ("image", f"{st.image} ({st.image_id})"), ("started", st.started_at),
                         ("restarts", str(st.restarts)), ("state volume", st.state_volume)]:
        out.print(f"  {label:<13} {value}", highlight=False)
    out.print(f"  last {len(st.logs)} log lines:", highlight=False)
    for line in st.logs:
        out.print(f"    {line}", highlight=False, markup=False)
    if not st.ok:
        raise typer.Exit(1)


@app.command("remove")
def remove_command(site_id: SiteOption,
                   purge: Annotated[bool, typer.Option(help="Also delete the state volume (models, pending "
                                                            "update): the site starts afresh.")] = False,
                   engine: EngineOption = None) -> None:
    """Stop and remove the agent container; its state volume stays unless --purge."""
    client = _run(lambda: connect(engine))
    for what in _run(lambda: remove(client, site_id, purge=purge, progress=console.print)):
        console.print(f"removed {what}")
