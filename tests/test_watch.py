"""``fedmq watch`` in a real terminal: tmux runs it against a federation over Mosquitto.

What an operator sees is what is asserted, from ``tmux capture-pane``: the sites and
"round N of M", training progress that moves between two captures, a layout redrawn at the
new width after the window is resized, and, after ``q`` (or Ctrl-C), exit code 0 with the
terminal restored (main screen, line editing and echo back on, no traceback). Finally
``--exit-when-finished`` ends by itself when the federation finishes and leaves its last
frame on the screen, in a terminal and piped. tmux is installed when missing and we are root with apt-get (as in
CI); otherwise the test is skipped.
"""

from __future__ import annotations

import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from fedmq.demo import DemoOptions, heart_settings
from fedmq.inprocess import run_federation

PROJECT = Path(__file__).resolve().parents[1]
WIDTH, WIDER, HEIGHT = 100, 150, 45
STEPS = re.compile(r"(\d+)/(\d+) steps")
EXIT = re.compile(r"^watch-exit=(\d+)$", re.MULTILINE)  # the echo's output, not the command line


class Tmux:
    """A tmux server of the test's own (its own socket), one shell window of a fixed size."""

    def __init__(self) -> None:
        self.socket = f"fedmq-test-{uuid.uuid4().hex[:8]}"
        self("new-session", "-d", "-s", "w", "-x", str(WIDTH), "-y", str(HEIGHT),
             "env PS1='$ ' bash --norc --noprofile")

    def __call__(self, *args: str) -> str:
        return subprocess.run(["tmux", "-L", self.socket, *args], capture_output=True, text=True, check=True,
                              timeout=30).stdout

    def run(self, command: str) -> None:
        self("send-keys", "-t", "w", command, "Enter")

    def screen(self) -> str:
        return self("capture-pane", "-p", "-t", "w")

    def until(self, check: Callable[[str], bool], timeout: float, what: str) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if check(screen):
                return screen
            assert time.monotonic() < deadline, f"no {what} within {timeout:.0f}s; the screen:\n{screen}"
            time.sleep(0.2)

    def flag(self, name: str) -> str:
        return self("display-message", "-p", "-t", "w", f"#{{{name}}}").strip()

    def close(self) -> None:
        subprocess.run(["tmux", "-L", self.socket, "kill-server"], capture_output=True, timeout=30, check=False)


@pytest.fixture()
def tmux() -> Iterator[Tmux]:
    proc = subprocess.run(["bash", str(PROJECT / "scripts" / "apt-install.sh"), "tmux"], capture_output=True,
                          text=True, timeout=600, check=False)
    if proc.returncode == 3:
        pytest.skip(f"the watch test drives a terminal in tmux: {proc.stderr.strip()}")
    assert proc.returncode == 0, f"scripts/apt-install.sh tmux failed: {proc.stderr.strip()[-2000:]}"
    terminal = Tmux()
    yield terminal
    terminal.close()


def _watch_command(url: str, federation: str, *extra: str) -> str:
    return (f"cd {PROJECT} && {sys.executable} -m fedmq watch --broker {url} --federation {federation} "
            f"{' '.join(extra)}; echo watch-exit=$?")


def _terminal_restored(tmux: Tmux) -> None:
    assert tmux.flag("alternate_on") == "0" and tmux.flag("cursor_flag") == "1"
    tmux.run("stty -a | tr ' ;' '\\n\\n' | grep -xE -- '-?(icanon|echo)' | tr '\\n' ' '; echo modes-shown")
    screen = tmux.until(lambda s: "modes-shown\n" in s.split("; echo modes-shown", 1)[-1], 10, "terminal modes")
    assert "icanon echo" in screen and "-icanon" not in screen and "-echo" not in screen


def test_watch_draws_progress_resizes_and_quits_cleanly(mosquitto, tmp_path, tmux):
    federation, rounds = "watch-tmux", 3
    orch, agents = heart_settings(mosquitto.url, tmp_path, DemoOptions(rounds=rounds, local_steps=1500),
                                  sites=("cleveland", "va"))
    orch = orch.model_copy(update={"federation": federation, "exit_when_done": False})
    agents = [a.model_copy(update={"federation": federation, "progress_interval": 0.3}) for a in agents]
    with run_federation(orch, agents) as fed:
        tmux.run(_watch_command(mosquitto.url, federation))
        screen = tmux.until(lambda s: "cleveland" in s and "va" in s and re.search(rf"round \d of {rounds}", s)
                            and STEPS.search(s), 60, "sites training")
        assert tmux.flag("alternate_on") == "1"
        assert max(len(line) for line in screen.splitlines()) <= WIDTH
        # Progress moves: the steps shown change from one capture to a later one.
        seen = {m.group(0) for m in STEPS.finditer(screen)}
        tmux.until(lambda s: bool({m.group(0) for m in STEPS.finditer(s)} - seen), 30, "progress moving")

        tmux("resize-window", "-t", "w", "-x", str(WIDER), "-y", str(HEIGHT))
        wide = tmux.until(lambda s: max(len(line) for line in s.splitlines()) > WIDTH, 10, "a wider layout")
        assert re.search(r"┃ site\s+┃ state\s+┃ agent\s+┃", wide)  # room for the agent version now

        tmux("send-keys", "-t", "w", "q")
        after = tmux.until(EXIT.search, 15, "watch exiting after q")
        assert EXIT.search(after)[1] == "0" and "Traceback" not in after
        _terminal_restored(tmux)

        tmux.run("clear")
        tmux.run(_watch_command(mosquitto.url, federation))
        tmux.until(lambda s: "cleveland" in s, 30, "the fleet drawn again")
        tmux("send-keys", "-t", "w", "C-c")
        after = tmux.until(EXIT.search, 15, "watch exiting after Ctrl-C")
        assert EXIT.search(after)[1] == "0" and "Traceback" not in after and "KeyboardInterrupt" not in after
        _terminal_restored(tmux)

        tmux.run("clear")
        tmux.run(_watch_command(mosquitto.url, federation, "--exit-when-finished"))
        fed.wait_finished(timeout=120)
        final = tmux.until(EXIT.search, 30, "watch ending with the federation")
        assert EXIT.search(final)[1] == "0" and "orchestrator finished" in final
        assert re.search(rf"│ v{rounds}\s+│ final\s+│", final)  # the last frame: the final evaluation's row
        assert tmux.flag("alternate_on") == "0"

        # Piped (no terminal): no alternate screen, and the last frame is printed, not swallowed.
        piped = subprocess.run([sys.executable, "-m", "fedmq", "watch", "--broker", mosquitto.url, "--federation",
                                federation, "--exit-when-finished"], cwd=PROJECT, stdin=subprocess.DEVNULL,
                               capture_output=True, text=True, timeout=60)
        assert piped.returncode == 0, piped.stderr
        assert "orchestrator finished" in piped.stdout and "\x1b[?1049h" not in piped.stdout
