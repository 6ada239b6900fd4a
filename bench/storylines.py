"""Scripted customers for the demo: one storyline per trigger type and per contact policy.

This module owns the demo's guaranteed cast. The random shop workload
(``bench.workload``) fires the common triggers within seconds, but the rare
ones (a VIP's return, a birthday, a customer gone quiet for 30 days) depend on
chance and on how many events a loaded machine manages to produce. Each
storyline here is a short, fixed sequence of one customer's events at given
times around a base time, built so that its trigger becomes due a day or more
after the base: in accelerated shop time (``crmstream demo --speed``) every
trigger type, a quiet-hours deferral and each kind of suppression then shows
within the first seconds, on any machine. History before the base (an order
29 days earlier, a month of visits) is sent at once when the demo starts.

The storyline customers live in UTC and act at noon, outside the default quiet
hours (21:00-09:00), except the birthday reminder, which is due at 00:00 UTC and
is held until 09:00 (a deferral). ``tests/test_storylines.py`` runs them
through the real flow and checks every outcome.
"""

from __future__ import annotations

import itertools
from typing import Any, NamedTuple

import orjson

from crmstream.bench.workload import GeneratedEvent

H_MS = 3_600_000
D_MS = 24 * H_MS
MIN_MS = 60_000
PREFIX = "story-"


class Scripted(NamedTuple):
    at_ms: int
    event: GeneratedEvent


def storyline_base(shop_start_ms: int) -> int:
    """Noon UTC of the shop clock's first day: storylines act at noon UTC."""
    return shop_start_ms - shop_start_ms % D_MS + 12 * H_MS


class _Script:
    def __init__(self, base_ms: int):
        self.base = base_ms
        self.out: list[Scripted] = []
        self._seq = itertools.count()

    def event(self, role: str, who: str, kind: str, at_ms: int, **fields: Any) -> None:
        cid = PREFIX + who
        body = {
            "event_id": f"{cid}-{next(self._seq)}",
            "customer_id": cid,
            "event_type": kind,
            "event_time": at_ms,
            **fields,
        }
        value = orjson.dumps(body)
        self.out.append(Scripted(at_ms, GeneratedEvent(role, cid.encode(), value, True)))

    def day(self, days: float, hours: float = 0.0, minutes: float = 0.0) -> int:
        return self.base + int(days * D_MS + hours * H_MS + minutes * MIN_MS)

    def customer(self, who: str, at_ms: int, **profile: Any) -> None:
        """A profile in UTC with push consent, as the shop's CRM would send it."""
        fields = {"country": "GB", "timezone": "UTC", "language": "en-GB",
                  "preferred_channel": "push", **profile}  # fmt: skip
        self.event("customers", who, "profile_updated", at_ms, **fields)
        self.event("customers", who, "consent_granted", at_ms, channel="push")

    def view(self, who: str, category: str, at_ms: int) -> None:
        self.event("clickstream", who, "product_view", at_ms, product_id=f"p-{who}-{at_ms}",
                   category=category, price=25.0, currency="USD")  # fmt: skip

    def cart(self, who: str, category: str, at_ms: int) -> None:
        self.event("clickstream", who, "add_to_cart", at_ms, product_id=f"c-{who}-{at_ms}",
                   category=category, price=25.0, currency="USD")  # fmt: skip

    def order(self, who: str, at_ms: int, amount: float, order_id: str | None = None) -> None:
        self.event("orders", who, "order_placed", at_ms, order_id=order_id or f"{who}-{at_ms}",
                   amount=amount, currency="USD")  # fmt: skip


# What each storyline shows: trigger types (or "deferred", or "suppressed:<policy>").
SHOWS: dict[str, tuple[str, ...]] = {
    "browse": ("browse_interest",),
    "intent": ("high_intent_no_purchase", "cart_abandoned"),
    "welcome": ("first_order_welcome",),
    "quiet": ("potential_no_repeat", "dormant_win_back"),
    "repeat": ("repurchase_due",),
    "churn": ("churn_risk",),
    "tier": ("tier_upgrade",),
    "late": ("delivery_delay",),
    "bday": ("birthday", "deferred"),
    "vip": ("service_recovery",),
    "shift": ("interest_shift",),
    "cool": ("suppressed:cooldown",),
    "busy": ("suppressed:frequency_cap", "suppressed:priority"),
    "optout": ("suppressed:consent",),
}


