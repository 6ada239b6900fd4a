"""Numba kernels that update a whole batch of customer records and derive their signals.

This module owns the per-event and per-customer loops:

- ``apply_events`` walks the batch's events (sorted by customer, then event
  time) and updates the records in place: lifetime counts, event-time window
  rings, orders and purchase days (for RFM and BG/NBD), the decaying preference
  vector and its periodic snapshot, feedback counters, and the event-driven
  rules (browse streak, high intent), whose firings it writes to ``out``.
- ``derive`` computes, per customer and as of a given time, the RFM scores,
  the ten churn signals and the logistic churn score with hysteresis, BG/NBD
  P(alive) and expected purchases, CLV (BG/NBD x Gamma-Gamma), lifecycle
  stage, value segment and tier.

``operators.reference`` restates both in plain Python; tests check they agree.
All thresholds arrive in ``KernelParams`` / ``DeriveParams`` built from the
configuration. Window semantics are documented in docs/state.md.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from numba import njit

from crmstream.config import CrmConfig
from crmstream.operators.btyd import bgnbd, clv, clv_bound, gamma_gamma_spend, p_alive_of
from crmstream.operators.events import EVENT_CODE, EVENT_TYPES, NUM_EVENT_TYPES
from crmstream.state.encoding import (
    EMPTY_BASE,
    FLAG_CHURN_HIGH,
    FLAG_HIGH_INTENT,
    FLAG_SHIFT_FIRED,
    KIND_ACTIVITY,
    KIND_CARTS,
    KIND_ORDERS,
    KIND_SESSIONS,
    KIND_VIEWS,
    NUM_SIGNALS,
    PREF_CATEGORIES,
    SEGMENTS,
    SIGNALS,
)

PRODUCT_VIEW = EVENT_CODE["product_view"]
ADD_TO_CART = EVENT_CODE["add_to_cart"]
SESSION_START = EVENT_CODE["session_start"]
LAST_CLICKSTREAM = EVENT_CODE["session_start"]  # clickstream codes are 0..8
ORDER_PLACED = EVENT_CODE["order_placed"]
ORDER_RETURNED = EVENT_CODE["order_returned"]
ORDER_REFUNDED = EVENT_CODE["order_refunded"]
LOGISTICS_UPDATE = EVENT_CODE["logistics_update"]
SERVICE_TICKET = EVENT_CODE["service_ticket"]
PRODUCT_REVIEW = EVENT_CODE["product_review"]
CONTACTED_TOO_OFTEN = EVENT_CODE["contacted_too_often"]

FRESH, REPLAYED, DUPLICATE = 0, 1, 2  # check_events verdicts

RULE_BROWSE_INTEREST = 0
RULE_HIGH_INTENT = 1
# Derived-label firings: evaluated after every event and at every fired timer.
RULE_CHURN_HIGH = 2  # the churn level entered "high"
RULE_TIER_UP = 3  # the tier rose (a: old tier, b: new tier)
RULE_HIGH_VALUE = 4  # the customer entered the high-value segment (a: old segment)
RULE_INTEREST_SHIFT = 5  # the top category moved (a: was top, b: now top, c: snapshot day)
RULE_NAMES = (
    "browse_interest",
    "high_intent_no_purchase",
    "churn_risk",
    "tier_upgrade",
    "tier_upgrade",
    "interest_shift",
)
MAX_TOP_K = 10
_HIGH_VALUE = 3  # SEGMENTS.index("high_value")  # the schema's bound on preferences.top_k
_FIRINGS_PER_EVENT = 6  # two event rules and four derived labels at most

MIN_AFFINITY = 1e-6  # a decayed affinity below this is treated as none
MS_PER_10M = 600_000
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
INT64_MIN = np.iinfo(np.int64).min

# derive() output columns
DERIVED = (
    "churn_score",
    *SIGNALS,
    "p_alive",
    "expected_30d",
    "expected_90d",
    "r",
    "f",
    "m",
    "orders_90d",
    "spend_90d",
    "orders_365d",
    "spend_365d",
    "aov",
    "interest_shift",
    "days_since_purchase",
    "ipt_mean_days",
    "ipt_std_days",
    "old_stage",
    "old_segment",
    "old_tier",
    "old_churn_level",
)
COL = {name: i for i, name in enumerate(DERIVED)}
_SIG0 = COL[SIGNALS[0]]
# Column numbers as plain ints: Numba cannot read a dict.
_C_EXPECTED_30D = COL["expected_30d"]
_C_EXPECTED_90D = COL["expected_90d"]
_C_P_ALIVE = COL["p_alive"]
_C_CHURN_SCORE = COL["churn_score"]
_C_OLD_CHURN_LEVEL = COL["old_churn_level"]
_C_R = COL["r"]
_C_F = COL["f"]
_C_M = COL["m"]
_C_OLD_STAGE = COL["old_stage"]
_C_OLD_SEGMENT = COL["old_segment"]
_C_OLD_TIER = COL["old_tier"]
_C_INTEREST_SHIFT = COL["interest_shift"]
_C_ORDERS_90D = COL["orders_90d"]
_C_SPEND_90D = COL["spend_90d"]
_C_ORDERS_365D = COL["orders_365d"]
_C_SPEND_365D = COL["spend_365d"]
_C_AOV = COL["aov"]
_C_DAYS_SINCE_PURCHASE = COL["days_since_purchase"]
_C_IPT_MEAN_DAYS = COL["ipt_mean_days"]
_C_IPT_STD_DAYS = COL["ipt_std_days"]
HIGH_CLV = 5  # SEGMENTS.index("high_clv")


class KernelParams(NamedTuple):
    """What ``apply_events`` reads from the configuration."""

    lateness_ms: int
    half_life_ms: float
    snapshot_days: int
    negative_sentiment: float
    negative_rating: float
    browse_enabled: bool
    browse_views: int
    intent_enabled: bool
    intent_window_days: int
    intent_min_views: int
    intent_min_carts: int
    churn_enabled: bool
    tier_enabled: bool
    shift_enabled: bool
    shift_min_distance: float
    top_k: int


class DeriveParams(NamedTuple):
    """What ``derive`` reads from the configuration."""

    recent_days: int
    baseline_min: float
    drop_threshold: float
    cart_abandon_threshold: float
    too_often_days: int
    churn_bias: float
    churn_medium: float
    churn_high: float
    churn_hysteresis: float
    bg_r: float
    bg_alpha: float
    bg_a: float
    bg_b: float
    new_days: int
    loyal_min_orders: int
    dormant_days: int
    lost_days: int
    hv_min_orders: int
    hv_min_aov: float
    potential_days: int
    seg_dormant_days: int
    silver: float
    gold: float
    gg_p: float
    gg_q: float
    gg_v: float
    clv_months: int
    clv_discount: float
    high_clv_min: float
    model_version: int


class Params(NamedTuple):
    kernel: KernelParams
    derive: DeriveParams
    pref_weights: np.ndarray  # float32 per event type
    churn_weights: np.ndarray  # float64 per signal
    recency_cuts: np.ndarray
    frequency_cuts: np.ndarray
    monetary_cuts: np.ndarray


def params_from(config: CrmConfig) -> Params:
    """Every kernel parameter, from the validated configuration."""
    rules, churn, bg = config.rules, config.churn, config.bgnbd
    life, seg = config.lifecycle, config.segments
    weights = np.zeros(NUM_EVENT_TYPES, np.float32)
    for name, w in config.preferences.weights.items():
        weights[EVENT_CODE[name]] = w
    kernel = KernelParams(
        config.state.allowed_lateness_seconds * 1000,
        config.preferences.half_life_days * MS_PER_DAY,
        config.preferences.snapshot_days,
        churn.negative_sentiment,
        float(churn.negative_rating),
        rules.browse_interest.enabled,
        rules.browse_interest.consecutive_views,
        rules.high_intent_no_purchase.enabled,
        rules.high_intent_no_purchase.window_days,
        rules.high_intent_no_purchase.min_views,
        rules.high_intent_no_purchase.min_cart_adds,
        rules.churn_risk.enabled,
        rules.tier_upgrade.enabled,
        rules.interest_shift.enabled,
        rules.interest_shift.min_distance,
        config.preferences.top_k,
    )
    derive_params = DeriveParams(
        churn.recent_days,
        churn.baseline_min_events,
        churn.activity_drop_threshold,
        churn.cart_abandon_threshold,
        churn.too_often_days,
        churn.bias,
        churn.medium,
        churn.high,
        churn.hysteresis,
        bg.r,
        bg.alpha,
        bg.a,
        bg.b,
        life.new_days,
        life.loyal_min_orders_365d,
        life.dormant_days,
        life.lost_days,
        seg.high_value_min_orders_90d,
        seg.high_value_min_aov,
        seg.potential_days,
        seg.dormant_days,
        seg.silver_spend_365d,
        seg.gold_spend_365d,
        config.gamma_gamma.p,
        config.gamma_gamma.q,
        config.gamma_gamma.v,
        config.value.clv_months,
        config.value.monthly_discount_rate,
        seg.high_clv_min,
        config.value.model_version,
    )
    return Params(
        kernel,
        derive_params,
        weights,
        np.array([churn.weights[s] for s in SIGNALS], np.float64),
        np.array(config.rfm.recency_days_cuts, np.float64),
        np.array(config.rfm.frequency_cuts, np.float64),
        np.array(config.rfm.monetary_cuts, np.float64),
    )


# -- rings -------------------------------------------------------------------


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


# -- per-event update ----------------------------------------------------------


@njit(cache=True, nogil=True)
def _purchase_day(r, day):
    """Track distinct purchase days exactly (64-day bitmap) and the squared gaps."""
    if r.purchase_days == 0:
        r.first_purchase_day = day
        r.last_purchase_day = day
        r.purchase_day_bits = np.uint64(1)
        r.purchase_days = 1
        return
    last = r.last_purchase_day
    if day > last:
        gap = day - last
        r.ipt_sq_sum += gap * gap
        if gap < 64:
            r.purchase_day_bits = (r.purchase_day_bits << np.uint64(gap)) | np.uint64(1)
        else:
            r.purchase_day_bits = np.uint64(1)
        r.last_purchase_day = day
        r.purchase_days += 1
        return
    k = last - day
    if k == 0 or k >= 64 or (r.purchase_day_bits >> np.uint64(k)) & np.uint64(1):
        return  # a day already counted (k >= 64 cannot happen within the allowed lateness)
    r.purchase_day_bits |= np.uint64(1) << np.uint64(k)
    r.purchase_days += 1
    if day < r.first_purchase_day:
        gap = r.first_purchase_day - day
        r.ipt_sq_sum += gap * gap
        r.first_purchase_day = day
        return
    later = k - 1  # nearest later purchase day: the highest set bit below k
    while not (r.purchase_day_bits >> np.uint64(later)) & np.uint64(1):
        later -= 1
    earlier = k + 1  # nearest earlier purchase day: the lowest set bit above k
    while earlier < 64 and not (r.purchase_day_bits >> np.uint64(earlier)) & np.uint64(1):
        earlier += 1
    q = last - later
    p = last - earlier if earlier < 64 else r.first_purchase_day
    r.ipt_sq_sum += (day - p) ** 2 + (q - day) ** 2 - (q - p) ** 2


@njit(cache=True, nogil=True)
def _first_day_spend(r, day, amount):
    """Keep the first purchase day's spend (before ``_purchase_day`` sees ``day``)."""
    if r.purchase_days == 0 or day < r.first_purchase_day:
        r.first_day_spend = amount
    elif day == r.first_purchase_day:
        r.first_day_spend += amount


