"""One state shard's processing rounds: load, apply, decide, commit, send.

This module owns all Redis and Kafka I/O of the shard step (docs/architecture.md):

1. load the round's due timers, its customers' states, open orders and
   erasure tombstones (one round trip for the states);
2. drop what was applied before (per-customer offsets) and duplicates;
3. run the customer step (``operators.customer_step``, no I/O);
4. decide the candidates with the contact policies (stored profiles loaded
   for the customers that have candidates) and build the records;
5. commit states, profiles, timers, the outgoing records (the outbox) and
   the shard's progress in one MULTI/EXEC, then produce the records without
   waiting; a later commit trims those the broker acknowledged.
"""

from __future__ import annotations

import logging
from bisect import bisect_left, bisect_right
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from itertools import compress
from operator import attrgetter
from typing import Any, NamedTuple

import numpy as np
import orjson

from crmstream.flows.dead_letters import dead_letter_record
from crmstream.flows.runtime import Runtime
from crmstream.flows.sink import Outbox, Outgoing, bound_outgoing, encode_outgoing
from crmstream.metrics import get_metrics
from crmstream.operators.customer_step import CustomerStep, StepInput, StepOutput
from crmstream.operators.events import (
    EVENT_CODE,
    EVENT_TYPES,
    ParsedEvent,
    new_tuple,
    parse_time_ms,
)
from crmstream.operators.hashing import event_id_digests
from crmstream.operators.kernels import FRESH, REPLAYED, check_batch, derive_batch, params_from
from crmstream.operators.policies import PolicyContext, PolicyEngine
from crmstream.operators.rules import iso_ms
from crmstream.operators.timer_slots import WAKE
from crmstream.state.encoding import (
    ROLE_INDEX,
    STAGES,
    decode_batch,
    encode_records,
    fresh_records,
)
from crmstream.state.profile import profile_changed, profile_rows
from crmstream.state.store import Position, Progress
from crmstream.state.timers import Timer, parse_member

log = logging.getLogger(__name__)

PROGRESS_WRITE_INTERVAL_MS = 1000
_NOTHING = Progress(-1, -1, -1)
_DELIVERY_CODES = frozenset(
    EVENT_CODE[k] for k in ("order_shipped", "order_delivered", "logistics_update")
)
# An event's place in the input: (topic, partition, offset).
_input_order = attrgetter("topic", "partition", "offset")
_IDLE = {"events": 0, "invalid": 0, "triggers": 0, "timers": 0, "again": 0}
# What the exactly-once checks record of the input in a customer's state.
_INPUT_FIELDS = ("applied_partition", "applied_offset", "recent_ids", "recent_s", "recent_next")
# Test hook: the exactly-once guards a shard step applies (docs/guarantees.md, section 1).
# Always all three in production; tests/test_guards.py leaves one on at a time to see
# that it alone keeps a replay from counting twice. Read when a ShardStep is built.
GUARDS = frozenset({"shard_offsets", "customer_offsets", "event_ids"})


