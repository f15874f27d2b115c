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
codec default; it keeps BatchNorm statistics out of top-k, see ``--digits-min-sparse-numel``)
and send those as float16; the Heart Disease logistic regression (14 parameters) needs
``min_sparse_numel=1`` for top-k to apply at all, and then keeps 1 value per tensor at
every k <= 10%.

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
  "without" case directly.

    python bench/bench_compression.py                           # both tasks, all variants
    python bench/bench_compression.py --tasks digits --digits-rounds 10 --variants dense k1-ef
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import platform
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmq.demo import DemoOptions, heart_settings
from fedmq.digits import (
    DigitsOptions,
    digits_settings,
    global_test_accuracy,
    prepare_digits,
)
from fedmq.inprocess import run_federation
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry
from orchestrator.rounds import RoundEngine
from shared.broker import start_mosquitto
from shared.codec import CompressionSettings, encode_model_delta
from shared.config import AgentSettings, CommonSettings, OrchestratorSettings
from shared.onnx_model import float_initializers, load_model_bytes, pack_model
from shared.protocol import ProtocolError, RoundSummary, parse_message
from shared.topics import Topics
from shared.transport import Transport

log = logging.getLogger("bench_compression")

VARIANTS: dict[str, tuple[float | None, bool]] = {
    "dense": (None, False),
    "k10-ef": (0.10, True), "k1-ef": (0.01, True), "k0_1-ef": (0.001, True),
    "k10": (0.10, False), "k1": (0.01, False), "k0_1": (0.001, False),
    "k0_5-ef": (0.005, True),  # extra point between 1% and 0.1%, where the 100x target falls
}
LABELS = {"dense": "dense float32", "k10-ef": "top-10% int8 + EF", "k1-ef": "top-1% int8 + EF",
          "k0_1-ef": "top-0.1% int8 + EF", "k10": "top-10% int8, no EF", "k1": "top-1% int8, no EF",
          "k0_1": "top-0.1% int8, no EF", "k0_5-ef": "top-0.5% int8 + EF"}


def compression_for(variant: str, min_sparse_numel: int, dense_dtype: str) -> CompressionSettings:
    fraction, ef = VARIANTS[variant]
    if fraction is None:
        return CompressionSettings()
    return CompressionSettings(mode="sparse", topk_fraction=fraction, quantization="int8", error_feedback=ef,
                               min_sparse_numel=min_sparse_numel, dense_dtype=dense_dtype)


@dataclass
class Task:
    name: str
    rounds: int
    min_sparse_numel: int
    dense_dtype: str
    settings: object  # (federation, root, compression) -> (OrchestratorSettings, [AgentSettings])
    data_dir: Path | None = None


