"""The orchestrator's state directory fills up mid-federation, then space comes back.

A small tmpfs is mounted on the state directory (needs root, or the case is skipped), a
filler file takes the rest once version 1 exists. The orchestrator must say so on its status
topic, keep its registry intact, and finish the federation once the filler is gone (after a
restart if it chose to stop).
"""

from __future__ import annotations

import errno
import sqlite3
import subprocess

import pytest

from shared.protocol import ModelPublished, OrchestratorStatus
from tests.faults.federation_harness import ORCHESTRATOR, FederationHarness, check_outcome


@pytest.fixture()
def small_disk(tmp_path):
    mount_point = tmp_path / "orchestrator"
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount_point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs for the full-disk case (needs root): {mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=True)


def fill(directory) -> None:
    """Write until the file system refuses."""
    block = b"\0" * 65536
    with open(directory / "filler", "wb") as f:
        try:
            while True:
                f.write(block)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC, e


def test_full_disk_under_the_orchestrator_is_reported_and_survived(fresh_mosquitto, tmp_path, small_disk):
    with FederationHarness.heart(fresh_mosquitto, tmp_path, rounds=3, sites=("cleveland", "hungary"),
                                 round_timeout=4.0) as fed:
        fed.start_all()
        fed.watch.wait_for(lambda e: isinstance(e.message, ModelPublished) and e.message.version == 1, 90,
                           what="version 1")
        fill(small_disk)
        told = fed.watch.wait_for(lambda e: isinstance(e.message, OrchestratorStatus)
                                  and "no space left" in e.message.detail, 60, what="a status saying the disk is full")
        assert str(small_disk) in told.message.detail
        # Hold the disk full until the orchestrator has tried its own bookkeeping again and carried on.
        fed.watch.wait_for(lambda e: isinstance(e.message, OrchestratorStatus) and "trying again" in e.message.detail,
                           60, what="the orchestrator retrying what the full disk refused")
        assert fed.running(ORCHESTRATOR), fed.log(ORCHESTRATOR)[-3000:]
        with sqlite3.connect(f"file:{small_disk / 'orchestrator.sqlite'}?mode=ro", uri=True) as conn:
            assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        (small_disk / "filler").unlink()
        if not fed.running(ORCHESTRATOR):
            assert fed.procs[ORCHESTRATOR].returncode == 2, fed.log(ORCHESTRATOR)[-3000:]
            fed.start(ORCHESTRATOR)  # what a restart policy does
        fed.wait_finished(120)
        outcome = check_outcome(fed.state_dir, 3, {"cleveland", "hungary"})
        assert "Traceback" not in fed.log(ORCHESTRATOR), fed.log(ORCHESTRATOR)[-3000:]
        assert outcome.final_accuracy is not None
