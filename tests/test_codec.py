"""Update codec, compression policy and error feedback: round trips, ratios and a hostile decoder."""

from __future__ import annotations

import json
import logging
import math
import struct
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from shared import codec, compression
from shared.codec import (
    FORMAT_VERSION,
    MAX_HEADER_BYTES,
    CodecError,
    CompressionSettings,
    apply_model_delta,
    decode_tensors,
    encode_model_delta,
    encode_tensors,
    iter_decoded,
)
from shared.compression import ErrorFeedback, ErrorFeedbackStateError

PREFIX = struct.Struct("<4sBBHIQ")  # the documented wire prefix, restated so tests catch drift
LIMIT = 64 * 1024 * 1024
HOSTILE = settings(max_examples=150, deadline=2000, suppress_health_check=[HealthCheck.too_slow])

SPARSE_F32 = CompressionSettings(mode="sparse", topk_fraction=0.05, quantization="none", zstd_level=0)


def make_model(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(0, 0.02, (16, 8, 3, 3)).astype(np.float32),
        "conv.bias": rng.normal(0, 0.02, (16,)).astype(np.float32),
        "fc.weight": rng.normal(0, 0.02, (32, 64)).astype(np.float32),
        "fc.bias": rng.normal(0, 0.02, (32,)).astype(np.float32),
    }


