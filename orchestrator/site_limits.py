"""What one site may cost the orchestrator: a message rate, and a count of what was refused.

A site that authenticated can still misbehave (a bug, a compromised hospital server). Its
messages are charged to a token bucket of its own, so a flood costs the orchestrator a dict
lookup per message instead of a parse; and every refusal is counted per site and reason,
logged with the site, and published on the orchestrator's retained status for operators.
Logging is rate-limited per (site, reason): a flood must not turn into a flood of log lines,
so after ``LOG_BURST`` lines within ``LOG_INTERVAL`` seconds further ones are summed into the
next line.
"""

from __future__ import annotations

import logging
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)

LOG_INTERVAL = 10.0
LOG_BURST = 5


@dataclass
class _Bucket:
    tokens: float
    updated: float


class SiteRateLimits:
    """One token bucket per site: ``rate`` messages per second on average, ``burst`` at once."""

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def allow(self, site: str) -> bool:
        """Take one token from the site's bucket; False (the message is to be dropped) when it is empty."""
        now = self.clock()
        bucket = self._buckets.get(site)
        if bucket is None:
            bucket = self._buckets[site] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if bucket.tokens < 1.0:
            return False
        bucket.tokens -= 1.0
        return True


@dataclass
class _LogWindow:
    start: float
    lines: int = 0  # logged since start
    unlogged: int = 0  # refusals counted but not logged since the last line


class Refusals:
    """Refused messages per site and reason, each logged with the site (repeats summed, see module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._counts: defaultdict[str, Counter[str]] = defaultdict(Counter)
        self._windows: dict[tuple[str, str], _LogWindow] = {}
        self.changes = 0  # bumped on every refusal, so the publisher knows when to republish

    def refuse(self, site: str, reason: str, detail: str) -> None:
        """Count a refusal and log it, unless LOG_BURST lines for this (site, reason) were logged recently."""
        self._counts[site][reason] += 1
        self.changes += 1
        now = self.clock()
        window = self._windows.setdefault((site, reason), _LogWindow(now))
        if now - window.start >= LOG_INTERVAL:
            window.start, window.lines = now, 0
        if window.lines >= LOG_BURST:
            window.unlogged += 1
            return
        window.lines += 1
        unlogged, window.unlogged = window.unlogged, 0
        log.warning("refused from site %s (%s, %d so far%s): %s", site, reason, self._counts[site][reason],
                    f", {unlogged} not logged" if unlogged else "", detail)

    def count(self, site: str, reason: str | None = None) -> int:
        counts = self._counts.get(site, Counter())
        return counts[reason] if reason is not None else sum(counts.values())

    @property
    def total(self) -> int:
        return sum(sum(c.values()) for c in self._counts.values())

    def snapshot(self) -> dict[str, dict[str, int]]:
        """{site: {reason: count}}, for the orchestrator's retained status."""
        return {site: dict(sorted(c.items())) for site, c in sorted(self._counts.items()) if c}
