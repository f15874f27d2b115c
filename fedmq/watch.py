"""Drawing a ``FleetView``: the table ``fedmq status`` prints and the live screen of ``fedmq watch``.

One renderer for three users: ``fedmq status`` (one static table; readable when piped),
``fedmq watch`` (progress bars and accuracy per round, redrawn at the terminal's size) and
the demo, which draws the same view of the same messages in its own process. Everything is
built from rich renderables that take the console's width at each render, so a resized
terminal gets a layout of its new size at the next refresh.
"""

from __future__ import annotations

import os
import select
import sys
import termios
import time
import tty
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from fedmq.fleet import ROUND_PHASES, FleetReader, FleetView, SiteRow
from shared.config import CommonSettings
from shared.protocol import EvalMetrics, RoundProgress, RoundSummary

HEALTH_STYLE = {"up": "green", "error": "bold red", "offline": "red"}
ROUNDS_SHOWN = 10
REFRESH_SECONDS = 0.25
WIDE_SITES = 110  # columns from which the sites table also shows hospital names, agent versions, rows and ε
ROUNDS_BASE_WIDTH = 30  # version, round and pooled columns with borders
ROUNDS_TRAFFIC_WIDTH = 34  # down, up and wall columns


def size(n: int) -> str:
    """Bytes for people: KiB below a MiB, MiB above."""
    return f"{n / 1024:.1f} KiB" if n < 1024 * 1024 else f"{n / 1024 / 1024:.2f} MiB"


def _ago(seconds: float) -> str:
    seconds = max(0.0, seconds)
    if seconds < 90:
        return f"{seconds:.0f}s"
    if seconds < 5400:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


def last_seen(row: SiteRow, now: float) -> str:
    """'4s ago' when known; for a last will only a lower bound: 'after 12:04:31' (its own time is unknown)."""
    if row.last_seen is None:
        return "unknown"
    if row.last_seen_exact:
        return f"{_ago(now - row.last_seen)} ago"
    return f"after {time.strftime('%H:%M:%S', time.localtime(row.last_seen))}"


def round_label(round_no: int | None, total: int | None, kind: str | None = None) -> str:
    """'round 4 of 20'; the evaluation after the last round is 'final evaluation' (its number is total + 1)."""
    if round_no is None:
        return ""
    if kind == "evaluate" or (total is not None and round_no > total):
        return "final evaluation"
    return f"round {round_no} of {total}" if total is not None else f"round {round_no}"


def _phase_numbers(p: RoundProgress) -> tuple[int, int, str]:
    """(done, total, unit) of the phase: bytes while moving a model or an update, else steps."""
    if p.phase in ("downloading", "uploading") and p.bytes_total:
        return p.bytes_done, p.bytes_total, "bytes"
    return p.steps_done, p.steps_total, "steps"


def progress_text(p: RoundProgress, open_round: int | None = None) -> str:
    """'training 40/100 steps (40%)', after 'round 4 of 20' unless it is the orchestrator's ``open_round``."""
    done, total, unit = _phase_numbers(p)
    head = p.phase if p.round == open_round else f"{round_label(p.round, p.rounds_total)} {p.phase}"
    if not total:
        return head
    amount = f"{size(done)} of {size(total)}" if unit == "bytes" else f"{done}/{total} steps"
    return f"{head} {amount} ({100 * done / total:.0f}%)"


def _progress_cell(row: SiteRow, view: FleetView, bars: bool) -> RenderableType:
    s = row.status
    o = view.orchestrator
    reported = o is not None and o.round_id is not None and s.sender in o.reported
    if row.health != "up" or s.progress is None or s.state not in ROUND_PHASES:
        text = "reported" if reported else ""
        return Text(text, style="green") if text else Text("-", style="dim")
    p = s.progress
    text = progress_text(p, o.round if o is not None else None) + (" · reported" if reported else "")
    done, total, _ = _phase_numbers(p)
    if not bars or not total:
        return text
    cell = Table.grid(expand=True)
    cell.add_column(ratio=1)
    cell.add_row(text)
    cell.add_row(ProgressBar(total=total, completed=min(done, total)))
    return cell


