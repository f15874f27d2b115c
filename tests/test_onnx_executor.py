"""The executor must compute what onnxruntime computes, and train like torch."""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from orchestrator.architectures import build_onnx
from shared.onnx_executor import (
    SUPPORTED_OPS,
    OnnxExecutorError,
    OnnxModule,
    UnsupportedOperatorError,
)
from shared.onnx_model import float_initializers, load_model_bytes, model_to_bytes, replace_initializers

OPSETS = (17, 21)
RNG = np.random.default_rng(1234)


def _randn(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


def _ints(*values: int) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


@dataclass
class Case:
    """One single-node graph: `feeds` become graph inputs, `weights` initializers."""

    op: str
    feeds: dict[str, np.ndarray]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    attrs: dict[str, Any] = field(default_factory=dict)
    inputs: list[str] | None = None  # node input order; default feeds then weights
    outputs: dict[str, int] = field(default_factory=lambda: {"y": TensorProto.FLOAT})
    min_opset: int = 17


def _model(case: Case, opset: int) -> onnx.ModelProto:
    def info(name: str, array: np.ndarray) -> onnx.ValueInfoProto:
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(array.dtype), array.shape)

    node_inputs = case.inputs if case.inputs is not None else [*case.feeds, *case.weights]
    node = helper.make_node(case.op, node_inputs, list(case.outputs), name=f"the_{case.op}", **case.attrs)
    graph = helper.make_graph(
        [node],
        "single",
        [info(name, value) for name, value in case.feeds.items()],
        [helper.make_tensor_value_info(name, dtype, None) for name, dtype in case.outputs.items()],
        [numpy_helper.from_array(value, name) for name, value in case.weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    # Graph outputs need shapes to pass the checker; ONNX's own inference supplies them.
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    onnx.checker.check_model(model)
    return model


def _onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model_to_bytes(model), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _ours(module: OnnxModule, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    with torch.no_grad():
        result = module(*(torch.from_numpy(v) for v in feeds.values()))
    return [t.numpy() for t in (result if isinstance(result, tuple) else (result,))]


def _assert_same_as_onnxruntime(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> None:
    expected = _onnxruntime(model, feeds)
    actual = _ours(OnnxModule(model).eval(), feeds)
    assert len(actual) == len(expected)
    for mine, theirs in zip(actual, expected, strict=True):
        assert mine.shape == theirs.shape
        assert mine.dtype == theirs.dtype
        np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-5)


X = _randn(2, 3, 4)
IMG = _randn(2, 3, 9, 10)
SEQ = _randn(2, 2, 11)
F32 = {"y": TensorProto.FLOAT}
I64 = {"y": TensorProto.INT64}

CASES: dict[str, Case] = {
    "gemm_transB_alpha_beta": Case(
        "Gemm", {"a": _randn(3, 4)}, {"b": _randn(5, 4), "c": _randn(5)}, {"transB": 1, "alpha": 0.5, "beta": 2.0}
    ),
    "gemm_transA_row_bias": Case("Gemm", {"a": _randn(4, 3)}, {"b": _randn(4, 5), "c": _randn(1, 5)}, {"transA": 1}),
    "gemm_no_bias": Case("Gemm", {"a": _randn(3, 4)}, {"b": _randn(4, 2)}),
    "matmul_batched": Case("MatMul", {"a": _randn(2, 3, 4)}, {"b": _randn(4, 5)}),
    "matmul_vector": Case("MatMul", {"a": _randn(4)}, {"b": _randn(3, 4, 2)}),
    "add_broadcast": Case("Add", {"a": X}, {"b": _randn(4)}),
    "sub_broadcast": Case("Sub", {"a": _randn(3, 1)}, {"b": X}),
    "mul": Case("Mul", {"a": X, "b": _randn(2, 3, 4)}),
    "div": Case("Div", {"a": X}, {"b": _randn(1, 3, 1) + 3.0}),
    "div_int_truncates": Case("Div", {"a": _ints(7, -7, 9, -9)}, {"b": _ints(2, 2, -4, -4)}, outputs=I64),
    "relu": Case("Relu", {"x": X}),
    "sigmoid": Case("Sigmoid", {"x": X}),
    "tanh": Case("Tanh", {"x": X}),
    "softmax_default_axis": Case("Softmax", {"x": X}),
    "softmax_axis1": Case("Softmax", {"x": X}, attrs={"axis": 1}),
    "logsoftmax_axis0": Case("LogSoftmax", {"x": X}, attrs={"axis": 0}),
    "conv2d_asymmetric": Case(
        "Conv",
        {"x": IMG},
        {"w": _randn(4, 3, 3, 3), "b": _randn(4)},
        {"pads": [1, 0, 2, 1], "strides": [2, 1], "dilations": [1, 2]},
    ),
    "conv2d_group_no_bias": Case("Conv", {"x": IMG}, {"w": _randn(6, 1, 3, 2)}, {"group": 3, "kernel_shape": [3, 2]}),
    "conv2d_same_upper": Case("Conv", {"x": IMG}, {"w": _randn(2, 3, 4, 3)}, {"auto_pad": "SAME_UPPER", "strides": [2, 3]}),
    "conv2d_same_lower": Case("Conv", {"x": IMG}, {"w": _randn(2, 3, 4, 4)}, {"auto_pad": "SAME_LOWER"}),
    "conv2d_valid": Case("Conv", {"x": IMG}, {"w": _randn(2, 3, 3, 3), "b": _randn(2)}, {"auto_pad": "VALID"}),
    "conv1d": Case("Conv", {"x": SEQ}, {"w": _randn(3, 2, 3), "b": _randn(3)}, {"pads": [1, 2], "strides": [2]}),
    "conv1d_same_lower": Case("Conv", {"x": SEQ}, {"w": _randn(3, 2, 4)}, {"auto_pad": "SAME_LOWER", "strides": [2]}),
    "batchnorm_4d": Case(
        "BatchNormalization",
        {"x": IMG},
        {"s": _randn(3), "bias": _randn(3), "mean": _randn(3), "var": np.abs(_randn(3)) + 0.5},
        {"epsilon": 1e-3},
    ),
    "batchnorm_2d": Case(
        "BatchNormalization",
        {"x": _randn(5, 3)},
        {"s": _randn(3), "bias": _randn(3), "mean": _randn(3), "var": np.abs(_randn(3)) + 0.5},
    ),
    "maxpool_pads": Case("MaxPool", {"x": IMG}, attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}),
    "maxpool_asymmetric_ceil": Case(
        "MaxPool", {"x": IMG}, attrs={"kernel_shape": [2, 3], "strides": [2, 2], "pads": [0, 1, 1, 0], "ceil_mode": 1}
    ),
    "maxpool_ceil_last_window_in_pad": Case(
        "MaxPool", {"x": _randn(1, 1, 4, 4)}, attrs={"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1], "ceil_mode": 1}
    ),
    "maxpool_dilated": Case("MaxPool", {"x": IMG}, attrs={"kernel_shape": [2, 2], "dilations": [2, 3]}),
    "maxpool_same_upper": Case("MaxPool", {"x": IMG}, attrs={"kernel_shape": [3, 2], "strides": [2, 2], "auto_pad": "SAME_UPPER"}),
    "maxpool_1d": Case("MaxPool", {"x": SEQ}, attrs={"kernel_shape": [3], "strides": [2], "pads": [1, 0]}),
    "avgpool_exclude_pad": Case(
        "AveragePool", {"x": IMG}, attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]}
    ),
    "avgpool_include_pad": Case(
        "AveragePool",
        {"x": IMG},
        attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 2, 0, 1], "count_include_pad": 1},
    ),
    "avgpool_ceil": Case("AveragePool", {"x": IMG}, attrs={"kernel_shape": [2, 3], "strides": [2, 2], "ceil_mode": 1}),
    "avgpool_ceil_include_pad": Case(
        "AveragePool",
        {"x": IMG},
        attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1], "ceil_mode": 1, "count_include_pad": 1},
    ),
    "avgpool_same_lower": Case(
        "AveragePool", {"x": IMG}, attrs={"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_LOWER"}
    ),
    "avgpool_dilated": Case(
        "AveragePool", {"x": IMG}, attrs={"kernel_shape": [2, 2], "dilations": [2, 2], "pads": [1, 1, 1, 1]}, min_opset=19
    ),
    "avgpool_1d": Case("AveragePool", {"x": SEQ}, attrs={"kernel_shape": [4], "strides": [3], "ceil_mode": 1}),
    "global_avgpool": Case("GlobalAveragePool", {"x": IMG}),
    "global_avgpool_1d": Case("GlobalAveragePool", {"x": SEQ}),
    "flatten_default": Case("Flatten", {"x": IMG}),
    "flatten_axis0": Case("Flatten", {"x": X}, attrs={"axis": 0}),
    "flatten_negative_axis": Case("Flatten", {"x": IMG}, attrs={"axis": -1}),
    "reshape_zero_and_minus_one": Case("Reshape", {"x": IMG}, {"shape": _ints(0, -1, 5)}),
    "reshape_allowzero": Case("Reshape", {"x": np.zeros((0, 3), np.float32)}, {"shape": _ints(3, 0)}, {"allowzero": 1}),
    "shape": Case("Shape", {"x": IMG}, outputs=I64),
    "shape_start_end": Case("Shape", {"x": IMG}, attrs={"start": 1, "end": -1}, outputs=I64),
    "shape_negative_start": Case("Shape", {"x": IMG}, attrs={"start": -2}, outputs=I64),
    "gather_axis1_negative": Case("Gather", {"x": X}, {"i": _ints(-1, 0, 2, 1).reshape(2, 2)}, {"axis": 1}),
    "gather_scalar_int64": Case("Gather", {"x": _ints(4, 5, 6)}, {"i": np.asarray(0, np.int64)}, outputs=I64),
    "concat": Case("Concat", {"a": X, "b": _randn(2, 3, 1)}, attrs={"axis": -1}),
    "concat_int64": Case("Concat", {"a": _ints(2)}, {"b": _ints(-1, 4)}, {"axis": 0}, outputs=I64),
    "unsqueeze": Case("Unsqueeze", {"x": X}, {"axes": _ints(0, -1)}),
    "unsqueeze_scalar": Case("Unsqueeze", {"x": np.asarray(3, np.int64)}, {"axes": _ints(0)}, outputs=I64),
    "squeeze_axes": Case("Squeeze", {"x": _randn(1, 3, 1, 2)}, {"axes": _ints(-2)}),
    "squeeze_all": Case("Squeeze", {"x": _randn(1, 3, 1, 2)}),
    "transpose_perm": Case("Transpose", {"x": X}, attrs={"perm": [1, 2, 0]}),
    "transpose_default": Case("Transpose", {"x": X}),
    "identity": Case("Identity", {"x": X}),
    "dropout_inference": Case("Dropout", {"x": X}, {"ratio": np.asarray(0.3, np.float32)}),
    "dropout_mask": Case(
        "Dropout", {"x": X}, {"ratio": np.asarray(0.3, np.float32)}, outputs={"y": TensorProto.FLOAT, "mask": TensorProto.BOOL}
    ),
    "constant_tensor": Case("Constant", {}, attrs={"value": numpy_helper.from_array(_randn(2, 3))}),
    "constant_ints": Case("Constant", {}, attrs={"value_ints": [3, -1, 2]}, outputs=I64),
    "constant_float": Case("Constant", {}, attrs={"value_float": 2.5}),
}


