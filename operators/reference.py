"""Plain-Python reference semantics of ``operators.kernels``, for parity tests.

This module owns nothing on the hot path. It restates the kernels' meaning
without rings, bitmaps or incremental sums: each customer keeps the full list
of events that counted, and every window, purchase-day statistic, preference
value and derived label is recomputed from that history by scanning it. A bug
in the kernels' ring or bitmap arithmetic therefore shows up as a disagreement.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field

from crmstream.operators import params as P
from crmstream.state import encoding as E
from crmstream.state.encoding import NUM_SIGNALS, PREF_CATEGORIES, RING_ORDERS


@dataclass
class Ev:
    ts: int
    type: int
    category: int
    amount: float
    aux: float


@dataclass
class RefCustomer:
    last_seen: int | None = None
    first_seen: int | None = None
    counts: dict[int, int] = field(default_factory=dict)
    orders_total: int = 0
    spend_total: float = 0.0
    history: list[Ev] = field(default_factory=list)  # events that were not too late
    streak_category: int = -1
    streak_len: int = 0
    high_intent: bool = False
    last_order_amount: float = 0.0
    snap: list[int] = field(default_factory=lambda: [0] * PREF_CATEGORIES)
    snap_day: int | None = None
    pref_ref: int | None = None
    churn_high: bool = False
    stage: int = 0
    # The labels as last evaluated (per event and fired timer) and the customer's clock.
    clock: int | None = None
    churn_level: int = 0
    tier: int = 0
    segment: int = 0
    shift_fired: bool = False


def _ring_index(ev: Ev, resolution: str) -> int:
    day = ev.ts // P.MS_PER_DAY
    return {
        "10m": ev.ts // P.MS_PER_10M,
        "1h": ev.ts // P.MS_PER_HOUR,
        "1d": day,
        "1w": (day + 3) // 7,
    }[resolution]


def _kinds(ev: Ev) -> set[str]:
    kinds = set()
    if ev.type <= P.LAST_CLICKSTREAM:
        kinds.add("activity")
    kinds.add(
        {
            P.PRODUCT_VIEW: "views",
            P.ADD_TO_CART: "carts",
            P.SESSION_START: "sessions",
            P.ORDER_PLACED: "orders",
        }.get(ev.type, "")
    )
    kinds.discard("")
    return kinds


_RING = {
    "10m": (6, {"activity", "views"}),
    "1h": (24, {"activity", "views"}),
    "1d": (30, {"activity", "views", "carts", "sessions", "orders"}),
    "1w": (13, {"activity", "views", "carts", "sessions", "orders"}),
}
_CAP = {"10m": 255, "1h": 255, "1d": 255, "1w": 65535}


def window(
    cust: RefCustomer, resolution: str, kind: str, idx: int, span: int, upto: int | None = None
) -> float:
    """Events of ``kind`` in slots (idx - span, idx] that a ring of this resolution holds.

    ``upto`` limits the history to its first ``upto`` entries (the state at that time).
    """
    size, ring_kinds = _RING[resolution]
    history = cust.history if upto is None else cust.history[:upto]
    touching = [_ring_index(e, resolution) for e in history if _kinds(e) & ring_kinds]
    if not touching:
        return 0.0
    base = max(touching)
    total = 0.0
    for slot in range(max(idx - span + 1, base - size + 1), min(idx, base) + 1):
        n = sum(1 for e in history if kind in _kinds(e) and _ring_index(e, resolution) == slot)
        total += min(n, _CAP[resolution])
    return total


def orders_window(cust: RefCustomer, day: int, span: int) -> tuple[float, float]:
    """(orders, spend) on the days (day - span, day] that the 365-day ring still holds."""
    orders = [e for e in cust.history if e.type == P.ORDER_PLACED]
    if not orders:
        return 0.0, 0.0
    base = max(e.ts // P.MS_PER_DAY for e in orders)
    lo = max(day - span + 1, base - RING_ORDERS + 1)
    hi = min(day, base)
    picked = [e for e in orders if lo <= e.ts // P.MS_PER_DAY <= hi]
    per_day: dict[int, int] = {}
    for e in picked:
        per_day[e.ts // P.MS_PER_DAY] = per_day.get(e.ts // P.MS_PER_DAY, 0) + 1
    return float(sum(min(n, 255) for n in per_day.values())), sum(e.amount for e in picked)


def first_day_spend(cust: RefCustomer) -> float:
    """Spend of the orders on the first purchase day."""
    days = purchase_days(cust)
    return (
        sum(
            e.amount
            for e in cust.history
            if e.type == P.ORDER_PLACED and e.ts // P.MS_PER_DAY == days[0]
        )
        if days
        else 0.0
    )


def purchase_days(cust: RefCustomer) -> list[int]:
    return sorted({e.ts // P.MS_PER_DAY for e in cust.history if e.type == P.ORDER_PLACED})


def preference(
    cust: RefCustomer,
    weights: list[float],
    half_life_ms: float,
    at: int | None = None,
    upto: int | None = None,
) -> list[float]:
    """The decayed vector at ``at`` (default: its reference time), from the history."""
    history = cust.history if upto is None else cust.history[:upto]
    prefs = [e for e in history if weights[e.type] != 0 and e.category >= 0]
    if not prefs:
        return [0.0] * PREF_CATEGORIES
    ref = max(e.ts for e in prefs) if at is None else at
    vec = [0.0] * PREF_CATEGORIES
    for e in prefs:  # in float64, whatever the weights' dtype
        vec[e.category] += float(weights[e.type]) * 2.0 ** (-(ref - e.ts) / half_life_ms)
    return vec


def reference_apply(
    events: list[tuple[str, int, int, int, float, float]],
    customers: dict[str, RefCustomer],
    p: P.KernelParams,
    weights: list[float],
    params: P.Params | None = None,
) -> tuple[list[tuple[int, int, int, int, int]], int]:
    """Apply (customer, type, category, time, amount, aux) events; (firings, late events).
    With ``params``, the derived labels are evaluated after every event as of the
    customer's clock, and their changes are firings too (``reference_labels``)."""
    fired = []
    late = 0
    for i, (cid, etype, category, ts, amount, aux) in enumerate(events):
        st = customers.setdefault(cid, RefCustomer())
        st.counts[etype] = min(st.counts.get(etype, 0) + 1, 65535)
        if etype == P.ORDER_PLACED:
            st.orders_total += 1
            st.spend_total += amount
        if st.last_seen is not None and st.last_seen - ts > p.lateness_ms:
            late += 1
            if params is not None:
                fired += reference_labels(st, ts, i, params)
            continue
        st.last_seen = ts if st.last_seen is None else max(st.last_seen, ts)
        st.first_seen = ts if st.first_seen is None else min(st.first_seen, ts)
        ev = Ev(ts, etype, category, amount, aux)
        day = ts // P.MS_PER_DAY
        if etype == P.ORDER_PLACED and ts >= st.last_seen:
            st.last_order_amount = amount
        if weights[etype] != 0 and category >= 0 and (st.pref_ref is None or ts >= st.pref_ref):
            if st.snap_day is None or day - st.snap_day >= p.snapshot_days:
                vec = preference(st, weights, p.half_life_ms, at=ts)
                top = max(max(vec), 0.0)
                st.snap = [
                    round(255.0 * max(v, 0.0) / top) if top > P.MIN_AFFINITY else 0 for v in vec
                ]
                st.snap_day = day
                st.shift_fired = False  # a new period for interest shift
            st.pref_ref = ts
        st.history.append(ev)

        if etype == P.PRODUCT_VIEW:
            if category == st.streak_category:
                st.streak_len += 1
            else:
                st.streak_category, st.streak_len = category, 1
            if p.browse_enabled and st.streak_len == p.browse_views:
                fired.append((i, P.RULE_BROWSE_INTEREST, category, st.streak_len, 0))
        if p.intent_enabled and etype in (P.PRODUCT_VIEW, P.ADD_TO_CART, P.ORDER_PLACED):
            span = p.intent_window_days
            views = window(st, "1d", "views", day, span)
            carts = window(st, "1d", "carts", day, span)
            orders = window(st, "1d", "orders", day, span)
            holds = views >= p.intent_min_views and carts >= p.intent_min_carts and orders == 0
            if holds and not st.high_intent:
                fired.append((i, P.RULE_HIGH_INTENT, int(views), int(carts), int(orders)))
            st.high_intent = holds
        if params is not None:
            fired += reference_labels(st, ts, i, params)
    return fired, late