def shapes_of(tensors: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {name: array.shape for name, array in tensors.items()}


def split_message(data: bytes) -> tuple[dict, bytes]:
    """(header, buffer section) of a message the tests trust."""
    _, _, flags, _, header_len, _ = PREFIX.unpack_from(data)
    payload = data[PREFIX.size:]
    if flags & 1:
        payload = zstandard.ZstdDecompressor().decompress(payload)
    return json.loads(payload[:header_len]), payload[header_len:]


ITEMSIZE = {"dense_f32": 4, "dense_f16": 2, "dense_i8": 1, "delta_exact": 4, "f32": 4, "f16": 2, "int8": 1}


def spans_of(header: dict) -> dict[str, dict[str, tuple[int, int]]]:
    """(offset, length) of every tensor's buffers, derived as the format documents: positions first."""
    spans: dict[str, dict[str, tuple[int, int]]] = {entry["name"]: {} for entry in header["tensors"]}
    offset = 0
    for entry in header["tensors"]:
        if "index_bytes" in entry:
            spans[entry["name"]]["indices"] = (offset, entry["index_bytes"])
            offset += entry["index_bytes"]
    for entry in header["tensors"]:
        count = entry["nnz"] if "nnz" in entry else math.prod(entry["shape"])
        size = count * ITEMSIZE[entry.get("value_dtype", entry["encoding"])]
        spans[entry["name"]]["values"] = (offset, size)
        offset += size
    return spans


def build_message(header: dict | bytes, buffers: bytes, *, compress: bool = False, header_len: int | None = None,
                  buffers_len: int | None = None, version: int = FORMAT_VERSION, flags: int | None = None,
                  magic: bytes = b"FMQC") -> bytes:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    prefix = PREFIX.pack(magic, version, (1 if compress else 0) if flags is None else flags, 0,
                         len(raw) if header_len is None else header_len,
                         len(buffers) if buffers_len is None else buffers_len)
    payload = raw + buffers
    return prefix + (zstandard.ZstdCompressor().compress(payload) if compress else payload)


def sparse_message(index_bytes: bytes, values: np.ndarray, *, nnz: int, shape: tuple[int, ...] = (16,),
                   coding: str = "varint", value_dtype: str = "f32", scale: float | None = None) -> bytes:
    """A hand-made one-tensor sparse message named 'w', for crafting bad index/value buffers."""
    entry = {"name": "w", "shape": list(shape), "encoding": "sparse", "nnz": nnz, "index_coding": coding,
             "index_bytes": len(index_bytes), "value_dtype": value_dtype}
    if scale is not None:
        entry["scale"] = scale
    return build_message({"dtype": "float32", "tensors": [entry]}, index_bytes + values.tobytes())


def decode_or_codec_error(data: bytes, expected: dict[str, tuple[int, ...]]) -> str:
    """The decoder's contract on untrusted input: a valid update or CodecError, nothing else."""
    try:
        result = decode_tensors(data, expected, max_decoded_bytes=LIMIT)
    except CodecError:
        return "rejected"
    assert result.keys() == expected.keys()
    for name, array in result.items():
        assert array.shape == expected[name] and array.dtype == np.float32
        assert np.isfinite(array).all()
    return "valid"


def topk_reference(flat: np.ndarray, k: int) -> set[int]:
    """Top-k by magnitude with ties to the lowest index, the slow obvious way."""
    order = sorted(range(flat.size), key=lambda i: (-abs(float(flat[i])), i))
    return {i for i in order[:k] if flat[i] != 0}


# --- round trips ----------------------------------------------------------------------


@pytest.mark.parametrize("zstd_level", [0, 3])
def test_dense_f32_round_trip_is_bit_exact(zstd_level: int) -> None:
    model = make_model()
    model["scalar"] = np.array(1.5, dtype=np.float32)
    model["empty"] = np.zeros((0, 4), dtype=np.float32)
    model["negzero"] = np.array([-0.0, 0.0, 1e-45], dtype=np.float32)
    data = encode_tensors(model, CompressionSettings(zstd_level=zstd_level))
    out = decode_tensors(data, shapes_of(model), max_decoded_bytes=LIMIT)
    assert out.keys() == model.keys()
    for name, array in model.items():
        assert out[name].dtype == np.float32 and out[name].shape == array.shape
        assert np.array_equal(out[name].view(np.uint32), array.view(np.uint32)), name


def test_dense_f16_within_half_precision_bound() -> None:
    rng = np.random.default_rng(1)
    values = np.concatenate([rng.normal(0, 1, 5000), rng.normal(0, 1e-6, 1000), [60000.0, -1e-8]]).astype(np.float32)
    data = encode_tensors({"w": values}, CompressionSettings(dense_dtype="float16"))
    out = decode_tensors(data, {"w": values.shape}, max_decoded_bytes=LIMIT)["w"]
    bound = np.abs(values) * 2.0**-11 + 2.0**-25  # half an ulp, relative for normals, absolute for subnormals
    assert np.all(np.abs(out - values) <= bound)
    assert len(data) < values.nbytes * 0.55


def test_dense_f16_refuses_values_beyond_its_range() -> None:
    with pytest.raises(CodecError, match=r"'w'.*float16 range"):
        encode_tensors({"w": np.array([1.0, 70000.0], dtype=np.float32)}, CompressionSettings(dense_dtype="float16"))


def test_sparse_f32_exact_at_kept_positions_and_zero_elsewhere() -> None:
    model = make_model(2)
    out = decode_tensors(encode_tensors(model, SPARSE_F32), shapes_of(model), max_decoded_bytes=LIMIT)
    for name, array in model.items():
        flat, got = array.reshape(-1), out[name].reshape(-1)
        if flat.size < SPARSE_F32.min_sparse_numel:
            assert np.array_equal(got, flat), f"{name} is small, so it must go dense"
            continue
        kept = topk_reference(flat, round(0.05 * flat.size))
        assert set(np.flatnonzero(got)) == kept
        idx = sorted(kept)
        assert np.array_equal(got[idx], flat[idx])


def test_topk_breaks_ties_by_lowest_index_and_skips_zeros() -> None:
    flat = np.array([1, -3, 3, 0, 3, -3, 2, 0], dtype=np.float32)
    assert compression.select_topk(flat, 3).tolist() == [1, 2, 4]
    assert compression.select_topk(np.array([0, 0, 5, 0], dtype=np.float32), 3).tolist() == [2]
    assert compression.select_topk(flat, 0).tolist() == []


@given(st.lists(st.sampled_from([0.0, 1.0, -1.0, 2.5, -2.5, 1e-3, 7.0]), min_size=1, max_size=300),
       st.floats(min_value=0.001, max_value=1.0))
@settings(max_examples=100, deadline=None)
def test_topk_matches_reference_and_survives_the_wire(values: list[float], fraction: float) -> None:
    flat = np.array(values, dtype=np.float32)
    config = CompressionSettings(mode="sparse", topk_fraction=fraction, quantization="none", min_sparse_numel=0,
                                 zstd_level=0)
    k = compression.topk_size(flat.size, config)
    kept = topk_reference(flat, k)
    assert set(compression.select_topk(flat, k).tolist()) == kept
    got = decode_tensors(encode_tensors({"w": flat}, config), {"w": flat.shape}, max_decoded_bytes=LIMIT)["w"]
    expected = np.zeros_like(flat)
    expected[sorted(kept)] = flat[sorted(kept)]
    assert np.array_equal(got, expected)


def test_topk_count_is_capped_at_tensor_size() -> None:
    flat = np.arange(1, 301, dtype=np.float32)
    config = CompressionSettings(mode="sparse", topk_count=10_000, quantization="none", zstd_level=0)
    out = decode_tensors(encode_tensors({"w": flat}, config), {"w": flat.shape}, max_decoded_bytes=LIMIT)
    assert np.array_equal(out["w"], flat)


def int8_scale_of(data: bytes) -> np.float32:
    (entry,) = split_message(data)[0]["tensors"]
    assert entry["value_dtype"] == "int8"
    return np.float32(entry["scale"])


def test_sparse_int8_round_to_nearest_within_half_scale() -> None:
    rng = np.random.default_rng(3)
    flat = rng.normal(0, 1, 20_000).astype(np.float32)
    config = CompressionSettings(mode="sparse", topk_fraction=0.1, quantization="int8")
    data = encode_tensors({"w": flat}, config)
    scale = int8_scale_of(data)
    assert scale == np.float32(float(np.abs(flat).max()) / 127)
    got = decode_tensors(data, {"w": flat.shape}, max_decoded_bytes=LIMIT)["w"]
    kept = np.flatnonzero(got)
    assert set(kept.tolist()) == topk_reference(flat, 2000)
    err = np.abs(got[kept] - flat[kept])
    assert err.max() <= scale / 2 * (1 + 1e-5)


def test_sparse_int8_stochastic_rounding_is_within_scale_and_unbiased() -> None:
    flat = np.linspace(-1, 1, 4001, dtype=np.float32)
    config = CompressionSettings(mode="sparse", topk_fraction=1.0, quantization="int8", stochastic_rounding=True)
    rng = np.random.default_rng(4)
    decoded = [decode_tensors(encode_tensors({"w": flat}, config, rng=rng), {"w": flat.shape},
                              max_decoded_bytes=LIMIT)["w"] for _ in range(200)]
    scale = np.float32(1 / 127)
    errors = np.stack(decoded) - flat
    assert np.abs(errors).max() <= scale * (1 + 1e-5)
    # Round-to-nearest errors are systematic (mean |bias| ~ scale/4); stochastic ones average out.
    assert np.abs(errors.mean(axis=0)).mean() < scale * 0.06
    assert not np.array_equal(decoded[0], decoded[1])


def test_sparse_fp16_values() -> None:
    flat = np.random.default_rng(5).normal(0, 1, 1000).astype(np.float32)
    config = CompressionSettings(mode="sparse", topk_count=100, quantization="fp16")
    got = decode_tensors(encode_tensors({"w": flat}, config), {"w": flat.shape}, max_decoded_bytes=LIMIT)["w"]
    kept = np.flatnonzero(got)
    assert kept.size == 100
    assert np.all(np.abs(got[kept] - flat[kept]) <= np.abs(flat[kept]) * 2.0**-11)


@pytest.mark.parametrize(("fraction", "coding"), [(0.01, "varint"), (0.5, "bitmap")])
def test_position_coding_picks_the_smaller(fraction: float, coding: str) -> None:
    flat = np.random.default_rng(6).normal(0, 1, 50_000).astype(np.float32)
    config = CompressionSettings(mode="sparse", topk_fraction=fraction, quantization="none", zstd_level=0)
    data = encode_tensors({"w": flat}, config)
    (entry,) = split_message(data)[0]["tensors"]
    assert entry["index_coding"] == coding
    k = round(fraction * flat.size)
    index_bytes = entry["index_bytes"]
    if coding == "varint":
        assert k <= index_bytes < flat.size // 8
    else:
        assert index_bytes == flat.size // 8
    got = decode_tensors(data, {"w": flat.shape}, max_decoded_bytes=LIMIT)["w"]
    assert np.count_nonzero(got) == k


def test_varint_positions_with_multi_byte_gaps() -> None:
    flat = np.zeros(5_000_000, dtype=np.float32)
    positions = [0, 127, 255, 256 + 16_384, 3_000_000, 4_999_999]
    flat[positions] = np.arange(1, len(positions) + 1)
    config = CompressionSettings(mode="sparse", topk_count=len(positions), quantization="none")
    data = encode_tensors({"w": flat}, config)
    (entry,) = split_message(data)[0]["tensors"]
    assert entry["index_coding"] == "varint" and entry["index_bytes"] == 1 + 1 + 2 + 3 + 4 + 3
    got = decode_tensors(data, {"w": flat.shape}, max_decoded_bytes=LIMIT)["w"]
    assert np.array_equal(got, flat)


def test_one_percent_int8_of_a_million_floats_is_over_100x_smaller() -> None:
    flat = np.random.default_rng(7).normal(0, 1e-3, 1_000_000).astype(np.float32)
    data = encode_tensors({"w": flat}, CompressionSettings(mode="sparse", topk_fraction=0.01))
    assert flat.nbytes / len(data) >= 100, len(data)


SMALL_INT8 = CompressionSettings(mode="sparse", topk_fraction=0.05, dense_dtype="int8")


def test_dense_int8_small_tensors_within_half_scale() -> None:
    model = make_model(12)
    model["zeros"] = np.zeros(7, np.float32)
    model["empty"] = np.zeros((0, 3), np.float32)
    data = encode_tensors(model, SMALL_INT8)
    header, _ = split_message(data)
    entries = {entry["name"]: entry for entry in header["tensors"]}
    out = decode_tensors(data, shapes_of(model), max_decoded_bytes=LIMIT)
    for name in ("conv.bias", "fc.bias", "zeros", "empty"):
        assert entries[name]["encoding"] == "dense_i8"
        flat = model[name].reshape(-1)
        scale = np.float32(entries[name]["scale"])
        assert scale == np.float32(float(np.abs(flat).max(initial=0.0)) / 127)
        assert out[name].shape == model[name].shape
        assert np.all(np.abs(out[name].reshape(-1) - flat) <= scale / 2 * (1 + 1e-5))
    assert entries["fc.weight"]["encoding"] == "sparse"
    assert not out["zeros"].any()


def test_dense_int8_stochastic_rounding_is_unbiased() -> None:
    flat = np.linspace(-1, 1, 201, dtype=np.float32)
    config = CompressionSettings(mode="sparse", topk_fraction=0.5, dense_dtype="int8", stochastic_rounding=True)
    rng = np.random.default_rng(13)
    decoded = np.stack([decode_tensors(encode_tensors({"b": flat}, config, rng=rng), {"b": flat.shape},
                                       max_decoded_bytes=LIMIT)["b"] for _ in range(300)])
    scale = np.float32(1 / 127)
    assert np.abs(decoded - flat).max() <= scale * (1 + 1e-5)
    assert np.abs((decoded - flat).mean(axis=0)).mean() < scale * 0.06


def test_dense_int8_keeps_named_dense_tensors_in_float16_and_needs_sparse_mode() -> None:
    rng = np.random.default_rng(14)
    tensors = {"bn.running_var": rng.random(64, dtype=np.float32) * 1e-2 + 1e-3,
               "bn.weight": rng.random(64, dtype=np.float32)}
    config = CompressionSettings(mode="sparse", topk_fraction=0.01, dense_dtype="int8",
                                 dense_tensors=("bn.running_var",))
    data = encode_tensors(tensors, config)
    encodings = {entry["name"]: entry["encoding"] for entry in split_message(data)[0]["tensors"]}
    assert encodings == {"bn.running_var": "dense_f16", "bn.weight": "dense_i8"}
    out = decode_tensors(data, shapes_of(tensors), max_decoded_bytes=LIMIT)
    np.testing.assert_allclose(out["bn.running_var"], tensors["bn.running_var"], rtol=2.0**-11)
    with pytest.raises(ValidationError, match="only applies to mode='sparse'"):
        CompressionSettings(dense_dtype="int8")


@given(st.floats(min_value=0.0, max_value=float(np.finfo(np.float32).max / np.float32(127)), width=32))
@settings(max_examples=300, deadline=None)
def test_scales_travel_as_short_decimals_that_read_back_exactly(scale: float) -> None:
    wire = codec._json_scale(np.float32(scale))
    assert np.float32(json.loads(json.dumps(wire))) == np.float32(scale)
    assert len(repr(wire)) <= len(repr(float(np.float32(scale))))


ITEMSIZE_DTYPE = {"f32": "<f4", "f16": "<f2", "int8": "i1"}


def positions_by_hand(raw: bytes, entry: dict, numel: int) -> np.ndarray:
    """Positions from a varint gap stream or a bitmap, the slow obvious way."""
    if entry["index_coding"] == "bitmap":
        return np.flatnonzero(np.unpackbits(np.frombuffer(raw, np.uint8), bitorder="little")[:numel])
    gaps, value, shift = [], 0, 0
    for byte in raw:
        value |= (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            gaps.append(value)
            value, shift = 0, 0
    return np.cumsum(gaps, dtype=np.int64) - 1


def test_layout_is_positions_then_values_in_header_order() -> None:
    """The documented layout, restated: decoding by hand with spans_of gives what the decoder gives."""
    model = make_model(15)
    for config in (SPARSE_F32, SMALL_INT8.model_copy(update={"zstd_level": 0})):
        data = encode_tensors(model, config)
        header, buffers = split_message(data)
        assert header["dtype"] == "float32" and set(header) == {"dtype", "tensors"}
        spans = spans_of(header)
        assert sum(length for tensor in spans.values() for _, length in tensor.values()) == len(buffers)
        first_value = min(start for tensor in spans.values() for start, _ in [tensor["values"]])
        assert all(tensor["indices"][0] < first_value for tensor in spans.values() if "indices" in tensor)
        out = decode_tensors(data, shapes_of(model), max_decoded_bytes=LIMIT)
        for entry in header["tensors"]:
            start, length = spans[entry["name"]]["values"]
            raw = buffers[start:start + length]
            if entry["encoding"] == "dense_i8":
                expected = np.frombuffer(raw, np.int8).astype(np.float32) * np.float32(entry["scale"])
                assert np.array_equal(out[entry["name"]].reshape(-1), expected)
            elif entry["encoding"] == "sparse":
                start, length = spans[entry["name"]]["indices"]
                positions = positions_by_hand(buffers[start:start + length], entry, math.prod(entry["shape"]))
                values = np.frombuffer(raw, ITEMSIZE_DTYPE[entry["value_dtype"]]).astype(np.float32)
                if "scale" in entry:
                    values = values * np.float32(entry["scale"])
                assert np.array_equal(out[entry["name"]].reshape(-1)[positions], values)
                assert np.count_nonzero(out[entry["name"]]) == np.count_nonzero(values)


def test_version_1_messages_are_refused_by_name() -> None:
    data = bytearray(encode_tensors(make_model(), CompressionSettings()))
    data[4] = 1
    with pytest.raises(CodecError, match="unsupported format version 1, this decoder reads 2"):
        decode_tensors(bytes(data), shapes_of(make_model()), max_decoded_bytes=LIMIT)


def test_iter_decoded_validates_the_whole_update_before_the_first_tensor() -> None:
    model = make_model()
    header, buffers = split_message(encode_tensors(model, CompressionSettings(zstd_level=0)))
    last = header["tensors"][-1]
    bad = bytearray(buffers)
    start, _ = spans_of(header)[last["name"]]["values"]
    bad[start:start + 4] = np.float32(np.nan).tobytes()
    with pytest.raises(CodecError, match=rf"{last['name']}.*NaN"):
        iter_decoded(build_message(header, bytes(bad)), shapes_of(model), max_decoded_bytes=LIMIT)
    good = iter_decoded(build_message(header, buffers), shapes_of(model), max_decoded_bytes=LIMIT)
    first_name, first = next(good)
    assert first_name == header["tensors"][0]["name"] and np.array_equal(first, model[first_name])


def test_decoder_accepts_any_contiguous_buffer_and_checks_its_arguments() -> None:
    model = make_model()
    data = encode_tensors(model, CompressionSettings())
    for buffer in (bytearray(data), memoryview(data), memoryview(np.frombuffer(data, np.uint8))):
        assert decode_tensors(buffer, shapes_of(model), max_decoded_bytes=LIMIT).keys() == model.keys()
    with pytest.raises(CodecError, match="contiguous"):
        decode_tensors(memoryview(data + data)[::2], shapes_of(model), max_decoded_bytes=LIMIT)
    for limit in (-1, True, 1.5e9):
        with pytest.raises(CodecError, match="max_decoded_bytes must be"):
            decode_tensors(data, shapes_of(model), max_decoded_bytes=limit)  # type: ignore[arg-type]
    with pytest.raises(CodecError, match="expected must map"):
        decode_tensors(data, list(model), max_decoded_bytes=LIMIT)  # type: ignore[arg-type]


def test_decoded_arrays_are_writable_and_independent() -> None:
    model = make_model()
    data = encode_tensors(model, CompressionSettings(zstd_level=0))
    out = decode_tensors(data, shapes_of(model), max_decoded_bytes=LIMIT)
    out["fc.bias"] += 1
    again = decode_tensors(data, shapes_of(model), max_decoded_bytes=LIMIT)
    assert np.array_equal(again["fc.bias"], model["fc.bias"])


# --- encoder input validation ----------------------------------------------------------


@pytest.mark.parametrize(("tensors", "message"), [
    ({"w": np.zeros(3, dtype=np.float64)}, "'w'.*float64"),
    ({"w": np.array([1.0, np.nan], dtype=np.float32)}, "'w'.*NaN"),
    ({"w": np.array([np.inf], dtype=np.float32)}, "'w'.*Inf"),
    ({"w": [1.0, 2.0]}, "'w'.*numpy array"),
    ({"": np.zeros(1, dtype=np.float32)}, "non-empty"),
    ({"x" * 2000: np.zeros(1, dtype=np.float32)}, "at most 1024"),
    ({"w": np.broadcast_to(np.float32(0), (2**31,))}, "2147483648 elements exceeds"),
    ([("w", np.zeros(1, dtype=np.float32))], "must be a mapping"),
])
def test_encode_rejects_bad_tensors(tensors: dict, message: str) -> None:
    with pytest.raises(CodecError, match=message):
        encode_tensors(tensors, CompressionSettings())


def test_encode_rejects_bad_settings_and_oversized_headers() -> None:
    with pytest.raises(CodecError, match="settings must be CompressionSettings"):
        encode_tensors({"w": np.zeros(1, np.float32)}, {"mode": "dense"})  # type: ignore[arg-type]
    many = {f"{i:05d}" + "x" * 1000: np.zeros(1, np.float32) for i in range(4500)}
    with pytest.raises(CodecError, match=r"header is .* bytes, over the"):
        encode_tensors(many, CompressionSettings())
    huge = np.array([np.finfo(np.float32).max, 1], dtype=np.float32)
    with pytest.raises(CodecError, match=r"'w': magnitude .* too large for int8"):
        encode_tensors({"w": huge}, CompressionSettings(mode="sparse", topk_count=2, min_sparse_numel=0))


def test_all_zero_and_empty_tensors_in_sparse_mode() -> None:
    tensors = {"zeros": np.zeros(1000, np.float32), "empty": np.zeros((0, 3), np.float32)}
    config = CompressionSettings(mode="sparse", topk_fraction=0.1, min_sparse_numel=0)
    data = encode_tensors(tensors, config)
    assert {entry["name"]: entry["nnz"] for entry in split_message(data)[0]["tensors"]} == {"zeros": 0, "empty": 0}
    out = decode_tensors(data, shapes_of(tensors), max_decoded_bytes=LIMIT)
    assert not out["zeros"].any() and out["empty"].shape == (0, 3)
    with pytest.raises(ValueError, match=r"k=5 outside 0\.\.4"):
        compression.select_topk(np.ones(4, np.float32), 5)


def test_settings_validation_and_json_round_trip() -> None:
    sparse = CompressionSettings(mode="sparse", topk_fraction=0.01, stochastic_rounding=True)
    assert CompressionSettings.model_validate_json(sparse.model_dump_json()) == sparse
    assert CompressionSettings.model_validate(json.loads(sparse.model_dump_json())) == sparse
    with pytest.raises(ValidationError):
        sparse.topk_fraction = 0.5  # type: ignore[misc]
    for bad in [dict(mode="sparse"), dict(mode="sparse", topk_fraction=0.1, topk_count=5),
                dict(mode="sparse", topk_fraction=0.0), dict(mode="sparse", topk_fraction=1.5),
                dict(mode="sparse", topk_count=0), dict(topk_count=5), dict(stochastic_rounding=True),
                dict(mode="sparse", topk_count=5, quantization="fp16", stochastic_rounding=True),
                dict(zstd_level=20), dict(min_sparse_numel=-1), dict(compression="lz4")]:
        with pytest.raises(ValidationError):
            CompressionSettings(**bad)


# --- lossless model deltas -------------------------------------------------------------


def test_model_delta_is_bit_exact_and_carries_only_changes() -> None:
    base = make_model(8)
    base["special"] = np.array([0.0, -0.0, np.nan, 1.0, np.inf], dtype=np.float32)
    base_copy = {name: array.copy() for name, array in base.items()}
    new = {name: array.copy() for name, array in base.items()}
    new["fc.weight"][3, :5] += 0.5
    new["special"][:] = [-0.0, 0.0, np.nan, np.float32(1.0).view(np.uint32).view(np.float32), -np.inf]
    new["special"].view(np.uint32)[2] = 0x7FC00123  # a different NaN payload
    data = encode_model_delta(base, new)
    headers = {entry["name"]: entry for entry in split_message(data)[0]["tensors"]}
    assert headers["fc.weight"]["nnz"] == 5 and headers["conv.weight"]["nnz"] == 0
    assert headers["special"]["nnz"] == 4  # 0->-0, -0->0, NaN payload, inf->-inf; 1.0 unchanged
    rebuilt = apply_model_delta(base, data, max_decoded_bytes=LIMIT)
    for name, array in new.items():
        assert np.array_equal(rebuilt[name].view(np.uint32), array.view(np.uint32)), name
        assert np.array_equal(base[name].view(np.uint32), base_copy[name].view(np.uint32)), "base was modified"
    assert len(data) < 400


def test_model_delta_rejects_mismatched_models_and_wrong_message_kind() -> None:
    base = make_model()
    with pytest.raises(CodecError, match="only in new"):
        encode_model_delta(base, {**base, "extra": np.zeros(2, dtype=np.float32)})
    with pytest.raises(CodecError, match=r"fc\.bias.*shape"):
        encode_model_delta(base, {**base, "fc.bias": np.zeros(3, dtype=np.float32)})
    delta = encode_model_delta(base, base)
    update = encode_tensors(base, CompressionSettings())
    with pytest.raises(CodecError, match="encoding 'delta_exact' not allowed"):
        decode_tensors(delta, shapes_of(base), max_decoded_bytes=LIMIT)
    with pytest.raises(CodecError, match="encoding 'dense_f32' not allowed"):
        apply_model_delta(base, update, max_decoded_bytes=LIMIT)
    with pytest.raises(CodecError, match="shape"):
        apply_model_delta({**base, "fc.bias": np.zeros(3, dtype=np.float32)}, delta, max_decoded_bytes=LIMIT)
    with pytest.raises(CodecError, match="max_decoded_bytes"):
        apply_model_delta(base, delta, max_decoded_bytes=1000)


# --- error feedback --------------------------------------------------------------------


EF_SETTINGS = CompressionSettings(mode="sparse", topk_fraction=0.02, quantization="int8", stochastic_rounding=True)


def rounds_of_deltas(n: int, seed: int = 9) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"w": rng.normal(0, 1e-2, (40, 50)).astype(np.float32),
             "b": rng.normal(0, 1e-2, (50,)).astype(np.float32)} for _ in range(n)]