@pytest.mark.parametrize(
    ("name", "opset"),
    [pytest.param(n, o, id=f"{n}-opset{o}") for n, case in CASES.items() for o in OPSETS if o >= case.min_opset],
)
def test_single_op_matches_onnxruntime(name: str, opset: int) -> None:
    case = CASES[name]
    _assert_same_as_onnxruntime(_model(case, opset), case.feeds)


def test_every_supported_op_has_a_case() -> None:
    assert {case.op for case in CASES.values()} == set(SUPPORTED_OPS)


ARCHITECTURE_ARGS = {
    "logreg": {"num_features": 13, "num_outputs": 1},
    "mlp": {"num_features": 13, "num_outputs": 4, "dropout": 0.3},
    "cnn": {"num_outputs": 10},
}


def _architecture(name: str, opset: int = 17) -> onnx.ModelProto:
    return load_model_bytes(build_onnx(name, opset=opset, **ARCHITECTURE_ARGS[name]))


def _sample(model: onnx.ModelProto, batch: int) -> np.ndarray:
    dims = [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]]
    return _randn(batch, *dims)


@pytest.mark.parametrize("opset", OPSETS)
@pytest.mark.parametrize("name", list(ARCHITECTURE_ARGS))
def test_architectures_match_onnxruntime(name: str, opset: int) -> None:
    model = _architecture(name, opset)
    _assert_same_as_onnxruntime(model, {"input": _sample(model, 5)})