def reference_labels(
    cust: RefCustomer, at_ms: int, event: int, params: P.Params
) -> list[tuple[int, int, int, int, int]]:
    """Move the customer's clock to ``at_ms`` (never back), derive as of it, and the
    firings of the label changes the rules look at (docs/triggers.md): churn level
    entering high, the tier rising, entering the high-value segment, and the top
    category moving away from the snapshot's (once per snapshot period)."""
    cust.clock = at_ms if cust.clock is None else max(cust.clock, at_ms)
    out = reference_derive(cust, cust.clock, params)
    kp, dp = params.kernel, params.derive
    level = 2 if cust.churn_high else (1 if out["churn_score"] >= dp.churn_medium else 0)
    fired = []
    if kp.churn_enabled and level == 2 and cust.churn_level < 2:
        fired.append((event, P.RULE_CHURN_HIGH, 0, 0, 0))
    if kp.tier_enabled:
        if out["tier"] > cust.tier:
            fired.append((event, P.RULE_TIER_UP, cust.tier, out["tier"], 0))
        if out["segment"] == 3 and cust.segment != 3:
            fired.append((event, P.RULE_HIGH_VALUE, cust.segment, 3, 0))
    if kp.shift_enabled and out["interest_shift"] >= kp.shift_min_distance and not cust.shift_fired:
        vec = preference(cust, list(params.pref_weights), kp.half_life_ms)
        now_top = max(range(len(vec)), key=lambda k: (vec[k], -k))
        was_top = max(range(len(cust.snap)), key=lambda k: (cust.snap[k], -k))
        if now_top != was_top:
            cust.shift_fired = True
            fired.append((event, P.RULE_INTEREST_SHIFT, was_top, now_top, cust.snap_day))
    cust.churn_level, cust.tier, cust.segment = level, out["tier"], out["segment"]
    return fired


