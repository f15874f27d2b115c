"""Train ONNX models with torch without running any code that came with the model.

Hospitals accept a model only as data: an ONNX graph. This module interprets that graph node
by node with torch operations, so the usual torch machinery (autograd, optimizers, train/eval
mode) works on it while nothing from the file is ever imported or executed.

Float initializers become trainable parameters and are always addressed by their ONNX names,
because those names are what the orchestrator aggregates and writes back into the file.
BatchNormalization running statistics are buffers that train mode updates, as in torch.
The set of operators is deliberately small: anything else is refused when the module is built,
never half-way through a training round.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from onnx import TensorProto, numpy_helper

MIN_OPSET = 17
MAX_OPSET = 21
DEFAULT_DOMAINS = frozenset({"", "ai.onnx"})
FLOAT_TYPES = frozenset({TensorProto.FLOAT16, TensorProto.FLOAT, TensorProto.DOUBLE})
# Element types torch can hold as constants (shapes, indices, masks).
CONSTANT_TYPES = FLOAT_TYPES | {
    TensorProto.INT8,
    TensorProto.INT16,
    TensorProto.INT32,
    TensorProto.INT64,
    TensorProto.UINT8,
    TensorProto.BOOL,
}


class OnnxExecutorError(ValueError):
    """A model cannot be loaded or run by the fedmq ONNX executor."""


class UnsupportedOperatorError(OnnxExecutorError):
    """The model uses an operator, domain or opset that the executor does not implement."""


def tensor_to_array(tensor: onnx.TensorProto) -> np.ndarray:
    """Decode an ONNX tensor, refusing external data.

    External data would make the executor open files named by the model, which a model
    received from outside must never be able to do.
    """
    if tensor.data_location == TensorProto.EXTERNAL:
        raise OnnxExecutorError(
            f"tensor {tensor.name!r} keeps its values in an external file; fedmq only accepts "
            "self-contained models. Re-save it with onnx.save_model(model, path, "
            "save_as_external_data=False)."
        )
    if tensor.data_type not in CONSTANT_TYPES:
        raise OnnxExecutorError(
            f"tensor {tensor.name!r} has element type "
            f"{TensorProto.DataType.Name(tensor.data_type)}, which the executor cannot hold; "
            "use float16/32/64 for weights and int8..int64/uint8/bool for constants."
        )
    return numpy_helper.to_array(tensor)


def default_opset(model: onnx.ModelProto) -> int:
    """Return the default-domain opset, which decides the semantics of every node."""
    for entry in model.opset_import:
        if entry.domain in DEFAULT_DOMAINS:
            return entry.version
    raise OnnxExecutorError("the model imports no version of the default ONNX domain (opset_import)")


def running_stat_names(graph: onnx.GraphProto) -> set[str]:
    """Names fed to BatchNormalization as running mean/variance: state, but not trainable."""
    return {name for node in graph.node if node.op_type == "BatchNormalization" for name in node.input[3:5]}


def running_variance_names(graph: onnx.GraphProto) -> set[str]:
    """The running variances among them: a negative value turns every output NaN."""
    return {node.input[4] for node in graph.node if node.op_type == "BatchNormalization" and len(node.input) > 4}


# --------------------------------------------------------------------------------------------
# Operators. Each takes a _Call (inputs, attributes, train/eval mode) and returns a tensor or a
# tuple of tensors matching the node's outputs.
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Call:
    """One node invocation: what an operator function needs, nothing more."""

    node: str
    inputs: Sequence[torch.Tensor | None]
    attrs: Mapping[str, Any]
    num_outputs: int
    training: bool

    def input(self, index: int) -> torch.Tensor:
        tensor = self.optional(index)
        if tensor is None:
            raise self.error(f"required input #{index} is missing")
        return tensor

    def optional(self, index: int) -> torch.Tensor | None:
        return self.inputs[index] if index < len(self.inputs) else None

    def attr(self, name: str, default: Any) -> Any:
        return self.attrs.get(name, default)

    def ints(self, index: int) -> list[int]:
        """A shape/axes input as Python ints (these tensors are always small)."""
        return [int(v) for v in self.input(index).reshape(-1).tolist()]

    def error(self, problem: str) -> OnnxExecutorError:
        return OnnxExecutorError(f"node {self.node!r}: {problem}")


def _normalize_axis(axis: int, rank: int, call: _Call) -> int:
    if not -rank <= axis < rank:
        raise call.error(f"axis {axis} is out of range for a tensor of rank {rank}")
    return axis % rank


def _gemm(c: _Call) -> torch.Tensor:
    a, b, bias = c.input(0), c.input(1), c.optional(2)
    if c.attr("transA", 0):
        a = a.transpose(0, 1)
    if c.attr("transB", 0):
        b = b.transpose(0, 1)
    y = c.attr("alpha", 1.0) * (a @ b)
    return y if bias is None else y + c.attr("beta", 1.0) * bias


def _binary(fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> Callable[[_Call], torch.Tensor]:
    return lambda c: fn(c.input(0), c.input(1))


def _unary(fn: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[_Call], torch.Tensor]:
    return lambda c: fn(c.input(0))


def _div(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """ONNX integer division truncates (shape arithmetic relies on it); float division is exact."""
    if a.is_floating_point() or b.is_floating_point():
        return a / b
    return torch.div(a, b, rounding_mode="trunc")


def _softmax(fn: Callable[..., torch.Tensor]) -> Callable[[_Call], torch.Tensor]:
    return lambda c: fn(c.input(0), dim=c.attr("axis", -1))


def _window_geometry(c: _Call, x: torch.Tensor, kernel: Sequence[int]) -> tuple[list[int], list[int], list[tuple[int, int]]]:
    """Strides, dilations and explicit (begin, end) pads of a Conv/pool node.

    auto_pad is resolved here so that every operator pads in exactly one way.
    """
    spatial = list(x.shape[2:])
    rank = len(spatial)
    if len(kernel) != rank:
        raise c.error(f"kernel has {len(kernel)} spatial dims but the input has {rank}")
    strides = list(c.attr("strides", [1] * rank))
    dilations = list(c.attr("dilations", [1] * rank))
    auto_pad = c.attr("auto_pad", "NOTSET")
    if auto_pad == "NOTSET":
        flat = list(c.attr("pads", [0] * 2 * rank))
        return strides, dilations, list(zip(flat[:rank], flat[rank:], strict=True))
    if auto_pad == "VALID":
        return strides, dilations, [(0, 0)] * rank
    if auto_pad not in ("SAME_UPPER", "SAME_LOWER"):
        raise c.error(f"auto_pad {auto_pad!r} is not one of NOTSET, VALID, SAME_UPPER, SAME_LOWER")
    pads = []
    for size, k, s, d in zip(spatial, kernel, strides, dilations, strict=True):
        total = max((math.ceil(size / s) - 1) * s + (k - 1) * d + 1 - size, 0)
        small, large = total // 2, total - total // 2
        pads.append((small, large) if auto_pad == "SAME_UPPER" else (large, small))
    return strides, dilations, pads


def _pad(x: torch.Tensor, pads: Sequence[tuple[int, int]], value: float) -> torch.Tensor:
    """Pad the trailing spatial dims; torch wants the last dimension first."""
    flat = [amount for begin_end in reversed(pads) for amount in begin_end]
    return F.pad(x, flat, value=value) if any(flat) else x


_CONV = {1: F.conv1d, 2: F.conv2d, 3: F.conv3d}


def _conv_fn(c: _Call, x: torch.Tensor) -> Callable[..., torch.Tensor]:
    fn = _CONV.get(x.dim() - 2)
    if fn is None:
        raise c.error(f"only 1-D, 2-D and 3-D inputs are supported, got shape {tuple(x.shape)}")
    return fn


def _conv(c: _Call) -> torch.Tensor:
    x, w, bias = c.input(0), c.input(1), c.optional(2)
    strides, dilations, pads = _window_geometry(c, x, list(w.shape[2:]))
    return _conv_fn(c, x)(_pad(x, pads, 0.0), w, bias, stride=strides, dilation=dilations, groups=c.attr("group", 1))


def _pool_input(c: _Call, x: torch.Tensor, pad_value: float) -> tuple[torch.Tensor, list[int], list[int], list[int], list[tuple[int, int]]]:
    """Pad a pooling input so that a plain, unpadded, floor-mode window sweep gives ONNX's output.

    Returns the padded input, kernel, strides, dilations and the explicit pads. With ceil_mode
    the right side gets an extra overhang (also filled with pad_value) that ONNX does not count
    as padding; torch's own ceil_mode/padding handling cannot express asymmetric pads.
    """
    kernel = list(c.attr("kernel_shape", []))
    strides, dilations, pads = _window_geometry(c, x, kernel)
    ceil_mode = c.attr("ceil_mode", 0)
    padded = []
    for size, k, s, d, (begin, end) in zip(x.shape[2:], kernel, strides, dilations, pads, strict=True):
        span = size + begin + end - (k - 1) * d - 1
        if span < 0:
            raise c.error(f"the window ({k} with dilation {d}) is larger than the padded input ({size + begin + end})")
        out = (math.ceil(span / s) if ceil_mode else span // s) + 1
        if ceil_mode and (out - 1) * s >= size + begin:
            out -= 1  # a window may not start inside the right padding
        padded.append((begin, max(end, (out - 1) * s + (k - 1) * d + 1 - size - begin)))
    return _pad(x, padded, pad_value), kernel, strides, dilations, pads


_MAX_POOL = {1: F.max_pool1d, 2: F.max_pool2d, 3: F.max_pool3d}


def _max_pool(c: _Call) -> torch.Tensor:
    x = c.input(0)
    padded, kernel, strides, dilations, _ = _pool_input(c, x, -math.inf)
    fn = _MAX_POOL.get(x.dim() - 2)
    if fn is None:
        raise c.error(f"only 1-D, 2-D and 3-D inputs are supported, got shape {tuple(x.shape)}")
    return fn(padded, kernel, strides, 0, dilations)


def _window_sum(c: _Call, x: torch.Tensor, kernel: list[int], strides: list[int], dilations: list[int]) -> torch.Tensor:
    """Per-channel sum over each pooling window, as a convolution with a kernel of ones."""
    n, channels = x.shape[:2]
    flat = x.reshape(n * channels, 1, *x.shape[2:])
    ones = torch.ones((1, 1, *kernel), dtype=x.dtype, device=x.device)
    out = _conv_fn(c, x)(flat, ones, stride=strides, dilation=dilations)
    return out.reshape(n, channels, *out.shape[2:])


def _average_pool(c: _Call) -> torch.Tensor:
    x = c.input(0)
    padded, kernel, strides, dilations, pads = _pool_input(c, x, 0.0)
    # The divisor counts real elements, plus explicit padding when count_include_pad is set,
    # but never the ceil_mode overhang: mark the counted cells with ones.
    mask = torch.ones((1, 1, *x.shape[2:]), dtype=x.dtype, device=x.device)
    mask = _pad(mask, pads, 1.0 if c.attr("count_include_pad", 0) else 0.0)
    overhang = [(0, p - m) for p, m in zip(padded.shape[2:], mask.shape[2:], strict=True)]
    mask = _pad(mask, overhang, 0.0)
    return _window_sum(c, padded, kernel, strides, dilations) / _window_sum(c, mask, kernel, strides, dilations)


def _global_average_pool(c: _Call) -> torch.Tensor:
    x = c.input(0)
    return x.mean(dim=tuple(range(2, x.dim())), keepdim=True)


def _batch_normalization(c: _Call) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Train/eval follows the module, not the node's training_mode, exactly like torch.

    torch's momentum weighs the new batch, ONNX's weighs the old running value. In train mode
    the buffers are updated in place, with torch's unbiased batch variance.
    """
    x, scale, bias, mean, var = (c.input(i) for i in range(5))
    y = F.batch_norm(
        x,
        mean,
        var,
        scale,
        bias,
        training=c.training,
        momentum=1.0 - c.attr("momentum", 0.9),
        eps=c.attr("epsilon", 1e-5),
    )
    return y, mean, var


