"""The agent's CPU threads and its memory footprint: what the ``torch_threads`` setting and lazy imports buy.

Threads. 100 local steps (``edge_agent.trainer.train``, the agent's own training path) of

* ``logreg``: the demo's logistic regression (13 features) on Cleveland's real training CSV,
  batch 4, SGD at the demo's learning rate;
* ``mlp1m``: ``build_onnx("mlp")`` 210 -> 1024 -> 768 -> 1 (1.0 M parameters, as in
  ``bench_round.py``) on synthetic rows, batch 32,

with 1 and 2 torch threads (``edge_agent.trainer.use_threads``, what the agent applies at
start), each in a fresh process, on the machine as found (the 1-minute load average is
printed: "idle" only if nothing else runs) and with one more core's worth of work from a
bounded busy-loop subprocess this script starts (a hospital server whose other work holds a
core). Repetitions alternate the thread counts; medians and ratios come from the same run.

Footprint. ``python -m fedmq agent run`` as a subprocess connected to a Mosquitto this script
starts, ``--processes`` of them side by side, idle (no round yet): resident, proportional and
private memory (``/proc/PID/smaps_rollup``) once every heartbeat says connected, and how
many such processes fit in 24 GB (the shared library pages once, the private pages each).
``--source DIR`` runs the agent from another checkout (e.g. ``git archive <commit> | tar -x -C
DIR``) to compare before and after a change.
``--importtime`` adds the memory after each heavy import of the agent's path.

    python bench/bench_agent_threads.py                  # threads (5 reps) + footprint
    python bench/bench_agent_threads.py --reps 3 --skip-footprint
    python bench/bench_agent_threads.py --skip-threads --source /tmp/base --importtime
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # this checkout, not an installed fedmq elsewhere
STEPS = 100
BUSY_BOUND_SECONDS = 900  # the busy loop ends on its own even if this script is killed


def child_train(case: str, threads: int) -> None:
    """One measurement in a fresh process: the thread counts are fixed before torch's first parallel work."""
    import numpy as np

    from edge_agent.data import read_csv
    from edge_agent.trainer import train, use_threads, warm_up
    from fedmq.demo import DATA_DIR, DemoOptions, heart_features
    from orchestrator.architectures import build_onnx
    from shared.onnx_model import load_model_bytes
    from shared.protocol import TrainingConfig

    use_threads(threads)
    warm_up()
    if case == "logreg":
        features = heart_features()
        x, y = read_csv(DATA_DIR / "cleveland_train.csv", features, "label")
        x = ((x - x.mean(axis=0)) / (x.std(axis=0) + 1e-8)).astype(np.float32)
        model = build_onnx("logreg", num_features=len(features), num_outputs=1)
        cfg = TrainingConfig(local_steps=STEPS, batch_size=4, learning_rate=DemoOptions.learning_rate, loss="bce")
    else:
        rng = np.random.default_rng(0)
        x = rng.standard_normal((300, 210)).astype(np.float32)
        y = (rng.random(300) < 0.5).astype(np.float32)
        model = build_onnx("mlp", num_features=210, hidden=(1024, 768), num_outputs=1)
        cfg = TrainingConfig(local_steps=STEPS, batch_size=32, learning_rate=0.01, loss="bce_logits")
    onnx_model = load_model_bytes(model)
    train(onnx_model, x, y, cfg, seed=0)  # first call: allocator and kernel warm-up, not counted
    result = train(onnx_model, x, y, cfg, seed=1)
    import torch
    print(json.dumps({"seconds": result.seconds, "threads": torch.get_num_threads(),
                      "interop": torch.get_num_interop_threads()}))


