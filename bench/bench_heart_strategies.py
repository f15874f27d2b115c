"""Fed-Heart-Disease through fedmq over a real Mosquitto, next to FLamby's published table.

FLamby (du Terrail et al., NeurIPS 2022) benchmarks federated strategies on the four UCI
Heart Disease hospitals: logistic regression, 15 rounds of 100 local SGD steps of batch 4,
one learning rate per strategy, 5 seeds. This script runs the same experiment with fedmq's
real services -- an orchestrator and four agents (threads of a worker process, see
``fedmq.inprocess``) talking through one Mosquitto started for the whole run -- and prints
the final version's figures next to the published ones
(``/work/shared/data/heart_disease/README.md``; FLamby's own result files
``flamby/results/results_benchmark_fed_heart_disease/heart_seed4[2-6].csv``).

What is compared
----------------
* **per-site mean**: the unweighted mean of the four hospitals' test accuracies, each site
  scoring the final global version on its own test set with its own standardization. This
  is the same quantity in FLamby and in fedmq: the like-for-like column.
* **pooled**: fedmq's orchestrator pools the sites' counts, i.e. accuracy on the union of
  the four test sets, each row standardized by its own hospital (what a federation can
  measure without moving data). FLamby's published "Pooled Test" is a *different*
  quantity: its benchmark scores the model on ``FedHeartDisease(train=False, pooled=True)``,
  whose features are standardized with the statistics of the union of the training sets
  (torch ``std``, ddof 1, + 1e-9), not with each hospital's own statistics the model was
  trained on. So the table shows three pooled figures:
    - ``fedmq pooled``: what the orchestrator reports (registry ``get(R).pooled``);
    - ``FLamby-style pooled``: the final ONNX file from the registry scored *offline*, the
      way FLamby computes "Pooled Test" (union of the test sets, pooled-train
      standardization) -- the like-for-like comparison with the published pooled number;
    - ``FLamby count-pooled``: FLamby's own per-site accuracies of the same 5 result files
      weighted by test-set size (104/89/16/45), the like-for-like number for fedmq pooled.
      Derived here from the published per-site figures, not published as such.

Seeds: seed ``s`` sets both the initial model (``build_onnx("logreg", seed=s)``, written to
a file and given as ``initial_model`` because the orchestrator's own initial model always
uses seed 0) and ``TrainingConfig.seed`` (the agents' batch order; each site and round
draws its own stream from it). FLamby used seeds 42-46; their exact initial weights are not
reproducible outside torch's RNG in their process, so the seeds here are 0..N-1.

Rows
----
* the FLamby rows fedmq supports (SCAFFOLD and Cyclic are not fedmq strategies), with the
  published learning rates; FedAdam/FedYogi/FedAdagrad with FLamby's beta1 0.9, beta2
  0.999, tau 1e-8 (fedmq's own defaults differ: FedAdagrad beta1 0, tau 1e-9);
* ``fedavg-tuned``: FedAvg with the demo's client lr 0.005, and ``fedadam-tuned``: FedAdam
  with FedYogi's client lr 0.003162; labelled *tuned*, the table-lr rows are always shown too;
* personalization (``--personalize``, ``--finetune-steps``): the same runs with
  ``finetune_steps`` set; each site fine-tunes the final global version on its own
  training data (same lr and batch as training) before scoring it on its own test set
  (``registry.personalized(R)``). Fine-tuning only affects that evaluation, not the updates
  (the training RNG does not depend on it), so the global figures of these runs equal the
  runs without it and the personalized figures are a paired comparison. FedBN does not
  apply: the logistic regression has no normalization layer, so there is nothing to keep
  local (``fedbn=True`` would list no local parameters);
* ``local``: each hospital alone, as FLamby's "Local i" baseline (Adam lr 0.001, batch 4,
  50 epochs): a one-site fedmq federation of one round of 50 local epochs (FedAvg of one
  update is that update), then the resulting ONNX file scored *offline* on all four
  hospitals' test sets with the agents' own code (``edge_agent.data.load_dataset``,
  ``edge_agent.trainer.evaluate``); FLamby reports the mean over the four test sets.

Usage::

    python bench/bench_heart_strategies.py                        # everything, 5 seeds, 2 worker processes
    python bench/bench_heart_strategies.py --seeds 2 --rounds 3 --strategies fedavg,fedyogi --no-local
    python bench/bench_heart_strategies.py --json heart.json --broker mqtt://127.0.0.1:1883

With the defaults: 55 federations, 6.5 to 15 minutes on a 2-CPU machine shared with other work
(386 s and 878 s measured at load averages of 9 to 14).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import logging
import multiprocessing
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from fedmq.demo import DATA_DIR, HOSPITALS, DemoOptions, heart_features, heart_settings

ROUNDS = 15
LOCAL_STEPS = 100
BATCH_SIZE = 4
SITE_ORDER = tuple(HOSPITALS)  # cleveland, hungary, switzerland, va = FLamby's clients 0..3
TEST_SIZES = {"cleveland": 104, "hungary": 89, "switzerland": 16, "va": 45}
FLAMBY_ADAPTIVE = {"beta1": 0.9, "beta2": 0.999, "tau": 1e-8}

# FLamby's published figures (README table: mean of 5 seeds) and, derived from the same
# result files, the per-site accuracies pooled by test-set size (like fedmq's pooled).
FLAMBY = {
    "fedavg": {"pooled": 0.748, "per_site": 0.685, "count_pooled": 0.706},
    "fedprox": {"pooled": 0.748, "per_site": 0.685, "count_pooled": 0.706},
    "fedadam": {"pooled": 0.779, "per_site": 0.726, "count_pooled": 0.734},
    "fedyogi": {"pooled": 0.779, "per_site": 0.731, "count_pooled": 0.741},
    "fedadagrad": {"pooled": 0.779, "per_site": 0.731, "count_pooled": 0.741},
}
FLAMBY_CENTRALIZED = {"pooled": 0.795, "per_site": 0.735, "count_pooled": 0.750}
# "Local i": the model trained at hospital i alone; per-site mean over the four test sets,
# and FLamby's "Pooled Test" of that model (derived from the same files).
FLAMBY_LOCAL = {"cleveland": {"per_site": 0.722, "pooled": 0.784},
                "hungary": {"per_site": 0.629, "pooled": 0.727},
                "switzerland": {"per_site": 0.567, "pooled": 0.483},
                "va": {"per_site": 0.637, "pooled": 0.611}}


@dataclass(frozen=True)
class Row:
    key: str
    label: str
    strategy: dict[str, Any]
    learning_rate: float
    flamby: str | None  # which published row it is compared with
    tuned: bool = False

    @property
    def lrs(self) -> str:
        server = self.strategy.get("options", {}).get("server_lr")
        return f"{self.learning_rate:g}" + (f" / {server:g}" if server is not None else "")


ROWS: dict[str, Row] = {r.key: r for r in [
    Row("fedavg", "FedAvg", {"name": "fedavg"}, 0.001, "fedavg"),
    Row("fedprox", "FedProx (mu 0.01)", {"name": "fedprox", "options": {"mu": 0.01}}, 0.001, "fedprox"),
    Row("fedadam", "FedAdam", {"name": "fedadam", "options": {"server_lr": 0.01, **FLAMBY_ADAPTIVE}}, 0.01,
        "fedadam"),
    Row("fedyogi", "FedYogi", {"name": "fedyogi", "options": {"server_lr": 0.01, **FLAMBY_ADAPTIVE}}, 0.003162,
        "fedyogi"),
    Row("fedadagrad", "FedAdagrad",
        {"name": "fedadagrad", "options": {"server_lr": 0.316228, "beta1": 0.9, "tau": 1e-8}}, 0.003162,
        "fedadagrad"),
    Row("fedavg-tuned", "FedAvg (the fedmq demo's client lr)", {"name": "fedavg"}, 0.005, "fedavg", tuned=True),
    Row("fedadam-tuned", "FedAdam (FedYogi's client lr)",
        {"name": "fedadam", "options": {"server_lr": 0.01, **FLAMBY_ADAPTIVE}}, 0.003162, "fedadam", tuned=True),
]}
DEFAULT_STRATEGIES = [*ROWS, "local"]
DEFAULT_PERSONALIZE = ["fedyogi", "fedavg-tuned"]


@dataclass(frozen=True)
class Job:
    kind: str  # "fed" or "local"
    key: str  # row key, or the site for "local"
    seed: int
    rounds: int
    finetune_steps: int = 0


@dataclass
class Result:
    job: Job
    seconds: float
    per_site: dict[str, float] = field(default_factory=dict)
    pooled: float | None = None
    flamby_pooled: float | None = None
    personalized: dict[str, float] = field(default_factory=dict)
    personalized_pooled: float | None = None


# --- offline scoring (what FLamby computes and a federation cannot) -----------------------

def _raw_site(site: str, split: str) -> tuple[np.ndarray, np.ndarray]:
    from edge_agent.data import read_csv
    return read_csv(DATA_DIR / f"{site}_{split}.csv", heart_features(), "label")


def flamby_pooled_accuracy(model: bytes) -> float:
    """FLamby's "Pooled Test": the union of the test sets, standardized with the union of the train sets."""
    from edge_agent.trainer import evaluate
    x_train = np.concatenate([_raw_site(s, "train")[0] for s in SITE_ORDER]).astype(np.float64)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0, ddof=1)  # torch.std is unbiased
    tests = [_raw_site(s, "test") for s in SITE_ORDER]
    x = (np.concatenate([t[0] for t in tests]) - mean) / (std + 1e-9)
    y = np.concatenate([t[1] for t in tests])
    metrics = evaluate(model, x.astype(np.float32), y, "bce")
    assert metrics.accuracy is not None
    return metrics.accuracy


