"""``fedmq status``: the fleet read from the broker alone, classified as up, error or offline.

The classification rules (stale heartbeats, last wills, schema-1 agents) are checked on
messages built here; the command itself runs against a real federation over Mosquitto:
sites up with their versions (exit 0), an agent killed (its last will: offline, exit 1),
a site whose CSV lacks a column (error with its code and what to do, exit 1), an
unreachable broker (exit 2).
"""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path

from rich.console import Console
from rich.text import Text
from typer.testing import CliRunner

from edge_agent.agent import AGENT_VERSION
from fedmq.cli import app
from fedmq.demo import DATA_DIR, DemoOptions, heart_settings
from fedmq.fleet import FleetView
from fedmq.inprocess import run_federation
from fedmq.watch import live_view, status_renderable
from shared.protocol import (Alert, AlertState, EvalMetrics, ErrorInfo, OrchestratorStatus, RoundProgress,
                             RoundSummary, SiteStatus, parse_message)

FED = "fleet-status"
NOW = 1_800_000_000.0


def _site(site: str, state: str = "idle", **fields) -> SiteStatus:
    return SiteStatus(federation=FED, sender=site, state=state, agent_version="9.9", **fields)


def _orchestrator(**fields) -> OrchestratorStatus:
    return OrchestratorStatus(federation=FED, sender="orchestrator", state="collecting", round=4, rounds_total=20,
                              model_version=3, selected=["a", "b"], **fields)


def _view(*messages) -> FleetView:
    view = FleetView(FED)
    for m in messages:
        assert view.apply(parse_message(m.to_bytes()))  # through the wire format, as a monitor gets them
    return view


# -- classification -----------------------------------------------------------------------------

def test_a_stale_heartbeat_is_offline_and_a_fresh_one_up() -> None:
    view = _view(_orchestrator(), _site("a", "training", heartbeat_at=NOW - 31, heartbeat_seconds=10),
                 _site("b", "training", heartbeat_at=NOW - 29, heartbeat_seconds=10))
    a, b = view.site_rows(NOW)
    assert (a.health, a.stale, b.health, b.stale) == ("offline", True, "up", False)
    assert view.problems(NOW) == ["site a: its heartbeat stopped; check the agent's host or container "
                                  "(fedmq agent status) and its network to the broker"]


def test_an_error_is_reported_with_its_code_and_action() -> None:
    err = ErrorInfo.of("data.invalid", "the training CSV lacks the column 'age'", "r4")
    same = Alert(id="site_error:b", kind="site_error", severity="critical", site="b", message="site b is in error",
                 action=err.action, since=NOW)
    view = _view(_orchestrator(), _site("a", heartbeat_at=NOW, heartbeat_seconds=10),
                 _site("b", "error", heartbeat_at=NOW, heartbeat_seconds=10, last_error=err),
                 AlertState(federation=FED, sender="orchestrator", alerts=[same]))
    rows = {r.site: r for r in view.site_rows(NOW)}
    assert rows["b"].health == "error" and rows["a"].health == "up"
    assert view.problems(NOW) == [f"site b is in error [data.invalid]: the training CSV lacks the column 'age'; "
                                  f"{err.action}"]  # once: the alert repeating it is not listed again
    doc = view.to_dict(NOW)
    assert doc["ok"] is False and doc["sites"][1]["last_error"]["code"] == "data.invalid"


def test_a_last_will_gives_only_a_lower_bound_of_the_last_sighting() -> None:
    view = _view(_orchestrator(), _site("a", "training", heartbeat_at=NOW - 50, heartbeat_seconds=10,
                                        connected_at=NOW - 500, model_version=6, active_model_version=6))
    will = _site("a", "offline", connected_at=NOW - 500, model_version=2)  # built at connect time: no heartbeat
    view.apply(parse_message(will.to_bytes()))
    row = view.site_row("a", NOW)
    assert (row.health, row.last_seen, row.last_seen_exact) == ("offline", NOW - 50, False)
    assert row.model_version == 6  # the last version it was seen running, not the one it had when it connected
    # A monitor that saw only the will knows the agent was alive when it connected, or later.
    alone = _view(_orchestrator(), will).site_row("a", NOW)
    assert (alone.last_seen, alone.last_seen_exact) == (NOW - 500, False)


