"""Per-customer derivation: scores, churn signals, BTYD values and labels as of a time.

This module owns ``derive_one``: per customer and as of a given time, the RFM
scores, the ten churn signals and the logistic churn score with hysteresis,
BG/NBD P(alive) and expected purchases, CLV (BG/NBD x Gamma-Gamma), lifecycle
stage, value segment and tier (docs/state.md). ``operators.kernels`` calls it
after every event and at every fired timer; ``derive_batch`` derives a batch
as of given times (the profile fields, the customer-360 view).
``operators.reference`` restates it in plain Python; tests check they agree.
"""

from __future__ import annotations

import math

import numpy as np
from numba import njit

from crmstream.operators.btyd import (
    bgnbd,
    clv,
    clv_bound,
    gamma_gamma_spend,
    p_alive_of,
)
from crmstream.operators.params import (
    _C_AOV,
    _C_CHURN_SCORE,
    _C_DAYS_SINCE_PURCHASE,
    _C_EXPECTED_30D,
    _C_EXPECTED_90D,
    _C_F,
    _C_INTEREST_SHIFT,
    _C_IPT_MEAN_DAYS,
    _C_IPT_STD_DAYS,
    _C_M,
    _C_OLD_CHURN_LEVEL,
    _C_OLD_SEGMENT,
    _C_OLD_STAGE,
    _C_OLD_TIER,
    _C_ORDERS_90D,
    _C_ORDERS_365D,
    _C_P_ALIVE,
    _C_R,
    _C_SPEND_90D,
    _C_SPEND_365D,
    _SIG0,
    DERIVED,
    HIGH_CLV,
    MS_PER_DAY,
    ORDER_REFUNDED,
    ORDER_RETURNED,
    Params,
)
from crmstream.operators.windows import (
    _order_windows,
    week_of,
    window_sum,
)
from crmstream.state.encoding import (
    EMPTY_BASE,
    FLAG_CHURN_HIGH,
    KIND_ACTIVITY,
    KIND_CARTS,
    KIND_ORDERS,
    KIND_SESSIONS,
    NUM_SIGNALS,
    PREF_CATEGORIES,
)

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
def derive_one(r, as_of, dp, churn_weights, r_cuts, f_cuts, m_cuts, row, expectations, memo):
    """Derive one record's signals, scores and labels as of ``as_of`` into ``row``.

    Updates stage, segment, tier, churn level and flags in the record (the old
    values are kept in ``row``). ``expectations``: also the BG/NBD expected
    purchases (a power series; the labels need only P(alive)).
    """
    day = as_of // MS_PER_DAY
    week = week_of(day)
    row[:] = 0.0

    # The order windows and the CLV rule change only with the day and the orders: ``memo``
    # keeps them from the customer's last derivation ([day, orders, 4 windows, CLV rule]).
    if memo[0] == day and memo[1] == r.orders_total:
        orders_90, spend_90, orders_365, spend_365 = memo[2], memo[3], memo[4], memo[5]
    else:
        orders_90, spend_90, orders_365, spend_365 = _order_windows(r, day)
        memo[0], memo[1] = day, r.orders_total
        memo[2], memo[3], memo[4], memo[5] = orders_90, spend_90, orders_365, spend_365
        memo[6] = -1.0  # the CLV rule: not known yet
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
    elif dp.high_clv_min > 0 and _high_clv(r, day, dp, memo):
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
def _high_clv(r, day, dp, memo):
    """The high-CLV rule (CLV at least ``high_clv_min``), kept in ``memo`` for the day."""
    if memo[6] < 0:
        memo[6] = 1.0 if clv_of(r, day, dp, dp.high_clv_min) >= dp.high_clv_min else 0.0
    return memo[6] > 0


MEMO_SIZE = 7


@njit(cache=True, nogil=True)
def derive(records, as_of_ms, dp, churn_weights, r_cuts, f_cuts, m_cuts, out):
    """``derive_one`` for each record as of ``as_of_ms[i]`` into ``out[i]``."""
    for i in range(records.shape[0]):
        memo = np.full(MEMO_SIZE, -1.0)
        derive_one(
            records[i], as_of_ms[i], dp, churn_weights, r_cuts, f_cuts, m_cuts, out[i], True, memo
        )


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