def _model_cell(row: SiteRow) -> str:
    candidate = row.status.candidate_model_version
    text = f"v{row.model_version}" if row.model_version is not None else "-"
    if candidate is not None and candidate != row.model_version:
        text += f" → v{candidate}"
    return text


def _error_cell(row: SiteRow, live: bool) -> RenderableType:
    """The code on a line of its own (never cut), then the message; in the live view also what to do.

    ``fedmq status`` lists the message and action of a site in error under the table, so its
    cell gives only the code there.
    """
    err = row.status.last_error
    if err is None:
        return Text(row.status.detail, style="red") if row.health == "error" else Text("")
    text = Text(err.code, style="bold red" if row.health == "error" else "yellow")
    if live or row.health != "error":
        text.append(f"\n{err.message}")
    if live and row.health == "error":
        text.append(f"\n→ {err.action}", style="dim")
    return text


def sites_table(view: FleetView, now: float, *, bars: bool, width: int,
                names: Mapping[str, str] | None = None) -> Table:
    """One row per site: health and state, agent version, model, round progress, last seen, last error.

    The live view (``bars``) shows an error's message and what to do in its cell; ``fedmq
    status`` lists them under the table with the other problems.

    Narrower than WIDE_SITES columns, the hospital names, agent versions, data rows and ε
    give their room to progress and errors (``fedmq status --json`` has everything).
    """
    rows = view.site_rows(now)
    wide = width >= WIDE_SITES
    names = names if wide else None
    private = wide and any(r.status.privacy is not None for r in rows)
    table = Table(title="sites", title_justify="left", expand=bars)
    table.add_column("site", no_wrap=True)
    if names:
        table.add_column("hospital")
    table.add_column("state", no_wrap=True)
    if wide:
        table.add_column("agent")
    table.add_column("model", no_wrap=True)
    if wide:
        table.add_column("rows", justify="right")
    if private:
        table.add_column("ε", justify="right")
    table.add_column("round progress", ratio=2 if bars else None)
    table.add_column("last seen")
    table.add_column("last error", ratio=2 if bars else None)
    known = {r.site for r in rows}
    for row in rows:
        state = row.status.state if not row.stale else f"{row.status.state} (stale)"
        health = Text(row.health, style=HEALTH_STYLE[row.health])
        health.append(f" {state}" if state != row.health else "", style="default")
        cells: list[RenderableType] = [row.site]
        if names:
            cells.append(names.get(row.site, ""))
        cells.append(health)
        if wide:
            cells.append(row.status.agent_version)
        cells.append(_model_cell(row))
        if wide:
            data_rows = row.status.data.rows_train if row.status.data else row.status.num_samples
            cells.append(str(data_rows) if data_rows is not None else "-")
        if private:
            cells.append(f"{row.status.privacy.epsilon:.3g}" if row.status.privacy else "-")
        cells += [_progress_cell(row, view, bars), last_seen(row, now),
                  _error_cell(row, live=bars)]
        table.add_row(*cells)
    for site in sorted(set(names or {}) - known):
        table.add_row(site, *([names[site]] if names else []), Text("no status yet", style="dim"))
    return table


def orchestrator_line(view: FleetView, now: float) -> Text:
    """'orchestrator collecting · round 4 of 20 · attempt 2 · model v3 · reported 2/4 · deadline in 40s'."""
    o = view.orchestrator
    text = Text("orchestrator ", style="bold")
    if o is None:
        text.append("no status yet", style="dim")
        return text
    text.append(o.state, style="red" if o.state == "offline" else "green" if o.state == "finished" else "cyan")
    parts = []
    if o.round is not None and o.state != "finished":
        parts.append(round_label(o.round, o.rounds_total, o.kind))
    if o.attempt is not None and o.attempt > 1 and o.state != "finished":
        parts.append(f"attempt {o.attempt}")
    if o.model_version is not None:
        parts.append(f"model v{o.model_version}")
    if o.selected and o.state in ("collecting", "evaluating", "aggregating"):
        parts.append(f"reported {len(o.reported)}/{len(o.selected)}")
    if o.deadline is not None and o.state in ("collecting", "evaluating"):
        parts.append(f"deadline in {_ago(o.deadline - now)}")
    refused = {site: sum(r.values()) for site, r in o.refusals.items() if r}
    if refused:
        parts.append("refused " + ", ".join(f"{site} {n}" for site, n in sorted(refused.items())))
    if o.detail:
        parts.append(o.detail)
    for part in parts:
        text.append(f" · {part}")
    return text


