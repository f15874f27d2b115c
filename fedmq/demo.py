"""``fedmq demo``: a broker, an orchestrator and four hospital agents on this machine, watched live.

Each hospital runs as its own process with only its own Heart Disease CSVs, exactly as it
would in its own container; the demo itself is just an operator: it reads the federation's
MQTT topics (statuses, round summaries) and draws them. Its state (registry, journal, the
sites' state, logs) stays in a directory it names (``./fedmq-demo-state`` by default) for
``fedmq report`` and ``fedmq models`` to read afterwards.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from rich.console import Console
from rich.table import Table

from fedmq.fleet import ROUND_PHASES, FleetReader, FleetView
from fedmq.watch import Fitted, live_view, size, watch_renderable
from shared.broker import Broker, start_embedded_broker
from shared.config import AgentSettings, CommonSettings, OrchestratorSettings, SecureAggregationSettings
from shared.pki import FederationPki
from shared.protocol import TrainingConfig

DATA_DIR = Path(__file__).resolve().parent / "data" / "heart_disease"
HOSPITALS = {"cleveland": "Cleveland Clinic", "hungary": "Hungarian Inst. of Cardiology",
             "switzerland": "Univ. Hospitals Zurich & Basel", "va": "VA Long Beach"}
FEDERATION = "heart-demo"
DEFAULT_STATE_DIR = Path("fedmq-demo-state")
MARKER = "fedmq-demo.json"  # what makes a directory a demo's state, which a rerun may move aside
SETTLE_SECONDS = 5.0  # after the federation finished, the longest wait for the sites' last statuses


@dataclass
class DemoOptions:
    rounds: int = 15
    broker_url: str | None = None
    state_dir: Path = DEFAULT_STATE_DIR
    learning_rate: float = 0.005
    local_steps: int = 100
    batch_size: int = 4
    strategy: str = "fedavg"
    seed: int = 0
    round_timeout: float = 300.0
    timeout: float = 1800.0
    secure_aggregation: bool = False
    mqtt_version: Literal["3.1.1", "5"] | None = None  # None: 5, or 3.1.1 for the embedded amqtt broker


def heart_features() -> list[str]:
    with (DATA_DIR / "cleveland_train.csv").open() as f:
        header = next(csv.reader(f))
    return [h for h in header if h != "label"]


def settings_env(settings: CommonSettings) -> dict[str, str]:
    """The environment variables that reproduce ``settings`` in a child process (FEDMQ_*)."""
    env = {}
    for key, value in settings.model_dump(mode="json", exclude_none=True).items():
        if isinstance(value, (dict, list)):
            env[f"FEDMQ_{key.upper()}"] = json.dumps(value)
        elif isinstance(value, bool):
            env[f"FEDMQ_{key.upper()}"] = "true" if value else "false"
        else:
            env[f"FEDMQ_{key.upper()}"] = str(value)
    return env


def heart_settings(broker_url: str, root: Path, opts: DemoOptions, *, mqtt_version: str = "5",
                   sites: tuple[str, ...] = tuple(HOSPITALS)) -> tuple[OrchestratorSettings, list[AgentSettings]]:
    """The Fed-Heart-Disease federation: one orchestrator, one agent per hospital with its own CSVs."""
    common = {"broker_url": broker_url, "federation": FEDERATION, "mqtt_version": mqtt_version}
    training = TrainingConfig(local_steps=opts.local_steps, batch_size=opts.batch_size,
                              learning_rate=opts.learning_rate, loss="bce", seed=opts.seed)
    orchestrator = OrchestratorSettings(
        **common, state_dir=root / "orchestrator", rounds=opts.rounds, min_sites=len(sites),
        task_features=heart_features(), task_label="label", training=training, strategy={"name": opts.strategy},
        exit_when_done=True, round_timeout=opts.round_timeout)
    agents = [AgentSettings(**common, site_id=site, state_dir=root / site,
                            data_train=DATA_DIR / f"{site}_train.csv", data_test=DATA_DIR / f"{site}_test.csv")
              for site in sites]
    return orchestrator, agents


def with_secure_aggregation(orchestrator: OrchestratorSettings, agents: list[AgentSettings], pki_dir: Path,
                            **options: Any) -> tuple[OrchestratorSettings, list[AgentSettings]]:
    """The same federation with secure aggregation: a federation PKI, a certificate per hospital.

    The certificates here serve only to sign each site's round keys (the demo broker runs
    without TLS); in production the agents' TLS identities from ``fedmq pki`` do both jobs.
    """
    pki = FederationPki.init(pki_dir, orchestrator.federation)
    secure = SecureAggregationSettings(enabled=True, identity_ca=pki.ca_cert_path, **options)
    signed = []
    for agent in agents:
        issued = pki.issue_site(agent.site_id)
        signed.append(agent.model_copy(update={"identity_cert": issued.cert_path, "identity_key": issued.key_path,
                                               "identity_ca": pki.ca_cert_path}))
    return orchestrator.model_copy(update={"secure_aggregation": secure}), signed


def demo_mqtt_version(opts: DemoOptions, broker: Broker | None) -> str:
    """The MQTT version every process of the demo speaks: the one asked for, else what the broker speaks.

    Why a choice: a broker of the operator's may speak only MQTT 3.1.1 (Debian's RabbitMQ
    3.10), and the embedded fallback amqtt speaks nothing else.
    """
    amqtt = broker is not None and broker.kind == "amqtt"
    if amqtt and opts.mqtt_version == "5":
        raise RuntimeError("the embedded amqtt broker speaks MQTT 3.1.1 only: drop --mqtt-version 5, or install "
                           "mosquitto (`apt-get install -y mosquitto`) for MQTT 5")
    return opts.mqtt_version or ("3.1.1" if amqtt else "5")


def _spawn(args: list[str], settings: CommonSettings, log_path: Path) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
    env.update(settings_env(settings))
    log = open(log_path, "wb")
    return subprocess.Popen([sys.executable, "-m", "fedmq", *args], env=env, stdout=log, stderr=subprocess.STDOUT)


def prepare_state_dir(root: Path, console: Console) -> None:
    """Make ``root`` an empty demo state dir; an earlier demo's state there is moved to ``<root>.previous``.

    A rerun starts a fresh federation (a registry carried over would make it resume at its
    last round) but keeps the last run for comparison; a directory the demo did not create
    is neither moved nor deleted.
    """
    if root.exists() and any(root.iterdir()):
        if not (root / MARKER).is_file():
            raise RuntimeError(f"{root} is not empty and holds no earlier demo's state ({MARKER}); nothing there is "
                               "moved or deleted: choose another --state-dir, or empty that directory")
        previous = root.with_name(root.name + ".previous")
        replaced = previous.exists()
        if replaced:
            if not (previous / MARKER).is_file():
                raise RuntimeError(f"{previous} exists and is not an earlier demo's state: move it away, or choose "
                                   "another --state-dir")
            shutil.rmtree(previous)
        root.rename(previous)
        console.print(f"moved the previous demo's state to {previous}"
                      + (" (replacing the one from the run before)" if replaced else ""))
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).write_text(json.dumps({"federation": FEDERATION, "started_at": time.time()}) + "\n")


def run_demo(opts: DemoOptions, console: Console | None = None) -> dict:
    """Run the whole federation; returns the summary figures (also shown as a table)."""
    console = console or Console()
    root = opts.state_dir
    try:
        prepare_state_dir(root, console)
    except OSError as e:
        raise RuntimeError(f"cannot use {root} as the demo's state dir ({e}); choose another --state-dir") from None
    console.print(f"keeping the federation's state in {root.resolve()}")
    broker: Broker | None = None
    procs: list[subprocess.Popen] = []
    started = time.monotonic()
    try:
        if opts.broker_url is None:
            broker = start_embedded_broker()
            console.print(f"started an embedded {broker.kind} broker at {broker.url}")
        url = opts.broker_url or broker.url
        mqtt_version = demo_mqtt_version(opts, broker)
        orchestrator, agents = heart_settings(url, root, opts, mqtt_version=mqtt_version)
        if opts.secure_aggregation:
            orchestrator, agents = with_secure_aggregation(orchestrator, agents, root / "pki")
            console.print("secure aggregation on: the orchestrator will see only the sum of the updates")
        procs.append(_spawn(["orchestrator", "run"], orchestrator, root / "orchestrator.log"))
        for agent in agents:
            procs.append(_spawn(["agent", "run"], agent, root / f"{agent.site_id}.log"))
        view = _watch(url, mqtt_version, opts, procs, console, started, root)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
        if broker is not None:
            broker.stop()
    summary = _summary(view, opts, time.monotonic() - started)
    _print_summary(summary, console)
    _print_next_steps(root, summary, console)
    return summary


def _watch(url: str, mqtt_version: str, opts: DemoOptions, procs: list[subprocess.Popen], console: Console,
           started: float, root: Path) -> FleetView:
    """Draw the federation as ``fedmq watch`` does, from the same topics, until it has finished."""
    orchestrator = procs[0]
    settings = CommonSettings(broker_url=url, federation=FEDERATION, mqtt_version=mqtt_version)
    with FleetReader(settings) as reader:
        view = reader.view

        def frame() -> Fitted:
            return watch_renderable(view, time.time(), header=f"fedmq demo · {time.monotonic() - started:.0f}s",
                                    names=HOSPITALS)

        finished_at: float | None = None
        with live_view(console, frame, screen=False) as draw:
            while True:
                reader.poll(0.25)
                draw()
                if view.finished() and view.final_summary() is not None:
                    # The sites' last acknowledgements arrive just after the orchestrator's end: wait
                    # for them, so that no site is left drawn mid-round ("uploading") in the final view.
                    finished_at = finished_at or time.monotonic()
                    if all(s.state not in ROUND_PHASES for s in view.sites.values()) \
                            or time.monotonic() - finished_at > SETTLE_SECONDS:
                        return view
                elif orchestrator.poll() is not None and reader.transport.inbox.empty():
                    if view.final_summary() is not None:
                        return view
                    raise RuntimeError(f"the orchestrator exited (code {orchestrator.returncode}) before the end; "
                                       f"see {root / 'orchestrator.log'}")
                for site, proc in zip(HOSPITALS, procs[1:]):
                    if proc.poll() is not None:
                        raise RuntimeError(f"the {site} agent exited (code {proc.returncode}); "
                                           f"see {root / (site + '.log')}")
                if time.monotonic() - started > opts.timeout:
                    raise RuntimeError(f"the demo did not finish within {opts.timeout:.0f}s; logs are in {root}")


def _summary(view: FleetView, opts: DemoOptions, wall: float) -> dict:
    final = view.final_summary()
    trained = [s for s in view.rounds() if s.new_version is not None]
    return {
        "rounds": len(trained),
        "final_model_version": final.evaluated_version if final else None,
        "pooled_test_accuracy": final.pooled.accuracy if final and final.pooled else None,
        "per_site_test_accuracy": {s: m.accuracy for s, m in final.site_metrics.items()} if final else {},
        "per_site_mean_accuracy": (sum(m.accuracy for m in final.site_metrics.values()) / len(final.site_metrics)
                                   if final and final.site_metrics else None),
        "accuracy_by_round": {s.round: s.pooled.accuracy for s in trained if s.pooled},
        "bytes_down": sum(s.bytes_down for s in view.rounds()),
        "bytes_up": sum(s.bytes_up for s in view.rounds()),
        "wall_seconds": round(wall, 2),
        "strategy": opts.strategy,
        "training": {"local_steps": opts.local_steps, "batch_size": opts.batch_size,
                     "learning_rate": opts.learning_rate},
    }


def _print_summary(summary: dict, console: Console) -> None:
    console.line()  # the live view's last frame may end without a newline when piped
    table = Table("figure", "value", title="federation summary")
    acc = summary["pooled_test_accuracy"]
    table.add_row("rounds", str(summary["rounds"]))
    table.add_row("final model version", str(summary["final_model_version"]))
    table.add_row("pooled test accuracy", f"{acc:.3f}" if acc is not None else "-")
    for site, a in summary["per_site_test_accuracy"].items():
        table.add_row(f"  {site}", f"{a:.3f}")
    table.add_row("bytes down / up", f"{size(summary['bytes_down'])} / {size(summary['bytes_up'])}")
    table.add_row("wall time", f"{summary['wall_seconds']:.1f} s")
    console.print(table)


def next_steps(root: Path, final_version: int | None) -> list[str]:
    """The commands that read what the demo left in ``root`` (its broker is gone, so not ``fedmq status``)."""
    orch = shlex.quote(str(root / "orchestrator"))
    return [f"fedmq report --state-dir {orch} --out fedmq-demo-report.html",
            f"fedmq models list --state-dir {orch}",
            f"fedmq models show {final_version or 0} --state-dir {orch}"]


def _print_next_steps(root: Path, summary: dict, console: Console) -> None:
    console.print(f"\nThe federation's state stays in {root} (registry, round journal, one log per process). "
                  "Try:", highlight=False, markup=False, soft_wrap=True)
    for command in next_steps(root, summary["final_model_version"]):
        console.print(f"  {command}", highlight=False, markup=False, soft_wrap=True)
    console.print("(`fedmq status` reads a live broker, and the demo's stopped with it: run `fedmq demo --broker URL` "
                  "against a broker of your own to keep one.)", highlight=False, markup=False, soft_wrap=True)
