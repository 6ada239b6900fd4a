"""The customer step: one shard step's events and due timers, per customer in event time.

This module owns DESIGN.md decision 13 (results that do not depend on
batching). It is a pure function of its inputs (decoded states, the step's
fresh events, the stored timers that may fall due, open orders): no Redis, no
Kafka, no clock. What it returns the I/O layer (``flows.shard_step``) commits.

Each customer's timeline is its events in event-time order (ties in input
order) merged with its timers: a timer due at T fires after the customer's
events at or before T and before its events after T, with the state as of
then, and what it does (a chained timer, a cleared slot, a moved clock) is seen
by the events after it. A timer fires in this step when it is due at or before
the customer's ``bound``: the shard's watermark, or just before the customer's
newest event in the step (a customer's own later event proves its time has
passed). Derived labels (churn level, tier, segment, interest shift) are
evaluated after every event and at every fired timer, so a derived trigger
carries the time of the event or timer that made it true.

For speed the timeline is cut into segments, applied for all customers at once
by the Numba kernel: a segment ends before the customer's next due timer, after
an event that changes the contact policies' view of the customer (profile,
consent, "too often", erasure), and before the first event later than the
earliest timer an event of the segment may schedule (``_BREAK_DELAY``). Due
timers then fire in waves, one per customer per wave, with one kernel call to
evaluate the labels of each wave.

Candidates leave with the policy context (``Epoch``) of the instant they fired
in; ``operators.policies`` decides them in each customer's timeline order.
"""

from __future__ import annotations

import logging

import numpy as np
from numba import njit

from crmstream.config import CrmConfig
from crmstream.operators.catalog import (
    TIMER_EVENT_CODES,
    Before,
    Candidate,
    TimerPlan,
    TriggerCatalog,
    close_order,
)
from crmstream.operators.events import EVENT_CODE, EVENT_TYPES, ParsedEvent
from crmstream.operators.firings import FiringCandidates
from crmstream.operators.kernels import (
    BatchEvents,
    apply_batch,
    evaluate_batch,
)
from crmstream.operators.params import (
    MS_PER_DAY,
    Params,
)
from crmstream.operators.step_io import Epoch, Erasure, StepInput, StepOutput
from crmstream.operators.timer_slots import FOLDED, NEVER, WAKE, TimerSlots, slot_of
from crmstream.state.encoding import NUM_EVENT_TYPES, fresh_records
from crmstream.state.profile import event_fields
from crmstream.state.timers import Timer

log = logging.getLogger(__name__)

ERASURE_REQUESTED = EVENT_CODE["erasure_requested"]
CONTACTED_TOO_OFTEN = EVENT_CODE["contacted_too_often"]
ORDER_DELIVERED = EVENT_CODE["order_delivered"]
_PROFILE_CODES = frozenset(
    EVENT_CODE[k] for k in ("profile_updated", "consent_granted", "consent_withdrawn")
)
# Events after which the contact policies see the customer differently: a segment
# ends right after each, so a candidate's context is the one of its instant.
_CONTEXT_CODES = _PROFILE_CODES | {CONTACTED_TOO_OFTEN, ERASURE_REQUESTED}
_HARD = -1  # _BREAK_DELAY: the segment ends right after the event
_NONE = np.iinfo(np.int64).max  # _BREAK_DELAY: the event schedules nothing
_MAX_WAVES = 100_000  # a guard against a timer that reschedules itself at its own due time
# Tie order of one customer's timers due at the same instant.
_KIND_RANK = {kind: rank for rank, kind in enumerate((*FOLDED, "delivery", "welcome",
                                                       "repurchase"))}  # fmt: skip


def break_delays(config: CrmConfig) -> np.ndarray:
    """Per event type, the least time after the event at which a timer it schedules can
    fall due (``_HARD``: the segment ends after it; ``_NONE``: it schedules nothing)."""
    rules = config.rules
    delay = np.full(NUM_EVENT_TYPES, _NONE, np.int64)
    for code in TIMER_EVENT_CODES:
        delay[code] = 0
    cart = rules.cart_abandoned
    delay[EVENT_CODE["add_to_cart"]] = int(
        min(cart.first_delay_minutes * 60_000, cart.second_delay_hours * 3_600_000)
    )
    for code in _CONTEXT_CODES:
        delay[code] = _HARD
    return delay


