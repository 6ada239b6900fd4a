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
4. commits states, profiles, the outgoing records (triggers, suppressions,
   dead letters) into the shard's outbox and the shard's progress in one
   MULTI/EXEC;
5. produces the outgoing records without waiting; a later commit trims the
   ones the broker acknowledged (``flows.sink.Outbox``).
The outbox makes triggers at-least-once with stable ids and keeps the broker
out of the step's critical path; the offsets inside the committed state make
the state's effect exactly-once.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from datetime import UTC, datetime, timedelta
from itertools import compress
from operator import attrgetter
from typing import Any, NamedTuple
from zlib import crc32

import numpy as np
import orjson
from bytewax.operators import StatefulBatchLogic

from crmstream.flows.dead_letters import dead_letter_record
from crmstream.flows.runtime import Runtime
from crmstream.flows.sink import (
    Outbox,
    Outgoing,
    bound_outgoing,
    decode_outgoing,
    encode_outgoing,
)
from crmstream.flows.source import CAUGHT_UP_OFFSET, RawMessage
from crmstream.metrics import get_metrics
from crmstream.operators.catalog import (
    TIMER_EVENT_CODES,
    WAKE,
    Before,
    Candidate,
    TimerPlan,
    TriggerCatalog,
)
from crmstream.operators.events import (
    EVENT_CODE,
    EVENT_TYPES,
    InvalidEvent,
    ParsedEvent,
    new_tuple,
    parse_time_ms,
)
from crmstream.operators.hashing import event_id_digests
from crmstream.operators.kernels import (
    COL,
    FRESH,
    REPLAYED,
    BatchEvents,
    apply_batch,
    check_batch,
    derive_batch,
    params_from,
)
from crmstream.operators.policies import PolicyEngine
from crmstream.operators.rules import iso_ms
from crmstream.state.encoding import (
    ROLE_INDEX,
    STAGES,
    decode_batch,
    encode_records,
)
from crmstream.state.layout import shard_of
from crmstream.state.profile import event_fields, profile_changed, profile_rows
from crmstream.state.store import Position, Progress
from crmstream.state.timers import Timer, parse_member

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_MS = 1000
ERASURE_REQUESTED = EVENT_CODE["erasure_requested"]
# Type codes as arrays, for np.isin over a step's events: those whose customer's open
# orders a step loads, and those that schedule timers or fire event-driven triggers.
_DELIVERY_CODES = np.array(
    [EVENT_CODE[k] for k in ("order_shipped", "order_delivered", "logistics_update")], np.int8
)
_TIMER_CODES = np.array(sorted(TIMER_EVENT_CODES), np.int8)
_PROFILE_EVENT_CODES = frozenset(
    EVENT_CODE[k] for k in ("profile_updated", "consent_granted", "consent_withdrawn")
)
_NOTHING = Progress(-1, -1, -1)
_MAX_TIMER_ROUNDS = 10_000
# Timer kinds a step fires from its own plan when they are already due (see
# ShardLogic._fire_ready): those that need only the customer's record. Delivery
# timers need the stored promises, and rechecks (a re-derivation) and birthdays
# wait for the next round, in the customer's wake. Quiet-hours holds are made by the policies,
# which let those already over go out at once (ShardLogic._policy).
_NOT_IN_STEP = frozenset({"delivery", "recheck", "birthday", WAKE, "deferred"})


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
            self.caught_up,
        )


def _shard_batch(
    shard: int,
    step: int,
    events: list[tuple[Any, ...]],
    invalid: list[tuple[Any, ...]],
    positions: dict[Position, int],
    event_times: dict[Position, int],
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
        caught_up,
    )


NO_STEP = -1


class _StepParts:
    __slots__ = ("event_times", "events", "invalid", "positions")

    def __init__(self, shards: int):
        self.events: list[list[ParsedEvent]] = [[] for _ in range(shards)]
        self.invalid: list[list[InvalidEvent]] = [[] for _ in range(shards)]
        self.positions: dict[Position, int] = {}
        self.event_times: dict[Position, int] = {}


def _end_run(parts: _StepParts, pos: Position, last_offset: int, newest: int) -> None:
    if last_offset > parts.positions.get(pos, -1):
        parts.positions[pos] = last_offset
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
    last_offset = newest = -1
    for key, value, topic, partition, offset, timestamp_ms, step in batch:
        if (
            offset == CAUGHT_UP_OFFSET
            or partition != run_partition
            or step != run_step
            or topic != run_topic
        ):
            if parts is not None:
                _end_run(parts, (run_topic, run_partition), last_offset, newest)
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
        result = parse(key, value, topic, partition, offset, timestamp_ms, now_ms)
        if type(result) is ParsedEvent:
            # state.layout.shard_of in line: no call per message
            events[crc32(result.customer_id.encode()) % shards].append(result)
            if result.event_time_ms > newest:
                newest = result.event_time_ms
        else:
            owner = result.customer_id or f"{topic}|{partition}"
            invalid[shard_of(owner, shards)].append(result)
        last_offset = offset
    if parts is not None:
        _end_run(parts, (run_topic, run_partition), last_offset, newest)
    done = frozenset(caught_up)
    if not steps:
        return (
            [(keys[s], ShardBatch(s, NO_STEP, [], [], {}, {}, done)) for s in range(shards)]
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
                ShardBatch(s, step, p.events[s], p.invalid[s], p.positions, p.event_times, flags),
            )
            for s in range(shards)
        )
    return out