def reference_bgnbd(
    x: float, t_x: float, big_t: float, horizon: float, r: float, alpha: float, a: float, b: float
) -> tuple[float, float]:
    """BG/NBD closed forms with SciPy's 2F1 (SciPy is a test dependency)."""
    from scipy.special import hyp2f1

    odds = (a / (b + x - 1)) * ((alpha + big_t) / (alpha + t_x)) ** (r + x) if x > 0 else 0.0
    p_alive = 1.0 / (1.0 + odds)
    z = horizon / (alpha + big_t + horizon)
    f21 = hyp2f1(r + x, b + x, a + b + x - 1, z)
    num = (
        (a + b + x - 1)
        / (a - 1)
        * (1 - ((alpha + big_t) / (alpha + big_t + horizon)) ** (r + x) * f21)
    )
    return p_alive, num / (1.0 + odds)


def reference_gamma_gamma_spend(x: float, mean_spend: float, dp: P.DeriveParams) -> float:
    """Gamma-Gamma's expected spend per purchase: the population mean pv/(q-1) and the
    customer's own mean, weighted (q-1) : px."""
    p, q, v = dp.gg_p, dp.gg_q, dp.gg_v
    return (q - 1) / (p * x + q - 1) * (p * v / (q - 1)) + p * x / (p * x + q - 1) * mean_spend


def reference_clv(
    x: float, t_x: float, big_t: float, spend: float, months: int, discount: float,
    r: float, alpha: float, a: float, b: float,
) -> float:  # fmt: skip
    """Discounted expected spend over ``months`` 30-day months: ``spend`` times the BG/NBD
    purchases of each month (SciPy's 2F1), month i discounted by (1 + discount) ** i."""
    expected = [0.0] + [
        reference_bgnbd(x, t_x, big_t, 30 * i / 7, r, alpha, a, b)[1]
        for i in range(1, months + 1)
    ]
    return sum(
        spend * (expected[i] - expected[i - 1]) / (1 + discount) ** i
        for i in range(1, months + 1)
    )


