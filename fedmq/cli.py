"""The ``fedmq`` command: demo, orchestrator, agent, fleet status and watch, Prometheus exporter, model registry,
report, PKI."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Literal, Optional

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.table import Table

from edge_agent.deploy import app as agent_deploy_app
from fedmq.pki_cli import app as pki_app

app = typer.Typer(help="Federated learning for hospitals over MQTT.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
orchestrator_app = typer.Typer(help="Run the orchestrator (round engine, aggregation, registry).",
                               no_args_is_help=True)
agent_app = typer.Typer(help="Run the edge agent at a hospital.", no_args_is_help=True)
models_app = typer.Typer(help="Read the model registry and create initial models.", no_args_is_help=True)
app.add_typer(orchestrator_app, name="orchestrator")
app.add_typer(agent_app, name="agent")
agent_app.add_typer(agent_deploy_app)  # fedmq agent deploy | status | remove
app.add_typer(models_app, name="models")
app.add_typer(pki_app, name="pki")

console = Console(stderr=True)

ConfigOption = typer.Option(None, "--config", "-c", help="TOML settings file (also FEDMQ_CONFIG).")
StateOption = typer.Option(None, "--state-dir", help="State directory (also FEDMQ_STATE_DIR).")
BrokerOption = typer.Option(None, "--broker", help="Broker URL mqtt://HOST:PORT or mqtts://... (FEDMQ_BROKER_URL).")


def setup_logging(level: str = "INFO") -> None:
    """Rich output on a terminal; one plain line per record otherwise (container logs, files)."""
    if console.is_terminal:
        handler: logging.Handler = RichHandler(console=console, show_path=False)
        fmt = "%(name)s: %(message)s"
    else:
        handler = logging.StreamHandler(sys.stderr)
        fmt = "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level.upper(), format=fmt, handlers=[handler], force=True)


def _fail(message: str) -> None:
    console.print(f"[red]error:[/red] {message}")
    raise typer.Exit(2)


def _stop_on_signals() -> threading.Event:
    """SIGTERM (container stop) and Ctrl-C end the loop cleanly, after the current step."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    return stop


def _serve(kind: str, settings_cls: type, service_cls: Callable, config: Optional[Path], **overrides: object) -> None:
    """Load settings (flags > env > file), then run the daemon until a signal stops it."""
    from pydantic import ValidationError

    from edge_agent.state import StateError
    from orchestrator.registry import RegistryError
    from shared.config import load_settings
    from shared.transport import TransportError

    try:
        settings = load_settings(settings_cls, config, **overrides)
    except (ValidationError, FileNotFoundError) as e:
        _fail(f"invalid {kind} settings: {e}")
    setup_logging(settings.log_level)
    try:
        service = service_cls(settings)
    except (TransportError, ValueError, RegistryError, StateError) as e:  # a bad broker URL, unusable TLS files,
        _fail(f"cannot start the {kind}: {e}")  # an inconsistent setting, a damaged state directory (says how to repair)
    try:
        # An unreachable broker is waited for inside run(); only a refusal retrying cannot fix ends up here.
        service.run(_stop_on_signals())
    except (TransportError, RegistryError, StateError) as e:
        _fail(str(e))


@orchestrator_app.command("run")
def orchestrator_run(config: Optional[Path] = ConfigOption, state_dir: Optional[Path] = StateOption,
                     broker: Optional[str] = BrokerOption,
                     federation: Optional[str] = typer.Option(None, help="Federation id (FEDMQ_FEDERATION)."),
                     rounds: Optional[int] = typer.Option(None, help="Training rounds (FEDMQ_ROUNDS)."),
                     exit_when_done: Optional[bool] = typer.Option(None, help="Exit after the last round.")) -> None:
    """Run rounds until the configured number is reached (then idle, or exit with --exit-when-done)."""
    from orchestrator.service import OrchestratorService
    from shared.config import OrchestratorSettings

    _serve("orchestrator", OrchestratorSettings, OrchestratorService, config, state_dir=state_dir, broker_url=broker,
           federation=federation, rounds=rounds, exit_when_done=exit_when_done)


