"""The trigger catalogue: which triggers a batch's events and due timers produce.

This module owns the conditions of the triggers (docs/triggers.md) and the
timers that implement the "absence" triggers. It works on decoded records and
parsed events, and returns ``Candidate`` triggers (not yet filtered by the
contact policies) and timer operations for the store to commit.

Timer kinds and what they check when due (``fire``):

- ``cart_1`` / ``cart_2``: a cart add and no order placed between it and the
  due time (first nudge after ``first_delay_minutes``, second after
  ``second_delay_hours``); a later cart add moves both.
- ``dormant_<N>``: no order between the anchoring order (its time is the
  timer's ref) and N days later; every order re-anchors them. Only the next
  step is pending: a step that fires schedules the following one.
- ``delivery``: an order (the ref) not delivered ``hours_after_promise`` after
  its promised time (``customs_hours_after_promise`` once held in customs).
- ``recheck`` (churn re-derivation of a quiet customer), ``birthday``,
  ``potential``, ``repurchase``, ``welcome``: see ``fire``.

A timer set member costs about 130 bytes of Redis, and most customers have a
churn recheck pending, many a win-back step, a cart nudge or a potential
no-repeat. Those kinds (``_FOLDED``) are kept in the customer's state instead,
as what their due time and ref follow from: the recheck's and birthday's due
times, bits for the cart nudges (due at ``last_cart_ms`` plus the delay), the
win-back step (anchored at ``last_order_ms``) and the first order's time. One
``wake`` member, due at the earliest of them, stands for them in the timer set
(``fold_wake``). When it fires, ``expand_wake`` turns it back into the timers
due by the watermark, which fire and reschedule as their own kinds. Scheduling
a kind again replaces its pending timer, as scheduling the same member again
moves it in the set; a timer the state cannot give back exactly stays a
member. A pending cart nudge or potential no-repeat follows a changed delay.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from itertools import compress
from typing import Any, NamedTuple

import numpy as np

from crmstream.config import CrmConfig
from crmstream.operators.events import (
    EVENT_CODE,
    EVENT_TYPES,
    ParsedEvent,
    new_tuple,
    parse_time_ms,
)
from crmstream.operators.kernels import (
    ADD_TO_CART,
    COL,
    LOGISTICS_UPDATE,
    MS_PER_DAY,
    MS_PER_HOUR,
    ORDER_PLACED,
    ORDER_REFUNDED,
    ORDER_RETURNED,
    RULE_BROWSE_INTEREST,
    RULE_HIGH_INTENT,
    SERVICE_TICKET,
    Firings,
    window_sum,
)
from crmstream.operators.rules import iso_ms
from crmstream.state.encoding import (
    FLAG_CART_1,
    FLAG_CART_2,
    FLAG_SHIFT_FIRED,
    KIND_ACTIVITY,
    SEGMENTS,
    STAGES,
    TIERS,
)
from crmstream.state.profile import churn_contributors, top_categories
from crmstream.state.timers import Timer, timer_member

ORDER_SHIPPED = EVENT_CODE["order_shipped"]
ORDER_DELIVERED = EVENT_CODE["order_delivered"]
PROFILE_UPDATED = EVENT_CODE["profile_updated"]
# Events that schedule timers or fire event-driven triggers.
TIMER_EVENT_CODES = frozenset(
    {
        ADD_TO_CART,
        ORDER_PLACED,
        ORDER_SHIPPED,
        ORDER_DELIVERED,
        LOGISTICS_UPDATE,
        ORDER_RETURNED,
        ORDER_REFUNDED,
        SERVICE_TICKET,
        PROFILE_UPDATED,
    }
)
HIGH_VALUE = SEGMENTS.index("high_value")
GOLD = TIERS.index("gold")
CUSTOMS_HOLD = 1.0  # ParsedEvent.aux of a logistics_update with status customs_hold


class Candidate(NamedTuple):
    """A trigger whose condition held, before the contact policies."""

    customer: str
    trigger_type: str
    causal: str  # the causal event id, or timer:<kind>:<ref>:<due>
    event_time_ms: int  # the causal event's time, or the timer's due time
    values: dict[str, Any]  # what fired it
    thresholds: dict[str, Any]  # the configured thresholds it was held against
    window: dict[str, Any] | None
    payload: dict[str, Any]


class Before(NamedTuple):
    """A customer's counters before this batch was applied."""

    orders_total: int
    deliveries: int