def test_a_schema_1_agent_and_a_newer_one_are_both_read() -> None:
    old = {"protocol": 1, "msg_id": "0123456789ab", "federation": FED, "sender": "a", "sent_at": NOW - 5,
           "type": "status", "state": "idle", "agent_version": "0.0.9", "model_version": 2, "round_id": None,
           "num_samples": 120, "detail": ""}
    newer = {**old, "sender": "b", "schema_version": 3, "heartbeat_at": NOW - 1, "heartbeat_seconds": 10,
             "active_model_version": 3, "a_field_of_the_future": {"x": 1}}
    view = FleetView(FED)
    for raw in (old, newer):
        view.apply(parse_message(json.dumps(raw).encode()))
    a, b = view.to_dict(NOW)["sites"]
    assert (a["health"], a["schema_version"], a["active_model_version"], a["rows_train"]) == ("up", 1, 2, 120)
    assert (a["last_seen"], a["progress"], a["last_error"]) == (NOW - 5, None, None)
    assert (b["health"], b["schema_version"], b["active_model_version"]) == ("up", 3, 3)


def test_critical_alerts_and_a_missing_orchestrator_are_problems() -> None:
    alert = Alert(id="round_failed:4", kind="round_failed", severity="critical", message="round 4 failed",
                  action="check the sites' logs", since=NOW - 3)
    view = _view(_site("a", heartbeat_at=NOW, heartbeat_seconds=10),
                 AlertState(federation=FED, sender="orchestrator", alerts=[alert]))
    problems = view.problems(NOW)
    assert problems[0].startswith(f"no orchestrator status on the broker for federation '{FED}'")
    assert problems[1] == "alert round_failed:4: round 4 failed; check the sites' logs"
    warning = alert.model_copy(update={"id": "disk_low:a", "kind": "disk_low", "severity": "warning"})
    calm = _view(_orchestrator(), _site("a", heartbeat_at=NOW, heartbeat_seconds=10),
                 AlertState(federation=FED, sender="orchestrator", alerts=[warning]))
    assert calm.problems(NOW) == [] and calm.to_dict(NOW)["alerts"][0]["id"] == "disk_low:a"


def test_piped_status_is_readable_at_80_columns() -> None:
    progress = RoundProgress(round_id="r4", round=4, rounds_total=20, phase="training", steps_done=40,
                             steps_total=100)
    summary = RoundSummary(federation=FED, sender="orchestrator", round=4, evaluated_version=3, new_version=4,
                           site_metrics={"a": EvalMetrics(num_examples=10, loss=0.5, accuracy=0.8)},
                           pooled=EvalMetrics(num_examples=10, loss=0.5, accuracy=0.8), bytes_down=10, bytes_up=20)
    view = _view(_orchestrator(), _site("a", "training", heartbeat_at=NOW, heartbeat_seconds=10, progress=progress),
                 _site("b", "error", heartbeat_at=NOW, heartbeat_seconds=10,
                       last_error=ErrorInfo.of("training.failed", "loss is NaN", "r4")), summary)
    out = io.StringIO()
    console = Console(file=out, width=80)  # a pipe: not a terminal
    assert not console.is_terminal
    console.print(status_renderable(view, NOW))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    text = out.getvalue()
    assert "round 4 of 20" in text and "(40%)" in text and "training.failed" in text
    assert "v3" in text and "0.800" in text  # the summary's row names the version it evaluated
    for title in ("sites", "accuracy by version"):  # a title alone on its line, right above a top border
        at = [i for i, line in enumerate(lines) if line.strip() == title]
        assert at and lines[at[0] + 1].lstrip().startswith("┏"), text


def test_piped_live_view_ends_its_last_line() -> None:
    """rich prints a piped Live's last frame without a newline: the next output was glued to it."""
    out = io.StringIO()
    console = Console(file=out, width=60)
    with live_view(console, lambda: Text("last frame"), screen=False) as draw:
        draw()
    console.print("next")
    assert out.getvalue().splitlines()[-2:] == ["last frame", "next"]


# -- the command against a real federation -------------------------------------------------------