def test_error_feedback_loses_nothing(tmp_path: Path) -> None:
    feedback = ErrorFeedback(tmp_path / "ef.npz")
    deltas = rounds_of_deltas(12)
    rng = np.random.default_rng(10)
    sent = {name: np.zeros(array.shape, dtype=np.float64) for name, array in deltas[0].items()}
    for i, delta in enumerate(deltas):
        data = feedback.encode(delta, EF_SETTINGS, update_id=f"round-{i}", rng=rng)
        for name, array in decode_tensors(data, shapes_of(delta), max_decoded_bytes=LIMIT).items():
            sent[name] += array
        feedback.commit(f"round-{i}")
    residual = feedback.residual
    assert np.abs(residual["w"]).max() > 1e-3, "top-2% must leave a residual"
    assert not residual["b"].any(), "'b' is under min_sparse_numel, so it goes dense and exact"
    for name, received in sent.items():
        total = np.sum([delta[name] for delta in deltas], axis=0, dtype=np.float64)
        np.testing.assert_allclose(received + residual[name], total, atol=1e-5)
    without = np.zeros((40, 50))
    for delta in deltas:
        without += decode_tensors(encode_tensors(delta, EF_SETTINGS, rng=rng), shapes_of(delta),
                                  max_decoded_bytes=LIMIT)["w"]
    true_w = np.sum([delta["w"] for delta in deltas], axis=0)
    assert np.linalg.norm(sent["w"] - true_w) < np.linalg.norm(without - true_w)


