"""Settings of the orchestrator and the agent: environment (``FEDMQ_*``) and an optional TOML file.

Precedence, highest first: explicit arguments (CLI flags), environment variables, the TOML
file named by ``--config`` or ``FEDMQ_CONFIG``, defaults. Nested settings use ``__`` in
environment names, e.g. ``FEDMQ_TRAINING__LEARNING_RATE=0.01``.
"""

from __future__ import annotations

import contextvars
import os
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict,
                               TomlConfigSettingsSource)

from shared.blobs import DEFAULT_CHUNK_SIZE
from shared.protocol import TrainingConfig
from shared.topics import check_name

_CONFIG_FILE: contextvars.ContextVar[Path | None] = contextvars.ContextVar("fedmq_config_file", default=None)


class CommonSettings(BaseSettings):
    """What both sides need: where the broker is, how to authenticate, which federation."""

    model_config = SettingsConfigDict(env_prefix="FEDMQ_", env_nested_delimiter="__", extra="forbid")

    federation: str = "demo"
    broker_url: str = "mqtt://127.0.0.1:1883"
    mqtt_version: Literal["5", "3.1.1"] = "5"
    username: str | None = None
    password: SecretStr | None = None
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_crl: Path | None = Field(default=None, description="federation CRL: a revoked broker certificate is refused "
                                 "(default crl.pem beside tls_ca, if present)")
    keepalive: int = Field(default=30, ge=5)
    reconnect_min_delay: float = Field(default=1.0, gt=0, le=3600, allow_inf_nan=False,
                                       description="seconds before the first retry of an unreachable broker")
    reconnect_max_delay: float = Field(default=30.0, gt=0, le=3600, allow_inf_nan=False,
                                       description="cap of the doubling retry delay (jittered: half to all of it)")
    chunk_size: int = Field(default=DEFAULT_CHUNK_SIZE, ge=1024, le=64 * 1024 * 1024,
                            description="data bytes per chunk of a model or update; each chunk's MQTT packet is up to "
                            "512 bytes larger and must fit the broker's packet limit (checked at connect on MQTT 5)")
    max_blob_bytes: int = Field(default=512 * 1024 * 1024, gt=0)
    state_dir: Path = Path(".fedmq")
    log_level: str = "INFO"
    inbox_max_messages: int = Field(default=10_000, ge=1, description="messages received but not yet processed "
                                    "that the transport holds; beyond it new ones are dropped and counted")
    inbox_max_bytes: int = Field(default=256 * 1024 * 1024, ge=1, description="payload bytes received but not yet "
                                 "processed that the transport holds; beyond it new messages are dropped and counted")

    @field_validator("federation")
    @classmethod
    def _federation_name(cls, v: str) -> str:
        return check_name("federation id", v)

    @classmethod
    def settings_customise_sources(cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
                                   env_settings: PydanticBaseSettingsSource,
                                   dotenv_settings: PydanticBaseSettingsSource,
                                   file_secret_settings: PydanticBaseSettingsSource,
                                   ) -> tuple[PydanticBaseSettingsSource, ...]:
        path = _CONFIG_FILE.get() or (Path(os.environ["FEDMQ_CONFIG"]) if os.environ.get("FEDMQ_CONFIG") else None)
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if path is not None:
            if not path.is_file():
                raise FileNotFoundError(f"config file {path} does not exist; fix --config / FEDMQ_CONFIG")
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)


class SecureAggregationSettings(BaseModel):
    """Secure aggregation (Bonawitz et al. 2017): the orchestrator learns only the sum of the updates.

    Every site needs its federation certificate and key (``fedmq pki issue-site``; the agent's
    TLS identity by default) and the orchestrator the federation CA certificate: each site signs
    its round keys, and every party checks the signatures against certificates issued by the CA
    and not revoked by its CRL (``identity_crl``, by default the ``crl.pem`` beside the CA).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = False
    threshold: int | None = Field(default=None, ge=2, description="sites needed to unmask the sum; default and "
                                  "minimum: a strict majority of the sites selected for the round")
    bound: float = Field(default=4.0, ge=1.0, le=1e6, allow_inf_nan=False,
                         description="fixed-point range of an update coordinate; beyond it values saturate")
    index_fraction: float | None = Field(default=None, gt=0, le=1,
                                         description="send only this share of positions, the same for every site")
    error_feedback: bool = Field(default=True, description="with index_fraction: carry unsent values to later rounds "
                                 "(kept in each agent's state directory)")
    phase_timeout: float = Field(default=60.0, gt=0, description="seconds each protocol phase waits for sites")
    identity_ca: Path | None = Field(default=None, description="federation CA certificate (default tls_ca)")
    identity_crl: Path | None = Field(default=None, description="federation CRL: keys vouched for by a revoked "
                                      "certificate are refused (default crl.pem beside identity_ca, if present)")


class AlertSettings(BaseModel):
    """Thresholds of the orchestrator's alerts (orchestrator/alerts.py, docs/monitoring.md)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    offline_after_seconds: float = Field(default=60.0, ge=0, allow_inf_nan=False,
                                         description="a site offline (or silent) this long raises site_offline")
    metric_drop: float = Field(default=0.05, ge=0, allow_inf_nan=False,
                               description="a site's accuracy falling (or loss rising) by more than this between "
                               "consecutive evaluated versions raises metric_drop")
    privacy_share: float = Field(default=0.8, gt=0, le=1, allow_inf_nan=False,
                                 description="epsilon spent above this share of its ceiling raises privacy_budget")
    disk_low_bytes: int = Field(default=1024 ** 3, ge=0, description="a site's free disk in its state dir below "
                                "this raises disk_low")


