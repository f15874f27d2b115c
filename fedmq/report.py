"""``fedmq report``: how a federation learned, as one self-contained HTML page of plots and tables.

It reads only the orchestrator's state directory, so it works after the federation ended, on
a copy taken from a server, with no broker: the model registry gives every version's lineage,
contributors, per-site scores and privacy spent; the round journal gives each closed round's
summary (bytes each way, seconds). The page embeds its images as PNG data URIs and needs no
JavaScript, so it can be mailed or archived as one file; ``--png-dir`` also writes the plots
as PNG files for slides. Plots are drawn with matplotlib's Agg canvas (no display needed).
"""

from __future__ import annotations

import base64
import html
import io
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.dates import AutoDateLocator, ConciseDateFormatter, date2num
from matplotlib.figure import Figure
from pydantic import ValidationError

from orchestrator.journal import RoundJournal, RoundRecord
from orchestrator.registry import ModelRegistry, ModelVersion, RegistryError, StorageError
from shared.protocol import EvalMetrics, RoundSummary

log = logging.getLogger(__name__)

WHAT_TO_DO = "run `fedmq demo` first, or point --state-dir at the orchestrator's FEDMQ_STATE_DIR"
DB_NAME = "orchestrator.sqlite"
DEMO_ORCHESTRATOR = "orchestrator"  # the orchestrator's state inside `fedmq demo`'s state dir
PLOT_WIDTH, PLOT_HEIGHT, PLOT_DPI = 10.0, 4.0, 110
POOLED_COLOR = "#111111"


class ReportError(RuntimeError):
    """A state dir the report cannot read, or an output it cannot write; the message says what to do."""


@dataclass(frozen=True)
class History:
    """Everything the state dir says about the federation, read once."""

    state_dir: Path
    versions: list[ModelVersion]
    summaries: list[RoundSummary]  # closed rounds in announcement order; the final evaluation last
    failed: list[RoundRecord]  # attempts that missed their quorum or failed (each retried)
    unreadable: list[str] = field(default_factory=list)  # why some stored summaries were left out

    @property
    def federation(self) -> str | None:
        return self.summaries[0].federation if self.summaries else None

    @property
    def metric(self) -> str | None:
        """The metric every plot and table shows: accuracy where the sites report it, else loss."""
        scores = [m for v in self.versions for m in v.evaluations.values()]
        if not scores:
            return None
        return "accuracy" if any(m.accuracy is not None for m in scores) else "loss"

    @property
    def sites(self) -> list[str]:
        return sorted({s for v in self.versions for s in (*v.evaluations, *v.contributors)})


@dataclass(frozen=True)
class Plot:
    name: str  # also the PNG file's stem
    title: str
    caption: str
    png: bytes
    size: tuple[int, int]  # pixels, width and height

    def data_uri(self) -> str:
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def orchestrator_state_dir(state_dir: Path) -> Path:
    """The directory holding the registry: ``state_dir`` itself, or its ``orchestrator/`` (a demo's state dir)."""
    if not (state_dir / DB_NAME).exists() and (state_dir / DEMO_ORCHESTRATOR / DB_NAME).exists():
        return state_dir / DEMO_ORCHESTRATOR
    return state_dir


def load_history(state_dir: Path) -> History:
    """Read the registry and the journal; a dir that is not an orchestrator's raises ``ReportError``."""
    root = orchestrator_state_dir(state_dir)
    try:
        registry = ModelRegistry.open(root)
        versions = registry.list()
        journal = RoundJournal(registry.conn)
        stored, failed = journal.summaries(), journal.failed()
    except StorageError as e:  # the file is there but damaged (or not SQLite at all)
        raise ReportError(f"{root / DB_NAME} is not a readable fedmq registry ({e}); {WHAT_TO_DO}") from None
    except RegistryError:
        raise ReportError(f"{state_dir} is not an orchestrator state dir (no {DB_NAME} in it); {WHAT_TO_DO}") from None
    except sqlite3.Error as e:
        raise ReportError(f"{root / DB_NAME} is not a readable fedmq registry ({e}); {WHAT_TO_DO}") from None
    if not versions:
        raise ReportError(f"the registry in {root} holds no model version yet: the orchestrator creates version 0 "
                          "when it starts; run it (or `fedmq demo`) and report again")
    summaries, unreadable = [], []
    for text in stored:
        try:
            summaries.append(RoundSummary.model_validate_json(text))
        except ValidationError as e:
            why = (f"a stored round summary does not read as this fedmq's RoundSummary ({e.error_count()} errors): "
                   "that round is left out of the bytes and time plots; if a newer fedmq wrote it, report with that")
            log.warning("%s", why)
            unreadable.append(why)
    return History(root, versions, summaries, failed, unreadable)