def _metric(m: EvalMetrics | None) -> str:
    if m is None:
        return "-"
    return f"{m.accuracy:.3f}" if m.accuracy is not None else f"loss {m.loss:.3g}"


def rounds_table(summaries: list[RoundSummary], sites: list[str], *, width: int, shown: int = ROUNDS_SHOWN) -> Table:
    """Accuracy per evaluated version (the last ``shown``): pooled, per site and traffic as the width allows.

    Rows are labelled by the version evaluated: round r scores version r-1 before training it,
    and the final evaluation scores the last version.
    """
    site_columns = sum(max(len(site), 5) + 3 for site in sites)
    with_sites = ROUNDS_BASE_WIDTH + site_columns <= width
    with_traffic = ROUNDS_BASE_WIDTH + site_columns * with_sites + ROUNDS_TRAFFIC_WIDTH <= width
    shown_sites = sites if with_sites else []
    table = Table(title="accuracy by version", title_justify="left")
    for name in ("version", "round", "pooled", *shown_sites, *(("down", "up", "wall") if with_traffic else ())):
        table.add_column(name, justify="left" if name in ("version", "round") else "right", no_wrap=True)
    for s in summaries[-shown:]:
        cells = [f"v{s.evaluated_version}", "final" if s.new_version is None else str(s.round), _metric(s.pooled),
                 *[_metric(s.site_metrics.get(site)) for site in shown_sites]]
        if with_traffic:
            cells += [size(s.bytes_down), size(s.bytes_up), f"{s.seconds.get('wall', 0.0):.1f}s"]
        table.add_row(*cells)
    return table


def alerts_renderable(view: FleetView) -> RenderableType:
    alerts = view.active_alerts()
    if not alerts:
        return Text("no active alerts", style="dim")
    table = Table(title="alerts", title_justify="left")
    for name in ("severity", "alert", "message", "what to do"):
        table.add_column(name)
    for a in alerts:
        table.add_row(Text(a.severity, style="bold red" if a.severity == "critical" else "yellow"), a.id,
                      a.message, a.action)
    return table


class Fitted:
    """A renderable built at render time for the width it gets: a resized terminal gets its own layout."""

    def __init__(self, build: Callable[[int], RenderableType]) -> None:
        self.build = build

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        yield self.build(options.max_width)


def status_renderable(view: FleetView, now: float) -> Fitted:
    """What ``fedmq status`` prints: the orchestrator line, the sites table, the last round, alerts, problems."""

    def build(width: int) -> Group:
        parts: list[RenderableType] = [orchestrator_line(view, now), Text(""),
                                       sites_table(view, now, bars=False, width=width)]
        rounds = view.rounds()
        if rounds:
            parts += [Text(""), rounds_table(rounds, sorted(view.sites), width=width, shown=1)]
        parts += [Text(""), alerts_renderable(view)]
        problems = view.problems(now)
        if problems:
            parts.append(Text(""))
            parts += [Text(f"✗ {p}", style="red") for p in problems]
        else:
            parts.append(Text("✓ all sites up, no critical alert", style="green"))
        return Group(*parts)

    return Fitted(build)


