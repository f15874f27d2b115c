"""Control messages exchanged over MQTT, as pydantic models.

Every message carries the protocol version, a unique id, the federation and the sender in
its JSON payload (not in MQTT 5 properties), so the protocol works on MQTT 3.1.1 brokers
too. Binary payloads never travel inside these messages: they are described by a
``BlobManifest`` and sent as chunks (see ``shared.blobs``).
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import time
import uuid
from typing import Annotated, Literal, Union

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PlainSerializer, TypeAdapter, ValidationError,
                      field_validator, model_validator)

from shared.codec import CompressionSettings
from shared.topics import NAME_PATTERN

PROTOCOL_VERSION = 1
MAX_CONTROL_MESSAGE_BYTES = 1024 * 1024
# pydantic patterns match anywhere in the string (a search), so they must be anchored.
SHA256_PATTERN = r"^[0-9a-f]{64}$"
DEFAULT_LOCAL_STEPS = 100
ID_PATTERN = rf"^{NAME_PATTERN}$"


class ProtocolError(ValueError):
    """A payload that is not a valid message of this protocol; the text says why."""


def _from_base64(value: object) -> object:
    """JSON carries binary fields as base64 text; Python callers pass the bytes themselves."""
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except binascii.Error as e:
            raise ValueError(f"not valid base64: {e}") from None
    return value


Binary = Annotated[bytes, BeforeValidator(_from_base64),
                   PlainSerializer(lambda b: base64.b64encode(b).decode("ascii"), return_type=str)]
"""Short binary values (keys, signatures, sealed shares) inside a control message, base64 on the wire."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BlobManifest(_Strict):
    """What a receiver needs to reassemble and verify a chunked binary payload."""

    blob_id: str = Field(pattern=SHA256_PATTERN, description="sha256 of the whole payload")
    size: int = Field(ge=0)
    chunk_size: int = Field(gt=0)
    chunk_sha256: list[Annotated[str, Field(pattern=SHA256_PATTERN)]]
    media_type: str = Field(max_length=100)

    @model_validator(mode="after")
    def _consistent(self) -> "BlobManifest":
        expected = max(1, math.ceil(self.size / self.chunk_size))
        if len(self.chunk_sha256) != expected:
            raise ValueError(f"manifest lists {len(self.chunk_sha256)} chunks but size {self.size} "
                             f"at chunk size {self.chunk_size} needs {expected}")
        return self

    @property
    def count(self) -> int:
        return len(self.chunk_sha256)


class TaskSpec(_Strict):
    """The learning task: which CSV columns are features (in order) and which is the label."""

    features: list[str] = Field(min_length=1)
    label: str
    standardize: bool = True
    input_shape: list[int] | None = Field(default=None, description="per-example shape the model takes, e.g. "
                                          "[1, 8, 8] for images stored as 64 columns")


class SecureAggregationRound(_Strict):
    """How one round's updates are summed under secure aggregation (``shared.privacy.secagg``).

    Sites are numbered 1..n in the order of the round's ``selected`` list (Shamir x-coordinates
    and mask signs). Each site sends ``(w * update[idx], w)`` in fixed point, where ``idx`` is the
    round's shared index set (all positions when ``index_fraction`` is None) and ``w`` its weight:
    ``num_samples / sample_total`` (the counts the sites announced in their status), or 1 with
    ``weighting="uniform"`` (client-level DP, where a site's influence must not grow with a
    number it reports, or when some site announced no count). The orchestrator learns
    only the sums and divides.
    """

    threshold: int = Field(ge=2, description="Shamir threshold t: sites needed to unmask; a strict majority")
    bound: float = Field(ge=1.0, le=1e6, allow_inf_nan=False,
                         description="fixed-point range: coordinates beyond ±bound saturate")
    index_fraction: float | None = Field(default=None, gt=0, le=1,
                                         description="share of each update's positions sent, the same for all")
    index_seed: str = Field(pattern=SHA256_PATTERN, description="seeds the round's shared index set")
    error_feedback: bool = Field(default=True, description="with an index set: keep what was not sent and add it "
                                 "to the next round's update")
    dense_tensors: list[str] = Field(default_factory=list, max_length=100_000,
                                     description="tensors sent at every position even with an index set: "
                                     "BatchNorm running statistics, which error feedback must not defer")
    weighting: Literal["samples", "uniform"] = "samples"
    sample_total: int = Field(default=1, ge=1, description="the selected sites' announced sample counts, summed")
    phase_timeout: float = Field(default=60.0, gt=0, description="seconds each protocol phase waits for sites")


