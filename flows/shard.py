"""Routing events to state shards, and the per-shard stateful step.

This module owns the batch path between parsing and Redis:

``route_batch`` parses one input batch (the only per-event Python work) and
emits exactly one ``ShardBatch`` per state shard, empty ones included, so that
every shard learns how far each input partition has been read.

``ShardLogic.on_batch`` then, per shard and batch:
1. drops what the shard already applied (offset <= its progress);
2. loads the batch's customers with one MGET and drops, per customer, events
   at or below the offsets recorded in that customer's state (replay);
3. runs the Numba kernel over the whole batch;
4. produces triggers and dead letters and waits for their delivery reports;
5. commits states, profiles and the shard's progress in one MULTI/EXEC.
Delivery before commit makes triggers at-least-once with stable ids; the
offsets inside the committed state make the state's effect exactly-once.
"""

from __future__ import annotations

import base64
import logging
import zlib
from collections import Counter
from collections.abc import Iterable
from typing import Any, NamedTuple

import numpy as np
import orjson
from bytewax.operators import StatefulBatchLogic

from crmstream.flows.runtime import Runtime
from crmstream.flows.source import RawMessage
from crmstream.metrics import get_metrics
from crmstream.operators.events import EVENT_CODE, EVENT_TYPES, InvalidEvent, ParsedEvent
from crmstream.operators.kernels import (
    COL,
    BatchEvents,
    Firings,
    apply_batch,
    derive_batch,
    params_from,
)
from crmstream.operators.rules import iso_ms
from crmstream.state.encoding import ROLE_INDEX, STAGES, decode_batch, encode_records
from crmstream.state.profile import event_fields, profile_fields

log = logging.getLogger(__name__)

Position = tuple[str, int]
PROGRESS_WRITE_INTERVAL_MS = 1000
_PROFILE_EVENT_CODES = frozenset(
    EVENT_CODE[k] for k in ("profile_updated", "consent_granted", "consent_withdrawn")
)
DEAD_LETTER_SCHEMA_VERSION = 1


class ShardBatch(NamedTuple):
    """What one input batch holds for one shard."""

    shard: int
    events: list[ParsedEvent]
    invalid: list[InvalidEvent]
    positions: dict[Position, int]  # last offset read per input partition in the batch


def shard_of(customer_id: str, shards: int) -> int:
    """Stable shard of a customer (CRC-32, the same in every process and run)."""
    return zlib.crc32(customer_id.encode()) % shards


def shard_key(shard: int) -> str:
    return f"{shard:04d}"


def route_batch(runtime: Runtime, batch: list[RawMessage]) -> list[tuple[str, ShardBatch]]:
    """Parse a batch and split it into one item per shard."""
    shards = runtime.config.processing.shards
    validator = runtime.validator
    now_ms = runtime.clock_ms()
    items = [ShardBatch(s, [], [], {}) for s in range(shards)]
    positions: dict[Position, int] = {}
    for msg in batch:
        result = validator.parse(
            msg.key, msg.value, msg.topic, msg.partition, msg.offset, msg.timestamp_ms, now_ms
        )
        if type(result) is ParsedEvent:
            items[shard_of(result.customer_id, shards)].events.append(result)
        else:
            owner = result.customer_id or f"{msg.topic}|{msg.partition}"
            items[shard_of(owner, shards)].invalid.append(result)
        pos = (msg.topic, msg.partition)
        if msg.offset > positions.get(pos, -1):
            positions[pos] = msg.offset
    for item in items:
        item.positions.update(positions)
    return [(shard_key(s), item) for s, item in enumerate(items)]


def dead_letter_record(bad: InvalidEvent) -> bytes:
    """The dead-letter envelope: reason, field, source position and the original bytes."""
    original = bad.value or b""
    try:
        text: str | None = original.decode("utf-8") if len(original) <= 4096 else None
    except UnicodeDecodeError:
        text = None
    return orjson.dumps(
        {
            "schema_version": DEAD_LETTER_SCHEMA_VERSION,
            "reason": bad.reason,
            "field": bad.field,
            "customer_id": bad.customer_id,
            "source": {"topic": bad.topic, "partition": bad.partition, "offset": bad.offset},
            "original_base64": base64.b64encode(original).decode("ascii"),
            "original_text": text,
        }
    )