class TimerPlan(NamedTuple):
    """Timer writes for one batch, committed with the state."""

    schedule: list[Timer]
    cancel: list[str]  # members
    promises: dict[str, dict[str, int]]  # customer -> order id -> promised delivery (ms)
    delivered: dict[str, list[str]]  # customer -> order ids no longer open


class TriggerCatalog:
    """Trigger conditions and timer planning, built once from the configuration."""

    def __init__(self, config: CrmConfig, churn_weights: np.ndarray):
        self._config = config
        self._categories = config.taxonomy.categories
        self._rules = config.rules
        self._churn_weights = churn_weights

    # -- event-driven -----------------------------------------------------------
    def from_firings(
        self, events: list[ParsedEvent], order: np.ndarray, firings: Firings
    ) -> list[Candidate]:
        """Candidates for the kernel's rule firings (browse interest, high intent)."""
        out: list[Candidate] = []
        browse = self._rules.browse_interest.consecutive_views
        intent = self._rules.high_intent_no_purchase
        # The firings as Python lists, read once: not a NumPy scalar per field and firing.
        rows = order[firings.event].tolist()
        columns = (firings.rule.tolist(), firings.a.tolist(), firings.b.tolist())
        for row, kind, a, b, c in zip(rows, *columns, firings.c.tolist(), strict=True):
            ev = events[row]
            if kind == RULE_BROWSE_INTEREST:
                category = self._categories[a]
                fields: tuple[Any, ...] = (
                    ev.customer_id,
                    "browse_interest",
                    ev.event_id,
                    ev.event_time_ms,
                    {"category": category, "consecutive_views": b},
                    {"consecutive_views": browse},
                    None,
                    {"category": category},
                )
            elif kind == RULE_HIGH_INTENT:
                fields = (
                    ev.customer_id,
                    "high_intent_no_purchase",
                    ev.event_id,
                    ev.event_time_ms,
                    {"views": a, "cart_adds": b, "orders": c},
                    {
                        "min_views": intent.min_views,
                        "min_cart_adds": intent.min_cart_adds,
                        "max_orders": 0,
                    },
                    {"days": intent.window_days, "end": iso_ms(ev.event_time_ms)},
                    {},
                )
            else:
                continue
            out.append(new_tuple(Candidate, fields))
        return out

    # -- timers -----------------------------------------------------------------
    def plan(
        self,
        customer: str,
        record: np.void,
        events: list[ParsedEvent],
        promises: dict[str, int],
        plan: TimerPlan,
        before: Before,
    ) -> list[Candidate]:
        """Add the timer writes ``customer``'s events imply to ``plan``; return the
        event-driven candidates (first order, service recovery)."""
        rules = self._rules
        codes = {ev.type_code for ev in events}
        out = self._event_triggers(customer, record, events, plan, before)
        if ADD_TO_CART in codes and rules.cart_abandoned.enabled:
            cart = int(record["last_cart_ms"])
            first = cart + int(rules.cart_abandoned.first_delay_minutes * 60_000)
            second = cart + int(rules.cart_abandoned.second_delay_hours * MS_PER_HOUR)
            plan.schedule.append(Timer(customer, "cart_1", "", first))
            plan.schedule.append(Timer(customer, "cart_2", "", second))
        if ORDER_PLACED in codes and rules.dormant_win_back.enabled:
            anchor = int(record["last_order_ms"])
            steps = sorted(rules.dormant_win_back.days)
            # One timer at a time: each step schedules the next when it fires. It
            # replaces the pending step of an earlier anchor (fold_wake).
            plan.schedule.append(
                Timer(customer, f"dormant_{steps[0]}", str(anchor), anchor + steps[0] * MS_PER_DAY)
            )
        if not rules.delivery_delay.enabled:
            return out
        delay = rules.delivery_delay
        for ev in events:
            order_id = ev.fields.get("order_id")
            if ev.type_code == ORDER_SHIPPED:
                promised = _promised_ms(ev)
                promises[order_id] = promised
                plan.promises.setdefault(customer, {})[order_id] = promised
                due = promised + int(delay.hours_after_promise * MS_PER_HOUR)
                plan.schedule.append(Timer(customer, "delivery", order_id, due))
            elif ev.type_code == LOGISTICS_UPDATE and ev.aux == CUSTOMS_HOLD:
                if order_id in promises:
                    due = promises[order_id] + int(delay.customs_hours_after_promise * MS_PER_HOUR)
                    plan.schedule.append(Timer(customer, "delivery", order_id, due))
            elif ev.type_code == ORDER_DELIVERED and order_id in promises:
                due = promises[order_id] + int(delay.hours_after_promise * MS_PER_HOUR)
                if ev.event_time_ms <= due:  # delivered in time: the timer is moot
                    plan.cancel.append(timer_member(customer, "delivery", order_id))
                    plan.delivered.setdefault(customer, []).append(order_id)
                    promises.pop(order_id)
        return out

    def _event_triggers(
        self,
        customer: str,
        record: np.void,
        events: list[ParsedEvent],
        plan: TimerPlan,
        before: Before,
    ) -> list[Candidate]:
        rules = self._rules
        out = []
        if rules.churn_risk.enabled:  # re-derive a quiet customer later (absence signals)
            due = int(record["last_seen_ms"]) + int(rules.churn_risk.recheck_days * MS_PER_DAY)
            plan.schedule.append(Timer(customer, "recheck", "", due))
        orders = [ev for ev in events if ev.type_code == ORDER_PLACED]
        if orders and before.orders_total == 0:
            first = min(orders, key=lambda ev: ev.event_time_ms)
            if rules.first_order_welcome.enabled:
                out.append(
                    Candidate(
                        customer,
                        "first_order_welcome",
                        first.event_id,
                        first.event_time_ms,
                        {"stage": "order_placed", "order_id": first.fields.get("order_id")},
                        {},
                        None,
                        {"stage": "order_placed"},
                    )
                )
            if rules.potential_no_repeat.enabled:
                due = first.event_time_ms + rules.potential_no_repeat.days * MS_PER_DAY
                plan.schedule.append(Timer(customer, "potential", str(first.event_time_ms), due))
        rep = rules.repurchase_due
        if orders and rep.enabled and record["purchase_days"] >= rep.min_purchase_days:
            span = int(record["last_purchase_day"] - record["first_purchase_day"])
            mean_days = span / (int(record["purchase_days"]) - 1)
            anchor = int(record["last_order_ms"])
            due = anchor + int((mean_days - rep.days_before) * MS_PER_DAY)
            if mean_days > rep.days_before:
                plan.schedule.append(Timer(customer, "repurchase", str(anchor), due))
        deliveries = [ev for ev in events if ev.type_code == ORDER_DELIVERED]
        if deliveries and before.deliveries == 0 and rules.first_order_welcome.enabled:
            first = min(deliveries, key=lambda ev: ev.event_time_ms)
            due = first.event_time_ms + int(
                rules.first_order_welcome.after_delivery_hours * MS_PER_HOUR
            )
            plan.schedule.append(Timer(customer, "welcome", first.event_id, due))
        for ev in events:
            if (
                ev.type_code == PROFILE_UPDATED
                and "birthday" in ev.fields
                and rules.birthday.enabled
            ):
                due = next_birthday_reminder(
                    ev.fields["birthday"], ev.event_time_ms, rules.birthday.days_before
                )
                plan.schedule.append(Timer(customer, "birthday", ev.fields["birthday"], due))
        valued = record["segment"] == HIGH_VALUE or record["tier"] == GOLD
        if valued and rules.service_recovery.enabled:
            negative = self._config.churn.negative_sentiment
            for ev in events:
                bad_ticket = ev.type_code == SERVICE_TICKET and ev.aux <= negative
                if ev.type_code in (ORDER_RETURNED, ORDER_REFUNDED) or bad_ticket:
                    reason = "negative_ticket" if bad_ticket else EVENT_TYPES[ev.type_code]
                    out.append(
                        Candidate(
                            customer,
                            "service_recovery",
                            ev.event_id,
                            ev.event_time_ms,
                            {
                                "reason": reason,
                                "segment": SEGMENTS[record["segment"]],
                                "tier": TIERS[record["tier"]],
                            },
                            {"segments": ["high_value"], "tiers": ["gold"]},
                            None,
                            {"reason": reason, "order_id": ev.fields.get("order_id")},
                        )
                    )
        return out

    def from_derived_batch(
        self, customers: list[str], records: np.ndarray, derived: np.ndarray
    ) -> list[Candidate]:
        """``from_derived`` of every customer, in order. Which customers' labels changed
        in a way a rule looks at is found for the whole batch at once; only those go
        through ``from_derived``, which decides. The others would give nothing."""
        rules = self._rules
        maybe = np.zeros(len(customers), bool)
        if rules.churn_risk.enabled:
            maybe |= (records["churn_level"] == 2) & (derived[:, COL["old_churn_level"]] < 2)
        if rules.tier_upgrade.enabled:
            maybe |= records["tier"] > derived[:, COL["old_tier"]].astype(np.int64)
            maybe |= (records["segment"] == HIGH_VALUE) & (
                derived[:, COL["old_segment"]].astype(np.int64) != HIGH_VALUE
            )
        rule = rules.interest_shift
        if rule.enabled:
            maybe |= (derived[:, COL["interest_shift"]] >= rule.min_distance) & (
                (records["rule_flags"] & FLAG_SHIFT_FIRED) == 0
            )
        out: list[Candidate] = []
        for i in np.flatnonzero(maybe).tolist():
            out += self.from_derived(customers[i], records[i], derived[i])
        return out

    def from_derived(self, customer: str, record: np.void, row: np.ndarray) -> list[Candidate]:
        """Triggers on changes of the derived labels: churn risk, tier upgrade, interest shift."""
        rules, out = self._rules, []
        as_of = int(record["last_seen_ms"])
        if (
            rules.churn_risk.enabled
            and record["churn_level"] == 2
            and row[COL["old_churn_level"]] < 2
        ):
            churn = self._config.churn
            out.append(
                Candidate(
                    customer,
                    "churn_risk",
                    f"derive:churn_risk:{as_of}",
                    as_of,
                    {
                        "churn_score": round(float(row[COL["churn_score"]]), 4),
                        "top_signals": churn_contributors(row, self._churn_weights),
                    },
                    {"high": churn.high, "hysteresis": churn.hysteresis},
                    None,
                    {"top_categories": self._top(record)},
                )
            )
        if rules.tier_upgrade.enabled:
            old_tier, old_segment = int(row[COL["old_tier"]]), int(row[COL["old_segment"]])
            seg = self._config.segments
            if record["tier"] > old_tier:
                out.append(
                    Candidate(
                        customer,
                        "tier_upgrade",
                        f"derive:tier:{int(record['tier'])}:{as_of}",
                        as_of,
                        {
                            "change": "tier",
                            "from": TIERS[old_tier],
                            "to": TIERS[record["tier"]],
                            "spend_365d": round(float(row[COL["spend_365d"]]), 2),
                        },
                        {
                            "silver_spend_365d": seg.silver_spend_365d,
                            "gold_spend_365d": seg.gold_spend_365d,
                        },
                        None,
                        {"tier": TIERS[record["tier"]]},
                    )
                )
            if record["segment"] == HIGH_VALUE and old_segment != HIGH_VALUE:
                out.append(
                    Candidate(
                        customer,
                        "tier_upgrade",
                        f"derive:high_value:{as_of}",
                        as_of,
                        {
                            "change": "high_value_entered",
                            "orders_90d": int(row[COL["orders_90d"]]),
                            "spend_90d": round(float(row[COL["spend_90d"]]), 2),
                        },
                        {
                            "min_orders_90d": seg.high_value_min_orders_90d,
                            "min_aov": seg.high_value_min_aov,
                        },
                        None,
                        {"segment": "high_value"},
                    )
                )
        shift = float(row[COL["interest_shift"]])
        rule = rules.interest_shift
        if (
            rule.enabled
            and shift >= rule.min_distance
            and not record["rule_flags"] & FLAG_SHIFT_FIRED
        ):
            now_top = int(np.argmax(record["pref"]))
            was_top = int(np.argmax(record["pref_snap"]))
            if now_top != was_top:
                record["rule_flags"] |= FLAG_SHIFT_FIRED
                out.append(
                    Candidate(
                        customer,
                        "interest_shift",
                        f"derive:interest_shift:{int(record['pref_snap_day'])}",
                        as_of,
                        {
                            "from": self._categories[was_top],
                            "to": self._categories[now_top],
                            "cosine_distance": round(shift, 4),
                        },
                        {"min_distance": rule.min_distance},
                        None,
                        {"top_categories": self._top(record)},
                    )
                )
        return out

    def _top(self, record: np.void) -> list[str]:
        return top_categories(record["pref"], self._categories, self._config.preferences.top_k)

    def fire(self, timer: Timer, record: np.void, promises: dict[str, int]) -> Candidate | None:
        """The trigger a due timer produces, or None when its condition no longer holds."""
        rules = self._rules
        causal = f"timer:{timer.kind}:{timer.ref}:{timer.due_ms}"
        if timer.kind in ("cart_1", "cart_2"):
            cart, last_order = int(record["last_cart_ms"]), int(record["last_order_ms"])
            nudge = 1 if timer.kind == "cart_1" else 2
            rule = rules.cart_abandoned
            delay = (
                rule.first_delay_minutes * 60_000
                if nudge == 1
                else rule.second_delay_hours * MS_PER_HOUR
            )
            if cart + int(delay) != timer.due_ms or cart < last_order <= timer.due_ms:
                return None  # moved by a later cart add, or an order came in time
            return Candidate(
                timer.customer,
                "cart_abandoned",
                causal,
                timer.due_ms,
                {"cart_added_at": iso_ms(cart), "nudge": nudge, "orders_since": 0},
                {
                    "first_delay_minutes": rule.first_delay_minutes,
                    "second_delay_hours": rule.second_delay_hours,
                },
                {"start": iso_ms(cart), "end": iso_ms(timer.due_ms)},
                {"nudge": nudge, "top_categories": self._top(record)},
            )
        if timer.kind.startswith("dormant_"):
            anchor, last_order = int(timer.ref), int(record["last_order_ms"])
            if anchor < last_order <= timer.due_ms:
                return None  # bought again before the due time
            days = int(timer.kind.split("_", 1)[1])
            return Candidate(
                timer.customer,
                "dormant_win_back",
                causal,
                timer.due_ms,
                {"days_without_purchase": days, "last_purchase_at": iso_ms(anchor)},
                {"days": list(rules.dormant_win_back.days)},
                {"start": iso_ms(anchor), "end": iso_ms(timer.due_ms)},
                {"step_days": days},
            )
        if timer.kind == "delivery":
            promised = promises.get(timer.ref)
            if promised is None:
                return None  # delivered in time (or unknown)
            late_h = (timer.due_ms - promised) / MS_PER_HOUR
            return Candidate(
                timer.customer,
                "delivery_delay",
                causal,
                timer.due_ms,
                {"order_id": timer.ref, "promised_at": iso_ms(promised), "hours_late": late_h},
                {
                    "hours_after_promise": rules.delivery_delay.hours_after_promise,
                    "customs_hours_after_promise": rules.delivery_delay.customs_hours_after_promise,
                },
                None,
                {"order_id": timer.ref},
            )
        if timer.kind == "welcome":
            return Candidate(
                timer.customer,
                "first_order_welcome",
                causal,
                timer.due_ms,
                {
                    "stage": "delivered",
                    "hours_after_delivery": rules.first_order_welcome.after_delivery_hours,
                },
                {"after_delivery_hours": rules.first_order_welcome.after_delivery_hours},
                None,
                {"stage": "delivered"},
            )
        if timer.kind == "potential":
            rule = rules.potential_no_repeat
            day = timer.due_ms // MS_PER_DAY
            browsing = window_sum(
                record["win_1d"], record["base_1d"], day, rule.browsing_days, KIND_ACTIVITY
            )
            if record["purchase_days"] != 1 or browsing == 0:
                return None  # bought again, or no longer browsing
            return Candidate(
                timer.customer,
                "potential_no_repeat",
                causal,
                timer.due_ms,
                {"first_order_at": iso_ms(int(timer.ref)), "recent_activity": int(browsing)},
                {"days": rule.days, "browsing_days": rule.browsing_days},
                None,
                {"top_categories": self._top(record)},
            )
        if timer.kind == "repurchase":
            anchor, last_order = int(timer.ref), int(record["last_order_ms"])
            if anchor < last_order <= timer.due_ms:
                return None  # already bought again
            return Candidate(
                timer.customer,
                "repurchase_due",
                causal,
                timer.due_ms,
                {
                    "last_order_at": iso_ms(anchor),
                    "expected_next_order_at": iso_ms(
                        timer.due_ms + int(rules.repurchase_due.days_before * MS_PER_DAY)
                    ),
                },
                {"days_before": rules.repurchase_due.days_before},
                None,
                {"top_categories": self._top(record)},
            )
        if timer.kind == "birthday":
            return Candidate(
                timer.customer,
                "birthday",
                causal,
                timer.due_ms,
                {"birthday": timer.ref, "days_before": rules.birthday.days_before},
                {"days_before": rules.birthday.days_before},
                None,
                {"top_categories": self._top(record)},
            )
        return None

    # -- timers kept in the record -------------------------------------------------
    def _due_of(self, kind: str, records: Any) -> Any:
        """The due time of the ``kind`` timer kept in each record (0: none pending):
        ``records`` is one record or an array of them (NumPy either way)."""
        rules = self._rules
        if kind in ("recheck", "birthday"):
            return records[f"{kind}_due_ms"]
        if kind in ("cart_1", "cart_2"):
            rule = rules.cart_abandoned
            delay = (
                rule.first_delay_minutes * 60_000
                if kind == "cart_1"
                else rule.second_delay_hours * MS_PER_HOUR
            )
            pending = records["rule_flags"] & _CART_FLAGS[kind]
            return np.where(pending, records["last_cart_ms"] + int(delay), 0)
        if kind == "dormant":
            days = records["dormant_days"].astype(np.int64)
            return np.where(days > 0, records["last_order_ms"] + days * MS_PER_DAY, 0)
        ref = records["potential_ref_ms"]
        return np.where(ref != 0, ref + rules.potential_no_repeat.days * MS_PER_DAY, 0)

    def folded_timers(
        self, customers: list[str], records: np.ndarray, upto_ms: np.ndarray | None = None
    ) -> list[list[Timer]]:
        """Per record, the timers it keeps (only those due by ``upto_ms``, one bound per
        record, when given), earliest first."""
        dues = self.due_columns(records)
        hit = dues > 0
        if upto_ms is not None:
            hit &= dues <= np.asarray(upto_ms, np.int64)[:, None]
        out: list[list[Timer]] = [[] for _ in customers]
        rows, cols = np.nonzero(hit)
        for row, col, due in zip(
            rows.tolist(), cols.tolist(), dues[rows, cols].tolist(), strict=True
        ):
            record, kind, ref = records[row], _FOLDED[col], ""
            if kind == "birthday":
                month_day = int(record["birthday_md"])
                ref = f"{month_day // 100:02d}-{month_day % 100:02d}"
            elif kind == "dormant":
                kind, ref = f"dormant_{int(record['dormant_days'])}", str(record["last_order_ms"])
            elif kind == "potential":
                ref = str(int(record["potential_ref_ms"]))
            out[row].append(Timer(customers[row], kind, ref, due))
        for timers in out:
            timers.sort(key=lambda t: t.due_ms)
        return out

    def expand_wakes(
        self, wakes: list[Timer], records: np.ndarray, index: dict[str, int], upto_ms: list[int]
    ) -> dict[str, list[Timer]]:
        """Per customer, the timers its due ``wake`` stands for that are due by its bound
        in ``upto_ms`` (the watermark), cleared from its record: what fires is
        rescheduled by ``reschedule``."""
        rows = [index[t.customer] for t in wakes]
        customers = [t.customer for t in wakes]
        expanded = self.folded_timers(customers, records[rows], np.array(upto_ms, np.int64))
        fire = [
            (timer, row) for row, timers in zip(rows, expanded, strict=True) for timer in timers
        ]
        _clear([timer for timer, _ in fire], records, [row for _, row in fire])
        return dict(zip(customers, expanded, strict=True))

    def fold_wake(
        self,
        plan: TimerPlan,
        records: np.ndarray,
        index: dict[str, int],
        woke: set[str],
        fired: list[Timer],
    ) -> None:
        """Keep the plan's timers of the folded kinds in the customers' records and
        schedule one ``wake`` per customer at the earliest pending (``woke``: customers
        whose wake fired in this step, re-armed if anything is still pending). ``fired``:
        timers the step fired from its own plan; a pending timer of the same kind is
        cleared, as their members are removed from the set. A timer whose due time or
        ref the record cannot give back stays a member of the set."""
        owners = set(woke)
        cleared = [t for t in fired if _slot(t.kind) is not None]
        _clear(cleared, records, [index[t.customer] for t in cleared])
        owners.update(t.customer for t in cleared)
        schedule = plan.schedule
        kinds = [t.kind for t in schedule]
        slots = {kind: _slot(kind) for kind in set(kinds)}
        by_kind: dict[str, list[int]] = {}  # folded kind -> positions in the plan
        for position, kind in enumerate(map(slots.__getitem__, kinds)):
            if kind is not None:
                by_kind.setdefault(kind, []).append(position)
        folded = np.zeros(len(schedule), bool)
        for kind, positions in by_kind.items():
            timers = [schedule[p] for p in positions]
            rows = np.fromiter(map(index.__getitem__, [t.customer for t in timers]), np.intp)
            kept = self._keep(kind, timers, rows, records)
            folded[positions] = kept
            owners.update(t.customer for t, k in zip(timers, kept.tolist(), strict=True) if k)
        kept_timers = list(compress(schedule, ~folded))
        woken = sorted(owners)
        dues = self.due_columns(records[[index[c] for c in woken]])
        earliest = np.where(dues > 0, dues, _NEVER).min(axis=1, initial=_NEVER)
        for customer, due in zip(woken, earliest.tolist(), strict=True):
            if due != _NEVER:
                kept_timers.append(Timer(customer, WAKE, "", due))
        plan.schedule[:] = kept_timers

    def due_columns(self, records: np.ndarray) -> np.ndarray:
        """``_due_of`` every kind (columns in ``_FOLDED`` order) for every record at once:
        the wake's due times, for a step's customers."""
        return np.stack([self._due_of(kind, records) for kind in _FOLDED], axis=1)

    def _keep(
        self, kind: str, timers: list[Timer], rows: np.ndarray, records: np.ndarray
    ) -> np.ndarray:
        """Put the ``kind`` timers (of the records at ``rows``, in plan order) into the
        records where a record gives back a timer's due time and ref exactly; which
        did. Of several kept for one record, the last in the plan is the one kept:
        the outcome of putting them in one at a time."""
        due = np.fromiter([t.due_ms for t in timers], np.int64, len(timers))
        ok = np.ones(len(timers), bool)
        # Recheck and birthday are always kept; the other kinds are each tried on a copy
        # of the timer's own record.
        checked = kind not in ("recheck", "birthday")
        trial = records[rows] if checked else None
        if kind == "recheck":
            field, values = "recheck_due_ms", due
        elif kind == "birthday":
            md = np.array([int(t.ref[:2]) * 100 + int(t.ref[3:]) for t in timers], np.int64)
            last = _last_of(rows)
            records["birthday_md"][rows[last]] = md[last]
            field, values = "birthday_due_ms", due
        elif kind in _CART_FLAGS:
            field = "rule_flags"
            values = trial[field] | np.uint8(_CART_FLAGS[kind])
        elif kind == "dormant":
            days = np.fromiter([int(t.kind.split("_", 1)[1]) for t in timers], np.int64)
            anchors = [str(a) for a in trial["last_order_ms"].tolist()]
            ok = (days <= 65535) & np.array(
                [t.ref == a for t, a in zip(timers, anchors, strict=True)], bool
            )
            field, values = "dormant_days", np.where(ok, days, 0)
        else:  # potential
            field, values = "potential_ref_ms", np.array([int(t.ref) for t in timers], np.int64)
        if checked:
            trial[field] = values
            ok &= self._due_of(kind, trial) == due
        last = _last_of(rows[ok])
        records[field][rows[ok][last]] = values[ok][last]
        return ok

    def reschedule(self, timer: Timer, record: np.void) -> Timer | None:
        """The next occurrence of a recurring timer that just fired."""
        if timer.kind == "recheck":
            if STAGES[record["stage"]] == "lost" or timer.due_ms < record["last_seen_ms"]:
                return None  # nothing more to watch, or newer events rescheduled it
            quiet_days = (timer.due_ms - int(record["last_seen_ms"])) / MS_PER_DAY
            if record["purchase_days"] == 0 and quiet_days > 91:
                return None  # a non-buyer past the 90-day baseline: nothing left to change
            step = int(self._rules.churn_risk.recheck_days * MS_PER_DAY)
            return Timer(timer.customer, "recheck", "", timer.due_ms + step)
        if timer.kind.startswith("dormant_"):
            anchor, days = int(timer.ref), int(timer.kind.split("_", 1)[1])
            if anchor < int(record["last_order_ms"]):
                return None  # re-anchored by a later order, which set its own steps
            later = [d for d in sorted(self._rules.dormant_win_back.days) if d > days]
            if not later:
                return None
            return Timer(
                timer.customer, f"dormant_{later[0]}", timer.ref, anchor + later[0] * MS_PER_DAY
            )
        if timer.kind != "birthday":
            return None
        due = next_birthday_reminder(timer.ref, timer.due_ms, self._rules.birthday.days_before)
        return Timer(timer.customer, "birthday", timer.ref, due)


