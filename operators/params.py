"""The kernels' parameters and codes: what the Numba loops read, from the configuration.

This module owns the constants the kernels share (event type codes, rule
firing codes, time units, the ``derive`` output columns) and ``Params``, every
threshold of ``operators.kernels`` and ``operators.derive`` built once from the
validated configuration.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from crmstream.config import CrmConfig
from crmstream.operators.events import (
    EVENT_CODE,
    NUM_EVENT_TYPES,
)
from crmstream.state.encoding import SEGMENTS, SIGNALS

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
MAX_TOP_K = 10  # the schema's bound on preferences.top_k
_HIGH_VALUE = SEGMENTS.index("high_value")
_FIRINGS_PER_EVENT = 6  # two event rules and four derived labels at most

MIN_AFFINITY = 1e-6  # a decayed affinity below this is treated as none
MS_PER_10M = 600_000
MS_PER_HOUR = 3_600_000
MS_PER_DAY = 86_400_000
LAST_TIME_MS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z: the last time a date can show
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