@orchestrator_app.command("health")
def orchestrator_health(state_dir: Optional[Path] = StateOption) -> None:
    """Exit 0 when the registry is readable (container health check)."""
    from orchestrator.registry import ModelRegistry, RegistryError
    from shared.config import CommonSettings

    root = state_dir or CommonSettings().state_dir
    try:
        ModelRegistry.open(root).latest()
    except RegistryError as e:
        _fail(str(e))


@agent_app.command("run")
def agent_run(config: Optional[Path] = ConfigOption, state_dir: Optional[Path] = StateOption,
              broker: Optional[str] = BrokerOption,
              site_id: Optional[str] = typer.Option(None, help="This hospital's site id (FEDMQ_SITE_ID)."),
              data_train: Optional[Path] = typer.Option(None, help="Training CSV (FEDMQ_DATA_TRAIN)."),
              data_test: Optional[Path] = typer.Option(None, help="Test CSV (FEDMQ_DATA_TEST)."),
              federation: Optional[str] = typer.Option(None, help="Federation id (FEDMQ_FEDERATION).")) -> None:
    """Join the federation and follow the orchestrator's rounds until stopped."""
    from edge_agent.agent import EdgeAgent
    from shared.config import AgentSettings

    _serve("agent", AgentSettings, EdgeAgent, config, state_dir=state_dir, broker_url=broker, site_id=site_id,
           data_train=data_train, data_test=data_test, federation=federation)


@agent_app.command("health")
def agent_health(state_dir: Optional[Path] = StateOption,
                 max_age: float = typer.Option(60.0, help="Seconds after which the heartbeat is stale.")) -> None:
    """Exit 0 when the agent's heartbeat is fresh and it is connected (container health check)."""
    from shared.config import CommonSettings

    path = (state_dir or CommonSettings().state_dir) / "health.json"
    try:
        beat = json.loads(path.read_text())
        age = time.time() - float(beat["time"])
    except (OSError, ValueError, KeyError, TypeError):
        _fail(f"no readable heartbeat at {path}: is the agent running with this state directory?")
    if age > max_age:
        _fail(f"heartbeat is {age:.0f}s old: the agent is stuck or stopped; see its log")
    if not beat.get("connected"):
        _fail("the agent is not connected to the broker; check FEDMQ_BROKER_URL, TLS files and the network")
    typer.echo(f"ok: {beat.get('state')}, model v{beat.get('model_version')}")


@models_app.command("init")
def models_init(arch: str = typer.Option("logreg", help="Architecture: logreg, mlp or cnn."),
                out: Path = typer.Option(..., help="Where to write the ONNX file."),
                features: Optional[int] = typer.Option(None, help="Number of input features (logreg, mlp)."),
                outputs: int = typer.Option(1, help="Number of outputs (classes; 1 = binary probability)."),
                hidden: str = typer.Option("64", help="Hidden sizes for mlp, comma-separated."),
                opset: int = typer.Option(17, help="ONNX opset (17-21).")) -> None:
    """Create an initial global model as an ONNX file from a built-in torch definition."""
    from orchestrator.architectures import build_onnx

    try:
        data = build_onnx(arch, num_features=features, num_outputs=outputs,
                          hidden=tuple(int(h) for h in hidden.split(",") if h), opset=opset)
    except ValueError as e:
        _fail(str(e))
    out.write_bytes(data)
    typer.echo(f"wrote {out} ({len(data)} bytes)")


def _registry(state_dir: Optional[Path]):
    from orchestrator.registry import ModelRegistry, RegistryError
    from shared.config import CommonSettings

    try:
        return ModelRegistry.open(state_dir or CommonSettings().state_dir)
    except RegistryError as e:
        _fail(str(e))


def _acc(m) -> str:
    return f"{m.accuracy:.3f}" if m is not None and m.accuracy is not None else "-"


def _epsilon(privacy) -> str:
    return f"{privacy.epsilon:.3g}" if privacy is not None else "-"


