"""Initial global models: torch definitions exported once to canonical ONNX bytes.

The orchestrator is the only place where a model is code; from here on it is data. Export
uses torch's TorchScript exporter in TRAINING mode and then rewrites the few training-only
nodes to inference form, because the eval-mode export silently damages trainable models:
with constant folding it fuses BatchNorm into the preceding Conv (the BN layers and readable
names vanish), and without it it merges equal-valued tensors, turning a fresh BN's running
variance into an alias of its scale (both all ones).
"""

from __future__ import annotations

import functools
import io
import threading
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import onnx
import onnxruntime
import torch
from onnx import version_converter
from torch import nn

from shared.onnx_executor import MAX_OPSET, MIN_OPSET, OnnxExecutorError, OnnxModule
from shared.onnx_model import (
    DEFAULT_MAX_BYTES,
    InvalidModelError,
    float_initializers,
    load_model_bytes,
    model_to_bytes,
    replace_initializers,
)

ARCHITECTURES: tuple[str, ...] = ("logreg", "mlp", "cnn")
# The TorchScript exporter stops at opset 20; newer opsets are reached with onnx's converter.
_EXPORTER_MAX_OPSET = 20
_CNN_CHANNELS = (32, 64, 128)
_CNN_DEFAULT_INPUT = (1, 8, 8)


def _dense(num_features: int, hidden: tuple[int, ...], num_outputs: int, dropout: float) -> list[tuple[str, nn.Module]]:
    """Named layers, so initializers come out as fc1.weight etc. rather than 0.weight."""
    layers: list[tuple[str, nn.Module]] = []
    width = num_features
    for index, size in enumerate(hidden, start=1):
        layers += [(f"fc{index}", nn.Linear(width, size)), (f"relu_fc{index}", nn.ReLU())]
        if dropout > 0:
            layers.append((f"dropout{index}", nn.Dropout(dropout)))
        width = size
    return [*layers, (f"fc{len(hidden) + 1}", nn.Linear(width, num_outputs))]


