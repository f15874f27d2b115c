"""The ``fedmq`` command: creating models and reading the registry, through typer's CliRunner."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
from typer.testing import CliRunner

from fedmq.cli import app
from fedmq.demo import DATA_DIR
from orchestrator.architectures import build_onnx
from orchestrator.registry import ModelRegistry, open_database
from shared.blobstore import BlobStore
from shared.broker import Broker
from shared.onnx_model import load_model_bytes
from shared.protocol import EvalMetrics, PrivacySpent


pytestmark = pytest.mark.usefixtures("no_fedmq_env")


@pytest.fixture(scope="module")
def models() -> list[bytes]:
    return [build_onnx("logreg", num_features=13, num_outputs=1, seed=s) for s in (0, 1)]


@pytest.fixture()
def state_dir(tmp_path: Path, models: list[bytes]) -> Path:
    root = tmp_path / "orch-state"
    conn = open_database(root / "orchestrator.sqlite")
    registry = ModelRegistry(conn, BlobStore(root / "blobs"))
    with conn:
        registry.add_version(models[0], parent=None, round=None, contributors={}, strategy={"name": "fedavg"},
                             training={"local_steps": 10}, note="initial")
        registry.add_version(models[1], parent=0, round=1, contributors={"cleveland": 199, "va": 85},
                             strategy={"name": "fedavg"}, training={"local_steps": 10})
        registry.record_evaluation(0, "cleveland", EvalMetrics(num_examples=104, loss=0.6, accuracy=0.75, correct=78))
        registry.record_evaluation(0, "va", EvalMetrics(num_examples=45, loss=0.7, accuracy=0.6, correct=27))
    conn.close()
    return root


def _run(*args: str):
    return CliRunner().invoke(app, [str(a) for a in args])


def test_models_init_writes_a_loadable_onnx(tmp_path: Path) -> None:
    out = tmp_path / "init.onnx"
    result = _run("models", "init", "--arch", "logreg", "--features", "13", "--out", out)
    assert result.exit_code == 0, result.output
    data = out.read_bytes()
    assert f"wrote {out} ({len(data)} bytes)" in result.stdout
    load_model_bytes(data)
    session = onnxruntime.InferenceSession(data, providers=["CPUExecutionProvider"])
    (prob,) = session.run(None, {session.get_inputs()[0].name: np.zeros((3, 13), np.float32)})
    assert prob.shape[0] == 3 and np.all((prob >= 0) & (prob <= 1))
    # canonical: the same arguments give the same file
    assert data == build_onnx("logreg", num_features=13, num_outputs=1)


def test_models_init_bad_arguments_are_reported(tmp_path: Path) -> None:
    out = tmp_path / "x.onnx"
    result = _run("models", "init", "--arch", "logreg", "--features", "13", "--opset", "3", "--out", out)
    assert result.exit_code != 0
    assert "opset must be in" in result.stderr
    assert not out.exists()


def test_models_list(state_dir: Path, models: list[bytes]) -> None:
    result = CliRunner(env={"COLUMNS": "200"}).invoke(app, ["models", "list", "--state-dir", str(state_dir)])
    assert result.exit_code == 0, result.output
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in result.stdout.splitlines()
            if line.startswith("│")]
    assert [row[:3] for row in rows] == [["0", "-", "-"], ["1", "1", "0"]], result.stdout
    assert [row[3] for row in rows] == [hashlib.sha256(m).hexdigest()[:12] for m in models]
    assert rows[1][4] == "cleveland,va"
    assert rows[0][5] == "0.705"  # pooled accuracy of v0: (78 + 27) / (104 + 45), not the mean of 0.75 and 0.6
    assert rows[1][5] == "-"


def test_models_show(state_dir: Path, models: list[bytes]) -> None:
    result = _run("models", "show", "0", "--state-dir", state_dir)
    assert result.exit_code == 0, result.output
    record = json.loads(result.stdout)
    assert record["version"] == 0 and record["parent"] is None and record["note"] == "initial"
    assert record["sha256"] == hashlib.sha256(models[0]).hexdigest()
    assert record["size"] == len(models[0])
    assert record["evaluations"]["va"]["correct"] == 27
    assert record["pooled"]["num_examples"] == 149 and record["pooled"]["correct"] == 105

    record1 = json.loads(_run("models", "show", "1", "--state-dir", state_dir).stdout)
    assert record1["contributors"] == {"cleveland": 199, "va": 85} and record1["round"] == 1
    assert record1["pooled"] is None


PRIVATE_EPSILONS = (4.2134, 6.0579)


@pytest.fixture()
def private_state_dir(tmp_path: Path, models: list[bytes]) -> Path:
    """v0 initial, v1 and v2 released by dp_fedavg, each with what it has spent so far."""
    root = tmp_path / "private-state"
    conn = open_database(root / "orchestrator.sqlite")
    registry = ModelRegistry(conn, BlobStore(root / "blobs"))
    with conn:
        registry.add_version(models[0], parent=None, round=None, contributors={}, strategy={"name": "dp_fedavg"},
                             training={"local_steps": 10}, note="initial")
        for round_, (model, epsilon) in enumerate(zip((models[1], models[0]), PRIVATE_EPSILONS, strict=True), 1):
            privacy = PrivacySpent(level="client", mechanism="dp_fedavg/distributed", epsilon=epsilon, delta=1e-5,
                                   steps=round_, noise_multiplier=1.3, sampling_rate=1.0, clip_norm=0.75,
                                   max_epsilon=8.0)
            registry.add_version(model, parent=round_ - 1, round=round_, contributors={"cleveland": 199, "va": 85},
                                 strategy={"name": "dp_fedavg"}, training={"dp_clip_norm": 0.75}, privacy=privacy)
    conn.close()
    return root


def test_models_show_prints_the_privacy_record(private_state_dir: Path) -> None:
    result = _run("models", "show", "2", "--state-dir", private_state_dir)
    assert result.exit_code == 0, result.output
    assert "6.0579" in result.stdout
    privacy = json.loads(result.stdout)["privacy"]
    assert privacy == {"level": "client", "mechanism": "dp_fedavg/distributed", "epsilon": 6.0579, "delta": 1e-5,
                       "steps": 2, "noise_multiplier": 1.3, "sampling_rate": 1.0, "clip_norm": 0.75,
                       "max_epsilon": 8.0}


def test_models_show_prints_no_privacy_section_without_one(private_state_dir: Path, state_dir: Path) -> None:
    for root, version in ((private_state_dir, "0"), (state_dir, "1")):  # the initial model; a plain FedAvg version
        result = _run("models", "show", version, "--state-dir", root)
        assert result.exit_code == 0, result.output
        assert "privacy" not in json.loads(result.stdout) and "epsilon" not in result.stdout


def test_models_list_shows_epsilon_only_when_a_version_has_one(private_state_dir: Path, state_dir: Path) -> None:
    runner = CliRunner(env={"COLUMNS": "200"})
    result = runner.invoke(app, ["models", "list", "--state-dir", str(private_state_dir)])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    header = next(line for line in lines if "version" in line)
    rows = [[cell.strip() for cell in line.split("│")[1:-1]] for line in lines if line.startswith("│")]
    headings = [cell.strip() for cell in header.split("┃")[1:-1]]
    assert headings[5:] == ["pooled acc", "ε (δ=1e-05)", "created"], result.stdout
    assert [row[6] for row in rows] == ["-", "4.21", "6.06"], result.stdout

    plain = runner.invoke(app, ["models", "list", "--state-dir", str(state_dir)])
    assert plain.exit_code == 0 and "ε" not in plain.stdout and "pooled acc" in plain.stdout


def test_models_export(state_dir: Path, models: list[bytes], tmp_path: Path) -> None:
    out = tmp_path / "v1.onnx"
    result = _run("models", "export", "1", out, "--state-dir", state_dir)
    assert result.exit_code == 0, result.output
    assert hashlib.sha256(out.read_bytes()).hexdigest() == hashlib.sha256(models[1]).hexdigest()


def test_models_export_refuses_a_corrupted_file(state_dir: Path, models: list[bytes], tmp_path: Path) -> None:
    sha = hashlib.sha256(models[1]).hexdigest()
    BlobStore(state_dir / "blobs").path(sha).write_bytes(b"not the model")
    out = tmp_path / "v1.onnx"
    result = _run("models", "export", "1", out, "--state-dir", state_dir)
    assert result.exit_code != 0
    assert "corrupted" in result.stderr
    assert not out.exists()


def test_models_show_unknown_version_names_the_latest(state_dir: Path) -> None:
    result = _run("models", "show", "99", "--state-dir", state_dir)
    assert result.exit_code != 0
    assert "model version 99 does not exist (latest is 1)" in result.stderr


def test_models_commands_without_a_registry(tmp_path: Path) -> None:
    result = _run("models", "list", "--state-dir", tmp_path / "empty")
    assert result.exit_code != 0
    assert "no registry at" in result.stderr and "--state-dir" in result.stderr


def _heartbeat(root: Path, *, age: float = 0.0, connected: bool = True) -> None:
    root.mkdir(parents=True, exist_ok=True)
    (root / "health.json").write_text(json.dumps({"time": time.time() - age, "connected": connected,
                                                  "state": "idle", "model_version": 3}))


def test_agent_health_without_heartbeat(tmp_path: Path) -> None:
    result = _run("agent", "health", "--state-dir", tmp_path / "agent")
    assert result.exit_code != 0
    assert "no readable heartbeat at" in result.stderr
    assert "is the agent running with this state directory?" in result.stderr


def test_agent_health_states(tmp_path: Path) -> None:
    root = tmp_path / "agent"
    _heartbeat(root)
    ok = _run("agent", "health", "--state-dir", root)
    assert ok.exit_code == 0 and "ok: idle, model v3" in ok.stdout

    _heartbeat(root, age=600)
    stale = _run("agent", "health", "--state-dir", root, "--max-age", "60")
    assert stale.exit_code != 0 and "stuck or stopped" in stale.stderr

    _heartbeat(root, connected=False)
    offline = _run("agent", "health", "--state-dir", root)
    assert offline.exit_code != 0 and "not connected to the broker" in offline.stderr


def test_agent_process_runs_on_its_configured_threads_and_idles_without_onnxruntime(mosquitto: Broker,
                                                                                   tmp_path: Path) -> None:
    """``fedmq agent run`` applies torch_threads at start (default 1); onnxruntime waits for the first scoring."""
    more_than_cores = (os.cpu_count() or 1) + 1  # never torch's own default, so only the setting can give it
    agents = {"default": {}, "configured": {"FEDMQ_TORCH_THREADS": str(more_than_cores)}}
    procs = {}
    for name, extra in agents.items():
        env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")} | extra | {
            "FEDMQ_BROKER_URL": mosquitto.url, "FEDMQ_FEDERATION": f"threads-{os.getpid()}", "FEDMQ_SITE_ID": name,
            "FEDMQ_STATE_DIR": str(tmp_path / name), "FEDMQ_DATA_TRAIN": str(DATA_DIR / "cleveland_train.csv")}
        procs[name] = subprocess.Popen([sys.executable, "-m", "fedmq", "agent", "run"], env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        for name, proc in procs.items():
            health = tmp_path / name / "health.json"
            while not (health.exists() and json.loads(health.read_text() or "{}").get("connected")):
                assert proc.poll() is None and time.monotonic() < deadline, f"agent {name} did not connect"
                time.sleep(0.2)
            maps = Path(f"/proc/{proc.pid}/maps").read_text()
            assert "libtorch" in maps and "onnxruntime" not in maps, f"agent {name} loaded onnxruntime while idle"
    finally:
        for proc in procs.values():
            proc.terminate()
    logs = {name: proc.communicate(timeout=30)[0] for name, proc in procs.items()}
    assert "training and scoring on 1 intra-op / 1 inter-op torch thread(s) (setting torch_threads=1)" \
        in logs["default"], logs["default"]
    assert (f"training and scoring on {more_than_cores} intra-op / {more_than_cores} inter-op torch thread(s) "
            f"(setting torch_threads={more_than_cores})") in logs["configured"], logs["configured"]