class OrchestratorSettings(CommonSettings):
    """The federation's plan: how many rounds, who takes part, how to train and aggregate."""

    rounds: int = Field(default=15, ge=1)
    min_sites: int = Field(default=2, ge=1, description="sites that must be online before a round starts")
    quorum: int | None = Field(default=None, ge=1,
                               description="reports needed to aggregate once the deadline passed (default min_sites)")
    sample_fraction: float | None = Field(default=None, gt=0, le=1)
    sample_count: int | None = Field(default=None, ge=1)
    sampling_seed: int = 0
    round_timeout: float = Field(default=600.0, gt=0, description="seconds from announcement to deadline")
    max_attempts: int = Field(default=20, ge=1, description="attempts per round before the orchestrator gives up")
    initial_model: Path | None = None
    architecture: str = "logreg"
    num_outputs: int = Field(default=1, ge=1)
    hidden: list[int] = Field(default_factory=lambda: [64])
    task_features: list[str] = Field(default_factory=list)
    task_label: str = "label"
    task_input_shape: list[int] | None = None
    standardize: bool = True
    training: TrainingConfig = TrainingConfig()
    strategy: dict[str, Any] = Field(default_factory=lambda: {"name": "fedavg"})
    fedbn: bool = Field(default=False, description="keep normalization layers local to each site (FedBN)")
    final_evaluation: bool = True
    exit_when_done: bool = False
    secure_aggregation: SecureAggregationSettings = SecureAggregationSettings()
    max_update_abs: float = Field(default=1e6, gt=0, allow_inf_nan=False,
                                  description="largest magnitude of any value of a site's decoded update; a "
                                  "larger one is refused so one site cannot wreck the global model")
    upload_stall_seconds: float = Field(default=5.0, gt=0, description="seconds without a new chunk before the "
                                        "missing chunks of an upload are asked for again")
    upload_rerequests: int = Field(default=5, ge=0, description="times a stalled upload is asked for again before "
                                   "it is dropped (the site's resend starts it over)")
    site_messages_per_second: float = Field(default=200.0, gt=0, allow_inf_nan=False,
                                            description="sustained messages per second one site may send (chunks "
                                            "of its upload in flight excepted); beyond it they are dropped")
    site_message_burst: int = Field(default=2000, ge=1, description="messages one site may send at once "
                                    "before site_messages_per_second applies")
    alerts: AlertSettings = AlertSettings()

    @model_validator(mode="after")
    def _one_sampling_rule(self) -> "OrchestratorSettings":
        if self.sample_fraction is not None and self.sample_count is not None:
            raise ValueError("set at most one of sample_fraction and sample_count")
        if self.secure_aggregation.enabled and self.identity_ca is None:
            raise ValueError("secure aggregation checks every site's certificate: set "
                             "secure_aggregation.identity_ca (FEDMQ_SECURE_AGGREGATION__IDENTITY_CA) or tls_ca "
                             "to the federation's ca.crt")
        return self

    @property
    def identity_ca(self) -> Path | None:
        """The CA certificate site identities chain to."""
        return self.secure_aggregation.identity_ca or self.tls_ca

    @property
    def effective_quorum(self) -> int:
        return self.quorum or self.min_sites