class _ReshapingNet(torch.nn.Module):
    """view(x.size(0), -1) exports as Shape -> Gather -> Unsqueeze -> Concat -> Reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.fc = torch.nn.Linear(4 * 6 * 6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv(x))
        x = x.view(x.size(0), -1)
        return torch.softmax(self.fc(torch.flatten(x.reshape(x.shape[0], 4, -1), 1)), dim=-1)


def _export(module: torch.nn.Module, sample: torch.Tensor) -> onnx.ModelProto:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            module.eval(),
            (sample,),
            buffer,
            dynamo=False,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=17,
        )
    return load_model_bytes(buffer.getvalue())


def test_torch_exported_shape_arithmetic_runs() -> None:
    torch.manual_seed(0)
    net = _ReshapingNet()
    model = _export(net, torch.zeros(2, 1, 8, 8))
    ops = {node.op_type for node in model.graph.node}
    assert {"Shape", "Gather", "Unsqueeze", "Concat", "Reshape"} <= ops
    x = _randn(7, 1, 8, 8)  # a batch size the exporter never saw
    _assert_same_as_onnxruntime(model, {"input": x})
    with torch.no_grad():
        expected = net(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_ours(OnnxModule(model), {"input": x})[0], expected, rtol=1e-5, atol=1e-6)


def _single_op_graph(node: onnx.NodeProto, opset: int = 17) -> onnx.ModelProto:
    graph = helper.make_graph(
        [node],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in node.output],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid(node.domain, opset)])


def test_unsupported_op_is_refused_with_name_node_and_alternatives() -> None:
    model = _single_op_graph(helper.make_node("Erf", ["x"], ["y"], name="my_erf"))
    with pytest.raises(UnsupportedOperatorError) as error:
        OnnxModule(model)
    message = str(error.value)
    assert "Erf" in message and "my_erf" in message and "Gemm" in message and "MaxPool" in message


def test_foreign_domain_is_refused() -> None:
    node = helper.make_node("FusedGemm", ["x"], ["y"], name="fused", domain="com.microsoft")
    model = _single_op_graph(node)
    model.opset_import.append(helper.make_opsetid("", 17))
    with pytest.raises(UnsupportedOperatorError, match="com.microsoft::FusedGemm"):
        OnnxModule(model)


@pytest.mark.parametrize("opset", [16, 22])
def test_opset_outside_range_is_refused(opset: int) -> None:
    with pytest.raises(UnsupportedOperatorError, match=f"opset {opset}.*17..21"):
        OnnxModule(_single_op_graph(helper.make_node("Relu", ["x"], ["y"]), opset))


def test_maxpool_indices_output_is_refused() -> None:
    node = helper.make_node("MaxPool", ["x"], ["y", "idx"], name="pool", kernel_shape=[2])
    with pytest.raises(UnsupportedOperatorError, match="pool"):
        OnnxModule(_single_op_graph(node))


def test_batchnorm_statistics_computed_by_nodes_are_refused() -> None:
    """The shape torch's eval-mode export produces when it merges equal tensors."""
    nodes = [
        helper.make_node("Identity", ["scale"], ["var"]),
        helper.make_node("Identity", ["bias"], ["mean"]),
        helper.make_node("BatchNormalization", ["x", "scale", "bias", "mean", "var"], ["y"], name="bn"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(np.ones(3, np.float32), "scale"), numpy_helper.from_array(np.zeros(3, np.float32), "bias")],
    )
    with pytest.raises(OnnxExecutorError, match="TrainingMode.TRAINING"):
        OnnxModule(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]))


