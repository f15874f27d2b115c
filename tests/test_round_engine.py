"""Round engine pieces that need no broker: what it does to the weights it releases."""

from __future__ import annotations

import logging



from orchestrator.architectures import build_onnx
from orchestrator.rounds import project_running_variances
from shared.onnx_executor import running_variance_names
from shared.onnx_model import float_initializers, load_model_bytes


def test_negative_running_variances_are_projected_to_zero_and_logged(caplog):
    model = load_model_bytes(build_onnx("cnn", input_shape=(1, 8, 8), num_outputs=10))
    weights = float_initializers(model)
    variances = sorted(running_variance_names(model.graph))
    assert variances, "the CNN has BatchNorm layers"
    noisy = {k: v.copy() for k, v in weights.items()}
    noisy[variances[0]][:3] = [-0.5, -1e-3, 2.0]
    with caplog.at_level(logging.WARNING, logger="orchestrator.rounds"):
        projected = project_running_variances(model.graph, noisy, round_no=7)
    assert projected[variances[0]][:3].tolist() == [0.0, 0.0, 2.0]
    assert projected[variances[0]].dtype == weights[variances[0]].dtype
    assert "round 7: 2 running-variance values" in caplog.text
    untouched = [k for k in weights if k != variances[0]]
    assert all(projected[k] is noisy[k] for k in untouched), "everything else is released as aggregated"