def _dropout(c: _Call) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Active only in train mode; the node's training_mode input is ignored so one file serves both."""
    x, ratio_input = c.input(0), c.optional(1)
    ratio = 0.5 if ratio_input is None else float(ratio_input.detach())
    if not 0.0 <= ratio < 1.0:
        raise c.error(f"dropout ratio must be in [0, 1), got {ratio}")
    if c.training and ratio > 0.0:
        mask = torch.rand_like(x) >= ratio
        y = x * mask / (1.0 - ratio)
    else:
        mask, y = torch.ones_like(x, dtype=torch.bool), x
    return (y, mask) if c.num_outputs > 1 else y


def _flatten(c: _Call) -> torch.Tensor:
    x = c.input(0)
    axis = c.attr("axis", 1)
    if not -x.dim() <= axis <= x.dim():
        raise c.error(f"axis {axis} is out of range for a tensor of rank {x.dim()}")
    axis = axis + x.dim() if axis < 0 else axis
    return x.reshape(math.prod(x.shape[:axis]), math.prod(x.shape[axis:]))


def _reshape(c: _Call) -> torch.Tensor:
    x, shape = c.input(0), c.ints(1)
    if not c.attr("allowzero", 0):
        shape = [x.shape[i] if dim == 0 else dim for i, dim in enumerate(shape)]
    return x.reshape(shape)


