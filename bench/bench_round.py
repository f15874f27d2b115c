"""One federated round over a real Mosquitto: wall time split into transfer, training and aggregation, and bytes.

The script starts its own Mosquitto (``shared.broker.start_mosquitto``) and runs an
orchestrator and one agent per site as threads of this process (``fedmq.inprocess``), for
two models:

* ``demo``:  the demo's logistic regression (13 features) on the four Heart Disease
  hospitals' real CSVs, 100 local steps of batch 4 (``fedmq.demo.heart_settings``);
* ``mlp1m``: an MLP of about one million parameters (210 -> 1024 -> 768 -> 1) on
  synthetic CSVs for four sites (300 training rows each), 5 local steps of batch 32.

Every figure comes from what the federation publishes, read by an MQTT monitor as an
operator would: the ``RoundSummary`` per round (``Topics(federation).round_summary``), the
round commands, the sites' retained statuses and their update reports.

* wall        = ``seconds["wall"]``, from opening the round to closing it;
* training    = ``seconds["train_max"]``, the slowest site's reported ``train_seconds``;
* aggregation = ``seconds["aggregate"]``, the orchestrator's aggregation and versioning;
* transfer+protocol = ``wall - training - aggregation``: building and broadcasting the
  model, download, the sites' evaluation of it, update encoding, persisting (fsync),
  upload, validation, acks and every hop through the broker;
* bytes down / up = payload bytes the orchestrator published / received during the round
  (``bytes_down`` / ``bytes_up``). The model travels as one *broadcast* on ``orch/all``
  (the zstd-packed ONNX file, or from round 2 on the exact delta from the previous version,
  where the code has it), so ``down`` is about 1x the model however many sites there are;
  the broker fans it out and the sites together receive about ``sites`` x that ("delivered
  to sites", counted by the agents' transports and averaged over all rounds of the run).

A second table follows the critical path of each round (the site acknowledged last)
through the sites' status changes (downloading -> evaluating -> training -> uploading ->
idle) to say where the transfer+protocol time goes.

The first ``--warmup`` rounds (first-use costs: torch, onnxruntime, page cache) are run but
not counted; figures are medians over ``--rounds`` measured rounds.

Baseline, timed in the same run through the same broker: a bare paho client (MQTT 5,
QoS 1, TCP_NODELAY, 100 in flight -- the transport's settings) publishes the median
round's bytes (down + up) in 1 MiB chunks to a second bare client; ``transfer / raw``
says how far the round's transfer+protocol time is from the broker's raw throughput.
``raw fan-out`` times the round's shape instead: the down bytes from one client to
``sites`` subscribers, then the up bytes split over ``sites`` publishers to one subscriber.

Caveat: all sites share this machine's CPUs and one Python process (the GIL), so sites
that would run in parallel on their own hardware queue for CPU here; a busy machine (see
the load averages printed) inflates training and, more, the CPU-bound protocol steps
(zstd encoding, sha256, fsync). Compare runs on the same, quiet machine.

    python bench/bench_round.py [--rounds 5] [--warmup 1] [--cases demo,mlp1m] [--json out.json]
                                [--profile DIR]

``--profile DIR`` writes one cProfile file per orchestrator/agent thread (open with
``python -m pstats DIR/orchestrator-mlp1m.prof``); it slows the run down, so its timings
are not the benchmark's.
"""

from __future__ import annotations

import argparse
import cProfile
import csv
import datetime as dt
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import paho.mqtt as paho_mqtt
import paho.mqtt.client as mqtt
import torch
from paho.mqtt.enums import CallbackAPIVersion

from edge_agent.agent import EdgeAgent
from fedmq.demo import DemoOptions, heart_settings
from fedmq.inprocess import run_federation
from orchestrator.architectures import build_onnx
from orchestrator.journal import RoundJournal
from orchestrator.registry import open_database
from orchestrator.service import OrchestratorService
from shared.blobs import DEFAULT_CHUNK_SIZE
from shared.broker import start_mosquitto
from shared.config import AgentSettings, CommonSettings, OrchestratorSettings
from shared.onnx_model import float_initializers, load_model_bytes
from shared.protocol import (ProtocolError, RoundCommand, RoundSummary, SiteStatus, TrainingConfig, UpdateReport,
                             parse_message)
