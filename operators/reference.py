"""Plain-Python reference semantics of ``operators.kernels``, for parity tests.

This module owns nothing on the hot path. It restates each kernel's meaning
with dictionaries and the full event history instead of rings and arrays:
windowed counts are computed by scanning every event a customer has had whose
day is inside the window, so a bug in the ring arithmetic shows up as a
disagreement.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from crmstream.operators.kernels import (
    ADD_TO_CART,
    MS_PER_DAY,
    ORDER_PLACED,
    PRODUCT_VIEW,
    RING_DAYS,
    RULE_BROWSE_INTEREST,
    RULE_HIGH_INTENT,
)


@dataclass
class ReferenceCustomer:
    first_seen_ms: int | None = None
    last_seen_ms: int | None = None
    counts: dict[int, int] = field(default_factory=dict)
    streak_category: int = -1
    streak_len: int = 0
    high_intent_holds: bool = False
    newest_day: int | None = None
    history: list[tuple[int, int]] = field(default_factory=list)  # (day, type)


def reference_apply(
    events: list[tuple[str, int, int, int]],
    customers: dict[str, ReferenceCustomer],
    browse_views: int,
    intent_window_days: int,
    intent_min_views: int,
    intent_min_carts: int,
) -> list[tuple[int, int, int, int, int]]:
    """Apply (customer, type, category, time_ms) events; return (event index, rule, a, b, c)."""
    fired = []
    for i, (cust, etype, category, ts) in enumerate(events):
        st = customers.setdefault(cust, ReferenceCustomer())
        st.first_seen_ms = ts if st.first_seen_ms is None else min(st.first_seen_ms, ts)
        st.last_seen_ms = ts if st.last_seen_ms is None else max(st.last_seen_ms, ts)
        st.counts[etype] = st.counts.get(etype, 0) + 1
        day = ts // MS_PER_DAY
        st.newest_day = day if st.newest_day is None else max(st.newest_day, day)
        # The ring keeps RING_DAYS days back from the newest day seen so far.
        if day > st.newest_day - RING_DAYS:
            st.history.append((day, etype))

        if etype == PRODUCT_VIEW:
            if category == st.streak_category:
                st.streak_len += 1
            else:
                st.streak_category, st.streak_len = category, 1
            if st.streak_len == browse_views:
                fired.append((i, RULE_BROWSE_INTEREST, category, st.streak_len, 0))

        if etype in (PRODUCT_VIEW, ADD_TO_CART, ORDER_PLACED):
            oldest_kept = st.newest_day - RING_DAYS + 1
            lo = max(day - intent_window_days + 1, oldest_kept)

            def in_window(d: int, lo: int = lo, day: int = day) -> bool:
                return lo <= d <= day

            views = sum(1 for d, t in st.history if t == PRODUCT_VIEW and in_window(d))
            carts = sum(1 for d, t in st.history if t == ADD_TO_CART and in_window(d))
            orders = sum(1 for d, t in st.history if t == ORDER_PLACED and in_window(d))
            holds = views >= intent_min_views and carts >= intent_min_carts and orders == 0
            if holds and not st.high_intent_holds:
                fired.append((i, RULE_HIGH_INTENT, views, carts, orders))
            st.high_intent_holds = holds
    return fired