def site_accuracies(model: bytes) -> dict[str, tuple[int, int]]:
    """(correct, n) of a model on every hospital's test set, each standardized by its own hospital, as agents do."""
    from edge_agent.data import load_dataset
    from edge_agent.trainer import evaluate
    from shared.protocol import TaskSpec
    task = TaskSpec(features=heart_features(), label="label")
    out = {}
    for site in SITE_ORDER:
        data = load_dataset(DATA_DIR / f"{site}_train.csv", DATA_DIR / f"{site}_test.csv", task)
        m = evaluate(model, data.x_test, data.y_test, "bce")
        out[site] = (int(m.correct or 0), m.num_examples)
    return out


# --- one federation per job, in a worker process -------------------------------------------

_BROKER_URL: str | None = None


def _init_worker(broker_url: str) -> None:
    global _BROKER_URL
    _BROKER_URL = broker_url
    logging.basicConfig(level=logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    import torch
    torch.set_num_threads(1)  # two worker processes share two CPUs


def run_job(job: Job) -> Result:
    from fedmq.inprocess import run_federation
    from orchestrator.architectures import build_onnx
    from orchestrator.registry import ModelRegistry, pool_metrics
    from shared.protocol import TrainingConfig

    assert _BROKER_URL is not None
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedmq-heart-bench-") as tmp:
        root = Path(tmp)
        initial = root / "initial.onnx"
        initial.write_bytes(build_onnx("logreg", num_features=len(heart_features()), num_outputs=1, seed=job.seed))
        federation = f"hb-{job.key}-s{job.seed}-ft{job.finetune_steps}-{os.getpid()}-{int(time.time() * 1000) % 10**8}"
        if job.kind == "fed":
            row = ROWS[job.key]
            orch, agents = heart_settings(_BROKER_URL, root, DemoOptions(rounds=job.rounds))
            training = TrainingConfig.model_validate({
                **orch.training.model_dump(), "local_steps": LOCAL_STEPS, "local_epochs": None,
                "batch_size": BATCH_SIZE, "learning_rate": row.learning_rate, "seed": job.seed,
                "finetune_steps": job.finetune_steps})
            orch = orch.model_copy(update={"strategy": row.strategy, "training": training})
        else:
            site = job.key
            orch, agents = heart_settings(_BROKER_URL, root, DemoOptions(rounds=1), sites=(site,))
            training = TrainingConfig.model_validate({
                **orch.training.model_dump(), "local_steps": None, "local_epochs": 50, "batch_size": BATCH_SIZE,
                "learning_rate": 0.001, "optimizer": "adam", "seed": job.seed})
            orch = orch.model_copy(update={"strategy": {"name": "fedavg"}, "training": training})
        orch = orch.model_copy(update={"federation": federation, "initial_model": initial, "round_timeout": 600.0})
        agents = [a.model_copy(update={"federation": federation}) for a in agents]
        with run_federation(orch, agents) as fed:
            fed.wait_finished(timeout=1200)
        registry = ModelRegistry.open(orch.state_dir)
        final = registry.get(orch.rounds)
        model = registry.model_bytes(orch.rounds)
        result = Result(job, 0.0, flamby_pooled=flamby_pooled_accuracy(model))
        if job.kind == "fed":
            if set(final.evaluations) != set(SITE_ORDER):
                raise RuntimeError(f"{job}: the final evaluation lacks sites: {sorted(final.evaluations)}")
            result.per_site = {s: m.accuracy for s, m in final.evaluations.items()}
            result.pooled = final.pooled.accuracy
            personalized = registry.personalized(orch.rounds)
            if job.finetune_steps:
                if set(personalized) != set(SITE_ORDER):
                    raise RuntimeError(f"{job}: personalized metrics missing: {sorted(personalized)}")
                result.personalized = {s: m.accuracy for s, m in personalized.items()}
                result.personalized_pooled = pool_metrics(personalized).accuracy
        else:
            scored = site_accuracies(model)
            own = final.evaluations[job.key]
            if own.correct != scored[job.key][0]:
                raise RuntimeError(f"{job}: offline scoring disagrees with the agent's own evaluation")
            result.per_site = {s: c / n for s, (c, n) in scored.items()}
            result.pooled = sum(c for c, _ in scored.values()) / sum(n for _, n in scored.values())
        registry.conn.close()
    result.seconds = time.perf_counter() - started
    return result


# --- reporting -----------------------------------------------------------------------------

def _stats(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.pstdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float]) -> str:
    if not values:
        return "-"
    mean, std = _stats(values)
    return f"{mean:.3f} ± {std:.3f}"


