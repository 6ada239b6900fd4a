"""Every configurable threshold at its exact value, one unit below and one unit above.

One table over the configuration keys (issue 39): each row names a key, how its
threshold reads in the probe's unit, the smallest step of that unit, the
comparison docs/triggers.md / docs/state.md / docs/events.md state, and a probe
(tests/thresholds.py) that runs the real code on the value. Each row is checked
at threshold - step, threshold and threshold + step with the default
configuration. ``test_every_numeric_key_is_a_row_or_said_not_to_be_a_threshold``
fails when a numeric key is added to the schema without a row here or a reason
in ``NOT_THRESHOLDS``.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import Any, NamedTuple

import orjson
import pytest
from pydantic import BaseModel

from crmstream.config import CrmConfig, load_config
from crmstream.operators import kernels as K
from crmstream.operators.events import ParsedEvent as _Parsed
from crmstream.operators.params import COL
from crmstream.operators.policies import TRIGGER_TYPES
from crmstream.state.encoding import fresh_records
from tests.thresholds import (
    DAY,
    FAR_NOW,
    HOUR,
    NOON,
    T0,
    body,
    cand,
    capped,
    cooling,
    derived,
    duplicate_after,
    fired,
    parse,
    stopped_by,
    story,
)

CONFIG = load_config(None, [], env={})
MIN = 60_000
CMP: dict[str, Callable[[Any, Any], bool]] = {
    ">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt,
}  # fmt: skip


class Row(NamedTuple):
    key: str  # the configuration key (a probe may read several rows' keys)
    threshold: Callable[[CrmConfig], float]  # the key's value in the probe's unit
    step: float  # one unit of the probe's value
    crossed: str  # the probe is True when  value <crossed> threshold
    probe: Callable[[CrmConfig, float], bool]
    what: str  # what the probe measures
    sets: tuple[str, ...] = ()  # overrides: a threshold that is off (0) by default is set


def _key(config: CrmConfig, path: str) -> Any:
    value: Any = config
    for part in path.split("."):
        value = getattr(value, part)
    return value


def _k(path: str, scale: float = 1.0) -> Callable[[CrmConfig], float]:
    return lambda config: _key(config, path) * scale


# -- probes: validation ------------------------------------------------------------------
def _rejected(config: CrmConfig, b: Any, now_ms: int = FAR_NOW) -> bool:
    return not isinstance(parse(config, [b], now_ms)[0], _Parsed)


def _sized(config: CrmConfig, size: float) -> bool:
    b = body("page_view", T0)
    raw = orjson.dumps(b | {"pad": ""})
    return _rejected(config, raw[:-2] + b"x" * (int(size) - len(raw)) + raw[-2:])


def _future(config: CrmConfig, ahead_ms: float) -> bool:
    now = T0 + 10 * DAY
    return _rejected(config, body("page_view", now + int(ahead_ms)), now)


def _promise(config: CrmConfig, offset_ms: float) -> bool:
    at = T0 + 400 * DAY
    return _rejected(config, body("order_shipped", at, promised_delivery_time=at + int(offset_ms)))


def _too_early(config: CrmConfig, at_ms: float) -> bool:
    return _rejected(config, body("page_view", int(at_ms)))


# -- probes: the kernels -----------------------------------------------------------------
def _late(config: CrmConfig, age_ms: float) -> bool:
    """Is an event arriving ``age_ms`` after the customer's newest one late (windows skip
    it)? The kernel applies events in the order given: the newest first."""
    now = T0 + 10 * DAY
    rows = [(0, K.SESSION_START, -1, now, 0.0, 0.0), (0, K.SESSION_START, -1, now - int(age_ms),
                                                     0.0, 0.0)]  # fmt: skip
    _, late = K.apply_batch(fresh_records(1), K.events_of(rows), K.params_from(config))
    return late == 1


def _neg_ticket(config: CrmConfig, sentiment: float) -> bool:
    record, _ = derived(config, [body("service_ticket", T0, sentiment=round(sentiment, 6))], T0)
    return int(record["neg_feedback"]) == 1


def _neg_review(config: CrmConfig, rating: float) -> bool:
    record, _ = derived(config, [body("product_review", T0, rating=int(rating))], T0)
    return int(record["neg_feedback"]) == 1


def _gold(config: CrmConfig) -> list[dict[str, Any]]:
    """A gold-tier customer (a trailing-year spend over the gold threshold)."""
    amount = config.segments.gold_spend_365d + 1
    return [body("order_placed", T0, amount=amount)]


def _service_recovery(config: CrmConfig, sentiment: float) -> bool:
    ticket = body("service_ticket", T0 + HOUR, sentiment=round(sentiment, 6))
    return fired(config, [*_gold(config), ticket], "service_recovery")


def _too_often_signal(config: CrmConfig, days: float) -> bool:
    """Is the "too many messages" churn signal on ``days`` after the feedback?"""
    _, row = derived(config, [body("contacted_too_often", T0)], T0 + int(days) * DAY)
    return row[COL["contacted_too_often"]] == 1.0


def _tier(config: CrmConfig, spend: float) -> int:
    record, _ = derived(config, [body("order_placed", T0, amount=round(spend, 2))], T0)
    return int(record["tier"])


def _orders(n: int, amount: float, gap_days: int = 1) -> list[dict[str, Any]]:
    return [body("order_placed", T0 + k * gap_days * DAY, amount=amount) for k in range(n)]


def _segment(config: CrmConfig, bodies: list, as_of_ms: int) -> str:
    from crmstream.state.encoding import SEGMENTS

    record, _ = derived(config, bodies, as_of_ms)
    return SEGMENTS[int(record["segment"])]


def _stage(config: CrmConfig, bodies: list, as_of_ms: int) -> str:
    from crmstream.state.encoding import STAGES

    record, _ = derived(config, bodies, as_of_ms)
    return STAGES[int(record["stage"])]


def _cart_rate(config: CrmConfig, orders: float) -> bool:
    """Is the cart-abandon signal on for 10 cart adds and ``orders`` orders in 30 days?"""
    bodies = [body("add_to_cart", T0 + k * MIN) for k in range(10)]
    bodies += [body("order_placed", T0 + HOUR + k * MIN) for k in range(int(orders))]
    _, row = derived(config, bodies, T0 + 2 * HOUR)
    return row[COL["cart_abandon"]] > 0


def _views(n: int, at: int = T0) -> list[dict[str, Any]]:
    return [body("product_view", at + k * MIN) for k in range(n)]


def _carts(n: int, at: int = T0) -> list[dict[str, Any]]:
    return [body("add_to_cart", at + 30 * MIN + k * MIN) for k in range(n)]


# -- probes: timers (fire once event time has passed the due time) -----------------------
def _after(config: CrmConfig, first: list[dict[str, Any]], later_ms: float, kind: str) -> bool:
    """Does ``kind`` fire when the customer's next event comes ``later_ms`` after
    ``first``'s last event (the step's bound: just before that event)?"""
    last = max(b["event_time"] for b in first)
    return fired(config, [*first, body("session_start", last + int(later_ms))], kind)


def _cart_nudge(nudge: int) -> Callable[[CrmConfig, float], bool]:
    def probe(config: CrmConfig, later_ms: float) -> bool:
        out, _ = story(config, [body("add_to_cart", T0),
                                body("session_start", T0 + int(later_ms))])  # fmt: skip
        return any(c.trigger_type == "cart_abandoned" and c.values.get("nudge") == nudge
                   for c in out.candidates)  # fmt: skip

    return probe


def _delivery(customs: bool) -> Callable[[CrmConfig, float], bool]:
    def probe(config: CrmConfig, later_ms: float) -> bool:
        promised = T0 + DAY
        first = [body("order_placed", T0, order_id="o1"),
                 body("order_shipped", T0 + HOUR, order_id="o1", promised_delivery_time=promised)]
        if customs:
            first.append(body("logistics_update", T0 + 2 * HOUR, order_id="o1",
                              status="customs_hold"))  # fmt: skip
        nxt = body("session_start", promised + int(later_ms))
        return fired(config, [*first, nxt], "delivery_delay")

    return probe


def _welcome(config: CrmConfig, later_ms: float) -> bool:
    first = [body("order_placed", T0, order_id="o1"), body("order_delivered", T0 + HOUR)]
    out, _ = story(config, [*first, body("session_start", T0 + HOUR + int(later_ms))])
    return any(c.values.get("stage") == "delivered" for c in out.candidates
               if c.trigger_type == "first_order_welcome")  # fmt: skip


def _birthday(config: CrmConfig, later_ms: float) -> bool:
    """The birthday is 01-20; its reminder is due at 00:00 UTC ``days_before`` before."""
    birthday = T0 + 19 * DAY
    profile = body("profile_updated", T0, birthday="01-20")
    return fired(config, [profile, body("session_start", birthday - int(later_ms))], "birthday")


def _potential(config: CrmConfig, later_ms: float) -> bool:
    first = [body("order_placed", T0), body("page_view", T0 + int(later_ms) - DAY)]
    return fired(config, [*first, body("session_start", T0 + int(later_ms))],
                 "potential_no_repeat")  # fmt: skip


def _win_back(config: CrmConfig, later_ms: float) -> bool:
    return fired(config, [body("order_placed", T0), body("session_start", T0 + int(later_ms))],
                 "dormant_win_back")  # fmt: skip


def _repurchase(config: CrmConfig, later_ms: float) -> bool:
    """Orders 20 days apart: the next one is expected 20 days after the last."""
    first = [body("order_placed", T0), body("order_placed", T0 + 20 * DAY)]
    nxt = body("session_start", T0 + 40 * DAY - int(later_ms))
    return fired(config, [*first, nxt], "repurchase_due")


ROWS: list[Row] = [
    # validation (docs/events.md)
    Row("processing.max_event_bytes", _k("processing.max_event_bytes"), 1, ">", _sized,
        "message size in bytes: rejected above the limit"),
    Row("processing.max_future_skew_seconds", _k("processing.max_future_skew_seconds", 1000),
        1, ">", _future, "event time ahead of the clock, ms: rejected"),
    Row("processing.min_event_time", lambda c: c.processing.min_event_time_ms, 1, "<",
        _too_early, "event time, epoch ms: rejected before the minimum"),
    Row("processing.promised_delivery_max_days_after",
        _k("processing.promised_delivery_max_days_after", DAY), 1, ">", _promise,
        "promise after the event, ms: rejected"),
    Row("processing.promised_delivery_max_days_before",
        lambda c: -c.processing.promised_delivery_max_days_before * DAY, 1, "<", _promise,
        "promise before the event, ms (negative): rejected"),
    # exactly-once checks
    Row("processing.dedup_horizon_seconds", _k("processing.dedup_horizon_seconds"), 1, "<=",
        duplicate_after, "an event id seen again this many seconds later: a duplicate"),
    # the kernels (docs/state.md)
    Row("state.allowed_lateness_seconds", _k("state.allowed_lateness_seconds", 1000), 1, ">",
        _late, "age of an event behind the customer's newest, ms: too late for the windows"),
    Row("churn.negative_sentiment", _k("churn.negative_sentiment"), 0.01, "<=", _neg_ticket,
        "ticket sentiment: a negative-feedback signal"),
    Row("churn.negative_sentiment", _k("churn.negative_sentiment"), 0.01, "<=",
        _service_recovery, "ticket sentiment of a gold customer: service recovery"),
    Row("churn.negative_rating", _k("churn.negative_rating"), 1, "<=", _neg_review,
        "review rating: a negative-feedback signal"),
    Row("churn.too_often_days", _k("churn.too_often_days"), 1, "<=", _too_often_signal,
        "days since 'contacted too often': the churn signal"),
    Row("churn.cart_abandon_threshold", lambda c: round(10 * (1 - c.churn.cart_abandon_threshold)),
        1, "<=", _cart_rate, "orders against 10 cart adds (rate >= threshold): the signal"),
    Row("segments.silver_spend_365d", _k("segments.silver_spend_365d"), 0.01, ">=",
        lambda c, v: _tier(c, v) >= 1, "trailing-year spend: silver"),
    Row("segments.gold_spend_365d", _k("segments.gold_spend_365d"), 0.01, ">=",
        lambda c, v: _tier(c, v) == 2, "trailing-year spend: gold"),
    Row("segments.high_value_min_orders_90d", _k("segments.high_value_min_orders_90d"), 1, ">=",
        lambda c, n: _segment(c, _orders(int(n), 100.0), T0 + 10 * DAY) == "high_value",
        "orders in 90 days (average 100): high value"),
    Row("segments.high_value_min_aov", _k("segments.high_value_min_aov"), 0.01, ">",
        lambda c, a: _segment(c, _orders(c.segments.high_value_min_orders_90d, round(a, 2)),
                              T0 + 10 * DAY) == "high_value",
        "average order in 90 days: high value"),
    Row("segments.potential_days", _k("segments.potential_days"), 1, ">=",
        lambda c, d: _segment(c, [body("order_placed", T0),
                                  body("page_view", T0 + (int(d) - 1) * DAY)],
                              T0 + int(d) * DAY) == "potential",
        "days since the only order, still browsing: potential"),
    Row("segments.dormant_days", _k("segments.dormant_days"), 1, ">=",
        lambda c, d: _segment(c, [body("order_placed", T0)], T0 + int(d) * DAY) == "dormant",
        "days without an order: dormant segment"),
    Row("lifecycle.new_days", _k("lifecycle.new_days"), 1, "<",
        lambda c, d: _stage(c, [body("order_placed", T0)], T0 + int(d) * DAY) == "new",
        "days since the first order: stage new"),
    Row("lifecycle.dormant_days", _k("lifecycle.dormant_days"), 1, ">=",
        lambda c, d: _stage(c, [body("order_placed", T0)], T0 + int(d) * DAY)
        in ("dormant", "lost"), "days without an order: stage dormant"),
    Row("lifecycle.lost_days", _k("lifecycle.lost_days"), 1, ">=",
        lambda c, d: _stage(c, [body("order_placed", T0)], T0 + int(d) * DAY) == "lost",
        "days without an order: stage lost"),
    Row("lifecycle.loyal_min_orders_365d", _k("lifecycle.loyal_min_orders_365d"), 1, ">=",
        lambda c, n: _stage(c, _orders(int(n), 10.0, 2), T0 + 40 * DAY) == "loyal",
        "orders in the trailing year, past the first 30 days: stage loyal"),
    # event-driven rules (docs/triggers.md)
    Row("rules.browse_interest.consecutive_views", _k("rules.browse_interest.consecutive_views"),
        1, ">=", lambda c, n: fired(c, _views(int(n)), "browse_interest"),
        "consecutive views in one category: browse interest"),
    Row("rules.high_intent_no_purchase.min_views", _k("rules.high_intent_no_purchase.min_views"),
        1, ">=", lambda c, n: fired(c, _views(int(n)) + _carts(2), "high_intent_no_purchase"),
        "views in 30 days, with 2 cart adds: high intent"),
    Row("rules.high_intent_no_purchase.min_cart_adds",
        _k("rules.high_intent_no_purchase.min_cart_adds"), 1, ">=",
        lambda c, n: fired(c, _views(5) + _carts(int(n)), "high_intent_no_purchase"),
        "cart adds in 30 days, with 5 views: high intent"),
    Row("rules.high_intent_no_purchase.window_days",
        _k("rules.high_intent_no_purchase.window_days"), 1, "<",
        lambda c, d: fired(c, _views(1) + _views(4, T0 + int(d) * DAY)
                           + _carts(2, T0 + int(d) * DAY), "high_intent_no_purchase"),
        "days between the first view and the last: still in the window"),
    # timers: the next event this long after the anchor (fires once event time passed it)
    Row("rules.cart_abandoned.first_delay_minutes",
        _k("rules.cart_abandoned.first_delay_minutes", MIN), 1, ">", _cart_nudge(1),
        "ms from the cart add to the next event: nudge 1"),
    Row("rules.cart_abandoned.second_delay_hours",
        _k("rules.cart_abandoned.second_delay_hours", HOUR), 1, ">", _cart_nudge(2),
        "ms from the cart add to the next event: nudge 2"),
    Row("rules.first_order_welcome.after_delivery_hours",
        _k("rules.first_order_welcome.after_delivery_hours", HOUR), 1, ">", _welcome,
        "ms from the delivery to the next event: welcome (delivered)"),
    Row("rules.delivery_delay.hours_after_promise",
        _k("rules.delivery_delay.hours_after_promise", HOUR), 1, ">", _delivery(False),
        "ms from the promise to the next event, undelivered: delivery delay"),
    Row("rules.delivery_delay.customs_hours_after_promise",
        _k("rules.delivery_delay.customs_hours_after_promise", HOUR), 1, ">", _delivery(True),
        "ms from the promise, customs hold: delivery delay"),
    Row("rules.potential_no_repeat.days", _k("rules.potential_no_repeat.days", DAY), 1, ">",
        _potential, "ms from the only order to the next event: potential no repeat"),
    Row("rules.dormant_win_back.days", lambda c: min(c.rules.dormant_win_back.days) * DAY, 1,
        ">", _win_back, "ms from the order to the next event: the first win-back step"),
    Row("rules.birthday.days_before", _k("rules.birthday.days_before", DAY), 1, "<", _birthday,
        "ms before the birthday of the next event: the reminder"),
    Row("rules.repurchase_due.days_before", _k("rules.repurchase_due.days_before", DAY), 1, "<",
        _repurchase, "ms before the expected order of the next event: repurchase due"),
    # contact policies (docs/triggers.md, "Policies")
    Row("policies.arbitration_window_seconds", _k("policies.arbitration_window_seconds", 1000),
        1, "<=", lambda c, gap: stopped_by(c, [cand("cart_abandoned", NOON, "e1"),
                                               cand("browse_interest", NOON + int(gap), "e2")])
        == ["priority"], "ms after a higher-priority winner: lost arbitration"),
    Row("policies.caps.per_day", _k("policies.caps.per_day"), 1, ">=",
        lambda c, n: capped(c, [10 * (k + 1) for k in range(int(n))]),
        "marketing sends in the last 24 h: capped"),
    Row("policies.caps.per_week", _k("policies.caps.per_week"), 1, ">=",
        lambda c, n: capped(c, [1500 + 60 * k for k in range(int(n))]),
        "marketing sends 1-7 days ago: capped"),
    Row("policies.caps.too_often_per_day", _k("policies.caps.too_often_per_day"), 1, ">=",
        lambda c, n: capped(c, [10 * (k + 1) for k in range(int(n))], NOON // DAY - 1),
        "sends in the last 24 h after 'too often': capped"),
    Row("policies.caps.too_often_per_week", _k("policies.caps.too_often_per_week"), 1, ">=",
        lambda c, n: capped(c, [1500 + 60 * k for k in range(int(n))], NOON // DAY - 1),
        "sends 1-7 days ago after 'too often': capped"),
    Row("churn.too_often_days", _k("churn.too_often_days"), 1, "<=",
        lambda c, d: capped(c, [10], NOON // DAY - int(d)),
        "days since 'too often' of a customer with one send today: the lower cap"),
]
for _rule in TRIGGER_TYPES:  # a cooldown of 0 (none) is held at 5 hours
    _off = getattr(CONFIG.rules, _rule).cooldown_hours == 0
    ROWS.append(Row(f"rules.{_rule}.cooldown_hours", _k(f"rules.{_rule}.cooldown_hours", 60),
                    1, "<", lambda c, m, r=_rule: cooling(c, r, int(m)),
                    "minutes since the rule last went out: cooling down",
                    (f"rules.{_rule}.cooldown_hours=5",) if _off else ()))  # fmt: skip
_CONFIGS: dict[tuple[str, ...], CrmConfig] = {(): CONFIG}


def _config(sets: tuple[str, ...]) -> CrmConfig:
    if sets not in _CONFIGS:
        _CONFIGS[sets] = load_config(None, list(sets), env={})
    return _CONFIGS[sets]


@pytest.mark.parametrize("row", ROWS, ids=[f"{r.key}:{r.probe.__name__}" for r in ROWS])
def test_threshold_at_its_value_one_below_and_one_above(row: Row):
    config = _config(row.sets)
    at = row.threshold(config)
    seen = {}
    for delta in (-1, 0, 1):
        value = at + delta * row.step
        seen[delta] = row.probe(config, value)
    expected = {d: CMP[row.crossed](at + d * row.step, at) for d in (-1, 0, 1)}
    assert seen == expected, f"{row.key} ({row.what}) at {at}: got {seen}, expected {expected}"


# Numeric keys that are not a threshold a value is held against, and why.
NOT_THRESHOLDS = {
    "config_version": "the file format's version",
    "kafka.partitions": "topic layout", "kafka.replication_factor": "topic layout",
    "kafka.batch_size": "read size", "kafka.delivery_timeout_seconds": "a timeout (test_faults)",
    "redis.socket_timeout_seconds": "a timeout", "redis.retry_attempts": "retry policy",
    "redis.retry_base_seconds": "retry policy", "redis.retry_max_seconds": "retry policy",
    "processing.shards": "layout", "processing.epoch_interval_seconds": "Bytewax epochs",
    "processing.step_ms": "step cutting (tests/test_batching.py)",
    "processing.dead_letter_max_original_bytes": "a size bound (tests/test_redaction.py)",
    "processing.gc_young_threshold": "a GC tuning", "metrics.port": "a port",
    "metrics.bytewax_api_port": "a port",
    "timers.idle_watermark_ms": "live-clock pacing", "timers.tick_ms": "live-clock pacing",
    "timers.fire_batch": "a round's size", "policies.erasure_tombstone_days": "a key's TTL",
    "preferences.half_life_days": "a decay rate", "preferences.top_k": "a list length",
    "preferences.snapshot_days": "the interest-shift period",
    "churn.bias": "a model weight", "churn.recent_days": "a window length",
    "churn.baseline_min_events": "a model guard", "churn.activity_drop_threshold": "model input",
    "bgnbd.r": "model", "bgnbd.alpha": "model", "bgnbd.a": "model", "bgnbd.b": "model",
    "gamma_gamma.p": "model", "gamma_gamma.q": "model", "gamma_gamma.v": "model",
    "value.clv_months": "model horizon", "value.monthly_discount_rate": "model",
    "value.model_version": "an id", "rules.potential_no_repeat.browsing_days": "a window length",
    "rules.repurchase_due.min_purchase_days": "a minimum history",
    "rules.churn_risk.recheck_days": "when a quiet customer is derived again",
    "kafka.connect_timeout_seconds": "a timeout (tests/test_cli_errors.py)",
    "redis.connect_timeout_seconds": "a timeout (tests/test_cli_errors.py)",
    "kafka.stall_warning_seconds": "a warning's delay (tests/test_source.py)",
    "kafka.consumer_group_commit_seconds": "a reporting interval (tests/test_metrics_start.py)",
    "redis.retry_budget_seconds": "retry policy (tests/test_retry_budget.py)",
    "processing.drain_timeout_seconds": "a timeout (tests/test_drain.py)",
}
# Thresholds held by other tests (named), not by a row of this table.
ELSEWHERE = {
    "churn.medium": "derive parity (tests/test_kernels.py)",
    "churn.high": "derive parity and hysteresis (tests/test_kernels.py, test_catalog.py)",
    "churn.hysteresis": "derive parity (tests/test_kernels.py)",
    "segments.high_clv_min": "tests/test_kernels.py high_clv_min parity",
    "rules.interest_shift.min_distance": "tests/test_catalog.py interest shift",
}


def _numeric_keys(model: BaseModel, prefix: str = "") -> list[str]:
    out = []
    for name in type(model).model_fields:
        value = getattr(model, name)
        path = f"{prefix}{name}"
        if isinstance(value, BaseModel):
            out += _numeric_keys(value, path + ".")
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(path)
    return out


def test_every_numeric_key_is_a_row_or_said_not_to_be_a_threshold():
    rows = {r.key for r in ROWS}
    generic = (".version", ".priority")  # an id, and a rank (tests/test_policy_engine.py)
    missing = [k for k in _numeric_keys(CONFIG)
               if k not in rows and k not in NOT_THRESHOLDS and k not in ELSEWHERE
               and not k.endswith(generic)]  # fmt: skip
    assert missing == [], f"thresholds without a boundary row: {missing}"
    stale = [k for k in [*NOT_THRESHOLDS, *ELSEWHERE] if k in rows]
    assert stale == [], stale
