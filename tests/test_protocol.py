"""Control messages: every type round-trips, and bad payloads become a telling ProtocolError."""

from __future__ import annotations

import base64
import json

import pytest
from pydantic import ValidationError

from shared.blobs import make_manifest
from shared.codec import CompressionSettings
from shared.protocol import (
    DEFAULT_LOCAL_STEPS,
    MAX_CONTROL_MESSAGE_BYTES,
    MESSAGE_TYPES,
    BlobManifest,
    ChunkRequest,
    EvalMetrics,
    Message,
    ModelDelta,
    ModelPublished,
    OrchestratorStatus,
    ProtocolError,
    RoundCommand,
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
                             model_version=2, round_id="r3a1", num_samples=120, detail="round 3"),
        "orch_status": OrchestratorStatus(federation=FED, sender="orchestrator", state="collecting", round=3,
                                          attempt=1, round_id="r3a1", model_version=2, selected=["site-a"],
                                          reported=[], deadline=1e9),
        "model": ModelPublished(federation=FED, sender="orchestrator", version=3, sha256=MANIFEST.blob_id,
                                parent=2, round=3, contributors={"site-a": 120}),
        "round_summary": RoundSummary(federation=FED, sender="orchestrator", round=3, evaluated_version=2,
                                      new_version=3, site_metrics={"site-a": metrics}, pooled=metrics,
                                      bytes_down=1000, bytes_up=2000, seconds={"train": 1.5}),
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