from shared.topics import Topics
from shared.transport import BrokerAddress, Transport

CHUNK = DEFAULT_CHUNK_SIZE  # the raw baseline moves the same bytes in the chunks fedmq sends
MIB = 1024 * 1024


# --- machine -----------------------------------------------------------------------------------

def cpu_model() -> str:
    """CPU name from /proc/cpuinfo, since platform.processor() is empty on most Linux systems."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def mosquitto_version() -> str:
    try:
        out = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True, timeout=5)
        first = (out.stdout or out.stderr).splitlines()
        return first[0].strip() if first else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def code_version() -> dict:
    """The commit and the files modified in the working tree: the product code is what is measured."""
    repo = Path(__file__).resolve().parent.parent
    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""
    modified = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines()]
    return {"commit": git("rev-parse", "--short", "HEAD").strip() or "unknown", "modified": modified}


def machine_info() -> dict:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": platform.machine(), "cpu": cpu_model(), "cpu_count": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "system": f"{platform.system()} {platform.release()}", "load_average": round(os.getloadavg()[0], 2),
        "python": platform.python_version(), "torch": torch.__version__, "torch_threads": torch.get_num_threads(),
        "numpy": np.__version__, "onnxruntime": onnxruntime.__version__, "paho": paho_mqtt.__version__,
        "mosquitto": mosquitto_version(), "code": code_version(),
    }


# --- cases -------------------------------------------------------------------------------------

@dataclass
class Case:
    name: str
    description: str
    orchestrator: OrchestratorSettings
    agents: list[AgentSettings]
    params: int
    dense_bytes: int
    onnx_bytes: int


def _model_size(settings: OrchestratorSettings) -> tuple[int, int, int]:
    """(parameters, dense float32 bytes, ONNX file bytes) of the model the orchestrator will build."""
    model = build_onnx(settings.architecture, num_features=len(settings.task_features),
                       num_outputs=settings.num_outputs, hidden=tuple(settings.hidden))
    weights = float_initializers(load_model_bytes(model))
    params = sum(int(w.size) for w in weights.values())
    return params, 4 * params, len(model)


def demo_case(url: str, root: Path, rounds: int) -> Case:
    opts = DemoOptions(rounds=rounds, local_steps=100, batch_size=4, round_timeout=120.0)
    orch, agents = heart_settings(url, root / "demo", opts)
    orch = orch.model_copy(update={"final_evaluation": False})
    params, dense, onnx_bytes = _model_size(orch)
    return Case("demo", "logreg, 13 features, 4 Heart Disease hospitals, 100 steps x batch 4",
                orch, agents, params, dense, onnx_bytes)


def _synthetic_csvs(root: Path, sites: list[str], features: list[str], rows: int, seed: int) -> dict[str, tuple[Path, Path]]:
    """Per site a train and a test CSV: site-shifted Gaussian features, labels from one linear teacher."""
    rng = np.random.default_rng(seed)
    teacher = rng.normal(size=len(features))
    files = {}
    root.mkdir(parents=True, exist_ok=True)
    for index, site in enumerate(sites):
        paths = []
        for split, n in (("train", rows), ("test", max(rows // 4, 10))):
            x = rng.normal(loc=0.2 * index, size=(n, len(features)))
            y = (x @ teacher + rng.normal(size=n) > 0.2 * index * teacher.sum()).astype(int)
            path = root / f"{site}_{split}.csv"
            with path.open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow([*features, "label"])
                for row, label in zip(x, y):
                    writer.writerow([*(f"{v:.5f}" for v in row), label])
            paths.append(path)
        files[site] = (paths[0], paths[1])
    return files


def mlp_case(url: str, root: Path, rounds: int, *, num_features: int, hidden: tuple[int, ...], rows: int,
             local_steps: int, batch_size: int, sites: int = 4) -> Case:
    federation = "bench-mlp1m"
    names = [f"site{i}" for i in range(1, sites + 1)]
    features = [f"x{i}" for i in range(num_features)]
    files = _synthetic_csvs(root / "mlp1m-data", names, features, rows, seed=0)
    common = {"broker_url": url, "federation": federation, "mqtt_version": "5"}
    orch = OrchestratorSettings(
        **common, state_dir=root / "mlp1m" / "orchestrator", rounds=rounds, min_sites=sites,
        task_features=features, task_label="label", architecture="mlp", hidden=list(hidden), num_outputs=1,
        training=TrainingConfig(local_steps=local_steps, batch_size=batch_size, learning_rate=0.01,
                                loss="bce_logits", seed=0),
        exit_when_done=True, final_evaluation=False, round_timeout=120.0)
    agents = [AgentSettings(**common, site_id=s, state_dir=root / "mlp1m" / s, data_train=files[s][0],
                            data_test=files[s][1]) for s in names]
    params, dense, onnx_bytes = _model_size(orch)
    shape = " -> ".join(str(v) for v in (num_features, *hidden, 1))
    return Case("mlp1m", f"MLP {shape}, {sites} synthetic sites x {rows} rows, {local_steps} steps x batch "
                         f"{batch_size}", orch, agents, params, dense, onnx_bytes)


# --- running a federation and reading its summaries -------------------------------------------

@contextmanager
def profiled(directory: Path | None, case: str) -> Iterator[None]:
    """Wrap the orchestrator's and agents' thread bodies in cProfile (one file per thread)."""
    if directory is None:
        yield
        return
    directory.mkdir(parents=True, exist_ok=True)
    originals = {cls: cls.run for cls in (OrchestratorService, EdgeAgent)}

    def wrap(cls, run):
        def body(self, stop):
            name = "orchestrator" if cls is OrchestratorService else self.site
            profile = cProfile.Profile()
            try:
                profile.runcall(run, self, stop)
            finally:
                profile.dump_stats(str(directory / f"{name}-{case}.prof"))
        return body

    for cls, run in originals.items():
        cls.run = wrap(cls, run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


@dataclass
class Observed:
    """What the monitor saw on the federation's topics, with the senders' timestamps (one clock: one process)."""

    summaries: list[RoundSummary]
    commands: dict[str, RoundCommand]              # round_id -> command
    statuses: dict[str, list[SiteStatus]]          # round_id -> statuses naming it, in arrival order
    reports: dict[str, dict[str, UpdateReport]]    # round_id -> site -> report
    announced: dict[str, float]                    # round_id -> when the orchestrator opened it (its journal)
    sites: dict                                    # the agents' transport counters over the whole run


def run_case(case: Case, rounds_total: int, timeout: float, profile_dir: Path | None) -> Observed:
    """Run the federation to the end, watching its topics as an operator would."""
    topics = Topics(case.orchestrator.federation)
    monitor_settings = CommonSettings(broker_url=case.orchestrator.broker_url, federation=case.orchestrator.federation,
                                      mqtt_version="5")
    summaries: dict[int, RoundSummary] = {}
    commands: dict[str, RoundCommand] = {}
    statuses: dict[str, list[SiteStatus]] = {}
    reports: dict[str, dict[str, UpdateReport]] = {}
    started = time.monotonic()

    def take(payload: bytes) -> None:
        try:
            m = parse_message(payload)
        except ProtocolError:
            return
        if isinstance(m, RoundSummary) and m.new_version is not None:
            summaries[m.round] = m
        elif isinstance(m, RoundCommand):
            commands.setdefault(m.round_id, m)
        elif isinstance(m, SiteStatus) and m.round_id is not None:
            statuses.setdefault(m.round_id, []).append(m)
        elif isinstance(m, UpdateReport):
            reports.setdefault(m.round_id, {}).setdefault(m.sender, m)

    with Transport(monitor_settings, f"bench-monitor-{case.name}", persistent_session=False) as monitor:
        for topic in (topics.round_summary, topics.round, f"{topics.base}/site/+/status",
                      f"{topics.base}/site/+/update"):
            monitor.subscribe(topic)
        time.sleep(0.2)  # the SUBACKs are back long before the first round closes; be safe anyway
        with profiled(profile_dir, case.name), run_federation(case.orchestrator, case.agents) as fed:
            while len(summaries) < rounds_total:
                if fed.errors:
                    name, err = next(iter(fed.errors.items()))
                    raise RuntimeError(f"{case.name}: {name} crashed: {err!r}") from err
                if time.monotonic() - started > timeout:
                    raise TimeoutError(f"{case.name}: only {len(summaries)}/{rounds_total} rounds after {timeout:.0f}s")
                msg = monitor.get(0.2)
                if msg is not None:
                    take(msg.payload)
            fed.wait_finished(max(5.0, timeout - (time.monotonic() - started)))
            sites = {"received": sum(a.transport.bytes_received for a in fed.agents.values()),
                     "sent": sum(a.transport.bytes_sent for a in fed.agents.values())}
        # The last round's final statuses (idle after the ack) may arrive after its summary.
        while (msg := monitor.get(0.3)) is not None:
            take(msg.payload)
    sites["seconds"] = time.monotonic() - started
    # The orchestrator has stopped: read when each round was opened from its journal (the start of "wall").
    conn = open_database(Path(case.orchestrator.state_dir) / "orchestrator.sqlite")
    try:
        journal = RoundJournal(conn)
        announced = {rid: rec.announced_at for rid in commands if (rec := journal.get(rid)) is not None}
    finally:
        conn.close()
    return Observed([summaries[r] for r in sorted(summaries)], commands, statuses, reports, announced, sites)


PHASES = {
    "prepare": "orchestrator: open the round, build the downlink blobs (until the command's timestamp)",
    "download": "command + model chunks to the site, model rebuilt and verified, data loaded (to 'evaluating')",
    "evaluate": "the site scores the received model on its test set (to 'training')",
    "train": "the site's reported train_seconds",
    "encode_send": "encode the update, persist it (fsync), publish chunks and report (to 'uploading')",
    "upload_ack": "chunks through the broker, orchestrator reassembles, validates, stores, acks (to 'idle')",
    "close": "after the last ack: aggregation, new version, summary",
}


def round_phases(obs: Observed, summary: RoundSummary) -> dict | None:
    """The critical path of one round (the site acknowledged last), in seconds per phase."""
    cmd = next((c for c in obs.commands.values() if c.round == summary.round and c.kind == "train"
                and c.model_version == summary.evaluated_version), None)
    if cmd is None:
        return None
    start = obs.announced.get(cmd.round_id, summary.sent_at - summary.seconds.get("wall", 0.0))
    per_site = {}
    for site in cmd.selected:
        seen: dict[str, float] = {}
        for st in obs.statuses.get(cmd.round_id, []):
            if st.sender == site:
                key = "acked" if st.state == "idle" and "accepted" in st.detail else st.state
                seen.setdefault(key, st.sent_at)
        report = obs.reports.get(cmd.round_id, {}).get(site)
        if not {"evaluating", "training", "uploading", "acked"} <= seen.keys() or report is None:
            return None
        per_site[site] = (seen, report.train_seconds)
    last = max(per_site, key=lambda site: per_site[site][0]["acked"])
    seen, train = per_site[last]
    return {"site": last,
            "prepare": cmd.sent_at - start,
            "download": seen["evaluating"] - cmd.sent_at,
            "evaluate": seen["training"] - seen["evaluating"],
            "train": train,
            "encode_send": seen["uploading"] - seen["training"] - train,
            "upload_ack": seen["acked"] - seen["uploading"],
            "close": summary.sent_at - seen["acked"]}


# --- raw broker baseline -----------------------------------------------------------------------

class _RawClient:
    """A bare paho client with the transport's settings; counts what it receives."""

    def __init__(self, url: str, client_id: str) -> None:
        addr = BrokerAddress.parse(url)
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        self.client.max_inflight_messages_set(100)
        self.received = 0
        self.target = 0
        self.done = threading.Event()
        self._connected = threading.Event()
        self._subscribed = threading.Event()
        self.client.on_socket_open = lambda c, u, sock: sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.client.on_connect = lambda *a: self._connected.set()
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect(addr.host, addr.port, keepalive=30)
        self.client.loop_start()
        if not self._connected.wait(10):
            raise RuntimeError(f"raw client {client_id} could not connect to {url}")

    def _on_message(self, client, userdata, msg) -> None:
        self.received += len(msg.payload)
        if self.received >= self.target:
            self.done.set()

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        if not self._subscribed.wait(10):
            raise RuntimeError("no SUBACK")

    def expect(self, nbytes: int) -> None:
        self.received, self.target = 0, nbytes
        self.done.clear()

    def publish(self, topic: str, nbytes: int, payload: bytes) -> list[mqtt.MQTTMessageInfo]:
        infos = []
        for start in range(0, nbytes, CHUNK):
            infos.append(self.client.publish(topic, payload[:min(CHUNK, nbytes - start)], qos=1))
        return infos

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _phase(publishers: list[_RawClient], subscribers: list[_RawClient], per_publisher: int, topic: str,
           payload: bytes) -> float:
    """Seconds from the first publish until every subscriber holds every publisher's bytes."""
    for s in subscribers:
        s.expect(per_publisher * len(publishers))
    started = time.perf_counter()
    infos = [i for index, p in enumerate(publishers) for i in p.publish(f"{topic}/{index}", per_publisher, payload)]
    for s in subscribers:
        if not s.done.wait(60):
            raise TimeoutError(f"raw baseline: a subscriber got {s.received}/{s.target} bytes")
    elapsed = time.perf_counter() - started
    for info in infos:
        info.wait_for_publish(10)  # PUBACKs, so the next repetition starts from a quiet connection
    return elapsed


