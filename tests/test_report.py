"""``fedmq report`` on a real federation's state dir, rendered in headless Chromium; the demo's state dir.

A short Heart Disease federation (the demo's, in-process) runs over the test Mosquitto; the
report made from its state dir alone must hold every plot as a PNG data URI, reference nothing
outside itself, show the same bytes per round as the summaries published on MQTT, and render
in Chromium with the plots visible. Chromium is installed where we may (root with apt-get, as
in CI) and the rendering test is skipped elsewhere.
"""

from __future__ import annotations

import base64
import io
import json
import re
import shlex
import shutil
import sqlite3
import subprocess
import tempfile
from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console
from typer.testing import CliRunner

from fedmq.cli import app
from fedmq.demo import MARKER, DemoOptions, _print_summary, heart_settings, next_steps, prepare_state_dir
from fedmq.inprocess import round_summaries, run_federation
from orchestrator.architectures import build_onnx
from orchestrator.journal import RoundJournal
from orchestrator.registry import ModelRegistry, open_database
from shared.blobstore import BlobStore
from shared.protocol import EvalMetrics, PrivacySpent, RoundSummary

PROJECT = Path(__file__).resolve().parent.parent
FEDERATION = "report-heart"
ROUNDS = 2
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BAR_BLUE = (0x1F, 0x77, 0xB4)  # the "bytes down" bars and the first site's line


pytestmark = pytest.mark.usefixtures("no_fedmq_env")


@pytest.fixture(scope="module")
def federation(mosquitto, tmp_path_factory) -> tuple[Path, list[RoundSummary]]:
    """The demo's federation for two rounds: its state root and the summaries seen on MQTT."""
    root = tmp_path_factory.mktemp("report-demo")
    orch, agents = heart_settings(mosquitto.url, root, DemoOptions(rounds=ROUNDS, local_steps=10))
    orch = orch.model_copy(update={"federation": FEDERATION, "round_timeout": 60.0})
    agents = [a.model_copy(update={"federation": FEDERATION}) for a in agents]
    with round_summaries(mosquitto.url, FEDERATION) as published:
        with run_federation(orch, agents) as fed:
            fed.wait_finished(timeout=120)
    return root, published


def _report(*args: object):
    return CliRunner().invoke(app, ["report", *(str(a) for a in args)])


def _images(page: str) -> list[tuple[str, bytes]]:
    """(section id, PNG bytes) of every <img>; fails unless each is a base64 PNG data URI."""
    found = re.findall(r'<section id="([a-z_]+)"><h2>[^<]*</h2><img src="([^"]*)"', page)
    assert len(found) == page.count("<img"), "an <img> outside a plot section"
    images = []
    for section, src in found:
        assert src.startswith("data:image/png;base64,"), src[:60]
        png = base64.b64decode(src.removeprefix("data:image/png;base64,"), validate=True)
        assert png.startswith(PNG_SIGNATURE)
        with Image.open(io.BytesIO(png)) as image:
            image.verify()
        with Image.open(io.BytesIO(png)) as image:
            assert image.width > 0 and image.height > 0
        images.append((section, png))
    return images


def _flat(text: str) -> str:
    """Console output with rich's line wrapping undone (it wraps at 80 columns under CliRunner)."""
    return " ".join(text.split())


def _references(page: str) -> list[str]:
    return re.findall(r'(?:src|href)\s*=\s*"?([^"\s>]*)', page)