def _shape(c: _Call) -> torch.Tensor:
    x = c.input(0)
    dims = x.shape[c.attr("start", 0) : c.attr("end", x.dim())]
    return torch.tensor(list(dims), dtype=torch.int64, device=x.device)


def _gather(c: _Call) -> torch.Tensor:
    data, indices = c.input(0), c.input(1)
    axis = _normalize_axis(c.attr("axis", 0), data.dim(), c)
    size = data.shape[axis]
    indices = torch.where(indices < 0, indices + size, indices)
    picked = data.index_select(axis, indices.reshape(-1))
    return picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1 :]))


def _concat(c: _Call) -> torch.Tensor:
    tensors = [c.input(i) for i in range(len(c.inputs))]
    return torch.cat(tensors, dim=_normalize_axis(c.attr("axis", 0), tensors[0].dim(), c))


def _unsqueeze(c: _Call) -> torch.Tensor:
    x, requested = c.input(0), c.ints(1)
    rank = x.dim() + len(requested)
    axes = sorted(_normalize_axis(a, rank, c) for a in requested)
    if len(set(axes)) != len(axes):
        raise c.error(f"Unsqueeze axes {requested} repeat an axis")
    for axis in axes:
        x = x.unsqueeze(axis)
    return x


def _squeeze(c: _Call) -> torch.Tensor:
    x = c.input(0)
    if c.optional(1) is None:
        return x.squeeze()
    axes = tuple(_normalize_axis(a, x.dim(), c) for a in c.ints(1))
    if any(x.shape[a] != 1 for a in axes):
        raise c.error(f"Squeeze axes {list(axes)} include a dimension that is not 1 (shape {tuple(x.shape)})")
    return x.squeeze(axes)