@njit(cache=True, nogil=True)
def _prefer(r, category, weight, ts, day, half_life_ms, snapshot_days):
    """Add ``weight`` to a category of the exponentially decaying preference vector."""
    if r.pref_ref_ms == INT64_MIN or ts >= r.pref_ref_ms:
        if r.pref_ref_ms != INT64_MIN:
            factor = 2.0 ** (-(ts - r.pref_ref_ms) / half_life_ms)
            for k in range(PREF_CATEGORIES):
                r.pref[k] *= factor
        r.pref_ref_ms = ts
        if r.pref_snap_day == EMPTY_BASE or day - r.pref_snap_day >= snapshot_days:
            top = 0.0
            for k in range(PREF_CATEGORIES):
                top = max(top, r.pref[k])
            for k in range(PREF_CATEGORIES):
                r.pref_snap[k] = (
                    round(255.0 * max(r.pref[k], 0.0) / top) if top > MIN_AFFINITY else 0
                )
            r.pref_snap_day = day
            r.rule_flags &= ~np.uint8(FLAG_SHIFT_FIRED)  # a new period for interest shift
        r.pref[category] += weight
    else:  # a late event: decay its weight to the vector's reference time
        r.pref[category] += weight * 2.0 ** (-(r.pref_ref_ms - ts) / half_life_ms)