def test_error_feedback_carries_the_int8_rounding_of_small_tensors() -> None:
    feedback = ErrorFeedback(None)
    config = EF_SETTINGS.model_copy(update={"dense_dtype": "int8"})
    deltas = rounds_of_deltas(6)
    sent = np.zeros(50)
    for i, delta in enumerate(deltas):
        data = feedback.encode(delta, config, update_id=f"r{i}", rng=np.random.default_rng(i))
        sent += decode_tensors(data, shapes_of(delta), max_decoded_bytes=LIMIT)["b"]
        feedback.commit(f"r{i}")
    residual = feedback.residual["b"]
    assert residual.any(), "int8 rounding of the dense 'b' must leave a residual"
    np.testing.assert_allclose(sent + residual, np.sum([d["b"] for d in deltas], axis=0), atol=1e-6)
    assert np.abs(residual).max() < 1e-2 / 127 * 4  # one step of the int8 grid, not whole updates


def test_error_feedback_residual_and_pending_update_survive_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "ef.npz"
    deltas = rounds_of_deltas(2)
    first = ErrorFeedback(path)
    first.encode(deltas[0], EF_SETTINGS, update_id="r0", rng=np.random.default_rng(0))
    first.commit("r0")
    committed = first.residual
    data = first.encode(deltas[1], EF_SETTINGS, update_id="r1", rng=np.random.default_rng(1))
    # Crash before the acknowledgement: the restarted agent can re-send the very same bytes.
    second = ErrorFeedback(path)
    assert second.pending == ("r1", data)
    for name in committed:
        assert np.array_equal(second.residual[name], committed[name])
    second.commit("r1")
    third = ErrorFeedback(path)
    assert third.pending is None
    decoded = decode_tensors(data, shapes_of(deltas[1]), max_decoded_bytes=LIMIT)
    for name in committed:
        np.testing.assert_allclose(third.residual[name], committed[name] + deltas[1][name] - decoded[name],
                                   atol=1e-7)
    assert not list(path.parent.glob("*.tmp"))