def _verdict(ours: list[float], published: float | None) -> str:
    if not ours or published is None:
        return ""
    mean = statistics.fmean(ours)
    return "beats" if mean > published + 0.0005 else ("matches" if mean >= published - 0.0005 else "below")


def summarize(results: list[Result], finetune_steps: int) -> tuple[list[dict[str, Any]], str]:
    by_row: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        by_row.setdefault((r.job.kind, r.job.key, r.job.finetune_steps), []).append(r)
    rows: list[dict[str, Any]] = []
    lines = [
        ("| method | client / server lr | FLamby pooled | fedmq FLamby-style pooled | FLamby count-pooled "
         "| fedmq pooled | FLamby per-site mean | fedmq per-site mean | fedmq vs FLamby: per-site / pooled "
         "(FLamby-style) / count-pooled | seeds |"),
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def add(label: str, lrs: str, flamby: dict[str, float] | None, per_site: list[float], pooled: list[float],
            fl_pooled: list[float], n: int, note: str = "", verdict: str = "") -> None:
        pub = flamby or {}
        if flamby:
            verdict = " / ".join(v for v in (_verdict(per_site, pub.get("per_site")),
                                             _verdict(fl_pooled, pub.get("pooled")),
                                             _verdict(pooled, pub.get("count_pooled"))) if v)
        lines.append(f"| {label} | {lrs} | {pub.get('pooled', '-')} | {_fmt(fl_pooled)} | "
                     f"{pub.get('count_pooled', '-')} | {_fmt(pooled)} | {pub.get('per_site', '-')} | "
                     f"{_fmt(per_site)} | {verdict} | {n} |")
        rows.append({"method": label, "lrs": lrs, "flamby": flamby, "note": note, "seeds": n,
                     "fedmq_per_site_mean": _stats(per_site) if per_site else None,
                     "fedmq_pooled": _stats(pooled) if pooled else None,
                     "fedmq_flamby_style_pooled": _stats(fl_pooled) if fl_pooled else None})

    for key, row in ROWS.items():
        runs = by_row.get(("fed", key, 0), []) or next(
            (v for (kind, k, ft), v in by_row.items() if kind == "fed" and k == key), [])
        if not runs:
            continue
        label = row.label + (" **tuned, not the table lr**" if row.tuned else "")
        add(label, row.lrs, FLAMBY.get(row.flamby or ""), [statistics.fmean(r.per_site.values()) for r in runs],
            [r.pooled for r in runs], [r.flamby_pooled for r in runs], len(runs))
        for (kind, k, ft), pruns in by_row.items():
            if kind == "fed" and k == key and ft:
                gain_site = [statistics.fmean(r.personalized.values()) - statistics.fmean(r.per_site.values())
                             for r in pruns]
                gain_pooled = [r.personalized_pooled - r.pooled for r in pruns]
                add(f"{row.label}{' tuned' if row.tuned else ''} + local fine-tuning {ft} steps "
                    "(personalized; FedBN n/a for logreg)", row.lrs, None,
                    [statistics.fmean(r.personalized.values()) for r in pruns],
                    [r.personalized_pooled for r in pruns], [], len(pruns),
                    note="each site's fine-tuned variant on its own test set; FLamby-style pooled n/a",
                    verdict=f"vs its global model (same runs): per-site {statistics.fmean(gain_site):+.3f}, "
                            f"pooled {statistics.fmean(gain_pooled):+.3f}")
    for site in SITE_ORDER:
        runs = by_row.get(("local", site, 0), [])
        if runs:
            pub = FLAMBY_LOCAL[site]
            add(f"local only: {site} (Adam 1e-3, 50 epochs; scored offline on all 4 test sets)", "0.001 (Adam)",
                {"per_site": pub["per_site"], "pooled": pub["pooled"]},
                [statistics.fmean(r.per_site.values()) for r in runs], [r.pooled for r in runs],
                [r.flamby_pooled for r in runs], len(runs))
    lines.append(f"| centralized (FLamby, the ceiling; not run here) | Adam 1e-3, 50 epochs | "
                 f"{FLAMBY_CENTRALIZED['pooled']} | - | {FLAMBY_CENTRALIZED['count_pooled']} | - | "
                 f"{FLAMBY_CENTRALIZED['per_site']} | - | | 5 |")
    return rows, "\n".join(lines)


def per_site_table(results: list[Result]) -> str:
    lines = ["| run | " + " | ".join(SITE_ORDER) + " |", "|---|" + "---|" * len(SITE_ORDER)]
    groups: dict[tuple[str, str, int], list[Result]] = {}
    for r in results:
        groups.setdefault((r.job.kind, r.job.key, r.job.finetune_steps), []).append(r)
    for (kind, key, ft), runs in groups.items():
        name = f"{key}" + (f" (global; ft {ft} run)" if ft else "") if kind == "fed" else f"local {key}"
        lines.append(f"| {name} | " + " | ".join(_fmt([r.per_site[s] for r in runs]) for s in SITE_ORDER) + " |")
        if ft:
            lines.append(f"| {key} personalized (ft {ft}) | "
                         + " | ".join(_fmt([r.personalized[s] for r in runs]) for s in SITE_ORDER) + " |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    cpu = platform.processor() or ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import onnxruntime
    import torch
    return {"date": datetime.now(UTC).isoformat(timespec="seconds"), "host": platform.node(),
            "platform": platform.platform(), "cpu": cpu, "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "onnxruntime": onnxruntime.__version__, "loadavg": os.getloadavg()}


def parse_seeds(text: str) -> list[int]:
    if "," in text:
        return [int(s) for s in text.split(",") if s.strip()]
    return list(range(int(text)))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", default="5", help="number of seeds (0..N-1) or a comma list (default 5)")
    p.add_argument("--rounds", type=int, default=ROUNDS, help="federated rounds (default 15, as FLamby)")
    p.add_argument("--strategies", default=",".join(DEFAULT_STRATEGIES),
                   help=f"comma list of rows (default all): {', '.join(DEFAULT_STRATEGIES)}")
    p.add_argument("--personalize", default=",".join(DEFAULT_PERSONALIZE),
                   help="rows whose runs also report local fine-tuning (empty for none)")
    p.add_argument("--finetune-steps", type=int, default=100,
                   help="local fine-tuning steps for the personalized evaluation (default 100: one round's budget)")
    p.add_argument("--no-local", action="store_true", help="skip the local-only baselines")
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes (default 2)")
    p.add_argument("--broker", default=None, help="use this broker (mqtt://host:port) instead of starting Mosquitto")
    p.add_argument("--json", type=Path, default=None, help="also write every figure as JSON here")
    p.add_argument("--report", type=Path, default=None, help="only print the tables of an earlier --json file")
    args = p.parse_args(argv)

    if args.report is not None:
        saved = json.loads(args.report.read_text())
        results = [Result(Job(r["kind"], r["key"], r["seed"], r["rounds"], r["finetune_steps"]), r["seconds"],
                          r["per_site"], r["pooled"], r["flamby_style_pooled"], r["personalized"],
                          r["personalized_pooled"]) for r in saved["runs"]]
        m = saved["machine"]
        print(f"# Fed-Heart-Disease: fedmq vs FLamby  ({m['date']}; {m['cpu']} x{m['cpus']}, load avg {m['loadavg']}; "
              f"wall {saved['wall_seconds']:.0f}s)")
        print()
        print(summarize(results, saved["finetune_steps"])[1])
        print()
        print(per_site_table(results))
        return 0

    seeds = parse_seeds(args.seeds)
    wanted = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = sorted(set(wanted) - set(DEFAULT_STRATEGIES))
    if unknown:
        p.error(f"unknown rows {unknown}; choose from {DEFAULT_STRATEGIES}")
    personalize = {s.strip() for s in args.personalize.split(",") if s.strip()}
    jobs: list[Job] = []
    for key in wanted:
        if key == "local":
            if not args.no_local:
                jobs += [Job("local", site, seed, 1) for site in SITE_ORDER for seed in seeds]
            continue
        ft = args.finetune_steps if key in personalize and args.finetune_steps > 0 else 0
        jobs += [Job("fed", key, seed, args.rounds, ft) for seed in seeds]
    # Longest first so the two workers finish together.
    jobs.sort(key=lambda j: (j.kind != "fed", -j.finetune_steps))

    info = machine()
    print(f"# Fed-Heart-Disease: fedmq vs FLamby  ({info['date']})")
    print(f"machine: {info['cpu']} x{info['cpus']}, {info['platform']}, Python {info['python']}, "
          f"torch {info['torch']}, onnxruntime {info['onnxruntime']}, load avg {info['loadavg']}")
    print(f"{len(jobs)} federations: rows {wanted}, seeds {seeds}, {args.rounds} rounds x {LOCAL_STEPS} local steps "
          f"of batch {BATCH_SIZE}; fine-tuning {args.finetune_steps} steps on {sorted(personalize & set(wanted))}; "
          f"{args.jobs} worker processes", flush=True)

    broker = None
    started = time.monotonic()
    results: list[Result] = []
    try:
        if args.broker is None:
            from shared.broker import start_mosquitto
            broker = start_mosquitto()
        url = args.broker or broker.url
        print(f"broker: {'Mosquitto ' if broker else ''}{url}", flush=True)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx, initializer=_init_worker,
                                    initargs=(url,)) as pool:
            futures = {pool.submit(run_job, job): job for job in jobs}
            for done, future in enumerate(cf.as_completed(futures), start=1):
                job = futures[future]
                r = future.result()
                results.append(r)
                extra = (f", personalized per-site {statistics.fmean(r.personalized.values()):.3f}"
                         if r.personalized else "")
                print(f"[{done:3d}/{len(jobs)} {time.monotonic() - started:6.0f}s] {job.kind} {job.key} seed {job.seed}: "
                      f"per-site mean {statistics.fmean(r.per_site.values()):.3f}, pooled {r.pooled:.3f}, "
                      f"FLamby-style pooled {r.flamby_pooled:.3f}{extra} ({r.seconds:.0f}s)", flush=True)
    finally:
        if broker is not None:
            broker.stop()
    wall = time.monotonic() - started
    rows, table = summarize(results, args.finetune_steps)
    print()
    print(table)
    print()
    print("Per-site test accuracy (mean ± std over seeds):")
    print()
    print(per_site_table(results))
    print()
    print(f"wall time {wall:.0f}s; load avg after {os.getloadavg()}")
    if args.json is not None:
        args.json.write_text(json.dumps({
            "machine": info, "wall_seconds": wall, "rounds": args.rounds, "seeds": seeds,
            "local_steps": LOCAL_STEPS, "batch_size": BATCH_SIZE, "finetune_steps": args.finetune_steps,
            "summary": rows,
            "runs": [{**asdict(r.job), "seconds": r.seconds, "per_site": r.per_site, "pooled": r.pooled,
                      "flamby_style_pooled": r.flamby_pooled, "personalized": r.personalized,
                      "personalized_pooled": r.personalized_pooled} for r in results],
        }, indent=1))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
