"""Secure aggregation over MQTT: what it costs per round and what it does to accuracy, against plain FedAvg.

Real federations over a real Mosquitto (``shared.broker.start_mosquitto``), orchestrator and
agents as threads of this process (``fedmq.inprocess.run_federation``), one federation per
variant, the plain baseline in the same invocation:

- ``heart``: the four Heart Disease hospitals (logistic regression, 14 parameters), FedAvg;
- ``digits``: scikit-learn's digits over 10 non-IID sites, CNN of 118,986 parameters, FedAvg.

Variants: ``plain`` (dense float32 + zstd updates), ``secure`` (every coordinate masked),
``secure-idx10`` / ``secure-idx1`` (secure with a shared random index set of 10% / 1% of the
positions and error feedback; ``-noef`` without; digits only),
``dp`` / ``secure-dp`` (dp_fedavg with distributed noise, z = 0.5, clip 0.5 (heart) / 1.0
(digits), without and with secure aggregation: the composition the issue asks for; by default
on heart only, since client-level DP over 10 sites drowns the 118,986-parameter CNN, see
``bench_privacy_digits.py``). Every site takes part in every round.

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

VARIANTS = ("plain", "dp", "secure", "secure-dp", "secure-idx10", "secure-idx10-noef", "secure-idx1")
DEFAULT_VARIANTS = {"heart": ("plain", "dp", "secure", "secure-dp"),
                    "digits": ("plain", "secure", "secure-idx10", "secure-idx10-noef", "secure-idx1")}
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
    if variant.endswith("dp"):
        update["strategy"] = {"name": "dp_fedavg", "options": {"noise": "distributed", "noise_multiplier": 0.5,
                                                               "clip_norm": DP_CLIP[task]}}
    orch = orch.model_copy(update=update)
    agents = [a.model_copy(update={"federation": federation}) for a in agents]
    if variant.startswith("secure"):
        orch, agents = with_secure_aggregation(orch, agents, root / "pki", **INDEX_SETS.get(variant, {}))
    return orch, agents


def run_variant(task: str, variant: str, url: str, workdir: Path, rounds: int, timeout: float, repeat: int) -> dict:
    root = workdir / f"{task}-{variant}-{repeat}"
    orch, agents = settings_for(task, variant, url, root, rounds)
    orch = orch.model_copy(update={"federation": f"{orch.federation}-{repeat}"})
    agents = [a.model_copy(update={"federation": orch.federation}) for a in agents]
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
    curve = [registry.get(v).pooled.accuracy for v in range(final.version + 1) if registry.get(v).pooled]
    result = {
        "task": task, "variant": variant, "repeat": repeat, "rounds": rounds, "pooled_by_version": curve,
        "pooled_last5": statistics.mean(curve[-5:]), "sites": len(agents), "wall_seconds": round(wall, 1),
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
    ap.add_argument("--variants", nargs="+", choices=VARIANTS,
                    help="default: plain, dp, secure, secure-dp for heart; plain and the secure variants for digits")
    ap.add_argument("--heart-rounds", type=int, default=15)
    ap.add_argument("--digits-rounds", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=1, help="federations per variant (index sets and noise are "
                    "random, so single runs swing)")
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
            for variant in args.variants or DEFAULT_VARIANTS[task]:
                if variant in INDEX_SETS and task == "heart":
                    continue
                for repeat in range(args.repeats):
                    print(f"[{task}/{variant} #{repeat}] {rounds} rounds ...", flush=True)
                    r = run_variant(task, variant, broker.url, Path(tmp), rounds, args.timeout, repeat)
                    results.append(r)
                    print(f"[{task}/{variant} #{repeat}] done in {r['wall_seconds']} s: pooled {r['pooled_accuracy']}, "
                          f"round {r['round_wall_median']:.2f} s, up {r['bytes_up_median'] / 1e3:.1f} kB", flush=True)
    info["load_end"] = os.getloadavg()
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "results": results}, indent=2))


def _mean_std(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    if not known:
        return "–"
    if len(known) == 1:
        return f"{known[0]:.3f}"
    return f"{statistics.mean(known):.3f} ± {statistics.stdev(known):.3f}"


def print_table(results: list[dict]) -> None:
    """One row per task and variant: accuracy as mean ± std over repeats, costs as medians, ratios to plain."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in results:
        groups.setdefault((r["task"], r["variant"]), []).append(r)

    def median(runs: list[dict], key: str) -> float:
        return statistics.median(r[key] for r in runs)

    print("\n| task | variant | runs | pooled acc (final) | pooled, last 5 versions | held-out | ε | round wall "
          "| × plain | up / round | × plain | down / round | × plain |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for (task, variant), runs in groups.items():
        base = groups[(task, "plain")]
        eps = runs[0]["epsilon"]
        print(f"| {task} | {variant} | {len(runs)} | {_mean_std([r['pooled_accuracy'] for r in runs])} | "
              f"{_mean_std([r['pooled_last5'] for r in runs])} | "
              f"{_mean_std([r.get('held_out_accuracy') for r in runs])} | {f'{eps:.3g}' if eps else '–'} | "
              f"{median(runs, 'round_wall_median'):.2f} s | "
              f"{median(runs, 'round_wall_median') / median(base, 'round_wall_median'):.2f}x | "
              f"{median(runs, 'bytes_up_median') / 1e3:.1f} kB | "
              f"{median(runs, 'bytes_up_median') / median(base, 'bytes_up_median'):.2f}x | "
              f"{median(runs, 'bytes_down_median') / 1e3:.1f} kB | "
              f"{median(runs, 'bytes_down_median') / median(base, 'bytes_down_median'):.2f}x |")


if __name__ == "__main__":
    main()