def _measure(case: str, threads: int) -> float:
    out = subprocess.run([sys.executable, __file__, "--child", case, str(threads)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["threads"] == threads, got
    return got["seconds"]


def _busy_loop() -> subprocess.Popen:
    code = f"import time\nend = time.time() + {BUSY_BOUND_SECONDS}\nwhile time.time() < end:\n    pass\n"
    return subprocess.Popen([sys.executable, "-c", code])


def bench_threads(reps: int) -> list[dict]:
    rows = []
    for load in ("as found", "+ 1 busy loop"):
        busy = _busy_loop() if load != "as found" else None
        try:
            time.sleep(0.5 if busy else 0)
            load_before = os.getloadavg()[0]
            for case in ("logreg", "mlp1m"):
                times: dict[int, list[float]] = {1: [], 2: []}
                for rep in range(reps):
                    for threads in ((1, 2) if rep % 2 == 0 else (2, 1)):
                        times[threads].append(_measure(case, threads))
                m1, m2 = statistics.median(times[1]), statistics.median(times[2])
                rows.append({"case": case, "load": load, "loadavg": (load_before, os.getloadavg()[0]), "t1": m1,
                             "t2": m2, "ratio": m2 / m1, "all": {str(k): v for k, v in times.items()}})
                print(f"  {case:7s} {load:13s} load avg {load_before:.1f} 1 thread {m1:8.3f} s  "
                      f"2 threads {m2:8.3f} s  2/1 {m2 / m1:6.2f}x",
                      file=sys.stderr, flush=True)
        finally:
            if busy is not None:
                busy.kill()
                busy.wait()
    return rows


def _memory_mb(pid: int) -> dict[str, float]:
    """Resident (Rss), proportional (Pss: shared pages divided among their users) and private MB of a process."""
    rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]
    kb = {line.split(":")[0]: int(line.split()[1]) for line in rollup}
    return {"rss": kb["Rss"] / 1024, "pss": kb["Pss"] / 1024,
            "private": (kb["Private_Clean"] + kb["Private_Dirty"]) / 1024}


def bench_footprint(source: Path, label: str, processes: int, settle: float) -> dict:
    """``processes`` idle agents on one broker; per-process memory once all are connected.

    The number that fit in 24 GB counts what each further agent adds (its private pages) plus
    the pages they all share (torch's and Python's libraries, mapped once): RSS alone counts
    the shared pages again in every process.
    """
    from fedmq.demo import DATA_DIR
    from shared.broker import start_mosquitto

    with start_mosquitto() as broker, tempfile.TemporaryDirectory() as tmp:
        procs: list[tuple[subprocess.Popen, Path]] = []
        try:
            for i in range(processes):
                state = Path(tmp) / f"site{i}"
                env = {k: v for k, v in os.environ.items() if not k.startswith("FEDMQ_")}
                env.update({"FEDMQ_BROKER_URL": broker.url, "FEDMQ_SITE_ID": f"site{i}", "FEDMQ_STATE_DIR": str(state),
                            "FEDMQ_DATA_TRAIN": str(DATA_DIR / "cleveland_train.csv"),
                            "FEDMQ_FEDERATION": "footprint", "PYTHONPATH": str(source)})
                proc = subprocess.Popen([sys.executable, "-m", "fedmq", "agent", "run"], cwd=source, env=env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                procs.append((proc, state / "health.json"))
            deadline = time.monotonic() + 60 + 30 * processes
            for proc, health in procs:
                while not (health.exists() and json.loads(health.read_text() or "{}").get("connected")):
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError(f"an agent did not connect: {proc.stderr.read().decode()[-2000:]}")
                    time.sleep(0.2)
            time.sleep(settle)  # idle: heartbeats only
            memory = [_memory_mb(proc.pid) for proc, _ in procs]
            ort_mapped = any("onnxruntime" in Path(f"/proc/{proc.pid}/maps").read_text() for proc, _ in procs)
        finally:
            for proc, _ in procs:
                proc.terminate()
            for proc, _ in procs:
                proc.wait(timeout=30)
    mean = {key: statistics.mean(m[key] for m in memory) for key in memory[0]}
    shared = mean["rss"] - mean["private"]
    row = {"source": label, "processes": processes, **{f"{k}_mb": v for k, v in mean.items()},
           "total_pss_mb": sum(m["pss"] for m in memory), "onnxruntime_mapped": ort_mapped,
           "fit_24gb_by_rss": int(24 * 1024 // mean["rss"]), "fit_24gb": int((24 * 1024 - shared) // mean["private"])}
    print(f"  {label}: {processes} idle agents, each RSS {mean['rss']:.0f} MB, PSS {mean['pss']:.0f} MB, private "
          f"{mean['private']:.0f} MB; {row['fit_24gb']} per 24 GB", file=sys.stderr, flush=True)
    return row


def import_costs(source: Path) -> list[tuple[str, float, float]]:
    """Resident and private MB after each heavy import of ``fedmq agent run``'s path and torch's warm-up."""
    code = ("import sys, json\n"
            "def mb():\n"
            "    rollup = open('/proc/self/smaps_rollup').read().splitlines()[1:]\n"
            "    kb = {l.split(':')[0]: int(l.split()[1]) for l in rollup}\n"
            "    return kb['Rss'] / 1024, (kb['Private_Clean'] + kb['Private_Dirty']) / 1024\n"
            "out = [('python', *mb())]\n"
            "for m in ['numpy', 'torch', 'onnx', 'pydantic', 'paho.mqtt.client', 'typer', 'rich.console', 'fedmq.cli',"
            " 'edge_agent.agent']:\n"
            "    __import__(m); out.append((m, *mb()))\n"
            "loaded = [m for m in ('onnxruntime', 'scipy', 'matplotlib', 'docker', 'dp_accounting')\n"
            "          if m in sys.modules]\n"
            "import edge_agent.trainer\n"
            "edge_agent.trainer.warm_up()\n"
            "out.append(('warm_up() (the first optimizer imports torch._dynamo)', *mb()))\n"
            "import onnxruntime; out.append(('onnxruntime (first evaluation)', *mb()))\n"
            "out.append(('already loaded after fedmq.cli + edge_agent.agent: ' + (', '.join(loaded) or 'none of "
            "onnxruntime, scipy, matplotlib, docker, dp_accounting'), 0, 0))\n"
            "print(json.dumps(out))\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=source, env=dict(os.environ, PYTHONPATH=str(source)),
                         check=True, capture_output=True, text=True).stdout
    return [tuple(row) for row in json.loads(out)]


def machine() -> str:
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
    model = next((line.split(":", 1)[1].strip() for line in lscpu if line.startswith("Model name")), "?")
    import torch
    return (f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC, {platform.node()}, {model}, nproc {os.cpu_count()}, "
            f"load average {' '.join(f'{v:.2f}' for v in os.getloadavg())}, python {platform.python_version()}, "
            f"torch {torch.__version__}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", nargs=2, metavar=("CASE", "THREADS"), help=argparse.SUPPRESS)
    ap.add_argument("--reps", type=int, default=5, help="fresh processes per case, load and thread count")
    ap.add_argument("--skip-threads", action="store_true")
    ap.add_argument("--skip-footprint", action="store_true")
    ap.add_argument("--source", type=Path, action="append", default=[],
                    help="also measure the idle agent from this checkout (repeatable); this tree is always measured")
    ap.add_argument("--importtime", action="store_true", help="also print resident MB after each import")
    ap.add_argument("--processes", type=int, default=4, help="idle agents started side by side")
    ap.add_argument("--settle", type=float, default=3.0, help="seconds idle after connecting before reading RSS")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    if args.child:
        child_train(args.child[0], int(args.child[1]))
        return
    print(f"machine: {machine()}", flush=True)
    result: dict = {"machine": machine()}
    if not args.skip_threads:
        rows = bench_threads(args.reps)
        result["threads"] = rows
        print(f"\n{STEPS} training steps, median of {args.reps} fresh processes each\n")
        print("| model | extra load | 1-min load avg (before → after) | 1 thread (s) | 2 threads (s) "
              "| 2 threads / 1 thread |")
        print("|---|---|---|---:|---:|---:|")
        for r in rows:
            print(f"| {r['case']} | {r['load']} | {r['loadavg'][0]:.1f} → {r['loadavg'][1]:.1f} | {r['t1']:.3f} "
                  f"| {r['t2']:.3f} | {r['ratio']:.2f}x |")
    if not args.skip_footprint:
        rows = [bench_footprint(src.resolve(), str(src), args.processes, args.settle) for src in args.source]
        rows.append(bench_footprint(ROOT, "this tree", args.processes, args.settle))
        result["footprint"] = rows
        print(f"\n{args.processes} idle `python -m fedmq agent run` processes on one broker, connected, before any "
              "round; mean per process\n")
        print("| agent from | RSS (MB) | PSS (MB) | private (MB) | onnxruntime mapped | per 24 GB by RSS "
              "| per 24 GB (shared once + private each) |")
        print("|---|---:|---:|---:|---|---:|---:|")
        for r in rows:
            print(f"| {r['source']} | {r['rss_mb']:.0f} | {r['pss_mb']:.0f} | {r['private_mb']:.0f} | "
                  f"{'yes' if r['onnxruntime_mapped'] else 'no'} | {r['fit_24gb_by_rss']} | {r['fit_24gb']} |")
    if args.importtime:
        for src in [*args.source, ROOT]:
            print(f"\nMB after each import, cumulative ({src})\n")
            print("| import | RSS (MB) | private (MB) |\n|---|---:|---:|")
            for name, rss, private in import_costs(src.resolve()):
                print(f"| {name} | {rss:.0f} | {private:.0f} |" if rss else f"\n{name}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