class Watermark:
    """A shard's event-time watermark over the input partitions.

    The watermark is the lowest, over partitions that still hold it back, of
    each partition's newest event time: no timer fires while a lagging
    partition (say, orders behind clickstream) could still cancel it. A
    partition holds it back after step n while it has data in a later step or
    is not read to its end; when none does, it is the newest event time. In
    live mode an input idle for ``idle_ms`` lets it follow the wall clock.
    Per-partition times are committed with the shard's progress and seeded
    from it on restart, so a replayed step sees the watermark it first saw.
    """

    def __init__(self) -> None:
        self._times: dict[Position, int] = {}
        self._last_data_ms = 0

    def seed(self, pos: Position, max_event_ms: int) -> None:
        if max_event_ms > self._times.get(pos, -1):
            self._times[pos] = max_event_ms

    def newest(self, pos: Position) -> int:
        return self._times.get(pos, -1)

    def observe(self, event_times: dict[Position, int], wall_ms: int) -> None:
        for pos, ts in event_times.items():
            if ts > self._times.get(pos, -1):
                self._times[pos] = ts
        self._last_data_ms = wall_ms

    def value(
        self, holding: Callable[[Position], bool], live: bool, wall_ms: int, idle_ms: int
    ) -> int | None:
        active = [t for p, t in self._times.items() if holding(p)]
        mark = min(active) if active else max(self._times.values(), default=None)
        if live and not active and wall_ms - self._last_data_ms >= idle_ms:
            mark = wall_ms if mark is None else max(mark, wall_ms)
        return mark


class _Step:
    """A processing step's input gathered for one shard until every partition has passed it."""

    __slots__ = ("event_times", "events", "invalid", "positions")

    def __init__(self) -> None:
        self.events: list[ParsedEvent] = []
        self.invalid: list[InvalidEvent] = []
        self.positions: dict[Position, int] = {}
        self.event_times: dict[Position, int] = {}

    def add(self, item: ShardBatch) -> None:
        self.events += item.events
        self.invalid += item.invalid
        for pos, off in item.positions.items():
            if off > self.positions.get(pos, -1):
                self.positions[pos] = off
        for pos, ts in item.event_times.items():
            if ts > self.event_times.get(pos, -1):
                self.event_times[pos] = ts


def _columns(events: list[ParsedEvent]) -> ParsedEvent:
    """The events transposed: each field of the result is the tuple of that field's values."""
    if not events:
        return ParsedEvent._make(() for _ in ParsedEvent._fields)
    return ParsedEvent._make(zip(*events, strict=True))


# An event's place in the input: (topic, partition, offset).
_input_order = attrgetter("topic", "partition", "offset")


