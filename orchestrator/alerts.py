"""Alerts: the rules of the monitoring contract (docs/monitoring.md) over what the orchestrator sees.

The service feeds an ``AlertMonitor`` the sites' statuses, round announcements, failures and
completions, round summaries and privacy records; the monitor keeps the set of active alerts
and hands it to ``publish`` (retained on ``orch/all/alerts``) whenever the set changes. An
alert is cleared (simply absent from the next set) once its condition is resolved. Each
alert raised and cleared is logged once. No MQTT here: the rules are plain logic over a clock,
so they are tested without a broker.

Time: offline durations are measured on the orchestrator's clock from when it received a
site's last status, never from the site's own timestamps, so a hospital clock that is off
cannot raise or hide an alert.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from shared.config import AlertSettings
from shared.protocol import STALE_HEARTBEATS, Alert, AlertKind, EvalMetrics, PrivacySpent, RoundSummary, SiteStatus

log = logging.getLogger(__name__)

"""A site whose status is older than this many of its heartbeat periods counts as offline."""


@dataclass
class _Seen:
    """A site's latest status and when (orchestrator clock) it arrived."""

    status: SiteStatus
    received_at: float
    offline_since: float | None  # orchestrator clock; None while the site is up


def _score(metrics: EvalMetrics) -> tuple[str, float]:
    """The metric a drop is judged on, and its value with higher = better (accuracy, else negative loss)."""
    if metrics.accuracy is not None:
        return "accuracy", metrics.accuracy
    return "loss", -metrics.loss


