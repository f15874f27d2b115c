"""Client-level DP-FedAvg on the digits federation: accuracy against epsilon, over a real Mosquitto.

The digits federation of ``fedmq.digits`` (scikit-learn's 8x8 digits split non-IID over 10
sites, CNN of 118,986 parameters, 10 local SGD steps of batch 32 per round, lr 0.05,
momentum 0.9), orchestrator and agents as threads of this process
(``fedmq.inprocess.run_federation``) against a Mosquitto the script starts. Every site is
asked every round (no sampling), so the accountant's sampling rate is 1.0 and no
amplification by sampling is claimed.

Runs, all in one invocation:

1. ``fedavg``: the plain FedAvg baseline. Every update it stored is decoded (as the
   orchestrator decodes it) and its joint L2 norm measured; the fixed clip bound ``C`` of
   the DP runs is the ``--clip-quantile`` (default: median) of those norms over all rounds
   and sites, unless ``--clip-norm`` is given. That is the quantile adaptive clipping
   (Andrew et al. 2021) aims for by default.
2. ``dp_fedavg`` with distributed noise (each site adds N(0, (zC)^2 / 10) to its clipped
   update; the quorum is all 10 sites), fixed ``C``, one run per noise multiplier in
   ``--noise-multipliers``. The strategy refuses z = 0, so the "clipping only" row uses a
   z so small (``--clip-only-z``, default 1e-6) that its noise is negligible (and its
   epsilon meaningless).
3. ``dp_fedavg`` with adaptive clipping (target quantile 0.5, clip learning rate 0.2,
   count noise std ``--adaptive-count-std``) at ``--adaptive-z``, starting from the same C.
4. ``dp_fedavg`` with a budget ``--budget-max-epsilon`` at ``--budget-z``: the round engine
   ends the federation before the round that would cross it.

Reported per run: pooled accuracy of the final version over the sites' test sets (as the
orchestrator reports it, from the final evaluation round) and the best of any version,
accuracy on the held-out global test set no site trains on (as ``global_test_accuracy``
computes it; none when the model's loss is not finite), the client-level epsilon at
``--delta`` recorded in the registry with the final version, training rounds completed,
the clip bound of the last round, and the share of updates that were within the bound
before clipping (the sites' ``dp_unclipped`` reports).

A model whose weights or BatchNorm running variances the noise made invalid yields NaN
losses: the sites' reports are then rejected and the round never completes. Such a
federation is stopped after ``--stall-seconds`` without a new version and reported as
stalled, with the rounds it completed. ``--fedbn`` runs the whole series (baseline
included) with FedBN, so BN layers stay at the sites and are neither clipped, noised nor
released; accuracy is then also reported as the sites' personalized scores (the global
weights with each site's own BN layers), which is what a FedBN federation uses.

    nice -n 10 python bench/bench_privacy_digits.py --json privacy_digits.json
    nice -n 10 python bench/bench_privacy_digits.py --fedbn --json privacy_digits_fedbn.json
    python bench/bench_privacy_digits.py --rounds 5 --noise-multipliers 1.0 --no-adaptive --no-budget
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "bench"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from bench_round import machine_info

from edge_agent.data import read_csv
from edge_agent.trainer import TrainingError, evaluate
from fedmq.digits import (
    FEATURES,
    IMAGE_SHAPE,
    LABEL,
    DigitsOptions,
    digits_settings,
    prepare_digits,
)
from fedmq.inprocess import Federation, run_federation
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry, pool_metrics
from shared.broker import start_mosquitto
from shared.codec import decode_tensors
from shared.onnx_executor import running_stat_names
from shared.onnx_model import float_initializers, load_model_bytes

log = logging.getLogger("bench_privacy_digits")


def update_norms(registry: ModelRegistry, journal: RoundJournal) -> list[dict]:
    """Every stored training update's joint L2 norm (and without BN running statistics), per round."""
    model = load_model_bytes(registry.model_bytes(0))
    shapes = {k: v.shape for k, v in float_initializers(model).items()}
    stats = running_stat_names(model.graph)
    limit = 4 * sum(int(np.prod(s)) for s in shapes.values()) + (1 << 20)
    rows = []
    for rec in journal.done("train"):
        for u in journal.updates(rec.round_id):
            if u.blob is None:
                continue
            update = decode_tensors(registry.blobs.get(u.blob), shapes, max_decoded_bytes=limit)
            sq = {k: float(np.sum(np.square(v, dtype=np.float64))) for k, v in update.items()}
            rows.append({"round": rec.round, "site": u.site, "norm": math.sqrt(sum(sq.values())),
                         "norm_without_bn_stats": math.sqrt(sum(v for k, v in sq.items() if k not in stats)),
                         "dp_unclipped": u.report.dp_unclipped})
    return rows