class AgentSettings(CommonSettings):
    """One hospital's agent: its identity, its local data, and limits the orchestrator cannot change.

    Sample-level differential privacy (DP-SGD) is such a limit: it protects each patient record
    of this site, so the hospital sets it here and no round command can weaken it. Setting
    ``dp_sgd_noise_multiplier`` and ``dp_sgd_max_epsilon`` turns it on: every local optimizer
    step clips each record's gradient to ``dp_sgd_clip_norm`` and adds Gaussian noise of std
    ``noise_multiplier * clip_norm`` on Poisson-sampled batches (expected size = the round's
    ``batch_size``), an RDP accountant in the state directory counts the steps, and the agent
    refuses a round whose steps would take epsilon (at ``dp_sgd_delta``) above the budget.
    The noise multiplier is given, not derived: the number of rounds the federation will ask
    for is not the site's to know. To plan for R rounds of S steps at batch size B on N
    records, use ``noise_multiplier_for(max_epsilon, delta, B / N, R * S)`` from
    ``shared.privacy.accountant``.

    The client-level floor is another: ``dp_max_clip_norm`` and ``dp_min_noise_share_std``
    are the least client-level DP this site accepts for an update that leaves it. A train
    round that clips at a larger norm (or not at all), or asks for a smaller distributed noise
    share (central noise is added by the orchestrator, which the site cannot check, so it
    counts as none), is refused: the agent reports the error for that round and sends nothing.
    The noise floor needs the clip ceiling: the Gaussian mechanism's guarantee depends on
    noise std / clip norm, so a noise floor alone would let the orchestrator raise the clip
    norm until the noise no longer matters. Together they guarantee this site's own share a
    noise multiplier of at least ``dp_min_noise_share_std / dp_max_clip_norm``.
    """

    site_id: str
    data_train: Path
    data_test: Path | None = None
    label_column: str | None = Field(default=None, description="local name of the task's label column")
    heartbeat_seconds: float = Field(default=10.0, gt=0, description="the retained status is re-published at "
                                     "least this often (monitors call a site offline after 3 silent periods)")
    progress_interval: float = Field(default=1.0, gt=0, allow_inf_nan=False,
                                     description="least seconds between two progress statuses during a round")
    ack_timeout: float = Field(default=20.0, gt=0, description="seconds to wait for the orchestrator's ack")
    dp_sgd_noise_multiplier: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                                  description="DP-SGD noise std as a multiple of the clip norm")
    dp_sgd_max_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                             description="the site's total sample-level budget; no training "
                                             "beyond it")
    dp_sgd_delta: float = Field(default=1e-5, gt=0, lt=1, description="keep it well below 1 / training rows")
    dp_sgd_clip_norm: float = Field(default=1.0, gt=0, allow_inf_nan=False,
                                    description="per-record gradient L2 bound")
    identity_cert: Path | None = Field(default=None, description="this site's federation certificate, to sign "
                                       "secure-aggregation keys with (default tls_cert)")
    identity_key: Path | None = Field(default=None, description="its private key (default tls_key)")
    identity_ca: Path | None = Field(default=None, description="the federation CA that peers' certificates must "
                                     "chain to (default tls_ca)")
    identity_crl: Path | None = Field(default=None, description="the federation CRL: peers (and this site) with a "
                                      "revoked certificate are refused (default crl.pem beside identity_ca, if "
                                      "present)")
    dp_max_clip_norm: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                           description="client-level DP floor: refuse train rounds that do not clip "
                                           "the update to at most this L2 norm")
    dp_min_noise_share_std: float | None = Field(default=None, gt=0, allow_inf_nan=False,
                                                 description="client-level DP floor: refuse train rounds whose "
                                                 "distributed noise share std is smaller (needs dp_max_clip_norm)")
    torch_threads: int = Field(default=1, ge=0, description="CPU threads for local training and scoring "
                                      "(torch and onnxruntime); 0 = torch's default (one per core). 1 "
                                      "by default: the small models federated here gain at most ~20% from a second, "
                                      "and on a server whose other core is busy it made training 2.6x slower "
                                      "(BENCHMARKS.md, agent threads)")

    @field_validator("site_id")
    @classmethod
    def _site_name(cls, v: str) -> str:
        return check_name("site id", v)

    @model_validator(mode="after")
    def _dp_sgd_complete(self) -> "AgentSettings":
        """Noise without a ceiling proves nothing in the end, and a ceiling without noise can never be met."""
        if (self.dp_sgd_noise_multiplier is None) != (self.dp_sgd_max_epsilon is None):
            raise ValueError("DP-SGD needs both dp_sgd_noise_multiplier and dp_sgd_max_epsilon "
                             "(FEDMQ_DP_SGD_NOISE_MULTIPLIER, FEDMQ_DP_SGD_MAX_EPSILON), or neither")
        return self

    @model_validator(mode="after")
    def _noise_floor_bounded(self) -> "AgentSettings":
        """A noise floor without a clip ceiling means nothing: a larger clip norm drowns any fixed noise."""
        if self.dp_min_noise_share_std is not None and self.dp_max_clip_norm is None:
            raise ValueError("dp_min_noise_share_std needs dp_max_clip_norm (FEDMQ_DP_MAX_CLIP_NORM): the noise "
                             "protects only relative to the clip norm, which the orchestrator could otherwise raise")
        return self

    @property
    def dp_sgd(self) -> bool:
        """Whether this site trains with sample-level differential privacy."""
        return self.dp_sgd_noise_multiplier is not None


S = TypeVar("S", bound=CommonSettings)


def load_settings(cls: type[S], config_file: Path | None = None, **overrides: Any) -> S:
    """Build settings from arguments, environment and an optional TOML file (see module docstring)."""
    token = _CONFIG_FILE.set(config_file)
    try:
        return cls(**{k: v for k, v in overrides.items() if v is not None})
    finally:
        _CONFIG_FILE.reset(token)