@contextmanager
def _summaries(url: str, federation: str):
    """Collect the RoundSummary messages the orchestrator publishes, as an operator would."""
    topics = Topics(federation)
    transport = Transport(CommonSettings(broker_url=url, federation=federation),
                          f"fedmq-{federation}-bench-monitor", persistent_session=False)
    collected: list[RoundSummary] = []
    with transport:
        transport.subscribe(topics.round_summary)
        yield collected
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            msg = transport.get(0.2)
            if msg is None:
                continue
            try:
                m = parse_message(msg.payload)
            except ProtocolError:
                continue
            if isinstance(m, RoundSummary):
                collected.append(m)


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
    federation = f"{task.name}-{variant}{suffix}{'-nodelta' if no_delta else ''}".replace("_", "-")
    root = workdir / federation
    orch, agents = task.settings(federation, root, compression, rounds)
    started = time.perf_counter()
    with _summaries(url, federation) as summaries:
        with (_without_model_delta() if no_delta else nullcontext()):
            with run_federation(orch, agents) as fed:
                fed.wait_finished(timeout=timeout)
                agents_live = dict(fed.agents)
            agent_rx = sum(a.transport.bytes_received for a in agents_live.values())
            agent_tx = sum(a.transport.bytes_sent for a in agents_live.values())
        time.sleep(0.5)
    wall = time.perf_counter() - started
    result = analyse(task, variant, root, orch, agents, summaries, rounds)
    result.update({"federation": federation, "wall_seconds": round(wall, 1), "no_delta": no_delta,
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
    uplink, reporters = [], []
    train_rounds = journal.done("train")
    for r in range(1, rounds + 1):
        recs = [rec for rec in train_rounds if rec.round == r]
        ups = [u for rec in recs for u in journal.updates(rec.round_id)]
        uplink.append(sum(u.report.update.size for u in ups if u.report.update is not None))
        reporters.append(len(ups))
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
    if task.data_dir is not None:
        result["global_test_accuracy"] = global_test_accuracy(registry.model_bytes(rounds), task.data_dir)
    registry.conn.close()
    return result


def make_tasks(args: argparse.Namespace, url: str, workdir: Path) -> dict[str, Task]:
    digits_data = workdir / "digits-data"
    digits_opts = DigitsOptions(local_steps=args.digits_local_steps, learning_rate=args.digits_lr)

    def digits(federation: str, root: Path, compression: CompressionSettings, rounds: int):
        opts = DigitsOptions(**{**digits_opts.__dict__, "federation": federation})
        return digits_settings(url, root, rounds, compression, opts, data_dir=digits_data)

    def heart(federation: str, root: Path, compression: CompressionSettings, rounds: int):
        orch, agents = heart_settings(url, root, DemoOptions(rounds=rounds))
        training = orch.training.model_copy(update={"compression": compression})
        orch = orch.model_copy(update={"federation": federation, "training": training})
        return orch, [a.model_copy(update={"federation": federation}) for a in agents]

    prepare_digits(digits_data)
    return {
        "digits": Task("digits", args.digits_rounds, args.digits_min_sparse_numel, args.digits_dense_dtype, digits,
                       digits_data),
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


def table(results: list[dict], task: str) -> str:
    rows = [r for r in results if r["task"] == task and not r["no_delta"]]
    if not rows:
        return ""
    dense = next((r for r in rows if r["variant"] == "dense"), None)
    r0 = rows[0]
    sparse = next((r["compression"] for r in rows if r["compression"]["mode"] == "sparse"), None)
    knobs = (f"; sparse variants: min_sparse_numel={sparse['min_sparse_numel']}, small tensors dense "
             f"{sparse['dense_dtype']}, zstd level {sparse['zstd_level']}" if sparse else "")
    head = (f"**{task}** ({r0['sites']} sites, {r0['numel']:,} parameters, {r0['rounds']} rounds; dense float32 update "
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


def plot(results: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    tasks = sorted({r["task"] for r in results}, key=lambda t: ["digits", "heart"].index(t))
    fig, axes = plt.subplots(1, len(tasks), figsize=(7 * len(tasks), 5), squeeze=False)
    styles = {"dense": ("black", "-"), "k10-ef": ("tab:blue", "-"), "k1-ef": ("tab:orange", "-"),
              "k0_1-ef": ("tab:green", "-"), "k10": ("tab:blue", "--"), "k1": ("tab:orange", "--"),
              "k0_1": ("tab:green", "--"), "k0_5-ef": ("tab:purple", "-")}
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
    ap.add_argument("--digits-dense-dtype", default="float16", choices=["float32", "float16"],
                    help="dtype of the small tensors sent dense in sparse mode (BN parameters and statistics, "
                         "biases: 1,322 of the CNN's values); float16 halves what would otherwise be most of a "
                         "top-1%% update")
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
    args = ap.parse_args()
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
            tasks = make_tasks(args, broker.url, workdir)
            for name in args.tasks:
                task = tasks[name]
                variants = args.variants or [v for v in VARIANTS if not (name == "heart" and v == "k0_5-ef")]
                for variant in variants:
                    t0 = time.perf_counter()
                    r = run_one(task, variant, broker.url, workdir, rounds=task.rounds, timeout=args.timeout)
                    results.append(r)
                    print(f"{name:6s} {variant:8s} acc {r['final_accuracy']:.3f} uplink/round "
                          f"{_size(r['uplink_per_round'])} ({r['ratio_vs_dense_f32']:.1f}x fewer than dense f32) "
                          f"down/round {_size(r['downlink_with_delta_per_round'])} with delta, "
                          f"{_size(r['downlink_without_delta_per_round'])} without; "
                          f"{time.perf_counter() - t0:.0f}s", flush=True)
            if "digits" in args.tasks and args.no_delta_rounds > 0:
                for no_delta in (False, True):
                    r = run_one(tasks["digits"], "k1-ef", broker.url, workdir, rounds=args.no_delta_rounds,
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
    out_png = args.out_dir / f"{args.tag}.png"
    main_results = [r for r in results if not r.get("short_run")]
    out_json.write_text(json.dumps({"info": info, "results": results}, indent=1))
    if main_results:
        plot(main_results, out_png)
    print()
    for name in args.tasks:
        print(table(main_results, name))
        print()
    short = [r for r in results if r.get("short_run")]
    if short:
        print(f"**downlink, measured** (digits, top-1% + EF, {args.no_delta_rounds} training rounds + the final "
              f"evaluation = {args.no_delta_rounds + 1} announcements to 10 sites; payload bytes the agents' transports "
              "received over the whole run: model blobs, round commands, acks)\n")
        print("| model delta | agents rx, total (measured) | computed: blobs with delta | computed: blobs without delta |")
        print("|---|---:|---:|---:|")
        for r in short:
            print(f"| {'off (full model broadcast)' if r['no_delta'] else 'on'} | {_size(r['agents_rx_bytes'])} | "
                  f"{_size(r['computed_downlink_total_with_delta'])} | "
                  f"{_size(r['computed_downlink_total_without_delta'])} |")
        print()
    print(f"wrote {out_json} and {out_png}; wall time {wall:.0f}s")


if __name__ == "__main__":
    main()