def wait_or_stall(fed: Federation, state_dir: Path, timeout: float, stall_seconds: float) -> str | None:
    """Wait for the orchestrator to finish; return why it stalled instead, if it did.

    A model whose weights went non-finite makes every site's evaluation loss NaN; the
    orchestrator rejects such reports and the round never completes (see BENCHMARKS.md). A
    federation that releases no new version for ``stall_seconds`` is stopped and reported.
    """
    deadline = time.monotonic() + timeout
    watcher: ModelRegistry | None = None
    last, changed = None, time.monotonic()
    try:
        while True:
            if fed.errors:
                name, err = next(iter(fed.errors.items()))
                raise RuntimeError(f"{name} crashed: {err!r}") from err
            assert fed.orchestrator is not None
            if fed.orchestrator.engine.state == "finished":
                return None
            if watcher is None and (state_dir / "orchestrator.sqlite").exists():
                watcher = ModelRegistry.open(state_dir)
            latest = watcher.latest() if watcher is not None else None
            version = latest.version if latest is not None else None
            now = time.monotonic()
            if version != last:
                last, changed = version, now
            elif now - changed > stall_seconds:
                return f"no new version for {stall_seconds:.0f} s after v{last}"
            if now > deadline:
                raise TimeoutError(f"federation not finished after {timeout:.0f}s")
            time.sleep(0.5)
    finally:
        if watcher is not None:
            watcher.conn.close()


