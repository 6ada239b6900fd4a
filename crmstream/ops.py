"""Operator views of the output topics: latest triggers and suppressions, dead letters,
and one trigger explained.

This module owns reading crmstream's output topics for people. ``TopicReader``
assigns every partition (no consumer group, so downstream subscribers'
offsets are never touched) and reads from the end backwards: the newest
window of each partition first, then windows four times larger further back,
until the caller has what it asked for (``latest``) or the start of the topic
is reached, so ``--last 3`` reads a few records, not the topic. ``--since``
starts at the offsets for a time (Kafka's ListOffsets by timestamp; a broker
that cannot answer it is read from the start, filtered by time). ``follow``
then goes on with records as they arrive. Records are JSON; anything else is
counted and skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import orjson
from confluent_kafka import Consumer, KafkaError, TopicPartition

from crmstream.clients import librdkafka_config
from crmstream.topics import TopicError, partitions_of

log = logging.getLogger(__name__)
_NO_PROGRESS_S = 60.0


def reader_config(brokers: list[str], client: dict[str, Any]) -> dict[str, Any]:
    """The consumer configuration of ``TopicReader`` (``client``: the consumer's
    librdkafka properties)."""
    return {
        **librdkafka_config(brokers, client),
        "group.id": "crmstream-cli",  # required by librdkafka; assign() joins no group
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    }


class Record(NamedTuple):
    topic: str
    partition: int
    offset: int
    timestamp_ms: int
    value: dict[str, Any]


_Part = tuple[str, int]


class TopicReader:
    """Every partition of ``topics``, read newest first (see module docstring)."""

    def __init__(
        self, brokers: list[str], properties: dict[str, Any], topics: list[str], timeout_s: float
    ):
        self._consumer = Consumer(reader_config(brokers, properties))
        self.read = 0  # records read, for the caller's log
        self.skipped = 0  # records that were not JSON objects
        self._low: dict[_Part, int] = {}
        self._high: dict[_Part, int] = {}
        self._resume: dict[_Part, int] = {}  # where follow() goes on
        try:
            for topic in topics:
                for p in partitions_of(self._consumer, topic, timeout_s):
                    low, high = self._consumer.get_watermark_offsets(
                        TopicPartition(topic, p), timeout=timeout_s
                    )
                    self._low[topic, p], self._high[topic, p] = max(0, low), max(0, high)
        except BaseException:
            self._consumer.close()
            raise

    def close(self) -> None:
        self._consumer.close()

    def __enter__(self) -> TopicReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def latest(
        self,
        enough: Callable[[list[Record]], bool],
        first_window: int = 200,
        since_ms: int | None = None,
    ) -> list[Record]:
        """The newest records, read in windows from the end back until ``enough(records)``
        or the start of every partition (or ``since_ms``), oldest first."""
        if since_ms is not None:
            starts = self._offsets_for(since_ms)
            records = [r for r in self._window(starts, {}) if r.timestamp_ms >= since_ms]
            return sorted(records, key=_order)
        size = max(1, first_window)
        stops: dict[_Part, int] = {}  # a missing entry: up to the end
        starts = {pos: max(self._low[pos], self._high[pos] - size) for pos in self._low}
        records: list[Record] = []
        while True:
            records = self._window(starts, stops) + records
            if enough(records) or all(starts[pos] <= self._low[pos] for pos in starts):
                break
            stops = {pos: start for pos, start in starts.items() if start > self._low[pos]}
            size *= 4
            starts = {pos: max(self._low[pos], stop - size) for pos, stop in stops.items()}
        log.info("read %d records of %s in windows from the end", self.read, sorted(self._low))
        return sorted(records, key=_order)

    def every(self) -> list[Record]:
        """Every record of the topics, from each partition's start to its end, oldest
        first."""
        return sorted(self._window(dict(self._low), {}), key=_order)

    def _offsets_for(self, since_ms: int) -> dict[_Part, int]:
        wanted = [TopicPartition(t, p, since_ms) for t, p in self._low]
        try:
            found = self._consumer.offsets_for_times(wanted, timeout=15)
        except Exception as exc:  # a broker without ListOffsets by time: read it all
            log.info("offsets for times unavailable (%s): reading from the start", exc)
            return dict(self._low)
        starts = {}
        for tp in found:
            pos = (tp.topic, tp.partition)
            # -1: nothing at or after that time; read from the end (EOF) then.
            starts[pos] = self._high[pos] if tp.offset < 0 else max(self._low[pos], tp.offset)
        return starts

    def _window(self, starts: dict[_Part, int], stops: dict[_Part, int]) -> list[Record]:
        """The records from each partition's start to its stop (excluded; no stop: to its
        end), and where each partition ended for ``follow``."""
        todo = {pos for pos in starts if stops.get(pos, 1 << 62) > starts[pos]}
        if not todo:
            return []
        self._consumer.assign([TopicPartition(t, p, starts[t, p]) for t, p in sorted(todo)])
        out: list[Record] = []
        last_progress = time.monotonic()
        while todo:
            batch = self._consumer.consume(500, 0.2)
            if batch:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > _NO_PROGRESS_S:
                raise TopicError(f"no data from {sorted(todo)} for {_NO_PROGRESS_S:g} s")
            for msg in batch:
                pos = (msg.topic(), msg.partition())
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if pos not in stops:
                            self._resume[pos] = msg.offset()
                        todo.discard(pos)
                        continue
                    raise TopicError(f"reading {pos[0]}[{pos[1]}]: {err.str()}")
                if pos not in todo:
                    continue
                stop = stops.get(pos)
                if stop is not None and msg.offset() >= stop:
                    todo.discard(pos)
                    continue
                self.read += 1
                record = self._record(msg)
                if record is not None:
                    out.append(record)
                if stop is not None and msg.offset() >= stop - 1:
                    todo.discard(pos)
        return out

    def _record(self, msg: Any) -> Record | None:
        try:
            value = orjson.loads(msg.value())
        except orjson.JSONDecodeError:
            value = None
        if not isinstance(value, dict):
            self.skipped += 1
            return None
        _kind, ts = msg.timestamp()
        return Record(msg.topic(), msg.partition(), msg.offset(), ts, value)

    def follow(self, stop: Callable[[], bool]) -> Iterator[Record]:
        """Records as they arrive after those ``latest`` read, until ``stop()``."""
        resume = {pos: self._resume.get(pos, self._high[pos]) for pos in self._low}
        self._consumer.assign([TopicPartition(t, p, off) for (t, p), off in sorted(resume.items())])
        while not stop():
            for msg in self._consumer.consume(500, 0.2):
                err = msg.error()
                if err is not None:
                    if err.code() != KafkaError._PARTITION_EOF:
                        raise TopicError(f"reading {msg.topic()}[{msg.partition()}]: {err.str()}")
                    continue
                record = self._record(msg)
                if record is not None:
                    yield record
                if stop():
                    return


def _order(record: Record) -> tuple[int, str, int, int]:
    return (record.timestamp_ms, record.topic, record.partition, record.offset)


class AmbiguousId(TopicError):
    """A trigger id prefix matches more than one id."""


MIN_PREFIX = 8


def find_trigger(reader: TopicReader, id_or_prefix: str) -> list[Record]:
    """Every record whose ``trigger_id`` is ``id_or_prefix`` or starts with it (newest
    first window that holds one); [] when none does.

    :raises AmbiguousId: when those records hold more than one id.
    """

    def matching(records: list[Record]) -> list[Record]:
        return [r for r in records if str(r.value.get("trigger_id", "")).startswith(id_or_prefix)]

    found = matching(reader.latest(lambda records: bool(matching(records)), first_window=2000))
    ids = sorted({r.value["trigger_id"] for r in found})
    if len(ids) > 1:
        shown = ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")
        raise AmbiguousId(f"trigger id prefix {id_or_prefix!r} matches {len(ids)} ids: {shown}")
    return found