class ShardLogic(StatefulBatchLogic[ShardBatch, dict[str, int], None]):
    """One state shard. Its durable state is in Redis; Bytewax snapshots hold nothing.

    Input is applied one processing step at a time (``source.RawMessage.step``). A
    step is applied once every input partition has delivered a later step or
    is read to its end, with its events in (topic, partition, offset) order:
    what a step holds, and so the state, the triggers and the timers, follow
    from the input log alone, not from how reads happened to be batched.
    """

    def __init__(self, runtime: Runtime, live: bool, partitions: list[Position]):
        # Bytewax hands the builder no key, so the shard is learnt from the first item.
        self._rt = runtime
        self._live = live
        self._partitions = partitions
        self._params = params_from(runtime.config)
        self._catalog = TriggerCatalog(runtime.config, self._params.churn_weights)
        self._policies = PolicyEngine(runtime.config)
        self._timers_cfg = runtime.config.timers
        self._dedup_horizon_ms = runtime.config.processing.dedup_horizon_seconds * 1000
        self._exactly_once = runtime.config.processing.exactly_once
        self._shard = -1
        self._progress: dict[Position, Progress] = {}
        self._unsaved: dict[Position, Progress] = {}
        self._last_progress_write_ms = 0
        self._watermark = Watermark()
        self._checked_until = -1  # timers due up to here have been fired
        self._pending: dict[int, _Step] = {}
        self._last_step: dict[Position, int] = {}
        self._caught_up: set[Position] = set()
        self._applied_step = NO_STEP
        # Live input: when each partition last reached its end, and when each
        # pending step got its first data (see _passed).
        self._end_seen_ms: dict[Position, int] = {}
        self._step_opened_ms: dict[int, int] = {}
        self._outbox = Outbox(runtime.producer)  # named once the shard is known

    def snapshot(self) -> None:
        return None

    def notify_at(self) -> datetime | None:
        if not self._live or self._shard < 0:
            return None
        return datetime.now(UTC) + timedelta(milliseconds=self._timers_cfg.tick_ms)

    def on_notify(self) -> tuple[Iterable[dict[str, int]], bool]:
        return self._run([], [], {}), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[Iterable[dict[str, int]], bool]:
        if self._shard < 0:
            return [], StatefulBatchLogic.RETAIN
        summaries = []
        for step in sorted(self._pending):
            summaries += self._apply_step(step)
        summaries += self._run([], [], {})
        if self._exactly_once and self._outbox.pending():
            self._rt.producer.flush()
            self._commit(Changes.none(), self._rt.clock_ms())  # trims the outbox
        return summaries, StatefulBatchLogic.RETAIN

    def on_batch(self, items: list[ShardBatch]) -> tuple[Iterable[dict[str, int]], bool]:
        if self._shard < 0:
            self._shard = items[0].shard
            self._progress = self._rt.store.load_progress(self._shard)
            for pos, rec in self._progress.items():
                self._watermark.seed(pos, rec.max_event_ms)
            self._outbox = Outbox(self._rt.producer, f"shard {self._shard} outbox")
            self._resend_outbox()
        wall_ms = self._rt.clock_ms()
        for item in items:
            if item.step != NO_STEP:
                # Live input can bring more of a step already applied: it is applied
                # as more of that step. Never as a later one: step numbers follow the
                # input's Kafka time, and a restart resumes from them (RawMessage.step).
                step = max(item.step, self._applied_step)
                pending = self._pending.get(step)
                if pending is None:
                    pending = self._pending[step] = _Step()
                    self._step_opened_ms[step] = wall_ms
                pending.add(item)
                for pos in item.positions:
                    self._caught_up.discard(pos)
                    if item.step > self._last_step.get(pos, NO_STEP):
                        self._last_step[pos] = item.step
            self._caught_up.update(item.caught_up)
            for pos in item.caught_up:
                self._end_seen_ms[pos] = wall_ms
        summaries = []
        while self._pending:
            step = min(self._pending)
            if not all(self._passed(pos, step) for pos in self._partitions):
                break
            summaries += self._apply_step(step)
        return summaries, StatefulBatchLogic.RETAIN

    def _resend_outbox(self) -> None:
        """Produce what an earlier run committed to the outbox and did not see delivered."""
        left = self._rt.store.load_outbox(self._shard)
        if left:
            log.warning(
                "shard %d: sending %d record(s) left in the outbox by an earlier run "
                "(at-least-once: same ids)",
                self._shard,
                len(left),
            )
            self._outbox.send(decode_outgoing(entry) for entry in left)

    def _passed(self, pos: Position, step: int) -> bool:
        """The partition will bring nothing more for this step.

        Bounded runs (backfills, replays, the crash test) wait for proof: a
        later step from the partition, or its end. Live input under steady load
        rarely has every partition at its end at once, so there a partition
        that reached its end since the step opened has passed it: what it
        brings later of this step is applied as more of it (latency over
        determinism; a bounded replay of the same log is still deterministic).
        """
        if pos in self._caught_up or self._last_step.get(pos, NO_STEP) > step:
            return True
        return self._live and self._end_seen_ms.get(pos, -1) >= self._step_opened_ms[step]

    def _holds(self, pos: Position) -> bool:
        """The partition holds the watermark back: it has more to deliver after this step."""
        return pos not in self._caught_up or self._last_step.get(pos, NO_STEP) > self._applied_step

    def _close_step(self, step: int) -> _Step:
        """Take a step's input out of the pending ones; it is the step applied now."""
        pending = self._pending.pop(step)
        self._step_opened_ms.pop(step, None)
        self._applied_step = step
        return pending

    def _apply_step(self, step: int) -> list[dict[str, int]]:
        pending = self._close_step(step)
        self._watermark.observe(pending.event_times, self._rt.clock_ms())
        floors = {pos: self._progress.get(pos, _NOTHING).offset for pos in pending.positions}
        positions = {
            pos: Progress(off, step, self._watermark.newest(pos))
            for pos, off in pending.positions.items()
            if off > floors[pos]
        }
        if not positions:
            # Applied and committed before a restart: the timers it fired are gone
            # from Redis, and firing later ones now would run ahead of the input.
            return []
        events, invalid = pending.events, pending.invalid
        events.sort(key=_input_order)
        invalid.sort(key=_input_order)
        # Drop what a restart re-read and this shard had already applied: per input
        # partition, the events at or below its committed offset, found by bisection.
        metrics = get_metrics()
        for (topic, partition), floor in floors.items():
            if floor < 0:
                continue
            lo = bisect_left(events, (topic, partition, -1), key=_input_order)
            hi = bisect_right(events, (topic, partition, floor), key=_input_order)
            if hi > lo:
                del events[lo:hi]
                metrics.skipped_events.labels(topic).inc(hi - lo)
            lo = bisect_left(invalid, (topic, partition, -1), key=_input_order)
            del invalid[lo : bisect_right(invalid, (topic, partition, floor), key=_input_order)]
        return self._run(events, invalid, positions)

    def _run(
        self,
        events: list[ParsedEvent],
        invalid: list[InvalidEvent],
        positions: dict[Position, Progress],
    ) -> list[dict[str, int]]:
        """Process, then fire timers that became due meanwhile (rescheduled, or newly set
        with a due time the watermark has passed) until none is left."""
        summaries = [self._process(events, invalid, positions)]
        while summaries[-1]["again"]:
            if len(summaries) > _MAX_TIMER_ROUNDS:
                log.warning(
                    "shard %d: timers still due after %d rounds", self._shard, _MAX_TIMER_ROUNDS
                )
                break
            summaries.append(self._process([], [], {}))
        return summaries

    def _process(
        self,
        events: list[ParsedEvent],
        invalid: list[InvalidEvent],
        positions: dict[Position, Progress],
    ) -> dict[str, int]:
        """Apply events, fire due timers, emit, commit. One Redis load and one commit."""
        now_ms = self._rt.clock_ms()
        self._unsaved.update(positions)
        mark = self._watermark.value(
            self._holds, self._live, now_ms, self._timers_cfg.idle_watermark_ms
        )
        metrics = get_metrics()
        if mark is not None:
            metrics.watermark_lag.labels(str(self._shard)).set(max(0, now_ms - mark) / 1000)
        due: list[Timer] = []
        if mark is not None and mark > self._checked_until:
            due = self._rt.store.timers.due(self._shard, mark, self._timers_cfg.fire_batch)
            if len(due) < self._timers_cfg.fire_batch:
                self._checked_until = mark
        if not events and not invalid and not due:
            self._outbox.watch()  # delivery reports
            since_write = now_ms - self._last_progress_write_ms
            idle_write = self._unsaved or self._outbox.done()
            if idle_write and since_write >= PROGRESS_WRITE_INTERVAL_MS:
                self._commit(Changes.none(), now_ms)
            return {"events": 0, "invalid": 0, "triggers": 0, "timers": 0, "again": 0}

        dead_letters = self._rt.config.kafka.topics.dead_letter
        outgoing = []
        for bad in invalid:
            metrics.invalid_events.labels(bad.topic, bad.field or "message").inc()
            record = dead_letter_record(bad, self._rt.validator.redact)
            outgoing.append(Outgoing(dead_letters, bad.key, record))
        changes = self._apply(events, due, now_ms, mark)
        outgoing += changes.outgoing
        outgoing = bound_outgoing(outgoing, self._rt.producer)  # nothing the producer refuses
        if self._live:
            for timer in (*due, *changes.chained):
                metrics.timer_lateness_seconds.observe(max(0, now_ms - timer.due_ms) / 1000)
        if self._exactly_once:
            self._commit(changes, now_ms, outgoing)
            self._outbox.send(outgoing)
        else:
            for record in outgoing:
                self._rt.producer.produce(*record)
            self._commit(changes, now_ms)
        self._outbox.watch()
        for kind, count in Counter(r["trigger_type"] for r in changes.triggers).items():
            metrics.triggers.labels(kind).inc(count)
        again = len(due) >= self._timers_cfg.fire_batch
        if mark is not None and any(t.due_ms <= mark for t in changes.plan.schedule):
            self._checked_until = -1  # a new timer is already due
            again = True
        return {
            "events": len(events),
            "invalid": len(invalid),
            "triggers": len(changes.triggers),
            "timers": len(due) + len(changes.chained),
            "again": int(again),
        }

    def _commit(self, changes: Changes, now_ms: int, outgoing: list[Outgoing] = ()) -> None:
        self._rt.store.commit(
            self._shard,
            changes.states,
            changes.profiles,
            self._unsaved,
            changes.plan,
            changes.fired,
            changes.erase,
            atomic=self._exactly_once,
            customers_delta=changes.customers_delta,
            outbox=[encode_outgoing(record) for record in outgoing],
            outbox_trim=self._outbox.take_done(),
        )
        get_metrics().outbox_records.labels(str(self._shard)).set(
            self._outbox.pending() + len(outgoing)
        )
        self._progress.update(self._unsaved)
        self._unsaved = {}
        self._last_progress_write_ms = now_ms

    def _apply(
        self, events: list[ParsedEvent], due: list[Timer], now_ms: int, mark: int | None
    ) -> Changes:
        """Load, update and encode the customers of the events and due timers
        (``mark``: the watermark, up to which timers are due)."""
        metrics = get_metrics()
        if events:
            metrics.batch_events.observe(len(events))
        # The events' fields as columns, transposed once in C (not a generator per
        # field), shared by the exactly-once checks and the kernel.
        cols = _columns(events)
        type_codes = np.fromiter(cols.type_code, np.int8, len(events))
        with_events = dict.fromkeys(cols.customer_id)
        customers = list(with_events | dict.fromkeys([t.customer for t in due]))
        index = {c: i for i, c in enumerate(customers)}
        store = self._rt.store
        needs_promises = {t.customer for t in due if t.kind == "delivery"}
        needs_promises.update(compress(cols.customer_id, np.isin(type_codes, _DELIVERY_CODES)))
        blobs, promises = store.load_states(customers, sorted(needs_promises))
        records = decode_batch(blobs, [store.state_key(c) for c in customers])
        fired = [t.member for t in due]
        wakes = [t for t in due if t.kind == WAKE]
        woke = {t.customer for t in wakes}
        if wakes:
            bounds = [t.due_ms if mark is None else mark for t in wakes]
            stood = self._catalog.expand_wakes(wakes, records, index, bounds)
            due = [one for t in due for one in (stood[t.customer] if t.kind == WAKE else (t,))]
        n_read = len(events)
        events, touched = self._drop_erased(events, with_events, due, store.last_tombstones)
        if len(events) < n_read:  # an erased customer's late events
            cols = _columns(events)
            type_codes = np.fromiter(cols.type_code, np.int8, len(events))
        cust = np.fromiter(map(index.__getitem__, cols.customer_id), np.int32, len(events))
        times = np.fromiter(cols.event_time_ms, np.int64, len(events))
        fresh, keep = self._unapplied(events, cols, records, cust, times, type_codes)

        def kept(array: np.ndarray) -> np.ndarray:
            return array if keep is None else array[keep]

        def column(values: tuple[Any, ...], dtype: type) -> np.ndarray:
            return kept(np.fromiter(values, dtype, len(events)))

        as_loaded = records.copy()
        orders_before = records["orders_total"].copy()
        deliveries_before = records["type_counts"][:, EVENT_CODE["order_delivered"]].copy()
        n = len(fresh)
        fresh_codes = kept(type_codes)
        columns = (
            kept(cust),
            fresh_codes,
            column(cols.category, np.int16),
            kept(times),
            column(cols.amount_base, np.float64),
            column(cols.aux, np.float64),
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

        plan = TimerPlan([], [], {}, {})
        by_customer: dict[str, list[ParsedEvent]] = {}
        for i in np.flatnonzero(np.isin(fresh_codes, _TIMER_CODES)).tolist():
            ev = fresh[i]
            by_customer.setdefault(ev.customer_id, []).append(ev)
        candidates = self._catalog.from_firings(fresh, order, firings)
        for customer, own in by_customer.items():
            i = index[customer]
            before = Before(int(orders_before[i]), int(deliveries_before[i]))
            candidates += self._catalog.plan(
                customer, records[i], own, promises.setdefault(customer, {}), plan, before
            )
        candidates += self._catalog.from_derived_batch(customers, records, derived)
        # Quiet customers: re-derive as of their recheck time (absence raises churn risk).
        rechecks = [
            t
            for t in due
            if t.kind == "recheck" and t.due_ms > records["last_seen_ms"][index[t.customer]]
        ]
        if rechecks:
            rows = np.array([index[t.customer] for t in rechecks])
            subset = records[rows]
            later = derive_batch(subset, np.array([t.due_ms for t in rechecks]), self._params)
            derived[rows] = later
            quiet = [t.customer for t in rechecks]
            candidates += self._catalog.from_derived_batch(quiet, subset, later)
            records[rows] = subset  # after from_derived_batch, which may set flags
        # No state (erased): its timers are moot. A trigger held through quiet hours
        # goes out now, as it was built then.
        live_due = [t for t in due if blobs[index[t.customer]] is not None]
        held = [orjson.loads(t.ref) for t in live_due if t.kind == "deferred"]
        candidates += self._fire(live_due, records, index, promises, plan)
        erasures = np.flatnonzero(fresh_codes == ERASURE_REQUESTED).tolist()
        erased = {fresh[i].customer_id: fresh[i] for i in erasures}
        chained = self._fire_ready(mark, records, index, promises, plan, erased, candidates)
        fired += [t.member for t in chained]
        changed = profile_changed(as_loaded, records, self._rt.config)
        stateless = {c for c, blob in zip(customers, blobs, strict=True) if blob is None}
        changed |= np.fromiter((c in stateless for c in customers), bool, len(customers))
        rewrite = {c for c, flag in zip(customers, changed, strict=True) if flag} & touched
        profiles = self._profiles(customers, records, derived, fresh, rewrite)
        approved, approved_ms, suppressions = self._policy(
            candidates, records, index, profiles, erased, plan, stateless, mark
        )
        self._catalog.fold_wake(plan, records, index, woke, chained)
        ids, ingest = cols.event_id, cols.ingest_ms
        if keep is not None:
            ids, ingest = compress(ids, keep), compress(ingest, keep)
        held_ms = [parse_time_ms(record["event_time"]) for record in held]
        triggers = self._emit(approved + held, approved_ms + held_ms, ids, ingest)
        outgoing = self._outgoing(triggers, suppressions)
        states = {
            c: blob
            for c, blob in zip(customers, encode_records(records), strict=True)
            if c in touched
        }
        erase = self._erase(erased, states, profiles, plan, now_ms, records, index)
        delta = sum(c in stateless for c in states)
        delta -= sum(c not in stateless for c in erased)
        return Changes(states, profiles, plan, fired, triggers, erase, outgoing, delta, chained)

    def _fire(
        self,
        timers: list[Timer],
        records: np.ndarray,
        index: dict[str, int],
        promises: dict[str, dict[str, int]],
        plan: TimerPlan,
    ) -> list[Candidate]:
        """The candidates of due timers; their next occurrences go into ``plan``. Held
        triggers (``deferred``) are the caller's: they are emitted as they are."""
        out = []
        for timer in timers:
            if timer.kind == "deferred":
                continue
            record = records[index[timer.customer]]
            own = promises.get(timer.customer, {})
            candidate = self._catalog.fire(timer, record, own)
            if candidate is not None:
                out.append(candidate)
            again = self._catalog.reschedule(timer, record)
            if again is not None:
                plan.schedule.append(again)
            if timer.kind == "delivery" and timer.ref in own:
                plan.delivered.setdefault(timer.customer, []).append(timer.ref)
        return out

    def _fire_ready(
        self,
        mark: int | None,
        records: np.ndarray,
        index: dict[str, int],
        promises: dict[str, dict[str, int]],
        plan: TimerPlan,
        erased: dict[str, ParsedEvent],
        candidates: list[Candidate],
    ) -> list[Timer]:
        """Fire the timers this step scheduled that the watermark has already passed (a
        backfill's step can span hours of event time), instead of writing them to
        Redis and reading them back in another round with its own load and commit.
        Their candidates join the step's, so the policies see them in event-time
        order. Returns the timers fired; the kinds in ``_NOT_IN_STEP`` are left to the
        next round."""
        chained: list[Timer] = []
        if mark is None:
            return chained
        todo = plan.schedule[:]
        del plan.schedule[:]
        # Each timer is looked at once: a pass sees only what the last one scheduled.
        for _ in range(_MAX_TIMER_ROUNDS):  # a fired timer can schedule its next step
            ready = []
            for timer in todo:
                now = (
                    timer.due_ms <= mark
                    and timer.kind not in _NOT_IN_STEP
                    and timer.customer not in erased
                )
                (ready if now else plan.schedule).append(timer)
            if not ready:
                break
            chained += ready
            start = len(plan.schedule)
            candidates += self._fire(ready, records, index, promises, plan)
            todo = plan.schedule[start:]
            del plan.schedule[start:]
        else:
            plan.schedule += todo  # cut off: written, fired by a later round
        return chained

    def _policy(
        self,
        candidates: list[Candidate],
        records: np.ndarray,
        index: dict[str, int],
        profiles: dict[str, dict[str, str]],
        erased: dict[str, ParsedEvent],
        plan: TimerPlan,
        stateless: set[str],
        mark: int | None,
    ) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]]]:
        """Run candidates through the contact policies: records to emit (and the epoch ms
        of their event times), and suppressions. A trigger held through quiet hours
        that end at or before the watermark ``mark`` goes out now.

        A customer's stored profile is read only when the customer had a stored
        state: both are written in the same commit and deleted together on
        erasure, so a customer new in this step has no stored profile (Redis
        must not evict keys: docs/operations.md)."""
        by_customer: dict[str, list[Candidate]] = {}
        for cand in candidates:
            by_customer.setdefault(cand.customer, []).append(cand)
        known = sorted(c for c in by_customer if c not in stateless)
        fields = self._policies.profile_fields
        stored = self._rt.store.load_profiles(known, fields) if known else {}
        approved, approved_ms, suppressions = [], [], []
        for customer, own in by_customer.items():
            profile = {**stored.get(customer, {}), **profiles.get(customer, {})}
            ok, stopped = self._policies.apply(
                customer, own, records[index[customer]], profile, customer in erased
            )
            for decision in ok:
                record = self._rt.triggers.build(decision.candidate)
                record.update(decision.extras)
                hold = decision.hold_until_ms
                if hold is None or (mark is not None and hold <= mark):
                    approved.append(record)
                    approved_ms.append(decision.candidate.event_time_ms)
                else:  # quiet hours: held as a durable timer, emitted at the window's end
                    plan.schedule.append(
                        Timer(
                            customer,
                            "deferred",
                            orjson.dumps(record).decode(),
                            hold,
                        )
                    )
            shown = "erased" if customer in erased else customer
            for item in stopped:
                suppressions.append(
                    self._rt.triggers.suppression(item.candidate, shown, item.policy, item.reason)
                )
        return approved, approved_ms, suppressions

    def _outgoing(
        self, triggers: list[dict[str, Any]], suppressions: list[dict[str, Any]]
    ) -> list[Outgoing]:
        """The trigger and suppression records to send."""
        topics = self._rt.config.kafka.topics
        to_triggers, to_suppressions = topics.triggers, topics.suppressions
        dumps = orjson.dumps
        # new_tuple: without the namedtuple's Python-level constructor, per record
        out = [
            new_tuple(Outgoing, (to_triggers, record["customer_id"].encode(), dumps(record)))
            for record in triggers
        ]
        for record in suppressions:
            key = None if record["customer_id"] == "erased" else record["customer_id"].encode()
            out.append(new_tuple(Outgoing, (to_suppressions, key, dumps(record))))
        metrics = get_metrics()
        stopped = Counter((r["trigger_type"], r["policy"]) for r in suppressions)
        for labels, count in stopped.items():
            metrics.suppressions.labels(*labels).inc(count)
        return out

    @staticmethod
    def _drop_erased(
        events: list[ParsedEvent],
        with_events: Iterable[str],
        due: list[Timer],
        tombstones: dict[str, int],
    ) -> tuple[list[ParsedEvent], set[str]]:
        """Drop events of erased customers up to their erasure's time (late arrivals from
        other topics must not bring the customer back); return the customers to write:
        those with an event left or a due timer (``with_events``: the events' customers)."""
        if tombstones:
            kept = [
                ev
                for ev in events
                if ev.event_time_ms > tombstones.get(ev.customer_id, ev.event_time_ms - 1)
            ]
            if len(kept) < len(events):
                get_metrics().erased_events_dropped.inc(len(events) - len(kept))
                events, with_events = kept, {ev.customer_id for ev in kept}
        return events, set(with_events).union([t.customer for t in due])

    def _erase(
        self,
        erased: dict[str, ParsedEvent],
        states: dict[str, bytes],
        profiles: dict[str, dict[str, str]],
        plan: TimerPlan,
        now_ms: int,
        records: np.ndarray,
        index: dict[str, int],
    ) -> list[tuple[str, list[str], dict[str, str], int, int]]:
        """Right to be forgotten: drop the customer's writes, list keys and timers to delete,
        and an audit entry that holds no personal data (a salted hash of the id). The
        audit counts the timers pending: the set's members but ``wake``, and those the
        record kept (``FOLDED``)."""
        erase = []
        store = self._rt.store
        ttl_s = int(self._rt.config.policies.erasure_tombstone_days * 86400)
        for customer, ev in erased.items():
            states.pop(customer, None)
            profiles.pop(customer, None)
            plan.promises.pop(customer, None)
            plan.delivered.pop(customer, None)
            plan.schedule[:] = [t for t in plan.schedule if t.customer != customer]
            members = store.timer_members_of(self._shard, customer)
            pending = sum(parse_member(m, 0).kind != WAKE for m in members)
            row = index[customer]
            pending += len(self._catalog.folded_timers([customer], records[row : row + 1])[0])
            audit = {
                "action": "erasure",
                "subject": store.subject(customer),
                "requested_at": iso_ms(ev.event_time_ms),
                "applied_at": iso_ms(now_ms),
                "timers_removed": str(pending),
            }
            erase.append((customer, members, audit, ev.event_time_ms, ttl_s))
            get_metrics().erasures.inc()
        return erase

    def _unapplied(
        self,
        events: list[ParsedEvent],
        cols: ParsedEvent,
        records: np.ndarray,
        cust: np.ndarray,
        times: np.ndarray,
        type_codes: np.ndarray,
    ) -> tuple[list[ParsedEvent], np.ndarray | None]:
        """Drop events at or below the offsets each customer's state already holds, and
        duplicates: an event_id among the customer's last ``DEDUP_IDS`` within the horizon.
        Returns the events kept and, when some were dropped, the mask that kept them."""
        fresh, keep = events, None
        metrics = get_metrics()
        n = len(events)
        names = list(dict.fromkeys(cols.topic))  # the step's topics, numbered
        topic_index = np.fromiter(
            map({t: i for i, t in enumerate(names)}.__getitem__, cols.topic), np.int32, n
        )
        if self._exactly_once and events:
            roles = np.array([ROLE_INDEX[self._rt.validator.role(t)] for t in names], np.int8)
            horizon_s = self._dedup_horizon_ms // 1000
            digests = event_id_digests(cols.event_id) if horizon_s else np.zeros(n, np.uint64)
            verdict = check_batch(
                records,
                cust,
                roles[topic_index],
                np.fromiter(cols.partition, np.int32, n),
                np.fromiter(cols.offset, np.int64, n),
                digests,
                times // 1000,
                horizon_s,
            )
            mask = verdict == FRESH
            if not mask.all():
                fresh, keep = list(compress(events, mask)), mask
                for i in np.flatnonzero(~mask):
                    replayed = verdict[i] == REPLAYED
                    counter = metrics.skipped_events if replayed else metrics.duplicate_events
                    counter.labels(events[i].topic).inc()
        # Accepted events per (topic, type), counted as one number each: topic * 256 + type.
        pairs = topic_index * 256 + type_codes
        accepted = np.bincount(pairs if keep is None else pairs[keep])
        for pair in np.flatnonzero(accepted):
            topic, code = divmod(int(pair), 256)
            metrics.events_in.labels(names[topic], EVENT_TYPES[code]).inc(int(accepted[pair]))
        return fresh, keep

    def _emit(
        self,
        records: list[dict[str, Any]],
        event_ms: list[int],
        ids: Iterable[str],
        ingest_ms: Iterable[int],
    ) -> list[dict[str, Any]]:
        """Stamp trigger records with their emission time and observe their latency
        (``event_ms``: the records' event times; ``ids`` and ``ingest_ms``: the fresh
        events' ids and Kafka times)."""
        if not records:
            return records
        metrics = get_metrics()
        ingest = dict(zip(ids, ingest_ms, strict=True))
        emitted_ms = self._rt.clock_ms()  # one step's records go out together
        emitted_at = iso_ms(emitted_ms)
        since_event: dict[str, list[float]] = {}
        since_ingest: dict[str, list[float]] = {}
        for record, event in zip(records, event_ms, strict=True):
            record["emitted_at"] = emitted_at
            kind = record["trigger_type"]
            since_event.setdefault(kind, []).append(max(0, emitted_ms - event) / 1000)
            ingested = ingest.get(record["causal_event_id"])
            if ingested is not None:
                since_ingest.setdefault(kind, []).append(max(0, emitted_ms - ingested) / 1000)
        for histogram, by_kind in (
            (metrics.event_to_trigger_seconds, since_event),
            (metrics.ingest_to_emit_seconds, since_ingest),
        ):
            for kind, seconds in by_kind.items():
                observe = histogram.labels(kind).observe
                for value in seconds:
                    observe(value)
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
        rewrite: set[str],
    ) -> dict[str, dict[str, str]]:
        """The readable profile fields to write: the derived ones of ``rewrite`` (new
        customers and those whose configured fields may have changed), and what
        customer events set."""
        config, weights = self._rt.config, self._params.churn_weights
        rows = [i for i, c in enumerate(customers) if c in rewrite]
        fields = profile_rows(records[rows], derived[rows], config, weights) if rows else []
        profiles = dict(zip([customers[i] for i in rows], fields, strict=True))
        for ev in fresh:
            if ev.type_code in _PROFILE_EVENT_CODES:
                kind = EVENT_TYPES[ev.type_code]
                fields = event_fields(kind, ev.fields, ev.event_time_ms)
                profiles.setdefault(ev.customer_id, {}).update(fields)
        return profiles


class Changes(NamedTuple):
    """Everything one shard step writes."""

    states: dict[str, bytes]
    profiles: dict[str, dict[str, str]]
    plan: TimerPlan
    fired: list[str]
    triggers: list[dict[str, Any]]
    erase: list[tuple[str, list[str], dict[str, str], int, int]]
    outgoing: list[Outgoing]  # trigger and suppression records
    customers_delta: int = 0  # new customers minus erased ones
    chained: Sequence[Timer] = ()  # scheduled and fired in the same step, never written

    @classmethod
    def none(cls) -> Changes:
        return cls({}, {}, TimerPlan([], [], {}, {}), [], [], [], [])
