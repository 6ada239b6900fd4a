"""Event-time window rings: buckets of counts at fixed resolutions, read as windows.

This module owns the ring arithmetic the kernels use (docs/state.md,
"Windows"): making a bucket the newest (clearing what it passes), adding to a
bucket, and summing the buckets a window covers, including the 365-day daily
ring of orders and spend.
"""

from __future__ import annotations

from numba import njit

from crmstream.state.encoding import EMPTY_BASE


@njit(cache=True, nogil=True)
def _advance(ring, base, idx):
    """Make ``idx`` the ring's newest slot, clearing the slots it passes; return it."""
    n = ring.shape[0]
    if base == EMPTY_BASE or idx - base >= n:
        ring[:] = 0
    else:
        for s in range(base + 1, idx + 1):
            ring[s % n] = 0
    return idx


@njit(cache=True, nogil=True)
def _add2(ring, base, idx, kind, amount, cap):
    """Add to ``ring[idx, kind]`` (saturating at ``cap``); return the new base."""
    if base == EMPTY_BASE or idx > base:
        base = _advance(ring, base, idx)
    if idx > base - ring.shape[0]:
        slot = idx % ring.shape[0]
        ring[slot, kind] = min(ring[slot, kind] + amount, cap)
    return base


@njit(cache=True, nogil=True)
def _add_order(orders, spend, base, day, amount):
    """Count an order and its amount on ``day`` of the daily rings; return the new base."""
    if base == EMPTY_BASE or day > base:
        _advance(spend, base, day)
        base = _advance(orders, base, day)
    if day > base - orders.shape[0]:
        slot = day % orders.shape[0]
        orders[slot] = min(orders[slot] + 1, 255)
        spend[slot] += amount
    return base


@njit(cache=True, nogil=True)
def _held_slots(ring_len, base, idx, span):
    """The slots (idx - span, idx] that a ring of ``ring_len`` slots ending at ``base`` holds."""
    return max(idx - span + 1, base - ring_len + 1), min(idx, base)


@njit(cache=True, nogil=True)
def window_sum(ring, base, idx, span, kind):
    """Sum of ``ring[:, kind]`` over slots (idx - span, idx] that the ring still holds."""
    if base == EMPTY_BASE:
        return 0.0
    lo, hi = _held_slots(ring.shape[0], base, idx, span)
    total = 0.0
    for s in range(lo, hi + 1):
        total += ring[s % ring.shape[0], kind]
    return total


@njit(cache=True, nogil=True)
def window_sum1(ring, base, idx, span):
    """``window_sum`` for a one-dimensional ring."""
    if base == EMPTY_BASE:
        return 0.0
    lo, hi = _held_slots(ring.shape[0], base, idx, span)
    total = 0.0
    for s in range(lo, hi + 1):
        total += ring[s % ring.shape[0]]
    return total


@njit(cache=True, nogil=True)
def _order_windows(r, day):
    """(orders, spend) in the 90 and 365 days up to ``day``: one pass over the ring's
    purchase days (``window_sum1`` over each span gives the same)."""
    orders_90, spend_90, orders_365, spend_365 = 0.0, 0.0, 0.0, 0.0
    base = r.base_orders_1d
    if base == EMPTY_BASE:
        return orders_90, spend_90, orders_365, spend_365
    ring, amounts = r.orders_1d, r.spend_1d
    n = ring.shape[0]
    lo, hi = _held_slots(n, base, day, 365)
    slot = lo % n
    for s in range(lo, hi + 1):
        orders = ring[slot]
        if orders:
            spend = amounts[slot]
            orders_365 += orders
            spend_365 += spend
            if s > day - 90:
                orders_90 += orders
                spend_90 += spend
        slot = slot + 1 if slot + 1 < n else 0
    return orders_90, spend_90, orders_365, spend_365


@njit(cache=True, nogil=True)
def week_of(day):
    """Weeks start on Monday (epoch day 0 was a Thursday)."""
    return (day + 3) // 7