def watch_renderable(view: FleetView, now: float, *, header: str = "",
                     names: Mapping[str, str] | None = None) -> Fitted:
    """The live screen: header, orchestrator line, sites with progress bars, accuracy by version, alerts."""
    sites = sorted(set(view.sites) | set(names or {}))

    def build(width: int) -> Group:
        parts: list[RenderableType] = []
        if header:
            parts.append(Text(header, style="bold"))
        parts += [orchestrator_line(view, now), sites_table(view, now, bars=True, width=width, names=names)]
        rounds = view.rounds()
        if rounds:
            parts.append(rounds_table(rounds, sites, width=width))
        parts.append(alerts_renderable(view))
        return Group(*parts)

    return Fitted(build)


@contextmanager
def _keypresses() -> Iterator[Callable[[], str]]:
    """Single keys from a terminal's stdin without Enter (cbreak: Ctrl-C still interrupts); restored on exit."""
    fd = sys.stdin.fileno() if sys.stdin is not None and sys.stdin.isatty() else None
    if fd is None:
        yield lambda: ""
        return
    saved = termios.tcgetattr(fd)
    tty.setcbreak(fd)

    def read() -> str:
        keys = ""
        while select.select([fd], [], [], 0)[0]:
            chunk = os.read(fd, 64)
            if not chunk:
                break
            keys += chunk.decode(errors="replace")
        return keys

    try:
        yield read
    finally:
        termios.tcsetattr(fd, termios.TCSADRAIN, saved)


@contextmanager
def live_view(console: Console, frame: Callable[[], RenderableType], *, screen: bool) -> Iterator[Callable[[], None]]:
    """Draw ``frame()`` live; yields ``draw()``, which redraws at most every REFRESH_SECONDS.

    Each draw builds the frame anew at the console's current size (a resized terminal gets
    its own layout). On leaving, the last frame is drawn once more, and piped output gets the
    newline rich leaves out after it (what followed used to be glued to its bottom border).
    """
    next_draw = 0.0
    with Live(frame(), console=console, screen=screen, auto_refresh=False, redirect_stderr=False) as live:

        def draw() -> None:
            nonlocal next_draw
            if time.monotonic() >= next_draw:
                live.update(frame(), refresh=True)
                next_draw = time.monotonic() + REFRESH_SECONDS

        yield draw
        live.update(frame(), refresh=True)
    if not console.is_terminal:
        console.line()


def terminal_console() -> Console:
    """A console that follows the terminal's size as it changes.

    Why not ``Console()``: rich takes COLUMNS and LINES from the environment over the
    terminal's own size, and some shells export them (their values at the shell's start),
    which would pin a live view to the size the terminal had then.
    """
    return Console(_environ={k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")})


def run_watch(settings: CommonSettings, console: Console, *, exit_when_finished: bool = False) -> None:
    """Draw the fleet live until q, Ctrl-C or (with ``exit_when_finished``) the federation's end.

    The alternate screen keeps the operator's terminal as it was; leaving restores it and the
    terminal's modes. Raises ``TransportError`` when the broker cannot be reached at start;
    a connection lost later is retried by the transport and shown in the header.
    """
    header = f"fedmq watch · federation {settings.federation} · {settings.broker_url} · q quits"
    with FleetReader(settings) as reader:
        view = reader.view

        def frame() -> Fitted:
            state = "" if reader.transport.connected.is_set() else " · BROKER LOST, reconnecting"
            return watch_renderable(view, time.time(), header=f"{header} · {time.strftime('%H:%M:%S')}{state}")

        try:
            # Piped, no alternate screen: rich would then print nothing at all (it makes it transient).
            with _keypresses() as keys, live_view(console, frame, screen=console.is_terminal) as draw:
                while "q" not in keys().lower():
                    busy_until = time.monotonic() + REFRESH_SECONDS
                    while reader.poll(0.05) and time.monotonic() < busy_until:  # take what arrived, then draw
                        pass
                    if exit_when_finished and view.finished():
                        break
                    draw()
        except KeyboardInterrupt:
            return
        if exit_when_finished and view.finished() and console.is_terminal:
            # The alternate screen took the last frame with it; leave the outcome on the terminal.
            console.print(watch_renderable(view, time.time(), header=header.replace(" · q quits", "")))