WAKE = "wake"
# Timer kinds the record keeps (a dormant step under ``dormant``), in the order
# they are listed.
_FOLDED = ("recheck", "birthday", "cart_1", "cart_2", "dormant", "potential")
_CART_FLAGS = {"cart_1": FLAG_CART_1, "cart_2": FLAG_CART_2}
_NEVER = np.iinfo(np.int64).max
_CLEAR = {
    "recheck": ("recheck_due_ms",),
    "birthday": ("birthday_due_ms",),
    "dormant": ("dormant_days",),
    "potential": ("potential_ref_ms",),
}


def _last_of(rows: np.ndarray) -> np.ndarray:
    """The positions of each row's last occurrence in ``rows`` (NumPy does not say which
    of repeated indices an assignment keeps)."""
    reverse_first = np.unique(rows[::-1], return_index=True)[1]
    return len(rows) - 1 - reverse_first


def _slot(kind: str) -> str | None:
    """The folded kind a timer kind is kept under, or None (a member of the timer set)."""
    if kind.startswith("dormant_"):
        return "dormant"
    return kind if kind in _FOLDED else None


def _clear(timers: list[Timer], records: np.ndarray, rows: list[int]) -> None:
    """Forget the pending timers of the kinds of ``timers`` in the records at ``rows``
    (one row per timer)."""
    by_slot: dict[str, list[int]] = {}
    for timer, row in zip(timers, rows, strict=True):
        by_slot.setdefault(_slot(timer.kind), []).append(row)
    for slot, of_slot in by_slot.items():
        if slot in _CART_FLAGS:
            records["rule_flags"][of_slot] &= ~np.uint8(_CART_FLAGS[slot])
        else:
            for field in _CLEAR[slot]:
                records[field][of_slot] = 0