def _status(url: str, federation: str, *extra: str) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["status", "--json", "--broker", url, "--federation", federation,
                                      "--wait", "2", *extra])
    assert result.exit_code in (0, 1), result.output
    return result.exit_code, json.loads(result.stdout)


def _until(url: str, federation: str, check, timeout: float) -> tuple[int, dict, float]:
    """Run status until ``check(doc)`` holds; (exit code, document, seconds it took)."""
    start = time.monotonic()
    while True:
        code, doc = _status(url, federation)
        if check(doc):
            return code, doc, time.monotonic() - start
        assert time.monotonic() - start < timeout, json.dumps(doc, indent=1)
        time.sleep(0.2)


def _sites(doc: dict) -> dict[str, dict]:
    return {s["site"]: s for s in doc["sites"]}


def _without_column(source: Path, column: str, target: Path) -> Path:
    with source.open() as f:
        rows = list(csv.DictReader(f))
    with target.open("w", newline="") as f:
        writer = csv.DictWriter(f, [c for c in rows[0] if c != column])
        writer.writeheader()
        writer.writerows({k: v for k, v in row.items() if k != column} for row in rows)
    return target


def test_status_shows_sites_up_then_a_killed_agent_offline_then_a_site_in_error(mosquitto, tmp_path):
    federation, keepalive = "status-cli", 5
    orch, agents = heart_settings(mosquitto.url, tmp_path, DemoOptions(rounds=1000, local_steps=20),
                                  sites=("cleveland", "va", "hungary"))
    common = {"federation": federation, "keepalive": keepalive}
    orch = orch.model_copy(update={**common, "min_sites": 2, "quorum": 1, "round_timeout": 5.0,
                                   "exit_when_done": False})
    cleveland, va, hungary = [a.model_copy(update={**common, "heartbeat_seconds": 2.0}) for a in agents]
    with run_federation(orch, [cleveland, va]) as fed:
        code, doc, _ = _until(mosquitto.url, federation, lambda d: len(d["sites"]) == 2 and all(
            s["health"] == "up" and s["active_model_version"] is not None for s in d["sites"]), 60)
        assert code == 0 and doc["ok"] and doc["problems"] == []
        for site in doc["sites"]:
            assert site["agent_version"] == AGENT_VERSION and site["last_seen_exact"]
            assert site["data"]["rows_train"] > 0 and site["data"]["label_counts"]
        assert doc["orchestrator"]["rounds_total"] == 1000 and doc["orchestrator"]["state"] != "offline"

        fed.agents["va"].transport.stop(graceful=False)  # a killed process: the broker publishes its last will
        fed.stop("va")
        code, doc, _ = _until(mosquitto.url, federation, lambda d: _sites(d)["va"]["health"] == "offline",
                                 1.5 * keepalive + 5)
        va_row = _sites(doc)["va"]
        assert code == 1 and not doc["ok"] and any(p.startswith("site va:") for p in doc["problems"])
        assert va_row["state"] == "offline" and not va_row["last_seen_exact"] and va_row["last_seen"] is not None
        assert _sites(doc)["cleveland"]["health"] == "up"

        bad = _without_column(DATA_DIR / "hungary_train.csv", "age", tmp_path / "hungary_bad.csv")
        fed.start_agent(hungary.model_copy(update={"data_train": bad}))
        code, doc, _ = _until(mosquitto.url, federation, lambda d: _sites(d).get("hungary", {}).get("health")
                              == "error", 60)
        error = _sites(doc)["hungary"]["last_error"]
        assert code == 1 and error["code"] == "data.invalid" and error["action"]
        assert str(tmp_path) not in error["message"]  # no local paths leave the hospital
        assert any(p.startswith("site hungary is in error [data.invalid]") for p in doc["problems"])


def test_status_says_what_to_check_when_the_broker_is_unreachable(tmp_path):
    result = CliRunner().invoke(app, ["status", "--broker", "mqtt://127.0.0.1:1", "--federation", FED])
    assert result.exit_code == 2
    assert "cannot reach the MQTT broker at mqtt://127.0.0.1:1" in result.output
    assert "FEDMQ_BROKER_URL" in result.output