# --- plots -----------------------------------------------------------------------------------


def _figure(height: float = PLOT_HEIGHT) -> Figure:
    fig = Figure(figsize=(PLOT_WIDTH, height), dpi=PLOT_DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _plot(name: str, title: str, caption: str, fig: Figure) -> Plot:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=PLOT_DPI, metadata={"Software": None})
    return Plot(name, title, caption, buf.getvalue(), fig.canvas.get_width_height())


def _style(ax, xlabel: str, ylabel: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, color="#dddddd", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _legend(ax, columns: int) -> None:
    """Above the plot, where it hides no bar or line."""
    ax.figure.legend(loc="outside upper center", ncols=columns, fontsize=9, frameon=False)


def _value(m: EvalMetrics | None, metric: str) -> float | None:
    return None if m is None else getattr(m, metric)


def _site_colors(sites: Sequence[str]) -> dict[str, str]:
    palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22"]
    return {s: palette[i % len(palette)] for i, s in enumerate(sites)}


def plot_metric(history: History) -> Plot | None:
    """Pooled and per-site test metric of each version: did every hospital gain, or only the big ones?"""
    metric = history.metric
    if metric is None:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    colors = _site_colors(history.sites)
    for site in history.sites:
        points = [(v.version, y) for v in history.versions
                  if (y := _value(v.evaluations.get(site), metric)) is not None]
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", markersize=3.5, linewidth=1.3, alpha=0.85, color=colors[site], label=site)
    pooled = [(v.version, y) for v in history.versions if (y := _value(v.pooled, metric)) is not None]
    if pooled:
        xs, ys = zip(*pooled, strict=True)
        ax.plot(xs, ys, marker="o", markersize=5, linewidth=2.8, color=POOLED_COLOR, label="pooled", zorder=5)
    _style(ax, "model version (v0 = initial model; vN = produced by round N)", f"test {metric}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    _legend(ax, min(len(history.sites) + 1, 7))
    better = "higher is better" if metric == "accuracy" else "lower is better"
    return _plot("metric", f"Test {metric} per model version",
                f"Each site scores every version on its own test set ({better}); pooled = over the union of the "
                "test sets, computed from the sites' counts.", fig)


def _round_label(s: RoundSummary) -> str:
    return str(s.round) if s.new_version is not None else f"eval\nv{s.evaluated_version}"


def _bytes_unit(largest: int) -> tuple[str, float]:
    for unit, size in (("MiB", 1024.0 ** 2), ("KiB", 1024.0)):
        if largest >= size:
            return unit, size
    return "bytes", 1.0


def plot_bytes(history: History) -> Plot | None:
    """What each round cost on the wire, each way, as the orchestrator's connection counted it."""
    if not history.summaries:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    unit, size = _bytes_unit(max(max(s.bytes_down, s.bytes_up) for s in history.summaries))
    xs = range(len(history.summaries))
    width = 0.4
    ax.bar([x - width / 2 for x in xs], [s.bytes_down / size for s in history.summaries], width,
           label="down: orchestrator → sites (models, commands)", color="#1f77b4")
    ax.bar([x + width / 2 for x in xs], [s.bytes_up / size for s in history.summaries], width,
           label="up: sites → orchestrator (updates, reports)", color="#ff7f0e")
    ax.set_xticks(list(xs), [_round_label(s) for s in history.summaries])
    _style(ax, "round", f"{unit} per round")
    _legend(ax, 2)
    return _plot("bytes", "Bytes per round, each way",
                "MQTT payload bytes the orchestrator sent and received during each round (the final "
                "evaluation round only scores the last version).", fig)


def plot_round_time(history: History) -> Plot | None:
    """Where a round's wall time went: the slowest site's training, aggregation, and the rest."""
    timed = [s for s in history.summaries if "wall" in s.seconds]
    if not timed:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    xs = list(range(len(timed)))
    train = [s.seconds.get("train_max", 0.0) for s in timed]
    aggregate = [s.seconds.get("aggregate", 0.0) for s in timed]
    other = [max(s.seconds["wall"] - t - a, 0.0) for s, t, a in zip(timed, train, aggregate, strict=True)]
    ax.bar(xs, train, 0.6, label="training (slowest site)", color="#2ca02c")
    ax.bar(xs, aggregate, 0.6, bottom=train, label="aggregation (orchestrator)", color="#9467bd")
    ax.bar(xs, other, 0.6, bottom=[t + a for t, a in zip(train, aggregate, strict=True)],
           label="transfer, evaluation, waiting", color="#c7c7c7")
    ax.set_xticks(xs, [_round_label(s) for s in timed])
    _style(ax, "round", "seconds")
    _legend(ax, 3)
    return _plot("round_time", "Round time split",
                "Each bar is the round's wall time from announcement to close.", fig)


def plot_privacy(history: History) -> Plot | None:
    """The differential privacy spent up to each version, against its budget when there is one."""
    private = [v for v in history.versions if v.privacy is not None]
    if not private:
        return None
    fig = _figure()
    ax = fig.add_subplot()
    last = private[-1].privacy
    assert last is not None
    ax.plot([v.version for v in private], [v.privacy.epsilon for v in private if v.privacy], marker="o",
            color="#d62728", linewidth=2, label=f"ε spent ({last.level}-level, {last.mechanism})")
    if last.max_epsilon is not None:
        ax.axhline(last.max_epsilon, color="#555555", linestyle="--", linewidth=1.2,
                   label=f"budget ε = {last.max_epsilon:g}")
    _style(ax, "model version", f"ε at δ = {last.delta:g}")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylim(bottom=0)
    _legend(ax, 2)
    return _plot("privacy", "Privacy spent (ε) per version",
                "What releasing each version, and every one before it, has cost in (ε, δ)-differential privacy.",
                fig)


@dataclass(frozen=True)
class Lane:
    """One row of the timeline: spans (start, end, label) and points (time, label)."""

    name: str
    color: str
    spans: list[tuple[float, float, str]] = field(default_factory=list)
    points: list[tuple[float, str]] = field(default_factory=list)


def timeline_lanes(history: History) -> list[Lane]:
    """The rows of the timeline, top to bottom.

    Releases (a version rolled out to the sites) will be one more lane here once the registry
    records them: a ``Lane("releases", ...)`` of points, nothing else to change.
    """
    lanes = [Lane("versions", "#1f77b4", points=[(v.created_at, f"v{v.version}") for v in history.versions])]
    rounds = Lane("rounds", "#2ca02c", spans=[(s.sent_at - s.seconds.get("wall", 0.0), s.sent_at, _round_label(s))
                                              for s in history.summaries])
    if rounds.spans:
        lanes.append(rounds)
    if history.failed:
        lanes.append(Lane("failed attempts", "#d62728",
                          points=[(r.announced_at, f"r{r.round}") for r in history.failed]))
    return lanes


def _spaced(xs: Sequence[float], gap: float) -> set[int]:
    """Indices of the marks to label so that no two labels are closer than ``gap``; the last always is."""
    chosen: set[int] = set()
    last = float("inf")
    for i in sorted(range(len(xs)), key=lambda i: -xs[i]):
        if last - xs[i] >= gap:
            chosen.add(i)
            last = xs[i]
    return chosen


def plot_timeline(history: History) -> Plot:
    lanes = timeline_lanes(history)
    fig = _figure(height=1.5 + 0.6 * len(lanes))
    ax = fig.add_subplot()
    when = lambda t: date2num(datetime.fromtimestamp(t))  # noqa: E731 - local time, as the operator's clock
    every = [when(t) for lane in lanes for t in (*(a for a, _, _ in lane.spans), *(b for _, b, _ in lane.spans),
                                                 *(t for t, _ in lane.points))]
    gap = 0.035 * max(max(every) - min(every), 1e-9)  # a label is about this wide
    for y, lane in enumerate(reversed(lanes)):
        middles = [(when(a) + when(b)) / 2 for a, b, _ in lane.spans]
        for i in _spaced(middles, gap):
            ax.annotate(lane.spans[i][2].replace("\n", " "), (middles[i], y + 0.3), ha="center", va="bottom",
                        fontsize=8)
        ax.broken_barh([(when(a), max(when(b) - when(a), 1e-9)) for a, b, _ in lane.spans], (y - 0.25, 0.5),
                       color=lane.color, alpha=0.8, edgecolor="white", linewidth=0.5)
        xs = [when(t) for t, _ in lane.points]
        ax.plot(xs, [y] * len(xs), linestyle="none", marker="D" if lane.name == "versions" else "X",
                color=lane.color, markersize=6)
        for i in _spaced(xs, gap):
            ax.annotate(lane.points[i][1], (xs[i], y + 0.18), ha="center", va="bottom", fontsize=8)
    ax.set_yticks(range(len(lanes)), [lane.name for lane in reversed(lanes)])
    ax.set_ylim(-0.6, len(lanes) - 0.15)
    locator = AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(ConciseDateFormatter(locator))
    _style(ax, f"time ({time.strftime('%Z')})", "")
    ax.grid(False, axis="y")
    return _plot("timeline", "Timeline",
                "When each version was created and each round ran (a round spans announcement to close); labels "
                "are thinned where marks crowd.", fig)


PLOTTERS: tuple[Callable[[History], Plot | None], ...] = (plot_metric, plot_bytes, plot_round_time, plot_privacy,
                                                          plot_timeline)
NO_SCORES = "No site has scored a version yet, so there is no metric to plot."
NO_SUMMARIES = ("No round summary is stored, so there are no bytes or round-time plots: a fedmq older than "
                "`fedmq report` published them on MQTT only.")


# --- page ------------------------------------------------------------------------------------


def _fmt(x: float | None, digits: int = 3) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _local(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


def _size(n: int) -> str:
    unit, size = _bytes_unit(n)
    return f"{n / size:.1f} {unit}" if size > 1 else f"{n} bytes"


def summary_line(history: History) -> str:
    """One sentence: rounds run, final version, how it scored."""
    latest = history.versions[-1]
    trained = sum(1 for v in history.versions if v.round is not None)
    parts = [f"{trained} training round{'s' if trained != 1 else ''}"]
    if history.failed:
        parts.append(f"{len(history.failed)} failed attempt{'s' if len(history.failed) != 1 else ''} retried")
    parts.append(f"final version v{latest.version}")
    scored = next((v for v in reversed(history.versions) if v.pooled is not None), None)
    metric = history.metric
    if scored is not None and metric is not None:
        of = "" if scored is latest else f" (v{scored.version}, the latest scored)"
        parts.append(f"pooled test {metric} {_fmt(_value(scored.pooled, metric))}{of} over "
                     f"{scored.pooled.num_examples} examples from {len(scored.evaluations)} sites")
    else:
        parts.append("no version scored yet")
    parts.append(f"strategy {latest.strategy.get('name', '?')}")
    if latest.privacy is not None:
        parts.append(f"ε = {latest.privacy.epsilon:.3g} at δ = {latest.privacy.delta:g}")
    return " · ".join(parts)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], numeric: set[int]) -> str:
    head = "".join(f"<th{' class=num' if i in numeric else ''}>{html.escape(h)}</th>" for i, h in enumerate(headers))
    body = "".join("<tr>" + "".join(f"<td{' class=num' if i in numeric else ''}>{html.escape(c)}</td>"
                                    for i, c in enumerate(row)) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def versions_table(history: History) -> str:
    metric = history.metric or "metric"
    private = any(v.privacy is not None for v in history.versions)
    headers = ["version", "parent", "round", "created", "contributors (samples)", f"pooled {metric}"]
    headers += ["ε"] if private else []
    headers += ["sha256", "note"]
    rows = []
    for v in history.versions:
        row = [f"v{v.version}", f"v{v.parent}" if v.parent is not None else "–", str(v.round or "–"),
               _local(v.created_at), ", ".join(f"{s} ({n})" for s, n in sorted(v.contributors.items())) or "–",
               _fmt(_value(v.pooled, metric)) if history.metric else "–"]
        row += [f"{v.privacy.epsilon:.3g}" if v.privacy else "–"] if private else []
        rows.append(row + [v.sha256[:12], v.note])
    return _table(headers, rows, numeric={5, 6} if private else {5})


def rounds_table(history: History) -> str:
    metric = history.metric or "loss"
    rows = [[_round_label(s).replace("\n", " "), f"v{s.evaluated_version}",
             f"v{s.new_version}" if s.new_version is not None else "–", _fmt(_value(s.pooled, metric)),
             _size(s.bytes_down), _size(s.bytes_up), _fmt(s.seconds.get("wall"), 2)] for s in history.summaries]
    return _table(["round", "evaluated", "produced", f"pooled {metric}", "bytes down", "bytes up", "wall s"], rows,
                  numeric={3, 4, 5, 6})


STYLE = """
body{margin:0;background:#f4f5f7;color:#1d232b;font:15px/1.5 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif}
main{max-width:1140px;margin:0 auto;padding:28px 24px 48px}
h1{font-size:26px;margin:0 0 4px}h1 code{font-size:24px;color:#0b5cad}
h2{font-size:18px;margin:0 0 10px}
.summary{font-size:16px;margin:6px 0 2px}.meta{color:#66707c;font-size:13px;margin:0 0 20px}
section{background:#fff;border:1px solid #e1e4e8;border-radius:8px;padding:18px 20px;margin:16px 0}
img{display:block;max-width:100%;height:auto}
.caption,.note{color:#55606c;font-size:13px;margin:8px 0 0}
table{border-collapse:collapse;width:100%;font-size:13px}
th,td{text-align:left;padding:5px 8px;border-bottom:1px solid #eceef1;vertical-align:top}
th{background:#f7f8fa;font-weight:600}.num{text-align:right;font-variant-numeric:tabular-nums}
"""


def render_html(history: History, plots: Sequence[Plot]) -> str:
    """The page: title, summary, one section per plot, then the versions and rounds tables."""
    name = history.federation or history.state_dir.name
    sections = []
    for plot in plots:
        sections.append(f'<section id="{plot.name}"><h2>{html.escape(plot.title)}</h2>'
                        f'<img src="{plot.data_uri()}" alt="{html.escape(plot.title)}" '
                        f'width="{plot.size[0]}" height="{plot.size[1]}">'
                        f'<p class="caption">{html.escape(plot.caption)}</p></section>')
    notes = ([NO_SCORES] if history.metric is None else []) + ([NO_SUMMARIES] if not history.summaries else [])
    notes += history.unreadable
    sections.append('<section id="versions"><h2>Versions</h2>' + versions_table(history) +
                    '<p class="caption">Lineage: each version was produced from its parent by the round named; '
                    "contributors are the sites whose updates it aggregates.</p></section>")
    if history.summaries:
        sections.append('<section id="rounds"><h2>Rounds</h2>' + rounds_table(history) + "</section>")
    if notes:
        sections.append('<section id="notes"><h2>Notes</h2>' +
                        "".join(f'<p class="note">{html.escape(n)}</p>' for n in notes) + "</section>")
    return (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>fedmq report: {html.escape(name)}</title><style>{STYLE}</style></head>\n<body><main>"
            f"<h1>Federation <code>{html.escape(name)}</code></h1>"
            f'<p class="summary">{html.escape(summary_line(history))}</p>'
            f'<p class="meta">From {html.escape(str(history.state_dir.resolve()))} · generated '
            f"{html.escape(_local(time.time()))} by fedmq report</p>\n" + "\n".join(sections) +
            "\n</main></body></html>\n")


@dataclass(frozen=True)
class ReportResult:
    out: Path
    plots: list[str]  # the plot names, in page order
    png_files: list[Path]


def write_report(state_dir: Path, out: Path, png_dir: Path | None = None,
                 progress: Callable[[str], None] = lambda line: None) -> ReportResult:
    """Read the state dir, draw every plot the data allows, write the page (and the PNGs)."""
    progress(f"reading {orchestrator_state_dir(state_dir) / DB_NAME}")
    history = load_history(state_dir)
    progress(f"federation {history.federation or '(name not recorded)'}: {len(history.versions)} versions, "
             f"{len(history.summaries)} round summaries, {len(history.failed)} failed attempts")
    plots = []
    for plotter in PLOTTERS:
        plot = plotter(history)
        if plot is not None:
            progress(f"plotted {plot.title.lower()}")
            plots.append(plot)
    written = []
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render_html(history, plots), encoding="utf-8")
        if png_dir is not None:
            png_dir.mkdir(parents=True, exist_ok=True)
            for plot in plots:
                path = png_dir / f"{plot.name}.png"
                path.write_bytes(plot.png)
                written.append(path)
    except OSError as e:
        raise ReportError(f"cannot write the report: {e}; choose a writable --out / --png-dir") from None
    progress(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB, {len(plots)} plots)"
             + (f" and {len(written)} PNG files to {png_dir}" if png_dir is not None else ""))
    return ReportResult(out, [p.name for p in plots], written)