@njit(cache=True, nogil=True)
def apply_events(
    records, cust_idx, type_code, category, event_time_ms, amount, aux, start,
    p, dp, pref_weights, churn_weights, r_cuts, f_cuts, m_cuts, scratch, outs,
):  # fmt: skip
    """Apply events ``start:`` in order, evaluating the derived labels after each one.

    Firings (event rules and derived-label changes) go to ``out_*``. Returns
    (the index of the first event not applied, firings written, late events):
    the kernel stops before an event once the firing arrays might not hold all
    it could fire, so the caller can take them and call again from there.
    """
    out_event, out_rule, out_a, out_b, out_c, out_time, out_top, out_row = outs
    n_out = 0
    n_late = 0
    cap = out_event.shape[0]
    for i in range(start, cust_idx.shape[0]):
        if n_out + _FIRINGS_PER_EVENT > cap:
            return i, n_out, n_late
        r = records[cust_idx[i]]
        t = type_code[i]
        ts = event_time_ms[i]
        if r.type_counts[t] < 65535:
            r.type_counts[t] += 1
        if t == ORDER_PLACED:
            r.orders_total += 1
            r.spend_total += amount[i]
        if r.last_seen_ms != INT64_MIN and r.last_seen_ms - ts > p.lateness_ms:
            n_late += 1  # too late for windows: lifetime totals only
            n_out = _evaluate_labels(r, ts, i, p, dp, churn_weights, r_cuts, f_cuts, m_cuts,
                                     scratch, outs, n_out)  # fmt: skip
            continue
        if ts > r.last_seen_ms:
            r.last_seen_ms = ts
        if ts < r.first_seen_ms:
            r.first_seen_ms = ts

        day = ts // MS_PER_DAY
        week = week_of(day)
        if t <= LAST_CLICKSTREAM:
            r.base_10m = _add2(r.win_10m, r.base_10m, ts // MS_PER_10M, KIND_ACTIVITY, 1, 255)
            r.base_1h = _add2(r.win_1h, r.base_1h, ts // MS_PER_HOUR, KIND_ACTIVITY, 1, 255)
            r.base_1d = _add2(r.win_1d, r.base_1d, day, KIND_ACTIVITY, 1, 255)
            r.base_1w = _add2(r.win_1w, r.base_1w, week, KIND_ACTIVITY, 1, 65535)
        kind = -1
        if t == PRODUCT_VIEW:
            kind = KIND_VIEWS
            r.base_10m = _add2(r.win_10m, r.base_10m, ts // MS_PER_10M, KIND_VIEWS, 1, 255)
            r.base_1h = _add2(r.win_1h, r.base_1h, ts // MS_PER_HOUR, KIND_VIEWS, 1, 255)
        elif t == ADD_TO_CART:
            kind = KIND_CARTS
            if ts > r.last_cart_ms:
                r.last_cart_ms = ts
        elif t == SESSION_START:
            kind = KIND_SESSIONS
        elif t == ORDER_PLACED:
            kind = KIND_ORDERS
            r.base_orders_1d = _add_order(r.orders_1d, r.spend_1d, r.base_orders_1d, day, amount[i])
            if ts >= r.last_seen_ms:
                r.last_order_amount = amount[i]
            if ts > r.last_order_ms:
                r.last_order_ms = ts
            _first_day_spend(r, day, amount[i])
            _purchase_day(r, day)
        if kind >= 0:
            r.base_1d = _add2(r.win_1d, r.base_1d, day, kind, 1, 255)
            r.base_1w = _add2(r.win_1w, r.base_1w, week, kind, 1, 65535)

        if (t == SERVICE_TICKET and aux[i] <= p.negative_sentiment) or (
            t == PRODUCT_REVIEW and aux[i] <= p.negative_rating
        ):
            r.neg_feedback = min(r.neg_feedback + 1, 255)
        elif t == LOGISTICS_UPDATE and aux[i] > 0:
            r.delays = min(r.delays + 1, 255)
        elif t == CONTACTED_TOO_OFTEN and day > r.too_often_day:
            r.too_often_day = day

        weight = pref_weights[t]
        if weight != 0 and category[i] >= 0:
            _prefer(r, category[i], weight, ts, day, p.half_life_ms, p.snapshot_days)

        if t == PRODUCT_VIEW:
            if category[i] == r.streak_category:
                if r.streak_len < 65535:
                    r.streak_len += 1
            else:
                r.streak_category = category[i]
                r.streak_len = 1
            if p.browse_enabled and r.streak_len == p.browse_views:
                out_event[n_out] = i
                out_rule[n_out] = RULE_BROWSE_INTEREST
                out_a[n_out] = category[i]
                out_b[n_out] = r.streak_len
                out_c[n_out] = 0
                _event_firing(n_out, ts, r, p, out_time, out_top, out_row)
                n_out += 1

        if p.intent_enabled and (t in (PRODUCT_VIEW, ADD_TO_CART, ORDER_PLACED)):
            span = p.intent_window_days
            views = window_sum(r.win_1d, r.base_1d, day, span, KIND_VIEWS)
            carts = window_sum(r.win_1d, r.base_1d, day, span, KIND_CARTS)
            orders = window_sum(r.win_1d, r.base_1d, day, span, KIND_ORDERS)
            holds = views >= p.intent_min_views and carts >= p.intent_min_carts and orders == 0
            was = (r.rule_flags & FLAG_HIGH_INTENT) != 0
            if holds and not was:
                r.rule_flags |= FLAG_HIGH_INTENT
                out_event[n_out] = i
                out_rule[n_out] = RULE_HIGH_INTENT
                out_a[n_out] = views
                out_b[n_out] = carts
                out_c[n_out] = orders
                _event_firing(n_out, ts, r, p, out_time, out_top, out_row)
                n_out += 1
            elif was and not holds:
                r.rule_flags &= ~np.uint8(FLAG_HIGH_INTENT)

        n_out = _evaluate_labels(r, ts, i, p, dp, churn_weights, r_cuts, f_cuts, m_cuts,
                                 scratch, outs, n_out)  # fmt: skip
    return cust_idx.shape[0], n_out, n_late


@njit(cache=True, nogil=True)
def _top_categories(pref, k, into):
    """The ``k`` highest positive affinities' indexes into ``into`` (-1 past them);
    ties go to the lower index, as a stable descending sort gives."""
    into[:] = -1
    for slot in range(min(k, into.shape[0])):
        best = -1
        for c in range(pref.shape[0]):
            if pref[c] <= 0:
                continue
            taken = False
            for j in range(slot):
                if into[j] == c:
                    taken = True
                    break
            if not taken and (best < 0 or pref[c] > pref[best]):
                best = c
        if best < 0:
            return
        into[slot] = best


@njit(cache=True, nogil=True)
def _event_firing(n, ts, r, p, out_time, out_top, out_row):
    """The time, top categories and (empty) derived row of an event rule's firing."""
    out_time[n] = ts
    out_row[n, :] = 0.0
    _top_categories(r.pref, p.top_k, out_top[n])


@njit(cache=True, nogil=True)
def _argmax(values):
    best = 0
    for k in range(1, values.shape[0]):
        if values[k] > values[best]:
            best = k
    return best


@njit(cache=True, nogil=True)
def _fire(n, event, rule, a, b, c, as_of, r, p, row, outs):
    """Write one derived-label firing at ``outs[*][n]``; returns the next free index."""
    out_event, out_rule, out_a, out_b, out_c, out_time, out_top, out_row = outs
    out_event[n] = event
    out_rule[n] = rule
    out_a[n] = a
    out_b[n] = b
    out_c[n] = c
    out_time[n] = as_of
    out_row[n, :] = row
    _top_categories(r.pref, p.top_k, out_top[n])
    return n + 1


@njit(cache=True, nogil=True)
def _evaluate_labels(r, ts, event, p, dp, churn_weights, r_cuts, f_cuts, m_cuts, row, outs,
                     n_out):  # fmt: skip
    """Move the customer's clock to ``ts`` (never back), derive its labels as of the
    clock and write a firing for each label change a rule looks at."""
    if ts > r.clock_ms:
        r.clock_ms = ts
    as_of = r.clock_ms
    derive_one(r, as_of, dp, churn_weights, r_cuts, f_cuts, m_cuts, row, False)
    if p.churn_enabled and r.churn_level == 2 and row[_C_OLD_CHURN_LEVEL] < 2:
        n_out = _fire(n_out, event, RULE_CHURN_HIGH, 0, 0, 0, as_of, r, p, row, outs)
    if p.tier_enabled:
        old_tier = np.int64(row[_C_OLD_TIER])
        if r.tier > old_tier:
            n_out = _fire(n_out, event, RULE_TIER_UP, old_tier, r.tier, 0, as_of, r, p, row, outs)
        old_segment = np.int64(row[_C_OLD_SEGMENT])
        if r.segment == _HIGH_VALUE and old_segment != _HIGH_VALUE:
            n_out = _fire(
                n_out, event, RULE_HIGH_VALUE, old_segment, r.segment, 0, as_of, r, p, row, outs
            )
    if (
        p.shift_enabled
        and row[_C_INTEREST_SHIFT] >= p.shift_min_distance
        and not r.rule_flags & FLAG_SHIFT_FIRED
    ):
        now_top = _argmax(r.pref)
        was_top = _argmax(r.pref_snap)
        if now_top != was_top:
            r.rule_flags |= FLAG_SHIFT_FIRED
            n_out = _fire(n_out, event, RULE_INTEREST_SHIFT, was_top, now_top, r.pref_snap_day,
                          as_of, r, p, row, outs)
    return n_out


@njit(cache=True, nogil=True)
def evaluate_at(records, rows, as_of_ms, p, dp, churn_weights, r_cuts, f_cuts, m_cuts, scratch,
                outs):  # fmt: skip
    """``_evaluate_labels`` of ``records[rows[k]]`` as of ``as_of_ms[k]`` (fired timers),
    in order; a firing's event is ``-1 - k``. Returns (rows done, firings written)."""
    n_out = 0
    cap = outs[0].shape[0]
    for k in range(rows.shape[0]):
        if n_out + 4 > cap:
            return k, n_out
        n_out = _evaluate_labels(records[rows[k]], as_of_ms[k], -1 - k, p, dp, churn_weights,
                                 r_cuts, f_cuts, m_cuts, scratch, outs, n_out)  # fmt: skip
    return rows.shape[0], n_out


# -- value model ---------------------------------------------------------------


@njit(cache=True, nogil=True)
def clv_of(r, day, dp, at_least=0.0):
    """A buyer's CLV as of epoch ``day``: Gamma-Gamma's expected spend per purchase day
    from its repeat purchase days' mean spend, times the BG/NBD purchases of each
    month, discounted. Only the high-CLV segment rule needs it in the flow, and the
    series costs about a microsecond, so when an upper bound (``clv_bound``) is below
    ``at_least`` the bound is returned instead: the rule's answer is the same."""
    x = r.purchase_days - 1.0
    t_x = (r.last_purchase_day - r.first_purchase_day) / 7.0
    big_t = max(day - r.first_purchase_day, 0) / 7.0
    mean = (r.spend_total - r.first_day_spend) / x if x > 0 else 0.0
    spend = gamma_gamma_spend(x, mean, dp.gg_p, dp.gg_q, dp.gg_v)
    bound = clv_bound(x, big_t, spend, dp.clv_months, dp.bg_r, dp.bg_alpha)
    if bound < at_least:
        return bound
    return clv(x, t_x, big_t, spend, dp.clv_months, dp.clv_discount,
               dp.bg_r, dp.bg_alpha, dp.bg_a, dp.bg_b)  # fmt: skip


# -- per-customer derivation -------------------------------------------------------


@njit(cache=True, nogil=True)
def _score(value, cuts, ascending):
    """1..5 against four cut points (ascending: higher is better)."""
    if ascending:
        s = 1
        for c in cuts:
            if value >= c:
                s += 1
        return s
    s = 5
    for c in cuts:
        if value > c:
            s -= 1
    return s


@njit(cache=True, nogil=True)
def _drop(recent, total_90, recent_days, baseline_min, threshold):
    """Drop of the last ``recent_days`` against the customer's own earlier rate, in [0, 1]."""
    baseline = (total_90 - recent) * recent_days / (91.0 - recent_days)
    if baseline < baseline_min:
        return 0.0
    drop = 1.0 - recent / baseline
    return min(max(drop / threshold, 0.0), 1.0)


@njit(cache=True, nogil=True)
def _kind_drop(r, day, week, kind, dp):
    """The drop signal of one window kind: last ``recent_days`` against the 90-day rate."""
    recent = window_sum(r.win_1d, r.base_1d, day, dp.recent_days, kind)
    total_90 = window_sum(r.win_1w, r.base_1w, week, 13, kind)
    return _drop(recent, total_90, dp.recent_days, dp.baseline_min, dp.drop_threshold)


@njit(cache=True, nogil=True)
def derive_one(r, as_of, dp, churn_weights, r_cuts, f_cuts, m_cuts, row, expectations):
    """Derive one record's signals, scores and labels as of ``as_of`` into ``row``.

    Updates stage, segment, tier, churn level and flags in the record (the old
    values are kept in ``row``). ``expectations``: also the BG/NBD expected
    purchases (a power series; the labels need only P(alive)).
    """
    day = as_of // MS_PER_DAY
    week = week_of(day)
    row[:] = 0.0

    orders_90, spend_90, orders_365, spend_365 = _order_windows(r, day)
    buyer = r.purchase_days > 0
    since = float(day - r.last_purchase_day) if buyer else -1.0
    n = r.purchase_days
    mean = (r.last_purchase_day - r.first_purchase_day) / (n - 1.0) if n > 1 else 0.0
    var = r.ipt_sq_sum / (n - 1.0) - mean * mean if n > 1 else 0.0
    aov = r.spend_total / r.orders_total if r.orders_total > 0 else 0.0

    # BG/NBD with the model's conventions: x repeat purchase days, weeks since first.
    p_alive = np.nan
    if buyer:
        x = n - 1.0
        t_x = (r.last_purchase_day - r.first_purchase_day) / 7.0
        big_t = max(day - r.first_purchase_day, 0) / 7.0
        if expectations:
            p_alive, e30 = bgnbd(x, t_x, big_t, 30 / 7.0, dp.bg_r, dp.bg_alpha, dp.bg_a, dp.bg_b)
            _, e90 = bgnbd(x, t_x, big_t, 90 / 7.0, dp.bg_r, dp.bg_alpha, dp.bg_a, dp.bg_b)
            row[_C_EXPECTED_30D] = e30
            row[_C_EXPECTED_90D] = e90
        else:
            p_alive = p_alive_of(x, t_x, big_t, dp.bg_r, dp.bg_alpha, dp.bg_a, dp.bg_b)
    row[_C_P_ALIVE] = p_alive

    # The ten churn signals, each in [0, 1].
    rd = dp.recent_days
    sig = row[_SIG0 : _SIG0 + NUM_SIGNALS]
    sig[0] = _kind_drop(r, day, week, KIND_ACTIVITY, dp)
    sig[1] = _kind_drop(r, day, week, KIND_SESSIONS, dp)
    carts = window_sum(r.win_1d, r.base_1d, day, 30, KIND_CARTS)
    if carts >= 2:
        rate = max(0.0, 1.0 - window_sum(r.win_1d, r.base_1d, day, 30, KIND_ORDERS) / carts)
        sig[2] = rate if rate >= dp.cart_abandon_threshold else 0.0
    if n > 1 and mean > 0:
        sig[3] = min(max((since - mean) / mean, 0.0), 1.0)
    if r.orders_total > 1 and aov > 0:
        sig[4] = min(abs(r.last_order_amount - aov) / aov, 1.0)
    if r.orders_total > 0:
        returned = r.type_counts[ORDER_RETURNED] + r.type_counts[ORDER_REFUNDED]
        sig[5] = min(returned / r.orders_total, 1.0)
    sig[6] = min(r.neg_feedback / 2.0, 1.0)
    sig[7] = min(r.delays / 2.0, 1.0)
    if r.too_often_day != EMPTY_BASE and day - r.too_often_day <= dp.too_often_days:
        sig[8] = 1.0
    if buyer:
        sig[9] = 1.0 - p_alive
    logit = dp.churn_bias
    for k in range(NUM_SIGNALS):
        logit += churn_weights[k] * sig[k]
    score = 1.0 / (1.0 + math.exp(-logit))
    row[_C_CHURN_SCORE] = score
    row[_C_OLD_CHURN_LEVEL] = r.churn_level
    if r.rule_flags & FLAG_CHURN_HIGH:
        if score < dp.churn_high - dp.churn_hysteresis:
            r.rule_flags &= ~np.uint8(FLAG_CHURN_HIGH)
    elif score >= dp.churn_high:
        r.rule_flags |= FLAG_CHURN_HIGH
    high = (r.rule_flags & FLAG_CHURN_HIGH) != 0
    r.churn_level = 2 if high else (1 if score >= dp.churn_medium else 0)

    if buyer:
        row[_C_R] = _score(since, r_cuts, False)
        row[_C_F] = _score(orders_365, f_cuts, True)
        row[_C_M] = _score(spend_365, m_cuts, True)

    # Lifecycle stage, value segment and tier.
    row[_C_OLD_STAGE] = r.stage
    row[_C_OLD_SEGMENT] = r.segment
    row[_C_OLD_TIER] = r.tier
    if not buyer:
        stage = 0
    elif since >= dp.lost_days:
        stage = 6
    elif since >= dp.dormant_days:
        stage = 5
    elif high:
        stage = 4
    elif day - r.first_purchase_day < dp.new_days:
        stage = 1
    elif orders_365 >= dp.loyal_min_orders:
        stage = 3
    else:
        stage = 2
    if stage != r.stage:
        r.prev_stage = r.stage
        r.stage = stage
        r.stage_since_ms = as_of
    browsing = window_sum(r.win_1d, r.base_1d, day, rd, KIND_ACTIVITY) > 0
    aov_90 = spend_90 / orders_90 if orders_90 > 0 else 0.0
    if not buyer:
        r.segment = 0
    elif since >= dp.seg_dormant_days:
        r.segment = 4
    elif orders_90 >= dp.hv_min_orders and aov_90 > dp.hv_min_aov:
        r.segment = 3
    elif n == 1 and since >= dp.potential_days and browsing:
        r.segment = 2
    elif dp.high_clv_min > 0 and clv_of(r, day, dp, dp.high_clv_min) >= dp.high_clv_min:
        r.segment = HIGH_CLV
    else:
        r.segment = 1
    r.model_version = dp.model_version
    r.tier = 2 if spend_365 >= dp.gold else (1 if spend_365 >= dp.silver else 0)

    # Interest shift: cosine distance between now and the snapshot.
    dot = 0.0
    now2 = 0.0
    snap2 = 0.0
    for k in range(PREF_CATEGORIES):
        v = max(r.pref[k], 0.0)
        s = float(r.pref_snap[k])
        dot += v * s
        now2 += v * v
        snap2 += s * s
    if now2 > 0 and snap2 > 0:
        row[_C_INTEREST_SHIFT] = 1.0 - dot / math.sqrt(now2 * snap2)

    row[_C_ORDERS_90D] = orders_90
    row[_C_SPEND_90D] = spend_90
    row[_C_ORDERS_365D] = orders_365
    row[_C_SPEND_365D] = spend_365
    row[_C_AOV] = aov
    row[_C_DAYS_SINCE_PURCHASE] = since
    row[_C_IPT_MEAN_DAYS] = mean
    row[_C_IPT_STD_DAYS] = math.sqrt(max(var, 0.0))


@njit(cache=True, nogil=True)
def derive(records, as_of_ms, dp, churn_weights, r_cuts, f_cuts, m_cuts, out):
    """``derive_one`` for each record as of ``as_of_ms[i]`` into ``out[i]``."""
    for i in range(records.shape[0]):
        derive_one(
            records[i], as_of_ms[i], dp, churn_weights, r_cuts, f_cuts, m_cuts, out[i], True
        )


# -- batch entry points --------------------------------------------------------------


class Firings(NamedTuple):
    """Rule firings of one batch: row k fired on event ``event[k]`` (``-1 - j``: at the
    j-th evaluation time of ``evaluate_batch``), as of ``time[k]``."""

    event: np.ndarray  # int32
    rule: np.ndarray  # int8, RULE_*
    a: np.ndarray  # int64, per rule (see RULE_*)
    b: np.ndarray
    c: np.ndarray
    time: np.ndarray  # int64: the customer's clock when it fired
    top: np.ndarray  # int8 (n, MAX_TOP_K): the top categories then, -1 past them
    row: np.ndarray  # float64 (n, len(DERIVED)): the derived row then


def _firing_arrays(cap: int) -> list[np.ndarray]:
    return [
        np.empty(cap, np.int32),
        np.empty(cap, np.int8),
        np.empty(cap, np.int64),
        np.empty(cap, np.int64),
        np.empty(cap, np.int64),
        np.empty(cap, np.int64),
        np.empty((cap, MAX_TOP_K), np.int8),
        np.empty((cap, len(DERIVED)), np.float64),
    ]


def _collect(parts: list[list[np.ndarray]]) -> Firings:
    if len(parts) == 1:
        return Firings(*parts[0])
    return Firings(*(np.concatenate(columns) for columns in zip(*parts, strict=True)))


def _derive_args(params: Params) -> tuple:
    return (
        params.derive,
        params.churn_weights,
        params.recency_cuts,
        params.frequency_cuts,
        params.monetary_cuts,
        np.zeros(len(DERIVED), np.float64),
    )


class BatchEvents(NamedTuple):
    """A batch's events as arrays, sorted by customer then event time."""

    cust_idx: np.ndarray  # int32 index into the batch's records
    type_code: np.ndarray  # int8
    category: np.ndarray  # int16, -1 none
    event_time_ms: np.ndarray  # int64
    amount: np.ndarray  # float64, base currency
    aux: np.ndarray  # float64


@njit(cache=True, nogil=True)
def check_events(
    floor_part, floor_off, applied_part, applied_off, recent_ids, recent_s, recent_next,
    cust, role, partition, offset, digest, seconds, repeated, horizon_s, verdict,
):  # fmt: skip
    """Exactly-once checks of a batch's events, in the customers' timeline order,
    updating the records.

    ``verdict[i]`` becomes ``FRESH``, ``REPLAYED`` (at or below the offset the
    customer's state held for the event's input role before the batch, ``floor_*``,
    or ``repeated``: an input position already in the batch) or ``DUPLICATE`` (its
    event-id hash is in the customer's ring of recent ids within ``horizon_s``
    seconds; 0 turns the duplicate check off). The replay test reads the state as
    loaded, so the order of the batch does not change it.
    """
    ring = recent_ids.shape[1]
    for i in range(cust.shape[0]):
        c, r = cust[i], role[i]
        if repeated[i] or (floor_part[c, r] == partition[i] and offset[i] <= floor_off[c, r]):
            verdict[i] = REPLAYED
            continue
        if horizon_s > 0:
            duplicate = False
            for k in range(ring):
                if recent_ids[c, k] == digest[i]:
                    duplicate = abs(seconds[i] - np.int64(recent_s[c, k])) <= horizon_s
                    break
            if duplicate:
                verdict[i] = DUPLICATE
                continue
            slot = recent_next[c]
            recent_ids[c, slot] = digest[i]
            recent_s[c, slot] = seconds[i]
            recent_next[c] = (slot + 1) % ring
        if applied_part[c, r] != partition[i]:  # first event, or re-partitioned
            applied_part[c, r] = partition[i]
            applied_off[c, r] = offset[i]
        elif offset[i] > applied_off[c, r]:
            applied_off[c, r] = offset[i]
        verdict[i] = FRESH


def apply_batch(records: np.ndarray, events: BatchEvents, params: Params) -> tuple[Firings, int]:
    """Apply a batch to ``records`` in place, each customer's derived labels evaluated
    after each of its events; return the firings and the number of late events."""
    n = events.cust_idx.shape[0]
    derive_args = _derive_args(params)
    cap = max(64, n // 8)
    parts, late, start = [], 0, 0
    while True:
        out = _firing_arrays(cap)
        start, n_out, n_late = apply_events(
            records, *events, start, params.kernel, derive_args[0], params.pref_weights,
            *derive_args[1:], tuple(out),
        )  # fmt: skip
        late += n_late
        parts.append([column[:n_out] for column in out])
        if start >= n:
            return _collect(parts), late
        cap *= 2


def evaluate_batch(
    records: np.ndarray, rows: np.ndarray, as_of_ms: np.ndarray, params: Params
) -> Firings:
    """Evaluate the derived labels of ``records[rows[k]]`` as of ``as_of_ms[k]`` (the due
    times of fired timers), in order, moving each customer's clock; the firings' events
    are ``-1 - k``."""
    derive_args = _derive_args(params)
    cap = max(16, 2 * len(rows))
    parts, done = [], 0
    rows = np.asarray(rows, np.int64)
    as_of_ms = np.asarray(as_of_ms, np.int64)
    while True:
        out = _firing_arrays(cap)
        k, n_out = evaluate_at(
            records, rows[done:], as_of_ms[done:], params.kernel, *derive_args, tuple(out)
        )
        columns = [column[:n_out] for column in out]
        columns[0] = np.where(columns[0] < 0, columns[0] - done, columns[0]).astype(np.int32)
        parts.append(columns)
        done += k
        if done >= len(rows):
            return _collect(parts)
        cap *= 2


def check_batch(
    records: np.ndarray,
    cust: np.ndarray,
    role: np.ndarray,
    partition: np.ndarray,
    offset: np.ndarray,
    digest: np.ndarray,
    seconds: np.ndarray,
    horizon_s: int,
    repeated: np.ndarray | None = None,
    offsets: bool = True,
) -> np.ndarray:
    """``check_events`` over a batch's event columns (in the customers' timeline order);
    returns the verdict per event. ``repeated``: input positions already in the batch.
    ``offsets=False`` (a test hook, flows/shard_step.GUARDS) leaves the per-customer
    offsets and ``repeated`` unchecked, so that only the event-id check drops events."""
    verdict = np.empty(cust.shape[0], np.int8)
    if repeated is None or not offsets:
        repeated = np.zeros(cust.shape[0], np.bool_)
    floor_part = records["applied_partition"].copy()
    if not offsets:
        floor_part[:] = -1  # no partition: nothing is at or below a recorded offset
    check_events(
        floor_part,
        records["applied_offset"].copy(),
        records["applied_partition"],
        records["applied_offset"],
        records["recent_ids"],
        records["recent_s"],
        records["recent_next"],
        cust,
        role,
        partition,
        offset,
        digest,
        seconds,
        repeated,
        horizon_s,
        verdict,
    )
    return verdict


def derive_batch(records: np.ndarray, as_of_ms: np.ndarray, params: Params) -> np.ndarray:
    """Run ``derive`` over every record; returns the ``DERIVED`` columns."""
    out = np.zeros((records.shape[0], len(DERIVED)), np.float64)
    derive(
        records,
        as_of_ms,
        params.derive,
        params.churn_weights,
        params.recency_cuts,
        params.frequency_cuts,
        params.monetary_cuts,
        out,
    )
    return out


def events_of(rows: list[tuple[int, int, int, int, float, float]]) -> BatchEvents:
    """BatchEvents from (customer index, type, category, time, amount, aux) tuples."""
    columns = list(zip(*rows, strict=True)) if rows else [()] * 6
    dtypes = (np.int32, np.int8, np.int16, np.int64, np.float64, np.float64)
    return BatchEvents(*(np.array(col, dtype=d) for col, d in zip(columns, dtypes, strict=True)))


def warm_up(config: CrmConfig) -> None:
    """Compile (or load from cache) the kernels before the first batch needs them.

    Loading pulls in NumPy/SciPy pieces and takes about a second; doing it at
    start-up keeps it out of the first trigger's latency.
    """
    from crmstream.operators.hashing import event_id_digests
    from crmstream.state.encoding import decode_batch, encode_records, fresh_records

    params = params_from(config)
    records = fresh_records(1)
    apply_batch(records, events_of([(0, ORDER_PLACED, 0, MS_PER_DAY, 1.0, 0.0)]), params)
    derive_batch(records, np.array([MS_PER_DAY], np.int64), params)
    evaluate_batch(records, np.zeros(1, np.int64), np.array([MS_PER_DAY], np.int64), params)
    decode_batch(encode_records(records), ["warm-up"])
    one = np.zeros(1, np.int64)
    check_batch(records, one.astype(np.int32), one.astype(np.int8), one.astype(np.int32), one,
                one.astype(np.uint64), one, 1)  # fmt: skip
    event_id_digests(["warm-up"])


assert len(EVENT_TYPES) == NUM_EVENT_TYPES
assert SEGMENTS[HIGH_CLV] == "high_clv"
