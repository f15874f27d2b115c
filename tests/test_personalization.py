"""Personalization end to end over a real Mosquitto: local fine-tuning and FedBN.

* Local fine-tuning (``TrainingConfig.finetune_steps``): on the Heart Disease federation
  every site reports, each round, how its own fine-tuned variant of the global version
  scores on its test set; the orchestrator publishes these in the ``RoundSummary`` and the
  registry keeps them per version. Fine-tuning affects only that evaluation: the global
  versions equal those of the same federation without it.
* FedBN (``OrchestratorSettings.fedbn``): on a small CNN with BatchNorm, the round's
  training settings list the BN initializers as local parameters; the global model's BN
  tensors are never averaged (they keep their initial values in every version), each
  agent keeps its own BN values in its state directory, and the sites report personalized
  metrics for the global model with their own BN layers.
"""

from __future__ import annotations

import contextlib
import time

import numpy as np
import pytest

from edge_agent.state import AgentState
from fedmq.demo import HOSPITALS, DemoOptions, heart_settings
from fedmq.digits import DigitsOptions, digits_settings
from fedmq.inprocess import run_federation
from orchestrator.architectures import build_onnx
from orchestrator.registry import ModelRegistry
from shared.config import CommonSettings
from shared.onnx_executor import OnnxModule
from shared.onnx_model import float_initializers, load_model_bytes
from shared.protocol import RoundSummary, TrainingConfig
from shared.topics import Topics
from shared.transport import Transport
from tests.mqtt_helpers import messages

HEART_ROUNDS = 2
FINETUNE_STEPS = 50


def _federation_id(name: str) -> str:
    return f"{name}-{int(time.time() * 1000) % 10**8}"


def _summaries(monitor: Transport, expected: int, timeout: float = 20.0) -> list[RoundSummary]:
    """Round summaries received by an operator's monitor, in order; the last one is the final evaluation."""
    found: list[RoundSummary] = []
    for parsed in messages(monitor, timeout):
        if isinstance(parsed, RoundSummary) and all(parsed.msg_id != s.msg_id for s in found):
            found.append(parsed)
        if len(found) == expected:
            break
    assert len(found) == expected, f"{len(found)} round summaries, expected {expected}"
    return sorted(found, key=lambda s: s.round)


def _weights(registry: ModelRegistry, version: int) -> dict[str, np.ndarray]:
    return float_initializers(load_model_bytes(registry.model_bytes(version)))


@pytest.fixture(scope="module")
def heart_runs(mosquitto, tmp_path_factory) -> dict[str, dict]:
    """The Heart Disease federation twice at once, with and without fine-tuning; registries and summaries."""
    initial = tmp_path_factory.mktemp("heart-init") / "initial.onnx"
    # Built here, once: torch's ONNX exporter is not safe to run from parallel orchestrator threads.
    initial.write_bytes(build_onnx("logreg", num_features=13, num_outputs=1, seed=3))
    runs: dict[str, dict] = {}
    with contextlib.ExitStack() as stack:
        for name, steps in (("tuned", FINETUNE_STEPS), ("plain", 0)):
            root = tmp_path_factory.mktemp(f"heart-{name}")
            federation = _federation_id(f"perso-heart-{name}")
            orch, agents = heart_settings(mosquitto.url, root, DemoOptions(rounds=HEART_ROUNDS, seed=3))
            training = TrainingConfig.model_validate({**orch.training.model_dump(), "finetune_steps": steps})
            orch = orch.model_copy(update={"federation": federation, "initial_model": initial, "training": training})
            agents = [a.model_copy(update={"federation": federation}) for a in agents]
            monitor = stack.enter_context(Transport(
                CommonSettings(broker_url=mosquitto.url, federation=federation), f"{federation}-monitor",
                persistent_session=False))
            monitor.subscribe(Topics(federation).round_summary)
            fed = stack.enter_context(run_federation(orch, agents))
            runs[name] = {"fed": fed, "orch": orch, "monitor": monitor}
        for run in runs.values():
            run["fed"].wait_finished(timeout=120)
            run["summaries"] = _summaries(run["monitor"], HEART_ROUNDS + 1)
    for run in runs.values():
        run["registry"] = ModelRegistry.open(run["orch"].state_dir)
    return runs


def test_finetuning_reports_personalized_metrics_every_round(heart_runs):
    run = heart_runs["tuned"]
    sites = set(HOSPITALS)
    summaries = run["summaries"]
    assert [s.evaluated_version for s in summaries] == list(range(HEART_ROUNDS + 1))
    assert summaries[-1].new_version is None  # the final evaluation round
    for summary in summaries:
        assert set(summary.personalized_metrics) == sites, summary.round
        assert summary.personalized_pooled is not None
        assert summary.personalized_pooled.num_examples == summary.pooled.num_examples == 104 + 89 + 16 + 45
        for site in sites:
            mine, base = summary.personalized_metrics[site], summary.site_metrics[site]
            assert mine.num_examples == base.num_examples
            assert abs(mine.loss - base.loss) > 1e-6, f"round {summary.round}: {site}'s variant is the global model"
        # The registry keeps the same figures per evaluated version.
        assert run["registry"].personalized(summary.evaluated_version) == summary.personalized_metrics
        assert run["registry"].get(summary.evaluated_version).evaluations == summary.site_metrics
    # Adapting to one's own hospital pays off on its own test set, pooled over the sites.
    final = summaries[-1]
    assert final.personalized_pooled.loss < final.pooled.loss
    assert final.personalized_pooled.accuracy >= final.pooled.accuracy