def test_error_feedback_protocol(tmp_path: Path) -> None:
    feedback = ErrorFeedback(tmp_path / "ef.npz")
    delta = rounds_of_deltas(1)[0]
    feedback.encode(delta, EF_SETTINGS, update_id="a")
    with pytest.raises(ErrorFeedbackStateError, match="'a' is still pending"):
        feedback.encode(delta, EF_SETTINGS, update_id="b")
    with pytest.raises(ErrorFeedbackStateError, match="'a', not 'b'"):
        feedback.commit("b")
    feedback.discard("a")
    assert feedback.residual == {} and feedback.pending is None
    with pytest.raises(ErrorFeedbackStateError, match="no update is pending"):
        feedback.commit("a")
    with pytest.raises(ValueError, match="update_id"):
        feedback.encode(delta, EF_SETTINGS, update_id="")
    feedback.encode(delta, EF_SETTINGS, update_id="c")
    feedback.commit("c")
    assert feedback.residual
    feedback.reset()
    assert feedback.residual == {} and ErrorFeedback(tmp_path / "ef.npz").residual == {}


def test_error_feedback_leaves_residual_alone_outside_sparse_mode() -> None:
    feedback = ErrorFeedback(None)
    deltas = rounds_of_deltas(2)
    feedback.encode(deltas[0], EF_SETTINGS, update_id="s")
    feedback.commit("s")
    before = feedback.residual
    for update_id, config in [("d", CompressionSettings()),
                              ("n", EF_SETTINGS.model_copy(update={"error_feedback": False}))]:
        data = feedback.encode(deltas[1], config, update_id=update_id)
        feedback.commit(update_id)
        assert data and all(np.array_equal(feedback.residual[n], before[n]) for n in before)


def write_npy(path: Path) -> None:
    with path.open("wb") as handle:
        np.save(handle, np.zeros(3))


def write_npz(path: Path, meta: bytes, **arrays: np.ndarray) -> None:
    with path.open("wb") as handle:
        np.savez(handle, meta=np.frombuffer(meta, dtype=np.uint8), **arrays)


def test_error_feedback_drops_residual_that_no_longer_fits(caplog: pytest.LogCaptureFixture) -> None:
    feedback = ErrorFeedback(None)
    feedback.encode(rounds_of_deltas(1)[0], EF_SETTINGS, update_id="a")
    feedback.commit("a")
    reshaped = {"w": np.full((50, 40), 1e-3, np.float32)}
    with caplog.at_level(logging.WARNING, logger="shared.compression"):
        data = feedback.encode(reshaped, EF_SETTINGS, update_id="b")
    feedback.commit("b")
    messages = " ".join(record.message for record in caplog.records)
    assert "'w' has shape (40, 50), update has (50, 40)" in messages and "no longer in the update: ['b']" in messages
    decoded = decode_tensors(data, shapes_of(reshaped), max_decoded_bytes=LIMIT)["w"]
    assert feedback.residual.keys() == {"w"}
    np.testing.assert_allclose(feedback.residual["w"] + decoded, reshaped["w"], atol=1e-9)


@pytest.mark.parametrize("corrupt", [
    lambda path: path.write_bytes(b"definitely not a zip"),
    lambda path: path.write_bytes(path.read_bytes()[:200]),
    write_npy,
    lambda path: write_npz(path, b'{"version": 2}'),
    lambda path: write_npz(path, b'{"version":1,"residual_names":["w"],"pending":null}',
                           r0=np.array([np.nan], np.float32)),
], ids=["garbage", "truncated", "npy", "bad-meta", "nan-residual"])
def test_corrupt_residual_file_is_logged_and_reset(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                   corrupt: Callable[[Path], None]) -> None:
    path = tmp_path / "ef.npz"
    feedback = ErrorFeedback(path)
    feedback.encode(rounds_of_deltas(1)[0], EF_SETTINGS, update_id="x")
    feedback.commit("x")
    corrupt(path)
    with caplog.at_level(logging.WARNING, logger="shared.compression"):
        reloaded = ErrorFeedback(path)
    assert reloaded.residual == {} and reloaded.pending is None
    assert any("unreadable" in record.message and str(path) in record.message for record in caplog.records)
    reloaded.encode(rounds_of_deltas(1)[0], EF_SETTINGS, update_id="y")  # usable again
    reloaded.commit("y")
    assert ErrorFeedback(path).residual.keys() == {"w", "b"}


# --- hostile input ---------------------------------------------------------------------


