"""The input path: Kafka partitions as a Bytewax source that resumes from Redis.

This module owns where reading starts and when it stops. Each Kafka partition
of the input topics is one Bytewax source partition. It starts from the
offsets committed in Redis (``StateStore.resume_offsets``), with or without
Bytewax recovery, so a restart neither re-reads a topic from its start nor
skips events a shard had read but not yet committed. Batches are lists of
``RawMessage`` tuples; no per-message objects beyond that.

Each message carries its processing step (``step_of``): shards apply input
step by step, so the result does not depend on how reads were batched.

Stopping: with ``tail=False`` a partition ends at its end offset (bounded runs,
tests, benchmarks). A ``drain`` event set by the caller makes a tailing source
read up to the end and stop; a ``stop`` event stops it at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import Consumer, KafkaError, TopicPartition
from confluent_kafka.admin import AdminClient

from crmstream.flows.routing import parse_part_name, part_name
from crmstream.metrics import get_metrics

log = logging.getLogger(__name__)

_IDLE_BACKOFF = timedelta(milliseconds=20)
STALL_SECONDS = 5.0


class RawMessage(NamedTuple):
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    step: int  # the processing step the message belongs to (see ``step_of``)


def step_of(timestamp_ms: int, step_ms: int, previous: int) -> int:
    """A message's processing step: its Kafka timestamp's bucket, never below its predecessor's.

    Steps are a function of the partition's log alone, so a replay cuts the
    input into the same steps however the reads are batched (docs/guarantees.md).
    """
    return max(timestamp_ms // step_ms, previous)


_new = tuple.__new__

CAUGHT_UP_OFFSET = -1  # a RawMessage with this offset says: the partition is read to its end


class SourceError(RuntimeError):
    """An input topic cannot be read (missing topic, authorisation, ...)."""


class StopSignals(NamedTuple):
    drain: threading.Event  # read to the current end, then stop
    stop: threading.Event  # stop now


class _KafkaPartition(StatefulSourcePartition[RawMessage, int]):
    def __init__(
        self,
        config: dict[str, Any],
        topic: str,
        partition: int,
        start_offset: int,
        start_step: int,
        step_ms: int,
        batch_size: int,
        tail: bool,
        signals: StopSignals | None,
    ):
        self._consumer = Consumer(config)
        self._step = start_step
        self._step_ms = step_ms
        self._consumer.assign([TopicPartition(topic, partition, start_offset)])
        self._topic = topic
        self._partition = partition
        self._tp = TopicPartition(topic, partition)
        self._next_offset = start_offset
        self._batch_size = batch_size
        self._tail = tail
        self._signals = signals
        self._at_end = False
        self._reported_end = False
        self._idle = False
        self._ended = False
        self._last_data = time.monotonic()
        self._stalled = False
        self._lag_checked = 0.0
        self._lag = get_metrics().consumer_lag.labels(topic, str(partition))

    def next_batch(self) -> list[RawMessage]:
        if self._ended:
            raise StopIteration
        if self._signals is not None and self._signals.stop.is_set():
            raise StopIteration
        batch: list[RawMessage] = []
        # Non-blocking: Bytewax polls every partition in turn, so a wait here would
        # delay all the others; an idle partition backs off through next_awake.
        for msg in self._consumer.consume(self._batch_size, 0):
            err = msg.error()
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    self._at_end = True
                    continue
                if err.fatal() or err.code() in (
                    KafkaError.UNKNOWN_TOPIC_OR_PART,
                    KafkaError.TOPIC_AUTHORIZATION_FAILED,
                ):
                    raise SourceError(f"cannot read {self._topic}[{self._partition}]: {err.str()}")
                log.warning(
                    "transient error reading %s[%d]: %s", self._topic, self._partition, err.str()
                )
                continue
            self._at_end = False
            ts_type, ts = msg.timestamp()
            ts = ts if ts_type else 0
            self._step = step_of(ts, self._step_ms, self._step)
            batch.append(
                _new(  # RawMessage(...) without its Python-level constructor
                    RawMessage,
                    (
                        msg.key(),
                        msg.value(),
                        self._topic,
                        self._partition,
                        msg.offset(),
                        ts,
                        self._step,
                    ),
                )
            )
        self._watch_stall(bool(batch))
        self._report_lag()
        if self._tail and not self._at_end and len(batch) < self._batch_size:
            # Live input: a busy partition may never see an end-of-partition event
            # (each fetch brings more); read up to the high watermark of the last
            # fetch response is its end for now, so the shards' steps can close.
            position = batch[-1].offset + 1 if batch else self._next_offset
            _low, high = self._consumer.get_watermark_offsets(self._tp, cached=True)
            self._at_end = 0 <= high <= position
        if batch:
            self._next_offset = batch[-1].offset + 1
            self._reported_end = False  # new data: report the end again when reached
        if self._at_end and not self._reported_end:
            # Tell the shards this partition holds nothing more for now: it stops
            # holding their event-time watermark back.
            batch.append(
                RawMessage(
                    None, None, self._topic, self._partition, CAUGHT_UP_OFFSET, 0, self._step
                )
            )
            self._reported_end = True
        draining = not self._tail or (self._signals is not None and self._signals.drain.is_set())
        if draining and self._at_end and not batch:
            self._ended = True  # emit nothing more; StopIteration on the next call
        self._idle = not batch
        return batch

    def _report_lag(self) -> None:
        """Consumer lag from the high watermark of the last fetch response, once a second."""
        now = time.monotonic()
        if now - self._lag_checked < 1.0:
            return
        self._lag_checked = now
        _low, high = self._consumer.get_watermark_offsets(self._tp, cached=True)
        if high >= 0:
            self._lag.set(max(0, high - self._next_offset))

    def _watch_stall(self, got_data: bool) -> None:
        """Say so when a partition not yet read to its end delivers nothing for a while."""
        now = time.monotonic()
        if got_data or self._at_end:
            if self._stalled:
                log.warning(
                    "%s[%d]: data again after %.1f s",
                    self._topic,
                    self._partition,
                    now - self._last_data,
                )
                self._stalled = False
            self._last_data = now
        elif not self._stalled and now - self._last_data >= STALL_SECONDS:
            self._stalled = True
            get_metrics().source_stalls.labels(self._topic).inc()
            log.warning(
                "%s[%d]: no data for %.0f s although not read to its end at offset %d: "
                "is the broker reachable?",
                self._topic,
                self._partition,
                now - self._last_data,
                self._next_offset,
            )

    def next_awake(self) -> datetime | None:
        # An idle partition is polled every 20 ms instead of spinning a core.
        return datetime.now(UTC) + _IDLE_BACKOFF if self._idle else None

    def snapshot(self) -> int:
        return self._next_offset

    def close(self) -> None:
        self._consumer.close()


class CrmKafkaSource(FixedPartitionedSource[RawMessage, int]):
    """Every partition of the input topics, resuming from Bytewax recovery or Redis."""

    def __init__(
        self,
        brokers: list[str],
        topics: list[str],
        client_config: dict[str, Any],
        resume_offsets: Callable[[list[tuple[str, int]]], dict[tuple[str, int], tuple[int, int]]],
        batch_size: int,
        step_ms: int,
        tail: bool,
        signals: StopSignals | None = None,
    ):
        self._brokers = brokers
        self._topics = topics
        self._client_config = client_config
        self._resume_offsets = resume_offsets
        self._batch_size = batch_size
        self._step_ms = step_ms
        self._tail = tail
        self._signals = signals
        self._resume_cache: dict[tuple[str, int], tuple[int, int]] | None = None

    def _base_config(self) -> dict[str, Any]:
        return {"bootstrap.servers": ",".join(self._brokers), **self._client_config}

    def list_parts(self) -> list[str]:
        admin = AdminClient(self._base_config())
        parts = []
        for topic in self._topics:
            meta = admin.list_topics(topic, timeout=30).topics.get(topic)
            if meta is None or meta.error is not None or not meta.partitions:
                why = meta.error.str() if meta is not None and meta.error else "no partitions"
                raise SourceError(
                    f"input topic {topic!r} is not readable: {why} "
                    f"(create it with `crmstream topics create`)"
                )
            parts.extend(part_name(topic, p) for p in sorted(meta.partitions))
        return parts

    def positions(self) -> list[tuple[str, int]]:
        """Every input (topic, partition), as ``list_parts`` names them."""
        return [parse_part_name(p) for p in self.list_parts()]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _KafkaPartition:
        topic, partition = parse_part_name(for_part)
        # Redis, the state of record, says where to resume. A Bytewax recovery
        # snapshot may be ahead of it: shards hold read events until their step
        # is complete, and those are not in Redis yet.
        if self._resume_cache is None or (topic, partition) not in self._resume_cache:
            self._resume_cache = self._resume_offsets([(topic, partition)])
        start, step = self._resume_cache[(topic, partition)]
        if resume_state is not None and resume_state != start:
            log.info(
                "%s[%d]: recovery snapshot says offset %d, Redis progress says %d; using Redis",
                topic,
                partition,
                resume_state,
                start,
            )
        log.info("reading %s[%d] from offset %d", topic, partition, start)
        config = {
            **self._base_config(),
            "group.id": "crmstream-source",  # required by librdkafka; assign() never joins
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "auto.offset.reset": "earliest",
            "fetch.wait.max.ms": 50,
            "logger": logging.getLogger("librdkafka"),
        }
        return _KafkaPartition(
            config,
            topic,
            partition,
            start,
            step,
            self._step_ms,
            self._batch_size,
            self._tail,
            self._signals,
        )
