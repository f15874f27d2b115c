"""Local scoring: a diverged model yields a clear error, never a non-finite metric on the wire."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from edge_agent.trainer import TrainingError, evaluate
from orchestrator.architectures import build_onnx
from shared.onnx_model import float_initializers, load_model_bytes, model_to_bytes, replace_initializers
from shared.protocol import EvalMetrics


def _model(scale: float, arch: str = "logreg", outputs: int = 1) -> bytes:
    model = load_model_bytes(build_onnx(arch, num_features=3, num_outputs=outputs))
    weights = {k: np.full_like(v, scale) for k, v in float_initializers(model).items()}
    return model_to_bytes(replace_initializers(model, weights))


def test_scores_are_finite_and_count_correct_examples():
    x = np.ones((4, 3), dtype=np.float32)
    metrics = evaluate(_model(0.0), x, np.array([1, 0, 1, 1], dtype=np.float32), "bce")
    assert metrics.num_examples == 4 and metrics.correct == 3 and metrics.accuracy == 0.75
    assert metrics.loss == pytest.approx(np.log(2))


def test_an_overflowing_model_is_an_error_that_says_what_to_do():
    x = np.full((4, 3), 1e30, dtype=np.float32)
    with pytest.raises(TrainingError, match="diverged; lower the learning rate"):
        evaluate(_model(1e30, "mlp", 2), x, np.zeros(4, dtype=np.float32), "cross_entropy")


def test_metrics_refuse_non_finite_values():
    for bad in (float("nan"), float("inf")):
        with pytest.raises(ValidationError, match="finite"):
            EvalMetrics(num_examples=1, loss=bad)
