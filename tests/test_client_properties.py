"""librdkafka properties per kind of client: ``kafka.client`` for all of them,
``kafka.consumer`` and ``kafka.producer`` over it for one kind only.

librdkafka warns (CONFWARN) when a client is given a property of the other
kind, e.g. a fetch size on a producer; the sections let a deployment tune
each kind without that warning. The clients here are real librdkafka
clients, built the way the flow builds them; none needs a broker.
"""

from __future__ import annotations

import logging

import pytest
from confluent_kafka import Consumer

from crmstream.config import ConfigError, load_config
from crmstream.flows.crm import input_source
from crmstream.flows.runtime import Endpoints, Runtime
from crmstream.ops import reader_config
from crmstream.topics import admin_client

# One consumer-only and one producer-only property, each with a value that is not
# librdkafka's default.
CONSUMER_ONLY = ("max.partition.fetch.bytes", 8 << 20)
PRODUCER_ONLY = ("compression.type", "zstd")


def test_each_kind_gets_the_common_properties_with_its_own_over_them():
    config = load_config(
        overrides=[
            "kafka.client.client.id=crm",
            "kafka.client.linger.ms=7",
            f"kafka.consumer.{CONSUMER_ONLY[0]}={CONSUMER_ONLY[1]}",
            "kafka.producer.linger.ms=20",
        ],
        env={"CRMSTREAM__KAFKA__PRODUCER__COMPRESSION_TYPE": "zstd"},
    )
    kafka = config.kafka
    assert kafka.consumer_properties() == {
        "client.id": "crm",
        "linger.ms": 7,
        CONSUMER_ONLY[0]: CONSUMER_ONLY[1],
    }
    assert kafka.producer_properties() == {
        "client.id": "crm",
        "linger.ms": 20,  # the producer's own wins over the common one
        "compression.type": "zstd",  # "_" stands for "." in the variable's name
    }
    with pytest.raises(ConfigError, match=r"kafka\.consumer\.fetch\.wait\.max\.ms = \[1\]"):
        load_config(overrides=["kafka.consumer.fetch.wait.max.ms=[1]"], env={})


def _warnings(caplog: pytest.LogCaptureFixture, sets: list[str]) -> list[str]:
    """The CONFWARN lines of the flow's producer and source consumer built from ``sets``."""
    config = load_config(overrides=sets, env={})
    runtime = Runtime(config, Endpoints(["127.0.0.1:9"], "redis://127.0.0.1:9"))
    source = input_source(runtime, tail=False)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="librdkafka"):
        producer = runtime.producer._producer
        consumer_config = source.consumer_config()
        consumer = Consumer(consumer_config)
        try:
            producer.poll(0.2)  # librdkafka's log lines reach Python when a client is polled
            consumer.poll(0.2)
        finally:
            consumer.close()
            producer_config = runtime.__dict__.pop("producer").properties  # nothing to flush
    # Each client got its own kind's property, from its section or the common one.
    assert consumer_config[CONSUMER_ONLY[0]] == CONSUMER_ONLY[1]
    assert producer_config[PRODUCER_ONLY[0]] == PRODUCER_ONLY[1]
    return [r.getMessage() for r in caplog.records if "CONFWARN" in r.getMessage()]


def test_the_flows_clients_get_only_their_own_kinds_properties(caplog):
    consumer_set = f"{CONSUMER_ONLY[0]}={CONSUMER_ONLY[1]}"
    producer_set = f"{PRODUCER_ONLY[0]}={PRODUCER_ONLY[1]}"
    own = [f"kafka.consumer.{consumer_set}", f"kafka.producer.{producer_set}"]
    assert _warnings(caplog, own) == []
    # The same properties for every client: each kind warns about the other's. This
    # is what the check above would see had a section reached the wrong client.
    common = [f"kafka.client.{consumer_set}", f"kafka.client.{producer_set}"]
    warned = _warnings(caplog, common)
    assert any("consumer property" in w and "producer instance" in w for w in warned), warned
    assert any("producer property" in w and "consumer instance" in w for w in warned), warned


def test_admin_clients_and_the_cli_reader_log_through_python_logging(caplog, capfd):
    """librdkafka writes straight to stderr unless a client is given a logger: the demo
    then opened with a raw ``%6|...|BGQUEUE|`` line from the topic creation's admin
    client. Each client here is given a property of the other kind, so that it logs."""
    consumer_set = f"{CONSUMER_ONLY[0]}={CONSUMER_ONLY[1]}"
    producer_set = f"{PRODUCER_ONLY[0]}={PRODUCER_ONLY[1]}"
    config = load_config(
        overrides=[f"kafka.client.{consumer_set}", f"kafka.consumer.{producer_set}"], env={}
    )
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="librdkafka"):
        admin = admin_client(["127.0.0.1:9"], config.kafka.client)  # a producer-kind client
        admin.poll(0.2)  # librdkafka's log lines reach Python when a client is polled
        reader = Consumer(reader_config(["127.0.0.1:9"], config.kafka.consumer_properties()))
        try:
            reader.poll(0.2)
        finally:
            reader.close()
        del admin
    warned = [r.getMessage() for r in caplog.records if "CONFWARN" in r.getMessage()]
    assert any("consumer property" in w and "producer instance" in w for w in warned), warned
    assert any("producer property" in w and "consumer instance" in w for w in warned), warned
    stderr = capfd.readouterr().err
    assert "CONFWARN" not in stderr and "|BGQUEUE|" not in stderr, stderr