def run_one(name: str, label: str, strategy: dict | None, url: str, workdir: Path, data_dir: Path, rounds: int,
            timeout: float, stall_seconds: float, fedbn: bool = False) -> dict:
    federation = f"pd-{'bn-' if fedbn else ''}{name}".replace("_", "-").replace(".", "-")
    root = workdir / federation
    opts = DigitsOptions(federation=federation)
    orch, agents = digits_settings(url, root, rounds, None, opts, data_dir=data_dir)
    if strategy is not None:
        orch = orch.model_copy(update={"strategy": strategy})
    if fedbn:
        orch = orch.model_copy(update={"fedbn": True})
    started = time.perf_counter()
    with run_federation(orch, agents) as fed:
        stalled = wait_or_stall(fed, Path(orch.state_dir), timeout, stall_seconds)
        site_errors = sorted({a.current_state for a in fed.agents.values()} - {"idle"}) if stalled else []
    wall = time.perf_counter() - started

    registry = ModelRegistry.open(Path(orch.state_dir))
    journal = RoundJournal(registry.conn)
    versions = registry.list()
    final = versions[-1]
    norms = update_norms(registry, journal)
    model_bytes = registry.model_bytes(final.version)
    model = load_model_bytes(model_bytes)
    weights = float_initializers(model)
    stats = running_stat_names(model.graph)
    variances = [weights[n] for n in stats if n in weights and "var" in n]
    x, y = read_csv(data_dir / "global_test.csv", FEATURES, LABEL)
    try:  # a diverged model (non-finite loss) has no accuracy: NaN logits would make every argmax 0
        held = evaluate(model_bytes, x.reshape(-1, *IMAGE_SHAPE), y, "cross_entropy")
        finite = math.isfinite(held.loss)
    except TrainingError:
        held, finite = None, False
    flags = [n["dp_unclipped"] for n in norms if n["dp_unclipped"] is not None]
    accuracy = [v.pooled.accuracy if v.pooled else None for v in versions]
    personalized = [pool_metrics(registry.personalized(v.version)) for v in versions]
    personalized_acc = [m.accuracy if m is not None else None for m in personalized]
    privacy = final.privacy
    result = {
        "name": name, "label": label, "strategy": strategy or {"name": "fedavg"}, "rounds_planned": rounds,
        "rounds_completed": sum(1 for v in versions if v.round is not None),
        "final_version": final.version,
        "stalled": stalled, "site_states_at_stall": site_errors,
        "final_pooled_accuracy": final.pooled.accuracy if final.pooled else None,
        "best_pooled_accuracy": max((a for a in accuracy if a is not None), default=None),
        "global_test_accuracy": held.accuracy if held is not None and finite else None,
        "global_test_loss": held.loss if held is not None and finite else None,
        "accuracy_by_version": accuracy,
        "fedbn": fedbn,
        # With FedBN each site scores the global model with its own BN layers ("personalized").
        "final_personalized_pooled_accuracy": personalized_acc[-1],
        "best_personalized_pooled_accuracy": max((a for a in personalized_acc if a is not None), default=None),
        "personalized_accuracy_by_version": personalized_acc,
        "privacy": privacy.model_dump() if privacy else None,
        "epsilon_by_version": [v.privacy.epsilon if v.privacy else None for v in versions],
        "clip_by_round": [v.training.get("dp_clip_norm") for v in versions if v.round is not None],
        "noise_share_std_by_round": [v.training.get("dp_noise_share_std") for v in versions if v.round is not None],
        "unclipped_fraction": (sum(flags) / len(flags)) if flags else None,
        "update_norms": norms,
        "final_weights_finite": bool(all(np.all(np.isfinite(w)) for w in weights.values())),
        "final_loss_finite": finite,
        "bn_running_var_min": float(min(v.min() for v in variances)) if variances else None,
        "bn_running_var_negative": int(sum((v < 0).sum() for v in variances)),
        "wall_seconds": round(wall, 1),
    }
    registry.conn.close()
    return result


def choose_clip(norms: list[dict], quantile: float) -> dict:
    values = np.array([n["norm"] for n in norms])
    by_round = {}
    for n in norms:
        by_round.setdefault(n["round"], []).append(n["norm"])
    return {"quantile": quantile, "clip_norm": float(np.quantile(values, quantile)),
            "norm_min": float(values.min()), "norm_median": float(np.median(values)), "norm_max": float(values.max()),
            "median_without_bn_stats": float(np.median([n["norm_without_bn_stats"] for n in norms])),
            "median_by_round": {r: float(np.median(v)) for r, v in sorted(by_round.items())}}


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def _eps(x: float | None) -> str:
    if x is None:
        return "- (no DP)"
    if x >= 1e5:
        return f"{x:.1e} (none in effect)"
    return f"{x:.3g}" if x < 100 else f"{x:,.0f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _pooled(r: dict) -> str:
    if r["final_pooled_accuracy"] is not None:
        return f"{r['final_pooled_accuracy']:.3f}"
    return "NaN loss" if not r["final_loss_finite"] else "-"


