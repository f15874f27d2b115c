"""The MQTT topic tree of one federation.

Layout (``fedmq/v1/{federation}/...``), designed so a broker ACL can enforce it:

* ``orch/all/...``          orchestrator -> every site (round command, model chunks, status)
* ``orch/to/{site}/...``    orchestrator -> one site (acks, resend requests, resent chunks)
* ``site/{site}/...``       everything one site publishes (status, reports, update chunks)

Only the orchestrator writes under ``orch/``; a site writes only under its own ``site/{id}``
and reads only ``orch/all`` and its own ``orch/to/{id}``. No site needs another's topics.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

ROOT = "fedmq/v1"
NAME_PATTERN = r"[a-z0-9][a-z0-9_-]{0,62}"
_NAME_RE = re.compile(NAME_PATTERN)


def check_name(kind: str, value: str) -> str:
    """Federation and site ids become topic levels and certificate CNs: keep them plain."""
    if not _NAME_RE.fullmatch(value):
        raise ValueError(f"{kind} {value!r} is not valid: use 1-63 characters of a-z, 0-9, '_' or '-', "
                         "starting with a letter or digit")
    return value


@dataclass(frozen=True)
class Topics:
    """Topic names for one federation; every method returns a concrete topic or a filter."""

    federation: str

    def __post_init__(self) -> None:
        check_name("federation id", self.federation)

    @property
    def base(self) -> str:
        return f"{ROOT}/{self.federation}"

    # orchestrator -> all sites
    @property
    def round(self) -> str:
        return f"{self.base}/orch/all/round"

    @property
    def orchestrator_status(self) -> str:
        return f"{self.base}/orch/all/status"

    @property
    def model(self) -> str:
        return f"{self.base}/orch/all/model"

    @property
    def round_summary(self) -> str:
        return f"{self.base}/orch/all/summary"

    @property
    def alerts(self) -> str:
        """The orchestrator's active alerts (retained ``AlertState``)."""
        return f"{self.base}/orch/all/alerts"

    @property
    def secagg(self) -> str:
        """Secure-aggregation rosters and unmasking requests (not retained: they belong to one round)."""
        return f"{self.base}/orch/all/secagg"

    def broadcast_chunk(self, blob_id: str, index: int) -> str:
        return f"{self.base}/orch/all/blob/{blob_id}/{index}"

    @property
    def broadcast_chunks(self) -> str:
        return f"{self.base}/orch/all/blob/+/+"

    # orchestrator -> one site
    def to_site(self, site: str, name: str) -> str:
        return f"{self.base}/orch/to/{site}/{name}"

    def to_site_chunk(self, site: str, blob_id: str, index: int) -> str:
        return f"{self.base}/orch/to/{site}/blob/{blob_id}/{index}"

    def to_site_all(self, site: str) -> str:
        return f"{self.base}/orch/to/{site}/#"

    # site -> orchestrator
    def site(self, site: str, name: str) -> str:
        return f"{self.base}/site/{site}/{name}"

    def site_chunk(self, site: str, blob_id: str, index: int) -> str:
        return f"{self.base}/site/{site}/blob/{blob_id}/{index}"

    @property
    def all_sites(self) -> str:
        return f"{self.base}/site/#"

    @property
    def everything(self) -> str:
        return f"{self.base}/#"

    def site_of(self, topic: str) -> str | None:
        """The site id a ``site/{id}/...`` topic belongs to (the broker ACL guarantees the sender)."""
        prefix = f"{self.base}/site/"
        if not topic.startswith(prefix):
            return None
        return topic[len(prefix):].split("/", 1)[0] or None

    @staticmethod
    def is_chunk(topic: str) -> bool:
        return "/blob/" in topic