class TrainingConfig(_Strict):
    """Local training settings, chosen by the orchestrator and sent with every round."""

    local_steps: int | None = Field(default=None, gt=0, description="default 100 when no budget is given")
    local_epochs: int | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, gt=0)
    learning_rate: float = Field(default=0.01, gt=0)
    optimizer: Literal["sgd", "adam"] = "sgd"
    momentum: float = Field(default=0.0, ge=0, lt=1)
    weight_decay: float = Field(default=0.0, ge=0)
    loss: Literal["bce", "bce_logits", "cross_entropy", "mse"] = "bce"
    seed: int = 0
    proximal_mu: float = Field(default=0.0, ge=0)
    local_parameters: list[str] = Field(default_factory=list,
                                        description="initializers each site keeps for itself (FedBN)")
    compression: CompressionSettings = CompressionSettings()
    finetune_steps: int = Field(default=0, ge=0, description="local adaptation before the personalized evaluation")
    dp_clip_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                       description="client-level DP (DP-FedAvg): clip the whole update to this L2 "
                                       "norm before sending it")
    dp_noise_share_std: float = Field(default=0.0, ge=0, allow_inf_nan=False,
                                      description="distributed DP noise: std of the Gaussian share each site adds "
                                      "to its clipped update")

    secure_aggregation: SecureAggregationRound | None = Field(
        default=None, description="sum the updates under secure aggregation: the orchestrator sees only the sum")

    @model_validator(mode="after")
    def _noise_needs_clipping(self) -> "TrainingConfig":
        """Noise on an unclipped update protects nothing: its scale has no bound to be calibrated to."""
        if self.dp_noise_share_std > 0 and self.dp_clip_norm is None:
            raise ValueError("dp_noise_share_std needs dp_clip_norm: noise is calibrated to the clip bound")
        return self

    @model_validator(mode="before")
    @classmethod
    def _one_budget(cls, data: object) -> object:
        """Exactly one budget; with neither given, 100 local steps (so partial settings stay valid)."""
        if isinstance(data, dict):
            steps, epochs = data.get("local_steps"), data.get("local_epochs")
            if steps is not None and epochs is not None:
                raise ValueError("set only one of local_steps and local_epochs")
            if steps is None and epochs is None:
                data = {**data, "local_steps": DEFAULT_LOCAL_STEPS}
        return data