def test_report_of_a_federation_has_every_plot_and_nothing_external(federation, tmp_path: Path) -> None:
    root, published = federation
    out, pngs = tmp_path / "report.html", tmp_path / "png"
    result = _report("--state-dir", root / "orchestrator", "--out", out, "--png-dir", pngs)
    assert result.exit_code == 0, result.output
    assert "reading " in result.stderr
    assert f"federation {FEDERATION}: 3 versions, 3 round summaries, 0 failed attempts" in _flat(result.stderr)
    assert "KiB, 4 plots) and 4 PNG files to" in _flat(result.stderr)

    page = out.read_text()
    images = _images(page)
    assert [name for name, _ in images] == ["metric", "bytes", "round_time", "timeline"]
    assert {p.name: p.read_bytes() for p in pngs.iterdir()} == {f"{name}.png": png for name, png in images}
    assert "http://" not in page and "https://" not in page and "<script" not in page
    assert all(ref.startswith("data:") for ref in _references(page)), _references(page)

    registry = ModelRegistry.open(root / "orchestrator")
    final = registry.latest()
    assert final is not None and final.pooled is not None
    assert f"<h1>Federation <code>{FEDERATION}</code></h1>" in page
    assert (f"{ROUNDS} training rounds · final version v{ROUNDS} · pooled test accuracy {final.pooled.accuracy:.3f} "
            f"over {final.pooled.num_examples} examples from 4 sites · strategy fedavg") in page
    assert page.count("<tr><td>v") == ROUNDS + 1  # one versions-table row per version, with its parent
    assert f"<td>v{ROUNDS}</td><td>v{ROUNDS - 1}</td><td>{ROUNDS}</td>" in page

    # The journal kept exactly what was published on MQTT when each round closed.
    journal = [RoundSummary.model_validate_json(s) for s in RoundJournal(registry.conn).summaries()]
    assert [(s.round, s.bytes_down, s.bytes_up, s.seconds) for s in journal] == \
        [(s.round, s.bytes_down, s.bytes_up, s.seconds) for s in published]
    assert len(journal) == ROUNDS + 1 and journal[-1].new_version is None  # the final evaluation round


def test_report_renders_in_headless_chromium(federation, chromium: str, tmp_path: Path) -> None:
    root, _ = federation
    out = tmp_path / "report.html"
    assert _report("--state-dir", root, "--out", out).exit_code == 0  # the demo's root is accepted too
    shot = tmp_path / "screenshot.png"
    with tempfile.TemporaryDirectory(prefix="fedmq-chromium-") as profile:
        proc = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                               "--no-first-run", "--disable-background-networking", "--disable-component-update",
                               "--disable-sync", f"--user-data-dir={profile}", f"--screenshot={shot}",
                               "--window-size=1280,2400", out.as_uri()],
                              capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0 and shot.exists(), proc.stderr[-2000:]
    with Image.open(shot) as image:
        pixels = image.convert("RGB")
    assert pixels.size == (1280, 2400)
    colors = pixels.getcolors(maxcolors=1 << 20)
    assert colors is not None and len(colors) > 50, "the screenshot is blank"
    # The plots were drawn, not broken-image icons: the bytes plot's blue bars cover a real area.
    blue = sum(n for n, rgb in colors if all(abs(c - b) <= 3 for c, b in zip(rgb, BAR_BLUE, strict=True)))
    assert blue > 5000, f"only {blue} pixels of the plots' blue"


