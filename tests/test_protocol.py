"""Control messages: every type round-trips, and bad payloads become a telling ProtocolError."""

from __future__ import annotations

import base64
import json

from typing import Literal

import pytest
from pydantic import ConfigDict, ValidationError

from shared.blobs import make_manifest
from shared.codec import CompressionSettings
from shared.protocol import (
    DEFAULT_LOCAL_STEPS,
    ERROR_CODES,
    MAX_CONTROL_MESSAGE_BYTES,
    MESSAGE_TYPES,
    AgentResources,
    Alert,
    AlertState,
    DataSummary,
    ErrorInfo,
    BlobManifest,
    ChunkRequest,
    EvalMetrics,
    Message,
    ModelDelta,
    ModelPublished,
    OrchestratorStatus,
    ProtocolError,
    RoundCommand,
    RoundProgress,
    RoundSummary,
    SealedShares,
    SecAggAdvert,
    SecAggKeys,
    SecAggReveal,
    SecAggRoster,
    SecAggShares,
    SecAggUnmask,
    SiteStatus,
    TaskSpec,
    TrainingConfig,
    UpdateAck,
    UpdateReport,
    parse_message,
)

FED = "fed-protocol"
MANIFEST = make_manifest(b"x" * 2500, "application/onnx", chunk_size=1024)


KEYS = SecAggKeys(site="site-a", encryption_public=b"e" * 32, mask_public=b"m" * 32, signature=b"s" * 71,
                  certificate="-----BEGIN CERTIFICATE-----\n...")


def _examples() -> dict[str, Message]:
    metrics = EvalMetrics(num_examples=10, loss=0.5, accuracy=0.7, correct=7)
    return {
        "round": RoundCommand(federation=FED, sender="orchestrator", round=3, attempt=1, round_id="r3a1",
                              kind="train", model_version=2, model_sha256="c" * 64, model=MANIFEST,
                              model_delta=ModelDelta(base_version=1, base_sha256="d" * 64, blob=MANIFEST),
                              selected=["site-a", "site_b"],
                              training=TrainingConfig(local_epochs=2, optimizer="adam", local_parameters=["bn.w"],
                                                      compression=CompressionSettings(dense_dtype="float16",
                                                                                      zstd_level=5)),
                              task=TaskSpec(features=["age", "sex"], label="label"), deadline=1e9),
        "update": UpdateReport(federation=FED, sender="site-a", round_id="r3a1", round=3, base_version=2,
                               num_samples=120, update=MANIFEST, train_metrics={"loss_last": 0.25},
                               evaluation=metrics, train_seconds=1.5),
        "ack": UpdateAck(federation=FED, sender="orchestrator", round_id="r3a1", blob_id=MANIFEST.blob_id,
                         accepted=False, reason="late"),
        "chunk_request": ChunkRequest(federation=FED, sender="site-a", blob_id=MANIFEST.blob_id, indices=[0, 2]),
        "status": SiteStatus(federation=FED, sender="site-a", state="training", agent_version="1.0",
                             model_version=2, round_id="r3a1", num_samples=120, detail="round 3",
                             connected_at=1e9, heartbeat_at=1e9 + 5, heartbeat_seconds=10.0,
                             active_model_version=2, candidate_model_version=3,
                             progress=RoundProgress(round_id="r3a1", round=3, rounds_total=20, phase="training",
                                                    steps_done=40, steps_total=100),
                             last_error=ErrorInfo.of("data.invalid", "label 'maybe' is not 0 or 1", round_id="r2a1"),
                             data=DataSummary(rows_train=120, rows_test=30, schema_hash="0123456789abcdef",
                                              label_counts={"0": 70, "1": 50}),
                             resources=AgentResources(cpu_percent=12.5, rss_bytes=200_000_000,
                                                      disk_free_bytes=10**10)),
        "orch_status": OrchestratorStatus(federation=FED, sender="orchestrator", state="collecting", round=3,
                                          attempt=1, round_id="r3a1", model_version=2, selected=["site-a"],
                                          reported=[], deadline=1e9, rounds_total=20, kind="train",
                                          started_at=1e9 - 10),
        "model": ModelPublished(federation=FED, sender="orchestrator", version=3, sha256=MANIFEST.blob_id,
                                parent=2, round=3, contributors={"site-a": 120}),
        "round_summary": RoundSummary(federation=FED, sender="orchestrator", round=3, evaluated_version=2,
                                      new_version=3, site_metrics={"site-a": metrics}, pooled=metrics,
                                      bytes_down=1000, bytes_up=2000, seconds={"train": 1.5}),
        "alerts": AlertState(federation=FED, sender="orchestrator", alerts=[
            Alert(id="site_offline:site-a", kind="site_offline", severity="critical", site="site-a",
                  message="site-a offline for 75 s", action="check the agent at site-a", since=1e9)]),
        "secagg_advert": SecAggAdvert(federation=FED, sender="site-a", round_id="r3a1", keys=KEYS),
        "secagg_roster": SecAggRoster(federation=FED, sender="orchestrator", round_id="r3a1", keys=[KEYS]),
        "secagg_shares": SecAggShares(federation=FED, sender="site-a", round_id="r3a1",
                                      shares=[SealedShares(peer="site_b", nonce=b"n" * 12, ciphertext=b"c" * 180)]),
        "secagg_unmask": SecAggUnmask(federation=FED, sender="orchestrator", round_id="r3a1", survivors=["site-a"]),
        "secagg_reveal": SecAggReveal(federation=FED, sender="site-a", round_id="r3a1",
                                      self_seed_shares={"site-a": b"s" * 74}, mask_key_shares={"site_b": b"m" * 74}),
    }


