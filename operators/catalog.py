"""The trigger catalogue: which triggers a customer's events and due timers produce.

This module owns the conditions of the triggers (docs/triggers.md) and the
timers that implement the "absence" triggers. It works on decoded records and
parsed events, and returns ``Candidate`` triggers (not yet filtered by the
contact policies) and the timers to schedule. The customer step
(``operators.customer_step``) calls it in each customer's event-time order, so
a record it reads is the customer's state as of the event or timer at hand.

Timer kinds and what they check when due (``fire``):

- ``cart_1`` / ``cart_2``: a cart add and no order placed between it (its very
  millisecond included) and the due time (first nudge after ``first_delay_minutes``, second after
  ``second_delay_hours``); a later cart add moves both.
- ``dormant_<N>``: no order between the anchoring order (its time is the
  timer's ref) and N days later; every order re-anchors them. Only the next
  step is pending: a step that fires schedules the following one.
- ``delivery``: an order (the ref) not delivered ``hours_after_promise`` after
  its promised time (``customs_hours_after_promise`` once held in customs).
- ``recheck`` (churn re-derivation of a quiet customer), ``birthday``,
  ``potential``, ``repurchase``, ``welcome``: see ``fire``.

Which of them the record keeps instead of the timer set: ``operators.timer_slots``.
"""

from __future__ import annotations

import calendar
from datetime import UTC, date, datetime, timedelta
from functools import lru_cache
from typing import Any, NamedTuple

import numpy as np

from crmstream.config import CrmConfig
from crmstream.operators.events import (
    EVENT_CODE,
    EVENT_TYPES,
    ParsedEvent,
    parse_time_ms,
)
from crmstream.operators.params import (
    ADD_TO_CART,
    INT64_MIN,
    LOGISTICS_UPDATE,
    MS_PER_DAY,
    MS_PER_HOUR,
    ORDER_PLACED,
    ORDER_REFUNDED,
    ORDER_RETURNED,
    SERVICE_TICKET,
)
from crmstream.operators.rules import iso_ms
from crmstream.operators.windows import window_sum
from crmstream.state.encoding import KIND_ACTIVITY, SEGMENTS, STAGES, TIERS
from crmstream.state.profile import top_categories
from crmstream.state.promises import Promise
from crmstream.state.timers import Timer, timer_member

ORDER_SHIPPED = EVENT_CODE["order_shipped"]
ORDER_DELIVERED = EVENT_CODE["order_delivered"]
PROFILE_UPDATED = EVENT_CODE["profile_updated"]
# Events that schedule timers or fire event-driven triggers (``TriggerCatalog.plan``).
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
    causal: str  # the causal event id, timer:<kind>:<ref>:<due> or derive:<what>:<time>
    event_time_ms: int  # the causal event's time, the timer's due time, or the derivation's
    values: dict[str, Any]  # what fired it
    thresholds: dict[str, Any]  # the configured thresholds it was held against
    window: dict[str, Any] | None
    payload: dict[str, Any]


class Before(NamedTuple):
    """A customer's counters before the events being planned were applied, and the times
    its timers are anchored at: an event too late for the windows (docs/triggers.md,
    "Lateness") moves no anchor, so it arms no timer from one (outsider 48: a late cart
    add armed both nudges from ``last_cart_ms`` 0, dated 1970)."""

    orders_total: int
    deliveries: int
    last_cart_ms: int
    last_order_ms: int
    purchase_days: int
    last_seen_ms: int = INT64_MIN  # events older than this by the allowed lateness are late


class TimerPlan(NamedTuple):
    """Timer writes for one step, committed with the state."""

    schedule: list[Timer]
    cancel: list[str]  # members
    promises: dict[str, dict[str, Promise]]  # customer -> order id -> promise (to write)
    delivered: dict[str, list[str]]  # customer -> order ids no longer open


def open_order(plan: TimerPlan, customer: str, order_id: str, promise: Promise) -> None:
    """Write the customer's open order (its promise) with the step, whatever the step
    closed of it before."""
    closed = plan.delivered.get(customer)
    if closed and order_id in closed:
        closed.remove(order_id)
    plan.promises.setdefault(customer, {})[order_id] = promise


def close_order(plan: TimerPlan, customer: str, order_id: str) -> None:
    """Delete the customer's open order with the step, whatever the step wrote of it."""
    plan.promises.get(customer, {}).pop(order_id, None)
    closed = plan.delivered.setdefault(customer, [])
    if order_id not in closed:
        closed.append(order_id)