@models_app.command("list")
def models_list(state_dir: Optional[Path] = StateOption) -> None:
    """Every global version with its lineage, pooled test accuracy and, for private versions, epsilon."""
    versions = _registry(state_dir).list()
    private = [v.privacy for v in versions if v.privacy is not None]
    columns = ["version", "round", "parent", "sha256", "sites", "pooled acc"]
    if private:
        deltas = {p.delta for p in private}
        columns.append(f"ε (δ={deltas.pop():g})" if len(deltas) == 1 else "ε")
    table = Table(*columns, "created")
    for v in versions:
        cells = [str(v.version), str(v.round or "-"), str(v.parent if v.parent is not None else "-"),
                 v.sha256[:12], ",".join(sorted(v.contributors)) or "-", _acc(v.pooled)]
        if private:
            cells.append(_epsilon(v.privacy))
        table.add_row(*cells, time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(v.created_at)))
    Console().print(table)


@models_app.command("show")
def models_show(version: int, state_dir: Optional[Path] = StateOption) -> None:
    """One version's full record as JSON; a private version's (epsilon, delta) under "privacy"."""
    from orchestrator.registry import RegistryError

    try:
        v = _registry(state_dir).get(version)
    except RegistryError as e:
        _fail(str(e))
    record = {k: getattr(v, k) for k in ("version", "sha256", "parent", "round", "created_at", "size",
                                         "contributors", "strategy", "training", "note")}
    record["evaluations"] = {s: m.model_dump() for s, m in v.evaluations.items()}
    record["pooled"] = v.pooled.model_dump() if v.pooled else None
    if v.privacy is not None:
        # What releasing this version (and every one before it) has cost: level, mechanism, epsilon at
        # delta over `steps` rounds, noise multiplier, clip norm, and the budget (max_epsilon) if any.
        record["privacy"] = v.privacy.model_dump()
    typer.echo(json.dumps(record, indent=2))


@models_app.command("export")
def models_export(version: int, path: Path, state_dir: Optional[Path] = StateOption) -> None:
    """Write a version's ONNX file (verified against its sha256) to PATH."""
    from orchestrator.registry import RegistryError
    from shared.blobstore import BlobStoreError

    try:
        data = _registry(state_dir).model_bytes(version)
    except (RegistryError, BlobStoreError) as e:
        _fail(str(e))
    path.write_bytes(data)
    typer.echo(f"wrote model v{version} to {path} ({len(data)} bytes)")


def _monitor_settings(config: Optional[Path], broker: Optional[str], federation: Optional[str]):
    """Broker, federation and TLS settings of a monitor (flags > env > file), as the daemons read theirs."""
    from pydantic import ValidationError

    from shared.config import CommonSettings, load_settings

    try:
        return load_settings(CommonSettings, config, broker_url=broker, federation=federation)
    except (ValidationError, FileNotFoundError) as e:
        _fail(f"invalid monitor settings: {e}")


FederationOption = typer.Option(None, "--federation", help="Federation id (FEDMQ_FEDERATION).")


@app.command()
def status(config: Optional[Path] = ConfigOption, broker: Optional[str] = BrokerOption,
           federation: Optional[str] = FederationOption,
           as_json: bool = typer.Option(False, "--json", help="Print a JSON document (its keys: FleetView.to_dict "
                                        "in fedmq/fleet.py)."),
           wait: float = typer.Option(3.0, "--wait", min=0.1, help="Seconds to wait for the retained state.")) -> None:
    """The fleet from the broker alone: every site's state, version, progress and last error.

    Exit code 0 when all is well; 1 when something is wrong (a site offline or in error, a
    critical alert, a failed round, the orchestrator offline); 2 when the broker cannot be reached.
    """
    from fedmq.fleet import read_snapshot
    from fedmq.watch import status_renderable
    from shared.transport import TransportError

    settings = _monitor_settings(config, broker, federation)
    try:
        view = read_snapshot(settings, wait=wait)
    except (TransportError, ValueError) as e:
        _fail(f"{e}")
    now = time.time()
    if as_json:
        typer.echo(json.dumps(view.to_dict(now), indent=2))
    else:
        Console().print(status_renderable(view, now))
    raise typer.Exit(1 if view.problems(now) else 0)


