"""Brokers' limits and dialects: a 1 MB packet limit, and a demo that speaks MQTT 3.1.1 when told to.

Why: brokers cap packet sizes by default (EMQX 1 MB, Mosquitto 2.1 about 2 MB, RabbitMQ 4.1
16 MiB), and a chunk above the cap gets its sender disconnected, again after every reconnect.
The default chunk size must fit the smallest cap, and a chunk size that does not fit the
broker's announced cap must be refused at connect with what to set instead. Every test here
runs against a real Mosquitto with ``max_packet_size 1048576``.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from pathlib import Path

import pytest
from typer.testing import CliRunner

from edge_agent.agent import EdgeAgent
from fedmq.cli import app
from fedmq.demo import HOSPITALS, DemoOptions, demo_mqtt_version, heart_settings
from fedmq.inprocess import run_federation
from orchestrator.registry import ModelRegistry
from shared.blobs import DEFAULT_CHUNK_SIZE, chunk_packet_bytes, iter_chunks, make_manifest
from shared.broker import Broker, start_mosquitto
from shared.config import CommonSettings
from shared.topics import Topics
from shared.transport import Transport, TransportError

BROKER_LIMIT = 1024 * 1024  # EMQX's default is 1 MB; Mosquitto's max_packet_size counts the whole packet
LARGEST_FITTING_CHUNK = 1047552  # (1048576 - 512 bytes of chunk header, topic and framing), in whole KiB


@pytest.fixture()
def limited_mosquitto():
    """A Mosquitto that closes any client sending a packet above 1 MiB, logging who connected how."""
    broker = start_mosquitto(extra_config=f"max_packet_size {BROKER_LIMIT}\nlog_type notice\n"
                                          "connection_messages true")
    yield broker
    broker.stop()


def _broker_log(broker: Broker) -> str:
    assert broker.workdir is not None
    return (broker.workdir / "mosquitto.log").read_text(errors="replace")


def test_default_chunks_fit_a_1_mb_broker_and_a_multi_chunk_model_federates(limited_mosquitto, tmp_path):
    assert chunk_packet_bytes(DEFAULT_CHUNK_SIZE) <= 1_000_000, "the default must fit EMQX's 1 MB limit"
    orch, agents = heart_settings(limited_mosquitto.url, tmp_path, DemoOptions(rounds=2, local_steps=5),
                                  sites=("cleveland", "va"))
    # An MLP of ~420k parameters: a model of ~1.7 MB, several chunks, each update several chunks too.
    orch = orch.model_copy(update={"architecture": "mlp", "hidden": [2048, 192],
                                   "training": orch.training.model_copy(update={"loss": "bce_logits"})})
    assert orch.chunk_size == DEFAULT_CHUNK_SIZE and all(a.chunk_size == DEFAULT_CHUNK_SIZE for a in agents)
    with run_federation(orch, agents) as fed:
        fed.wait_finished(timeout=180)
        sent_up = {site: agent.transport.bytes_sent for site, agent in fed.agents.items()}
    registry = ModelRegistry.open(tmp_path / "orchestrator")
    assert [v.version for v in registry.list()] == [0, 1, 2]
    assert set(registry.get(2).contributors) == {"cleveland", "va"}
    model = registry.model_bytes(2)
    assert len(model) > 2 * DEFAULT_CHUNK_SIZE, f"the model ({len(model)} bytes) should need several chunks"
    assert all(sent > BROKER_LIMIT for sent in sent_up.values()), f"updates should exceed the limit: {sent_up}"
    assert "oversize packet" not in _broker_log(limited_mosquitto)


def test_a_chunk_size_above_the_brokers_limit_is_refused_at_connect_with_what_to_set(limited_mosquitto, caplog):
    settings = CommonSettings(broker_url=limited_mosquitto.url, chunk_size=1024 * 1024)
    with caplog.at_level(logging.ERROR, logger="shared.transport"), pytest.raises(TransportError) as refused:
        Transport(settings, "too-large-chunks", persistent_session=False).start(timeout=10)
    message = str(refused.value)
    assert f"accepts at most {BROKER_LIMIT} bytes per message" in message
    assert f"set FEDMQ_CHUNK_SIZE to at most {LARGEST_FITTING_CHUNK}" in message
    assert message in caplog.text, "the refusal must be logged too"


def test_the_largest_chunk_size_the_refusal_suggests_passes_on_the_longest_topic(limited_mosquitto):
    """The suggested size is honest: a full chunk of it on the longest chunk topic reaches a subscriber."""
    settings = CommonSettings(broker_url=limited_mosquitto.url, chunk_size=LARGEST_FITTING_CHUNK)
    topics = Topics("f" * 63)
    data = bytes(range(256)) * (LARGEST_FITTING_CHUNK // 256)
    manifest = make_manifest(data, "application/octet-stream", LARGEST_FITTING_CHUNK)
    (index, payload), = iter_chunks(data, manifest)
    topic = topics.to_site_chunk("s" * 63, manifest.blob_id, 2 ** 32 - 1)
    with Transport(settings, "largest-sub", persistent_session=False) as sub, \
            Transport(settings, "largest-pub", persistent_session=False) as pub:
        pub.publish(topic, payload, retain=True).wait_for_publish(10)  # retained: however late the subscription
        sub.subscribe(topics.everything)
        received = sub.get(timeout=10)
    assert received is not None and received.payload == payload, "the largest suggested chunk did not arrive"
    assert "oversize packet" not in _broker_log(limited_mosquitto)


def test_an_agent_whose_chunks_the_broker_refuses_stops_with_the_reason(limited_mosquitto, tmp_path):
    _, (agent_settings,) = heart_settings(limited_mosquitto.url, tmp_path, DemoOptions(rounds=1), sites=("va",))
    agent = EdgeAgent(agent_settings.model_copy(update={"chunk_size": 2 * 1024 * 1024}))
    stop = threading.Event()
    timer = threading.Timer(30, stop.set)  # only a missing refusal lets the run go on
    timer.start()
    try:
        with pytest.raises(TransportError, match=r"set FEDMQ_CHUNK_SIZE to at most 1047552"):
            agent.run(stop)
    finally:
        timer.cancel()
    assert not stop.is_set(), "the agent kept retrying instead of stopping with the reason"


def test_demo_mqtt_version_follows_the_option_and_the_embedded_broker():
    mosquitto, amqtt = Broker("mosquitto", "127.0.0.1", 1), Broker("amqtt", "127.0.0.1", 1)
    assert demo_mqtt_version(DemoOptions(), None) == "5"
    assert demo_mqtt_version(DemoOptions(), mosquitto) == "5"
    assert demo_mqtt_version(DemoOptions(), amqtt) == "3.1.1"
    assert demo_mqtt_version(DemoOptions(mqtt_version="3.1.1"), None) == "3.1.1"
    with pytest.raises(RuntimeError, match="speaks MQTT 3.1.1 only"):
        demo_mqtt_version(DemoOptions(mqtt_version="5"), amqtt)


def test_demo_with_mqtt_version_3_1_1_runs_every_process_over_it(limited_mosquitto, tmp_path):
    summary_path = tmp_path / "summary.json"
    result = CliRunner().invoke(app, ["demo", "--broker", limited_mosquitto.url, "--mqtt-version", "3.1.1",
                                      "--rounds", "1", "--local-steps", "5", "--state-dir", str(tmp_path / "state"),
                                      "--summary-json", str(summary_path)])
    assert result.exit_code == 0, result.output
    assert json.loads(summary_path.read_text())["rounds"] == 1
    # Mosquitto logs "New client connected from ADDR as ID (pN, ...)": p2 is MQTT 3.1.1, p5 is MQTT 5.
    connected = re.findall(r"New client connected from \S+ as (\S+) \((p\d)", _broker_log(limited_mosquitto))
    clients = {client: protocol for client, protocol in connected}
    expected = {"fedmq-heart-demo-orchestrator", *(f"fedmq-heart-demo-{site}" for site in HOSPITALS)}
    assert expected <= set(clients), f"not every process connected: {sorted(clients)}"
    assert any(c.startswith("fedmq-heart-demo-monitor-") for c in clients), "the demo's own view did not connect"
    assert {protocol for _, protocol in connected} == {"p2"}, f"a process spoke another MQTT version: {connected}"


def test_demo_option_rejects_an_unknown_mqtt_version(tmp_path: Path):
    result = CliRunner().invoke(app, ["demo", "--mqtt-version", "4", "--state-dir", str(tmp_path / "state")])
    assert result.exit_code != 0 and "3.1.1" in result.output
    assert not (tmp_path / "state").exists(), "nothing may start before the option is checked"