@njit(cache=True, nogil=True)
def _segment_ends(rows, cursor, end, time_s, type_s, delay, first_due, recheck, out):
    """Per customer row, where its next segment ends (see the module docstring).
    ``recheck[c]``: the delay of the churn recheck the row's first event schedules (it
    has none pending), else ``_NONE``."""
    for k in range(rows.shape[0]):
        c = rows[k]
        limit = first_due[c]
        j = cursor[c]
        if j < end[c] and recheck[c] != _NONE and time_s[j] + recheck[c] < limit:
            limit = time_s[j] + recheck[c]
        while j < end[c]:
            t = time_s[j]
            if t > limit:
                break
            d = delay[type_s[j]]
            j += 1
            if d == _HARD:
                break
            if d != _NONE and t + d < limit:
                limit = t + d
        out[c] = j


class CustomerStep:
    """The customer step, built once per shard from the configuration."""

    def __init__(self, config: CrmConfig, params: Params):
        self._config = config
        self._params = params
        self._catalog = TriggerCatalog(config, params.churn_weights)
        self._firings = FiringCandidates(config, params.churn_weights)
        self._slots = TimerSlots(config)
        self._delay = break_delays(config)
        self._recheck_ms = (
            int(config.rules.churn_risk.recheck_days * MS_PER_DAY)
            if config.rules.churn_risk.enabled
            else 0
        )
        self._planning = np.zeros(NUM_EVENT_TYPES, bool)
        self._planning[sorted(TIMER_EVENT_CODES)] = True
        self._context = np.zeros(NUM_EVENT_TYPES, bool)
        self._context[sorted(_CONTEXT_CODES)] = True

    @property
    def catalog(self) -> TriggerCatalog:
        return self._catalog

    @property
    def slots(self) -> TimerSlots:
        return self._slots

    def run(self, step: StepInput) -> StepOutput:
        """Apply the step's events and fire its due timers, customer by customer in event
        time; see the module docstring."""
        return _Run(self, step).run()


