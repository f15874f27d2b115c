"""ONNX file helpers and the initial architectures: canonical bytes, strict loading."""

from __future__ import annotations

import hashlib
import io
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from orchestrator.architectures import ARCHITECTURES, build_onnx, load_user_model
from shared.onnx_executor import OnnxExecutorError, OnnxModule, UnsupportedOperatorError
from shared.onnx_model import (
    InvalidModelError,
    describe,
    float_initializers,
    load_model_bytes,
    model_to_bytes,
    replace_initializers,
    sha256_hex,
)

WEIGHT = np.arange(6, dtype=np.float32).reshape(2, 3) / 7
BIAS = np.asarray([0.5, -0.25], dtype=np.float32)


def _linear_model(*, raw: bool, weight_type: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """y = reshape(x @ W^T + b), with W stored either as raw_data or as float_data."""
    dtype = onnx.helper.tensor_dtype_to_np_dtype(weight_type)
    weight = helper.make_tensor("w", weight_type, WEIGHT.shape, WEIGHT.astype(dtype).ravel().tolist(), raw=False)
    if raw:
        weight = numpy_helper.from_array(WEIGHT.astype(dtype), "w")
    nodes = [
        helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1),
        helper.make_node("Reshape", ["h", "shape"], ["y"]),
    ]
    graph = helper.make_graph(
        nodes,
        "linear",
        [helper.make_tensor_value_info("x", weight_type, ["batch", 3])],
        [helper.make_tensor_value_info("y", weight_type, ["batch", 2])],
        [weight, numpy_helper.from_array(BIAS.astype(dtype), "b"), numpy_helper.from_array(np.asarray([-1, 2], np.int64), "shape")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_model_to_bytes_is_deterministic_and_sha_identifies_it() -> None:
    model = _linear_model(raw=True)
    first = model_to_bytes(model)
    assert model_to_bytes(load_model_bytes(first)) == first
    assert sha256_hex(first) == hashlib.sha256(first).hexdigest()
    assert sha256_hex(first) != sha256_hex(model_to_bytes(replace_initializers(model, {"b": BIAS + 1})))


def test_build_onnx_is_reproducible_per_seed_and_leaves_global_rng_alone() -> None:
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    first = build_onnx("mlp", num_features=5, num_outputs=2, seed=3)
    assert torch.equal(torch.rand(3), expected)
    assert sha256_hex(build_onnx("mlp", num_features=5, num_outputs=2, seed=3)) == sha256_hex(first)
    assert sha256_hex(build_onnx("mlp", num_features=5, num_outputs=2, seed=4)) != sha256_hex(first)


def test_replace_initializers_makes_encoding_canonical() -> None:
    """Same values, different encodings in the source file, one set of bytes after replacement."""
    arrays = {"w": WEIGHT * 2, "b": BIAS}
    as_float_data = replace_initializers(_linear_model(raw=False), arrays)
    as_raw_data = replace_initializers(_linear_model(raw=True), arrays)
    assert model_to_bytes(as_float_data) == model_to_bytes(as_raw_data)
    np.testing.assert_array_equal(float_initializers(as_raw_data)["w"], WEIGHT * 2)


def test_replace_initializers_copies_and_keeps_dtype() -> None:
    original = _linear_model(raw=True, weight_type=TensorProto.FLOAT16)
    before = model_to_bytes(original)
    replaced = replace_initializers(original, {"w": np.ones((2, 3), np.float64)})
    assert model_to_bytes(original) == before
    tensor = next(t for t in replaced.graph.initializer if t.name == "w")
    assert tensor.data_type == TensorProto.FLOAT16 and tensor.HasField("raw_data")
    assert float_initializers(replaced)["w"].dtype == np.float16
    np.testing.assert_array_equal(float_initializers(replaced)["w"], np.ones((2, 3)))


@pytest.mark.parametrize(
    ("arrays", "problem"),
    [
        ({"nope": WEIGHT}, "no initializer named 'nope'"),
        ({"w": WEIGHT.T}, r"'w' has shape \(2, 3\) but the new value has \(3, 2\)"),
        ({"shape": np.asarray([1, 2], np.int64)}, "INT64, not a float"),
        ({"b": np.asarray([np.nan, 0.0], np.float32)}, "finite"),
        ({"b": np.asarray(["a", "b"])}, "finite"),
    ],
)
def test_replace_initializers_rejects_bad_values(arrays: dict[str, np.ndarray], problem: str) -> None:
    with pytest.raises(InvalidModelError, match=problem):
        replace_initializers(_linear_model(raw=True), arrays)


def test_float_initializers_skip_integer_constants() -> None:
    arrays = float_initializers(_linear_model(raw=False))
    assert set(arrays) == {"w", "b"}
    np.testing.assert_array_equal(arrays["w"], WEIGHT)


def test_load_model_bytes_accepts_a_valid_model() -> None:
    model = load_model_bytes(model_to_bytes(_linear_model(raw=True)))
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Reshape"]


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        (b"", "empty"),
        (b"\xff\xfe definitely not protobuf \x00\x01", "not an ONNX model"),
        (b"PK\x03\x04 a zip file pretending", "not an ONNX model|without any graph nodes"),
        ("model.onnx", "must be bytes, got str"),
    ],
)
def test_load_model_bytes_rejects_garbage(data: bytes, problem: str) -> None:
    with pytest.raises(InvalidModelError, match=problem):
        load_model_bytes(data)


def test_load_model_bytes_rejects_oversized_data() -> None:
    data = model_to_bytes(_linear_model(raw=True))
    with pytest.raises(InvalidModelError, match=f"{len(data)} bytes, over the 100-byte limit"):
        load_model_bytes(data, max_bytes=100)


