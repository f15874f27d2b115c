"""Update codec throughput on a ResNet-18-sized update (11.7 M float32 parameters).

Every codec timing is reported next to a plain numpy copy of the same tensors, timed in
the same run and interleaved with it (copy, encode, decode, copy, ...), so the codec/copy
ratio stays meaningful on a different or busy machine: it says how far from memory
bandwidth the codec is.

    python bench/bench_codec.py [--reps 5] [--seed 0]

MB = 10**6 bytes of dense float32 model; times are the median of --reps runs.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import zstandard

from bench_round import cpu_model

from shared.codec import CompressionSettings, decode_tensors, encode_tensors


def resnet18_shapes() -> dict[str, tuple[int, ...]]:
    """Initializer shapes of a ResNet-18 (conv, batch-norm and linear layers), 11.7 M parameters."""
    shapes: dict[str, tuple[int, ...]] = {"conv1.weight": (64, 3, 7, 7)}
    channels_in = 64
    for stage, channels in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            prefix = f"layer{stage}.{block}"
            first_in = channels_in if block == 0 else channels
            shapes[f"{prefix}.conv1.weight"] = (channels, first_in, 3, 3)
            shapes[f"{prefix}.conv2.weight"] = (channels, channels, 3, 3)
            for bn in ("bn1", "bn2"):
                shapes[f"{prefix}.{bn}.weight"] = (channels,)
                shapes[f"{prefix}.{bn}.bias"] = (channels,)
            if block == 0 and first_in != channels:
                shapes[f"{prefix}.downsample.weight"] = (channels, first_in, 1, 1)
        channels_in = channels
    shapes["fc.weight"] = (1000, 512)
    shapes["fc.bias"] = (1000,)
    return shapes


def interleaved_medians(actions: dict[str, Callable[[], object]], reps: int) -> dict[str, float]:
    """Median seconds per action, run round-robin so load changes hit all of them alike."""
    for action in actions.values():
        action()  # warm-up: page faults and first-call costs are not throughput
    timings: dict[str, list[float]] = {label: [] for label in actions}
    for _ in range(reps):
        for label, action in actions.items():
            started = time.perf_counter()
            action()
            timings[label].append(time.perf_counter() - started)
    return {label: statistics.median(values) for label, values in timings.items()}


def table_row(label: str, config: CompressionSettings, update: dict[str, np.ndarray], reps: int, seed: int) -> str:
    """One markdown row; the copy baseline is re-timed per row so each ratio is like for like."""
    shapes = {name: array.shape for name, array in update.items()}
    dense_bytes = sum(array.nbytes for array in update.values())
    rng = np.random.default_rng(seed)
    data = encode_tensors(update, config, rng=rng)
    seconds = interleaved_medians({
        "copy": lambda: {name: array.copy() for name, array in update.items()},
        "encode": lambda: encode_tensors(update, config, rng=rng),
        "decode": lambda: decode_tensors(data, shapes, max_decoded_bytes=dense_bytes),
    }, reps)
    rate = {action: dense_bytes / 1e6 / elapsed for action, elapsed in seconds.items()}
    return (f"| {label} | {len(data):,} | {dense_bytes / len(data):.1f}x | {rate['copy']:,.0f} "
            f"| {rate['encode']:,.0f} | {rate['encode'] / rate['copy']:.3f} "
            f"| {rate['decode']:,.0f} | {rate['decode'] / rate['copy']:.3f} |")


CONFIGS: list[tuple[str, CompressionSettings]] = [
    ("dense f32, no zstd", CompressionSettings(zstd_level=0)),
    ("dense f32", CompressionSettings()),
    ("dense f16", CompressionSettings(dense_dtype="float16")),
    ("sparse 10% int8", CompressionSettings(mode="sparse", topk_fraction=0.10)),
    ("sparse 1% int8", CompressionSettings(mode="sparse", topk_fraction=0.01)),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="timed repetitions per measurement (median reported)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the synthetic update")
    args = parser.parse_args()
    if args.reps < 1:
        parser.error("--reps must be >= 1")

    rng = np.random.default_rng(args.seed)
    update = {name: rng.normal(0.0, 1e-3, shape).astype(np.float32) for name, shape in resnet18_shapes().items()}
    dense_bytes = sum(array.nbytes for array in update.values())

    print(f"machine: {platform.machine()} {cpu_model()}, {os.cpu_count()} CPUs, "
          f"{platform.system()} {platform.release()}, load average {os.getloadavg()[0]:.2f} at start")
    print(f"python {platform.python_version()}, numpy {np.__version__}, zstandard {zstandard.__version__} "
          f"(libzstd {zstandard.ZSTD_VERSION}), reps={args.reps}")
    print(f"model: {len(update)} tensors, {dense_bytes // 4:,} float32 parameters = {dense_bytes / 1e6:.1f} MB")
    print()
    print("| encoding | bytes | vs dense f32 | numpy copy MB/s | encode MB/s | encode / copy "
          "| decode MB/s | decode / copy |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for label, config in CONFIGS:
        print(table_row(label, config, update, args.reps, args.seed), flush=True)


if __name__ == "__main__":
    main()
