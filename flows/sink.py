"""The output path: a Kafka producer that checks every delivery report.

This module owns how records leave crmstream. ``DeliveryCheckedProducer``
produces with idempotence and ``acks=all``, applies backpressure when the local
queue is full (instead of raising ``BufferError`` as Bytewax's KafkaSink can),
records every failed delivery report and raises it on the next ``produce`` or
``flush``. A shard commits its Redis state only after ``flush`` confirmed that
every trigger and dead letter of the batch reached the broker.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from crmstream.metrics import get_metrics

log = logging.getLogger(__name__)
WAIT_WARNING_SECONDS = 5.0


class DeliveryError(RuntimeError):
    """The broker did not acknowledge one or more records."""


class DeliveryCheckedProducer:
    """A thread-safe idempotent producer whose failures never vanish."""

    def __init__(self, brokers: list[str], client_config: dict[str, Any], timeout_s: float):
        config = {
            "bootstrap.servers": ",".join(brokers),
            "enable.idempotence": True,
            "acks": "all",
            "linger.ms": 5,
            "message.timeout.ms": int(timeout_s * 1000),
            "logger": logging.getLogger("librdkafka"),
            **client_config,
        }
        self._producer = Producer(config)
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._failures: list[str] = []

    def _on_delivery(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            get_metrics().delivery_failures.labels(msg.topic()).inc()
            with self._lock:
                self._failures.append(f"{msg.topic()}[{msg.partition()}]: {err.str()}")

    def _raise_failures(self) -> None:
        with self._lock:
            failures, self._failures = self._failures, []
        if failures:
            shown = "; ".join(failures[:3])
            raise DeliveryError(f"{len(failures)} record(s) were not delivered: {shown}")

    def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None = None,
    ) -> None:
        """Queue one record; waits for room when the local queue is full."""
        self._raise_failures()
        while True:
            try:
                self._producer.produce(
                    topic, value=value, key=key, headers=headers, on_delivery=self._on_delivery
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # backpressure: serve delivery reports, then retry
            except KafkaException as exc:
                raise DeliveryError(f"cannot produce to {topic!r}: {exc}") from None

    def flush(self) -> None:
        """Block until every queued record is acknowledged; raise if any failed."""
        started = time.monotonic()
        deadline = started + self._timeout_s
        remaining = self._producer.flush(min(self._timeout_s, WAIT_WARNING_SECONDS))
        while remaining and time.monotonic() < deadline:
            get_metrics().delivery_waits.inc()
            log.warning(
                "%d record(s) still waiting for the broker's acknowledgement after %.0f s "
                "(gives up after %g s): is the broker reachable?",
                remaining,
                time.monotonic() - started,
                self._timeout_s,
            )
            slice_s = min(WAIT_WARNING_SECONDS, max(0.0, deadline - time.monotonic()))
            remaining = self._producer.flush(slice_s)
        if time.monotonic() - started >= WAIT_WARNING_SECONDS and not remaining:
            log.warning("broker acknowledged after %.1f s", time.monotonic() - started)
        self._raise_failures()
        if remaining:
            raise DeliveryError(
                f"{remaining} record(s) still unacknowledged after {self._timeout_s:g} s"
            )

    def poll(self) -> None:
        self._producer.poll(0)