def _transpose(c: _Call) -> torch.Tensor:
    x = c.input(0)
    return x.permute(c.attr("perm", list(reversed(range(x.dim())))))


@dataclass(frozen=True)
class _Op:
    fn: Callable[[_Call], torch.Tensor | tuple[torch.Tensor, ...]]
    max_outputs: int = 1


_OPS: dict[str, _Op] = {
    "Gemm": _Op(_gemm),
    "MatMul": _Op(_binary(torch.matmul)),
    "Add": _Op(_binary(torch.add)),
    "Sub": _Op(_binary(torch.sub)),
    "Mul": _Op(_binary(torch.mul)),
    "Div": _Op(_binary(_div)),
    "Relu": _Op(_unary(torch.relu)),
    "Sigmoid": _Op(_unary(torch.sigmoid)),
    "Tanh": _Op(_unary(torch.tanh)),
    "Softmax": _Op(_softmax(torch.softmax)),
    "LogSoftmax": _Op(_softmax(torch.log_softmax)),
    "Conv": _Op(_conv),
    "BatchNormalization": _Op(_batch_normalization, max_outputs=3),
    # MaxPool's optional Indices output uses a flattening convention torch does not share.
    "MaxPool": _Op(_max_pool),
    "AveragePool": _Op(_average_pool),
    "GlobalAveragePool": _Op(_global_average_pool),
    "Flatten": _Op(_flatten),
    "Reshape": _Op(_reshape),
    "Shape": _Op(_shape),
    "Gather": _Op(_gather),
    "Concat": _Op(_concat),
    "Unsqueeze": _Op(_unsqueeze),
    "Squeeze": _Op(_squeeze),
    "Transpose": _Op(_transpose),
    "Identity": _Op(_unary(lambda x: x)),
    "Dropout": _Op(_dropout, max_outputs=2),
}
# Constant nodes are folded into buffers when the module is built (see _constant_value).
SUPPORTED_OPS: tuple[str, ...] = tuple(sorted([*_OPS, "Constant"]))