def table(results: list[dict], delta: float) -> str:
    """One row per run; with FedBN the accuracy columns are the sites' personalized ones plus the global model's."""
    fedbn = any(r["fedbn"] for r in results)
    middle = (["final personalized pooled acc", "best (any version)", "global model pooled acc"] if fedbn else
              ["final pooled acc", "best pooled acc (any version)", "held-out acc"])
    head = (f"| run{' (FedBN)' if fedbn else ''} | z | clip C (last round) | {' | '.join(middle)} | "
            f"ε at δ={delta:g} (final version) | rounds | updates within C |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        p = r["privacy"]
        clip = r["clip_by_round"][-1] if r["clip_by_round"] and r["clip_by_round"][-1] is not None else None
        z = p["noise_multiplier"] if p else None
        rounds = f"{r['rounds_completed']}/{r['rounds_planned']}" + (" (stalled)" if r["stalled"] else "")
        accuracy = ([_fmt(r["final_personalized_pooled_accuracy"]), _fmt(r["best_personalized_pooled_accuracy"]),
                     _pooled(r)] if fedbn else
                    [_pooled(r), _fmt(r["best_pooled_accuracy"]), _fmt(r["global_test_accuracy"])])
        lines.append(f"| {r['label']} | {'-' if z is None else f'{z:g}'} | {_fmt(clip, '.3g')} | "
                     f"{' | '.join(accuracy)} | {_eps(p['epsilon'] if p else None)} | {rounds} | "
                     f"{_pct(r['unclipped_fraction'])} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=30)
    ap.add_argument("--noise-multipliers", default="0.03,0.1,0.3,1.0,3.0",
                    help="comma-separated z of the fixed-clip distributed-noise runs")
    ap.add_argument("--clip-only-z", type=float, default=1e-6,
                    help="z of the clipping-only run (the strategy refuses 0); 0 skips the run")
    ap.add_argument("--clip-norm", type=float, default=None, help="fixed C (default: measured from the baseline)")
    ap.add_argument("--clip-quantile", type=float, default=0.5,
                    help="quantile of the baseline's update norms taken as C")
    ap.add_argument("--adaptive-z", type=float, default=0.3)
    ap.add_argument("--adaptive-count-std", type=float, default=0.5,
                    help="std of the noise on the unclipped count (must exceed z / 2)")
    ap.add_argument("--no-adaptive", action="store_true")
    ap.add_argument("--budget-z", type=float, default=0.3)
    ap.add_argument("--budget-max-epsilon", type=float, default=100.0)
    ap.add_argument("--no-budget", action="store_true")
    ap.add_argument("--delta", type=float, default=1e-5)
    ap.add_argument("--timeout", type=float, default=1800.0, help="per federation")
    ap.add_argument("--stall-seconds", type=float, default=120.0,
                    help="stop a federation that released no new version for this long (a diverged model)")
    ap.add_argument("--torch-threads", type=int, default=1)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--log-level", default="WARNING")
    ap.add_argument("--no-baseline", action="store_true", help="skip the FedAvg run (needs --clip-norm)")
    ap.add_argument("--fedbn", action="store_true",
                    help="every run (baseline included) keeps BatchNorm layers local (FedBN): BN parameters and "
                         "running statistics are neither sent, clipped, noised nor released; accuracy is then the "
                         "sites' personalized scores (global weights with each site's own BN)"),
    args = ap.parse_args()
    if args.no_baseline and args.clip_norm is None:
        ap.error("--no-baseline needs --clip-norm")
    logging.basicConfig(level=args.log_level, format="%(asctime)s %(threadName)s %(name)s %(levelname)s %(message)s")

    import torch
    torch.set_num_threads(args.torch_threads)
    info = machine_info()
    info["command"] = " ".join([Path(sys.executable).name, *sys.argv])
    print(f"{info['date']}  {info['cpu']}, {info['cpu_count']} CPUs, load {info['load_average']}, "
          f"torch threads {args.torch_threads}", flush=True)
    started = time.perf_counter()
    results: list[dict] = []
    broker = start_mosquitto()
    out: dict = {"info": info, "args": {k: str(v) for k, v in vars(args).items()}}

    def run(name: str, label: str, strategy: dict | None) -> dict:
        t0 = time.perf_counter()
        print(f"-- {label} ...", flush=True)
        r = run_one(name, label, strategy, broker.url, workdir, data_dir, args.rounds, args.timeout,
                    args.stall_seconds, args.fedbn)
        results.append(r)
        p = r["privacy"]
        if r["fedbn"]:
            print(f"   personalized pooled {_fmt(r['final_personalized_pooled_accuracy'])} (best "
                  f"{_fmt(r['best_personalized_pooled_accuracy'])})", flush=True)
        print(f"   pooled {_pooled(r)} (best {_fmt(r['best_pooled_accuracy'])})  held-out "
              f"{_fmt(r['global_test_accuracy'])}  epsilon {_eps(p['epsilon'] if p else None)}  rounds "
              f"{r['rounds_completed']}/{args.rounds}{'  STALLED: ' + r['stalled'] if r['stalled'] else ''}  "
              f"min BN running_var {_fmt(r['bn_running_var_min'], '.3g')}  {time.perf_counter() - t0:.0f}s",
              flush=True)
        if args.json is not None:  # partial results survive an interrupted run
            args.json.write_text(json.dumps({**out, "results": results}, indent=1))
        return r

    def dp(options: dict) -> dict:
        return {"name": "dp_fedavg", "options": {"noise": "distributed", "delta": args.delta, **options}}

    try:
        with tempfile.TemporaryDirectory(prefix="fedmq-bench-privacy-digits-") as tmp:
            workdir = Path(tmp)
            data_dir = workdir / "digits-data"
            prepare_digits(data_dir)
            if args.no_baseline:
                clip = {"clip_norm": args.clip_norm, "given": True}
            else:
                baseline = run("fedavg", "FedAvg (no DP)", None)
                clip = choose_clip(baseline["update_norms"], args.clip_quantile)
                print(f"   baseline update norms: min {clip['norm_min']:.3g}, median {clip['norm_median']:.3g}, max "
                      f"{clip['norm_max']:.3g} (median without BN statistics {clip['median_without_bn_stats']:.3g});"
                      " per-round medians " + ", ".join(f"{v:.2g}" for v in clip["median_by_round"].values()),
                      flush=True)
                if args.clip_norm is not None:
                    clip["clip_norm"] = args.clip_norm
            out["clip"] = clip
            c = clip["clip_norm"]
            print(f"   fixed clip norm C = {c:.4g}", flush=True)
            if args.clip_only_z > 0:
                run("clip-only", f"clipping only (z={args.clip_only_z:g})",
                    dp({"clip_norm": c, "noise_multiplier": args.clip_only_z}))
            for z in (float(s) for s in args.noise_multipliers.split(",") if s.strip()):
                run(f"z{z:g}", f"DP-FedAvg z={z:g}", dp({"clip_norm": c, "noise_multiplier": z}))
            if not args.no_adaptive:
                run("adaptive", f"DP-FedAvg z={args.adaptive_z:g}, adaptive clipping",
                    dp({"clip_norm": c, "noise_multiplier": args.adaptive_z, "adaptive_clipping": True,
                        "clip_count_stddev": args.adaptive_count_std, "target_quantile": 0.5}))
            if not args.no_budget:
                run("budget", f"DP-FedAvg z={args.budget_z:g}, max_epsilon={args.budget_max_epsilon:g}",
                    dp({"clip_norm": c, "noise_multiplier": args.budget_z, "max_epsilon": args.budget_max_epsilon}))
    finally:
        broker.stop()
    out["wall_seconds"] = round(time.perf_counter() - started, 1)
    out["load_average_end"] = round(os.getloadavg()[0], 2)
    out["results"] = results
    print()
    print(table(results, args.delta))
    print(f"\nwall time {out['wall_seconds']:.0f}s, load average at the end {out['load_average_end']}")
    if args.json is not None:
        args.json.write_text(json.dumps(out, indent=1))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