def valid_messages() -> list[bytes]:
    model = make_model(11)
    return [encode_tensors(model, config) for config in (
        CompressionSettings(zstd_level=0), CompressionSettings(),
        CompressionSettings(mode="sparse", topk_fraction=0.1, zstd_level=0),
        CompressionSettings(mode="sparse", topk_fraction=0.6, quantization="fp16", zstd_level=0),
        CompressionSettings(mode="sparse", topk_fraction=0.1),
        CompressionSettings(mode="sparse", topk_fraction=0.1, dense_dtype="int8", zstd_level=0))]


VALID = valid_messages()
EXPECTED = shapes_of(make_model(11))


@given(st.binary(max_size=2000))
@HOSTILE
def test_arbitrary_bytes_raise_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode_tensors(data, EXPECTED, max_decoded_bytes=LIMIT)


@given(st.binary(max_size=2000), st.integers(0, 3), st.integers(0, 2**32 - 1), st.integers(0, 2**64 - 1))
@HOSTILE
def test_arbitrary_payload_behind_a_valid_prefix(payload: bytes, flags: int, header_len: int,
                                                 buffers_len: int) -> None:
    data = PREFIX.pack(b"FMQC", FORMAT_VERSION, flags, 0, header_len, buffers_len) + payload
    with pytest.raises(CodecError):
        decode_tensors(data, EXPECTED, max_decoded_bytes=LIMIT)


@given(st.sampled_from(range(len(VALID))), st.data())
@HOSTILE
def test_truncated_messages_raise_codec_error(which: int, data: st.DataObject) -> None:
    message = VALID[which]
    cut = data.draw(st.integers(0, len(message) - 1))
    with pytest.raises(CodecError):
        decode_tensors(message[:cut], EXPECTED, max_decoded_bytes=LIMIT)


@given(st.sampled_from(range(len(VALID))), st.data())
@HOSTILE
def test_flipped_bytes_give_codec_error_or_a_valid_update(which: int, data: st.DataObject) -> None:
    message = bytearray(VALID[which])
    for _ in range(data.draw(st.integers(1, 4))):
        position = data.draw(st.integers(0, len(message) - 1))
        message[position] ^= data.draw(st.integers(1, 255))
    assert decode_or_codec_error(bytes(message), EXPECTED) in ("rejected", "valid")


JSON_JUNK = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.sampled_from([2**63, 2**64, -1, 0, 1])
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8)
    | st.sampled_from(["varint", "bitmap", "sparse", "dense_f16", "delta_exact", "int8", "f16", "float32"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6), children, max_size=3),
    max_leaves=8)


@given(st.sampled_from([0, 2, 3, 5]), st.data())
@HOSTILE
def test_mutated_headers_give_codec_error_or_a_valid_update(which: int, data: st.DataObject) -> None:
    header, buffers = split_message(VALID[which])
    for _ in range(data.draw(st.integers(1, 3))):
        entry = data.draw(st.sampled_from(header["tensors"]))
        key = data.draw(st.sampled_from([*entry, "extra"]))
        entry[key] = data.draw(JSON_JUNK)
    buffers = data.draw(st.sampled_from([buffers, buffers[:-1], buffers + b"\0", bytes(len(buffers))]))
    message = build_message(header, buffers, compress=data.draw(st.booleans()))
    assert decode_or_codec_error(message, EXPECTED) in ("rejected", "valid")


@given(st.sampled_from([2, 3, 5]), st.data())
@HOSTILE
def test_mutated_index_buffers_give_codec_error_or_a_valid_update(which: int, data: st.DataObject) -> None:
    header, buffers = split_message(VALID[which])
    entry = data.draw(st.sampled_from([e for e in header["tensors"] if e["encoding"] == "sparse"]))
    start, length = spans_of(header)[entry["name"]]["indices"]
    junk = data.draw(st.binary(min_size=length, max_size=length))
    message = build_message(header, buffers[:start] + junk + buffers[start + length:])
    assert decode_or_codec_error(message, EXPECTED) in ("rejected", "valid")


F32 = np.dtype("<f4")


def dense_header(shape: list[int], name: str = "w") -> dict:
    return {"dtype": "float32", "tensors": [{"name": name, "shape": shape, "encoding": "dense_f32"}]}


def dense_i8_header(shape: list[int], scale: float | None) -> dict:
    entry = {"name": "w", "shape": shape, "encoding": "dense_i8"}
    return {"dtype": "float32", "tensors": [entry if scale is None else {**entry, "scale": scale}]}