@app.command()
def watch(config: Optional[Path] = ConfigOption, broker: Optional[str] = BrokerOption,
          federation: Optional[str] = FederationOption,
          exit_when_finished: bool = typer.Option(False, "--exit-when-finished",
                                                  help="End when the federation has finished.")) -> None:
    """A live view of the fleet: sites, round progress, accuracy per round, alerts (q or Ctrl-C quits)."""
    from fedmq.watch import run_watch, terminal_console
    from shared.transport import TransportError

    settings = _monitor_settings(config, broker, federation)
    try:
        run_watch(settings, terminal_console(), exit_when_finished=exit_when_finished)
    except (TransportError, ValueError) as e:
        _fail(f"{e}")


@app.command()
def exporter(config: Optional[Path] = ConfigOption, broker: Optional[str] = BrokerOption,
             federation: Optional[str] = typer.Option(None, help="Federation id (FEDMQ_FEDERATION)."),
             listen: str = typer.Option("127.0.0.1:9464", help="HOST:PORT to serve /metrics on."),
             tls_ca: Optional[Path] = typer.Option(None, help="Federation CA certificate (FEDMQ_TLS_CA)."),
             tls_cert: Optional[Path] = typer.Option(None, help="Monitor certificate from `fedmq pki issue-monitor` "
                                                     "(FEDMQ_TLS_CERT)."),
             tls_key: Optional[Path] = typer.Option(None, help="Its key (FEDMQ_TLS_KEY).")) -> None:
    """Serve the federation's state as Prometheus metrics, read from the broker as a read-only monitor."""
    from functools import partial

    from fedmq.exporter import Exporter
    from shared.config import CommonSettings

    _serve("exporter", CommonSettings, partial(Exporter, listen=listen), config, broker_url=broker,
           federation=federation, tls_ca=tls_ca, tls_cert=tls_cert, tls_key=tls_key)


@app.command()
def report(state_dir: Optional[Path] = typer.Option(None, "--state-dir", help="The orchestrator's state directory "
                                                    "(also FEDMQ_STATE_DIR), or the demo's."),
           out: Path = typer.Option(Path("report.html"), help="Where to write the HTML page."),
           png_dir: Optional[Path] = typer.Option(None, help="Also write each plot as a PNG file here.")) -> None:
    """How the federation learned: one self-contained HTML page of plots and tables, from the state dir alone."""
    from fedmq.report import ReportError, write_report
    from shared.config import CommonSettings

    setup_logging("WARNING")
    try:
        write_report(state_dir or CommonSettings().state_dir, out, png_dir,
                     progress=lambda line: console.print(line, highlight=False, markup=False))
    except ReportError as e:
        _fail(str(e))


@app.command()
def demo(rounds: int = typer.Option(15, help="Training rounds."),
         broker: Optional[str] = typer.Option(None, help="Use this broker instead of starting one."),
         summary_json: Optional[Path] = typer.Option(None, help="Write the final figures here as JSON."),
         state_dir: Path = typer.Option(Path("fedmq-demo-state"), help="Keep the federation's state here; an "
                                        "earlier demo's state there is moved to DIR.previous."),
         learning_rate: float = typer.Option(0.005, help="Local SGD learning rate."),
         local_steps: int = typer.Option(100, help="Local SGD steps per round."),
         batch_size: int = typer.Option(4, help="Local batch size."),
         strategy: str = typer.Option("fedavg", help="Aggregation strategy."),
         secure_aggregation: bool = typer.Option(False, help="Sum the updates under secure aggregation: the "
                                                  "orchestrator sees only their sum."),
         mqtt_version: Optional[Literal["3.1.1", "5"]] = typer.Option(
             None, help="MQTT version of every process (default 5; 3.1.1 for a broker that speaks only that, such "
             "as Debian's RabbitMQ 3.10, and for the embedded amqtt fallback).")) -> None:
    """Four hospitals (Heart Disease) federate a logistic regression with FedAvg, live."""
    from fedmq.demo import DemoOptions, run_demo

    setup_logging("WARNING")
    try:
        summary = run_demo(DemoOptions(rounds=rounds, broker_url=broker, state_dir=state_dir,
                                       learning_rate=learning_rate, local_steps=local_steps, batch_size=batch_size,
                                       strategy=strategy, secure_aggregation=secure_aggregation,
                                       mqtt_version=mqtt_version))
    except RuntimeError as e:
        _fail(str(e))
    if summary_json is not None:
        summary_json.write_text(json.dumps(summary, indent=2))
        console.print(f"summary written to {summary_json}")


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
