"""Secure aggregation over MQTT: what it costs per round and what it does to accuracy, against plain FedAvg.

Real federations over a real Mosquitto (``shared.broker.start_mosquitto``), orchestrator and
agents as threads of this process (``fedmq.inprocess.run_federation``), one federation per
variant, the plain baseline in the same invocation:

- ``heart``: the four Heart Disease hospitals (logistic regression, 14 parameters), FedAvg;
- ``digits``: scikit-learn's digits over 10 non-IID sites, CNN of 118,986 parameters, FedAvg.

Variants: ``plain`` (dense float32 + zstd updates), ``secure`` (every coordinate masked),
``secure-idx10`` / ``secure-idx1`` (secure with a shared random index set of 10% / 1% of the
positions and error feedback; ``-noef`` without; digits only),
``secure-dp`` (secure + dp_fedavg with distributed noise, z = 0.5, clip 0.5 (heart) / 1.0
(digits): the composition the issue asks for). Every site takes part in every round.

Per variant: final pooled accuracy (and on the digits held-out set), per train round the
median wall time from announcement to the new version (``RoundSummary.seconds['wall']``:
training + all protocol phases) and the median bytes the orchestrator sent and received
(``RoundSummary.bytes_down`` / ``bytes_up``: every payload incl. key adverts, rosters, sealed
shares, masked vectors and reveals), with ratios to plain.

    python bench/bench_secure_rounds.py                       # both tasks, all variants
    python bench/bench_secure_rounds.py --tasks heart --heart-rounds 5 --json out.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmq.demo import DemoOptions, heart_settings, with_secure_aggregation
from fedmq.digits import DigitsOptions, digits_settings, global_test_accuracy
from fedmq.inprocess import round_summaries, run_federation
from edge_agent.trainer import TrainingError
from orchestrator.registry import ModelRegistry
from shared.broker import start_mosquitto

VARIANTS = ("plain", "secure", "secure-idx10", "secure-idx10-noef", "secure-idx1", "secure-dp")
INDEX_SETS = {"secure-idx10": {"index_fraction": 0.1}, "secure-idx10-noef": {"index_fraction": 0.1,
                                                                              "error_feedback": False},
              "secure-idx1": {"index_fraction": 0.01}}
DP_CLIP = {"heart": 0.5, "digits": 1.0}


def settings_for(task: str, variant: str, url: str, root: Path, rounds: int):
    federation = f"{task}-{variant}"
    if task == "heart":
        orch, agents = heart_settings(url, root, DemoOptions(rounds=rounds))
    else:
        orch, agents = digits_settings(url, root, rounds, opts=DigitsOptions(federation=federation))
    update = {"federation": federation}
    if variant == "secure-dp":
        update["strategy"] = {"name": "dp_fedavg", "options": {"noise": "distributed", "noise_multiplier": 0.5,
                                                               "clip_norm": DP_CLIP[task]}}
    orch = orch.model_copy(update=update)
    agents = [a.model_copy(update={"federation": federation}) for a in agents]
    if variant != "plain":
        orch, agents = with_secure_aggregation(orch, agents, root / "pki", **INDEX_SETS.get(variant, {}))
    return orch, agents


def run_variant(task: str, variant: str, url: str, workdir: Path, rounds: int, timeout: float) -> dict:
    root = workdir / f"{task}-{variant}"
    orch, agents = settings_for(task, variant, url, root, rounds)
    started = time.perf_counter()
    with round_summaries(url, orch.federation) as summaries:
        with run_federation(orch, agents) as fed:
            fed.wait_finished(timeout=timeout)
    wall = time.perf_counter() - started
    registry = ModelRegistry.open(orch.state_dir)
    final = registry.latest()
    train = [s for s in summaries if s.new_version is not None]
    if len(train) != rounds:
        raise RuntimeError(f"{task}/{variant}: {len(train)} train summaries for {rounds} rounds")
    pooled = registry.get(final.version).pooled
    result = {
        "task": task, "variant": variant, "rounds": rounds, "sites": len(agents), "wall_seconds": round(wall, 1),
        "final_version": final.version, "pooled_accuracy": pooled.accuracy if pooled else None,
        "round_wall_median": statistics.median(s.seconds["wall"] for s in train),
        "bytes_up_median": statistics.median(s.bytes_up for s in train),
        "bytes_down_median": statistics.median(s.bytes_down for s in train),
        "epsilon": final.privacy.epsilon if final.privacy else None,
    }
    if task == "digits":
        try:
            result["held_out_accuracy"] = global_test_accuracy(registry.model_bytes(final.version), root / "data")
        except TrainingError as e:  # a diverged model is a result too
            print(f"[{task}/{variant}] held-out: {e}", flush=True)
            result["held_out_accuracy"] = None
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", nargs="+", default=["heart", "digits"], choices=["heart", "digits"])
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--heart-rounds", type=int, default=15)
    ap.add_argument("--digits-rounds", type=int, default=20)
    ap.add_argument("--timeout", type=float, default=3600.0, help="per federation")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    info = {"date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "python": platform.python_version(),
            "cpus": os.cpu_count(), "load_start": os.getloadavg()}
    results = []
    with tempfile.TemporaryDirectory(prefix="fedmq-bench-secure-") as tmp, start_mosquitto() as broker:
        for task in args.tasks:
            rounds = args.heart_rounds if task == "heart" else args.digits_rounds
            for variant in args.variants:
                if variant in INDEX_SETS and task == "heart":
                    continue
                print(f"[{task}/{variant}] {rounds} rounds ...", flush=True)
                r = run_variant(task, variant, broker.url, Path(tmp), rounds, args.timeout)
                results.append(r)
                print(f"[{task}/{variant}] done in {r['wall_seconds']} s: pooled {r['pooled_accuracy']}, "
                      f"round {r['round_wall_median']:.2f} s, up {r['bytes_up_median'] / 1e3:.1f} kB", flush=True)
    info["load_end"] = os.getloadavg()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))


def print_table(results: list[dict]) -> None:
    print("\n| task | variant | pooled acc | held-out | ε | round wall (median) | × plain | up / round | × plain "
          "| down / round | × plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        base = next(b for b in results if b["task"] == r["task"] and b["variant"] == "plain")
        held = f"{r['held_out_accuracy']:.3f}" if r.get("held_out_accuracy") is not None else "–"
        eps = f"{r['epsilon']:.3g}" if r["epsilon"] is not None else "–"
        pooled = f"{r['pooled_accuracy']:.3f}" if r["pooled_accuracy"] is not None else "–"
        print(f"| {r['task']} | {r['variant']} | {pooled} | {held} | {eps} | "
              f"{r['round_wall_median']:.2f} s | {r['round_wall_median'] / base['round_wall_median']:.2f}x | "
              f"{r['bytes_up_median'] / 1e3:.1f} kB | {r['bytes_up_median'] / base['bytes_up_median']:.2f}x | "
              f"{r['bytes_down_median'] / 1e3:.1f} kB | {r['bytes_down_median'] / base['bytes_down_median']:.2f}x |")


if __name__ == "__main__":
    main()
