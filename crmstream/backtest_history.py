"""The history a backtest replays: its source, its period, its events.

This module owns reading a backtest's input: a JSON-lines file or CDNOW (the
replay sources of ``flows.replay``), or Kafka topics (every record from the
start, in Kafka-time order, each routed to the flow's input topic of its event
type as a file's lines are); and the period (``--from``, ``--until``,
``--compare-from``) as event times.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime
from pathlib import Path
from typing import NamedTuple

import orjson
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from crmstream.config import CrmConfig
from crmstream.flows.replay import (
    ReplayError,
    route_event,
    source_events,
    topics_by_event_type,
)
from crmstream.flows.shard_step import SAME_TIME_ROLES
from crmstream.ops import reader_config
from crmstream.topics import TopicError, partitions_of

Event = tuple[str, bytes | None, bytes]
Progress = Callable[[str, int, int | None], None]


class BacktestError(RuntimeError):
    """The backtest cannot run as asked (bad input, configuration or infrastructure)."""


def parse_bound(text: str | None, end: bool, flag: str | None = None) -> int | None:
    """``--from`` / ``--until``: an ISO-8601 date (the whole day, UTC) or time (UTC unless
    it has an offset), as epoch ms; ``end``: a date means its last millisecond."""
    if text is None:
        return None
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            start = int(datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp() * 1000)
            return start + 86_399_999 if end else start
        when = datetime.fromisoformat(text)
    except ValueError:
        flag = flag or ("--until" if end else "--from")
        raise BacktestError(
            f"{flag} must be an ISO-8601 date or time (e.g. 2026-01-02 or "
            f"2026-01-02T08:00:00+00:00), got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


class Period(NamedTuple):
    """Which events a backtest replays (``from_ms`` .. ``until_ms``, inclusive; None:
    unbounded) and from when it compares what they fired (``compare_from_ms``: the
    events before it only build the customers' state)."""

    from_ms: int | None = None
    until_ms: int | None = None
    compare_from_ms: int | None = None

    @classmethod
    def parse(cls, start: str | None, until: str | None, compare_from: str | None) -> Period:
        """From ``--from``, ``--until`` and ``--compare-from``.

        :raises BacktestError: naming an unreadable or inconsistent bound."""
        period = cls(parse_bound(start, end=False), parse_bound(until, end=True),
                     parse_bound(compare_from, end=False, flag="--compare-from"))  # fmt: skip
        lo, hi, cmp = period
        if lo is not None and hi is not None and lo > hi:
            raise BacktestError(f"--from {start} is after --until {until}")
        if cmp is not None and ((lo is not None and cmp < lo) or (hi is not None and cmp > hi)):
            raise BacktestError(f"--compare-from {compare_from} is outside --from .. --until")
        return period


WHOLE_HISTORY = Period()


def event_ms(value: bytes) -> int | None:
    """The event time of a recorded event, or None when the flow could not read one."""
    from crmstream.operators.events import _Invalid, parse_time_ms

    try:
        body = orjson.loads(value)
        return parse_time_ms(body["event_time"])
    except (orjson.JSONDecodeError, TypeError, KeyError, _Invalid):
        return None


def within(events: list[Event], from_ms: int | None, until_ms: int | None) -> list[Event]:
    """The events with event times in [from_ms, until_ms]. With a bound, an event whose
    time cannot be read is left out (the flow would dead-letter it): nothing is moved
    between periods. Without one, every event is kept."""
    if from_ms is None and until_ms is None:
        return events
    lo = -(2**63) if from_ms is None else from_ms
    hi = 2**63 if until_ms is None else until_ms
    kept = []
    for ev in events:
        ms = event_ms(ev[2])
        if ms is not None and lo <= ms <= hi:
            kept.append(ev)
    return kept


def topic_events(
    config: CrmConfig, topics: list[str], on_progress: Progress | None = None
) -> list[Event]:
    """Every record of ``topics`` on the configured brokers, from the start, in Kafka-time
    order (then the role of the input topic it is routed to, as the flow orders ties, then
    topic, partition, offset), routed to the flow's input topics by event type as a file's
    lines are (``flows.replay.route_event``)."""
    brokers = list(config.kafka.brokers or [])
    consumer = Consumer(reader_config(brokers, config.kafka.consumer_properties()))
    found: list[tuple[int, str, int, int, bytes | None, bytes]] = []
    try:
        parts = []
        for topic in topics:
            try:
                ids = partitions_of(consumer, topic, 15)
            except TopicError as exc:
                raise BacktestError(f"--input: {exc}") from None
            parts += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in ids]
        consumer.assign(parts)
        pending = {(p.topic, p.partition) for p in parts}
        while pending:
            for msg in consumer.consume(1000, 1.0):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        pending.discard((msg.topic(), msg.partition()))
                        continue
                    raise BacktestError(f"--input: reading {msg.topic()}: {err.str()}")
                _kind, ts = msg.timestamp()
                found.append(
                    (ts, msg.topic(), msg.partition(), msg.offset(), msg.key(), msg.value() or b"")
                )
            if on_progress:
                on_progress("reading the input topics", len(found), None)
    finally:
        consumer.close()
    by_type = topics_by_event_type(config)
    fallback = config.kafka.topics.clickstream
    routed = [route_event(value, by_type, fallback, key) for *_, key, value in found]
    # Ties in Kafka time by the role of the topic each event goes to, as the flow orders
    # them (outsider 54: by the recorded topics' names, a consent withdrawn at T did not
    # stop the candidate of T when the names sorted the other way).
    topics_ = config.kafka.topics
    rank = {getattr(topics_, role): n for n, role in enumerate(SAME_TIME_ROLES)}
    order = sorted(
        range(len(found)), key=lambda i: (found[i][0], rank[routed[i][0]], found[i][1:4])
    )
    return [routed[i] for i in order]


def load_history(
    source: str,
    config: CrmConfig,
    from_ms: int | None,
    until_ms: int | None,
    on_progress: Progress | None = None,
) -> list[Event]:
    """The input events of ``source``: 'cdnow', a JSON-lines file, or (with brokers
    configured) comma-separated Kafka topics; routed to ``config``'s input topics.

    :raises BacktestError: when the source cannot be found or read.
    """
    if source == "cdnow" or Path(source).is_file():
        try:
            events = source_events(source, config)
        except ReplayError as exc:
            raise BacktestError(str(exc)) from None
    elif config.kafka.brokers:
        events = topic_events(
            config, [t.strip() for t in source.split(",") if t.strip()], on_progress
        )
    else:
        raise BacktestError(
            f"--input {source!r}: no such file; give a JSON-lines file, 'cdnow', or Kafka "
            f"topics with --brokers"
        )
    return within(events, from_ms, until_ms)