def _constant_value(node: onnx.NodeProto) -> np.ndarray:
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    if "value" in attrs:
        return tensor_to_array(attrs["value"])
    if "value_float" in attrs or "value_floats" in attrs:
        return np.asarray(attrs.get("value_float", attrs.get("value_floats")), dtype=np.float32)
    if "value_int" in attrs or "value_ints" in attrs:
        return np.asarray(attrs.get("value_int", attrs.get("value_ints")), dtype=np.int64)
    raise UnsupportedOperatorError(
        f"Constant node {node.name!r} uses {sorted(attrs)}; only numeric constants (value, "
        "value_float(s), value_int(s)) are supported. Store string or sparse data outside the model."
    )


def _decode_attrs(node: onnx.NodeProto) -> dict[str, Any]:
    attrs = {}
    for attribute in node.attribute:
        value = onnx.helper.get_attribute_value(attribute)
        attrs[attribute.name] = value.decode() if isinstance(value, bytes) else value
    return attrs


def _used_outputs(node: onnx.NodeProto) -> tuple[str, ...]:
    """Outputs up to the last named one: unnamed trailing optional outputs are not computed."""
    outputs = list(node.output)
    while outputs and not outputs[-1]:
        outputs.pop()
    return tuple(outputs)


def _torch_name(index: int, onnx_name: str) -> str:
    """A unique torch attribute name; torch forbids '.', which torch-exported ONNX names contain."""
    return f"i{index}_{re.sub(r'[^0-9A-Za-z_]', '_', onnx_name)}"


@dataclass(frozen=True)
class _Step:
    op: _Op
    op_type: str
    name: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: dict[str, Any]


