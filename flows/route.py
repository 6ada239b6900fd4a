"""Routing parsed events to state shards: one item per shard per processing step.

This module owns the only per-event Python work of the flow besides the
shard step: ``route_batch`` parses one input batch and emits exactly one
``ShardBatch`` per state shard and processing step, empty ones included, so
that every shard learns how far each input partition has been read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, NamedTuple
from zlib import crc32

from crmstream.flows.runtime import Runtime
from crmstream.flows.source import CAUGHT_UP_OFFSET, RawMessage
from crmstream.operators.events import InvalidEvent, ParsedEvent, new_tuple
from crmstream.state.layout import shard_of
from crmstream.state.store import Position

log = logging.getLogger(__name__)


class ShardBatch(NamedTuple):
    """What one processing step of an input batch holds for one shard.

    The progress fields are shared by all shards: every shard learns how far
    each input partition has been read, and which partitions are at their end.
    An item with ``step == NO_STEP`` carries only ``caught_up``.
    """

    shard: int
    step: int
    events: list[ParsedEvent]
    invalid: list[InvalidEvent]
    positions: dict[Position, int]  # last offset read per input partition in this step
    event_times: dict[Position, int]  # newest valid event time per input partition
    marks: dict[Position, tuple[int, int]]  # the record at each position: (Kafka time, CRC)
    caught_up: frozenset[Position]  # partitions read to their end (after this item's data)

    def __reduce__(self) -> tuple[Callable[..., ShardBatch], tuple[Any, ...]]:
        """Pickled (by Bytewax, for a shard on another worker process) with its events as
        plain tuples. Pickle writes a namedtuple as its class and a call per instance:
        2.9 µs per event to dump and 1.2 to load, against 1.0 and 1.1 as tuples
        (``make bench-exchange``; bench/RESULTS.md, round 12)."""
        return _shard_batch, (
            self.shard,
            self.step,
            [tuple(ev) for ev in self.events],
            [tuple(bad) for bad in self.invalid],
            self.positions,
            self.event_times,
            self.marks,
            self.caught_up,
        )


def _shard_batch(
    shard: int,
    step: int,
    events: list[tuple[Any, ...]],
    invalid: list[tuple[Any, ...]],
    positions: dict[Position, int],
    event_times: dict[Position, int],
    marks: dict[Position, tuple[int, int]],
    caught_up: frozenset[Position],
) -> ShardBatch:
    """A pickled ``ShardBatch`` back (``ShardBatch.__reduce__``)."""
    return ShardBatch(
        shard,
        step,
        [new_tuple(ParsedEvent, ev) for ev in events],
        [new_tuple(InvalidEvent, bad) for bad in invalid],
        positions,
        event_times,
        marks,
        caught_up,
    )


NO_STEP = -1


class _StepParts:
    __slots__ = ("event_times", "events", "invalid", "marks", "positions")

    def __init__(self, shards: int):
        self.events: list[list[ParsedEvent]] = [[] for _ in range(shards)]
        self.invalid: list[list[InvalidEvent]] = [[] for _ in range(shards)]
        self.positions: dict[Position, int] = {}
        self.event_times: dict[Position, int] = {}
        self.marks: dict[Position, tuple[int, int]] = {}


def _end_run(
    parts: _StepParts, pos: Position, last_offset: int, newest: int, last: tuple[int, bytes | None]
) -> None:
    """A run of one partition's messages ended; ``last``: its last record's Kafka time and
    value, which tell it from another record at its offset (``flows.input_ends``)."""
    if last_offset > parts.positions.get(pos, -1):
        parts.positions[pos] = last_offset
        parts.marks[pos] = (last[0], crc32(last[1] or b""))
    if newest > parts.event_times.get(pos, -1):
        parts.event_times[pos] = newest


def route_batch(
    runtime: Runtime, batch: list[RawMessage], keys: list[str]
) -> list[tuple[str, ShardBatch]]:
    """Parse a batch and split it into one item per shard per processing step, keyed by
    ``keys[shard]`` (``routing.shard_keys``: the key decides the worker)."""
    shards = runtime.config.processing.shards
    parse = runtime.validator.parse
    now_ms = runtime.clock_ms()
    steps: dict[int, _StepParts] = {}
    caught_up = set()
    # Messages come in runs of one partition and step (source.RawMessage): a run's
    # last offset and newest event time are recorded when it ends, not per message.
    parts: _StepParts | None = None
    # The run's partition, step and topic, compared one by one: no tuple per message.
    run_partition, run_step, run_topic = -1, NO_STEP, ""
    last_offset = newest = last_stamp = -1
    last_value: bytes | None = None
    for key, value, topic, partition, offset, timestamp_ms, step in batch:
        if (
            offset == CAUGHT_UP_OFFSET
            or partition != run_partition
            or step != run_step
            or topic != run_topic
        ):
            if parts is not None:
                last = (last_stamp, last_value)
                _end_run(parts, (run_topic, run_partition), last_offset, newest, last)
                parts = None
            if offset == CAUGHT_UP_OFFSET:
                caught_up.add((topic, partition))
                run_partition, run_step, run_topic = -1, NO_STEP, ""
                continue
            caught_up.discard((topic, partition))
            run_partition, run_step, run_topic, newest = partition, step, topic, -1
            parts = steps.get(step)
            if parts is None:
                parts = steps[step] = _StepParts(shards)
            events, invalid = parts.events, parts.invalid
        try:
            result = parse(key, value, topic, partition, offset, timestamp_ms, now_ms)
        except Exception as error:  # a message must never stop the flow (decision 14)
            result = _unparseable(error, key, value, topic, partition, offset)
        if type(result) is ParsedEvent:
            # state.layout.shard_of in line: no call per message
            events[crc32(result.customer_id.encode()) % shards].append(result)
            if result.event_time_ms > newest:
                newest = result.event_time_ms
        else:
            owner = result.customer_id or f"{topic}|{partition}"
            invalid[shard_of(owner, shards)].append(result)
        last_offset, last_stamp, last_value = offset, timestamp_ms, value
    if parts is not None:
        _end_run(parts, (run_topic, run_partition), last_offset, newest, (last_stamp, last_value))
    done = frozenset(caught_up)
    if not steps:
        return (
            [(keys[s], ShardBatch(s, NO_STEP, [], [], {}, {}, {}, done)) for s in range(shards)]
            if done
            else []
        )
    out = []
    last = max(steps)
    for step in sorted(steps):
        p = steps[step]
        flags = done if step == last else frozenset()
        out.extend(
            (
                keys[s],
                ShardBatch(
                    s, step, p.events[s], p.invalid[s], p.positions, p.event_times, p.marks, flags
                ),
            )
            for s in range(shards)
        )
    return out


def _unparseable(
    error: Exception, key: bytes | None, value: bytes | None, topic: str, partition: int,
    offset: int,
) -> InvalidEvent:  # fmt: skip
    """The dead letter of a message whose validation raised instead of rejecting it."""
    from crmstream.flows.quarantine import reason_of

    log.error("%s[%d]@%d: validation raised %s", topic, partition, offset, reason_of(error))
    return InvalidEvent(reason_of(error), None, None, key, value, topic, partition, offset)
