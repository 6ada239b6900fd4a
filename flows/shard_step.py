"""One state shard's processing rounds: load, compute, commit, send.

This module owns all Redis and Kafka I/O of the shard step (docs/architecture.md):

1. load the round's due timers, its customers' states, open orders and
   erasure tombstones (one round trip for the states);
2. compute the round (``flows.step_work``: exactly-once checks, the customer
   step, the contact policies, records); if that raises, find the customers
   whose work raises and set them aside (``flows.quarantine``), and compute
   the round without them;
3. commit states, profiles, timers, the quarantine, the outgoing records (the
   outbox) and the shard's progress in one MULTI/EXEC, then produce the
   records without waiting; a later commit trims those the broker
   acknowledged.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable
from operator import attrgetter
from typing import NamedTuple

import numpy as np

from crmstream.flows.dead_letters import dead_letter_record
from crmstream.flows.quarantine import Quarantine, failing, quarantine
from crmstream.flows.runtime import Runtime
from crmstream.flows.sink import Outbox, Outgoing, bound_outgoing, encode_outgoing
from crmstream.flows.step_work import Loaded, StepWork, Work
from crmstream.metrics import get_metrics
from crmstream.operators.events import EVENT_CODE, ParsedEvent
from crmstream.operators.params import params_from
from crmstream.operators.timer_slots import NEVER, WAKE, TimerSlots
from crmstream.state.encoding import StateEncodingError, decode_batch
from crmstream.state.store import Position, Progress
from crmstream.state.timers import Timer

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_MS = 1000
_NOTHING = Progress(-1, -1, -1)
_DELIVERY_CODES = frozenset(
    EVENT_CODE[k] for k in ("order_shipped", "order_delivered", "logistics_update")
)
# An event's place in the input: (topic, partition, offset).
_input_order = attrgetter("topic", "partition", "offset")
_topic = attrgetter("topic")
# Events of one customer at the same event time and Kafka time apply in this order of
# their topics' roles, then by partition and offset (docs/triggers.md, "Event time"): what
# a customer is and allows before what it does, so a consent withdrawn at T stops a
# candidate at T; and the same log gives the same outcome under any topic names (outsider
# 51: the alphabetical order of the names decided it, and the backtest's topics sorted
# the other way from the flow's).
SAME_TIME_ROLES = ("customers", "orders", "clickstream", "feedback")
_IDLE = {"events": 0, "invalid": 0, "triggers": 0, "timers": 0, "again": 0}
# Test hook: the exactly-once guards a shard step applies (docs/guarantees.md, section 1).
# Always all three in production; tests/test_guards.py leaves one on at a time to see
# that it alone keeps a replay from counting twice. Read when a ShardStep is built.
GUARDS = frozenset({"shard_offsets", "customer_offsets", "event_ids"})


class _Unreadable(NamedTuple):
    """Customers of a round whose stored state or open orders cannot be read."""

    errors: dict[str, Exception]
    events: list[ParsedEvent]
    members: list[Timer]


class Changes(NamedTuple):
    """Everything one round writes besides the outgoing records."""

    work: Work | None
    quarantine: Quarantine | None = None

    @classmethod
    def none(cls) -> Changes:
        return cls(None)


class ShardStep:
    """The processing rounds of one shard (its number known once its first item came)."""

    def __init__(self, runtime: Runtime, shard: int, live: bool, outbox: Outbox):
        self._rt = runtime
        self._shard = shard
        self._live = live
        self._outbox = outbox
        config = runtime.config
        self._work = StepWork(config, params_from(config), runtime.store, shard,
                              runtime.validator.role, runtime.triggers, GUARDS)  # fmt: skip
        self._guards = GUARDS
        self._slots = TimerSlots(config)
        self._timers_cfg = config.timers
        self._exactly_once = config.processing.exactly_once
        by_role = config.kafka.topics.by_role
        self._input_topics = [by_role[role] for role in SAME_TIME_ROLES]
        self.progress: dict[Position, Progress] = runtime.store.load_progress(shard)
        self._unsaved: dict[Position, Progress] = {}
        self._last_progress_write_ms = 0
        self._checked_until = -1  # stored timers due up to here have been fired
        # At 0 from the shard's start, so that its first increase fires the alert
        # (outsider 49: born at 1, increase() saw nothing).
        get_metrics().quarantined_customers.labels(str(shard))

    # -- steps ------------------------------------------------------------------------
    def unapplied(
        self, number: int, events: list[ParsedEvent], invalid: list, positions: dict,
        newest: Callable[[Position], int], marks: dict[Position, tuple[int, int]],
    ) -> tuple[list[ParsedEvent], list, dict[Position, Progress]] | None:  # fmt: skip
        """A closed step's input less what this shard applied and committed before a
        restart: per input partition, what is at or below its committed offset, found
        by bisection. None when the whole step was applied before (the timers it fired
        are gone from Redis, and firing later ones now would run ahead of the input)."""
        floors = {pos: self.progress.get(pos, _NOTHING).offset for pos in positions}
        if "shard_offsets" not in self._guards:  # test hook: see GUARDS
            floors = dict.fromkeys(positions, -1)
        progress = {
            pos: Progress(off, number, newest(pos), *marks.get(pos, (-1, -1)))
            for pos, off in positions.items()
            if off > floors[pos]
        }
        if not progress:
            return None
        events.sort(key=_input_order)
        invalid.sort(key=_input_order)
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
        return self._by_role(events), invalid, progress

    def _by_role(self, events: list[ParsedEvent]) -> list[ParsedEvent]:
        """``events`` (in (topic, partition, offset) order) with their topics' blocks in the
        order of ``SAME_TIME_ROLES``, which the steps' stable sorts keep for ties."""
        out: list[ParsedEvent] = []
        for topic in self._input_topics:
            lo = bisect_left(events, topic, key=_topic)
            out += events[lo : bisect_right(events, topic, lo=lo, key=_topic)]
        if len(out) != len(events):  # not an input topic: a bug upstream
            raise ValueError("events of a topic that is not an input topic reached the step")
        return out

    def run(
        self,
        events: list[ParsedEvent],
        invalid: list,
        positions: dict[Position, Progress],
        mark_of: Callable[[int], int | None],
    ) -> list[dict[str, int]]:
        """A round with the input, then rounds for timers still due (``mark_of``: the
        watermark at a wall-clock time) until none is left."""
        summaries = [self.round(events, invalid, positions, mark_of)]
        while summaries[-1]["again"]:
            summaries.append(self.round([], [], {}, mark_of))
        return summaries

    # -- one round --------------------------------------------------------------------
    def round(
        self,
        events: list[ParsedEvent],
        invalid: list,
        positions: dict[Position, Progress],
        mark_of: Callable[[int], int | None],
    ) -> dict[str, int]:
        """Apply events, fire due timers, emit, commit. One state load and one commit."""
        now_ms = self._rt.clock_ms()
        self._unsaved.update(positions)
        mark = mark_of(now_ms)
        metrics = get_metrics()
        if mark is not None:
            metrics.watermark_lag.labels(str(self._shard)).set(max(0, now_ms - mark) / 1000)
        with_events = list(dict.fromkeys(ev.customer_id for ev in events))
        members, others_bound, again = self._due_members(events, with_events, mark)
        if not events and not invalid and not members:
            self._idle_commit(now_ms)
            return _IDLE
        outgoing = self._dead_letters(invalid)
        changes, summary = Changes.none(), dict(_IDLE)
        if events or members:
            changes = self._apply(events, with_events, members, mark, others_bound, now_ms)
            summary.update(events=len(events))
            if changes.quarantine is not None:
                outgoing += changes.quarantine.dead_letters
            work = changes.work
            if work is not None:
                outgoing += work.outgoing
                work.observe(self._rt.clock_ms())
                summary.update(triggers=len(work.triggers), timers=len(work.out.fired))
                if self._live:
                    for timer in work.out.fired:
                        lateness = max(0, now_ms - timer.due_ms) / 1000
                        metrics.timer_lateness_seconds.observe(lateness)
                for kind, count in Counter(r["trigger_type"] for r in work.triggers).items():
                    metrics.triggers.labels(kind).inc(count)
        outgoing = bound_outgoing(outgoing, self._rt.producer)  # nothing the producer refuses
        if self._exactly_once:
            self._commit(changes, now_ms, outgoing)
            self._outbox.send(outgoing)
        else:
            for record in outgoing:
                self._rt.producer.produce(*record)
            self._commit(changes, now_ms)
        self._outbox.watch()
        summary.update(invalid=len(invalid), again=int(again))
        return summary

    def _idle_commit(self, now_ms: int) -> None:
        self._outbox.watch()  # delivery reports
        since_write = now_ms - self._last_progress_write_ms
        if (self._unsaved or self._outbox.done()) and since_write >= PROGRESS_WRITE_INTERVAL_MS:
            self._commit(Changes.none(), now_ms)

    def _due_members(
        self, events: list[ParsedEvent], with_events: list[str], mark: int | None
    ) -> tuple[list[Timer], int | None, bool]:
        """The stored timers that may fire this round: all of the customers with events up
        to their newest event (or the watermark), and of other customers those due
        before the watermark, at most ``timers.fire_batch`` of them (earliest first).
        Returns them, the bound of the other customers, and whether more are due."""
        upto = None if mark is None else mark - 1  # a timer at T waits for time past T
        if events:
            newest = max(ev.event_time_ms for ev in events) - 1
            limit = None
            upto = newest if upto is None else max(upto, newest)
        else:
            limit = self._timers_cfg.fire_batch
            if upto is not None and upto <= self._checked_until:
                return [], None, False  # nothing stored is due that was not fired
        if upto is None:
            return [], None, False
        timers = self._rt.store.timers.due(self._shard, upto, limit)
        mine = set(with_events)
        others = [t for t in timers if t.customer not in mine and mark is not None
                  and t.due_ms < mark]  # fmt: skip
        batch = self._timers_cfg.fire_batch
        bound = None if mark is None else mark - 1
        again = len(others) >= batch or (limit is not None and len(timers) >= limit)
        if len(others) > batch or (again and others):
            # The last due time taken may be cut in two: fire only what lies before it.
            cut = others[min(batch, len(others)) - 1].due_ms
            bound = cut - 1 if others[0].due_ms < cut else cut
            others = [t for t in others if t.due_ms <= bound]
        taken = [t for t in timers if t.customer in mine] + others
        if not again and mark is not None:
            # Every stored timer due before the watermark fires in this round, and what
            # the round stores is due later: the next idle round needs no query until
            # the watermark moves.
            self._checked_until = max(self._checked_until, mark - 1)
        return taken, bound, again

    def _apply(
        self,
        events: list[ParsedEvent],
        with_events: list[str],
        members: list[Timer],
        mark: int | None,
        others_bound: int | None,
        now_ms: int,
    ) -> Changes:
        """Load the round's customers and compute it; a customer whose work raises is set
        aside, and the round is computed again without it."""
        if events:
            get_metrics().batch_events.observe(len(events))
        loaded, broken = self._load(events, with_events, members, mark, others_bound, now_ms)
        emitted_ms = self._rt.clock_ms()
        rows = list(range(len(loaded.customers)))

        def compute(part: list[int]) -> Work:
            return self._work.compute(loaded.only(part), emitted_ms)

        if not broken.errors:
            try:
                return Changes(self._work.compute(loaded, emitted_ms))
            except Exception as error:  # one customer's must not stop the others: find it
                bad = failing(compute, rows)
                if not bad:
                    raise error from None  # not one customer's: it fails however cut
        else:
            bad = failing(compute, rows)
        good = [i for i in rows if i not in bad]
        work = compute(good) if good else None
        errors = {**broken.errors, **{loaded.customers[i]: error for i, error in bad.items()}}
        return Changes(work, self._set_aside(errors, loaded, broken, now_ms))

    def _load(
        self,
        events: list[ParsedEvent],
        with_events: list[str],
        members: list[Timer],
        mark: int | None,
        others_bound: int | None,
        now_ms: int,
    ) -> tuple[Loaded, _Unreadable]:
        """The round's customers as stored, and those whose stored state or open orders
        cannot be read (set aside with the error and their inputs, not loaded)."""
        store = self._rt.store
        customers = list(dict.fromkeys([*with_events, *(t.customer for t in members)]))
        needs_promises = {t.customer for t in members if t.kind == "delivery"}
        needs_promises.update(ev.customer_id for ev in events if ev.type_code in _DELIVERY_CODES)
        blobs, promises = store.load_states(customers, sorted(needs_promises))
        broken: dict[str, Exception] = dict(store.last_unreadable)
        keys = [store.state_key(c) for c in customers]
        try:
            states = decode_batch(blobs, keys)
        except StateEncodingError:  # which ones: each on its own
            for customer, blob, key in zip(customers, blobs, keys, strict=True):
                try:
                    decode_batch([blob], [key])
                except StateEncodingError as error:
                    broken[customer] = error
            states = None
        if broken:
            keep = [i for i, c in enumerate(customers) if c not in broken]
            customers = [customers[i] for i in keep]
            blobs = [blobs[i] for i in keep]
            states = decode_batch(blobs, [keys[i] for i in keep])
        stateless = np.fromiter((b is None for b in blobs), bool, len(blobs))
        events = self._drop_erased(events, store.last_tombstones)
        unreadable = _Unreadable(
            broken,
            [ev for ev in events if ev.customer_id in broken],
            [t for t in members if t.customer in broken],
        )
        if broken:
            events = [ev for ev in events if ev.customer_id not in broken]
            members = [t for t in members if t.customer not in broken]
        loaded = Loaded(customers, states, stateless, events, members, promises, mark,
                        others_bound, now_ms)  # fmt: skip
        return loaded, unreadable

    def _set_aside(
        self, errors: dict[str, Exception], loaded: Loaded, broken: _Unreadable, now_ms: int
    ) -> Quarantine:
        """Quarantine the customers whose state could not be read or whose work raised."""
        index = {c: i for i, c in enumerate(loaded.customers)}
        readable = [c for c in errors if c in index]
        rows = [index[c] for c in readable]
        earliest = self._slots.earliest(loaded.states[rows]).tolist()
        wake_due: dict[str, int | None] = {
            c: (None if due == NEVER else due) for c, due in zip(readable, earliest, strict=True)
        }
        unread = [c for c in errors if c not in index]  # set aside at the load
        if unread:  # their wake's due time is the timer set's score (outsider 49: it was lost)
            wakes = [Timer(c, WAKE, "", 0).member for c in unread]
            scores = self._rt.store.timer_scores(self._shard, wakes)
            wake_due.update(zip(unread, scores, strict=True))
        events = [*broken.events, *loaded.events]
        members = [*broken.members, *loaded.members]
        set_aside = quarantine(errors, events, members, wake_due,
                               self._rt.config.kafka.topics.dead_letter,
                               self._rt.validator.redact, now_ms, self._shard)  # fmt: skip
        metrics = get_metrics()
        metrics.quarantined_customers.labels(str(self._shard)).inc(len(errors))
        # Their events are dead letters as well: counted as such (outsider 49: they were not).
        for topic, n in Counter(ev.topic for ev in events if ev.customer_id in errors).items():
            metrics.invalid_events.labels(topic, "processing_error").inc(n)
        return set_aside

    @staticmethod
    def _drop_erased(events: list[ParsedEvent], tombstones: dict[str, int]) -> list[ParsedEvent]:
        """Drop events of erased customers up to their erasure's time (late arrivals from
        other topics must not bring the customer back)."""
        if not tombstones:
            return events
        kept = [
            ev
            for ev in events
            if ev.event_time_ms > tombstones.get(ev.customer_id, ev.event_time_ms - 1)
        ]
        if len(kept) < len(events):
            get_metrics().erased_events_dropped.inc(len(events) - len(kept))
        return kept

    def _dead_letters(self, invalid: list) -> list[Outgoing]:
        metrics = get_metrics()
        topic = self._rt.config.kafka.topics.dead_letter
        out = []
        for bad in invalid:
            metrics.invalid_events.labels(bad.topic, bad.field or "message").inc()
            out.append(Outgoing(topic, bad.key, dead_letter_record(bad, self._rt.validator.redact)))
        return out

    # -- commit -------------------------------------------------------------------------
    def commit_idle(self, now_ms: int) -> None:
        """Commit nothing but the progress and the outbox trim (end of input)."""
        self._commit(Changes.none(), now_ms)

    def _commit(self, changes: Changes, now_ms: int, outgoing: list[Outgoing] = ()) -> None:
        work, aside = changes
        self._rt.store.commit(
            self._shard,
            work.states if work else {},
            work.profiles if work else {},
            self._unsaved,
            work.out.plan if work else None,
            aside.members if aside else [],
            work.erase if work else [],
            atomic=self._exactly_once,
            customers_delta=work.customers_delta if work else 0,
            outbox=[encode_outgoing(record) for record in outgoing],
            outbox_trim=self._outbox.take_done(),
            quarantine=aside.entries if aside else {},
        )
        get_metrics().outbox_records.labels(str(self._shard)).set(
            self._outbox.pending() + len(outgoing)
        )
        self.progress.update(self._unsaved)
        self._unsaved = {}
        self._last_progress_write_ms = now_ms
