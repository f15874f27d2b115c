"""Robust aggregation end to end: one of five sites sends a hostile update over MQTT.

Five hospitals share one labelling rule (a line in the plane) but see different parts of
the plane. One of them is hostile: it trains honestly, then multiplies its update by 100
(a boosted update) or by -10 (a sign flip) before sending it -- a subclass of the real
agent that overrides only ``_encode_update``, so everything else (protocol, acks,
evaluation) is the real thing. Every federation runs against the session's Mosquitto; all
of them run at once (distinct federation ids) and the tests compare their final versions
with a clean FedAvg run of the same data and seeds:

* plain FedAvg is dragged far away (boosted) or into the wrong half-plane (sign flip);
* median, trimmed mean (trim 0.2: with five sites one value is cut at each end) and norm
  bounding (max_norm set) end close to the clean run, with the hostile update accepted,
  not refused.

The coordinate-wise rules' unit tests are in ``tests/test_strategies.py``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np
import pytest

from edge_agent.agent import EdgeAgent
from fedmq.inprocess import run_federation
from orchestrator.architectures import build_onnx
from orchestrator.registry import ModelRegistry
from shared.config import AgentSettings, OrchestratorSettings
from shared.onnx_model import float_initializers, load_model_bytes
from shared.protocol import TrainingConfig

SITES = ("site-a", "site-b", "site-c", "site-d", "site-e")
HOSTILE = "site-e"
ROUNDS = 3
TRUE_W, TRUE_B = np.array([1.5, -1.0]), 0.25
# Each site sees its own region of the plane (covariate shift), so honest updates differ.
CENTERS = {"site-a": (-1.0, -1.0), "site-b": (1.0, 1.0), "site-c": (-1.0, 1.0), "site-d": (1.0, -1.0),
           "site-e": (0.0, 0.0)}
TRAINING = TrainingConfig(local_steps=20, batch_size=16, learning_rate=0.5, loss="bce", seed=7)
MAX_NORM = 1.0
ATTACKS = {"boosted": 100.0, "flipped": -10.0}
ROBUST = {"median": {}, "trimmed_mean": {"trim_fraction": 0.2}, "norm_bounding": {"max_norm": MAX_NORM}}


class HostileAgent(EdgeAgent):
    """Trains like everyone else, then sends its update multiplied by ``factor``."""

    factor = 1.0

    def _encode_update(self, delta: dict, cmd) -> bytes:
        return super()._encode_update({k: (v * self.factor).astype(np.float32) for k, v in delta.items()}, cmd)


def _write_site(path: Path, center: tuple[float, float], rng: np.random.Generator, n: int) -> None:
    x = rng.normal(center, 1.0, size=(n, 2))
    y = (x @ TRUE_W + TRUE_B > 0).astype(int)
    path.write_text("x1,x2,label\n" + "".join(f"{a:.6f},{b:.6f},{c}\n" for (a, b), c in zip(x, y)))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("robust-data")
    rng = np.random.default_rng(2024)
    for site in SITES:
        _write_site(root / f"{site}_train.csv", CENTERS[site], rng, 80)
        _write_site(root / f"{site}_test.csv", CENTERS[site], rng, 40)
    return root


@pytest.fixture(scope="module")
def initial_model(data_dir) -> Path:
    # Built once, here: torch's ONNX exporter keeps process-global state, so orchestrators
    # starting in parallel threads must not each export their own initial model.
    path = data_dir / "initial.onnx"
    path.write_bytes(build_onnx("logreg", num_features=2, num_outputs=1, seed=0))
    return path


def _settings(url: str, root: Path, data: Path, initial: Path, federation: str,
              strategy: dict) -> tuple[OrchestratorSettings, list[AgentSettings]]:
    common = {"broker_url": url, "federation": federation}
    orch = OrchestratorSettings(
        **common, state_dir=root / "orchestrator", rounds=ROUNDS, min_sites=len(SITES), task_features=["x1", "x2"],
        task_label="label", standardize=False, initial_model=initial, training=TRAINING, strategy=strategy,
        round_timeout=60.0)
    agents = [AgentSettings(**common, site_id=s, state_dir=root / s, data_train=data / f"{s}_train.csv",
                            data_test=data / f"{s}_test.csv") for s in SITES]
    return orch, agents


@pytest.fixture(scope="module")
def outcomes(mosquitto, data_dir, initial_model, tmp_path_factory) -> dict[tuple[str, str], dict]:
    """Run the clean federation and every (strategy, attack) pair at once; final weights and accuracy of each."""
    cases = [("fedavg", "clean")] + [(name, attack) for name in ["fedavg", *ROBUST] for attack in ATTACKS]
    started = time.monotonic()
    feds = {}
    with contextlib.ExitStack() as stack:
        for name, attack in cases:
            federation = f"robust-{name.replace('_', '-')}-{attack}-{int(time.time() * 1000) % 10**7}"
            root = tmp_path_factory.mktemp(f"robust-{name}-{attack}")
            strategy = {"name": name, "options": ROBUST.get(name, {})}
            orch, agents = _settings(mosquitto.url, root, data_dir, initial_model, federation, strategy)
            honest = [a for a in agents if attack == "clean" or a.site_id != HOSTILE]
            fed = stack.enter_context(run_federation(orch, honest))
            if attack != "clean":
                hostile = HostileAgent(next(a for a in agents if a.site_id == HOSTILE))
                hostile.factor = ATTACKS[attack]
                fed.agents[HOSTILE] = hostile
                fed._start(HOSTILE, hostile.run)
            feds[(name, attack)] = (fed, orch)
        for fed, _ in feds.values():
            fed.wait_finished(timeout=max(10.0, 150 - (time.monotonic() - started)))
    results = {}
    for case, (fed, orch) in feds.items():
        registry = ModelRegistry.open(orch.state_dir)
        final = registry.get(ROUNDS)
        weights = float_initializers(load_model_bytes(registry.model_bytes(ROUNDS)))
        results[case] = {
            "w": np.concatenate([weights["linear.weight"].ravel(), weights["linear.bias"].ravel()]).astype(np.float64),
            "accuracy": final.pooled.accuracy, "contributors": [set(registry.get(v).contributors)
                                                                for v in range(1, ROUNDS + 1)],
            "strategy": final.strategy}
        registry.conn.close()
    return results


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _distance(results: dict, case: tuple[str, str]) -> float:
    """Euclidean distance between a run's final weights and the clean run's."""
    clean = results[("fedavg", "clean")]["w"]
    return float(np.linalg.norm(results[case]["w"] - clean))


def test_clean_federation_learns_the_rule(outcomes):
    clean = outcomes[("fedavg", "clean")]
    assert clean["accuracy"] >= 0.9, clean
    # The boundary it found points the same way as the true one.
    assert _cosine(clean["w"][:2], TRUE_W) > 0.9


@pytest.mark.parametrize("attack", list(ATTACKS))
def test_fedavg_is_dragged_away_by_one_hostile_site(outcomes, attack):
    clean = outcomes[("fedavg", "clean")]
    hit = outcomes[("fedavg", attack)]
    assert all(c == set(SITES) for c in hit["contributors"]), "the hostile update must have been aggregated"
    scale = np.linalg.norm(clean["w"])
    assert _distance(outcomes, ("fedavg", attack)) > 3 * scale, (hit["w"], clean["w"])
    if attack == "flipped":
        assert hit["accuracy"] < 0.5, hit["accuracy"]
        # The model was pushed into the opposite half-plane.
        assert _cosine(hit["w"][:2], clean["w"][:2]) < 0


@pytest.mark.parametrize("attack", list(ATTACKS))
@pytest.mark.parametrize("strategy", list(ROBUST))
def test_robust_strategy_stays_on_track(outcomes, strategy, attack):
    clean = outcomes[("fedavg", "clean")]
    run = outcomes[(strategy, attack)]
    assert run["strategy"]["name"] == strategy
    assert all(c == set(SITES) for c in run["contributors"]), "robustness must come from aggregation, not refusal"
    # Still a good classifier, with the clean run's boundary direction ...
    assert run["accuracy"] >= max(0.85, clean["accuracy"] - 0.1), (run["accuracy"], clean["accuracy"])
    assert _cosine(run["w"][:2], clean["w"][:2]) > 0.95, (run["w"], clean["w"])
    # ... and weights near the clean run's, far nearer than FedAvg's under the same attack.
    distance = _distance(outcomes, (strategy, attack))
    assert distance < 0.75 * np.linalg.norm(clean["w"]), (strategy, attack, run["w"], clean["w"])
    assert distance < 0.25 * _distance(outcomes, ("fedavg", attack)), (run["w"], outcomes[("fedavg", attack)]["w"])
