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
  timer's ref) and N days later; every order re-anchors them.
- ``delivery``: an order (the ref) not delivered ``hours_after_promise`` after
  its promised time (``customs_hours_after_promise`` once held in customs).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from crmstream.config import CrmConfig
from crmstream.operators.events import EVENT_CODE, ParsedEvent, parse_time_ms
from crmstream.operators.kernels import (
    MS_PER_DAY,
    MS_PER_HOUR,
    RULE_BROWSE_INTEREST,
    RULE_HIGH_INTENT,
    Firings,
)
from crmstream.operators.rules import iso_ms
from crmstream.state.timers import Timer, timer_member

ADD_TO_CART = EVENT_CODE["add_to_cart"]
ORDER_PLACED = EVENT_CODE["order_placed"]
ORDER_SHIPPED = EVENT_CODE["order_shipped"]
ORDER_DELIVERED = EVENT_CODE["order_delivered"]
LOGISTICS_UPDATE = EVENT_CODE["logistics_update"]
TIMER_EVENT_CODES = frozenset({ADD_TO_CART, ORDER_PLACED, ORDER_SHIPPED, ORDER_DELIVERED,
                               LOGISTICS_UPDATE})  # fmt: skip
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


class TimerPlan(NamedTuple):
    """Timer writes for one batch, committed with the state."""

    schedule: list[Timer]
    cancel: list[str]  # members
    promises: dict[str, dict[str, int]]  # customer -> order id -> promised delivery (ms)
    delivered: dict[str, list[str]]  # customer -> order ids no longer open


class TriggerCatalog:
    """Trigger conditions and timer planning, built once from the configuration."""

    def __init__(self, config: CrmConfig):
        self._categories = config.taxonomy.categories
        self._rules = config.rules

    # -- event-driven -----------------------------------------------------------
    def from_firings(
        self, events: list[ParsedEvent], order: np.ndarray, firings: Firings
    ) -> list[Candidate]:
        """Candidates for the kernel's rule firings (browse interest, high intent)."""
        out = []
        for k in range(len(firings.event)):
            ev = events[order[firings.event[k]]]
            a, b, c = int(firings.a[k]), int(firings.b[k]), int(firings.c[k])
            if int(firings.rule[k]) == RULE_BROWSE_INTEREST:
                category = self._categories[a]
                out.append(Candidate(
                    ev.customer_id, "browse_interest", ev.event_id, ev.event_time_ms,
                    {"category": category, "consecutive_views": b},
                    {"consecutive_views": self._rules.browse_interest.consecutive_views},
                    None, {"category": category},
                ))  # fmt: skip
            elif int(firings.rule[k]) == RULE_HIGH_INTENT:
                rule = self._rules.high_intent_no_purchase
                out.append(Candidate(
                    ev.customer_id, "high_intent_no_purchase", ev.event_id, ev.event_time_ms,
                    {"views": a, "cart_adds": b, "orders": c},
                    {"min_views": rule.min_views, "min_cart_adds": rule.min_cart_adds,
                     "max_orders": 0},
                    {"days": rule.window_days, "end": iso_ms(ev.event_time_ms)}, {},
                ))  # fmt: skip
        return out

    # -- timers -----------------------------------------------------------------
    def plan(
        self,
        customer: str,
        record: np.void,
        events: list[ParsedEvent],
        promises: dict[str, int],
        plan: TimerPlan,
    ) -> None:
        """Add the timer writes that ``customer``'s events in this batch imply to ``plan``."""
        rules = self._rules
        codes = {ev.type_code for ev in events}
        if ADD_TO_CART in codes and rules.cart_abandoned.enabled:
            cart = int(record["last_cart_ms"])
            first = cart + int(rules.cart_abandoned.first_delay_minutes * 60_000)
            second = cart + int(rules.cart_abandoned.second_delay_hours * MS_PER_HOUR)
            plan.schedule.append(Timer(customer, "cart_1", "", first))
            plan.schedule.append(Timer(customer, "cart_2", "", second))
        if ORDER_PLACED in codes and rules.dormant_win_back.enabled:
            anchor = int(record["last_order_ms"])
            for days in rules.dormant_win_back.days:
                plan.cancel.append(timer_member(customer, f"dormant_{days}"))
                plan.schedule.append(
                    Timer(customer, f"dormant_{days}", str(anchor), anchor + days * MS_PER_DAY)
                )
        if not rules.delivery_delay.enabled:
            return
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

    def fire(self, timer: Timer, record: np.void, promises: dict[str, int]) -> Candidate | None:
        """The trigger a due timer produces, or None when its condition no longer holds."""
        rules = self._rules
        causal = f"timer:{timer.kind}:{timer.ref}:{timer.due_ms}"
        if timer.kind in ("cart_1", "cart_2"):
            cart, last_order = int(record["last_cart_ms"]), int(record["last_order_ms"])
            nudge = 1 if timer.kind == "cart_1" else 2
            rule = rules.cart_abandoned
            delay = (rule.first_delay_minutes * 60_000 if nudge == 1
                     else rule.second_delay_hours * MS_PER_HOUR)  # fmt: skip
            if cart + int(delay) != timer.due_ms or cart < last_order <= timer.due_ms:
                return None  # moved by a later cart add, or an order came in time
            return Candidate(
                timer.customer, "cart_abandoned", causal, timer.due_ms,
                {"cart_added_at": iso_ms(cart), "nudge": nudge, "orders_since": 0},
                {"first_delay_minutes": rule.first_delay_minutes,
                 "second_delay_hours": rule.second_delay_hours},
                {"start": iso_ms(cart), "end": iso_ms(timer.due_ms)}, {"nudge": nudge},
            )  # fmt: skip
        if timer.kind.startswith("dormant_"):
            anchor, last_order = int(timer.ref), int(record["last_order_ms"])
            if anchor < last_order <= timer.due_ms:
                return None  # bought again before the due time
            days = int(timer.kind.split("_", 1)[1])
            return Candidate(
                timer.customer, "dormant_win_back", causal, timer.due_ms,
                {"days_without_purchase": days, "last_purchase_at": iso_ms(anchor)},
                {"days": list(rules.dormant_win_back.days)},
                {"start": iso_ms(anchor), "end": iso_ms(timer.due_ms)}, {"step_days": days},
            )  # fmt: skip
        if timer.kind == "delivery":
            promised = promises.get(timer.ref)
            if promised is None:
                return None  # delivered in time (or unknown)
            late_h = (timer.due_ms - promised) / MS_PER_HOUR
            return Candidate(
                timer.customer, "delivery_delay", causal, timer.due_ms,
                {"order_id": timer.ref, "promised_at": iso_ms(promised), "hours_late": late_h},
                {"hours_after_promise": rules.delivery_delay.hours_after_promise,
                 "customs_hours_after_promise": rules.delivery_delay.customs_hours_after_promise},
                None, {"order_id": timer.ref},
            )  # fmt: skip
        return None


def _promised_ms(ev: ParsedEvent) -> int:
    # Validated at ingest, so this cannot fail here.
    return parse_time_ms(ev.fields["promised_delivery_time"], "promised_delivery_time")