def test_finetuning_never_leaks_into_the_updates(heart_runs):
    tuned, plain = heart_runs["tuned"]["registry"], heart_runs["plain"]["registry"]
    assert all(not plain.personalized(v) for v in range(HEART_ROUNDS + 1))
    assert all(not s.personalized_metrics for s in heart_runs["plain"]["summaries"])
    for version in range(HEART_ROUNDS + 1):
        a, b = _weights(tuned, version), _weights(plain, version)
        for name in a:
            np.testing.assert_allclose(a[name], b[name], rtol=1e-6, atol=1e-7, err_msg=f"v{version} {name}")
        # Same global versions, so the same global scores.
        assert tuned.get(version).pooled.correct == plain.get(version).pooled.correct
    assert tuned.get(HEART_ROUNDS).training["finetune_steps"] == FINETUNE_STEPS


# --- FedBN -----------------------------------------------------------------------------------

FEDBN_ROUNDS = 2


@pytest.fixture(scope="module")
def fedbn_run(mosquitto, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("fedbn")
    federation = _federation_id("perso-fedbn")
    opts = DigitsOptions(sites=2, rounds=FEDBN_ROUNDS, local_steps=10, batch_size=32, federation=federation)
    orch, agents = digits_settings(mosquitto.url, root, opts=opts)
    initial = root / "initial.onnx"
    initial.write_bytes(build_onnx("cnn", input_shape=(1, 8, 8), num_outputs=10))
    orch = orch.model_copy(update={"fedbn": True, "initial_model": initial})
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=120)
    registry = ModelRegistry.open(orch.state_dir)
    bn = OnnxModule(load_model_bytes(registry.model_bytes(0))).batchnorm_names()
    return {"registry": registry, "agents": agents, "bn": bn}


def test_fedbn_lists_batchnorm_initializers_as_local_parameters(fedbn_run):
    bn = fedbn_run["bn"]
    expected = {f"bn{i}.{p}" for i in (1, 2, 3) for p in ("weight", "bias", "running_mean", "running_var")}
    assert bn == expected
    for version in range(1, FEDBN_ROUNDS + 1):
        assert fedbn_run["registry"].get(version).training["local_parameters"] == sorted(bn)


def test_fedbn_never_averages_batchnorm_into_the_global_model(fedbn_run):
    registry, bn = fedbn_run["registry"], fedbn_run["bn"]
    initial = _weights(registry, 0)
    for version in range(1, FEDBN_ROUNDS + 1):
        weights = _weights(registry, version)
        for name in bn:
            np.testing.assert_array_equal(weights[name], initial[name], err_msg=f"v{version} {name}")
        # Everything else is aggregated as usual.
        assert not np.array_equal(weights["conv1.weight"], initial["conv1.weight"])
        assert not np.array_equal(weights["fc3.bias"], initial["fc3.bias"])


def test_fedbn_each_site_keeps_its_own_batchnorm(fedbn_run):
    bn = fedbn_run["bn"]
    initial = _weights(fedbn_run["registry"], 0)
    own = {a.site_id: AgentState(a.state_dir).local_parameters() for a in fedbn_run["agents"]}
    assert len(own) == 2
    for site, values in own.items():
        assert set(values) == bn, site
        assert not np.allclose(values["bn1.running_mean"], initial["bn1.running_mean"]), site
        assert not np.allclose(values["bn1.weight"], initial["bn1.weight"]), site
    a, b = own.values()
    # Two sites that see different digits end with different normalization statistics.
    for name in ("bn1.running_mean", "bn1.running_var", "bn3.running_mean", "bn2.weight"):
        assert not np.allclose(a[name], b[name]), name


def test_fedbn_reports_personalized_metrics(fedbn_run):
    registry = fedbn_run["registry"]
    sites = {a.site_id for a in fedbn_run["agents"]}
    # Version 0 was scored before any site had BN layers of its own; every later version is
    # also scored with each site's own BN layers.
    assert registry.personalized(0) == {}
    for version in range(1, FEDBN_ROUNDS + 1):
        personalized, global_ = registry.personalized(version), registry.get(version).evaluations
        assert set(personalized) == set(global_) == sites
        for site in sites:
            assert abs(personalized[site].loss - global_[site].loss) > 1e-6
    # The global model carries BN statistics no site trained with; the sites' own do better.
    final_personal = sum(m.correct for m in registry.personalized(FEDBN_ROUNDS).values())
    final_global = sum(m.correct for m in registry.get(FEDBN_ROUNDS).evaluations.values())
    assert final_personal > final_global