def storylines(base_ms: int) -> list[Scripted]:
    """Every storyline's events, in time order (``base_ms``: ``storyline_base``)."""
    s = _Script(base_ms)
    day = s.day
    for who in SHOWS:
        # a birthday 4 days after the base: its reminder is due 3 days before, at 00:00 UTC
        extra = {"birthday": _month_day(day(4))} if who == "bday" else {}
        s.customer(who, day(-50), **extra)
    for i, category in enumerate(("beauty",) * 3):
        s.view("browse", category, day(1, minutes=i))
    # 5 views (no 3 in a row of one category) and 2 cart adds, no order; the carts are
    # then abandoned: nudges 1 h and 24 h later
    for i, category in enumerate(("shoes", "bags", "shoes", "bags", "shoes")):
        s.view("intent", category, day(1, minutes=i))
    s.cart("intent", "shoes", day(1, minutes=6))
    s.cart("intent", "bags", day(1, minutes=7))
    s.order("welcome", day(1), 40.0, "welcome-1")
    # one purchase day 30 days before: two orders 5 minutes apart, so that the 30-day
    # win-back step (anchored at the last order) and the no-repeat reminder (at the first)
    # are not one arbitration's rivals; browsing 10 days before
    s.order("quiet", day(-29), 30.0)
    s.order("quiet", day(-29, minutes=5), 15.0)
    s.view("quiet", "garden", day(-10))
    for d in (-22, -12, -2):  # every 10 days: the next order is expected at day 8
        s.order("repeat", day(d), 35.0)
    # a steady customer for four weeks, then quiet: re-derived every 7 days after the last
    # visit (rules.churn_risk.recheck_days), the third time, at day 1, the risk is high
    for d in range(-46, -19, 2):
        s.event("clickstream", "churn", "session_start", day(d))
        s.view("churn", "books", day(d, minutes=1))
        if (d + 46) % 4 == 0:
            s.order("churn", day(d, minutes=2), 20.0)
    s.order("tier", day(1), 150.0)
    s.order("tier", day(1, hours=2), 100.0)  # 250 in 365 days: silver
    s.order("late", day(-3), 45.0, "late-1")
    s.event("orders", "late", "order_shipped", day(-2), order_id="late-1",
            promised_delivery_time=day(-1))  # fmt: skip
    s.order("vip", day(-5), 600.0, "vip-1")  # gold
    s.event("orders", "vip", "order_returned", day(1), order_id="vip-1")
    for i in range(10):
        s.view("shift", "beauty", day(-7, minutes=10 * i))
    for i in range(30):  # a week later the top category changes: beauty -> baby
        s.view("shift", "baby", day(1, minutes=10 * i))
    for i in range(3):
        s.view("cool", "beauty", day(1, minutes=i))
        s.view("cool", "shoes", day(1, hours=2, minutes=i))  # cooling down
    # four marketing triggers in one day: the fourth meets the daily cap (3)
    for i in range(3):
        s.view("busy", "beauty", day(1, minutes=i))  # browse_interest
    for i, category in enumerate(("shoes", "bags", "shoes", "bags", "shoes")):
        s.view("busy", category, day(1, hours=1, minutes=i))
    s.cart("busy", "shoes", day(1, hours=1, minutes=6))  # high intent now, a nudge at +1 h
    s.cart("busy", "bags", day(1, hours=1, minutes=7))
    s.order("busy", day(1, hours=3), 250.0)  # welcome and silver together: one is capped
    s.event("customers", "optout", "consent_withdrawn", day(0), channel="push")
    for i in range(3):
        s.view("optout", "toys", day(1, minutes=i))
    return sorted(s.out, key=lambda item: item.at_ms)


def _month_day(at_ms: int) -> str:
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at_ms / 1000, UTC).strftime("%m-%d")
