"""What one processing round does to its customers, computed from what was loaded.

This module owns the work between a round's loads and its commit
(docs/architecture.md): the exactly-once checks, the customer step
(``operators.customer_step``), the contact policies, and the records, profiles
and erasures to write. It only reads Redis (the policies' stored profile fields,
an erased customer's timer members) and writes nothing, and records no metric
(``Work.observe`` does, once), so a round can be computed again for a subset of
its customers: that is how one customer's failure is kept from the others
(``flows.quarantine``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from itertools import compress
from typing import Any, NamedTuple

import numpy as np
import orjson

from crmstream.config import CrmConfig
from crmstream.flows.sink import Outgoing
from crmstream.metrics import get_metrics
from crmstream.operators.columns import EventColumns
from crmstream.operators.customer_step import CustomerStep
from crmstream.operators.derive import derive_batch
from crmstream.operators.events import EVENT_TYPES, ParsedEvent, new_tuple, parse_time_ms
from crmstream.operators.hashing import event_id_digests
from crmstream.operators.kernels import check_batch
from crmstream.operators.params import (
    FRESH,
    REPLAYED,
    Params,
)
from crmstream.operators.policies import PolicyContext, PolicyEngine
from crmstream.operators.rules import TriggerBuilder, iso_ms
from crmstream.operators.step_io import Epoch, StepInput, StepOutput, epoch_at
from crmstream.operators.timer_slots import WAKE
from crmstream.state.encoding import ROLE_INDEX, STAGES, encode_records, fresh_records
from crmstream.state.profile import profile_changed, profile_rows
from crmstream.state.promises import Promise
from crmstream.state.store import StateStore
from crmstream.state.timers import Timer, parse_member

# What the exactly-once checks record of the input in a customer's state.
_INPUT_FIELDS = ("applied_partition", "applied_offset", "recent_ids", "recent_s", "recent_next")
_NO_BOUND = -(2**62)
_AS_LOADED = Epoch({}, 0, False, False)  # a customer's context with no event in the round


class Loaded(NamedTuple):
    """A round's inputs as loaded: its customers (those with events first) and their
    states, events (erasure tombstones applied), stored timers that may fire, and open
    orders."""

    customers: list[str]
    states: np.ndarray  # decoded, as stored
    stateless: np.ndarray  # bool: no stored state
    events: list[ParsedEvent]
    members: list[Timer]
    promises: dict[str, dict[str, Promise]]
    mark: int | None  # the watermark
    others_bound: int | None  # timers of customers without events fire up to here
    now_ms: int

    def only(self, rows: list[int]) -> Loaded:
        """The inputs of the customers at ``rows`` alone."""
        customers = [self.customers[i] for i in rows]
        chosen = set(customers)
        return self._replace(
            customers=customers,
            states=self.states[rows],
            stateless=self.stateless[rows],
            events=[ev for ev in self.events if ev.customer_id in chosen],
            members=[t for t in self.members if t.customer in chosen],
            promises={c: p for c, p in self.promises.items() if c in chosen},
        )


class Work(NamedTuple):
    """What a round writes and sends, and what its metrics count."""

    states: dict[str, bytes]
    profiles: dict[str, dict[str, str]]
    out: StepOutput
    erase: list[tuple[str, list[bytes], dict[str, str], int, int]]
    customers_delta: int
    triggers: list[dict[str, Any]]
    trigger_ms: list[int]  # the triggers' event times
    suppressions: list[dict[str, Any]]
    outgoing: list[Outgoing]
    fresh: list[ParsedEvent]
    counts: Counter  # (counter name, topic, event type) -> events
    transitions: list[int]  # stages entered

    @classmethod
    def only_states(cls, states: dict[str, bytes], customers_delta: int) -> Work:
        """A round that writes these states and nothing else (the benchmarks' I/O floor)."""
        return cls(states, {}, StepOutput.empty(), [], customers_delta, [], [], [], [], [],
                   Counter(), [])  # fmt: skip

    def observe(self, emitted_ms: int) -> None:
        """Count the round's events, suppressions, erasures, stage changes and latencies."""
        metrics = get_metrics()
        for (name, topic, kind), n in self.counts.items():
            counter = getattr(metrics, name)
            (counter.labels(topic, kind) if kind else counter.labels(topic)).inc(n)
        if self.out.late:
            metrics.late_events.inc(self.out.late)
        if self.out.erasures:
            metrics.erasures.inc(len(self.out.erasures))
        stopped = Counter((r["trigger_type"], r["policy"]) for r in self.suppressions)
        for labels, n in stopped.items():
            metrics.suppressions.labels(*labels).inc(n)
        for stage in self.transitions:
            metrics.stage_transitions.labels(STAGES[stage]).inc()
        ingest = {ev.event_id: ev.ingest_ms for ev in self.fresh}
        since_event: dict[str, list[float]] = {}
        since_ingest: dict[str, list[float]] = {}
        for record, event_ms in zip(self.triggers, self.trigger_ms, strict=True):
            kind = record["trigger_type"]
            since_event.setdefault(kind, []).append(max(0, emitted_ms - event_ms) / 1000)
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


class StepWork:
    """Computes rounds of one shard, built once from the configuration."""

    def __init__(
        self,
        config: CrmConfig,
        params: Params,
        store: StateStore,
        shard: int,
        role_of: Any,
        triggers: TriggerBuilder,
        guards: frozenset[str] = frozenset({"customer_offsets", "event_ids"}),
    ):
        self._config = config
        self._params = params
        self._store = store
        self._shard = shard
        self._role_of = role_of
        self._triggers = triggers
        self._customers = CustomerStep(config, params)
        self._policies = PolicyEngine(config)
        # The exactly-once checks on (a test hook: flows/shard_step.GUARDS).
        self._dedup_horizon_s = (
            config.processing.dedup_horizon_seconds if "event_ids" in guards else 0
        )
        self._customer_offsets = "customer_offsets" in guards
        self._exactly_once = config.processing.exactly_once
        self._topics = config.kafka.topics

    def compute(self, loaded: Loaded, emitted_ms: int) -> Work:
        """The round's work for every customer of ``loaded`` (``emitted_ms``: the trigger
        records' emission time)."""
        customers = loaded.customers
        records = loaded.states.copy()
        index = {c: i for i, c in enumerate(customers)}
        columns = EventColumns.of(loaded.events, index)
        fresh, counts, keep = self.unapplied(loaded.events, records, index, columns)
        fresh_columns = columns if keep is None else columns.take(keep)
        bound = self._bounds(loaded, columns, fresh_columns)
        promises = {c: dict(orders) for c, orders in loaded.promises.items()}
        out = self._customers.run(
            StepInput(customers, records, fresh, fresh_columns, loaded.members, promises, bound)
        )
        if out.erasures:
            self._reseed_erased(out, records, index, fresh)
        triggers, trigger_ms, suppressions, held_past = self._decide(
            out, records, loaded, index, bound
        )
        emitted_at = iso_ms(emitted_ms)  # one round's records go out together
        for record in triggers:
            record["emitted_at"] = emitted_at
        stages = records["stage"] != loaded.states["stage"]
        states = {
            c: blob
            for c, blob, keep in zip(customers, encode_records(records), out.touched, strict=True)
            if keep
        }
        erased = {e.customer for e in out.erasures}
        delta = sum(1 for c in states if loaded.stateless[index[c]] or c in erased)
        delta -= sum(1 for c in erased if not loaded.stateless[index[c]])
        return Work(
            states,
            self._profiles(customers, records, loaded, out),
            out,
            self._erase(out, loaded.now_ms, held_past),
            delta,
            triggers,
            trigger_ms,
            suppressions,
            self._outgoing(triggers, suppressions),
            fresh,
            counts,
            records["stage"][stages].tolist(),
        )

    @staticmethod
    def _bounds(loaded: Loaded, events: EventColumns, fresh: EventColumns) -> np.ndarray:
        """Per customer, the time up to which its timers fire in the round: just before its
        newest event, or the watermark (docs/triggers.md, "Event time")."""
        others = _NO_BOUND if loaded.others_bound is None else loaded.others_bound
        bound = np.full(len(loaded.customers), others, np.int64)
        bound[events.cust] = _NO_BOUND if loaded.mark is None else loaded.mark - 1
        np.maximum.at(bound, fresh.cust, fresh.time - 1)  # customers with events
        return bound

    # -- before the customer step ----------------------------------------------------
    def unapplied(
        self,
        events: list[ParsedEvent],
        records: np.ndarray,
        index: dict[str, int],
        columns: EventColumns | None = None,
    ) -> tuple[list[ParsedEvent], Counter, np.ndarray | None]:
        """Drop events at or below the offsets each customer's state already holds, and
        duplicates: an event_id among the customer's last ``DEDUP_IDS`` within the horizon.
        Returns the events kept, what the metrics count of them, and the mask that kept
        them (None: all)."""
        counts: Counter = Counter()
        n = len(events)
        if not n:
            return events, counts, None
        if columns is None:
            columns = EventColumns.of(events, index)
        topics = columns.topic
        names = list(dict.fromkeys(topics))  # the round's topics, numbered
        topic_index = np.fromiter(map({t: i for i, t in enumerate(names)}.__getitem__, topics),
                                  np.int32, n)  # fmt: skip
        fresh, keep = events, None
        if self._exactly_once:
            verdict = self._check(events, names, topic_index, records, columns)
            keep = verdict == FRESH
            if keep.all():
                keep = None
            else:
                fresh = list(compress(events, keep))
                for i in np.flatnonzero(~keep).tolist():
                    name = "skipped_events" if verdict[i] == REPLAYED else "duplicate_events"
                    counts[name, events[i].topic, None] += 1
        # Accepted events per (topic, type), counted as one number each: topic * 256 + type.
        pairs = topic_index * 256 + columns.type_code
        accepted = np.bincount(pairs if keep is None else pairs[keep])
        for pair in np.flatnonzero(accepted).tolist():
            topic, code = divmod(pair, 256)
            counts["events_in", names[topic], EVENT_TYPES[code]] += int(accepted[pair])
        return fresh, counts, keep

    def _check(
        self,
        events: list[ParsedEvent],
        names: list[str],
        topic_index: np.ndarray,
        records: np.ndarray,
        columns: EventColumns,
    ) -> np.ndarray:
        """The exactly-once verdict of each event, in the customers' timeline order (as the
        customer step applies them), so a customer's ring of recent ids holds the same ids
        in the same slots however the input was cut into steps."""
        n = len(events)
        roles = np.array([ROLE_INDEX[self._role_of(t)] for t in names], np.int8)
        horizon_s = self._dedup_horizon_s
        ids = list(columns.event_id)
        digests = event_id_digests(ids) if horizon_s else np.zeros(n, np.uint64)
        cust, times = columns.cust, columns.time
        order = np.lexsort((np.arange(n), columns.ingest, times))
        partitions, offsets = columns.partition, columns.offset
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
            offsets=self._customer_offsets,
        )
        return verdict

    def _reseed_erased(
        self, out: StepOutput, records: np.ndarray, index: dict[str, int], fresh: list
    ) -> None:
        """A customer erased in the round starts again from a fresh record: it records the
        input positions and event ids of what it did after the erasure, as the exactly-once
        checks record them in a new customer's state in a later step."""
        for erasure in out.erasures:
            row = index[erasure.customer]
            after = [ev for ev in fresh if ev.customer_id == erasure.customer
                     and ev.event_time_ms > erasure.event.event_time_ms]  # fmt: skip
            if not after:
                continue
            record = fresh_records(1)
            self.unapplied(after, record, {erasure.customer: 0})
            for field in _INPUT_FIELDS:
                records[field][row] = record[field][0]

    # -- after it -----------------------------------------------------------------------
    def _decide(
        self,
        out: StepOutput,
        records: np.ndarray,
        loaded: Loaded,
        index: dict[str, int],
        bound: np.ndarray,
    ) -> tuple[list[dict[str, Any]], list[int], list[dict[str, Any]], dict]:
        """Run the candidates through the contact policies, each customer's in its timeline
        order and each in the context of its instant: records to emit (and their event
        times), suppressions, and the quiet-hours holds erasures removed (per customer and
        life). A trigger held through quiet hours that end by the customer's ``bound`` (as
        its timers) goes out now; a later one is held as a timer. A hold that ends goes out
        only if its channel still has consent then (stopped with policy ``consent`` if not).

        A customer's stored profile is read only when the customer had a stored
        state: both are written in the same commit and deleted together on
        erasure, so a customer new in this step has no stored profile (Redis
        must not evict keys: docs/operations.md)."""
        by_customer: dict[str, list[int]] = {}
        for k, cand in enumerate(out.candidates):
            by_customer.setdefault(cand.customer, []).append(k)
        holding = {t.customer for t in out.held}
        known = sorted(c for c in by_customer.keys() | holding if not loaded.stateless[index[c]])
        fields = self._policies.profile_fields
        stored = self._store.load_profiles(known, fields) if known else {}
        approved, approved_ms, suppressions = [], [], []
        erased_at: dict[str, list[int]] = {}
        held_past: dict[tuple[str, int], int] = {}  # (customer, life) -> holds removed
        for erasure in out.erasures:
            erased_at.setdefault(erasure.customer, []).append(erasure.event.event_time_ms)
        triggers = self._triggers
        for customer, ks in by_customer.items():
            ends = erased_at.get(customer, [])
            lives = self._lives(out, customer, ks, records, loaded.states, index,
                                stored.get(customer, {}))  # fmt: skip
            for life, ok, stopped in lives:
                end = ends[life] if life < len(ends) else None
                for decision in ok:
                    record = triggers.build(decision.candidate)
                    record.update(decision.extras)
                    hold = decision.hold_until_ms
                    # Quiet hours: a hold that ends by the customer's bound goes out now
                    # (in the context of its end), a later one waits as a durable timer.
                    # Before an erasure in the step, the hold's end comes before the
                    # erasure or never (it removes the timer).
                    if hold is None:
                        due = True
                    elif end is not None:
                        due = hold < end
                    else:
                        due = hold <= bound[index[customer]]  # as its timers (_bounds)
                    why = (
                        None
                        if hold is None or not due
                        else self._lost_consent(
                            record, hold, out.epochs[customer], stored.get(customer, {})
                        )
                    )
                    if why:
                        suppressions.append(triggers.stopped(record, "consent", why))
                    elif due:
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
        for timer in out.held:  # stored holds that ended in the round
            try:
                record = orjson.loads(timer.ref)
            except orjson.JSONDecodeError:
                raise ValueError(  # a hand-edited member: named, as every damaged key
                    f"the quiet-hours hold {timer.member!r} of customer {timer.customer!r} "
                    "does not hold a trigger record (JSON)"
                ) from None
            if type(record) is not dict or record.get("customer_id") != timer.customer:
                owner = record.get("customer_id") if type(record) is dict else None
                raise ValueError(  # a hand-edited member: it must not go out for another
                    f"the quiet-hours hold {timer.member!r} of customer {timer.customer!r} "
                    f"holds a trigger of customer {owner!r}"
                )
            epochs = out.epochs.get(timer.customer, [_AS_LOADED])
            why = self._lost_consent(record, timer.due_ms, epochs, stored.get(timer.customer, {}))
            if why:
                suppressions.append(triggers.stopped(record, "consent", why))
            else:
                approved.append(record)
                approved_ms.append(parse_time_ms(record["event_time"]))
        return approved, approved_ms, suppressions, held_past

    def _lost_consent(
        self, record: dict[str, Any], hold_ms: int, epochs: list[Epoch], stored: dict[str, str]
    ) -> str | None:
        """Why a trigger held through quiet hours may not go out when the hold ends at
        ``hold_ms`` (None: it may): its channel's consent was withdrawn in the meantime
        (docs/triggers.md: a withdrawal applies at once), as the customer's context at that
        instant says."""
        epoch = epoch_at(epochs, hold_ms)
        profile = epoch.updates if epoch.forget_stored else {**stored, **epoch.updates}
        why = self._policies.no_consent(record["trigger_type"], record["channel"], profile)
        if why is None:
            return None
        return f"{why} when its quiet-hours hold ended at {iso_ms(hold_ms)}"

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
        self, customers: list[str], records: np.ndarray, loaded: Loaded, out: StepOutput
    ) -> dict[str, dict[str, str]]:
        """The readable profile fields to write: the derived ones (as of each customer's
        clock) of customers whose configured fields may have changed or who are new,
        and what this step's customer events set."""
        config = self._config
        changed = profile_changed(loaded.states, records, config) | loaded.stateless
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
        self, out: StepOutput, now_ms: int, held_past: dict[tuple[str, int], int]
    ) -> list[tuple[str, list[bytes], dict[str, str], int, int]]:
        """Right to be forgotten: the keys and timers to delete, and an audit entry that
        holds no personal data (a salted hash of the id) with the timers pending."""
        store = self._store
        ttl_s = int(self._config.policies.erasure_tombstone_days * 86400)
        erase = []
        gone = set(out.plan.cancel)  # fired or cancelled before the erasure
        lives: dict[str, int] = {}
        for erasure in out.erasures:
            customer, ev = erasure.customer, erasure.event
            life = lives[customer] = lives.get(customer, -1) + 1
            members = store.timer_members_of(self._shard, customer)
            stored = {m for m in members if parse_member(m, 0).kind != WAKE} - gone
            pending = erasure.kept + len(stored | erasure.members)
            pending += held_past.get((customer, life), 0)
            audit = {
                "action": "erasure",
                "subject": store.subject(customer),
                "requested_at": iso_ms(ev.event_time_ms),
                "applied_at": iso_ms(now_ms),
                "timers_removed": str(pending),
            }
            erase.append((customer, members, audit, ev.event_time_ms, ttl_s))
        return erase

    def _outgoing(
        self, triggers: list[dict[str, Any]], suppressions: list[dict[str, Any]]
    ) -> list[Outgoing]:
        """The trigger and suppression records to send."""
        to_triggers, to_suppressions = self._topics.triggers, self._topics.suppressions
        dumps = orjson.dumps
        # new_tuple: without the namedtuple's Python-level constructor, per record
        out = [
            new_tuple(Outgoing, (to_triggers, record["customer_id"].encode(), dumps(record)))
            for record in triggers
        ]
        for record in suppressions:
            key = None if record["customer_id"] == "erased" else record["customer_id"].encode()
            out.append(new_tuple(Outgoing, (to_suppressions, key, dumps(record))))
        return out


def _repeated(topics: np.ndarray, partitions: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Which events repeat an input position (topic, partition, offset) seen earlier in
    the batch (a message read twice)."""
    order = np.lexsort((np.arange(len(offsets)), offsets, partitions, topics))
    same = np.zeros(len(offsets), bool)
    if len(offsets) > 1:
        a, b = order[:-1], order[1:]
        same[b] = (
            (topics[a] == topics[b]) & (partitions[a] == partitions[b]) & (offsets[a] == offsets[b])
        )
    return same