class OnnxModule(torch.nn.Module):
    """A torch module that runs an ONNX graph; its trainable state is the graph's float initializers."""

    def __init__(self, model: onnx.ModelProto) -> None:
        super().__init__()
        opset = default_opset(model)
        if not MIN_OPSET <= opset <= MAX_OPSET:
            raise UnsupportedOperatorError(
                f"the model uses ONNX opset {opset}; the fedmq executor supports opsets "
                f"{MIN_OPSET}..{MAX_OPSET}. Convert it with onnx.version_converter.convert_version."
            )
        graph = model.graph
        self._check_nodes(graph)
        stats = running_stat_names(graph)
        initializer_names = {t.name for t in graph.initializer}
        self._trainable: dict[str, str] = {}
        self._stats: dict[str, str] = {}
        self._constants: dict[str, str] = {}
        self._batchnorm: set[str] = set()
        for index, tensor in enumerate(graph.initializer):
            self._add_initializer(index, tensor.name, tensor_to_array(tensor), tensor.data_type, stats)
        for node in graph.node:
            if node.op_type == "BatchNormalization":
                missing = [n for n in node.input[3:5] if n not in initializer_names]
                if missing:
                    raise OnnxExecutorError(
                        f"BatchNormalization node {node.name!r}: running statistics {missing} must be "
                        "initializers so training can update them, but they are computed by other "
                        "nodes. torch's exporter does this when it merges equal tensors in eval "
                        "mode; export with training=torch.onnx.TrainingMode.TRAINING instead."
                    )
                self._batchnorm.update(n for n in node.input[1:5] if n in initializer_names)
        offset = len(graph.initializer)
        for index, node in enumerate(n for n in graph.node if n.op_type == "Constant"):
            self._add_constant(offset + index, node.output[0], _constant_value(node))
        self._inputs = [i.name for i in graph.input if i.name not in initializer_names]
        self._outputs = [o.name for o in graph.output]
        self._steps = self._schedule(graph, set(self._inputs) | initializer_names | set(self._constants))

    @staticmethod
    def _check_nodes(graph: onnx.GraphProto) -> None:
        for node in graph.node:
            supported = node.domain in DEFAULT_DOMAINS and node.op_type in SUPPORTED_OPS
            if not supported:
                op = node.op_type if node.domain in DEFAULT_DOMAINS else f"{node.domain}::{node.op_type}"
                raise UnsupportedOperatorError(
                    f"operator {op} (node {node.name!r}) is not supported by the fedmq executor. "
                    f"Supported operators (default domain): {', '.join(SUPPORTED_OPS)}. "
                    "Rewrite the model with these operators."
                )
            limit = 1 if node.op_type == "Constant" else _OPS[node.op_type].max_outputs
            if len(_used_outputs(node)) > limit:
                raise UnsupportedOperatorError(
                    f"{node.op_type} node {node.name!r} asks for output #{len(_used_outputs(node)) - 1}; "
                    f"the executor produces only the first {limit} output(s) of this operator."
                )

    def _add_initializer(self, index: int, name: str, array: np.ndarray, data_type: int, stats: set[str]) -> None:
        tensor = torch.from_numpy(np.array(array))
        attribute = _torch_name(index, name)
        if data_type in FLOAT_TYPES and name not in stats:
            self.register_parameter(attribute, torch.nn.Parameter(tensor))
            self._trainable[name] = attribute
        elif data_type in FLOAT_TYPES:
            self.register_buffer(attribute, tensor)
            self._stats[name] = attribute
        else:
            self._add_constant(index, name, array)

    def _add_constant(self, index: int, name: str, array: np.ndarray) -> None:
        """Constants are structure, not state: kept out of state_dict so it only holds weights."""
        attribute = _torch_name(index, name)
        self.register_buffer(attribute, torch.from_numpy(np.array(array)), persistent=False)
        self._constants[name] = attribute

    @staticmethod
    def _schedule(graph: onnx.GraphProto, available: set[str]) -> list[_Step]:
        """Order nodes so every input exists before use; files are not always sorted."""
        pending = [n for n in graph.node if n.op_type != "Constant"]
        known = set(available) | {""}
        steps: list[_Step] = []
        while pending:
            waiting = []
            for node in pending:
                if not all(i in known for i in node.input):
                    waiting.append(node)
                    continue
                outputs = _used_outputs(node)
                steps.append(_Step(_OPS[node.op_type], node.op_type, node.name, tuple(node.input), outputs, _decode_attrs(node)))
                known.update(outputs)
            if len(waiting) == len(pending):
                node = waiting[0]
                missing = sorted(i for i in node.input if i not in known)
                raise OnnxExecutorError(
                    f"node {node.name!r} ({node.op_type}) consumes {missing}, which no graph input, "
                    "initializer or node produces (or the graph has a cycle)."
                )
            pending = waiting
        return steps

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Run the graph; one output comes back bare so simple models read like torch models."""
        if len(inputs) != len(self._inputs):
            raise OnnxExecutorError(f"the model takes {len(self._inputs)} input(s) {self._inputs}, got {len(inputs)}")
        for name, value in zip(self._inputs, inputs, strict=True):
            if not isinstance(value, torch.Tensor):
                raise OnnxExecutorError(f"input {name!r} must be a torch.Tensor, got {type(value).__name__}")
        env: dict[str, torch.Tensor] = {}
        for names in (self._trainable, self._stats, self._constants):
            env.update({onnx_name: getattr(self, attribute) for onnx_name, attribute in names.items()})
        env.update(zip(self._inputs, inputs, strict=True))
        for step in self._steps:
            call = _Call(
                node=step.name or step.op_type,
                inputs=[env[i] if i else None for i in step.inputs],
                attrs=step.attrs,
                num_outputs=len(step.outputs),
                training=self.training,
            )
            try:
                result = step.op.fn(call)
            except (RuntimeError, IndexError, TypeError) as exc:
                raise call.error(f"{step.op_type} failed: {exc}") from exc
            results = result if isinstance(result, tuple) else (result,)
            env.update((name, value) for name, value in zip(step.outputs, results) if name)
        outputs = tuple(env[name] for name in self._outputs)
        return outputs[0] if len(outputs) == 1 else outputs

    def onnx_parameters(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters keyed by ONNX initializer name, the name the federation uses."""
        return {name: getattr(self, attribute) for name, attribute in self._trainable.items()}

    def _float_state(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, attribute) for names in (self._trainable, self._stats) for name, attribute in names.items()}

    def onnx_state(self) -> dict[str, np.ndarray]:
        """Everything a model update carries (weights and BN statistics) as float32 arrays."""
        return {name: t.detach().cpu().to(torch.float32).numpy().copy() for name, t in self._float_state().items()}

    def load_onnx_state(self, arrays: Mapping[str, np.ndarray], *, strict: bool = True) -> None:
        """Overwrite weights/statistics, all or nothing.

        strict=False lets FedBN keep local BatchNorm layers by loading a subset of names.
        """
        state = self._float_state()
        unknown = sorted(set(arrays) - set(state))
        if unknown:
            raise OnnxExecutorError(f"unknown initializer name(s) {unknown[:5]}; this model has {sorted(state)[:5]}...")
        missing = sorted(set(state) - set(arrays))
        if strict and missing:
            raise OnnxExecutorError(f"state lacks initializer(s) {missing[:5]}; pass strict=False to load a subset")
        values = {}
        for name, value in arrays.items():
            array = np.asarray(value)
            target = state[name]
            if tuple(array.shape) != tuple(target.shape):
                raise OnnxExecutorError(
                    f"initializer {name!r} has shape {tuple(target.shape)} but the new value has {tuple(array.shape)}"
                )
            if not np.all(np.isfinite(array)):
                raise OnnxExecutorError(f"initializer {name!r}: the new value contains NaN or infinity")
            values[name] = torch.tensor(array, dtype=target.dtype)
        with torch.no_grad():
            for name, value in values.items():
                state[name].copy_(value)

    def batchnorm_names(self) -> set[str]:
        """ONNX names of BN scale/bias/mean/var, the layers FedBN keeps local to each hospital."""
        return set(self._batchnorm)
