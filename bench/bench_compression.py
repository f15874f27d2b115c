"""Accuracy against bytes: sparse top-k (int8, with and without error feedback) versus dense.

Real federations over a real Mosquitto (``shared.broker.start_mosquitto``), orchestrator
and agents as threads (``fedmq.inprocess.run_federation``), one federation per variant:

- ``digits``: scikit-learn's 8x8 digits split non-IID over 10 sites (``fedmq.digits``), CNN
  of 118,986 parameters, FedAvg;
- ``heart``: the four-hospital Heart Disease demo (logistic regression, 14 parameters).

Variants: ``dense`` (float32 + zstd, the baseline, run in the same invocation) and top-k of
10%, 1%, 0.1% of each tensor with int8 values, each with (``-ef``) and without error
feedback, plus top-0.5% with error feedback (digits only). Every variant of a task runs the
same number of rounds. Sparse digits variants keep tensors under 256 values dense (the
codec default, see ``--digits-min-sparse-numel``) and send those as int8 with a per-tensor
scale (``--digits-dense-dtype``), except the BatchNorm running statistics, which the agent
always sends dense and the codec then sends as float16; ``k1-ef-f16`` is top-1% + EF with
the small tensors as float16 (the setting before int8 small tensors), to isolate what int8
costs. The Heart Disease logistic regression (14 parameters) needs ``min_sparse_numel=1``
for top-k to apply at all, and then keeps 1 value per tensor at every k <= 10%.

``--seeds`` runs every digits variant once per seed; the seed is the sites' training seed
(batch order), the digits split (which rows go to which site and to the held-out set) and
the initial CNN's weights. Accuracy deltas are taken against the dense run of the same seed,
then averaged (mean ± sample std over seeds).

Figures per variant (the JSON has them per round too):

- accuracy: pooled over the sites' test sets, as the orchestrator reports it (for round r:
  the model version r produced by r rounds), final = the last version; for digits also on
  the held-out global test set;
- uplink: the update payloads the sites sent (sum of ``UpdateReport.update.size``, from
  the journal), total and per round, and the ratio of dense float32 (4 bytes x parameters x
  reporting sites) to it; also the orchestrator's measured received bytes per round
  (``RoundSummary.bytes_up``: payloads + JSON control messages);
- downlink per round: *with* the sparse downlink = what each site downloads when it holds
  the previous version (the ``model_delta`` blob the orchestrator builds, recomputed from
  the registry exactly as ``RoundEngine._downlink`` does) x sites, *without* = the packed
  full model x sites; *measured* = what the agents' transports received over the whole run
  (payload bytes: model blobs, round commands, acks) divided by the announcements. Unless
  ``--no-delta-rounds 0``, one extra digits federation runs with the delta disabled
  (``RoundEngine._downlink`` patched in this process to offer no delta) to measure the
  "without" case directly;
- where a sparse update's bytes go (``update_breakdown``, every stored update of the run):
  the 20-byte prefix, the zstd frame's own bytes, and the compressed size of each zstd
  block, which the codec ends after the JSON header and after the position buffers, so
  header, positions and values are measured exactly; values are also split by kind (raw).

    python bench/bench_compression.py                           # both tasks, all variants
    python bench/bench_compression.py --tasks digits --digits-rounds 10 --variants dense k1-ef
    python bench/bench_compression.py --tasks digits --seeds 0 1 2 --variants dense k1-ef k0_5-ef k1 \
        --no-delta-rounds 0
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import struct
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmq.demo import DemoOptions, heart_settings
from fedmq.digits import (
    IMAGE_SHAPE,
    NUM_CLASSES,
    DigitsOptions,
    digits_settings,
    global_test_accuracy,
    prepare_digits,
)
from fedmq.inprocess import round_summaries, run_federation
from orchestrator.architectures import build_onnx
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry
from orchestrator.rounds import RoundEngine
from shared.broker import start_mosquitto
from shared.codec import CompressionSettings, encode_model_delta
from shared.config import AgentSettings, OrchestratorSettings
from shared.onnx_model import float_initializers, load_model_bytes, pack_model
from shared.protocol import RoundSummary

log = logging.getLogger("bench_compression")

# variant -> (top-k fraction or None for dense, error feedback, small-tensor dtype or None for the task's)
VARIANTS: dict[str, tuple[float | None, bool, str | None]] = {
    "dense": (None, False, None),
    "k10-ef": (0.10, True, None), "k1-ef": (0.01, True, None), "k0_1-ef": (0.001, True, None),
    "k10": (0.10, False, None), "k1": (0.01, False, None), "k0_1": (0.001, False, None),
    "k0_5-ef": (0.005, True, None),  # extra point between 1% and 0.1%
    "k1-ef-f16": (0.01, True, "float16"),  # top-1% + EF with the small tensors float16, not int8
}
LABELS = {"dense": "dense float32", "k10-ef": "top-10% int8 + EF", "k1-ef": "top-1% int8 + EF",
          "k0_1-ef": "top-0.1% int8 + EF", "k10": "top-10% int8, no EF", "k1": "top-1% int8, no EF",
          "k0_1": "top-0.1% int8, no EF", "k0_5-ef": "top-0.5% int8 + EF",
          "k1-ef-f16": "top-1% int8 + EF, small tensors f16"}
DEFAULT_DIGITS_VARIANTS = ["dense", "k10-ef", "k1-ef", "k0_5-ef", "k0_1-ef", "k10", "k1", "k0_1"]


def compression_for(variant: str, min_sparse_numel: int, dense_dtype: str) -> CompressionSettings:
    fraction, ef, small_dtype = VARIANTS[variant]
    if fraction is None:
        return CompressionSettings()
    return CompressionSettings(mode="sparse", topk_fraction=fraction, quantization="int8", error_feedback=ef,
                               min_sparse_numel=min_sparse_numel, dense_dtype=small_dtype or dense_dtype)


@dataclass
class Task:
    name: str
    rounds: int
    min_sparse_numel: int
    dense_dtype: str
    settings: object  # (federation, root, compression, rounds) -> (OrchestratorSettings, [AgentSettings])
    data_dir: Path | None = None
    seed: int = 0


@contextmanager
def _without_model_delta():
    """Make the orchestrator offer only the packed full model (so it broadcasts that instead)."""
    original = RoundEngine._downlink

    def full_only(self, version, model):
        full, _delta, blobs = original(self, version, model)
        return full, None, {full.blob_id: blobs[full.blob_id]}

    RoundEngine._downlink = full_only
    try:
        yield
    finally:
        RoundEngine._downlink = original


def run_one(task: Task, variant: str, url: str, workdir: Path, *, rounds: int, timeout: float,
            no_delta: bool = False, suffix: str = "") -> dict:
    compression = compression_for(variant, task.min_sparse_numel, task.dense_dtype)
    seed = f"-s{task.seed}" if task.name == "digits" else ""
    federation = f"{task.name}{seed}-{variant}{suffix}{'-nodelta' if no_delta else ''}".replace("_", "-")
    root = workdir / federation
    orch, agents = task.settings(federation, root, compression, rounds)
    started = time.perf_counter()
    with round_summaries(url, federation) as summaries:
        with (_without_model_delta() if no_delta else nullcontext()):
            with run_federation(orch, agents) as fed:
                fed.wait_finished(timeout=timeout)
                agents_live = dict(fed.agents)
            agent_rx = sum(a.transport.bytes_received for a in agents_live.values())
            agent_tx = sum(a.transport.bytes_sent for a in agents_live.values())
        time.sleep(0.5)
    wall = time.perf_counter() - started
    result = analyse(task, variant, root, orch, agents, summaries, rounds)
    result.update({"federation": federation, "seed": task.seed, "wall_seconds": round(wall, 1), "no_delta": no_delta,
                   "compression": compression.model_dump(), "agents_rx_bytes": agent_rx, "agents_tx_bytes": agent_tx,
                   "agents_rx_per_announcement": agent_rx / (rounds + 1),
                   "computed_downlink_total_with_delta": int(sum(result["downlink_with_delta_by_announcement"])),
                   "computed_downlink_total_without_delta": int(sum(result["downlink_without_delta_by_announcement"]))})
    return result


def analyse(task: Task, variant: str, root: Path, orch: OrchestratorSettings, agents: list[AgentSettings],
            summaries: list[RoundSummary], rounds: int) -> dict:
    registry = ModelRegistry.open(Path(orch.state_dir))
    journal = RoundJournal(registry.conn)
    versions = registry.list()
    assert [v.version for v in versions] == list(range(rounds + 1)), [v.version for v in versions]
    for v in versions:
        assert hashlib.sha256(registry.model_bytes(v.version)).hexdigest() == v.sha256, f"v{v.version} hash"
    sites = len(agents)
    weights = [float_initializers(load_model_bytes(registry.model_bytes(v.version))) for v in versions]
    numel = sum(w.size for w in weights[0].values())
    accuracy = [registry.get(v.version).pooled.accuracy if registry.get(v.version).pooled else None
                for v in versions]
    uplink, reporters, breakdowns = [], [], []
    train_rounds = journal.done("train")
    sparse = orch.training.compression.mode == "sparse"
    for r in range(1, rounds + 1):
        recs = [rec for rec in train_rounds if rec.round == r]
        ups = [u for rec in recs for u in journal.updates(rec.round_id)]
        uplink.append(sum(u.report.update.size for u in ups if u.report.update is not None))
        reporters.append(len(ups))
        if sparse:
            breakdowns.extend(update_breakdown(registry.blobs.get(u.blob)) for u in ups if u.blob is not None)
    # Announcement a (a = 0..rounds) offers version a: rounds 1..R train on v0..v(R-1), the
    # final evaluation round scores vR.
    full_sizes, delta_sizes = [], []
    for v in versions:
        full_sizes.append(len(pack_model(registry.model_bytes(v.version))))
        delta_sizes.append(None if v.parent is None else len(encode_model_delta(weights[v.parent], weights[v.version])))
    down_with = [sites * (d if d is not None else f) for d, f in zip(delta_sizes, full_sizes)]
    down_without = [sites * f for f in full_sizes]
    by_round = {s.round: s for s in summaries if s.new_version is not None}
    final = [s for s in summaries if s.new_version is None]
    dense_f32_round = 4 * numel * np.array(reporters)
    result = {
        "task": task.name, "variant": variant, "label": LABELS[variant], "rounds": rounds, "sites": sites,
        "numel": numel,
        "accuracy_by_version": accuracy,
        "final_accuracy": accuracy[-1],
        "uplink_payload_by_round": uplink,
        "uplink_cumulative": np.cumsum(uplink).tolist(),
        "uplink_total": int(sum(uplink)),
        "uplink_per_round": float(np.mean(uplink)),
        "uplink_per_update": float(sum(uplink) / max(sum(reporters), 1)),
        "dense_f32_per_round": float(np.mean(dense_f32_round)),
        "ratio_vs_dense_f32": float(dense_f32_round.sum() / max(sum(uplink), 1)),
        "orch_bytes_up_by_round": [by_round[r].bytes_up if r in by_round else None for r in range(1, rounds + 1)],
        "orch_bytes_down_by_round": [by_round[r].bytes_down if r in by_round else None for r in range(1, rounds + 1)],
        "orch_final_eval": ({"bytes_up": final[-1].bytes_up, "bytes_down": final[-1].bytes_down} if final else None),
        "packed_full_model_bytes": full_sizes,
        "model_delta_bytes": delta_sizes,
        "downlink_with_delta_by_announcement": down_with,
        "downlink_without_delta_by_announcement": down_without,
        # Steady state: announcements 1..R (all sites hold the parent); announcement 0 is the first download.
        "downlink_with_delta_per_round": float(np.mean(down_with[1:])),
        "downlink_without_delta_per_round": float(np.mean(down_without[1:])),
        "round_seconds": [by_round[r].seconds.get("wall") if r in by_round else None for r in range(1, rounds + 1)],
    }
    if breakdowns:
        result["update_breakdown_mean"] = {key: float(np.mean([b[key] for b in breakdowns])) for key in breakdowns[0]}
        result["update_breakdown_updates"] = len(breakdowns)
    if task.data_dir is not None:
        result["global_test_accuracy"] = global_test_accuracy(registry.model_bytes(rounds), task.data_dir)
    registry.conn.close()
    return result


_VALUE_KINDS = {("sparse", "int8"): "values_topk_int8", ("dense_i8", None): "values_small_int8",
                ("dense_f16", None): "values_dense_f16", ("dense_f32", None): "values_dense_f32",
                ("sparse", "f16"): "values_topk_f16", ("sparse", "f32"): "values_topk_f32"}
_ITEMSIZE = {"int8": 1, "f16": 2, "f32": 4, "dense_i8": 1, "dense_f16": 2, "dense_f32": 4}


def update_breakdown(data: bytes) -> dict[str, float]:
    """Where one stored update's bytes go, in bytes on the wire (``*_raw``: before zstd).

    The codec (format 2) writes one zstd frame and ends a block after the JSON header and
    after the position buffers, so walking the frame's blocks and noting which decompressed
    range each produced attributes every compressed byte exactly: ``header``, ``positions``,
    ``values``; ``zstd_framing`` is the frame header, block headers and checksum. The value
    section is split by kind only before compression (``values_*`` raw bytes). Only for our
    own run's updates: the decoder already validated them when they arrived.
    """
    _, _, flags, _, header_len, buffers_len = struct.unpack_from("<4sBBHIQ", data)
    payload = bytes(data[20:])
    raw = zstandard.ZstdDecompressor().decompress(payload) if flags & 1 else payload
    tensors = json.loads(raw[:header_len])["tensors"]
    positions_raw = sum(t.get("index_bytes", 0) for t in tensors)
    out = {"total": float(len(data)), "prefix": 20.0, "header_raw": float(header_len),
           "positions_raw": float(positions_raw), "values_raw": float(buffers_len - positions_raw),
           **{kind: 0.0 for kind in _VALUE_KINDS.values()}}
    for t in tensors:
        count = t["nnz"] if "nnz" in t else int(np.prod(t["shape"]))
        out[_VALUE_KINDS[t["encoding"], t.get("value_dtype")]] += count * _ITEMSIZE[t.get("value_dtype", t["encoding"])]
    if not flags & 1:
        out.update(header=float(header_len), positions=float(positions_raw),
                   values=float(buffers_len - positions_raw), zstd_framing=0.0)
        return out
    descriptor = payload[4]
    fcs_flag, single_segment, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    pos = 5 + (not single_segment) + (0, 1, 2, 4)[dict_flag] + ((1 if single_segment else 0), 2, 4, 8)[fcs_flag]
    stream = zstandard.ZstdDecompressor().decompressobj()
    stream.decompress(payload[:pos])
    ends = {"header": header_len, "positions": header_len + positions_raw, "values": header_len + buffers_len}
    sections = dict.fromkeys(ends, 0.0)
    framing, produced = float(pos), 0
    while True:
        block = int.from_bytes(payload[pos:pos + 3], "little")
        size = 1 if (block >> 1) & 3 == 1 else block >> 3  # an RLE block stores one byte
        got = len(stream.decompress(payload[pos:pos + 3 + size]))
        framing += 3
        if got:
            section = next(name for name, end in ends.items() if produced < end)
            if produced + got > ends[section]:
                raise ValueError(f"a zstd block spans the end of the {section} section: not a format-2 update")
            sections[section] += size
        else:
            framing += size
        produced += got
        pos += 3 + size
        if block & 1:
            break
    out.update(sections, zstd_framing=framing + len(payload) - pos)
    return out


def make_tasks(args: argparse.Namespace, url: str, workdir: Path, seed: int = 0) -> dict[str, Task]:
    """The tasks for one seed; only digits depends on it (split, training seed, initial CNN)."""
    digits_data = workdir / f"digits-data-s{seed}"
    digits_opts = DigitsOptions(local_steps=args.digits_local_steps, learning_rate=args.digits_lr, seed=seed)
    initial = workdir / f"digits-initial-s{seed}.onnx"
    initial.write_bytes(build_onnx("cnn", input_shape=tuple(IMAGE_SHAPE), num_outputs=NUM_CLASSES,
                                   hidden=tuple(digits_opts.hidden), seed=seed))

    def digits(federation: str, root: Path, compression: CompressionSettings, rounds: int):
        opts = DigitsOptions(**{**digits_opts.__dict__, "federation": federation})
        orch, agents = digits_settings(url, root, rounds, compression, opts, data_dir=digits_data)
        return orch.model_copy(update={"initial_model": initial}), agents

    def heart(federation: str, root: Path, compression: CompressionSettings, rounds: int):
        orch, agents = heart_settings(url, root, DemoOptions(rounds=rounds))
        training = orch.training.model_copy(update={"compression": compression})
        orch = orch.model_copy(update={"federation": federation, "training": training})
        return orch, [a.model_copy(update={"federation": federation}) for a in agents]

    prepare_digits(digits_data, seed=seed)
    return {
        "digits": Task("digits", args.digits_rounds, args.digits_min_sparse_numel, args.digits_dense_dtype, digits,
                       digits_data, seed),
        "heart": Task("heart", args.heart_rounds, args.heart_min_sparse_numel, "float32", heart),
    }


def _size(n: float) -> str:
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def _ratio_label(x: float) -> str:
    """Uplink bytes against dense float32, in words (a 14-parameter model's update grows when encoded)."""
    if x >= 1:
        return f"{x:.0f}x fewer uplink bytes than dense f32" if x >= 10 else f"{x:.1f}x fewer uplink bytes than dense f32"
    return f"{1 / x:.1f}x more uplink bytes than dense f32"


def table(results: list[dict], task: str, seed: int | None = None) -> str:
    """One run per variant (one seed), every figure."""
    rows = [r for r in results if r["task"] == task and not r["no_delta"] and (seed is None or r["seed"] == seed)]
    if not rows:
        return ""
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    r0 = rows[0]
    sparse = next((r["compression"] for r in rows if r["compression"]["mode"] == "sparse"), None)
    knobs = (f"; sparse variants: min_sparse_numel={sparse['min_sparse_numel']}, small tensors dense "
             f"{sparse['dense_dtype']}, zstd level {sparse['zstd_level']}" if sparse else "")
    head = (f"**{task}**{'' if seed is None else f', seed {seed}'} ({r0['sites']} sites, {r0['numel']:,} parameters, "
            f"{r0['rounds']} rounds; dense float32 update "
            f"= {_size(4 * r0['numel'])}{knobs})\n\n")
    cols = ["variant", "final acc", "Δ vs dense (pts)"]
    if "global_test_accuracy" in r0:
        cols.append("global-test acc")
    cols += ["uplink total", "uplink / round", "per update", "× fewer than dense f32", "orch rx / round (wire)",
             "downlink / round with delta", "without delta", "downlink total: agents rx (measured)",
             "computed with delta", "computed without"]
    lines = [head + "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        delta = "" if dense is None else f"{100 * (r['final_accuracy'] - dense['final_accuracy']):+.1f}"
        ups = [b for b in r["orch_bytes_up_by_round"] if b is not None]
        cells = [r["label"], f"{r['final_accuracy']:.3f}", delta]
        if "global_test_accuracy" in r0:
            cells.append(f"{r['global_test_accuracy']:.3f}")
        cells += [_size(r["uplink_total"]), _size(r["uplink_per_round"]), _size(r["uplink_per_update"]),
                  f"{r['ratio_vs_dense_f32']:.2g}x" if r["ratio_vs_dense_f32"] < 10 else f"{r['ratio_vs_dense_f32']:.1f}x",
                  _size(float(np.mean(ups))) if ups else "-",
                  _size(r["downlink_with_delta_per_round"]), _size(r["downlink_without_delta_per_round"]),
                  _size(r["agents_rx_bytes"]), _size(r["computed_downlink_total_with_delta"]),
                  _size(r["computed_downlink_total_without_delta"])]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _mean_std(values: list[float], scale: float = 1.0, digits: int = 3, sign: bool = False) -> str:
    xs = np.array(values, dtype=float) * scale
    mean = f"{xs.mean():+.{digits}f}" if sign else f"{xs.mean():.{digits}f}"
    return mean if xs.size < 2 else f"{mean} ± {xs.std(ddof=1):.{digits}f}"


def seed_summary(results: list[dict], task: str) -> tuple[str, list[dict]]:
    """Per variant over seeds: mean ± sample std of accuracies, of their deltas against the
    dense run of the same seed, of update size and of the ratio to dense float32."""
    rows = [r for r in results if r["task"] == task and not r["no_delta"]]
    dense = {r["seed"]: r for r in rows if r["variant"] == "dense"}
    held_out = all("global_test_accuracy" in r for r in rows)
    summary, lines = [], []
    cols = ["variant", "seeds", "pooled acc", "Δ pooled (pts)"]
    if held_out:
        cols += ["held-out acc", "Δ held-out (pts)"]
    cols += ["uplink / update", "× fewer than dense f32", "min..max over seeds"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        paired = [r for r in runs if r["seed"] in dense]
        entry = {
            "variant": variant, "label": LABELS[variant], "seeds": [r["seed"] for r in runs],
            "pooled": [r["final_accuracy"] for r in runs],
            "delta_pooled": [r["final_accuracy"] - dense[r["seed"]]["final_accuracy"] for r in paired],
            "uplink_per_update": [r["uplink_per_update"] for r in runs],
            "ratio_vs_dense_f32": [r["ratio_vs_dense_f32"] for r in runs],
        }
        if held_out:
            entry["held_out"] = [r["global_test_accuracy"] for r in runs]
            entry["delta_held_out"] = [r["global_test_accuracy"] - dense[r["seed"]]["global_test_accuracy"]
                                       for r in paired]
        summary.append(entry)
        ratio = entry["ratio_vs_dense_f32"]
        cells = [LABELS[variant], str(len(runs)), _mean_std(entry["pooled"]),
                 _mean_std(entry["delta_pooled"], 100, 1, sign=True) if variant != "dense" else "0"]
        if held_out:
            cells += [_mean_std(entry["held_out"]),
                      _mean_std(entry["delta_held_out"], 100, 1, sign=True) if variant != "dense" else "0"]
        cells += [_size(float(np.mean(entry["uplink_per_update"]))), _mean_std(ratio, digits=1),
                  f"{min(ratio):.1f}..{max(ratio):.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines), summary


def breakdown_table(results: list[dict], task: str) -> str:
    """Mean bytes per update, by part, for each sparse variant (all seeds' updates pooled)."""
    rows = [r for r in results if r["task"] == task and not r["no_delta"] and "update_breakdown_mean" in r]
    if not rows:
        return ""
    parts = ["total", "prefix", "zstd_framing", "header", "header_raw", "positions", "positions_raw", "values",
             "values_raw", "values_topk_int8", "values_small_int8", "values_dense_f16", "values_dense_f32"]
    lines = ["| variant | updates | " + " | ".join(parts) + " |", "|" + "---|" * (len(parts) + 2)]
    for variant in dict.fromkeys(r["variant"] for r in rows):
        runs = [r for r in rows if r["variant"] == variant]
        n = sum(r["update_breakdown_updates"] for r in runs)
        mean = {p: sum(r["update_breakdown_mean"][p] * r["update_breakdown_updates"] for r in runs) / n for p in parts}
        lines.append(f"| {LABELS[variant]} | {n} | " + " | ".join(f"{mean[p]:.0f}" for p in parts) + " |")
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in results}, key=lambda t: ["digits", "heart"].index(t))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    styles = {"dense": ("black", "-"), "k10-ef": ("tab:blue", "-"), "k1-ef": ("tab:orange", "-"),
              "k0_1-ef": ("tab:green", "-"), "k10": ("tab:blue", "--"), "k1": ("tab:orange", "--"),
              "k0_1": ("tab:green", "--"), "k0_5-ef": ("tab:purple", "-"), "k1-ef-f16": ("tab:red", ":")}
    for ax, task in zip(axes[0], tasks):
        for r in results:
            if r["task"] != task or r["no_delta"]:
                continue
            color, style = styles[r["variant"]]
            ax.plot(r["uplink_cumulative"], r["accuracy_by_version"][1:], style, color=color, marker=".",
                    label=f"{r['label']} ({_ratio_label(r['ratio_vs_dense_f32'])})")
        ax.set_xscale("log")
        ax.set_xlabel("cumulative uplink bytes (update payloads, all sites)")
        ax.set_ylabel("pooled test accuracy")
        ax.set_title(f"{task}: accuracy vs uplink bytes")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def machine() -> str:
    load = os.getloadavg()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor()
    return (f"{platform.node()}, {cpu}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["digits", "heart"], choices=["digits", "heart"])
    ap.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                    help="default: all for digits; all but k0_5-ef for heart (where top-k keeps 1 element per tensor "
                         "from 1%% down, so 0.5%% repeats 1%%)")
    ap.add_argument("--digits-rounds", type=int, default=30)
    ap.add_argument("--heart-rounds", type=int, default=15)
    ap.add_argument("--digits-local-steps", type=int, default=DigitsOptions.local_steps)
    ap.add_argument("--digits-lr", type=float, default=DigitsOptions.learning_rate)
    ap.add_argument("--digits-min-sparse-numel", type=int, default=256,
                    help="tensors smaller than this go dense (default: the codec's 256, which keeps the CNN's "
                         "BatchNorm statistics dense; with 1, top-k + error feedback drives running_var negative "
                         "and the model to NaN within 3 rounds)")
    ap.add_argument("--digits-dense-dtype", default="int8", choices=["float32", "float16", "int8"],
                    help="dtype of the small tensors sent dense in sparse mode (BN weights and biases, biases: "
                         "874 of the CNN's values; the 448 BN running statistics always go float16 with int8); "
                         "int8 with error feedback halves what float16 costs")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0],
                    help="digits only: one run of every variant per seed (split, training seed, initial CNN)")
    ap.add_argument("--heart-min-sparse-numel", type=int, default=1,
                    help="the logreg has 14 parameters, below the default 256: lowered so top-k applies")
    ap.add_argument("--no-delta-rounds", type=int, default=5,
                    help="rounds of an extra digits top-1%%+EF federation with the model delta disabled (0: skip)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="per federation")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="torch threads per training call (the agents are threads of this process)")
    ap.add_argument("--out-dir", type=Path, default=Path("bench/results"))
    ap.add_argument("--tag", default="compression")
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--render", type=Path, metavar="JSON",
                    help="run nothing: print the tables and draw the curves of an earlier run's JSON")
    args = ap.parse_args()
    if args.render:
        report(json.loads(args.render.read_text())["results"], args.render.with_suffix(".png"))
        return
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")

    import torch
    torch.set_num_threads(args.torch_threads)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    info = {"machine": machine(), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv),
            "args": {k: str(v) for k, v in vars(args).items()}}
    print(f"machine: {info['machine']}\ndate: {info['date']}", flush=True)
    results: list[dict] = []
    broker = start_mosquitto()
    try:
        with tempfile.TemporaryDirectory(prefix="fedmq-bench-compression-") as tmp:
            workdir = Path(tmp)
            tasks = {seed: make_tasks(args, broker.url, workdir, seed) for seed in args.seeds}
            first = args.seeds[0]
            for name in args.tasks:
                variants = args.variants or (DEFAULT_DIGITS_VARIANTS if name == "digits" else
                                             [v for v in DEFAULT_DIGITS_VARIANTS if v != "k0_5-ef"])
                runs = [(seed, v) for seed in (args.seeds if name == "digits" else [first]) for v in variants]
                for seed, variant in runs:
                    task = tasks[seed][name]
                    t0 = time.perf_counter()
                    r = run_one(task, variant, broker.url, workdir, rounds=task.rounds, timeout=args.timeout)
                    results.append(r)
                    held = f" held-out {r['global_test_accuracy']:.3f}" if "global_test_accuracy" in r else ""
                    print(f"{name:6s} seed {seed} {variant:9s} acc {r['final_accuracy']:.3f}{held} uplink/round "
                          f"{_size(r['uplink_per_round'])} ({r['ratio_vs_dense_f32']:.1f}x fewer than dense f32) "
                          f"down/round {_size(r['downlink_with_delta_per_round'])} with delta, "
                          f"{_size(r['downlink_without_delta_per_round'])} without; "
                          f"{time.perf_counter() - t0:.0f}s", flush=True)
            if "digits" in args.tasks and args.no_delta_rounds > 0:
                for no_delta in (False, True):
                    r = run_one(tasks[first]["digits"], "k1-ef", broker.url, workdir, rounds=args.no_delta_rounds,
                                timeout=args.timeout, no_delta=no_delta, suffix="-short")
                    r["short_run"] = True
                    results.append(r)
                    print(f"digits k1-ef {args.no_delta_rounds} rounds, delta {'off' if no_delta else 'on'}: agents "
                          f"received {_size(r['agents_rx_bytes'])} in all (computed model blobs: "
                          f"{_size(r['computed_downlink_total_with_delta'])} with delta, "
                          f"{_size(r['computed_downlink_total_without_delta'])} without)", flush=True)
    finally:
        broker.stop()
    wall = time.perf_counter() - started
    info["wall_seconds"] = round(wall, 1)
    out_json = args.out_dir / f"{args.tag}.json"
    main_results = [r for r in results if not r.get("short_run")]
    summary = {name: seed_summary(main_results, name)[1] for name in args.tasks}
    out_json.write_text(json.dumps({"info": info, "summary": summary, "results": results}, indent=1))
    report(results, args.out_dir / f"{args.tag}.png")
    print(f"wrote {out_json}; wall time {wall:.0f}s")


