"""The cost of monitoring: the demo federation's round time with and without an exporter and a watcher attached.

The script starts its own Mosquitto and runs the demo federation (four Heart Disease
hospitals, logistic regression, 100 local steps of batch 4; orchestrator and agents as
threads of this process, ``fedmq.inprocess``) ``2 x --pairs`` times, alternately without
and with monitoring (the order flips every pair, so a drift in the machine's load hits both
sides alike). "With" means what operators run: ``fedmq exporter`` as its own process,
subscribed to the monitoring topics, a scraper fetching ``/metrics`` every
``--scrape-interval`` seconds (Prometheus' default is 15 s; 1 s is the harsh case), and
``fedmq watch`` drawing the live view in a pseudo-terminal of 160 x 48 (a real terminal:
piped, rich would draw only the last frame).

Figures, all from what the federation publishes:

* round time = ``RoundSummary.seconds["wall"]`` of the training rounds after the first
  (the first pays first-use costs), median per side; ratio = with / without, over all
  rounds and per pair of back-to-back runs (the median of those is the robust figure);
* the exporter's CPU time per minute of federation (its process's user + system time once
  it serves: its start-up is left out);
* the ``/metrics`` page size and the scrapes made;
* status traffic: bytes per minute per site published on ``site/+/status`` (heartbeats,
  state changes and progress) while rounds run back to back, counted by a subscriber during
  the runs without the exporter; an idle federation sends only heartbeats.

Caveat: on a 2-core machine the exporter and the scraper compete with the four agents for
CPU, as they would not on a hospital's own server; a loaded machine moves absolute times
(the load average is printed), the ratio within one run less so.

    python bench/bench_monitoring.py [--pairs 3] [--rounds 6] [--scrape-interval 1] [--json out.json]
"""

from __future__ import annotations

import argparse
import fcntl
import json
import logging
import os
import pty
import struct
import termios
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from bench_round import machine_info
from fedmq.demo import DemoOptions, heart_settings
from fedmq.inprocess import round_summaries, run_federation
from shared.broker import Broker, start_mosquitto
from shared.config import CommonSettings
from shared.topics import Topics
from shared.transport import Transport


@dataclass
class Run:
    attached: bool
    walls: list[float]
    minutes: float
    exporter_cpu_seconds: float = 0.0
    scrapes: int = 0
    page_bytes: int = 0
    status_bytes: dict[str, int] = field(default_factory=dict)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process_cpu(pid: int) -> float:
    """User + system CPU seconds of a live process (Linux /proc), so its start-up can be left out."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@contextmanager
def exporter_attached(broker: Broker, federation: str, interval: float, run: Run) -> Iterator[None]:
    """``fedmq exporter`` in its own process and a scraper thread, for the duration of the block."""
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "fedmq", "exporter", "--broker", broker.url, "--federation",
                             federation, "--listen", f"127.0.0.1:{port}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 60
    while True:  # until it serves: its start-up is not part of a round
        try:
            urllib.request.urlopen(url, timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fedmq exporter did not serve {url} (exit code {proc.poll()})") from None
            time.sleep(0.2)
    cpu_serving = _process_cpu(proc.pid)
    stop = threading.Event()

    def scrape() -> None:
        while not stop.wait(interval):
            page = urllib.request.urlopen(url, timeout=10).read()
            run.scrapes += 1
            run.page_bytes = len(page)

    scraper = threading.Thread(target=scrape, name="scraper", daemon=True)
    scraper.start()
    try:
        yield
    finally:
        stop.set()
        scraper.join(15)
        run.exporter_cpu_seconds = _process_cpu(proc.pid) - cpu_serving
        proc.terminate()
        proc.wait(30)


@contextmanager
def watcher_attached(broker: Broker, federation: str) -> Iterator[None]:
    """``fedmq watch`` in a pseudo-terminal for the duration of the block; its screen is read and dropped."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 48, 160, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    proc = subprocess.Popen([sys.executable, "-m", "fedmq", "watch", "--broker", broker.url, "--federation",
                             federation], stdin=slave, stdout=slave, stderr=slave, env={**env, "TERM": "xterm"})
    os.close(slave)
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            try:
                if not os.read(master, 65536):
                    return
            except OSError:  # the watcher closed the terminal
                return

    reader = threading.Thread(target=drain, name="watch-screen", daemon=True)
    reader.start()
    try:
        yield
    finally:
        os.write(master, b"q")
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
        stop.set()
        os.close(master)
        reader.join(5)
        if proc.returncode != 0:
            raise RuntimeError(f"fedmq watch ended with exit code {proc.returncode}")


@contextmanager
def monitors_attached(broker: Broker, federation: str, interval: float, run: Run) -> Iterator[None]:
    with exporter_attached(broker, federation, interval, run), watcher_attached(broker, federation):
        yield


@contextmanager
def status_counter(broker: Broker, federation: str, run: Run) -> Iterator[None]:
    """Count the payload bytes each site publishes on its status topic while the block runs."""
    topics = Topics(federation)
    with Transport(CommonSettings(broker_url=broker.url, federation=federation), f"bench-status-{federation}",
                   persistent_session=False) as monitor:
        monitor.subscribe(f"{topics.base}/site/+/status")
        stop = threading.Event()

        def count() -> None:
            while not stop.is_set():
                msg = monitor.get(0.2)
                if msg is not None and not msg.retained:
                    site = topics.site_of(msg.topic) or "?"
                    run.status_bytes[site] = run.status_bytes.get(site, 0) + len(msg.payload)

        counter = threading.Thread(target=count, name="status-counter", daemon=True)
        counter.start()
        try:
            yield
        finally:
            stop.set()
            counter.join(5)