def reference_derive(cust: RefCustomer, as_of_ms: int, params: P.Params) -> dict[str, float]:
    """The derived columns for one customer, recomputed from its history."""
    dp = params.derive
    day = as_of_ms // P.MS_PER_DAY
    week = (day + 3) // 7
    out = dict.fromkeys(P.DERIVED, 0.0) | {"clv": math.nan}  # CLV: the segment rule's
    days = purchase_days(cust)
    buyer = bool(days)
    orders_90, spend_90 = orders_window(cust, day, 90)
    orders_365, spend_365 = orders_window(cust, day, 365)
    since = float(day - days[-1]) if buyer else -1.0
    gaps = [b - a for a, b in itertools.pairwise(days)]
    mean = sum(gaps) / len(gaps) if gaps else 0.0
    aov = cust.spend_total / cust.orders_total if cust.orders_total else 0.0
    p_alive = math.nan
    if buyer:
        x, t_x, big_t = len(days) - 1.0, (days[-1] - days[0]) / 7, max(day - days[0], 0) / 7
        p_alive, e30 = reference_bgnbd(
            x, t_x, big_t, 30 / 7, dp.bg_r, dp.bg_alpha, dp.bg_a, dp.bg_b
        )
        _, e90 = reference_bgnbd(x, t_x, big_t, 90 / 7, dp.bg_r, dp.bg_alpha, dp.bg_a, dp.bg_b)
        out["expected_30d"], out["expected_90d"] = e30, e90
        mean_spend = (cust.spend_total - first_day_spend(cust)) / x if x else 0.0
        spend = reference_gamma_gamma_spend(x, mean_spend, dp)
        out["clv"] = reference_clv(x, t_x, big_t, spend, dp.clv_months, dp.clv_discount,
                                   dp.bg_r, dp.bg_alpha, dp.bg_a, dp.bg_b)  # fmt: skip
    out["p_alive"] = p_alive

    def drop(kind: str) -> float:
        recent = window(cust, "1d", kind, day, dp.recent_days)
        baseline = (
            (window(cust, "1w", kind, week, 13) - recent) * dp.recent_days / (91.0 - dp.recent_days)
        )
        if baseline < dp.baseline_min:
            return 0.0
        return min(max((1 - recent / baseline) / dp.drop_threshold, 0.0), 1.0)

    sig = [0.0] * NUM_SIGNALS
    sig[0], sig[1] = drop("activity"), drop("sessions")
    carts = window(cust, "1d", "carts", day, 30)
    if carts >= 2:
        rate = max(0.0, 1 - window(cust, "1d", "orders", day, 30) / carts)
        sig[2] = rate if rate >= dp.cart_abandon_threshold else 0.0
    if len(days) > 1 and mean > 0:
        sig[3] = min(max((since - mean) / mean, 0.0), 1.0)
    if cust.orders_total > 1 and aov > 0:
        sig[4] = min(abs(cust.last_order_amount - aov) / aov, 1.0)
    if cust.orders_total:
        returned = cust.counts.get(P.ORDER_RETURNED, 0) + cust.counts.get(P.ORDER_REFUNDED, 0)
        sig[5] = min(returned / cust.orders_total, 1.0)
    kp = params.kernel
    neg = sum(
        1
        for e in cust.history
        if (e.type == P.SERVICE_TICKET and e.aux <= kp.negative_sentiment)
        or (e.type == P.PRODUCT_REVIEW and e.aux <= kp.negative_rating)
    )
    sig[6] = min(min(neg, 255) / 2.0, 1.0)
    delays = sum(1 for e in cust.history if e.type == P.LOGISTICS_UPDATE and e.aux > 0)
    sig[7] = min(min(delays, 255) / 2.0, 1.0)
    too_often = [e.ts // P.MS_PER_DAY for e in cust.history if e.type == P.CONTACTED_TOO_OFTEN]
    if too_often and day - max(too_often) <= dp.too_often_days:
        sig[8] = 1.0
    if buyer:
        sig[9] = 1.0 - p_alive
    for name, value in zip(E.SIGNALS, sig, strict=True):
        out[name] = value
    logit = dp.churn_bias + sum(w * s for w, s in zip(params.churn_weights, sig, strict=True))
    score = 1.0 / (1.0 + math.exp(-logit))
    out["churn_score"] = score
    if cust.churn_high:
        cust.churn_high = score >= dp.churn_high - dp.churn_hysteresis
    else:
        cust.churn_high = score >= dp.churn_high
    if buyer:
        out["r"] = 5 - sum(1 for c in params.recency_cuts if since > c)
        out["f"] = 1 + sum(1 for c in params.frequency_cuts if orders_365 >= c)
        out["m"] = 1 + sum(1 for c in params.monetary_cuts if spend_365 >= c)
    out.update(
        orders_90d=orders_90,
        spend_90d=spend_90,
        orders_365d=orders_365,
        spend_365d=spend_365,
        aov=aov,
        days_since_purchase=since,
        ipt_mean_days=mean,
    )
    if gaps:
        var = sum(g * g for g in gaps) / len(gaps) - mean * mean
        out["ipt_std_days"] = math.sqrt(max(var, 0.0))
    if not buyer:
        stage = 0
    elif since >= dp.lost_days:
        stage = 6
    elif since >= dp.dormant_days:
        stage = 5
    elif cust.churn_high:
        stage = 4
    elif day - days[0] < dp.new_days:
        stage = 1
    elif orders_365 >= dp.loyal_min_orders:
        stage = 3
    else:
        stage = 2
    out["stage"] = stage
    browsing = window(cust, "1d", "activity", day, dp.recent_days) > 0
    aov_90 = spend_90 / orders_90 if orders_90 else 0.0
    if not buyer:
        segment = 0
    elif since >= dp.seg_dormant_days:
        segment = 4
    elif orders_90 >= dp.hv_min_orders and aov_90 > dp.hv_min_aov:
        segment = 3
    elif len(days) == 1 and since >= dp.potential_days and browsing:
        segment = 2
    elif dp.high_clv_min > 0 and buyer and out["clv"] >= dp.high_clv_min:
        segment = 5
    else:
        segment = 1
    out["segment"] = segment
    out["tier"] = 2 if spend_365 >= dp.gold else (1 if spend_365 >= dp.silver else 0)
    vec = [
        max(v, 0.0) for v in preference(cust, list(params.pref_weights), params.kernel.half_life_ms)
    ]
    dot = sum(v * s for v, s in zip(vec, cust.snap, strict=True))
    n1, n2 = sum(v * v for v in vec), sum(s * s for s in cust.snap)
    if n1 > 0 and n2 > 0:
        out["interest_shift"] = 1 - dot / math.sqrt(n1 * n2)
    return out