def _repeated(topics: np.ndarray, partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Which events repeat an input position (topic, partition, offset) seen earlier in
    the batch (a message read twice)."""
    order = np.lexsort((np.arange(len(offsets)), offsets, partitions, topics))
    same = np.zeros(len(offsets), bool)
    if len(offsets) > 1:
        a, b = order[:-1], order[1:]
        same[b] = (topics[a] == topics[b]) & (partitions[a] == partitions[b]) & (
            offsets[a] == offsets[b]
        )
    return same


class Changes(NamedTuple):
    """Everything one round writes besides the outgoing records."""

    states: dict[str, bytes]
    profiles: dict[str, dict[str, str]]
    out: StepOutput | None
    erase: list[tuple[str, list[str], dict[str, str], int, int]]
    customers_delta: int = 0  # new customers minus erased ones

    @classmethod
    def none(cls) -> Changes:
        return cls({}, {}, None, [])


class ShardStep:
    """The processing rounds of one shard (its number known once its first item came)."""

    def __init__(self, runtime: Runtime, shard: int, live: bool, outbox: Outbox):
        self._rt = runtime
        self._shard = shard
        self._live = live
        self._outbox = outbox
        config = runtime.config
        self._params = params_from(config)
        self._customers = CustomerStep(config, self._params)
        self._policies = PolicyEngine(config)
        self._timers_cfg = config.timers
        self._dedup_horizon_ms = config.processing.dedup_horizon_seconds * 1000
        self._exactly_once = config.processing.exactly_once
        self._guards = GUARDS
        self.progress: dict[Position, Progress] = runtime.store.load_progress(shard)
        self._unsaved: dict[Position, Progress] = {}
        self._last_progress_write_ms = 0
        self._checked_until = -1  # stored timers due up to here have been fired
        self._held_past: dict[tuple[str, int], int] = {}

    # -- steps ------------------------------------------------------------------------
    def unapplied(
        self, number: int, events: list[ParsedEvent], invalid: list, positions: dict,
        newest: Callable[[Position], int],
    ) -> tuple[list[ParsedEvent], list, dict[Position, Progress]] | None:  # fmt: skip
        """A closed step's input less what this shard applied and committed before a
        restart: per input partition, what is at or below its committed offset, found
        by bisection. None when the whole step was applied before (the timers it fired
        are gone from Redis, and firing later ones now would run ahead of the input)."""
        floors = {pos: self.progress.get(pos, _NOTHING).offset for pos in positions}
        if "shard_offsets" not in self._guards:  # test hook: see GUARDS
            floors = dict.fromkeys(positions, -1)
        progress = {
            pos: Progress(off, number, newest(pos))
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
        return events, invalid, progress

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
            changes, triggers, records = self._apply(
                events, with_events, members, mark, others_bound, now_ms
            )
            outgoing += records
            fired = changes.out.fired if changes.out is not None else []
            summary.update(events=len(events), triggers=len(triggers), timers=len(fired))
            if self._live:
                for timer in fired:
                    metrics.timer_lateness_seconds.observe(max(0, now_ms - timer.due_ms) / 1000)
            for kind, count in Counter(r["trigger_type"] for r in triggers).items():
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
    ) -> tuple[Changes, list[dict[str, Any]], list[Outgoing]]:
        """Load, run the customer step, decide, and build what the round writes."""
        metrics = get_metrics()
        store = self._rt.store
        if events:
            metrics.batch_events.observe(len(events))
        customers = list(dict.fromkeys([*with_events, *(t.customer for t in members)]))
        needs_promises = {t.customer for t in members if t.kind == "delivery"}
        needs_promises.update(ev.customer_id for ev in events if ev.type_code in _DELIVERY_CODES)
        blobs, promises = store.load_states(customers, sorted(needs_promises))
        records = decode_batch(blobs, [store.state_key(c) for c in customers])
        stateless = np.fromiter((b is None for b in blobs), bool, len(blobs))
        as_loaded = records.copy()
        events = self._drop_erased(events, store.last_tombstones)
        index = {c: i for i, c in enumerate(customers)}
        fresh = self._unapplied(events, records, index)
        bound = np.full(len(customers), -(2**62) if others_bound is None else others_bound,
                        np.int64)  # fmt: skip
        newest: dict[str, int] = {}
        for ev in fresh:
            if ev.event_time_ms > newest.get(ev.customer_id, -(2**62)):
                newest[ev.customer_id] = ev.event_time_ms
        base = -(2**62) if mark is None else mark - 1
        for customer, at in newest.items():
            bound[index[customer]] = max(base, at - 1)
        for customer in with_events:
            if customer not in newest:
                bound[index[customer]] = base
        out = self._customers.run(StepInput(customers, records, fresh, members, promises, bound))
        if out.erasures:
            self._reseed_erased(out, records, index, fresh)
        if out.late:
            metrics.late_events.inc(out.late)
        approved, approved_ms, suppressions = self._decide(
            out, records, as_loaded, index, stateless, mark
        )
        held = [orjson.loads(t.ref) for t in out.held]
        held_ms = [parse_time_ms(r["event_time"]) for r in held]
        triggers = self._emit(approved + held, approved_ms + held_ms, fresh)
        outgoing = self._outgoing(triggers, suppressions)
        touched = out.touched
        self._count_transitions(as_loaded, records)
        profiles = self._profiles(customers, records, as_loaded, stateless, out)
        states = {
            c: blob
            for c, blob, keep in zip(customers, encode_records(records), touched, strict=True)
            if keep
        }
        erase = self._erase(out, now_ms)
        erased = {e.customer for e in out.erasures}
        delta = sum(1 for c in states if stateless[index[c]] or c in erased)
        delta -= sum(1 for c in erased if not stateless[index[c]])
        return Changes(states, profiles, out, erase, delta), triggers, outgoing

    # -- before the customer step ----------------------------------------------------
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

    def _unapplied(
        self,
        events: list[ParsedEvent],
        records: np.ndarray,
        index: dict[str, int],
        count: bool = True,
    ) -> list[ParsedEvent]:
        """Drop events at or below the offsets each customer's state already holds, and
        duplicates: an event_id among the customer's last ``DEDUP_IDS`` within the horizon."""
        metrics = get_metrics()
        n = len(events)
        if not n:
            return events
        topics = [ev.topic for ev in events]
        names = list(dict.fromkeys(topics))  # the step's topics, numbered
        topic_index = np.fromiter(map({t: i for i, t in enumerate(names)}.__getitem__, topics),
                                  np.int32, n)  # fmt: skip
        type_codes = np.fromiter([ev.type_code for ev in events], np.int8, n)
        fresh, keep = events, None
        if self._exactly_once:
            roles = np.array([ROLE_INDEX[self._rt.validator.role(t)] for t in names], np.int8)
            horizon_s = self._dedup_horizon_ms // 1000 if "event_ids" in self._guards else 0
            ids = [ev.event_id for ev in events]
            digests = event_id_digests(ids) if horizon_s else np.zeros(n, np.uint64)
            cust = np.fromiter(map(index.__getitem__, [ev.customer_id for ev in events]),
                               np.int32, n)  # fmt: skip
            times = np.fromiter([ev.event_time_ms for ev in events], np.int64, n)
            ingest = np.fromiter([ev.ingest_ms for ev in events], np.int64, n)
            # Checked in each customer's timeline order (as the customer step applies them),
            # so its ring of recent ids holds the same ids in the same slots however the
            # input was cut into steps.
            order = np.lexsort((np.arange(n), ingest, times))
            partitions = np.fromiter([ev.partition for ev in events], np.int32, n)
            offsets = np.fromiter([ev.offset for ev in events], np.int64, n)
            verdict = np.empty(n, np.int8)
            verdict[order] = check_batch(
                records,
                cust[order],
                roles[topic_index][order],
                partitions[order],
                offsets[order],
                digests[order],
                times[order] // 1000,
                horizon_s,
                _repeated(topic_index, partitions, offsets)[order],
                offsets="customer_offsets" in self._guards,
            )
            keep = verdict == FRESH
            if not count:
                return fresh
            if not keep.all():
                fresh = list(compress(events, keep))
                for i in np.flatnonzero(~keep):
                    replayed = verdict[i] == REPLAYED
                    counter = metrics.skipped_events if replayed else metrics.duplicate_events
                    counter.labels(events[i].topic).inc()
            else:
                keep = None
        # Accepted events per (topic, type), counted as one number each: topic * 256 + type.
        pairs = topic_index * 256 + type_codes
        accepted = np.bincount(pairs if keep is None else pairs[keep])
        for pair in np.flatnonzero(accepted):
            topic, code = divmod(int(pair), 256)
            metrics.events_in.labels(names[topic], EVENT_TYPES[code]).inc(int(accepted[pair]))
        return fresh

    def _reseed_erased(
        self, out: StepOutput, records: np.ndarray, index: dict[str, int], fresh: list
    ) -> None:
        """A customer erased in the step starts again from a fresh record: it records the
        input positions and event ids of what it did after the erasure, as the exactly-once
        checks record them in a new customer's state in a later step."""
        for erasure in out.erasures:
            row = index[erasure.customer]
            after = [ev for ev in fresh if ev.customer_id == erasure.customer
                     and ev.event_time_ms > erasure.event.event_time_ms]  # fmt: skip
            if not after:
                continue
            record = fresh_records(1)
            self._unapplied(after, record, {erasure.customer: 0}, count=False)
            for field in _INPUT_FIELDS:
                records[field][row] = record[field][0]

    # -- after it -----------------------------------------------------------------------
    def _decide(
        self,
        out: StepOutput,
        records: np.ndarray,
        as_loaded: np.ndarray,
        index: dict[str, int],
        stateless: np.ndarray,
        mark: int | None,
    ) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]]]:
        """Run the candidates through the contact policies, each customer's in its timeline
        order and each in the context of its instant: records to emit (and their event
        times), and suppressions. A trigger held through quiet hours that end at or
        before the watermark goes out now; a later one is held as a timer.

        A customer's stored profile is read only when the customer had a stored
        state: both are written in the same commit and deleted together on
        erasure, so a customer new in this step has no stored profile (Redis
        must not evict keys: docs/operations.md)."""
        by_customer: dict[str, list[int]] = {}
        for k, cand in enumerate(out.candidates):
            by_customer.setdefault(cand.customer, []).append(k)
        known = sorted(c for c in by_customer if not stateless[index[c]])
        fields = self._policies.profile_fields
        stored = self._rt.store.load_profiles(known, fields) if known else {}
        approved, approved_ms, suppressions = [], [], []
        triggers = self._rt.triggers
        erased_at: dict[str, list[int]] = {}
        held_past = self._held_past = {}  # (customer, life) -> holds an erasure removed
        for erasure in out.erasures:
            erased_at.setdefault(erasure.customer, []).append(erasure.event.event_time_ms)
        for customer, ks in by_customer.items():
            ends = erased_at.get(customer, [])
            for life, ok, stopped in self._lives(out, customer, ks, records, as_loaded, index,
                                                 stored.get(customer, {})):  # fmt: skip
                end = ends[life] if life < len(ends) else None
                for decision in ok:
                    record = triggers.build(decision.candidate)
                    record.update(decision.extras)
                    hold = decision.hold_until_ms
                    # Quiet hours: a hold that ends by the watermark goes out now, a later
                    # one waits as a durable timer. Before an erasure in the step, the
                    # hold's end comes before the erasure or never (it removes the timer).
                    if hold is None:
                        due = True
                    elif end is not None:
                        due = hold < end
                    else:
                        due = mark is not None and hold <= mark
                    if due:
                        approved.append(record)
                        approved_ms.append(decision.candidate.event_time_ms)
                    elif end is None:
                        out.plan.schedule.append(
                            Timer(customer, "deferred", orjson.dumps(record).decode(), hold)
                        )
                    else:  # a hold the erasure removed: one of its pending timers
                        held_past[customer, life] = held_past.get((customer, life), 0) + 1
                for item in stopped:
                    shown = "erased" if item.policy == "erasure" else customer
                    suppressions.append(
                        triggers.suppression(item.candidate, shown, item.policy, item.reason)
                    )
        return approved, approved_ms, suppressions

    def _lives(
        self,
        out: StepOutput,
        customer: str,
        ks: list[int],
        records: np.ndarray,
        as_loaded: np.ndarray,
        index: dict[str, int],
        stored: dict[str, str],
    ) -> Iterator[tuple[int, list, list]]:
        """The policies' decisions on one customer's candidates (``ks``), per life: an
        erasure in the step starts a new one, from a fresh record. A life's candidates are
        held to its send history: the record as loaded before the first erasure, a fresh
        one after it; only the last life's decisions stay in the record written."""
        epochs = out.epochs[customer]
        row = index[customer]
        lives: dict[int, list[int]] = {}
        for k in ks:
            lives.setdefault(epochs[out.epochs_of[k]].life, []).append(k)
        for life, of_life in sorted(lives.items()):
            if life == epochs[-1].life:
                record = records[row]
            elif life == 0:
                record = as_loaded[row].copy()
            else:
                record = fresh_records(1)[0]
            contexts = []
            for k in of_life:
                epoch = epochs[out.epochs_of[k]]
                profile = epoch.updates if epoch.forget_stored else {**stored, **epoch.updates}
                contexts.append(PolicyContext(profile, epoch.too_often_day, epoch.erased))
            ok, stopped = self._policies.decide(
                customer,
                [out.candidates[k] for k in of_life],
                contexts,
                [out.keys[k] for k in of_life],
                record,
            )
            yield life, ok, stopped

    def _profiles(
        self,
        customers: list[str],
        records: np.ndarray,
        as_loaded: np.ndarray,
        stateless: np.ndarray,
        out: StepOutput,
    ) -> dict[str, dict[str, str]]:
        """The readable profile fields to write: the derived ones (as of each customer's
        clock) of customers whose configured fields may have changed or who are new,
        and what this step's customer events set."""
        config = self._rt.config
        changed = profile_changed(as_loaded, records, config) | stateless
        index = {c: i for i, c in enumerate(customers)}
        for erasure in out.erasures:  # its profile is deleted: written again if state is
            changed[index[erasure.customer]] = True
        rows = np.flatnonzero(changed & out.touched)
        profiles: dict[str, dict[str, str]] = {}
        if len(rows):
            subset = records[rows]
            as_of = np.maximum(subset["clock_ms"], subset["last_seen_ms"])
            derived = derive_batch(subset, as_of, self._params)
            records[rows] = subset  # unchanged: the labels were derived as of the clock
            fields = profile_rows(subset, derived, config, self._params.churn_weights)
            profiles = {customers[i]: f for i, f in zip(rows.tolist(), fields, strict=True)}
        for customer, epochs in out.epochs.items():
            updates = epochs[-1].updates
            if updates:
                profiles.setdefault(customer, {}).update(updates)
        return profiles

    def _erase(
        self, out: StepOutput, now_ms: int
    ) -> list[tuple[str, list[str], dict[str, str], int, int]]:
        """Right to be forgotten: the keys and timers to delete, and an audit entry that
        holds no personal data (a salted hash of the id) with the timers pending."""
        store = self._rt.store
        ttl_s = int(self._rt.config.policies.erasure_tombstone_days * 86400)
        erase = []
        gone = set(out.plan.cancel)  # fired or cancelled before the erasure
        lives: dict[str, int] = {}
        for erasure in out.erasures:
            customer, ev = erasure.customer, erasure.event
            life = lives[customer] = lives.get(customer, -1) + 1
            members = store.timer_members_of(self._shard, customer)
            stored = {m for m in members if parse_member(m, 0).kind != WAKE} - gone
            pending = erasure.kept + len(stored | erasure.members)
            pending += self._held_past.get((customer, life), 0)
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

    def _dead_letters(self, invalid: list) -> list[Outgoing]:
        metrics = get_metrics()
        topic = self._rt.config.kafka.topics.dead_letter
        out = []
        for bad in invalid:
            metrics.invalid_events.labels(bad.topic, bad.field or "message").inc()
            out.append(Outgoing(topic, bad.key, dead_letter_record(bad, self._rt.validator.redact)))
        return out

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

    def _emit(
        self, records: list[dict[str, Any]], event_ms: list[int], fresh: Iterable[ParsedEvent]
    ) -> list[dict[str, Any]]:
        """Stamp trigger records with their emission time and observe their latency
        (``event_ms``: the records' event times; ``fresh``: the round's fresh events,
        whose Kafka times give the latency from ingest)."""
        if not records:
            return records
        metrics = get_metrics()
        ingest = {ev.event_id: ev.ingest_ms for ev in fresh}
        emitted_ms = self._rt.clock_ms()  # one round's records go out together
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
    def _count_transitions(before: np.ndarray, after: np.ndarray) -> None:
        metrics = get_metrics()
        for stage in after["stage"][after["stage"] != before["stage"]]:
            metrics.stage_transitions.labels(STAGES[stage]).inc()

    # -- commit -------------------------------------------------------------------------
    def commit_idle(self, now_ms: int) -> None:
        """Commit nothing but the progress and the outbox trim (end of input)."""
        self._commit(Changes.none(), now_ms)

    def _commit(self, changes: Changes, now_ms: int, outgoing: list[Outgoing] = ()) -> None:
        out = changes.out
        plan, fired = (out.plan, []) if out is not None else (None, [])
        self._rt.store.commit(
            self._shard,
            changes.states,
            changes.profiles,
            self._unsaved,
            plan,
            fired,
            changes.erase,
            atomic=self._exactly_once,
            customers_delta=changes.customers_delta,
            outbox=[encode_outgoing(record) for record in outgoing],
            outbox_trim=self._outbox.take_done(),
        )
        get_metrics().outbox_records.labels(str(self._shard)).set(
            self._outbox.pending() + len(outgoing)
        )
        self.progress.update(self._unsaved)
        self._unsaved = {}
        self._last_progress_write_ms = now_ms