class TriggerCatalog:
    """Trigger conditions and timer planning, built once from the configuration."""

    def __init__(self, config: CrmConfig, churn_weights: np.ndarray):
        self._config = config
        self._categories = config.taxonomy.categories
        self._rules = config.rules
        self._churn_weights = churn_weights

    # -- event-driven -----------------------------------------------------------
    def plan(
        self,
        customer: str,
        record: np.void,
        events: list[ParsedEvent],
        promises: dict[str, Promise],
        plan: TimerPlan,
        before: Before,
        lateness_ms: int | None = None,
    ) -> list[Candidate]:
        """Add the timers ``customer``'s events imply to ``plan`` (``record``: the state
        just after them); return the event-driven candidates (first order, service
        recovery). ``promises`` (the customer's open orders) is updated in place.

        An event more than ``lateness_ms`` older than the customer's newest event before
        it (``before.last_seen_ms``) updates the lifetime totals only (docs/triggers.md,
        "Lateness"): it arms no timer and makes no candidate (outsider 50: a late shipment
        re-opened a delivered order, and a delivery delay fired for it). It still closes:
        a late delivery ends its order's timer, a late customs hold lengthens its
        allowance."""
        rules = self._rules
        late = self._late(events, before, lateness_ms)
        fresh = [ev for ev in events if id(ev) not in late] if late else events
        codes = {ev.type_code for ev in fresh}
        out = self._event_triggers(customer, record, fresh, plan, before)
        cart = int(record["last_cart_ms"])
        if ADD_TO_CART in codes and rules.cart_abandoned.enabled and cart > before.last_cart_ms:
            first = cart + int(rules.cart_abandoned.first_delay_minutes * 60_000)
            second = cart + int(rules.cart_abandoned.second_delay_hours * MS_PER_HOUR)
            plan.schedule.append(Timer(customer, "cart_1", "", first))
            plan.schedule.append(Timer(customer, "cart_2", "", second))
        anchor = int(record["last_order_ms"])
        if ORDER_PLACED in codes and rules.dormant_win_back.enabled and (
            anchor > before.last_order_ms
        ):
            steps = sorted(rules.dormant_win_back.days)
            # One timer at a time: each step schedules the next when it fires. It
            # replaces the pending step of an earlier anchor.
            plan.schedule.append(
                Timer(customer, f"dormant_{steps[0]}", str(anchor), anchor + steps[0] * MS_PER_DAY)
            )
        if rules.delivery_delay.enabled:
            self._plan_deliveries(customer, events, promises, plan, late)
        return out

    @staticmethod
    def _late(events: list[ParsedEvent], before: Before, lateness_ms: int | None) -> set[int]:
        """The events (by ``id``) too late for the windows: as the kernel tells them, since
        a segment's events come in time order, the customer's newest event before each is
        its newest before the segment."""
        seen = before.last_seen_ms
        if lateness_ms is None or seen == INT64_MIN:
            return set()
        return {id(ev) for ev in events if seen - ev.event_time_ms > lateness_ms}

    def allowance_ms(self, promise: Promise) -> int:
        """How long after its promised time an order may arrive before it is late."""
        delay = self._rules.delivery_delay
        hours = delay.customs_hours_after_promise if promise.customs else delay.hours_after_promise
        return int(hours * MS_PER_HOUR)

    def _plan_deliveries(
        self,
        customer: str,
        events: list[ParsedEvent],
        promises: dict[str, Promise],
        plan: TimerPlan,
        late: set[int] = frozenset(),  # type: ignore[assignment]
    ) -> None:
        for ev in events:
            order_id = ev.fields.get("order_id")
            if ev.type_code == ORDER_SHIPPED:
                if id(ev) in late:  # it opens nothing (plan's docstring)
                    continue
                promise = Promise(_promised_ms(ev))
            elif ev.type_code == LOGISTICS_UPDATE and ev.aux == CUSTOMS_HOLD:
                if order_id not in promises:
                    continue
                promise = promises[order_id]._replace(customs=True)
            elif ev.type_code == ORDER_DELIVERED and order_id in promises:
                # Delivered: the order is no longer open, and its timer is moot (a
                # delivery after the allowance came after the timer had fired).
                plan.cancel.append(timer_member(customer, "delivery", order_id))
                close_order(plan, customer, order_id)
                promises.pop(order_id)
                continue
            else:
                continue
            promises[order_id] = promise
            open_order(plan, customer, order_id, promise)
            due = promise.promised_ms + self.allowance_ms(promise)
            plan.schedule.append(Timer(customer, "delivery", order_id, due))

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
        moved = record["last_order_ms"] > before.last_order_ms or (
            record["purchase_days"] != before.purchase_days
        )  # an order too late for the windows moves neither: it re-plans nothing
        if orders and rep.enabled and moved and record["purchase_days"] >= rep.min_purchase_days:
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

    def top(self, record: np.void) -> list[str]:
        """The record's top categories now (payloads of timer triggers)."""
        return top_categories(record["pref"], self._categories, self._config.preferences.top_k)

    def fire(
        self, timer: Timer, record: np.void, promises: dict[str, Promise]
    ) -> Candidate | None:
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
            # An order at the cart add's own millisecond counts: two topics' events at
            # one instant arrive in either order (docs/triggers.md), and one checkout
            # is not an abandoned cart.
            if cart + int(delay) != timer.due_ms or cart <= last_order <= timer.due_ms:
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
                {"nudge": nudge, "top_categories": self.top(record)},
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
            promise = promises.get(timer.ref)
            if promise is None or promise.promised_ms + self.allowance_ms(promise) != timer.due_ms:
                return None  # delivered in time, unknown, or moved by a customs hold
            promised = promise.promised_ms
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
                {"top_categories": self.top(record)},
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
                {"top_categories": self.top(record)},
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
                {"top_categories": self.top(record)},
            )
        return None

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
