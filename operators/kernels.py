"""Numba kernels that apply a whole batch of events to the batch's customer records.

This module owns the per-event loops. ``apply_events`` walks the batch's events
(sorted by customer, then event time) and updates the columns of the batch's
state records in place: last/first seen, lifetime counts per event type, the
per-category product-view streak, and a daily ring of views, cart adds and
orders for windowed counts. It also evaluates the event-driven rules and writes
one row per rule firing into the ``out_*`` arrays. ``operators.reference`` is
its plain-Python twin; tests check they agree.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from numba import njit

from crmstream.config.schema import RulesConfig
from crmstream.operators.events import EVENT_CODE

PRODUCT_VIEW = EVENT_CODE["product_view"]
ADD_TO_CART = EVENT_CODE["add_to_cart"]
ORDER_PLACED = EVENT_CODE["order_placed"]

RULE_BROWSE_INTEREST = 0
RULE_HIGH_INTENT = 1
RULE_NAMES = ("browse_interest", "high_intent_no_purchase")

MS_PER_DAY = 86_400_000
RING_DAYS = 32
_RING_EMPTY = np.iinfo(np.int32).min


@njit(cache=True, nogil=True)
def _advance_ring(base_day, day, views, carts, orders):
    """Move the ring's newest day to ``day``, clearing the buckets it passes."""
    if base_day == _RING_EMPTY or day - base_day >= RING_DAYS:
        views[:] = 0
        carts[:] = 0
        orders[:] = 0
    else:
        for d in range(base_day + 1, day + 1):
            slot = d % RING_DAYS
            views[slot] = 0
            carts[slot] = 0
            orders[slot] = 0
    return day


@njit(cache=True, nogil=True)
def _window_sum(ring, base_day, day, window_days):
    """Sum of the ring's buckets for days (day - window_days, day]."""
    lo = max(day - window_days + 1, base_day - RING_DAYS + 1)
    hi = min(day, base_day)
    total = 0
    for d in range(lo, hi + 1):
        total += ring[d % RING_DAYS]
    return total


@njit(cache=True, nogil=True)
def apply_events(
    cust_idx,
    type_code,
    category,
    event_time_ms,
    flags,
    streak_category,
    streak_len,
    first_seen_ms,
    last_seen_ms,
    type_counts,
    ring_base_day,
    ring_views,
    ring_carts,
    ring_orders,
    browse_enabled,
    browse_views,
    intent_enabled,
    intent_window_days,
    intent_min_views,
    intent_min_carts,
    out_event,
    out_rule,
    out_a,
    out_b,
    out_c,
):
    """Apply events in order; return the number of rule firings written to ``out_*``.

    ``out_event[k]`` is the index of the event that fired row k, ``out_rule[k]``
    its rule id, and ``out_a..c`` the rule's values (browse: category, streak;
    high intent: views, carts, orders in the window). ``out_*`` need room for
    two rows per event.
    """
    n_out = 0
    for i in range(cust_idx.shape[0]):
        c = cust_idx[i]
        t = type_code[i]
        ts = event_time_ms[i]
        if ts > last_seen_ms[c]:
            last_seen_ms[c] = ts
        if ts < first_seen_ms[c]:
            first_seen_ms[c] = ts
        type_counts[c, t] += 1

        day = ts // MS_PER_DAY
        if ring_base_day[c] == _RING_EMPTY or day > ring_base_day[c]:
            ring_base_day[c] = _advance_ring(
                ring_base_day[c], day, ring_views[c], ring_carts[c], ring_orders[c]
            )
        in_ring = day > ring_base_day[c] - RING_DAYS
        if in_ring:
            slot = day % RING_DAYS
            if t == PRODUCT_VIEW and ring_views[c, slot] < 65535:
                ring_views[c, slot] += 1
            elif t == ADD_TO_CART and ring_carts[c, slot] < 65535:
                ring_carts[c, slot] += 1
            elif t == ORDER_PLACED and ring_orders[c, slot] < 65535:
                ring_orders[c, slot] += 1

        if t == PRODUCT_VIEW:
            if category[i] == streak_category[c]:
                if streak_len[c] < 65535:
                    streak_len[c] += 1
            else:
                streak_category[c] = category[i]
                streak_len[c] = 1
            if browse_enabled and streak_len[c] == browse_views:
                out_event[n_out] = i
                out_rule[n_out] = RULE_BROWSE_INTEREST
                out_a[n_out] = category[i]
                out_b[n_out] = streak_len[c]
                out_c[n_out] = 0
                n_out += 1

        if intent_enabled and (t in (PRODUCT_VIEW, ADD_TO_CART, ORDER_PLACED)):
            base = ring_base_day[c]
            views = _window_sum(ring_views[c], base, day, intent_window_days)
            carts = _window_sum(ring_carts[c], base, day, intent_window_days)
            orders = _window_sum(ring_orders[c], base, day, intent_window_days)
            holds = views >= intent_min_views and carts >= intent_min_carts and orders == 0
            was = (flags[c] & 1) != 0
            if holds and not was:
                flags[c] |= 1
                out_event[n_out] = i
                out_rule[n_out] = RULE_HIGH_INTENT
                out_a[n_out] = views
                out_b[n_out] = carts
                out_c[n_out] = orders
                n_out += 1
            elif was and not holds:
                flags[c] &= ~np.uint8(1)
    return n_out


class RuleParams(NamedTuple):
    """The rule thresholds the kernel reads, taken from the configuration."""

    browse_enabled: bool
    browse_views: int
    intent_enabled: bool
    intent_window_days: int
    intent_min_views: int
    intent_min_carts: int


def rule_params(rules: RulesConfig) -> RuleParams:
    browse, intent = rules.browse_interest, rules.high_intent_no_purchase
    return RuleParams(
        browse.enabled,
        browse.consecutive_views,
        intent.enabled,
        intent.window_days,
        intent.min_views,
        intent.min_cart_adds,
    )


class Firings(NamedTuple):
    """Rule firings of one batch: row k fired on event ``event[k]``."""

    event: np.ndarray
    rule: np.ndarray
    a: np.ndarray
    b: np.ndarray
    c: np.ndarray


def apply_batch(
    records: np.ndarray,
    cust_idx: np.ndarray,
    type_code: np.ndarray,
    category: np.ndarray,
    event_time_ms: np.ndarray,
    params: RuleParams,
) -> Firings:
    """Apply a batch to ``records`` (a ``STATE_DTYPE`` array) in place; return the firings."""
    n = cust_idx.shape[0]
    out = [np.empty(2 * n, d) for d in (np.int32, np.int8, np.int64, np.int64, np.int64)]
    n_out = apply_events(
        cust_idx, type_code, category, event_time_ms,
        records["flags"], records["streak_category"], records["streak_len"],
        records["first_seen_ms"], records["last_seen_ms"], records["type_counts"],
        records["ring_base_day"], records["ring_views"], records["ring_carts"],
        records["ring_orders"], *params, *out,
    )  # fmt: skip
    return Firings(*(column[:n_out] for column in out))


def warm_up() -> None:
    """Compile (or load from cache) the kernels before the first batch needs them.

    Loading pulls in NumPy/SciPy pieces and takes about a second; doing it at
    start-up keeps it out of the first trigger's latency.
    """
    from crmstream.state.encoding import fresh_records

    one = np.zeros(1, np.int64)
    apply_batch(fresh_records(1), one.astype(np.int32), np.array([PRODUCT_VIEW], np.int8),
                one.astype(np.int16), one, RuleParams(True, 3, True, 30, 5, 2))  # fmt: skip