def next_birthday_reminder(month_day: str, after_ms: int, days_before: int) -> int:
    """The first "birthday minus ``days_before``" (00:00 UTC) strictly after ``after_ms``."""
    for due in _birthday_reminders(month_day, _utc_year(after_ms // MS_PER_DAY), days_before):
        if due > after_ms:
            return due
    raise AssertionError("unreachable: a birthday recurs within two years")


@lru_cache(maxsize=4096)
def _birthday_reminders(month_day: str, year: int, days_before: int) -> tuple[int, ...]:
    """Epoch ms of "birthday minus ``days_before``" in ``year`` and the two years after
    (29 February on the 28th in other years)."""
    month, day = int(month_day[:2]), int(month_day[3:])
    out = []
    for y in (year, year + 1, year + 2):
        d = day if (month, day) != (2, 29) or calendar.isleap(y) else 28
        reminder = datetime(y, month, d, tzinfo=UTC) - timedelta(days=days_before)
        out.append(int(reminder.timestamp() * 1000))
    return tuple(out)


@lru_cache(maxsize=65_536)
def _utc_year(day: int) -> int:
    """The UTC year of day ``day`` since 1970-01-01."""
    return (date(1970, 1, 1) + timedelta(days=day)).year


def _promised_ms(ev: ParsedEvent) -> int:
    # Validated at ingest, so this cannot fail here.
    return parse_time_ms(ev.fields["promised_delivery_time"], "promised_delivery_time")