def _update_dict(**changes: object) -> dict:
    raw = json.loads(_examples()["update"].to_bytes())
    raw.update(changes)
    return raw


def _parse_error(raw: object) -> str:
    payload = raw if isinstance(raw, bytes) else json.dumps(raw).encode()
    with pytest.raises(ProtocolError) as info:
        parse_message(payload)
    return str(info.value)


def test_examples_cover_every_message_type() -> None:
    assert set(_examples()) == set(MESSAGE_TYPES)


@pytest.mark.parametrize("kind", MESSAGE_TYPES)
def test_every_message_type_round_trips(kind: str) -> None:
    message = _examples()[kind]
    parsed = parse_message(message.to_bytes())
    assert type(parsed) is type(message)
    assert parsed == message
    assert parsed.type == kind


def test_malformed_json() -> None:
    assert "malformed JSON" in _parse_error(b'{"protocol": 1,')
    assert "malformed JSON" in _parse_error(b"\xff\xfe not utf-8")


def test_deeply_nested_json_is_a_protocol_error_not_a_crash() -> None:
    assert "malformed JSON" in _parse_error(b"[" * 200_000)


@pytest.mark.parametrize("payload", [b"[1, 2]", b'"round"', b"42", b"null"])
def test_non_object(payload: bytes) -> None:
    assert "must be a JSON object" in _parse_error(payload)


@pytest.mark.parametrize("version", [0, 2, None, "1"])
def test_wrong_protocol_version(version: object) -> None:
    raw = _update_dict(protocol=version)
    if version is None:
        del raw["protocol"]
    message = _parse_error(raw)
    assert "protocol version" in message and "not supported" in message
    assert repr(version) in message


def test_unknown_type_lists_known_types() -> None:
    message = _parse_error(_update_dict(type="gossip"))
    assert "unknown message type 'gossip'" in message
    assert "round_summary" in message


def test_missing_field_is_named() -> None:
    raw = _update_dict()
    del raw["num_samples"]
    message = _parse_error(raw)
    assert message.startswith("invalid update message")
    assert "num_samples" in message and "required" in message.lower()


def test_extra_field_is_named() -> None:
    message = _parse_error(_update_dict(surprise=1))
    assert "surprise" in message and "not permitted" in message


@pytest.mark.parametrize("sender", ["Site-A", "-site", "site a", "", "x" * 64, "site/a"])
def test_bad_site_id_pattern(sender: str) -> None:
    message = _parse_error(_update_dict(sender=sender))
    assert "sender" in message and "pattern" in message


def test_bad_selected_site_id_in_round_command() -> None:
    raw = json.loads(_examples()["round"].to_bytes())
    raw["selected"] = ["ok", "NOT OK"]
    message = _parse_error(raw)
    assert "selected" in message and "pattern" in message


def test_oversized_payload() -> None:
    payload = _examples()["update"].to_bytes()
    with pytest.raises(ProtocolError, match=r"exceeds the 100-byte limit"):
        parse_message(payload, max_bytes=100)
    big = b" " * (MAX_CONTROL_MESSAGE_BYTES + 1)
    with pytest.raises(ProtocolError, match=r"exceeds"):
        parse_message(big)


@pytest.mark.parametrize("constant", ["NaN", "Infinity", "-Infinity"])
def test_nan_train_metrics_rejected(constant: str) -> None:
    payload = json.dumps(_update_dict(train_metrics={"loss": 1.0})).replace("1.0", constant).encode()
    message = _parse_error(payload)
    assert constant in message and "finite" in message