class _Run:
    """One customer step's working state."""

    def __init__(self, owner: CustomerStep, step: StepInput):
        self.o = owner
        self.step = step
        self.customers = step.customers
        self.records = step.records
        self.index = {c: i for i, c in enumerate(self.customers)}
        n = len(self.customers)
        col = step.columns
        m = len(col.cust)
        # Per customer in event-time order; ties in Kafka-time order, then input order
        # (topic, partition, offset): the order a finer cutting into steps would give.
        self.order = order = np.lexsort((np.arange(m), col.ingest, col.time, col.cust))
        self.cust_s = col.cust[order]
        self.time_s = col.time[order]
        self.type_s = col.type_code[order]
        self.cat_s = col.category[order]
        self.amount_s = col.amount[order]
        self.aux_s = col.aux[order]
        rows = np.arange(n)
        self.start = np.searchsorted(self.cust_s, rows, "left")
        self.end = np.searchsorted(self.cust_s, rows, "right")
        self.cursor = self.start.copy()
        self.bound = np.asarray(step.bound, np.int64)
        # Member timers per customer row, by member; which members the set held.
        self.members: dict[int, dict[str, Timer]] = {}
        self.stored: dict[str, int] = {}  # member -> its due time in the set
        self.woke: set[int] = set()
        for timer in step.members:
            row = self.index[timer.customer]
            if timer.kind == WAKE:
                self.woke.add(row)
                continue
            self.members.setdefault(row, {})[timer.member] = timer
            self.stored[timer.member] = timer.due_ms
        self.promises = step.promises
        self.folded_before = owner.slots.earliest(self.records)
        self.plan = TimerPlan([], [], {}, {})
        self.cancelled: set[str] = set()
        self.candidates: list[Candidate] = []
        self.epochs_of: list[int] = []
        self.keys: list[tuple[int, ...]] = []
        self.epochs: dict[str, list[Epoch]] = {}  # made when first needed (_epochs)
        self.too_often_at_load = self.records["too_often_day"].copy()
        self.fired: list[Timer] = []
        self.held: list[Timer] = []
        self.erasures: list[Erasure] = []
        self.erased_at: dict[int, int] = {}
        self.touched = np.zeros(n, bool)  # set as events apply and timers fire
        self.late = 0

    # -- the loop ---------------------------------------------------------------
    def run(self) -> StepOutput:
        rows = np.arange(len(self.customers))
        while len(rows):
            seg_end = self._segments(rows)
            self._apply_segments(rows, seg_end)
            # A timer fires before the customer's next event if due before it.
            limit = self.bound[rows].copy()
            more = seg_end[rows] < self.end[rows]
            limit[more] = self.time_s[seg_end[rows][more]] - 1
            self._fire_timers(rows, limit)
            self.cursor[rows] = seg_end[rows]
            self._skip_erased(rows)
            rows = rows[self.cursor[rows] < self.end[rows]]
        self._finish_members()
        return StepOutput(
            self.candidates,
            self.epochs_of,
            self.keys,
            self.epochs,
            self.plan,
            self.fired,
            self.held,
            self.erasures,
            self.touched,
            self.late,
        )

    def _first_due(self, rows: np.ndarray) -> np.ndarray:
        """Per row, its earliest pending timer that fires in this step (``NEVER``: none)."""
        slots = self.o.slots
        due = slots.earliest(slots.fields_at(self.records, rows))
        for k, row in enumerate(rows.tolist()):
            own = self.members.get(row)
            if own:  # quiet-hours holds are not part of the customer's timeline
                dues = [t.due_ms for t in own.values() if t.kind != "deferred"]
                due[k] = min(due[k], *dues) if dues else due[k]
        return np.where(due <= self.bound[rows], due, NEVER)

    def _segments(self, rows: np.ndarray) -> np.ndarray:
        n = len(self.customers)
        first_due = np.full(n, NEVER, np.int64)
        first_due[rows] = self._first_due(rows)
        recheck = np.full(n, _NONE, np.int64)
        if self.o._recheck_ms:
            recheck[self.records["recheck_due_ms"] == 0] = self.o._recheck_ms
        seg_end = self.cursor.copy()
        _segment_ends(rows, self.cursor, self.end, self.time_s, self.type_s, self.o._delay,
                      first_due, recheck, seg_end)  # fmt: skip
        return seg_end

    # -- events -------------------------------------------------------------------
    def _apply_segments(self, rows: np.ndarray, seg_end: np.ndarray) -> None:
        lo, hi = self.cursor[rows], seg_end[rows]
        sizes = hi - lo
        if not sizes.any():
            return
        # The segments' positions in the sorted events, customer after customer.
        idx = np.repeat(lo - np.cumsum(sizes) + sizes, sizes) + np.arange(sizes.sum())
        applied = rows[sizes > 0]
        types = self.type_s[idx]
        planning_pos = idx[self.o._planning[types]]
        plan_rows = np.unique(self.cust_s[planning_pos])
        recs = self.records  # the columns alone: a whole record is its windows too
        before = list(zip(recs["orders_total"][plan_rows].tolist(),
                          recs["type_counts"][plan_rows, ORDER_DELIVERED].tolist(),
                          recs["last_cart_ms"][plan_rows].tolist(),
                          recs["last_order_ms"][plan_rows].tolist(),
                          recs["purchase_days"][plan_rows].tolist(),
                          recs["last_seen_ms"][plan_rows].tolist(), strict=True))  # fmt: skip
        batch = BatchEvents(self.cust_s[idx], types, self.cat_s[idx], self.time_s[idx],
                            self.amount_s[idx], self.aux_s[idx])  # fmt: skip
        firings, late = apply_batch(self.records, batch, self.o._params)
        self.touched[applied] = True
        self.late += late
        if self.o._recheck_ms:
            # A customer with no recheck pending gets one, after the first event that
            # finds none; a pending one that newer events made early is moved when it
            # comes due (_stale_recheck). Both follow from the timeline alone.
            none = self.records["recheck_due_ms"][applied] == 0
            first = self.time_s[lo[sizes > 0]]
            self.records["recheck_due_ms"][applied[none]] = first[none] + self.o._recheck_ms
        # Kernel firings; one on a segment's closing context event is in the context
        # that event opens.
        event_at = self._event_at
        positions = idx[firings.event].tolist()
        owners = self.cust_s[idx[firings.event]].tolist()
        found = self.o._firings.candidates(
            firings, [self.customers[r] for r in owners], [event_at(p) for p in positions]
        )
        for cand, row, pos in zip(found, owners, positions, strict=True):
            closing = pos == seg_end[row] - 1 and self.o._context[self.type_s[pos]]
            self._add(cand, self._current(row) + closing, self._event_key(pos))
        self._plan(plan_rows, planning_pos, before)
        last = seg_end[applied] - 1
        context_rows = applied[self.o._context[self.type_s[last]]]
        for row, pos in zip(context_rows.tolist(), (seg_end[context_rows] - 1).tolist(),
                            strict=True):  # fmt: skip
            self._new_context(row, event_at(pos))

    def _event_at(self, pos: int) -> ParsedEvent:
        return self.step.events[self.order[pos]]

    def _plan(
        self,
        plan_rows: np.ndarray,
        planning_pos: np.ndarray,
        before: list[tuple[int, int, int, int, int, int]],
    ) -> None:
        """Timers and event-driven candidates of the segments' planning events."""
        if not len(plan_rows):
            return
        by_row: dict[int, list[ParsedEvent]] = {}
        key_of: dict[tuple[int, str], tuple[int, ...]] = {}  # (row, event id) -> place
        for pos, row in zip(planning_pos.tolist(), self.cust_s[planning_pos].tolist(),
                            strict=True):  # fmt: skip
            ev = self._event_at(pos)
            by_row.setdefault(row, []).append(ev)
            key_of.setdefault((row, ev.event_id), self._event_key(pos))
        plan, lateness_ms = self.plan, self.o._params.kernel.lateness_ms
        for k, row in enumerate(plan_rows.tolist()):
            customer = self.customers[row]
            own = self.promises.setdefault(customer, {})
            found = self.o._catalog.plan(customer, self.records[row], by_row[row], own, plan,
                                         Before(*before[k]), lateness_ms)  # fmt: skip
            for cand in found:  # their causal is the event's id
                self._add(cand, self._current(row), key_of[row, cand.causal])
            for member in plan.cancel:  # delivered orders: their timers are moot
                self.cancelled.add(member)
                self.members.get(row, {}).pop(member, None)
            plan.cancel.clear()
        fresh = plan.schedule[:]
        plan.schedule.clear()
        self._schedule(fresh)

    def _schedule(self, timers: list[Timer]) -> None:
        if not timers:
            return
        rows = np.fromiter(map(self.index.__getitem__, [t.customer for t in timers]), np.intp,
                           len(timers))  # fmt: skip
        kept = self.o.slots.keep(timers, rows, self.records)
        for timer, row, folded in zip(timers, rows.tolist(), kept.tolist(), strict=True):
            self.touched[row] = True
            if not folded:
                self.members.setdefault(row, {})[timer.member] = timer
                self.cancelled.discard(timer.member)

    def _new_context(self, row: int, ev: ParsedEvent) -> None:
        epochs = self._epochs(row)
        last = epochs[-1]
        if ev.type_code == ERASURE_REQUESTED:
            at = ev.event_time_ms
            epochs.append(Epoch(last.updates, last.too_often_day, True, last.forget_stored,
                                last.life, at))  # fmt: skip
            self._erase(row, ev)
            too_often = int(self.records["too_often_day"][row])
            fresh = Epoch({}, too_often, False, True, last.life + 1, at)
            epochs.append(fresh)
            return
        updates = last.updates
        if ev.type_code in _PROFILE_CODES:
            updates = {**updates, **event_fields(EVENT_TYPES[ev.type_code], ev.fields,
                                                 ev.event_time_ms)}  # fmt: skip
        too_often = int(self.records["too_often_day"][row])
        epochs.append(Epoch(updates, too_often, last.erased, last.forget_stored, last.life,
                            ev.event_time_ms))  # fmt: skip

    def _erase(self, row: int, ev: ParsedEvent) -> None:
        """Right to be forgotten at ``ev``: the customer starts again from a fresh record
        (what it did after the erasure is a new customer's), its open orders and pending
        timers go; the I/O layer deletes its stored keys and records in the fresh record
        the input positions of the events after the erasure."""
        customer = self.customers[row]
        record = self.records[row : row + 1]
        kept = len(self.o.slots.timers_of([customer], record)[0])
        own = self.members.pop(row, {})
        # A quiet-hours hold that ended before the erasure went out then (as a step that
        # ended between the two sends it): it goes out, it is not one of the timers removed.
        held = [t for t in own.values() if t.kind == "deferred" and t.due_ms < ev.event_time_ms]
        self.held.extend(held)
        members = frozenset(own.keys() - {t.member for t in held})
        self.erasures.append(Erasure(customer, ev, kept, members))
        self.records[row] = fresh_records(1)[0]
        self.touched[row] = False  # written again only if it does something after
        self.promises.pop(customer, None)
        self.plan.promises.pop(customer, None)
        self.plan.delivered.pop(customer, None)
        self.erased_at[row] = ev.event_time_ms

    def _skip_erased(self, rows: np.ndarray) -> None:
        """After an erasure, the customer's events at or before its time are dropped, as
        the tombstone drops them when they come in a later step."""
        for row in rows.tolist():
            at = self.erased_at.get(row)
            if at is None:
                continue
            j = self.cursor[row]
            while j < self.end[row] and self.time_s[j] <= at:
                j += 1
            self.cursor[row] = j

    # -- timers -------------------------------------------------------------------
    def _fire_timers(self, rows: np.ndarray, limit: np.ndarray) -> None:
        """Fire every timer of ``rows`` due at or before its ``limit``, in waves of one
        per customer, earliest first."""
        for _ in range(_MAX_WAVES):
            ready = self._next_timers(rows, limit)
            if not ready:
                return
            # Only a customer that fired can have another timer due in the next wave.
            fired = np.isin(rows, [self.index[t.customer] for t in ready])
            rows, limit = rows[fired], limit[fired]
            stale = [self._stale_recheck(t) for t in ready]
            moved = [t for t, m in zip(ready, stale, strict=True) if m]
            timers = [t for t, m in zip(ready, stale, strict=True) if not m]
            wave_rows = np.fromiter([self.index[t.customer] for t in timers], np.int64,
                                    len(timers))  # fmt: skip
            dues = np.fromiter([t.due_ms for t in timers], np.int64, len(timers))
            firings = evaluate_batch(self.records, wave_rows, dues, self.o._params)
            waved = [timers[-1 - e] for e in firings.event.tolist()]
            owners = [t.customer for t in waved]
            found = self.o._firings.candidates(firings, owners, [None] * len(owners))
            for cand, timer in zip(found, waved, strict=True):
                self._add_now(cand, _timer_key(timer))
            again = [self._fire(timer) for timer in timers]
            again += [
                t._replace(due_ms=int(self.records["last_seen_ms"][self.index[t.customer]])
                           + self.o._recheck_ms)
                for t in moved
            ]  # fmt: skip
            self._schedule([t for t in again if t is not None])
        log.warning("timers still due after %d waves; the rest fire in a later round", _MAX_WAVES)

    def _stale_recheck(self, timer: Timer) -> bool:
        """A churn recheck that newer events made early: it moves, it does not fire."""
        if timer.kind != "recheck" or not self.o._recheck_ms:
            return False
        last_seen = int(self.records["last_seen_ms"][self.index[timer.customer]])
        return timer.due_ms < last_seen + self.o._recheck_ms

    def _fire(self, timer: Timer) -> Timer | None:
        """Fire one due timer (its labels already evaluated); returns its next occurrence."""
        customer = timer.customer
        record = self.records[self.index[customer]]
        own = self.promises.get(customer, {})
        self.fired.append(timer)
        cand = self.o._catalog.fire(timer, record, own)
        if cand is not None:
            self._add_now(cand, _timer_key(timer))
        if timer.kind == "delivery" and timer.ref in own:
            own.pop(timer.ref)
            close_order(self.plan, customer, timer.ref)
        return self.o._catalog.reschedule(timer, record)

    def _next_timers(self, rows: np.ndarray, limit: np.ndarray) -> list[Timer]:
        """Per row, its earliest timer due at or before its limit, taken out of the record
        or the members (quiet-hours holds due are taken too, and go out as they are)."""
        slots = self.o.slots
        dues = slots.due_columns(slots.fields_at(self.records, rows))
        dues = np.where((dues > 0) & (dues <= limit[:, None]), dues, NEVER)
        col = dues.argmin(axis=1)
        best = dues[np.arange(len(rows)), col]
        out: list[Timer] = []
        clear_slots, clear_rows = [], []
        members = self.members
        for row, due, c, lim in zip(rows.tolist(), best.tolist(), col.tolist(), limit.tolist(),
                                    strict=True):  # fmt: skip
            if due == NEVER and not members.get(row):
                continue  # nothing of its own is due
            member = self._earliest_member(row, lim)
            if member is not None and (due == NEVER or (member.due_ms, _rank(member.kind))
                                       < (due, c)):  # fmt: skip
                members[row].pop(member.member)
                self.touched[row] = True
                out.append(member)
            elif due != NEVER:
                slot = FOLDED[c]
                out.append(slots.timer(self.customers[row], self.records[row], slot, due))
                clear_slots.append(slot)
                clear_rows.append(row)
                self.touched[row] = True
        self.o.slots.clear(clear_slots, self.records, clear_rows)
        return out

    def _earliest_member(self, row: int, limit: int) -> Timer | None:
        own = self.members.get(row)
        if not own:
            return None
        held = [t for t in own.values() if t.kind == "deferred" and t.due_ms <= limit]
        for timer in held:  # not part of the customer's state: they only go out
            own.pop(timer.member)
            self.held.append(timer)
        due = [t for t in own.values() if t.due_ms <= limit]
        if not due:
            return None
        return min(due, key=lambda t: (t.due_ms, _rank(t.kind), t.ref))

    # -- end ------------------------------------------------------------------------
    def _finish_members(self) -> None:
        """The timer-set writes: pending members added (or moved), stored ones that fired or
        were cancelled removed, and one ``wake`` per customer whose kept timers changed."""
        pending: dict[str, Timer] = {}
        for own in self.members.values():
            pending.update(own)
        stored = self.stored
        self.plan.schedule.extend(
            t for member, t in pending.items() if stored.get(member) != t.due_ms
        )
        gone = (stored.keys() | self.cancelled) - pending.keys()
        self.plan.cancel[:] = sorted(gone)
        after = self.o.slots.earliest(self.records)
        rewake = set(np.flatnonzero(after != self.folded_before).tolist()) | self.woke
        rewake.update(self.index[e.customer] for e in self.erasures)
        for row in sorted(rewake):
            wake = Timer(self.customers[row], WAKE, "", int(after[row]))
            if wake.due_ms != NEVER:
                self.plan.schedule.append(wake)
            else:
                self.plan.cancel.append(wake.member)

    def _epochs(self, row: int) -> list[Epoch]:
        """The customer's policy contexts so far (the first: as loaded)."""
        customer = self.customers[row]
        epochs = self.epochs.get(customer)
        if epochs is None:
            first = Epoch({}, int(self.too_often_at_load[row]), False, False)
            epochs = self.epochs[customer] = [first]
        return epochs

    def _add(self, cand: Candidate, epoch: int, key: tuple[int, ...]) -> None:
        self.candidates.append(cand)
        self.epochs_of.append(epoch)
        self.keys.append(key)

    def _add_now(self, cand: Candidate, key: tuple[int, ...]) -> None:
        """A candidate in the customer's current context."""
        self._add(cand, self._current(self.index[cand.customer]), key)

    def _current(self, row: int) -> int:
        """The customer's current context, in ``epochs``: within a segment, the one in
        effect before the segment (its closing context event opens the next one)."""
        return len(self._epochs(row)) - 1

    def _event_key(self, pos: int) -> tuple[int, ...]:
        """The timeline place of the event at sorted position ``pos``: its time, then
        before any timer due then (0), then its place among the customer's events."""
        return (int(self.time_s[pos]), 0, pos)


def _rank(kind: str) -> int:
    return _KIND_RANK.get(slot_of(kind) or kind, len(_KIND_RANK))


def _timer_key(timer: Timer) -> tuple[int, ...]:
    """A fired timer's place in its customer's timeline: after the events at its due time."""
    return (timer.due_ms, 1, _rank(timer.kind))
