"""Creating crmstream's Kafka topics with explicit partitions and replication.

This module owns topic creation for the embedded stack and ``crmstream topics
create``. Topics are created with explicit configs (cleanup policy, retention)
because some brokers, Tansu among them, return no defaults for them.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from crmstream.clients import librdkafka_config
from crmstream.config import CrmConfig


class TopicError(RuntimeError):
    """A topic could not be created."""


def admin_client(brokers: list[str], client_properties: Mapping[str, Any]) -> AdminClient:
    """An AdminClient with ``kafka.client``'s properties (``clients.librdkafka_config``)."""
    return AdminClient(librdkafka_config(brokers, client_properties))


def topic_metadata(client: Any, topic: str, timeout_s: float) -> Any:
    """The topic's metadata (None when the broker does not list it) from a Consumer or
    AdminClient, asked for a second at a time: Ctrl-C is handled between the asks,
    where one long ``list_topics`` call would hold it off. Raises the client's
    KafkaException when the broker has not answered within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        wait_s = min(1.0, max(0.1, deadline - time.monotonic()))
        try:
            return client.list_topics(topic, timeout=wait_s).topics.get(topic)
        except KafkaException:
            if time.monotonic() >= deadline:
                raise


def partitions_of(client: Any, topic: str, timeout_s: float) -> list[int]:
    """The topic's partition ids, sorted (``topic_metadata``); TopicError names the topic
    and why when the broker does not list it, reports an error for it, or lists no
    partitions."""
    meta = topic_metadata(client, topic, timeout_s)
    if meta is None or meta.error is not None or not meta.partitions:
        why = meta.error.str() if meta is not None and meta.error else "no partitions"
        raise TopicError(f"topic {topic!r} is not readable: {why}")
    return sorted(meta.partitions)


def create_topics(
    brokers: list[str],
    config: CrmConfig,
    partitions: int | None = None,
    replication_factor: int | None = None,
) -> dict[str, str]:
    """Create every input and output topic; returns topic -> "created" | "exists"."""
    kafka = config.kafka
    admin = admin_client(brokers, kafka.client)
    names = [*kafka.topics.inputs, *kafka.topics.outputs]
    new = [
        NewTopic(
            name,
            num_partitions=partitions or kafka.partitions,
            replication_factor=replication_factor or kafka.replication_factor,
            config={"cleanup.policy": "delete", "retention.ms": str(7 * 86_400_000)},
        )
        for name in names
    ]
    result = {}
    for name, future in admin.create_topics(new, request_timeout=30).items():
        try:
            future.result(timeout=60)
            result[name] = "created"
        except KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                result[name] = "exists"
            else:
                raise TopicError(f"cannot create topic {name!r}: {exc}") from None
    return result