def run_federation_once(broker: Broker, root: Path, index: int, attached: bool, rounds: int,
                        interval: float) -> Run:
    federation = f"bench-monitoring-{index}-{'on' if attached else 'off'}"
    orch, agents = heart_settings(broker.url, root / federation, DemoOptions(rounds=rounds))
    orch = orch.model_copy(update={"federation": federation})
    agents = [a.model_copy(update={"federation": federation}) for a in agents]
    run = Run(attached, [], 0.0)
    with monitors_attached(broker, federation, interval, run) if attached else \
            status_counter(broker, federation, run):
        started = time.monotonic()
        with round_summaries(broker.url, federation) as summaries:
            with run_federation(orch, agents) as fed:
                fed.wait_finished(timeout=600)
        run.minutes = (time.monotonic() - started) / 60
    training = sorted((s for s in summaries if s.new_version is not None and s.round >= 2), key=lambda s: s.round)
    run.walls = [s.seconds["wall"] for s in training]
    if len(run.walls) != rounds - 1:
        raise RuntimeError(f"expected {rounds - 1} training summaries after the first, got {len(run.walls)}")
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3, help="runs without and with the exporter, alternated")
    parser.add_argument("--rounds", type=int, default=6, help="training rounds per run (the first is not counted)")
    parser.add_argument("--scrape-interval", type=float, default=1.0, help="seconds between two /metrics fetches")
    parser.add_argument("--json", type=Path, help="also write every figure here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    info = machine_info()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp, start_mosquitto() as broker:
        for pair in range(args.pairs):
            order = (False, True) if pair % 2 == 0 else (True, False)
            for attached in order:
                run = run_federation_once(broker, Path(tmp), pair, attached, args.rounds, args.scrape_interval)
                runs.append(run)
                print(f"pair {pair + 1} {'with' if attached else 'without'} exporter and watcher: round wall median "
                      f"{statistics.median(run.walls) * 1000:.0f} ms", file=sys.stderr)
    off = [w for r in runs if not r.attached for w in r.walls]
    on = [w for r in runs if r.attached for w in r.walls]
    with_runs = [r for r in runs if r.attached]
    without_runs = [r for r in runs if not r.attached]
    # Each pair ran back to back, so its ratio sees (nearly) the same machine load on both sides.
    pair_ratios = [statistics.median(w.walls) / statistics.median(wo.walls) for w, wo in zip(with_runs, without_runs)]
    cpu_per_minute = sum(r.exporter_cpu_seconds for r in with_runs) / sum(r.minutes for r in with_runs)
    sites = {site for r in without_runs for site in r.status_bytes}
    status_rate = (sum(sum(r.status_bytes.values()) for r in without_runs)
                   / sum(r.minutes for r in without_runs) / max(len(sites), 1))
    figures = {
        "round_wall_ms_without": statistics.median(off) * 1000, "round_wall_ms_with": statistics.median(on) * 1000,
        "ratio_with_over_without": statistics.median(on) / statistics.median(off),
        "pair_ratios": pair_ratios, "median_pair_ratio": statistics.median(pair_ratios),
        "rounds_measured_each_side": len(off),
        "exporter_cpu_seconds_per_minute": cpu_per_minute, "scrapes": sum(r.scrapes for r in with_runs),
        "scrape_interval_s": args.scrape_interval, "metrics_page_bytes": max(r.page_bytes for r in with_runs),
        "status_bytes_per_minute_per_site": status_rate,
    }
    print(f"\n{info['date']}  {info['cpu']} x{info['cpu_count']}  load {info['load_average']}  "
          f"commit {info['code']['commit']}")
    print("| figure | value |\n|---|---:|")
    print(f"| round wall time, median, without monitoring | {figures['round_wall_ms_without']:.0f} ms |")
    print(f"| round wall time, median, with exporter + scrape every {args.scrape_interval:g} s + fedmq watch | "
          f"{figures['round_wall_ms_with']:.0f} ms |")
    print(f"| ratio with / without, all rounds | {figures['ratio_with_over_without']:.3f} |")
    print(f"| ratio with / without, median of the {len(pair_ratios)} pairs | **{figures['median_pair_ratio']:.3f}** "
          f"({', '.join(f'{r:.2f}' for r in pair_ratios)}) |")
    print(f"| rounds measured per side | {len(off)} ({args.pairs} runs x {args.rounds - 1}) |")
    print(f"| exporter CPU time per minute of federation | {cpu_per_minute:.2f} s |")
    print(f"| /metrics page | {figures['metrics_page_bytes']:,} B ({figures['scrapes']} scrapes) |")
    print(f"| status traffic per site, rounds running back to back | {status_rate:,.0f} B/min |")
    if args.json:
        args.json.write_text(json.dumps({"machine": info, "figures": figures,
                                         "runs": [r.__dict__ for r in runs]}, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
