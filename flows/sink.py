"""The output path: a Kafka producer that checks every delivery report.

This module owns how records leave crmstream. ``DeliveryCheckedProducer``
produces with idempotence and ``acks=all``, applies backpressure when the local
queue is full (instead of raising ``BufferError`` as Bytewax's KafkaSink can),
records every failed delivery report and raises it on the next ``produce`` or
``flush``.

``Outbox`` is a shard's side of the transactional outbox: the records of a
step (triggers, suppressions, dead letters) are written to the shard's outbox
list in Redis in the same MULTI/EXEC as the state they follow from, and only
then produced, without waiting. Entries whose delivery the broker confirmed
are trimmed from the list's head by a later commit. After a crash, the next
run produces what the list still holds, so no record is lost and none waits
on the broker inside a step (``encode_outgoing`` is the entry format).

Nothing committed may fail the next start (issue 34): ``bound_outgoing`` puts
a dead letter in place of any record over the producer's ``message.max.bytes``
before it reaches the outbox, and a record the producer or the broker still
refuses when sent (one an earlier version committed, or a topic whose limit is
lower) is replaced by such a dead letter too, counted in
``crmstream_unsent_records_total``, instead of failing every start.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any, NamedTuple

from confluent_kafka import KafkaError, KafkaException, Message, Producer

from crmstream.clients import librdkafka_config
from crmstream.flows.dead_letters import unsendable_record
from crmstream.metrics import get_metrics

log = logging.getLogger(__name__)
WAIT_WARNING_SECONDS = 5.0
# librdkafka refuses a record whose key, value and headers with this much framing
# exceed message.max.bytes (measured: tests/test_unsent_records.py).
RECORD_FRAMING_BYTES = 36
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's default


def record_limit(properties: dict) -> int:
    """The most key and value bytes of one record a producer with these librdkafka
    ``properties`` accepts."""
    max_bytes = properties.get("message.max.bytes", DEFAULT_MESSAGE_MAX_BYTES)
    return int(max_bytes) - RECORD_FRAMING_BYTES


# Errors that refuse one record for what it is (retrying it cannot help).
REFUSED = frozenset(
    {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_RECORD}
)
Report = Callable[[KafkaError | None, Message], None]


class DeliveryError(RuntimeError):
    """The broker did not acknowledge one or more records."""


def producer_config(
    brokers: list[str], client_config: dict[str, Any], timeout_s: float
) -> dict[str, Any]:
    """The producer's librdkafka configuration: idempotent, ``acks=all``, ``linger.ms`` 5,
    failing a record after ``timeout_s``; ``client_config`` (``kafka.client`` and
    ``kafka.producer``) over those."""
    return {
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        "message.timeout.ms": int(timeout_s * 1000),
        **librdkafka_config(brokers, client_config),
    }


class DeliveryCheckedProducer:
    """A thread-safe idempotent producer whose failures never vanish."""

    def __init__(
        self,
        brokers: list[str],
        client_config: dict[str, Any],
        timeout_s: float,
        unsent_to: str | None = None,
        copy_bytes: int = 0,
    ):
        """``unsent_to``: the dead-letter topic where a record that cannot be sent is
        replaced by a dead letter keeping ``copy_bytes`` of it (None: such a record
        fails as any other delivery does)."""
        config = producer_config(brokers, client_config, timeout_s)
        self.properties = config  # what librdkafka was given, logger included
        self._producer = Producer(config)
        self._timeout_s = timeout_s
        self._lock = threading.Lock()
        self._failures: list[str] = []
        self._unsent_to = unsent_to
        self._copy_bytes = copy_bytes
        self._deferred: list[tuple[Outgoing, Report]] = []  # stand-ins from delivery reports
        self.record_limit = record_limit(config)

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
        on_acked: Callable[[], None] | None = None,
        timestamp_ms: int = 0,
    ) -> None:
        """Queue one record; waits for room when the local queue is full.
        ``on_acked`` is called once the broker acknowledged it; ``timestamp_ms``: its
        Kafka time (0: the wall clock as it is produced)."""
        self._raise_failures()
        self._send_deferred()
        self._queue(topic, key, value, headers, self._reporter(on_acked), timestamp_ms=timestamp_ms)

    def produce_all(
        self, records: Iterable[tuple[str, bytes | None, bytes]], on_acked: Callable[[], None]
    ) -> None:
        """Queue (topic, key, value) records as ``produce`` does, one delivery callback for
        all; ``on_acked`` is called once per record the broker acknowledged (or, for a
        record that could not be sent, once its stand-in dead letter was)."""
        self._raise_failures()
        self._send_deferred()
        report = self._reporter(on_acked)
        for topic, key, value in records:
            self._queue(topic, key, value, None, report)

    def stand_in(
        self, topic: str, key: bytes | None, value: bytes, why: str, cause: str
    ) -> Outgoing:
        """The dead letter sent in place of a record that cannot be sent (``cause``:
        ``oversize`` before the commit, ``refused`` when sent), logged and counted.

        :raises DeliveryError: when the producer has no dead-letter topic to use.
        """
        if self._unsent_to is None:
            raise DeliveryError(f"cannot produce to {topic!r}: {why}")
        self.count_unsent(
            topic, cause, f"{why}; a dead letter on {self._unsent_to!r} stands for it"
        )
        copy = 0 if topic == self._unsent_to and cause == "refused" else self._copy_bytes
        out_key, record = unsendable_record(topic, key, value, why, copy, self.record_limit)
        return Outgoing(self._unsent_to, out_key, record)

    @staticmethod
    def count_unsent(topic: str, cause: str, what: str) -> None:
        """Log and count a record not sent as it was (``crmstream_unsent_records_total``)."""
        get_metrics().unsent_records.labels(topic, cause).inc()
        log.error("a record for %r is not sent as it was: %s", topic, what)

    def _reporter(self, on_acked: Callable[[], None] | None, stand_ins: bool = True) -> Report:
        def report(err: KafkaError | None, msg: Message) -> None:
            if err is None:
                if on_acked is not None:
                    on_acked()
            elif stand_ins and self._unsent_to is not None and err.code() in REFUSED:
                why = f"the broker refused it: {err.str()}"
                stand = self.stand_in(msg.topic(), msg.key(), msg.value() or b"", why, "refused")
                # Produced at the next call, outside librdkafka's callback.
                with self._lock:
                    self._deferred.append((stand, self._reporter(on_acked, stand_ins=False)))
            else:
                self._on_delivery(err, msg)

        return report

    def _send_deferred(self) -> None:
        while True:
            with self._lock:  # shards on worker threads share the producer
                if not self._deferred:
                    return
                stand, report = self._deferred.pop(0)
            self._queue(*stand, None, report, stand_ins=False)

    def _queue(
        self,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: list[tuple[str, bytes]] | None,
        report: Report,
        stand_ins: bool = True,
        timestamp_ms: int = 0,
    ) -> None:
        while True:
            try:
                self._producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=headers,
                    on_delivery=report,
                    timestamp=timestamp_ms,
                )
                return
            except BufferError:
                self._producer.poll(0.05)  # backpressure: serve delivery reports, then retry
            except KafkaException as exc:
                error = exc.args[0]
                refused = isinstance(error, KafkaError) and error.code() in REFUSED
                if not (refused and stand_ins and self._unsent_to is not None):
                    raise DeliveryError(f"cannot produce to {topic!r}: {exc}") from None
                why = f"the producer refused it: {error.str()}"
                topic, key, value = self.stand_in(topic, key, value, why, "refused")
                headers, stand_ins = None, False

    def flush(self) -> None:
        """Block until every queued record is acknowledged; raise if any failed."""
        started = time.monotonic()
        deadline = started + self._timeout_s
        self._send_deferred()
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
        while self._deferred and not remaining:  # stand-ins for records refused meanwhile
            self._send_deferred()
            remaining = self._producer.flush(max(0.0, deadline - time.monotonic()))
        if time.monotonic() - started >= WAIT_WARNING_SECONDS and not remaining:
            log.warning("broker acknowledged after %.1f s", time.monotonic() - started)
        self._raise_failures()
        if remaining:
            raise DeliveryError(
                f"{remaining} record(s) still unacknowledged after {self._timeout_s:g} s"
            )

    def poll(self) -> None:
        """Serve delivery reports; raise if any record failed."""
        self._producer.poll(0)
        self._send_deferred()
        self._raise_failures()

    @property
    def timeout_s(self) -> float:
        return self._timeout_s


class Outgoing(NamedTuple):
    """One record bound for a topic."""

    topic: str
    key: bytes | None
    value: bytes


_HEAD = struct.Struct(">Hi")  # topic length, key length (-1: no key)


def encode_outgoing(record: Outgoing) -> bytes:
    """An outbox entry: a 6-byte head, the topic, the key and the value."""
    topic = record.topic.encode()
    key = record.key
    return (
        _HEAD.pack(len(topic), -1 if key is None else len(key))
        + topic
        + (key or b"")
        + record.value
    )


def decode_outgoing(entry: bytes) -> Outgoing:
    """An outbox entry as the record it holds.

    :raises ValueError: (``struct.error`` for one shorter than its head) when its lengths
        do not fit it or its topic is not UTF-8: not an entry ``encode_outgoing`` wrote.
    """
    topic_len, key_len = _HEAD.unpack_from(entry)
    at = _HEAD.size + topic_len
    if (
        not 0 < topic_len <= MAX_TOPIC_BYTES
        or at > len(entry)
        or key_len < -1
        or (key_len > len(entry) - at)
    ):
        raise ValueError(
            f"its lengths do not fit it: topic {topic_len}, key {key_len}, {len(entry)} bytes"
        )
    topic = entry[_HEAD.size : at].decode()
    if key_len < 0:
        return Outgoing(topic, None, entry[at:])
    return Outgoing(topic, entry[at : at + key_len], entry[at + key_len :])


MAX_TOPIC_BYTES = 249  # Kafka's longest topic name


def bound_outgoing(records: list[Outgoing], producer: DeliveryCheckedProducer) -> list[Outgoing]:
    """The records as they may be committed to the outbox: none over the producer's
    ``message.max.bytes`` (a refused outbox record failed every start: issue 34).

    A record whose key pushes it over (a dead letter keeps its input message's key,
    which may be near the limit itself) is sent without its key; any other record
    over the limit is replaced by the dead letter that stands for it. Both are
    logged and counted (``crmstream_unsent_records_total``, cause ``oversize``).
    """
    limit = producer.record_limit
    out = records
    for i, (topic, key, value) in enumerate(records):
        size = len(value) + len(key or b"")
        if size <= limit:
            continue
        if out is records:
            out = list(records)
        why = f"{size} bytes of key and value, over the producer's limit of {limit}"
        if len(value) <= limit:
            producer.count_unsent(topic, "oversize", f"{why}: sent without its key")
            out[i] = Outgoing(topic, None, value)
        else:
            out[i] = producer.stand_in(topic, key, value, f"{why} (message.max.bytes)", "oversize")
    return out


class _Chunk:
    __slots__ = ("left", "sent", "size")

    def __init__(self, size: int):
        self.size = size
        self.left = size
        self.sent = time.monotonic()


class Outbox:
    """What one shard has committed to its outbox and produced, in outbox order.

    Records are sent in chunks (one per commit); a chunk is done when the broker
    has acknowledged all of its records. ``take_done`` hands over how many
    entries at the head of the outbox are done, for the next commit to trim.
    """

    def __init__(self, producer: DeliveryCheckedProducer, name: str = "outbox"):
        self._producer = producer
        self._name = name
        self._chunks: deque[_Chunk] = deque()
        self._lock = threading.Lock()
        self._warned = 0.0

    def send(self, records: Iterable[Outgoing]) -> None:
        records = list(records)
        if not records:
            return
        chunk = _Chunk(len(records))
        self._chunks.append(chunk)

        def acked() -> None:
            with self._lock:
                chunk.left -= 1

        self._producer.produce_all(records, acked)

    def watch(self) -> None:
        """Serve delivery reports; every 5 s while records wait longer than that for the
        broker's acknowledgement, log it and count a delivery wait. A record the broker
        never acknowledges fails after ``kafka.delivery_timeout_seconds`` (raised here)."""
        self._producer.poll()
        with self._lock:
            waiting = [chunk for chunk in self._chunks if chunk.left]
        if not waiting:
            return
        now = time.monotonic()
        age = now - waiting[0].sent
        if age >= WAIT_WARNING_SECONDS and now - self._warned >= WAIT_WARNING_SECONDS:
            self._warned = now
            get_metrics().delivery_waits.inc()
            log.warning(
                "%s: %d record(s) still waiting for the broker's acknowledgement after %.0f s "
                "(gives up after %g s): is the broker reachable?",
                self._name,
                sum(chunk.left for chunk in waiting),
                age,
                self._producer.timeout_s,
            )

    def pending(self) -> int:
        """Records sent and not yet trimmed from the outbox."""
        return sum(chunk.size for chunk in self._chunks)

    def done(self) -> int:
        """Entries at the outbox's head whose delivery is confirmed."""
        n = 0
        with self._lock:
            for chunk in self._chunks:
                if chunk.left:
                    break
                n += chunk.size
        return n

    def take_done(self) -> int:
        """``done()``, forgetting those entries (the caller trims them)."""
        n = self.done()
        left = n
        while left:  # only this shard's thread adds or removes chunks
            left -= self._chunks.popleft().size
        return n