class AlertMonitor:
    """Keeps the federation's active alerts; ``publish`` receives the whole set each time it changes."""

    def __init__(self, settings: AlertSettings, publish: Callable[[list[Alert]], None],
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self._publish = publish
        self._clock = clock
        self._active: dict[str, Alert] = {}
        self._sites: dict[str, _Seen] = {}
        self._scores: dict[str, tuple[int, float]] = {}  # site -> (evaluated version, score) last seen
        self._drop_reference: dict[str, float] = {}  # site -> score before its active drop

    @property
    def active(self) -> list[Alert]:
        """The active alerts, oldest first."""
        return sorted(self._active.values(), key=lambda a: (a.since, a.id))

    def start(self) -> None:
        """Publish the current set once (empty at start-up): it replaces what an earlier run left retained."""
        self._publish(self.active)

    # inputs -----------------------------------------------------------------------------------
    def site_status(self, site: str, status: SiteStatus) -> None:
        """A site's retained status arrived: errors, disk and sample-level privacy now, offline on ``tick``."""
        now = self._clock()
        before = self._sites.get(site)
        offline_since = None
        if status.state == "offline":
            offline_since = before.offline_since if before and before.offline_since is not None else now
        self._sites[site] = _Seen(status, now, offline_since)
        changed = self._site_error(site, status)
        if status.resources is not None:
            changed |= self._disk(site, status.resources.disk_free_bytes)
        if status.privacy is not None:
            changed |= self._privacy(site, status.privacy)
        changed |= self._offline(site, now)
        self._flush(changed)

    def tick(self) -> None:
        """Re-check the time-based rule (offline or silent sites); the service calls it every loop."""
        now = self._clock()
        changed = False
        for site in self._sites:
            changed |= self._offline(site, now)
        self._flush(changed)

    def round_announced(self, round_no: int, attempt: int) -> None:
        """An attempt beyond the first is a retry: a warning until the round completes."""
        if attempt > 1:
            self._flush(self._raise(f"round_retried:{round_no}", "round_retried", "warning", None,
                                    f"round {round_no} is being retried (attempt {attempt})",
                                    "nothing if this attempt completes; if attempts keep failing, read the "
                                    "round_failed alert and the sites it names"))

    def round_failed(self, round_no: int, attempt: int, detail: str) -> None:
        self._flush(self._raise(f"round_failed:{round_no}", "round_failed", "critical", None,
                                f"round {round_no} attempt {attempt} failed: {detail}",
                                "read the reason; fix the sites it names (their status and agent log) or the "
                                "round settings; the orchestrator retries up to max_attempts"))

    def round_summary(self, summary: RoundSummary) -> None:
        """A round completed: its failure and retry alerts clear; sites' metrics and client-level ε are judged."""
        changed = self._clear(f"round_failed:{summary.round}") | self._clear(f"round_retried:{summary.round}")
        for site, metrics in summary.site_metrics.items():
            changed |= self._metric(site, summary.evaluated_version, metrics)
        if summary.privacy is not None:
            changed |= self._privacy(None, summary.privacy)
        self._flush(changed)

    def client_privacy(self, spent: PrivacySpent | None) -> None:
        """The federation's client-level DP record (the registry's latest version), e.g. at start-up."""
        if spent is not None:
            self._flush(self._privacy(None, spent))

    # rules ------------------------------------------------------------------------------------
    def _offline(self, site: str, now: float) -> bool:
        seen = self._sites[site]
        status = seen.status
        since = seen.offline_since
        if since is None and status.heartbeat_at is not None and status.heartbeat_seconds:
            silent_after = seen.received_at + STALE_HEARTBEATS * status.heartbeat_seconds
            if now > silent_after:
                since = seen.received_at  # its last sign of life
        alert_id = f"site_offline:{site}"
        if since is None or now - since <= self.settings.offline_after_seconds:
            return self._clear(alert_id)
        how = "offline" if status.state == "offline" else "silent (no status)"
        return self._raise(alert_id, "site_offline", "critical", site,
                           f"site {site} has been {how} for {now - since:.0f} s (threshold "
                           f"{self.settings.offline_after_seconds:g} s)",
                           f"check that the agent at {site} is running and reaches the broker (on its host: fedmq "
                           "agent status, and the agent's log)", since=since, refresh=False)

    def _site_error(self, site: str, status: SiteStatus) -> bool:
        alert_id = f"site_error:{site}"
        if status.state != "error":
            return self._clear(alert_id)
        error = status.last_error
        if error is not None:
            message, action = f"site {site} is in error ({error.code}): {error.message}", error.action
        else:  # a schema-1 agent says only its detail
            message, action = f"site {site} is in error: {status.detail}", "read the site's agent log"
        return self._raise(alert_id, "site_error", "critical", site, message, action)

    def _disk(self, site: str, free: int) -> bool:
        alert_id = f"disk_low:{site}"
        if free >= self.settings.disk_low_bytes:
            return self._clear(alert_id)
        return self._raise(alert_id, "disk_low", "warning", site,
                           f"site {site} has {free / 1e9:.2f} GB free in its state directory (threshold "
                           f"{self.settings.disk_low_bytes / 1e9:.2f} GB)",
                           f"free disk space for the agent's state directory at {site}; a full disk stops it "
                           "storing models and updates")

    def _privacy(self, site: str | None, spent: PrivacySpent) -> bool:
        alert_id = f"privacy_budget:{site or 'federation'}"
        ceiling = spent.max_epsilon
        if ceiling is None or spent.epsilon <= self.settings.privacy_share * ceiling:
            return self._clear(alert_id)
        who = f"site {site}'s sample-level" if site else "the federation's client-level"
        if site:
            action = (f"{site} trains no more once ε reaches its ceiling; its hospital may raise "
                      "dp_sgd_max_epsilon (a weaker guarantee for its patients)")
        else:
            action = ("the federation stops before a round that would pass the ceiling: plan the remaining "
                      "rounds, or raise the strategy's max_epsilon (a weaker guarantee)")
        return self._raise(alert_id, "privacy_budget", "critical" if spent.epsilon >= ceiling else "warning", site,
                           f"{who} privacy budget: ε {spent.epsilon:.3g} of {ceiling:.3g} spent "
                           f"({spent.epsilon / ceiling:.0%}, threshold {self.settings.privacy_share:.0%})", action)

    def _metric(self, site: str, version: int, metrics: EvalMetrics) -> bool:
        """A drop of more than ``metric_drop`` from the previous evaluated version; clears once recovered."""
        name, score = _score(metrics)
        previous = self._scores.get(site)
        if previous is not None and version <= previous[0]:
            return False  # the same version scored again (a resumed round): not a new comparison
        self._scores[site] = (version, score)
        alert_id = f"metric_drop:{site}"
        reference = self._drop_reference.get(site)
        if reference is not None:
            if reference - score <= self.settings.metric_drop:
                del self._drop_reference[site]
                return self._clear(alert_id)
            return False
        if previous is None or previous[1] - score <= self.settings.metric_drop:
            return False
        self._drop_reference[site] = previous[1]
        shown = (previous[1], score) if name == "accuracy" else (-previous[1], -score)
        return self._raise(alert_id, "metric_drop", "warning", site,
                           f"site {site}'s {name} went from {shown[0]:.3f} (v{previous[0]}) to {shown[1]:.3f} "
                           f"(v{version}), more than the {self.settings.metric_drop:g} allowed",
                           "compare the site's data summary (schema hash, label counts) with earlier rounds and the "
                           "round's training settings; `fedmq models` can release an earlier version")

    # the set ------------------------------------------------------------------------------------
    def _raise(self, alert_id: str, kind: AlertKind, severity: str, site: str | None, message: str, action: str,
               *, since: float | None = None, refresh: bool = True) -> bool:
        """Make the alert active (or update its text); returns whether the published set changes.

        ``refresh=False``: an alert whose message only counts time is not re-published for that.
        """
        old = self._active.get(alert_id)
        if old is not None and (not refresh or (old.message, old.action, old.severity) == (message, action,
                                                                                             severity)):
            return False
        alert = Alert(id=alert_id, kind=kind, severity=severity, site=site, message=message, action=action,
                      since=old.since if old else (since if since is not None else self._clock()))
        self._active[alert_id] = alert
        if old is None:
            log.warning("alert raised (%s): %s; %s", severity, message, action)
        return True

    def _clear(self, alert_id: str) -> bool:
        alert = self._active.pop(alert_id, None)
        if alert is None:
            return False
        log.info("alert cleared: %s (active since %s)", alert.id,
                 time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(alert.since)))
        return True

    def _flush(self, changed: bool) -> None:
        if changed:
            self._publish(self.active)