def report(results: list[dict], out_png: Path) -> None:
    """Print every table and draw the curves (first seed) from the runs' results."""
    main_results = [r for r in results if not r.get("short_run")]
    seeds = list(dict.fromkeys(r["seed"] for r in main_results))
    if main_results:
        plot([r for r in main_results if r["seed"] == seeds[0]], out_png)
    print()
    for name in dict.fromkeys(r["task"] for r in main_results):
        task_seeds = list(dict.fromkeys(r["seed"] for r in main_results if r["task"] == name))
        for seed in task_seeds:
            print(table(main_results, name, seed))
            print()
        print(f"**{name}: mean ± std over seeds {task_seeds}** (Δ against the dense run of the same seed)\n")
        print(seed_summary(main_results, name)[0])
        print()
        breakdown = breakdown_table(main_results, name)
        if breakdown:
            print(f"**{name}: bytes per sparse update, by part** (mean over every stored update)\n")
            print(breakdown)
            print()
    short = [r for r in results if r.get("short_run")]
    if short:
        rounds = short[0]["rounds"]
        print(f"**downlink, measured** (digits, top-1% + EF, {rounds} training rounds + the final "
              f"evaluation = {rounds + 1} announcements to 10 sites; payload bytes the agents' transports "
              "received over the whole run: model blobs, round commands, acks)\n")
        print("| model delta | agents rx, total (measured) | computed: blobs with delta | computed: blobs without delta |")
        print("|---|---:|---:|---:|")
        for r in short:
            print(f"| {'off (full model broadcast)' if r['no_delta'] else 'on'} | {_size(r['agents_rx_bytes'])} | "
                  f"{_size(r['computed_downlink_total_with_delta'])} | "
                  f"{_size(r['computed_downlink_total_without_delta'])} |")
        print()
    print(f"curves: {out_png}")


if __name__ == "__main__":
    main()