def test_load_model_bytes_rejects_invalid_graph() -> None:
    model = _linear_model(raw=True)
    model.graph.node[0].input[0] = "undefined_tensor"
    with pytest.raises(InvalidModelError, match="checker rejected.*undefined_tensor"):
        load_model_bytes(model_to_bytes(model))


def test_load_model_bytes_rejects_external_data() -> None:
    """A model must never make a hospital read a file the model names."""
    model = _linear_model(raw=True)
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.data_location = TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="/etc/passwd")
    with pytest.raises(InvalidModelError, match="'w' refers to external data"):
        load_model_bytes(model_to_bytes(model))
    with pytest.raises(OnnxExecutorError, match="external file"):
        OnnxModule(model)


def test_describe_cnn() -> None:
    model = load_model_bytes(build_onnx("cnn", num_outputs=10))
    summary = describe(model)
    trainable = sum(p.numel() for p in OnnxModule(model).onnx_parameters().values())
    assert summary["inputs"] == [{"name": "input", "shape": ["batch", 1, 8, 8], "dtype": "float"}]
    assert summary["outputs"] == [{"name": "output", "shape": ["batch", 10], "dtype": "float"}]
    assert summary["opset"] == 17
    assert summary["parameters"] == trainable >= 100_000


def _run(model_bytes: bytes, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def test_logreg_outputs_a_probability() -> None:
    data = build_onnx("logreg", num_features=13, num_outputs=1)
    model = load_model_bytes(data)
    assert set(float_initializers(model)) == {"linear.weight", "linear.bias"}
    assert [n.op_type for n in model.graph.node] == ["Gemm", "Sigmoid"]
    probabilities = _run(data, np.random.default_rng(0).standard_normal((64, 13)).astype(np.float32) * 5)
    assert probabilities.shape == (64, 1) and np.all((probabilities > 0) & (probabilities < 1))


def test_logreg_with_several_outputs_emits_logits() -> None:
    model = load_model_bytes(build_onnx("logreg", num_features=4, num_outputs=3))
    assert [n.op_type for n in model.graph.node] == ["Gemm"]


def test_mlp_dropout_is_inference_only_in_the_file() -> None:
    data = build_onnx("mlp", num_features=6, num_outputs=3, hidden=(16, 8), dropout=0.5)
    model = load_model_bytes(data)
    dropouts = [n for n in model.graph.node if n.op_type == "Dropout"]
    assert len(dropouts) == 2 and all(len(n.input) == 2 and len(n.output) == 1 for n in dropouts)
    assert set(float_initializers(model)) == {f"fc{i}.{k}" for i in (1, 2, 3) for k in ("weight", "bias")}
    x = np.ones((4, 6), np.float32)
    np.testing.assert_array_equal(_run(data, x), _run(data, x))


@pytest.mark.parametrize("opset", [17, 20, 21])
def test_cnn_keeps_batchnorm_with_fresh_statistics(opset: int) -> None:
    model = load_model_bytes(build_onnx("cnn", num_outputs=10, opset=opset))
    arrays = float_initializers(model)
    assert [n.op_type for n in model.graph.node].count("BatchNormalization") == 3
    modes = [helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute if a.name == "training_mode"]
    assert modes == [0, 0, 0]
    assert {f"conv{i}.weight" for i in (1, 2, 3)} | {"fc1.weight"} <= set(arrays)
    for i in (1, 2, 3):
        np.testing.assert_array_equal(arrays[f"bn{i}.running_var"], 1.0)
        np.testing.assert_array_equal(arrays[f"bn{i}.running_mean"], 0.0)
    assert describe(model)["opset"] == opset


@pytest.mark.parametrize(
    ("name", "kwargs", "problem"),
    [
        ("resnet", {"num_features": 3}, "unknown architecture 'resnet'; choose one of logreg, mlp, cnn"),
        ("mlp", {}, "mlp needs num_features"),
        ("cnn", {"input_shape": (1, 4, 4)}, "height, width >= 8"),
        ("logreg", {"num_features": 3, "opset": 16}, "opset must be in 17..21"),
        ("mlp", {"num_features": 3, "dropout": 1.0}, "dropout must be in"),
    ],
)
def test_build_onnx_rejects_bad_arguments(name: str, kwargs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        build_onnx(name, num_outputs=2, **kwargs)


def test_architectures_are_listed() -> None:
    assert ARCHITECTURES == ("logreg", "mlp", "cnn")


def test_load_user_model_returns_canonical_bytes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2), torch.nn.LogSoftmax(dim=1))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.onnx.export(
            net.eval(), (torch.zeros(1, 4),), buffer, dynamo=False, input_names=["input"], dynamic_axes={"input": {0: "n"}}
        )
    path = tmp_path / "user.onnx"
    path.write_bytes(buffer.getvalue())
    data = load_user_model(path)
    assert data == model_to_bytes(load_model_bytes(buffer.getvalue()))


def test_load_user_model_names_the_unsupported_op(tmp_path: Path) -> None:
    graph = helper.make_graph(
        [helper.make_node("Erf", ["input"], ["output"], name="gelu_part")],
        "g",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", 3])],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, ["batch", 3])],
    )
    path = tmp_path / "erf.onnx"
    path.write_bytes(model_to_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])))
    with pytest.raises(UnsupportedOperatorError, match="operator Erf .*gelu_part"):
        load_user_model(path)


def test_load_user_model_rejects_missing_and_garbage_files(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="is not a file"):
        load_user_model(tmp_path / "missing.onnx")
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\xff\xfe\x00 not a model")
    with pytest.raises(InvalidModelError, match="not an ONNX model"):
        load_user_model(garbage)