def raw_baseline(url: str, down: int, up: int, sites: int, reps: int) -> dict:
    """Median seconds to move a round's bytes through the broker with bare paho clients."""
    payload = os.urandom(CHUNK)
    hub = _RawClient(url, "bench-raw-hub")
    leaves = [_RawClient(url, f"bench-raw-leaf{i}") for i in range(sites)]
    try:
        hub.subscribe("bench/raw/up/#")
        for leaf in leaves:
            leaf.subscribe("bench/raw/down/#")
        one_to_one = lambda: _phase([leaves[0]], [hub], down + up, "bench/raw/up", payload)  # noqa: E731
        shaped = lambda: (_phase([hub], leaves, down, "bench/raw/down", payload)  # noqa: E731
                          + _phase(leaves, [hub], max(1, up // sites), "bench/raw/up", payload))
        one_to_one(), shaped()  # warm-up
        a, b = [], []
        for _ in range(reps):
            a.append(one_to_one())
            b.append(shaped())
        return {"bytes": down + up, "one_to_one_seconds": statistics.median(a),
                "one_to_one_mib_per_s": (down + up) / MIB / statistics.median(a),
                "fanout_seconds": statistics.median(b), "fanout_delivered_bytes": down * sites + up}
    finally:
        for c in (hub, *leaves):
            c.close()


# --- report ------------------------------------------------------------------------------------

def summarize(case: Case, obs: Observed, warmup: int) -> dict:
    rounds = []
    sites_traffic = obs.sites
    for s in obs.summaries:
        wall, train, agg = s.seconds.get("wall", 0.0), s.seconds.get("train_max", 0.0), s.seconds.get("aggregate", 0.0)
        rounds.append({"round": s.round, "wall": wall, "training": train, "aggregation": agg,
                       "transfer": wall - train - agg, "bytes_down": s.bytes_down, "bytes_up": s.bytes_up,
                       "warmup": s.round <= warmup, "phases": round_phases(obs, s)})
    measured = [r for r in rounds if not r["warmup"]] or rounds
    with_phases = [r["phases"] for r in measured if r["phases"]]
    phases = {k: statistics.median(p[k] for p in with_phases) for k in PHASES} if with_phases else None
    median = {k: statistics.median(r[k] for r in measured)
              for k in ("wall", "training", "aggregation", "transfer", "bytes_down", "bytes_up")}
    n_sites = len(case.agents)
    return {
        "case": case.name, "description": case.description, "params": case.params, "dense_bytes": case.dense_bytes,
        "onnx_bytes": case.onnx_bytes, "sites": n_sites, "measured_rounds": len(measured), "warmup_rounds": warmup,
        "median": median, "phases_median": phases,
        "down_over_dense": median["bytes_down"] / case.dense_bytes,
        "up_over_dense": median["bytes_up"] / case.dense_bytes,
        "up_over_dense_x_sites": median["bytes_up"] / (case.dense_bytes * n_sites),
        # Whole-run averages (all rounds, start-up statuses included): what the broker delivered to the sites.
        "sites_received_per_round": sites_traffic["received"] / len(rounds),
        "sites_sent_per_round": sites_traffic["sent"] / len(rounds),
        "run_seconds": sites_traffic["seconds"],
        "rounds": rounds,
    }


def _b(n: float) -> str:
    if n < 10 * 1024:
        return f"{n:,.0f} B"
    if n < 10 * MIB:
        return f"{n / 1024:,.1f} KiB"
    return f"{n / MIB:,.2f} MiB"


def _ms(s: float) -> str:
    return f"{s * 1000:,.0f}" if s >= 0.0995 else f"{s * 1000:,.1f}"


def print_report(info: dict, args: argparse.Namespace, results: list[dict]) -> None:
    print(f"date {info['date']}; {info['machine']} {info['cpu']}, {info['cpu_count']} CPUs "
          f"({info['affinity']} usable), {info['system']}, load average {info['load_average']} at start, "
          f"{info['load_average_end']} at end")
    print(f"python {info['python']}, torch {info['torch']} ({info['torch_threads']} threads), numpy {info['numpy']}, "
          f"onnxruntime {info['onnxruntime']}, paho-mqtt {info['paho']}, {info['mosquitto']}")
    code = info["code"]
    print(f"code: commit {code['commit']}" + (f" with uncommitted changes in {', '.join(code['modified'])}"
                                              if code["modified"] else " (clean tree)"))
    print(f"rounds: {args.warmup} warm-up + {args.rounds} measured per case (medians below); orchestrator and "
          "agents are threads of one process sharing these CPUs; broker on loopback")
    print()
    for r in results:
        print(f"- **{r['case']}**: {r['description']}; {r['params']:,} parameters = {_b(r['dense_bytes'])} dense "
              f"float32, ONNX file {_b(r['onnx_bytes'])}")
    print()
    print("Time per round (ms, median):")
    print()
    print("| case | wall | training (max site) | aggregation | transfer+protocol | raw broker 1→1 "
          "| transfer / raw 1→1 | raw broker fan-out | transfer / raw fan-out |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m, raw = r["median"], r["baseline"]
        print(f"| {r['case']} | {_ms(m['wall'])} | {_ms(m['training'])} | {_ms(m['aggregation'])} "
              f"| {_ms(m['transfer'])} | {_ms(raw['one_to_one_seconds'])} "
              f"| {m['transfer'] / raw['one_to_one_seconds']:,.1f}x | {_ms(raw['fanout_seconds'])} "
              f"| {m['transfer'] / raw['fanout_seconds']:,.1f}x |")
    print()
    print("Bytes per round (median; down/up = payload bytes the orchestrator published/received):")
    print()
    print("| case | dense f32 model | down | down / dense | up | up / dense | up / (dense x sites) "
          "| delivered to sites (avg) | / (dense x sites) | raw 1→1 MiB/s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        m, raw = r["median"], r["baseline"]
        print(f"| {r['case']} | {_b(r['dense_bytes'])} | {_b(m['bytes_down'])} | {r['down_over_dense']:,.2f}x "
              f"| {_b(m['bytes_up'])} | {r['up_over_dense']:,.2f}x | {r['up_over_dense_x_sites']:,.2f}x "
              f"| {_b(r['sites_received_per_round'])} "
              f"| {r['sites_received_per_round'] / (r['dense_bytes'] * r['sites']):,.2f}x "
              f"| {raw['one_to_one_mib_per_s']:,.0f} |")
    print()
    print("Where the time goes: critical path of a round (the site acknowledged last), ms, median per phase "
          "(medians need not add up to the wall median):")
    print()
    print("| case | " + " | ".join(PHASES) + " |")
    print("|---|" + "---:|" * len(PHASES))
    for r in results:
        p = r["phases_median"]
        if p:
            print(f"| {r['case']} | " + " | ".join(_ms(p[k]) for k in PHASES) + " |")
    print()
    for name, meaning in PHASES.items():
        print(f"- {name}: {meaning}")
    print()
    print("Per round (ms; * = warm-up, not in the medians):")
    print()
    print("| case | round | wall | training | aggregation | transfer+protocol | down | up |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for r in results:
        for x in r["rounds"]:
            print(f"| {r['case']} | {x['round']}{'*' if x['warmup'] else ''} | {_ms(x['wall'])} | {_ms(x['training'])} "
                  f"| {_ms(x['aggregation'])} | {_ms(x['transfer'])} | {_b(x['bytes_down'])} | {_b(x['bytes_up'])} |")


# --- main --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="measured rounds per case (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="rounds run first and not counted")
    parser.add_argument("--cases", default="demo,mlp1m", help="comma-separated: demo, mlp1m")
    parser.add_argument("--mlp-features", type=int, default=210)
    parser.add_argument("--mlp-hidden", default="1024,768", help="hidden layer widths of the MLP")
    parser.add_argument("--mlp-rows", type=int, default=300, help="training rows per synthetic site")
    parser.add_argument("--mlp-steps", type=int, default=5, help="local steps per round (MLP)")
    parser.add_argument("--mlp-batch", type=int, default=32)
    parser.add_argument("--baseline-reps", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=150.0, help="seconds per case before giving up")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this path")
    parser.add_argument("--profile", type=Path, metavar="DIR", help="write cProfile files per thread to DIR")
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if args.rounds < 1 or args.warmup < 0:
        parser.error("--rounds must be >= 1 and --warmup >= 0")
    if not cases or set(cases) - {"demo", "mlp1m"}:
        parser.error("--cases takes demo and/or mlp1m")
    total = args.rounds + args.warmup

    info = machine_info()
    results = []
    with start_mosquitto() as broker, tempfile.TemporaryDirectory(prefix="fedmq-bench-round-") as tmp:
        root = Path(tmp)
        for name in cases:
            if name == "demo":
                case = demo_case(broker.url, root, total)
            else:
                case = mlp_case(broker.url, root, total, num_features=args.mlp_features,
                                hidden=tuple(int(h) for h in args.mlp_hidden.split(",")), rows=args.mlp_rows,
                                local_steps=args.mlp_steps, batch_size=args.mlp_batch)
            print(f"[{case.name}] {case.params:,} parameters, {len(case.agents)} sites, {total} rounds ...",
                  file=sys.stderr, flush=True)
            observed = run_case(case, total, args.timeout, args.profile)
            result = summarize(case, observed, args.warmup)
            m = result["median"]
            result["baseline"] = raw_baseline(broker.url, int(m["bytes_down"]), int(m["bytes_up"]), result["sites"],
                                              args.baseline_reps)
            results.append(result)
    info["load_average_end"] = round(os.getloadavg()[0], 2)
    print_report(info, args, results)
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "arguments": {k: str(v) if isinstance(v, Path) else v
                                                                          for k, v in vars(args).items()},
                                         "results": results}, indent=1))
        print(f"\nwrote {args.json}", file=sys.stderr)


if __name__ == "__main__":
    main()
