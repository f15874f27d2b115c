"""The hands-on from the project's seed, reproduced over MQTT.

Two hospitals hold points of y = 2x (A: x = 1, 2, 3; B: x = 4, 5, 6). The model is a linear
map y = w x (an ONNX MatMul with one weight, starting at 0). Each round every hospital takes
one full-batch SGD step on the mean squared error, and the orchestrator averages the
weights (FedAvg; both hold three points). The weight approaches 2 within three rounds.

Run it: ``python examples/two_hospitals_linear.py`` (starts its own broker).
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from fedmq.inprocess import run_federation
from shared.broker import start_embedded_broker
from shared.config import AgentSettings, OrchestratorSettings
from shared.onnx_model import model_to_bytes
from shared.protocol import TrainingConfig

HOSPITALS = {"hospital-a": [1.0, 2.0, 3.0], "hospital-b": [4.0, 5.0, 6.0]}
LEARNING_RATE = 0.025


def linear_model(w0: float = 0.0) -> bytes:
    """y = x @ W with W of shape (1, 1): the smallest model the executor trains."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["input", "weight"], ["output"], name="linear")], "linear",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 1])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 1])],
        [numpy_helper.from_array(np.array([[w0]], dtype=np.float32), "weight")])
    return model_to_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def run_example(broker_url: str, workdir: Path, rounds: int = 3) -> list[float]:
    """Run the federation; returns the global weight after each round."""
    (workdir / "model.onnx").write_bytes(linear_model())
    training = TrainingConfig(local_steps=1, batch_size=3, learning_rate=LEARNING_RATE, loss="mse")
    common = {"broker_url": broker_url, "federation": "seed-hands-on"}
    orchestrator = OrchestratorSettings(
        **common, state_dir=workdir / "orchestrator", rounds=rounds, min_sites=2, initial_model=workdir / "model.onnx",
        task_features=["x"], task_label="y", standardize=False, training=training, final_evaluation=False)
    agents = []
    for site, xs in HOSPITALS.items():
        csv = workdir / f"{site}.csv"
        csv.write_text("x,y\n" + "".join(f"{x},{2 * x}\n" for x in xs))
        agents.append(AgentSettings(**common, site_id=site, state_dir=workdir / site, data_train=csv))
    with run_federation(orchestrator, agents) as fed:
        fed.wait_finished(timeout=120)
        registry = fed.orchestrator.registry
        weights = []
        for version in range(1, rounds + 1):
            model = onnx.load_from_string(registry.model_bytes(version))
            weights.append(float(numpy_helper.to_array(model.graph.initializer[0]).item()))
    return weights


def main() -> None:
    with start_embedded_broker() as broker, tempfile.TemporaryDirectory() as tmp:
        weights = run_example(broker.url, Path(tmp))
    for i, w in enumerate(weights, start=1):
        print(f"round {i}: w = {w:.4f}")


if __name__ == "__main__":
    sys.exit(main())