class ShardLogic(StatefulBatchLogic[ShardBatch, dict[str, int], None]):
    """One state shard. Its durable state is in Redis; Bytewax snapshots hold nothing."""

    def __init__(self, runtime: Runtime):
        # Bytewax hands the builder no key, so the shard is learnt from the first item.
        self._rt = runtime
        self._params = params_from(runtime.config)
        self._shard = -1
        self._progress: dict[Position, int] = {}
        self._unsaved: dict[Position, int] = {}
        self._last_progress_write_ms = 0

    def snapshot(self) -> None:
        return None

    def on_batch(self, items: list[ShardBatch]) -> tuple[Iterable[dict[str, int]], bool]:
        if self._shard < 0:
            self._shard = items[0].shard
            self._progress = self._rt.store.load_progress(self._shard)
        events: list[ParsedEvent] = []
        invalid: list[InvalidEvent] = []
        positions: dict[Position, int] = {}
        metrics = get_metrics()
        for item in items:
            for ev in item.events:
                if ev.offset > self._progress.get((ev.topic, ev.partition), -1):
                    events.append(ev)
                else:
                    metrics.skipped_events.labels(ev.topic).inc()
            for bad in item.invalid:
                if bad.offset > self._progress.get((bad.topic, bad.partition), -1):
                    invalid.append(bad)
            for pos, off in item.positions.items():
                if off > positions.get(pos, -1):
                    positions[pos] = off
        positions = {p: o for p, o in positions.items() if o > self._progress.get(p, -1)}

        now_ms = self._rt.clock_ms()
        if not events and not invalid:
            self._unsaved.update(positions)
            if (
                self._unsaved
                and now_ms - self._last_progress_write_ms >= PROGRESS_WRITE_INTERVAL_MS
            ):
                self._commit({}, {}, now_ms)
            return [], StatefulBatchLogic.RETAIN

        for bad in invalid:
            metrics.invalid_events.labels(bad.topic, bad.field or "message").inc()
            self._rt.producer.produce(
                self._rt.config.kafka.topics.dead_letter, bad.key, dead_letter_record(bad)
            )
        states, profiles, triggers = self._apply(events, now_ms) if events else ({}, {}, [])
        if triggers or invalid:
            self._rt.producer.flush()  # delivery confirmed before the state commit
        self._unsaved.update(positions)
        self._commit(states, profiles, now_ms)
        for record in triggers:
            metrics.triggers.labels(record["trigger_type"]).inc()
        summary = {"events": len(events), "invalid": len(invalid), "triggers": len(triggers)}
        return [summary], StatefulBatchLogic.RETAIN

    def _commit(
        self, states: dict[str, bytes], profiles: dict[str, dict[str, str]], now_ms: int
    ) -> None:
        self._rt.store.commit(self._shard, states, profiles, self._unsaved)
        self._progress.update(self._unsaved)
        self._unsaved = {}
        self._last_progress_write_ms = now_ms

    def _apply(
        self, events: list[ParsedEvent], now_ms: int
    ) -> tuple[dict[str, bytes], dict[str, dict[str, str]], list[dict[str, Any]]]:
        """Load, update and encode the batch's customers; produce their triggers."""
        metrics = get_metrics()
        metrics.batch_events.observe(len(events))
        customers = list(dict.fromkeys(ev.customer_id for ev in events))
        index = {c: i for i, c in enumerate(customers)}
        store = self._rt.store
        records = decode_batch(
            store.load_states(customers), [store.state_key(c) for c in customers]
        )

        applied_part = records["applied_partition"]
        applied_off = records["applied_offset"]
        fresh: list[ParsedEvent] = []
        accepted: Counter[tuple[str, int]] = Counter()
        for ev in events:
            c, role = index[ev.customer_id], ROLE_INDEX[self._rt.validator.role(ev.topic)]
            if applied_part[c, role] == ev.partition and ev.offset <= applied_off[c, role]:
                metrics.skipped_events.labels(ev.topic).inc()
                continue
            if applied_part[c, role] != ev.partition:  # first event, or re-partitioned
                applied_part[c, role] = ev.partition
                applied_off[c, role] = ev.offset
            else:
                applied_off[c, role] = max(applied_off[c, role], ev.offset)
            fresh.append(ev)
            accepted[ev.topic, ev.type_code] += 1
        for (topic, code), count in accepted.items():
            metrics.events_in.labels(topic, EVENT_TYPES[code]).inc(count)

        n = len(fresh)
        columns = (
            np.fromiter((index[ev.customer_id] for ev in fresh), np.int32, n),
            np.fromiter((ev.type_code for ev in fresh), np.int8, n),
            np.fromiter((ev.category for ev in fresh), np.int16, n),
            np.fromiter((ev.event_time_ms for ev in fresh), np.int64, n),
            np.fromiter((ev.amount_base for ev in fresh), np.float64, n),
            np.fromiter((ev.aux for ev in fresh), np.float64, n),
        )
        # Per customer, apply in event-time order; ties keep arrival order.
        order = np.lexsort((np.arange(n), columns[3], columns[0]))
        firings, late = apply_batch(
            records, BatchEvents(*(c[order] for c in columns)), self._params
        )
        if late:
            metrics.late_events.inc(late)
        # Derived values as of each customer's newest event: the same on every replay.
        derived = derive_batch(records, records["last_seen_ms"].copy(), self._params)
        self._count_transitions(records, derived)

        triggers = self._emit_triggers(fresh, order, firings, now_ms)
        blobs = encode_records(records)
        states = dict(zip(customers, blobs, strict=True))
        profiles = self._profiles(customers, records, derived, fresh)
        return states, profiles, triggers

    def _emit_triggers(
        self, fresh: list[ParsedEvent], order: np.ndarray, firings: Firings, now_ms: int
    ) -> list[dict[str, Any]]:
        topic = self._rt.config.kafka.topics.triggers
        metrics = get_metrics()
        records = []
        for k in range(len(firings.event)):
            ev = fresh[order[firings.event[k]]]
            values = (int(firings.a[k]), int(firings.b[k]), int(firings.c[k]))
            record = self._rt.triggers.build(
                int(firings.rule[k]), ev.customer_id, ev.event_id, ev.event_time_ms, now_ms, values
            )
            emitted_ms = self._rt.clock_ms()
            record["emitted_at"] = iso_ms(emitted_ms)
            kind = record["trigger_type"]
            metrics.event_to_trigger_seconds.labels(kind).observe(
                max(0, emitted_ms - ev.event_time_ms) / 1000
            )
            metrics.ingest_to_emit_seconds.labels(kind).observe(
                max(0, emitted_ms - ev.ingest_ms) / 1000
            )
            self._rt.producer.produce(topic, ev.customer_id.encode(), orjson.dumps(record))
            records.append(record)
        return records

    @staticmethod
    def _count_transitions(records: np.ndarray, derived: np.ndarray) -> None:
        metrics = get_metrics()
        old = derived[:, COL["old_stage"]].astype(np.uint8)
        for stage in records["stage"][records["stage"] != old]:
            metrics.stage_transitions.labels(STAGES[stage]).inc()

    def _profiles(
        self,
        customers: list[str],
        records: np.ndarray,
        derived: np.ndarray,
        fresh: list[ParsedEvent],
    ) -> dict[str, dict[str, str]]:
        """The readable profile fields of the batch's customers."""
        config, weights = self._rt.config, self._params.churn_weights
        profiles = {
            c: profile_fields(records[i], derived[i], config, weights)
            for i, c in enumerate(customers)
        }
        for ev in fresh:
            if ev.type_code in _PROFILE_EVENT_CODES:
                kind = EVENT_TYPES[ev.type_code]
                profiles[ev.customer_id].update(event_fields(kind, ev.fields, ev.event_time_ms))
        return profiles