@pytest.mark.parametrize(("data", "expected", "message"), [
    pytest.param(b"FMQC", {"w": (4,)}, "shorter than", id="short"),
    pytest.param(build_message(dense_header([4]), bytes(16), magic=b"PK\x03\x04"), {"w": (4,)}, "magic",
                 id="magic"),
    pytest.param(build_message(dense_header([4]), bytes(16), version=3), {"w": (4,)}, "version 3",
                 id="version"),
    pytest.param(build_message(dense_header([4]), bytes(16), flags=0x80), {"w": (4,)}, "flags", id="flags"),
    pytest.param(build_message(dense_header([4]), bytes(16), header_len=10**6), {"w": (4,)},
                 "prefix declares", id="header-past-end"),
    pytest.param(build_message(dense_header([4]), bytes(16), compress=True, header_len=1000), {"w": (4,)},
                 "zstd frame declares 103 bytes, prefix declares 1016", id="compressed-header-past-end"),
    pytest.param(build_message(dense_header([4]), bytes(16), header_len=MAX_HEADER_BYTES + 1), {"w": (4,)},
                 "header length", id="header-too-big"),
    pytest.param(build_message(dense_header([4]), bytes(16), buffers_len=2**64 - 1), {"w": (4,)},
                 "prefix declares", id="buffers-past-end"),
    pytest.param(build_message(b"[" * 100_000, b""), {"w": (4,)}, "invalid header", id="deep-json"),
    pytest.param(build_message(b"\xff\xfe{}", b""), {"w": (4,)}, "invalid header", id="not-utf8"),
    pytest.param(build_message(dense_header([2**40, 2**40]), bytes(16)), {"w": (4,)}, "shape",
                 id="huge-shape"),
    pytest.param(build_message(dense_header([2**62, 2**62, 2**62]), bytes(16)), {"w": (2**62,) * 3},
                 "exceeds", id="shape-product-overflow"),
    pytest.param(build_message(dense_header([2**62, 4]), bytes(16)), {"w": (2**62, 4)}, "exceeds",
                 id="huge-expected"),
    pytest.param(build_message(dense_header([4]), bytes(16)), {"w": (4,), "b": (1,)}, "missing \\['b'\\]",
                 id="missing-tensor"),
    pytest.param(build_message(dense_header([4], name="v"), bytes(16)), {"w": (4,)}, "unexpected \\['v'\\]",
                 id="unexpected-tensor"),
    pytest.param(build_message({"dtype": "float32", "tensors": dense_header([1])["tensors"] * 2}, bytes(8)), {"w": (1,)},
                 "more than once", id="duplicate-name"),
    pytest.param(build_message(dense_header([4]), bytes(12)), {"w": (4,)}, "take 16 bytes but the prefix declares 12",
                 id="short-buffer"),
    pytest.param(build_message({"dtype": "float32", "tensors": [{**dense_header([4])["tensors"][0], "values": [4, 16]}]},
                               bytes(20)), {"w": (4,)}, "invalid header", id="gap"),  # offsets are derived, never given
    pytest.param(build_message({"dtype": "float32", "tensors": [{**dense_header([4])["tensors"][0], "extra": 1}]}, bytes(16)),
                 {"w": (4,)}, "invalid header", id="extra-field"),
    pytest.param(build_message({"dtype": "float32", "tensors": [{**dense_header([4])["tensors"][0], "shape": [True] * 4}]},
                               bytes(16)), {"w": (1, 1, 1, 1)}, "invalid header", id="bool-dim"),
    pytest.param(build_message({"dtype": "float32", "tensors": [{**dense_header([4])["tensors"][0], "shape": [1] * 33}]},
                               bytes(16)), {"w": (1,) * 33}, "invalid header", id="too-many-dims"),
    pytest.param(build_message(dense_header([4]), np.array([0, 1, np.nan, 2], F32).tobytes()), {"w": (4,)},
                 "NaN or Inf", id="nan"),
    pytest.param(build_message({"dtype": "float32", "tensors": [{**dense_header([4])["tensors"][0], "encoding": "dense_f16"}]},
                               np.array([0, 1, -np.inf, 2], "<f2").tobytes()), {"w": (4,)}, "NaN or Inf",
                 id="inf-f16"),
    pytest.param(build_message(dense_header([4]), bytes(17), buffers_len=16), {"w": (4,)}, "prefix declares",
                 id="trailing-bytes"),
    pytest.param(build_message(dense_header([4]), bytes(20)), {"w": (4,)}, "buffers take 16 bytes",
                 id="buffers-longer-than-header"),
    pytest.param(build_message(dense_header([4]), bytes(16)), {"w": "4"}, "expected shape", id="bad-expected"),
    pytest.param(build_message(dense_header([4]), bytes(16)), {"w": (True,)}, "expected shape",
                 id="bool-expected"),
    pytest.param("not bytes", {"w": (4,)}, "expected bytes", id="not-bytes"),
    pytest.param(sparse_message(bytes([1, 0]), np.ones(2, F32), nnz=2), {"w": (16,)}, "duplicate index",
                 id="duplicate-index"),
    pytest.param(sparse_message(bytes([3, 14]), np.ones(2, F32), nnz=2), {"w": (16,)}, "out of range",
                 id="index-out-of-range"),
    pytest.param(sparse_message(bytes([0x81, 0x81, 0x01, 0x01]), np.ones(2, F32), nnz=2, shape=(1000,)),
                 {"w": (1000,)}, "3 bytes is too long", id="overlong-varint"),
    pytest.param(sparse_message(bytes([17]), np.ones(1, F32), nnz=1), {"w": (16,)}, "gap 17 exceeds",
                 id="gap-past-end"),
    pytest.param(sparse_message(bytes([0x81, 0x00]), np.ones(1, F32), nnz=1, shape=(1000,)), {"w": (1000,)},
                 "non-canonical", id="non-canonical-varint"),
    pytest.param(sparse_message(bytes([1, 0x81]), np.ones(2, F32), nnz=2, shape=(1000,)), {"w": (1000,)},
                 "exactly nnz=2", id="truncated-varint"),
    pytest.param(sparse_message(bytes([1, 1, 1]), np.ones(2, F32), nnz=2, shape=(1000,)), {"w": (1000,)},
                 "exactly nnz=2", id="extra-varint"),
    pytest.param(sparse_message(bytes([1, 1, 1]), np.ones(2, F32), nnz=2), {"w": (16,)},
                 "indices buffer is 3 bytes, expected 2", id="varint-longer-than-bitmap"),
    pytest.param(sparse_message(bytes([1, 1, 1]), np.ones(3, F32), nnz=3), {"w": (16,)},
                 "cannot be shorter than the 2-byte bitmap", id="varint-where-bitmap-is-smaller"),
    pytest.param(sparse_message(bytes([1] * 17), np.ones(17, F32), nnz=17), {"w": (16,)}, "nnz=17 exceeds",
                 id="nnz-over-numel"),
    pytest.param(sparse_message(bytes([0b101, 0]), np.ones(3, F32), nnz=3, coding="bitmap"), {"w": (16,)},
                 "2 set bits but nnz=3", id="bitmap-count"),
    pytest.param(sparse_message(bytes([0b1, 0b100]), np.ones(2, F32), nnz=2, coding="bitmap", shape=(10,)),
                 {"w": (10,)}, "past element 10", id="bitmap-padding"),
    pytest.param(sparse_message(bytes([1, 1]), np.array([1, np.inf], F32), nnz=2), {"w": (16,)}, "NaN or Inf",
                 id="sparse-inf"),
    pytest.param(sparse_message(bytes([1, 1]), np.array([1, -128], np.int8), nnz=2, value_dtype="int8", scale=0.1),
                 {"w": (16,)}, "-128", id="int8-minus-128"),
    pytest.param(sparse_message(bytes([1, 1]), np.array([1, 2], np.int8), nnz=2, value_dtype="int8", scale=-0.1),
                 {"w": (16,)}, "scale", id="negative-scale"),
    pytest.param(sparse_message(bytes([1, 1]), np.array([1, 2], np.int8), nnz=2, value_dtype="int8", scale=3e38),
                 {"w": (16,)}, "scale", id="overflowing-scale"),
    pytest.param(sparse_message(bytes([1, 1]), np.array([1, 2], np.int8), nnz=2, value_dtype="int8",
                                scale=float("nan")), {"w": (16,)}, "invalid header", id="nan-scale"),
    pytest.param(sparse_message(bytes([1, 1]), np.array([1, 2], np.int8), nnz=2, value_dtype="int8"),
                 {"w": (16,)}, "scale must be present", id="int8-without-scale"),
    pytest.param(build_message(dense_i8_header([4], 0.5), np.array([1, -128, 0, 3], np.int8).tobytes()),
                 {"w": (4,)}, "-128", id="dense-i8-minus-128"),
    pytest.param(build_message(dense_i8_header([4], -0.5), bytes(4)), {"w": (4,)}, "scale", id="dense-i8-negative-scale"),
    pytest.param(build_message(dense_i8_header([4], 3e38), bytes(4)), {"w": (4,)}, "scale",
                 id="dense-i8-overflowing-scale"),
    pytest.param(build_message(dense_i8_header([4], None), bytes(4)), {"w": (4,)}, "invalid header",
                 id="dense-i8-without-scale"),
    pytest.param(build_message(dense_i8_header([4], 0.5), bytes(5)), {"w": (4,)},
                 "take 4 bytes but the prefix declares 5", id="dense-i8-long-buffer"),
    pytest.param(build_message({"tensors": dense_header([4])["tensors"]}, bytes(16)), {"w": (4,)}, "invalid header",
                 id="no-dtype"),
    pytest.param(build_message({**dense_header([4]), "dtype": "float64"}, bytes(16)), {"w": (4,)}, "invalid header",
                 id="wrong-dtype"),
    pytest.param(build_message({"dtype": "float32", "tensors": [
        {"name": "w", "shape": [16], "encoding": "sparse", "nnz": 2, "index_coding": "varint",
         "index_bytes": 2**63 - 1, "value_dtype": "f32"}]}, bytes(10)), {"w": (16,)},
        "indices buffer is 9223372036854775807 bytes, expected 2", id="huge-index-bytes"),
])
def test_hostile_messages_name_the_problem(data: bytes, expected: dict, message: str) -> None:
    started = time.perf_counter()
    with pytest.raises(CodecError, match=message):
        decode_tensors(data, expected, max_decoded_bytes=LIMIT)
    assert time.perf_counter() - started < 1.0