class EvalMetrics(_Strict):
    """A model's quality on one site's test set; counts let the orchestrator pool exactly."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    num_examples: int = Field(ge=0)
    loss: float
    accuracy: float | None = None
    correct: int | None = None


class PrivacySpent(_Strict):
    """(epsilon, delta) spent so far by one differentially private mechanism, and its ceiling.

    ``level`` says what one unit of privacy is: a whole site (client-level DP-FedAvg, one
    ``step`` per aggregated round) or one record of a site's data (sample-level DP-SGD, one
    ``step`` per optimizer step). ``noise_multiplier`` and ``sampling_rate`` are those of the
    latest step; when they never changed, they let anyone recompute ``epsilon`` from ``steps``
    and ``delta`` with an RDP accountant (otherwise the full history is in the orchestrator's
    strategy state or the agent's ledger).
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    level: Literal["client", "sample"]
    mechanism: str = Field(max_length=100, description="e.g. 'dp_fedavg/central', 'dp_fedavg/distributed', "
                           "'dp_sgd'")
    epsilon: float = Field(ge=0)
    delta: float = Field(gt=0, lt=1)
    steps: int = Field(ge=0)
    noise_multiplier: float = Field(gt=0)
    sampling_rate: float = Field(gt=0, le=1)
    clip_norm: float = Field(gt=0)
    max_epsilon: float | None = Field(default=None, gt=0)


class Message(_Strict):
    protocol: Literal[1] = PROTOCOL_VERSION
    msg_id: str = Field(default_factory=lambda: uuid.uuid4().hex, min_length=8, max_length=64)
    federation: str = Field(pattern=ID_PATTERN)
    sender: str = Field(pattern=ID_PATTERN)
    sent_at: float = Field(default_factory=time.time)

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode()


class ModelDelta(_Strict):
    """The exact changes from a base version: what a site that holds the base downloads."""

    base_version: int = Field(ge=0)
    base_sha256: str = Field(pattern=SHA256_PATTERN)
    blob: BlobManifest


class RoundCommand(Message):
    """Announces a round: which model version, who takes part, how to train, until when.

    ``model_sha256`` names the ONNX file itself (as in the registry). ``model`` is the whole
    file zstd-compressed, sent to sites without a usable base (broadcast when there is no
    delta, else on request); ``model_delta`` the exact changes from the previous version.
    """

    type: Literal["round"] = "round"
    round: int = Field(ge=1)
    attempt: int = Field(ge=1)
    round_id: str = Field(max_length=100)
    kind: Literal["train", "evaluate"] = "train"
    model_version: int = Field(ge=0)
    model_sha256: str = Field(pattern=SHA256_PATTERN)
    model: BlobManifest
    model_delta: ModelDelta | None = None
    selected: list[Annotated[str, Field(pattern=ID_PATTERN)]]
    training: TrainingConfig
    task: TaskSpec
    deadline: float


class UpdateReport(Message):
    """A site's answer to a round: its update (as a manifest) and how the base model scored."""

    type: Literal["update"] = "update"
    round_id: str = Field(max_length=100)
    round: int = Field(ge=1)
    base_version: int = Field(ge=0)
    num_samples: int = Field(ge=0)
    update: BlobManifest | None = None
    train_metrics: dict[str, float] = Field(default_factory=dict)
    evaluation: EvalMetrics | None = None
    personalized: EvalMetrics | None = Field(default=None, description="the site's own variant: its local "
                                             "parameters (FedBN) and/or local fine-tuning")
    train_seconds: float = 0.0
    dp_unclipped: bool | None = Field(default=None, description="with client-level DP: whether the update's "
                                      "norm was within dp_clip_norm before clipping (adaptive clipping counts "
                                      "these)")
    privacy: PrivacySpent | None = Field(default=None, description="the site's own sample-level DP-SGD "
                                         "spending, after this round")

    @field_validator("train_metrics")
    @classmethod
    def _finite(cls, v: dict[str, float]) -> dict[str, float]:
        bad = [k for k, x in v.items() if not math.isfinite(x)]
        if bad:
            raise ValueError(f"train metrics {bad} are not finite")
        return v


class UpdateAck(Message):
    """The orchestrator has the update stored (or refuses it, with a reason); the site can forget it."""

    type: Literal["ack"] = "ack"
    round_id: str
    blob_id: str | None = None
    accepted: bool
    reason: str | None = None


class ChunkRequest(Message):
    """Asks the other side to send (again) chunks of a blob it offered; empty ``indices`` = all."""

    type: Literal["chunk_request"] = "chunk_request"
    blob_id: str = Field(pattern=SHA256_PATTERN)
    indices: list[Annotated[int, Field(ge=0)]] = Field(default_factory=list, max_length=100_000)


class SecAggKeys(_Strict):
    """A site's signed public keys for one secure-aggregation round, with the certificate vouching for them."""

    site: str = Field(pattern=ID_PATTERN)
    encryption_public: Binary = Field(min_length=32, max_length=32)
    mask_public: Binary = Field(min_length=32, max_length=32)
    signature: Binary = Field(min_length=8, max_length=256)
    certificate: str = Field(max_length=16384, description="PEM, issued by the federation CA with CN = site")


class SecAggAdvert(Message):
    """Step 0, site -> orchestrator: this site's keys for the round (after it trained)."""

    type: Literal["secagg_advert"] = "secagg_advert"
    round_id: str = Field(max_length=100)
    keys: SecAggKeys


class SecAggRoster(Message):
    """Step 0 answer, orchestrator -> all sites: every verified advertisement (the set U1)."""

    type: Literal["secagg_roster"] = "secagg_roster"
    round_id: str = Field(max_length=100)
    keys: list[SecAggKeys] = Field(max_length=10_000)


class SealedShares(_Strict):
    """Shamir shares for one peer, encrypted to it (AES-GCM); the orchestrator only relays them."""

    peer: str = Field(pattern=ID_PATTERN, description="the recipient (site -> orchestrator) or the sender "
                      "(orchestrator -> site)")
    nonce: Binary = Field(min_length=12, max_length=12)
    ciphertext: Binary = Field(max_length=4096)


class SecAggShares(Message):
    """Step 1: a site's sealed shares for each peer; relayed back grouped by recipient (U2)."""

    type: Literal["secagg_shares"] = "secagg_shares"
    round_id: str = Field(max_length=100)
    shares: list[SealedShares] = Field(max_length=10_000)


class SecAggUnmask(Message):
    """Step 3 request, orchestrator -> all: the sites whose masked input arrived (U3)."""

    type: Literal["secagg_unmask"] = "secagg_unmask"
    round_id: str = Field(max_length=100)
    survivors: list[Annotated[str, Field(pattern=ID_PATTERN)]] = Field(max_length=10_000)


class SecAggReveal(Message):
    """Step 3 answer: shares of the survivors' self-mask seeds and of the dropped sites' mask keys."""

    type: Literal["secagg_reveal"] = "secagg_reveal"
    round_id: str = Field(max_length=100)
    self_seed_shares: dict[str, Binary] = Field(max_length=10_000)
    mask_key_shares: dict[str, Binary] = Field(max_length=10_000)


SiteState = Literal["online", "idle", "downloading", "training", "uploading", "evaluating", "error", "offline"]
MONITORING_SCHEMA_VERSION = 2
"""Schema of the monitoring messages (docs/monitoring.md); absent in a message means 1."""

ERROR_CODES: dict[str, str] = {
    "data.invalid": "fix the site's CSV files (columns, types, label values) to match the federation's task; "
                    "the agent reads them again at the next round",
    "data.unreadable": "check that the agent can read its data files (path, permissions, encoding)",
    "training.failed": "check the round's training settings against this site's data; the agent's log has details",
    "model.unusable": "the model of the round cannot run here: check the agent's version and the federation's "
                      "architecture",
    "model.download_failed": "check the site's connection to the broker; the agent fetches the model again at "
                             "the next round",
    "update.refused": "read the reason; the orchestrator's log says why it refused the update",
    "privacy.floor": "the round asked for less privacy than this site accepts: the federation operator must "
                     "raise clipping/noise, or the hospital must change its floor",
    "privacy.budget_spent": "this site's DP-SGD budget is spent: it trains no more unless the hospital raises "
                            "dp_sgd_max_epsilon",
    "secagg.failed": "check this site's federation certificate and key and the CA/CRL the agent uses",
    "agent.internal": "an unexpected error in the agent: send its log (with the traceback) to the fedmq "
                      "maintainers; the agent goes on with the next round",
}
"""Stable error codes a site reports in ``SiteStatus.last_error``, each with what to do next by default."""


class _Monitored(BaseModel):
    """Monitoring schemas ignore fields they do not know: a reader must keep working with a newer sender."""

    model_config = ConfigDict(extra="ignore", frozen=True)


class RoundProgress(_Monitored):
    """How far a site is in the current round's phase: steps done of planned, bytes done of bytes to move."""

    round_id: str = Field(max_length=100)
    round: int = Field(ge=1)
    rounds_total: int | None = Field(default=None, ge=1)
    phase: Literal["downloading", "evaluating", "training", "uploading"]
    steps_done: int = Field(default=0, ge=0)
    steps_total: int = Field(default=0, ge=0)
    bytes_done: int = Field(default=0, ge=0)
    bytes_total: int = Field(default=0, ge=0)


class ErrorInfo(_Monitored):
    """The last thing that went wrong at a site: a stable code, what is wrong (no local paths), what to do."""

    code: str = Field(max_length=100, description="a key of ERROR_CODES (newer senders may add codes)")
    message: str = Field(max_length=2000)
    action: str = Field(max_length=2000)
    round_id: str | None = Field(default=None, max_length=100)
    at: float = Field(default_factory=time.time)

    @classmethod
    def of(cls, code: str, message: str, round_id: str | None = None) -> "ErrorInfo":
        """An error of a known code, with that code's default action."""
        return cls(code=code, message=message, action=ERROR_CODES[code], round_id=round_id)


class DataSummary(_Monitored):
    """What a site's data looks like, in aggregate only: sizes, a hash of the column schema, label counts."""

    rows_train: int = Field(ge=0)
    rows_test: int | None = Field(default=None, ge=0)
    schema_hash: str = Field(max_length=64, description="sha256 hex of the ordered column names and types, "
                             "first 16 characters")
    label_counts: dict[str, int] = Field(default_factory=dict, max_length=10_000)


class AgentResources(_Monitored):
    """The agent process's footprint: CPU since the last sample, memory, and free disk in its state dir."""

    cpu_percent: float = Field(ge=0)
    rss_bytes: int = Field(ge=0)
    disk_free_bytes: int = Field(ge=0)


STALE_HEARTBEATS = 3  # a status not re-published for this many heartbeat periods: the agent is gone
SiteHealth = Literal["up", "error", "offline"]


class SiteStatus(Message):
    """Retained state of an agent (docs/monitoring.md); its last will publishes the same with ``state='offline'``.

    Fields are left out of the JSON while empty (``None``): the wire stays small and a reader
    gets the same defaults.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["status"] = "status"
    state: SiteState
    agent_version: str
    model_version: int | None = Field(default=None, description="same as active_model_version, for schema-1 "
                                      "readers")
    round_id: str | None = None
    num_samples: int | None = None
    detail: str = ""
    privacy: PrivacySpent | None = Field(default=None, description="the site's sample-level DP-SGD spending so far")
    schema_version: int = MONITORING_SCHEMA_VERSION
    connected_at: float | None = Field(default=None, description="when this agent process connected (epoch s)")
    heartbeat_at: float | None = Field(default=None, description="when a live agent produced this status; None in "
                                       "the last will, whose time is unknown")
    heartbeat_seconds: float | None = Field(default=None, gt=0, description="the status is re-published at least "
                                            "this often")
    active_model_version: int | None = None
    candidate_model_version: int | None = Field(default=None, description="a version being fetched or evaluated, "
                                                "not yet active")
    progress: RoundProgress | None = None
    last_error: ErrorInfo | None = None
    data: DataSummary | None = None
    resources: AgentResources | None = None

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def stale(self, now: float) -> bool:
        """A live status whose agent stopped re-publishing it (a schema-1 agent sends no heartbeat: never stale)."""
        return (self.state != "offline" and self.heartbeat_at is not None and self.heartbeat_seconds is not None
                and now - self.heartbeat_at > STALE_HEARTBEATS * self.heartbeat_seconds)

    def health(self, now: float) -> SiteHealth:
        """The monitoring contract's classification: offline (last will or stale), error, or up."""
        if self.state == "offline" or self.stale(now):
            return "offline"
        return "error" if self.state == "error" else "up"


class OrchestratorStatus(Message):
    """The orchestrator's retained state; monitors read it.

    Fields added later are left out of the JSON while empty, so readers of an earlier release
    parse every status that has nothing new to say; and this release ignores fields it does not
    know, so later additions will not break it.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["orch_status"] = "orch_status"
    state: Literal["starting", "waiting", "collecting", "aggregating", "evaluating", "finished", "offline"]
    round: int | None = None
    attempt: int | None = None
    round_id: str | None = None
    model_version: int | None = None
    selected: list[str] = Field(default_factory=list)
    reported: list[str] = Field(default_factory=list)
    deadline: float | None = None
    detail: str = ""
    refusals: dict[str, dict[str, int]] = Field(default_factory=dict, description="messages refused since the "
                                                "orchestrator started: {site: {reason: count}}")
    schema_version: int = MONITORING_SCHEMA_VERSION
    rounds_total: int | None = Field(default=None, description="rounds the federation plans: 'round 4 of 20'")
    kind: Literal["train", "evaluate"] | None = Field(default=None, description="of the open round")
    started_at: float | None = Field(default=None, description="when the open round was announced")

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True,
                                    exclude={"refusals"} if not self.refusals else None).encode()


class ModelPublished(Message):
    """A new global version exists; retained so late joiners know the latest."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["model"] = "model"
    version: int
    sha256: str = Field(pattern=SHA256_PATTERN)
    parent: int | None
    round: int | None
    contributors: dict[str, int] = Field(default_factory=dict)


class RoundSummary(Message):
    """What operators watch: how the evaluated version scored, per site and pooled, and what it cost."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["round_summary"] = "round_summary"
    round: int
    evaluated_version: int
    new_version: int | None
    site_metrics: dict[str, EvalMetrics]
    pooled: EvalMetrics | None
    personalized_metrics: dict[str, EvalMetrics] = Field(default_factory=dict)
    personalized_pooled: EvalMetrics | None = None
    bytes_down: int
    bytes_up: int
    seconds: dict[str, float] = Field(default_factory=dict)
    privacy: PrivacySpent | None = Field(default=None, description="client-level DP spent by the federation up "
                                         "to and including the new version")


AlertKind = Literal["site_offline", "round_failed", "round_retried", "metric_drop", "privacy_budget", "disk_low",
                    "site_error"]


class Alert(_Monitored):
    """One active alert: what is wrong, where, since when, and what to do (rules: orchestrator/alerts.py)."""

    id: str = Field(max_length=200, description="stable while the alert lasts, e.g. 'site_offline:va'")
    kind: AlertKind
    severity: Literal["warning", "critical"]
    site: str | None = None
    message: str = Field(max_length=2000)
    action: str = Field(max_length=2000)
    since: float


class AlertState(Message):
    """The currently active alerts, retained; an alert that cleared is simply absent."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    type: Literal["alerts"] = "alerts"
    alerts: list[Alert] = Field(default_factory=list, max_length=10_000)


AnyMessage = Annotated[
    Union[RoundCommand, UpdateReport, UpdateAck, ChunkRequest, SiteStatus, OrchestratorStatus, ModelPublished,
          RoundSummary, AlertState, SecAggAdvert, SecAggRoster, SecAggShares, SecAggUnmask, SecAggReveal],
    Field(discriminator="type"),
]
_ADAPTER: TypeAdapter[AnyMessage] = TypeAdapter(AnyMessage)
MESSAGE_TYPES = ("round", "update", "ack", "chunk_request", "status", "orch_status", "model", "round_summary",
                 "alerts", "secagg_advert", "secagg_roster", "secagg_shares", "secagg_unmask", "secagg_reveal")

_VERSIONED_MONITORING_TYPES = ("status", "orch_status")


def _reject_constant(name: str) -> float:
    """NaN and Infinity are not JSON (pydantic never writes them); a metric carrying one is refused."""
    raise ProtocolError(f"{name} is not a valid JSON number; metrics must be finite")


def parse_message(payload: bytes, *, max_bytes: int = MAX_CONTROL_MESSAGE_BYTES) -> Message:
    """Decode and validate a control message; any problem becomes a ``ProtocolError`` saying what."""
    if len(payload) > max_bytes:
        raise ProtocolError(f"control message of {len(payload)} bytes exceeds the {max_bytes}-byte limit")
    try:
        raw = json.loads(payload, parse_constant=_reject_constant)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ProtocolError(f"malformed JSON: {e}") from None
    except RecursionError:
        raise ProtocolError("malformed JSON: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ProtocolError("a message must be a JSON object")
    if raw.get("protocol") != PROTOCOL_VERSION:
        raise ProtocolError(f"protocol version {raw.get('protocol')!r} is not supported (this side speaks "
                            f"{PROTOCOL_VERSION}); upgrade the older side")
    if raw.get("type") not in MESSAGE_TYPES:
        raise ProtocolError(f"unknown message type {raw.get('type')!r}; known: {', '.join(MESSAGE_TYPES)}")
    if raw["type"] in _VERSIONED_MONITORING_TYPES:
        raw.setdefault("schema_version", 1)  # written before schema versions existed
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors()[:5])
        raise ProtocolError(f"invalid {raw['type']} message: {problems}") from None
