"""Orchestrator peak memory while aggregating many updates of a ~10M-parameter model.

Each case runs in a fresh subprocess (so ``ru_maxrss``/``VmHWM`` is that case's own high
water mark) and measures only the aggregation phase:

- ``stream``: what the orchestrator should do: for each update read its bytes, decode with
  ``shared.codec.decode_tensors``, fold it into FedAvg's streaming ``WeightedAverage``
  (``strategy.begin_round(...).add``), drop it; then ``finish()``.
- ``hold_all``: the baseline: decode every update densified first, keep them all, then
  fold and finish. Memory grows with the number of updates.
- ``engine``: the real round engine: ``orchestrator.rounds.RoundEngine._aggregate`` on a
  registry/journal on disk holding the round's update blobs (what runs when a round closes:
  load the base version, decode each stored update, fold, write the new version).

Updates are sparse top-1% int8 (``CompressionSettings(mode="sparse", topk_fraction=0.01)``)
or dense float32 (+zstd), of an MLP 2048-2048-2048-768-10 (9.97M parameters, 39.9 MB
as float32 = "model size" below). ``--distinct`` different updates are generated and site
``i`` uses update ``i % distinct``; each is read from disk when folded, as the blob store does.

Figures: ``traced`` = tracemalloc peak of allocations made during aggregation (numpy and
Python buffers; not protobuf's C++ heap); ``rss`` = VmHWM at the end minus VmRSS just
before aggregation (everything, C++ included). Both are divided by the model size.

    python bench/bench_aggregation_memory.py [--sites 10 25 50] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ROUND_ID = "memfed-r1-a1"
FEDERATION = "memfed"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settings(kind: str):
    from shared.codec import CompressionSettings
    if kind == "sparse":
        return CompressionSettings(mode="sparse", topk_fraction=0.01, quantization="int8", error_feedback=False)
    return CompressionSettings()


# --- parent: preparation ------------------------------------------------------------------


def build_model(workdir: Path, features: int, hidden: tuple[int, ...]) -> Path:
    from orchestrator.architectures import build_onnx
    path = workdir / "model.onnx"
    path.write_bytes(build_onnx("mlp", num_features=features, num_outputs=10, hidden=hidden))
    return path


def make_updates(workdir: Path, model_path: Path, distinct: int, seed: int) -> dict[str, list[Path]]:
    from shared.codec import encode_tensors
    from shared.onnx_model import float_initializers, load_model_bytes
    weights = float_initializers(load_model_bytes(model_path.read_bytes(), max_bytes=1 << 30))
    rng = np.random.default_rng(seed)
    paths: dict[str, list[Path]] = {"dense": [], "sparse": []}
    for i in range(distinct):
        delta = {name: (rng.standard_normal(w.shape, dtype=np.float32) * 1e-3) for name, w in weights.items()}
        for kind, kind_paths in paths.items():
            path = workdir / f"update_{kind}_{i}.bin"
            path.write_bytes(encode_tensors(delta, _settings(kind)))
            kind_paths.append(path)
        del delta
    return paths


def prepare_engine(workdir: Path, model_path: Path, updates: list[Path], n: int) -> Path:
    """A registry with version 0 and an open round holding ``n`` stored updates."""
    from orchestrator.journal import RoundJournal
    from orchestrator.registry import ModelRegistry, open_database
    from shared.blobs import make_manifest
    from shared.blobstore import BlobStore
    from shared.protocol import TrainingConfig, UpdateReport
    state = workdir / f"engine_{updates[0].name.split('_')[1]}_{n}"
    conn = open_database(state / "orchestrator.sqlite")
    registry = ModelRegistry(conn, BlobStore(state / "blobs"))
    journal = RoundJournal(conn)
    training = TrainingConfig().model_dump()
    with registry.conn:
        registry.add_version(model_path.read_bytes(), parent=None, round=None, contributors={},
                             strategy={"name": "fedavg", "options": {}}, training=training, note="initial")
    sites = [f"s{i:03d}" for i in range(n)]
    journal.begin(round_id=ROUND_ID, round=1, attempt=1, kind="train", base_version=0, selected=sites,
                  training=training, deadline=time.time() + 3600)
    for i, site in enumerate(sites):
        data = updates[i % len(updates)].read_bytes()
        sha = registry.blobs.put(data)
        report = UpdateReport(federation=FEDERATION, sender=site, round_id=ROUND_ID, round=1, base_version=0,
                              num_samples=100 + i, update=make_manifest(data, "application/x-fedmq-tensors", 1 << 20))
        journal.add_update(ROUND_ID, site, sha, report)
    conn.close()
    return state


# --- child: one measurement ---------------------------------------------------------------


class _NullPublisher:
    def announce(self, *a, **k): ...
    def model_published(self, *a, **k): ...
    def round_summary(self, *a, **k): ...
    def status(self, *a, **k): ...


def child(case: dict) -> dict:
    from orchestrator.rounds import dense_bytes
    from orchestrator.strategies import StrategyConfig, make_strategy
    from shared.codec import decode_tensors
    from shared.onnx_model import float_initializers, load_model_bytes

    mode, n = case["mode"], case["n"]
    updates = [Path(p) for p in case["updates"]]
    strategy = make_strategy(StrategyConfig(name="fedavg"))
    if mode == "engine":
        from orchestrator.journal import RoundJournal
        from orchestrator.registry import ModelRegistry
        from orchestrator.rounds import RoundEngine
        from shared.config import OrchestratorSettings
        state = Path(case["engine_state"])
        registry = ModelRegistry.open(state)
        journal = RoundJournal(registry.conn)
        settings = OrchestratorSettings(state_dir=state, federation=FEDERATION, max_blob_bytes=1 << 30)
        engine = RoundEngine(settings, registry, journal, strategy, _NullPublisher())
        record = journal.get(ROUND_ID)
        stored = journal.updates(ROUND_ID)
        model_numel = case["numel"]
    else:
        weights = float_initializers(load_model_bytes(Path(case["model"]).read_bytes(), max_bytes=1 << 30))
        shapes = {k: v.shape for k, v in weights.items()}
        limit = dense_bytes(shapes)
        model_numel = sum(v.size for v in weights.values())
    rss_before = _status_kb("VmRSS")
    hwm_before = _status_kb("VmHWM")
    tracemalloc.start()
    started = time.perf_counter()
    if mode == "engine":
        version = engine._aggregate(record, stored)
        assert version.version == 1
    elif mode == "stream":
        aggregation = strategy.begin_round(weights)
        for i in range(n):
            data = updates[i % len(updates)].read_bytes()
            update = decode_tensors(data, shapes, max_decoded_bytes=limit)
            aggregation.add(f"s{i:03d}", 100 + i, update)
            del data, update
        new = aggregation.finish()
        assert set(new) == set(weights)
    elif mode == "hold_all":
        decoded = [decode_tensors(updates[i % len(updates)].read_bytes(), shapes, max_decoded_bytes=limit)
                   for i in range(n)]
        aggregation = strategy.begin_round(weights)
        for i, update in enumerate(decoded):
            aggregation.add(f"s{i:03d}", 100 + i, update)
        new = aggregation.finish()
        assert set(new) == set(weights)
    else:
        raise ValueError(mode)
    seconds = time.perf_counter() - started
    _, traced_peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    hwm_after = _status_kb("VmHWM")
    model_bytes = 4 * model_numel
    return {**{k: case[k] for k in ("mode", "kind", "n")}, "seconds": round(seconds, 3),
            "model_bytes": model_bytes, "traced_peak_bytes": traced_peak,
            "traced_x_model": round(traced_peak / model_bytes, 2),
            "rss_growth_bytes": (hwm_after - rss_before) * 1024,
            "rss_x_model": round((hwm_after - rss_before) * 1024 / model_bytes, 2),
            "hwm_before_kb": hwm_before, "rss_before_kb": rss_before,
            "ru_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def run_case(case: dict) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True,
                          cwd=ROOT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"case {case['mode']}/{case['kind']}/{case['n']} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"numpy {np.__version__}, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sites", type=int, nargs="+", default=[10, 25, 50])
    ap.add_argument("--modes", nargs="+", default=["stream", "engine", "hold_all"],
                    choices=["stream", "engine", "hold_all"])
    ap.add_argument("--kinds", nargs="+", default=["sparse", "dense"], choices=["sparse", "dense"])
    ap.add_argument("--features", type=int, default=2048)
    ap.add_argument("--hidden", type=int, nargs="+", default=[2048, 2048, 768])
    ap.add_argument("--distinct", type=int, default=5, help="different updates generated (site i uses i %% distinct)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="write all figures here")
    ap.add_argument("--workdir", type=Path, help="keep the generated files here (default: a temp dir)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return

    tmp = tempfile.TemporaryDirectory(prefix="fedmq-aggmem-") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"machine: {machine()}", flush=True)
    model = build_model(workdir, args.features, tuple(args.hidden))
    updates = make_updates(workdir, model, args.distinct, args.seed)
    from shared.onnx_model import float_initializers, load_model_bytes
    numel = sum(v.size for v in float_initializers(load_model_bytes(model.read_bytes(), max_bytes=1 << 30)).values())
    sizes = {kind: int(np.mean([p.stat().st_size for p in paths])) for kind, paths in updates.items()}
    print(f"model: {numel:,} parameters ({4 * numel / 1e6:.1f} MB float32); encoded update: "
          f"sparse 1% int8 {sizes['sparse'] / 1e3:.0f} kB, dense f32+zstd {sizes['dense'] / 1e6:.1f} MB", flush=True)
    results = []
    for mode in args.modes:
        for kind in args.kinds:
            for n in args.sites:
                case = {"mode": mode, "kind": kind, "n": n, "model": str(model), "numel": numel,
                        "updates": [str(p) for p in updates[kind]]}
                if mode == "engine":
                    case["engine_state"] = str(prepare_engine(workdir, model, updates[kind], n))
                result = run_case(case)
                results.append(result)
                print(f"  {mode:8s} {kind:6s} n={n:3d}: traced {result['traced_x_model']:5.2f}x model, "
                      f"rss {result['rss_x_model']:5.2f}x model, {result['seconds']:.1f}s", flush=True)
    wall = time.perf_counter() - started
    print()
    print(f"Peak memory of aggregation, {numel / 1e6:.2f}M-parameter model ({4 * numel / 2**20:.1f} MiB float32 = 1x)")
    print()
    print("| path | updates | n | traced peak MiB | traced / model | RSS growth MiB | RSS / model | seconds |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['mode']} | {r['kind']} | {r['n']} | {r['traced_peak_bytes'] / 2**20:.0f} | "
              f"{r['traced_x_model']:.2f} | {r['rss_growth_bytes'] / 2**20:.0f} | {r['rss_x_model']:.2f} | "
              f"{r['seconds']:.1f} |")
    print()
    for mode in args.modes:
        for kind in args.kinds:
            rows = [r for r in results if r["mode"] == mode and r["kind"] == kind]
            if len(rows) > 1:
                lo, hi = rows[0], rows[-1]
                print(f"{mode}/{kind}: traced {lo['traced_x_model']:.2f}x at n={lo['n']} -> "
                      f"{hi['traced_x_model']:.2f}x at n={hi['n']} "
                      f"({hi['traced_peak_bytes'] / max(lo['traced_peak_bytes'], 1):.2f}x growth)")
    print(f"\nwall time {wall:.0f}s")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(), "numel": numel, "encoded_update_bytes": sizes,
                                         "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "results": results,
                                         "wall_seconds": round(wall, 1)}, indent=1))
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