def test_hand_made_sparse_message_decodes() -> None:
    """Guards the hostile cases above: the same builder with sane buffers is accepted."""
    got = decode_tensors(sparse_message(bytes([3, 2]), np.array([1.5, -2], F32), nnz=2), {"w": (16,)},
                         max_decoded_bytes=LIMIT)["w"]
    assert got[2] == 1.5 and got[4] == -2 and np.count_nonzero(got) == 2


def test_max_decoded_bytes_is_enforced_before_decoding() -> None:
    model = make_model()
    data = encode_tensors(model, CompressionSettings())
    needed = sum(array.nbytes for array in model.values())
    assert decode_tensors(data, shapes_of(model), max_decoded_bytes=needed).keys() == model.keys()
    with pytest.raises(CodecError, match="max_decoded_bytes"):
        decode_tensors(data, shapes_of(model), max_decoded_bytes=needed - 1)


@pytest.fixture(scope="module")
def zstd_zeros() -> bytes:
    """A 256 MiB run of zeros as a ~8 KiB zstd frame, i.e. a decompression bomb."""
    stream = zstandard.ZstdCompressor(level=1).compressobj()
    chunk = bytes(1 << 20)
    return b"".join([*(stream.compress(chunk) for _ in range(256)), stream.flush()])


def bounded(call: Callable[[], object]) -> tuple[float, int]:
    """(seconds, peak traced bytes) of a call that must raise CodecError."""
    tracemalloc.start()
    started = time.perf_counter()
    try:
        with pytest.raises(CodecError):
            call()
        return time.perf_counter() - started, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_zstd_bomb_in_the_header(zstd_zeros: bytes) -> None:
    data = PREFIX.pack(b"FMQC", FORMAT_VERSION, 1, 0, MAX_HEADER_BYTES, 0) + zstd_zeros
    seconds, peak = bounded(lambda: decode_tensors(data, {"w": (4,)}, max_decoded_bytes=LIMIT))
    assert seconds < 1.0 and peak < 3 * MAX_HEADER_BYTES


def test_zstd_frame_larger_than_declared_is_refused(zstd_zeros: bytes) -> None:
    header = json.dumps(dense_header([4])).encode()
    stream = zstandard.ZstdCompressor(level=1).compressobj()  # no declared content size
    chunk = bytes(1 << 20)
    frame = b"".join([stream.compress(header + bytes(16)), *(stream.compress(chunk) for _ in range(64)),
                      stream.flush()])
    data = PREFIX.pack(b"FMQC", FORMAT_VERSION, 1, 0, len(header), 16) + frame
    seconds, peak = bounded(lambda: decode_tensors(data, {"w": (4,)}, max_decoded_bytes=LIMIT))
    assert seconds < 1.0 and peak < 1 << 20
    # A bomb frame appended to a valid message is refused the same way.
    good = encode_tensors({"w": np.ones(4, np.float32)}, CompressionSettings())
    seconds, peak = bounded(lambda: decode_tensors(good + zstd_zeros, {"w": (4,)}, max_decoded_bytes=LIMIT))
    assert seconds < 1.0 and peak < 1 << 20
    with pytest.raises(CodecError, match="unused data"):
        decode_tensors(good + good[PREFIX.size:], {"w": (4,)}, max_decoded_bytes=LIMIT)


def test_huge_declared_tensor_is_refused_before_decompressing() -> None:
    header = json.dumps(dense_header([2**26])).encode()  # 256 MiB of zeros would be valid floats
    stream = zstandard.ZstdCompressor(level=1).compressobj(size=len(header) + 2**28)
    chunk = bytes(1 << 20)
    frame = b"".join([stream.compress(header), *(stream.compress(chunk) for _ in range(256)), stream.flush()])
    data = PREFIX.pack(b"FMQC", FORMAT_VERSION, 1, 0, len(header), 2**28) + frame
    seconds, peak = bounded(lambda: decode_tensors(data, {"w": (2**26,)}, max_decoded_bytes=LIMIT))
    assert seconds < 1.0 and peak < 1 << 20


def test_zstd_frame_with_oversized_window_is_refused() -> None:
    params = zstandard.ZstdCompressionParameters.from_level(19, window_log=27)
    header = json.dumps(dense_header([4])).encode()
    frame = zstandard.ZstdCompressor(compression_params=params).compressobj()
    data = PREFIX.pack(b"FMQC", FORMAT_VERSION, 1, 0, len(header), 16) + frame.compress(header + bytes(16)) + frame.flush()
    with pytest.raises(CodecError, match="zstd"):
        decode_tensors(data, {"w": (4,)}, max_decoded_bytes=LIMIT)


def test_corrupted_compressed_payload_fails_its_checksum() -> None:
    data = bytearray(encode_tensors(make_model(), CompressionSettings()))
    data[len(data) // 2] ^= 0x40
    with pytest.raises(CodecError, match="zstd"):
        decode_tensors(bytes(data), EXPECTED, max_decoded_bytes=LIMIT)


def test_tensors_named_dense_are_sent_whole_in_sparse_mode() -> None:
    """BatchNorm running statistics must not be sparsified (error feedback would defer them)."""
    rng = np.random.default_rng(3)
    tensors = {"bn.running_var": rng.random(1000, dtype=np.float32) + 0.5,
               "fc.weight": rng.standard_normal(1000).astype(np.float32)}
    settings = CompressionSettings(mode="sparse", topk_fraction=0.01, dense_tensors=("bn.running_var",))
    decoded = decode_tensors(encode_tensors(tensors, settings), {k: v.shape for k, v in tensors.items()},
                             max_decoded_bytes=10**6)
    np.testing.assert_array_equal(decoded["bn.running_var"], tensors["bn.running_var"])
    assert np.count_nonzero(decoded["fc.weight"]) == 10


@pytest.mark.parametrize("settings", [
    CompressionSettings(), CompressionSettings(zstd_level=0), CompressionSettings(zstd_level=19),
    CompressionSettings(mode="sparse", topk_fraction=1.0, quantization="none", min_sparse_numel=0),
    CompressionSettings(mode="sparse", topk_fraction=1.0, quantization="none", min_sparse_numel=0, zstd_level=0),
    CompressionSettings(mode="sparse", topk_fraction=0.9, quantization="int8", min_sparse_numel=0, zstd_level=0),
    CompressionSettings(mode="sparse", topk_count=1, quantization="int8", min_sparse_numel=0, dense_dtype="int8"),
], ids=lambda s: f"{s.mode}-{s.quantization}-z{s.zstd_level}")
def test_max_update_bytes_bounds_what_the_encoder_produces(settings: CompressionSettings) -> None:
    """The bound a receiver checks declared sizes against must hold for incompressible worst cases."""
    rng = np.random.default_rng(5)
    shapes = {"conv.weight\u00e9\u2603" + "\x01" * 40: (64, 3, 3, 3), "conv.bias": (64,), "fc.weight": (10, 4096),
              "fc.bias": (10,), "scalar": (), "empty": (0, 7)}
    update = {name: rng.normal(scale=3.0, size=shape).astype(np.float32) for name, shape in shapes.items()}
    encoded = encode_tensors(update, settings, rng=rng)
    bound = codec.max_update_bytes(shapes)
    assert len(encoded) <= bound
    dense = 4 * sum(math.prod(s) for s in shapes.values())
    assert bound < 1.2 * dense + 4096, "the bound stays near the dense size, or it would bound nothing"
