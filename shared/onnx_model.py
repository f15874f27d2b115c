"""ONNX file helpers shared by the orchestrator and the edge agents.

Models travel and are stored as bytes identified by their sha256, so every helper that writes
a model produces canonical bytes: the same model and weights give the same file everywhere.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnx
import zstandard
from google.protobuf.message import DecodeError
from onnx import TensorProto, numpy_helper

from shared.onnx_executor import (
    FLOAT_TYPES,
    OnnxExecutorError,
    default_opset,
    running_stat_names,
    tensor_to_array,
)

DEFAULT_MAX_BYTES = 512 * 1024 * 1024


class InvalidModelError(OnnxExecutorError):
    """The bytes are not a valid, self-contained ONNX model."""


def load_model_bytes(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> onnx.ModelProto:
    """Parse and check untrusted model bytes before anything else touches them."""
    if not isinstance(data, bytes | bytearray | memoryview):
        raise InvalidModelError(f"model data must be bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise InvalidModelError("model data is empty; expected the contents of an .onnx file")
    if len(data) > max_bytes:
        raise InvalidModelError(
            f"model is {len(data)} bytes, over the {max_bytes}-byte limit; shrink the model or raise max_bytes"
        )
    model = onnx.ModelProto()
    try:
        model.ParseFromString(bytes(data))
    except DecodeError as exc:
        raise InvalidModelError(f"data is not an ONNX model (protobuf decoding failed: {exc})") from exc
    if not model.graph.node:
        raise InvalidModelError("the data decodes to a model without any graph nodes; is this really an .onnx file?")
    for tensor in model.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            raise InvalidModelError(
                f"initializer {tensor.name!r} refers to external data; fedmq only accepts self-contained "
                "models. Re-save with onnx.save_model(model, path, save_as_external_data=False)."
            )
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise InvalidModelError(f"the ONNX checker rejected the model: {exc}") from exc
    return model


def model_to_bytes(model: onnx.ModelProto) -> bytes:
    """Deterministic serialization: files are identified by sha256, so equal models must be equal bytes."""
    return model.SerializeToString(deterministic=True)


def sha256_hex(data: bytes) -> str:
    """The identifier under which a model file is stored and announced."""
    return hashlib.sha256(data).hexdigest()


def float_initializers(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Weights and BN statistics by ONNX name, in their stored dtype: what aggregation averages."""
    return {t.name: tensor_to_array(t) for t in model.graph.initializer if t.data_type in FLOAT_TYPES}


def replace_initializers(model: onnx.ModelProto, arrays: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """Return a copy with new float initializer values.

    Shapes and dtypes are kept so the graph stays valid, and values are stored as raw_data so
    the serialized bytes depend only on the values, not on how the original file encoded them.
    """
    tensors = {t.name: t for t in model.graph.initializer}
    new_tensors = {}
    for name, value in arrays.items():
        tensor = tensors.get(name)
        if tensor is None:
            raise InvalidModelError(f"the model has no initializer named {name!r}")
        if tensor.data_type not in FLOAT_TYPES:
            raise InvalidModelError(
                f"initializer {name!r} is {TensorProto.DataType.Name(tensor.data_type)}, not a float "
                "weight; only float initializers can be replaced"
            )
        array = np.asarray(value)
        if tuple(array.shape) != tuple(tensor.dims):
            raise InvalidModelError(
                f"initializer {name!r} has shape {tuple(tensor.dims)} but the new value has {tuple(array.shape)}"
            )
        if not np.issubdtype(array.dtype, np.number) or not np.all(np.isfinite(array)):
            raise InvalidModelError(f"initializer {name!r}: the new value must be finite numbers")
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        new_tensors[name] = numpy_helper.from_array(np.ascontiguousarray(array, dtype=dtype), name)
    result = onnx.ModelProto()
    result.CopyFrom(model)
    for tensor in result.graph.initializer:
        if tensor.name in new_tensors:
            tensor.CopyFrom(new_tensors[tensor.name])
    return result


def _value_info(info: onnx.ValueInfoProto) -> dict[str, Any]:
    tensor_type = info.type.tensor_type
    shape = [dim.dim_param or (dim.dim_value if dim.HasField("dim_value") else None) for dim in tensor_type.shape.dim]
    dtype = TensorProto.DataType.Name(tensor_type.elem_type).lower()
    return {"name": info.name, "shape": shape, "dtype": dtype}


def describe(model: onnx.ModelProto) -> dict[str, Any]:
    """A JSON-friendly summary for the model registry and the CLI."""
    initializer_names = {t.name for t in model.graph.initializer}
    stats = running_stat_names(model.graph)
    trainable = [
        t for t in model.graph.initializer if t.data_type in FLOAT_TYPES and t.name not in stats
    ]
    return {
        "inputs": [_value_info(i) for i in model.graph.input if i.name not in initializer_names],
        "outputs": [_value_info(o) for o in model.graph.output],
        "opset": default_opset(model),
        "parameters": sum(int(np.prod(t.dims)) for t in trainable),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
    }


def pack_model(model_bytes: bytes, level: int = 3) -> bytes:
    """The full model as it travels to a site without a usable base: zstd-compressed ONNX."""
    return zstandard.ZstdCompressor(level=level, write_content_size=True).compress(model_bytes)


def unpack_model(data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """Inverse of ``pack_model``, refusing frames that would inflate past ``max_bytes``."""
    try:
        params = zstandard.get_frame_parameters(data)
        if params.content_size > max_bytes:
            raise InvalidModelError(f"packed model declares {params.content_size} bytes, above the {max_bytes}-byte "
                                    "limit; raise max_blob_bytes if this model is expected")
        return zstandard.ZstdDecompressor().decompress(data, max_output_size=max_bytes)
    except zstandard.ZstdError as e:
        raise InvalidModelError(f"packed model is not a valid zstd frame: {e}") from None