def test_wrong_number_of_inputs_is_a_clear_error() -> None:
    module = OnnxModule(_architecture("logreg"))
    with pytest.raises(OnnxExecutorError, match="takes 1 input"):
        module(torch.zeros(2, 13), torch.zeros(2, 13))


def test_runtime_failure_names_the_node() -> None:
    module = OnnxModule(_architecture("logreg"))
    with pytest.raises(OnnxExecutorError, match="Gemm"):
        module(torch.zeros(2, 12))


def test_nodes_run_in_dependency_order_not_file_order() -> None:
    model = _architecture("mlp")
    x = _sample(model, 3)
    expected = _onnxruntime(model, {"input": x})[0]
    shuffled = onnx.ModelProto()
    shuffled.CopyFrom(model)
    del shuffled.graph.node[:]
    shuffled.graph.node.extend(reversed(model.graph.node))
    np.testing.assert_allclose(_ours(OnnxModule(shuffled).eval(), {"input": x})[0], expected, rtol=1e-5, atol=1e-6)
    shuffled.graph.node[0].input[0] = "ghost"
    with pytest.raises(OnnxExecutorError, match=r"consumes \['ghost'\]"):
        OnnxModule(shuffled)


def _train(module: OnnxModule, x: torch.Tensor, y: torch.Tensor, steps: int) -> list[float]:
    optimizer = torch.optim.SGD(module.parameters(), lr=0.1)
    losses = []
    module.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(module(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def test_sgd_reduces_the_loss_and_every_parameter_gets_a_gradient() -> None:
    module = OnnxModule(_architecture("cnn"))
    x, y = torch.from_numpy(_randn(16, 1, 8, 8)), torch.arange(16) % 10
    losses = _train(module, x, y, steps=12)
    assert losses[-1] < 0.6 * losses[0]
    for name, parameter in module.onnx_parameters().items():
        assert parameter.grad is not None and parameter.grad.abs().sum() > 0, name


def test_parameters_are_addressed_by_onnx_names() -> None:
    model = _architecture("cnn")
    module = OnnxModule(model)
    parameters = module.onnx_parameters()
    stats = {n for n in float_initializers(model) if "running" in n}
    assert set(parameters) == set(float_initializers(model)) - stats
    assert {id(p) for p in parameters.values()} == {id(p) for p in module.parameters()}
    assert set(module.onnx_state()) == set(float_initializers(model))
    assert module.batchnorm_names() == {f"bn{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias", "running_mean", "running_var")}
    # Constants are structure, not state.
    assert len(module.state_dict()) == len(float_initializers(model))


def _batchnorm_model(torch_bn: torch.nn.BatchNorm2d, momentum: float) -> onnx.ModelProto:
    names = {"s": torch_bn.weight, "b": torch_bn.bias, "m": torch_bn.running_mean, "v": torch_bn.running_var}
    node = helper.make_node("BatchNormalization", ["x", *names], ["y"], momentum=momentum, epsilon=torch_bn.eps)
    graph = helper.make_graph(
        [node],
        "bn",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, torch_bn.num_features, 4, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(t.detach().numpy(), n) for n, t in names.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("onnx_momentum", [0.9, 0.7])
def test_batchnorm_running_stats_follow_torch_in_train_mode(onnx_momentum: float) -> None:
    torch.manual_seed(0)
    reference = torch.nn.BatchNorm2d(3, momentum=1.0 - onnx_momentum)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5)
        reference.bias.uniform_(-1, 1)
        reference.running_mean.uniform_(-1, 1)
        reference.running_var.uniform_(0.5, 2)
    module = OnnxModule(_batchnorm_model(reference, onnx_momentum))
    before = module.onnx_state()
    module.train()
    reference.train()
    for _ in range(3):
        x = torch.randn(8, 3, 4, 4) * 3 + 1
        np.testing.assert_allclose(module(x).detach().numpy(), reference(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    state = module.onnx_state()
    assert not np.allclose(state["m"], before["m"])
    np.testing.assert_allclose(state["m"], reference.running_mean.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(state["v"], reference.running_var.numpy(), rtol=1e-5, atol=1e-6)
    module.eval()
    reference.eval()
    x = torch.randn(4, 3, 4, 4)
    np.testing.assert_allclose(module(x).detach().numpy(), reference(x).detach().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(module.onnx_state()["m"], state["m"])  # eval mode leaves them alone
    assert "m" not in module.onnx_parameters() and "s" in module.onnx_parameters()


def test_dropout_only_drops_in_train_mode() -> None:
    model = _model(CASES["dropout_mask"], 17)
    module = OnnxModule(model)
    x = torch.ones(200, 50)
    module.train()
    y, mask = module(x)
    assert 0.25 < 1.0 - mask.float().mean().item() < 0.35
    torch.testing.assert_close(y, mask.float() / 0.7)
    module.eval()
    y, mask = module(x)
    assert torch.equal(y, x) and bool(mask.all())


def test_trained_weights_written_back_give_onnxruntime_the_same_outputs() -> None:
    model = _architecture("cnn")
    module = OnnxModule(model)
    _train(module, torch.from_numpy(_randn(16, 1, 8, 8)), torch.arange(16) % 10, steps=3)
    trained = replace_initializers(model, module.onnx_state())
    assert not np.allclose(float_initializers(trained)["bn1.running_var"], 1.0)
    x = _sample(model, 6)
    expected = _ours(module.eval(), {"input": x})[0]
    np.testing.assert_allclose(_onnxruntime(trained, {"input": x})[0], expected, rtol=1e-4, atol=1e-5)
    # And a fresh executor on the written file agrees too: the file is the whole state.
    np.testing.assert_allclose(_ours(OnnxModule(trained).eval(), {"input": x})[0], expected, rtol=1e-6, atol=1e-6)


def test_load_onnx_state_round_trip_and_errors() -> None:
    model = _architecture("cnn")
    source, target = OnnxModule(model), OnnxModule(model)
    _train(source, torch.from_numpy(_randn(8, 1, 8, 8)), torch.arange(8), steps=2)
    state = source.onnx_state()
    target.load_onnx_state(state)
    x = torch.from_numpy(_randn(3, 1, 8, 8))
    torch.testing.assert_close(target.eval()(x), source.eval()(x))

    with pytest.raises(OnnxExecutorError, match="fc1.weight.*shape"):
        target.load_onnx_state({**state, "fc1.weight": np.zeros((2, 2), np.float32)})
    with pytest.raises(OnnxExecutorError, match="unknown initializer.*nope"):
        target.load_onnx_state({**state, "nope": np.zeros(1, np.float32)})
    with pytest.raises(OnnxExecutorError, match="lacks.*strict=False"):
        target.load_onnx_state({"fc1.weight": state["fc1.weight"]})
    with pytest.raises(OnnxExecutorError, match="NaN"):
        target.load_onnx_state({**state, "fc1.bias": np.full_like(state["fc1.bias"], np.nan)})


def test_partial_load_keeps_local_batchnorm_for_fedbn() -> None:
    model = _architecture("cnn")
    local = OnnxModule(model)
    _train(local, torch.from_numpy(_randn(8, 1, 8, 8)), torch.arange(8), steps=2)
    local_bn = {n: v for n, v in local.onnx_state().items() if n in local.batchnorm_names()}
    global_state = float_initializers(model)
    local.load_onnx_state({n: v for n, v in global_state.items() if n not in local.batchnorm_names()}, strict=False)
    after = local.onnx_state()
    for name, value in after.items():
        np.testing.assert_array_equal(value, local_bn[name] if name in local_bn else global_state[name])
