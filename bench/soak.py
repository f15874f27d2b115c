"""Soak: a long federation with the broker, the orchestrator and agents killed at random, against a clean run.

Both runs are the Heart Disease federation (four hospitals, logistic regression) as five
real processes on one Mosquitto (``tests/faults/federation_harness.py``), with the same
seed, so that a fault-free federation and a battered one train on the same batches. In the
faulty run a seeded RNG picks, every few seconds and only after the federation published a
new version since the previous fault, a victim (the broker, the orchestrator or one agent),
kills it with SIGKILL (or, for agents, freezes it with SIGSTOP past the round deadline),
keeps it down for a random moment and brings it back on the same state directory (the broker
on the same port, without persistence: its sessions and retained messages are gone). A
daemon that exits on its own (e.g. it started while the broker was down) is restarted as a
container restart policy would.

A fault counts as *survived* when the federation published a new version after it, without
help. When no version appears for ``--stall-seconds`` the soak records a stall and does what
an operator would (restarts every agent), so the run still ends; stalls are reported.

Reported per run: wall time, rounds, failed round attempts, the final version's pooled test
accuracy (the evaluation round on the final model), how many versions are bit-identical to
the clean run's (training is seeded per site and round, so a round aggregated from the same
updates gives the same bytes), and the same checks as the fault
suite's (``check_outcome``: contiguous lineage, contributors equal to the updates the journal
accepted for each round, nothing counted twice); for the faulty run the counts of each fault
injected and survived.

    nice -n 10 python bench/soak.py --rounds 200 --seed 0 --json soak.json
    python bench/soak.py --rounds 20 --skip-clean          # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from orchestrator.registry import ModelRegistry  # noqa: E402
from shared.broker import start_mosquitto  # noqa: E402
from shared.protocol import ModelPublished  # noqa: E402
from tests.faults.federation_harness import ORCHESTRATOR, FederationHarness, check_outcome  # noqa: E402

FAULTS = ("broker", "orchestrator", "agent-kill", "agent-stop")


def machine() -> str:
    load = os.getloadavg()
    return (f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
            f"load average at the end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")


def latest_version(fed: FederationHarness) -> int:
    with fed.watch.cond:
        versions = [e.message.version for e in fed.watch.events if isinstance(e.message, ModelPublished)]
    return max(versions, default=0)


def restart_exited(fed: FederationHarness, restarts: Counter) -> None:
    """A restart policy: bring back any daemon that exited (the orchestrator only before it finished)."""
    for name, proc in fed.procs.items():
        if proc.poll() is not None and name not in fed.stopped:
            if name == ORCHESTRATOR and proc.returncode == 0:
                continue
            restarts[name if name == ORCHESTRATOR else "agent"] += 1
            fed.start(name)


def run(rounds: int, seed: int, faults: bool, mean_gap: float, round_timeout: float, stall_seconds: float,
        local_steps: int) -> dict:
    rng = random.Random(seed)
    root = Path(tempfile.mkdtemp(prefix=f"fedmq-soak-{'faults' if faults else 'clean'}-"))
    broker = start_mosquitto()
    injected: Counter = Counter()
    survived: Counter = Counter()
    restarts: Counter = Counter()
    stalls = 0
    started = time.monotonic()
    fed = FederationHarness.heart(broker, root, rounds=rounds, local_steps=local_steps, round_timeout=round_timeout,
                                  seed=seed, orchestrator={"max_attempts": 1000})
    try:
        fed.start_all()
        pending: tuple[str, int] | None = None  # the last fault and the version it struck at
        next_fault = time.monotonic() + rng.expovariate(1 / mean_gap)
        progress_at, progress_version = time.monotonic(), 0
        while fed.procs[ORCHESTRATOR].poll() != 0:
            time.sleep(0.2)
            version = latest_version(fed)
            if version != progress_version:
                progress_at, progress_version = time.monotonic(), version
            if pending is not None and version > pending[1]:
                survived[pending[0]] += 1
                pending = None
            restart_exited(fed, restarts)
            if time.monotonic() - progress_at > stall_seconds:
                stalls += 1
                print(f"stall at v{version}: no new version for {stall_seconds:.0f}s; restarting the agents",
                      flush=True)
                pending = None
                for site in fed.sites:
                    fed.restart(site)
                progress_at = time.monotonic()
            if not faults or pending is not None or time.monotonic() < next_fault or version >= rounds:
                continue
            kind = rng.choice(FAULTS)
            injected[kind] += 1
            pending = (kind, version)
            down = rng.uniform(0.0, 3.0)
            if kind == "broker":
                fed.restart_broker(down)
            elif kind == "orchestrator":
                fed.kill(ORCHESTRATOR)
                time.sleep(down)
                fed.start(ORCHESTRATOR)
            elif kind == "agent-kill":
                site = rng.choice(fed.sites)
                fed.kill(site)
                time.sleep(down)
                fed.start(site)
            else:
                site = rng.choice(fed.sites)
                fed.stop(site)
                time.sleep(round_timeout + down)
                fed.cont(site)
            print(f"{time.monotonic() - started:7.1f}s v{version}: {kind} (down {down:.1f}s)", flush=True)
            next_fault = time.monotonic() + rng.expovariate(1 / mean_gap)
        wall = time.monotonic() - started
    finally:
        fed.close()
        fed.broker.stop()
    outcome = check_outcome(fed.state_dir, rounds)
    registry = ModelRegistry.open(fed.state_dir)
    shas = [v.sha256 for v in registry.list()]
    registry.conn.close()
    return {"version_sha256": shas, "faults": faults, "wall_seconds": wall, "rounds": rounds, "versions": outcome.versions,
            "failed_attempts": outcome.failed_attempts, "final_pooled_accuracy": outcome.final_accuracy,
            "full_rounds": sum(len(s) == len(fed.sites) for s in outcome.accepted.values()),
            "injected": dict(injected), "survived": dict(survived), "restarts_after_exit": dict(restarts),
            "stalls": stalls, "state_dir": str(root), "checks": "lineage contiguous, contributors == accepted, "
            "no round closed twice, no update stored twice"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--mean-gap", type=float, default=1.5, help="mean seconds between faults (exponential)")
    ap.add_argument("--round-timeout", type=float, default=10.0)
    ap.add_argument("--stall-seconds", type=float, default=120.0)
    ap.add_argument("--local-steps", type=int, default=100, help="the demo's")
    ap.add_argument("--skip-clean", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    results = {"command": " ".join(sys.argv), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    common = dict(rounds=args.rounds, seed=args.seed, mean_gap=args.mean_gap, round_timeout=args.round_timeout,
                  stall_seconds=args.stall_seconds, local_steps=args.local_steps)
    results["faulty"] = run(faults=True, **common)
    print(json.dumps({k: v for k, v in results["faulty"].items() if k != "version_sha256"}, indent=1), flush=True)
    if not args.skip_clean:
        results["clean"] = run(faults=False, **common)
        print(json.dumps({k: v for k, v in results["clean"].items() if k != "version_sha256"}, indent=1), flush=True)
    if "clean" in results:
        same = sum(a == b for a, b in zip(results["faulty"]["version_sha256"], results["clean"]["version_sha256"]))
        results["identical_versions"] = same
    results["machine"] = machine()
    print("\n| run | wall s | versions | failed attempts | rounds with all 4 sites | final pooled accuracy |")
    print("|---|---|---|---|---|---|")
    for name in ("clean", "faulty"):
        r = results.get(name)
        if r:
            print(f"| {name} | {r['wall_seconds']:.0f} | {r['versions'] - 1} | {r['failed_attempts']} | "
                  f"{r['full_rounds']} | {r['final_pooled_accuracy']:.3f} |")
    f = results["faulty"]
    print("\n| fault | injected | survived (new version without help) |\n|---|---|---|")
    for kind in FAULTS:
        print(f"| {kind} | {f['injected'].get(kind, 0)} | {f['survived'].get(kind, 0)} |")
    if "identical_versions" in results:
        print(f"\nversions bit-identical (sha256) to the clean run's: {results['identical_versions']} of "
              f"{len(f['version_sha256'])}")
    print(f"\nstalls needing an operator: {f['stalls']}; daemons restarted after exiting on their own: "
          f"{f['restarts_after_exit']}\n{results['machine']}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