def _cnn(input_shape: tuple[int, ...], hidden: tuple[int, ...], num_outputs: int, dropout: float) -> list[tuple[str, nn.Module]]:
    """Three Conv-BN-ReLU-MaxPool blocks halve 8x8 digits down to 1x1, then a dense head."""
    layers: list[tuple[str, nn.Module]] = []
    channels = input_shape[0]
    for index, out_channels in enumerate(_CNN_CHANNELS, start=1):
        layers += [
            (f"conv{index}", nn.Conv2d(channels, out_channels, kernel_size=3, padding=1)),
            (f"bn{index}", nn.BatchNorm2d(out_channels)),
            (f"relu{index}", nn.ReLU()),
            (f"pool{index}", nn.MaxPool2d(2)),
        ]
        channels = out_channels
    # Each floor-mode pool halves height and width.
    shrink = 2 ** len(_CNN_CHANNELS)
    flat = channels * (input_shape[1] // shrink) * (input_shape[2] // shrink)
    return [*layers, ("flatten", nn.Flatten()), *_dense(flat, hidden, num_outputs, dropout)]


def _define(
    name: str,
    num_features: int | None,
    input_shape: tuple[int, ...] | None,
    num_outputs: int,
    hidden: tuple[int, ...],
    dropout: float,
) -> tuple[nn.Module, tuple[int, ...]]:
    """The torch module and its per-sample input shape."""
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be at least 1, got {num_outputs}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")
    if any(size < 1 for size in hidden):
        raise ValueError(f"hidden layer sizes must be positive, got {hidden}")
    if name == "cnn":
        shape = tuple(input_shape or _CNN_DEFAULT_INPUT)
        if len(shape) != 3 or shape[1] < 8 or shape[2] < 8:
            raise ValueError(f"cnn needs input_shape (channels, height, width) with height, width >= 8, got {shape}")
        return nn.Sequential(OrderedDict(_cnn(shape, hidden, num_outputs, dropout))), shape
    if name not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {name!r}; choose one of {', '.join(ARCHITECTURES)}")
    if num_features is None and input_shape is not None and len(input_shape) == 1:
        num_features = input_shape[0]
    if num_features is None or num_features < 1:
        raise ValueError(f"{name} needs num_features (a positive number of tabular features)")
    if name == "logreg":
        # One output is a probability (Fed-Heart-Disease); several are logits for a softmax loss.
        head = [("sigmoid", nn.Sigmoid())] if num_outputs == 1 else []
        layers = [("linear", nn.Linear(num_features, num_outputs)), *head]
    else:
        layers = _dense(num_features, hidden, num_outputs, dropout)
    return nn.Sequential(OrderedDict(layers)), (num_features,)


def _to_inference_graph(model: onnx.ModelProto) -> None:
    """Turn the training-mode export into a plain inference graph, in place.

    fedmq's executor decides train/eval itself; the file must mean "inference" to any other
    runtime (onnxruntime evaluation on the orchestrator), so BN uses running statistics and
    Dropout is a no-op.
    """
    graph = model.graph
    for node in graph.node:
        if node.op_type == "BatchNormalization":
            for attribute in node.attribute:
                if attribute.name == "training_mode":
                    attribute.i = 0
            del node.output[1:]
        elif node.op_type == "Dropout":
            del node.input[2:]  # training_mode
            del node.output[1:]  # mask
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [node for node in graph.node if node.op_type == "Constant" and node.output[0] not in used]
    for node in dead:
        graph.node.remove(node)


T = TypeVar("T")
_EXPORT_LOCK = threading.Lock()


def _exclusive(fn: Callable[..., T]) -> Callable[..., T]:
    """torch's exporter and global seeding are process-wide state: one export at a time."""
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> T:
        with _EXPORT_LOCK:
            return fn(*args, **kwargs)
    return wrapper


@_exclusive
def build_onnx(
    name: str,
    *,
    num_features: int | None = None,
    input_shape: tuple[int, ...] | None = None,
    num_outputs: int,
    hidden: tuple[int, ...] = (128, 64),
    dropout: float = 0.0,
    opset: int = 17,
    seed: int = 0,
) -> bytes:
    """Canonical ONNX bytes of a freshly initialized model; same arguments, same sha256.

    logreg and mlp take num_features (or input_shape=(n,)); cnn takes input_shape
    (channels, height, width), default (1, 8, 8). hidden is ignored by logreg.
    """
    if not MIN_OPSET <= opset <= MAX_OPSET:
        raise ValueError(f"opset must be in {MIN_OPSET}..{MAX_OPSET} (what the fedmq executor runs), got {opset}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module, sample_shape = _define(name, num_features, input_shape, num_outputs, tuple(hidden), dropout)
    # Tracing runs the module in train mode, which moves BN running statistics; the file must
    # carry the freshly initialized values, so they are restored from this snapshot.
    initial = {key: value.detach().numpy().copy() for key, value in module.state_dict().items()}
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # Expected and harmless here: the legacy exporter and its training= option are
        # deprecated (still the exporter fedmq uses, see module docstring); tracing BN's
        # batch-size check; folding in training mode touches no parameter of
        # these models; num_batches_tracked has no ONNX counterpart.
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*do_constant_folding.*")
        warnings.filterwarnings("ignore", message=".*num_batches_tracked.*")
        torch.onnx.export(
            module,
            (torch.zeros(2, *sample_shape),),
            buffer,
            dynamo=False,
            do_constant_folding=True,
            training=torch.onnx.TrainingMode.TRAINING,
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            opset_version=min(opset, _EXPORTER_MAX_OPSET),
        )
    model = onnx.load_from_string(buffer.getvalue())
    unnamed = sorted(set(float_initializers(model)) - set(initial))
    if unnamed:
        raise RuntimeError(f"the exporter renamed or synthesized initializers {unnamed}; fedmq needs torch names")
    model = replace_initializers(model, {key: initial[key] for key in float_initializers(model)})
    _to_inference_graph(model)
    if opset > _EXPORTER_MAX_OPSET:
        model = version_converter.convert_version(model, opset)
    onnx.checker.check_model(model, full_check=True)
    return model_to_bytes(model)


def _sample_inputs(model: onnx.ModelProto, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Random inputs of the declared shapes, a symbolic batch dimension taken as 2."""
    initializers = {t.name for t in model.graph.initializer}
    samples = {}
    for info in model.graph.input:
        if info.name in initializers:
            continue
        dims = info.type.tensor_type.shape.dim
        shape = []
        for index, dim in enumerate(dims):
            if dim.HasField("dim_value"):
                shape.append(dim.dim_value)
            elif index == 0:
                shape.append(2)
            else:
                raise OnnxExecutorError(
                    f"input {info.name!r} has a symbolic dimension #{index} ({dim.dim_param or '?'}); "
                    "only the batch dimension (first) may be symbolic. Export with fixed feature sizes."
                )
        dtype = onnx.helper.tensor_dtype_to_np_dtype(info.type.tensor_type.elem_type)
        if not np.issubdtype(dtype, np.floating):
            raise OnnxExecutorError(f"input {info.name!r} is {dtype}; fedmq models take float inputs")
        samples[info.name] = rng.standard_normal(shape).astype(dtype)
    return samples


def load_user_model(path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Accept a user's own ONNX file only if our executor runs it and agrees with onnxruntime.

    Agreement on a random input catches graphs that pass the op check but rely on semantics the
    executor does not implement, before any hospital spends a round on them. Returns canonical bytes.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidModelError(f"{path} is not a file; pass the path of an .onnx model")
    if path.stat().st_size > max_bytes:
        raise InvalidModelError(f"{path} is {path.stat().st_size} bytes, over the {max_bytes}-byte limit")
    model = load_model_bytes(path.read_bytes(), max_bytes=max_bytes)
    module = OnnxModule(model).eval()
    samples = _sample_inputs(model, np.random.default_rng(0))
    with torch.no_grad():
        ours = module(*(torch.from_numpy(v) for v in samples.values()))
    ours = ours if isinstance(ours, tuple) else (ours,)
    session = onnxruntime.InferenceSession(model_to_bytes(model), providers=["CPUExecutionProvider"])
    reference = session.run(None, samples)
    for output, mine, theirs in zip(model.graph.output, ours, reference, strict=True):
        if not np.allclose(mine.numpy(), theirs, rtol=1e-3, atol=1e-4):
            raise OnnxExecutorError(
                f"{path}: output {output.name!r} differs between the fedmq executor and onnxruntime "
                f"(max abs diff {np.max(np.abs(mine.numpy() - theirs)):.3g}); the model relies on operator "
                "behaviour the executor does not reproduce. Please report it with the model attached."
            )
    return model_to_bytes(model)