@pytest.fixture(scope="session")
def chromium() -> str:
    """Chromium, installed by scripts/apt-install.sh where we may (root with apt-get); else the test is skipped."""
    proc = subprocess.run(["bash", str(PROJECT / "scripts" / "apt-install.sh"), "chromium"], capture_output=True,
                          text=True, timeout=1200, check=False)
    if proc.returncode == 3:
        pytest.skip(f"rendering the report needs Chromium: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"scripts/apt-install.sh chromium failed: {proc.stderr.strip()[-2000:]}"
    path = shutil.which("chromium")
    assert path is not None, "chromium is installed but not on PATH"
    return path


@pytest.fixture()
def private_registry(tmp_path: Path) -> Path:
    """A dp_fedavg registry written by hand, with scores but no round summaries (as an older fedmq left it)."""
    root = tmp_path / "private"
    conn = open_database(root / "orchestrator.sqlite")
    registry = ModelRegistry(conn, BlobStore(root / "blobs"))
    journal = RoundJournal(conn)
    journal.begin(round_id="p-r1-a1", round=1, attempt=1, kind="train", base_version=0, selected=["a", "b"],
                  training={}, deadline=0.0)
    journal.fail("p-r1-a1", "quorum not reached")
    with conn:
        registry.add_version(build_onnx("logreg", num_features=13, num_outputs=1, seed=0), parent=None, round=None,
                             contributors={}, strategy={"name": "dp_fedavg"}, training={}, note="initial")
        for version, epsilon in ((1, 2.5), (2, 3.75)):
            privacy = PrivacySpent(level="client", mechanism="dp_fedavg/central", epsilon=epsilon, delta=1e-5,
                                   steps=version, noise_multiplier=1.1, sampling_rate=1.0, clip_norm=0.5,
                                   max_epsilon=8.0)
            registry.add_version(build_onnx("logreg", num_features=13, num_outputs=1, seed=version),
                                 parent=version - 1, round=version, contributors={"a": 10, "b": 20},
                                 strategy={"name": "dp_fedavg"}, training={}, privacy=privacy)
        for version in range(3):
            registry.record_evaluation(version, "a", EvalMetrics(num_examples=10, loss=0.5, accuracy=0.6,
                                                                 correct=6 + version))
            registry.record_evaluation(version, "b", EvalMetrics(num_examples=30, loss=0.7, accuracy=0.5,
                                                                 correct=15 + version))
    conn.close()
    return root


def test_report_of_a_private_registry_without_round_summaries(private_registry: Path, tmp_path: Path) -> None:
    out = tmp_path / "private.html"
    result = _report("--state-dir", private_registry, "--out", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert [name for name, _ in _images(page)] == ["metric", "privacy", "timeline"]
    assert "2 training rounds · 1 failed attempt retried · final version v2" in page
    assert "No round summary is stored, so there are no bytes or round-time plots" in page
    assert "pooled test accuracy 0.625 over 40 examples from 2 sites" in page  # v2: (8 + 17) / 40, by counts
    assert "ε = 3.75 at δ = 1e-05" in page and "<td class=num>3.75</td>" in page


def test_a_summary_the_report_cannot_read_costs_only_that_round(federation, tmp_path: Path) -> None:
    root = tmp_path / "copy"
    shutil.copytree(federation[0] / "orchestrator", root)
    with sqlite3.connect(root / "orchestrator.sqlite") as conn:
        conn.execute("UPDATE rounds SET summary=? WHERE round=1 AND kind='train'", (json.dumps({"round": "one"}),))
    out = tmp_path / "damaged.html"
    result = _report("--state-dir", root, "--out", out)
    assert result.exit_code == 0, result.output
    page = out.read_text()
    assert [name for name, _ in _images(page)] == ["metric", "bytes", "round_time", "timeline"]
    assert "a stored round summary does not read as this fedmq&#x27;s RoundSummary" in page
    assert page.count("<td>eval v2</td>") == 1 and "<tr><td>1</td>" not in page and "<tr><td>2</td>" in page


@pytest.mark.parametrize("make", ["missing", "empty", "not_sqlite"])
def test_report_refuses_a_dir_that_is_not_an_orchestrators(tmp_path: Path, make: str) -> None:
    state = tmp_path / "state"
    if make != "missing":
        state.mkdir()
    if make == "not_sqlite":
        (state / "orchestrator.sqlite").write_bytes(b"these are not the rows you are looking for" * 100)
    out = tmp_path / "report.html"
    result = _report("--state-dir", state, "--out", out)
    assert result.exit_code == 2
    error = _flat(result.stderr)
    assert "run `fedmq demo` first, or point --state-dir at the orchestrator's FEDMQ_STATE_DIR" in error
    assert ("not a readable fedmq registry" if make == "not_sqlite" else "is not an orchestrator state dir") in error
    assert not out.exists()
    assert state.exists() == (make != "missing")


def test_an_older_journal_gains_the_summary_column(tmp_path: Path) -> None:
    conn = sqlite3.connect(tmp_path / "old.sqlite")
    conn.execute("CREATE TABLE rounds (round_id TEXT PRIMARY KEY, round INTEGER NOT NULL, attempt INTEGER NOT NULL,"
                 " kind TEXT NOT NULL, state TEXT NOT NULL, base_version INTEGER NOT NULL, selected TEXT NOT NULL,"
                 " training TEXT NOT NULL, announced_at REAL NOT NULL, deadline REAL NOT NULL,"
                 " result_version INTEGER, detail TEXT NOT NULL DEFAULT '')")
    conn.execute("INSERT INTO rounds VALUES ('f-r1-a1', 1, 1, 'train', 'done', 0, '[]', '{}', 1.0, 2.0, 1, '')")
    conn.commit()
    journal = RoundJournal(conn)
    assert journal.summaries() == []  # the old round reads as unsummarised
    assert journal.get("f-r1-a1").result_version == 1


# --- the demo's state dir ------------------------------------------------------------------------


def test_demo_state_dir_rerun_moves_the_previous_run_aside(tmp_path: Path) -> None:
    root, console = tmp_path / "fedmq-demo-state", Console(file=io.StringIO(), width=200)
    prepare_state_dir(root, console)
    assert (root / MARKER).is_file()
    (root / "orchestrator.log").write_text("first run")
    prepare_state_dir(root, console)
    previous = tmp_path / "fedmq-demo-state.previous"
    assert (previous / "orchestrator.log").read_text() == "first run"
    assert sorted(p.name for p in root.iterdir()) == [MARKER]
    (root / "orchestrator.log").write_text("second run")
    prepare_state_dir(root, console)
    assert (previous / "orchestrator.log").read_text() == "second run"
    assert f"moved the previous demo's state to {previous}" in console.file.getvalue()


def test_demo_state_dir_leaves_a_directory_it_did_not_make(tmp_path: Path) -> None:
    console = Console(file=io.StringIO())
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("precious")
    with pytest.raises(RuntimeError, match="holds no earlier demo's state.*nothing there is moved or deleted"):
        prepare_state_dir(mine, console)
    assert sorted(p.name for p in mine.iterdir()) == ["thesis.tex"]

    demo = tmp_path / "demo"
    prepare_state_dir(demo, console)
    (tmp_path / "demo.previous").mkdir()
    (tmp_path / "demo.previous" / "notes.txt").write_text("not the demo's")
    with pytest.raises(RuntimeError, match="is not an earlier demo's state"):
        prepare_state_dir(demo, console)
    assert (tmp_path / "demo.previous" / "notes.txt").read_text() == "not the demo's"
    assert (demo / MARKER).is_file()


def test_the_commands_the_demo_suggests_work_on_its_state(federation, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    root, _ = federation
    monkeypatch.chdir(tmp_path)
    commands = next_steps(root, ROUNDS)
    assert [c.split()[:2] for c in commands] == [["fedmq", "report"], ["fedmq", "models"], ["fedmq", "models"]]
    for command in commands:
        result = CliRunner(env={"COLUMNS": "200"}).invoke(app, shlex.split(command)[1:])
        assert result.exit_code == 0, (command, result.output)
    assert (tmp_path / "fedmq-demo-report.html").is_file()
    assert json.loads(result.stdout)["version"] == ROUNDS



def test_demo_summary_title_starts_on_its_own_line_when_piped() -> None:
    """Piped, the live view's last frame ends without a newline; the summary must not glue onto its border."""
    out = io.StringIO()
    console = Console(file=out, width=100)  # not a terminal, as when piped
    console.print("└────┘", end="")
    _print_summary({"rounds": 2, "final_model_version": 2, "pooled_test_accuracy": 0.75,
                    "per_site_test_accuracy": {"va": 0.5}, "bytes_down": 2048, "bytes_up": 4096,
                    "wall_seconds": 3.0}, console)
    lines = out.getvalue().splitlines()
    assert lines[0] == "└────┘" and lines[1].strip() == "federation summary", lines[:3]