def test_nan_evaluation_loss_rejected() -> None:
    raw = _update_dict()
    raw["evaluation"]["loss"] = 12345.5
    payload = json.dumps(raw).replace("12345.5", "NaN").encode()
    assert "NaN" in _parse_error(payload)


def test_nan_train_metric_cannot_be_built() -> None:
    with pytest.raises(ValidationError, match="not finite"):
        UpdateReport(federation=FED, sender="site-a", round_id="r", round=1, base_version=0, num_samples=1,
                     train_metrics={"loss": float("nan")})


@pytest.mark.parametrize("blob_id", ["not-a-hash", "a" * 64 + "/x", "../" + "a" * 64, "A" * 64])
def test_bad_blob_id_is_located(blob_id: str) -> None:
    raw = _update_dict()
    raw["update"]["blob_id"] = blob_id
    message = _parse_error(raw)
    assert "update.blob_id" in message and "pattern" in message


def test_bad_chunk_request_blob_id() -> None:
    raw = json.loads(_examples()["chunk_request"].to_bytes())
    raw["blob_id"] = "b" * 64 + "+"
    assert "blob_id" in _parse_error(raw)


def test_training_config_budget_is_steps_or_epochs() -> None:
    assert TrainingConfig(local_steps=5).local_epochs is None
    assert TrainingConfig(local_epochs=1).local_steps is None
    default = TrainingConfig()
    assert (default.local_steps, default.local_epochs) == (DEFAULT_LOCAL_STEPS, None)
    with pytest.raises(ValidationError, match="set only one of local_steps and local_epochs"):
        TrainingConfig(local_steps=5, local_epochs=1)


def test_round_command_with_two_budgets_is_a_protocol_error() -> None:
    raw = json.loads(_examples()["round"].to_bytes())
    raw["training"]["local_steps"] = 10
    message = _parse_error(raw)
    assert message.startswith("invalid round message") and "set only one of local_steps and local_epochs" in message


def test_manifest_chunk_count_consistency() -> None:
    sha = "a" * 64
    assert BlobManifest(blob_id=sha, size=2048, chunk_size=1024, chunk_sha256=[sha, sha], media_type="x").count == 2
    assert BlobManifest(blob_id=sha, size=2049, chunk_size=1024, chunk_sha256=[sha] * 3, media_type="x").count == 3
    # an empty blob is one empty chunk
    assert BlobManifest(blob_id=sha, size=0, chunk_size=1024, chunk_sha256=[sha], media_type="x").count == 1
    with pytest.raises(ValidationError, match="lists 2 chunks but size 2049 at chunk size 1024 needs 3"):
        BlobManifest(blob_id=sha, size=2049, chunk_size=1024, chunk_sha256=[sha, sha], media_type="x")
    with pytest.raises(ValidationError, match="needs 1"):
        BlobManifest(blob_id=sha, size=0, chunk_size=1024, chunk_sha256=[], media_type="x")


def test_inconsistent_manifest_inside_a_message() -> None:
    raw = _update_dict()
    raw["update"]["chunk_sha256"] = raw["update"]["chunk_sha256"][:1]
    message = _parse_error(raw)
    assert "lists 1 chunks" in message and "needs 3" in message


def test_secure_aggregation_messages_carry_binary_fields_as_base64():
    keys = SecAggKeys(site="a", encryption_public=bytes(range(32)), mask_public=b"\xff" * 32, signature=b"s" * 70,
                      certificate="-----BEGIN CERTIFICATE-----")
    advert = SecAggAdvert(federation="demo", sender="a", round_id="demo-r1-a1", keys=keys)
    raw = advert.to_bytes()
    assert base64.b64encode(bytes(range(32))) in raw
    assert parse_message(raw) == advert
    with pytest.raises(ProtocolError, match="not valid base64"):
        parse_message(raw.replace(base64.b64encode(b"\xff" * 32), b"!!not-base64!!"))
    with pytest.raises(ProtocolError, match="at most 32 bytes"):
        parse_message(raw.replace(base64.b64encode(b"\xff" * 32), base64.b64encode(b"\xff" * 33)))
    reveal = SecAggReveal(federation="demo", sender="a", round_id="r", self_seed_shares={"b": b"\x00\x01"},
                          mask_key_shares={})
    assert parse_message(reveal.to_bytes()).self_seed_shares == {"b": b"\x00\x01"}


