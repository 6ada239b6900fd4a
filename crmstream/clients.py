"""What every Kafka client of crmstream is configured with.

This module owns the settings all of crmstream's librdkafka clients share:
the bootstrap servers, the deployment's properties for that kind of client
(``kafka.client``, with ``kafka.consumer`` or ``kafka.producer`` over it), and
a logger. Left without one, librdkafka writes its lines straight to stderr,
informational ones included; with it they go through Python's ``librdkafka``
logger, which the CLI shows from WARNING up. Each client adds its own settings
around these.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

_LOG = logging.getLogger("librdkafka")


def librdkafka_config(brokers: list[str], properties: Mapping[str, Any]) -> dict[str, Any]:
    """The bootstrap servers, ``properties`` and the logger."""
    return {"bootstrap.servers": ",".join(brokers), **properties, "logger": _LOG}


# librdkafka names some properties by the alias they stand for in its errors.
_ALIASES = {
    "queue.buffering.max.ms": "linger.ms",
    "request.required.acks": "acks",
    "compression.codec": "compression.type",
    "fetch.message.max.bytes": "max.partition.fetch.bytes",
    "metadata.broker.list": "bootstrap.servers",
}


def validate_properties(config: Any) -> list[str]:
    """Build every kind of Kafka client crmstream makes, with the configured librdkafka
    properties (``kafka.client``, ``kafka.consumer``, ``kafka.producer``), and drop it
    unused: librdkafka checks every property when a client is built, before it
    connects, so an unknown name or a bad value fails here and not in a running flow.

    Returns librdkafka's configuration warnings (e.g. a consumer property given to a
    producer through ``kafka.client``).

    :raises ConfigError: naming the config key, its value and librdkafka's reason.
    """
    import re

    from confluent_kafka import Consumer, KafkaException, Producer
    from confluent_kafka.admin import AdminClient

    from crmstream.config import ConfigError
    from crmstream.flows.sink import producer_config
    from crmstream.flows.source import CrmKafkaSource
    from crmstream.ops import reader_config

    kafka = config.kafka
    brokers = ["127.0.0.1:9"]  # the clients are dropped before they could connect
    warnings: list[str] = []
    quiet = logging.getLogger("crmstream.clients.check")
    quiet.propagate = False

    class _Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            args = record.args if isinstance(record.args, tuple) else ()
            if args and args[0] == "CONFWARN":
                text = str(args[-1]).split("]: ", 1)[-1]
                if text not in warnings:
                    warnings.append(text)

    keep = _Keep()
    quiet.addHandler(keep)
    source = CrmKafkaSource(
        brokers, list(kafka.topics.inputs), dict(kafka.client), lambda _p: {}, 1, 1, False,
        consumer_config=dict(kafka.consumer), group=kafka.consumer_group,
    )  # fmt: skip
    builds = [
        ("consumer", Consumer, source.consumer_config()),
        ("consumer", Consumer, reader_config(brokers, kafka.consumer_properties())),
        ("producer", Producer, producer_config(brokers, kafka.producer_properties(), 30.0)),
        ("client", AdminClient, librdkafka_config(brokers, kafka.client)),
    ]
    try:
        for kind, client_class, settings in builds:
            settings = {**settings, "logger": quiet}
            try:
                client = client_class(settings)
            except KafkaException as exc:
                reason = exc.args[0].str() if exc.args else str(exc)
                named = re.findall(r'"([^"]+)"', reason)
                section = kind if kind != "client" else "client"
                named += [_ALIASES[n] for n in named if n in _ALIASES]
                for prop in reversed(named):
                    for where in (section, "client"):
                        props = getattr(kafka, where)
                        if prop in props:
                            raise ConfigError(
                                f"invalid configuration: kafka.{where}.{prop} = "
                                f"{props[prop]!r}: librdkafka refuses it: {reason}"
                            ) from None
                raise ConfigError(f"invalid Kafka client configuration: {reason}") from None
            client.poll(0.1)  # librdkafka's log lines reach Python when a client is polled
            if isinstance(client, Consumer):
                client.close()
            del client
    finally:
        quiet.removeHandler(keep)
    return warnings