def test_orchestrator_status_refusals_stay_readable_by_earlier_and_later_releases() -> None:
    """Without refusals the JSON is what earlier readers know; fields of later releases are ignored, not fatal."""
    quiet = OrchestratorStatus(federation=FED, sender="orchestrator", state="waiting")
    assert "refusals" not in json.loads(quiet.to_bytes())
    counted = quiet.model_copy(update={"refusals": {"site-h": {"rate_limited": 3, "update_too_large": 1}}})
    assert parse_message(counted.to_bytes()).refusals == {"site-h": {"rate_limited": 3, "update_too_large": 1}}
    later = {**json.loads(counted.to_bytes()), "added_by_a_later_release": {"x": 1}}
    assert parse_message(json.dumps(later).encode()) == counted


SCHEMA_1_STATUS = {"protocol": 1, "msg_id": "0123456789abcdef", "federation": FED, "sender": "site-a",
                   "sent_at": 1e9, "type": "status", "state": "idle", "agent_version": "0.9", "model_version": 4,
                   "round_id": None, "num_samples": 120, "detail": "", "privacy": None}
"""A status as the agent published it before schema 2 (no new field, no schema_version)."""


def test_schema_1_site_status_parses_in_the_schema_2_reader() -> None:
    status = parse_message(json.dumps(SCHEMA_1_STATUS).encode())
    assert isinstance(status, SiteStatus)
    assert status.schema_version == 1
    assert (status.state, status.model_version, status.num_samples) == ("idle", 4, 120)
    assert status.heartbeat_at is None and status.progress is None and status.last_error is None
    assert status.data is None and status.resources is None and status.active_model_version is None
    orch = {"protocol": 1, "msg_id": "0123456789abcdef", "federation": FED, "sender": "orchestrator",
            "sent_at": 1e9, "type": "orch_status", "state": "collecting", "round": 2, "attempt": 1,
            "round_id": "r2a1", "model_version": 1, "selected": ["site-a"], "reported": [], "deadline": 2e9,
            "detail": ""}
    parsed = parse_message(json.dumps(orch).encode())
    assert isinstance(parsed, OrchestratorStatus)
    assert (parsed.schema_version, parsed.rounds_total, parsed.kind, parsed.started_at) == (1, None, None, None)


def test_schema_2_site_status_parses_in_a_reader_that_knows_only_schema_1() -> None:
    """An older reader (its own model, ignoring unknown fields) takes what it knows from a newer status."""

    class Schema1Reader(Message):
        model_config = ConfigDict(extra="ignore", frozen=True)
        type: Literal["status"]
        state: str
        agent_version: str
        model_version: int | None = None
        round_id: str | None = None
        num_samples: int | None = None
        detail: str = ""

    new = _examples()["status"]
    raw = json.loads(new.to_bytes())
    assert raw["schema_version"] == 2 and raw["progress"]["steps_done"] == 40
    old = Schema1Reader.model_validate_json(new.to_bytes())
    assert (old.state, old.model_version, old.round_id, old.num_samples) == ("training", 2, "r3a1", 120)
    # and this release, too, ignores what a later schema adds, at every level
    raw["added_later"] = {"x": 1}
    raw["progress"]["added_later"] = 1
    raw["last_error"]["added_later"] = "y"
    assert parse_message(json.dumps(raw).encode()) == new


def test_site_status_leaves_empty_fields_out_of_the_wire() -> None:
    """A status without news stays small: what is None is not sent (a reader gets the same default)."""
    will = SiteStatus(federation=FED, sender="site-a", state="offline", agent_version="1.0", connected_at=1e9,
                      heartbeat_seconds=10.0)
    raw = json.loads(will.to_bytes())
    assert "heartbeat_at" not in raw and "progress" not in raw and raw["connected_at"] == 1e9
    parsed = parse_message(will.to_bytes())
    assert parsed == will and parsed.heartbeat_at is None


def test_error_codes_have_actions_and_unknown_codes_still_parse() -> None:
    for code in ("data.invalid", "data.unreadable", "training.failed", "model.unusable", "model.download_failed",
                 "update.refused", "privacy.floor", "privacy.budget_spent", "secagg.failed", "agent.internal"):
        assert ERROR_CODES[code]
        assert ErrorInfo.of(code, "x").action == ERROR_CODES[code]
    raw = json.loads(_examples()["status"].to_bytes())
    raw["last_error"]["code"] = "code.of_a_later_release"
    assert parse_message(json.dumps(raw).encode()).last_error.code == "code.of_a_later_release"


def test_alert_state_ignores_later_fields_and_names_bad_kinds() -> None:
    alerts = _examples()["alerts"]
    raw = json.loads(alerts.to_bytes())
    raw["alerts"][0]["added_later"] = 1
    assert parse_message(json.dumps(raw).encode()) == alerts
    raw["alerts"][0]["kind"] = "gossip"
    assert "alerts.0.kind" in _parse_error(raw)
