"""Events that reach Kafka late (docs/triggers.md, "Lateness").

An event more than ``state.allowed_lateness_seconds`` (1 h) behind its customer's newest
event updates the lifetime counters only: it must not arm a timer from a time it did not
set. An outsider (tester 48) found a cart add 2 h late arm both cart nudges from
``last_cart_ms`` 0: two ``cart_abandoned`` triggers dated 1970. Whether an event is late
depends on when it arrives, so these tests hold what must be true under any cutting, not
that cuttings agree (that holds for logs whose Kafka time follows event time:
tests/test_batching.py).
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from crmstream.config import CrmConfig
from crmstream.flows.runtime import Runtime
from tests.shard_driver import Cutting, Message, Outcome, driver_config, run_log
from tests.test_batching import _ROLE, cuttings, histories

pytestmark = pytest.mark.integration

MIN, H, D = 60_000, 3_600_000, 86_400_000
T0 = 1_767_348_000_000  # 2026-01-02T10:00:00Z
ONE_STEP = Cutting(10**13, (5000,), 0)
SECOND_STEPS = Cutting(1000, (1,), 0)
_runs = itertools.count()


@pytest.fixture(scope="module")
def base_config(stack) -> CrmConfig:
    return driver_config(stack, "late-runs", "timers.idle_watermark_ms=0")


@pytest.fixture(scope="module")
def shared(base_config, stack) -> Iterator[Runtime]:
    runtime = Runtime(base_config, stack)
    yield runtime
    runtime.close()


def _run(config: CrmConfig, stack, log: list[Message], cutting: Cutting, shared) -> Outcome:
    prefix = f"late{next(_runs)}"
    own = config.model_copy(
        update={"redis": config.redis.model_copy(update={"key_prefix": prefix})}
    )
    return run_log(own, stack, log, cutting, max(m.kafka_ms for m in log), shared)


def _msg(customer: str, kind: str, at: int, kafka_ms: int, **fields: Any) -> Message:
    body = {"event_id": f"{customer}-{kind}-{at}", "customer_id": customer,
            "event_type": kind, "event_time": at, **fields}  # fmt: skip
    return Message(_ROLE.get(kind, "clickstream"), 0, customer.encode(), orjson.dumps(body),
                   kafka_ms)  # fmt: skip


def _ms(stamp: str) -> int:
    from datetime import datetime

    return int(datetime.fromisoformat(stamp).timestamp() * 1000)


def _wrong_times(log: list[Message], outcome: Outcome) -> list[tuple[str, str, str]]:
    """Triggers and suppressions that claim a time the log does not give them: before
    their customer's first event, a cart nudge from a time that is none of the customer's
    cart adds, a win-back anchored at a time that is none of its orders."""
    bodies = [orjson.loads(m.value) for m in log]
    first: dict[str, int] = {}
    carts: dict[str, set[int]] = {}
    orders: dict[str, set[int]] = {}
    for b in bodies:
        c, at = b["customer_id"], b["event_time"]
        first[c] = min(first.get(c, at), at)
        if b["event_type"] == "add_to_cart":
            carts.setdefault(c, set()).add(at)
        elif b["event_type"] == "order_placed":
            orders.setdefault(c, set()).add(at)
    wrong = []
    for record in (*outcome.triggers, *outcome.suppressions):
        c, kind = record["customer_id"], record["trigger_type"]
        if c == "erased":
            continue
        at = _ms(record["event_time"])
        if at < first[c]:
            wrong.append((record["trigger_id"], kind, record["event_time"]))
        reason = record.get("reason")  # a suppression's is its text
        values = (reason.get("values") or {}) if isinstance(reason, dict) else {}
        added = values.get("cart_added_at") if kind == "cart_abandoned" else None
        if added is not None and _ms(added) not in carts.get(c, set()):
            wrong.append((record["trigger_id"], kind, added))
        bought = values.get("last_purchase_at") if kind == "dormant_win_back" else None
        if bought is not None and _ms(bought) not in orders.get(c, set()):
            wrong.append((record["trigger_id"], kind, bought))
    return wrong


# The outsider's log: the cart add at 10:01 reaches Kafka at 13:00, after the order of 12:00.
_LATE_CART = [
    _msg("lx", "session_start", T0, T0),
    _msg("lx", "order_placed", T0 + 2 * H, T0 + 2 * H, order_id="lo1", amount=10.0,
         currency="USD"),
    _msg("lx", "add_to_cart", T0 + MIN, T0 + 3 * H, product_id="p1", category="beauty",
         price=10.0, currency="USD"),
    _msg("other", "page_view", T0 + 4 * H, T0 + 4 * H),
]  # fmt: skip
# A first order that reaches Kafka 2 days late, after a later cart add: the win-back
# anchor is the last order's time, which a late order does not set.
_LATE_FIRST_ORDER = [
    _msg("lo", "session_start", T0, T0),
    _msg("lo", "add_to_cart", T0 + D, T0 + D, product_id="p1", category="beauty"),
    _msg("lo", "order_placed", T0 + MIN, T0 + 2 * D, order_id="o1", amount=30,
         currency="USD"),
    _msg("other", "page_view", T0 + 400 * D, T0 + 400 * D),
]  # fmt: skip


# Outsider 50: a shipment that reaches Kafka after its order's delivery, more than the
# allowed lateness behind it, re-opened the delivered order: a delivery delay fired for it.
_LATE_SHIPMENT = [
    _msg("ls", "order_placed", T0, T0, order_id="o1", amount=30, currency="USD"),
    _msg("ls", "order_delivered", T0 + D, T0 + D, order_id="o1"),
    _msg("ls", "order_shipped", T0 + 10 * MIN, T0 + D + H, order_id="o1",
         promised_delivery_time=T0 + 2 * D),
    _msg("other", "page_view", T0 + 60 * D, T0 + 60 * D),
]  # fmt: skip


@pytest.mark.parametrize("cutting", [SECOND_STEPS, ONE_STEP], ids=["1s-steps", "one-step"])
def test_a_shipment_too_late_for_the_windows_reopens_no_delivered_order(
    base_config, stack, shared, cutting
):
    outcome = _run(base_config, stack, _LATE_SHIPMENT, cutting, shared)
    kinds = [r["trigger_type"] for r in (*outcome.triggers, *outcome.suppressions)]
    assert "delivery_delay" not in kinds, outcome.triggers


# Outsider 51: the order of 09:30 reaches Kafka at 10:30, after the cart nudge of 10:00
# went out (1 s steps); its welcome lost priority arbitration to that later nudge, "fired
# at the same time". A candidate loses only to a winner at or before it.
_LATE_ORDER_AFTER_A_NUDGE = [
    _msg("ann", "add_to_cart", T0, T0, product_id="p1", category="beauty"),
    _msg("ann", "page_view", T0 + 75 * MIN, T0 + 75 * MIN),
    _msg("ann", "order_placed", T0 + 30 * MIN, T0 + 90 * MIN, order_id="o1", amount=10,
         currency="USD"),
    _msg("zed", "page_view", T0 + 4 * H, T0 + 4 * H),
]  # fmt: skip


@pytest.mark.parametrize("cutting", [SECOND_STEPS, ONE_STEP], ids=["1s-steps", "one-step"])
def test_a_late_order_s_welcome_does_not_lose_to_a_later_nudge(
    base_config, stack, shared, cutting
):
    outcome = _run(base_config, stack, _LATE_ORDER_AFTER_A_NUDGE, cutting, shared)
    assert [r["trigger_type"] for r in outcome.suppressions] == []
    sent = [r["trigger_type"] for r in outcome.triggers]
    assert "first_order_welcome" in sent
    # Under 1 s steps the nudge went out before the order arrived: documented lateness.
    assert sent.count("cart_abandoned") == (1 if cutting is SECOND_STEPS else 0)


@pytest.mark.parametrize("log", [_LATE_CART, _LATE_FIRST_ORDER], ids=["cart", "first-order"])
@pytest.mark.parametrize("cutting", [SECOND_STEPS, ONE_STEP], ids=["1s-steps", "one-step"])
def test_an_event_too_late_for_the_windows_arms_no_timer_from_time_zero(
    base_config, stack, shared, log, cutting
):
    outcome = _run(base_config, stack, log, cutting, shared)
    assert _wrong_times(log, outcome) == []
    assert all(r["event_time"] >= "2026" for r in (*outcome.triggers, *outcome.suppressions))


DELAYS = (0, 0, 0, 1, 20 * MIN, H + 1, 2 * H, D, 40 * D)


@st.composite
def late_histories(draw: st.DrawFn) -> list[Message]:
    """``histories`` with some messages reaching Kafka late (their Kafka time after their
    event time by up to 40 days), each partition in Kafka-time order as a broker appends."""
    log = draw(histories(max_events=16))
    late = [m._replace(kafka_ms=m.kafka_ms + draw(st.sampled_from(DELAYS))) for m in log]
    return sorted(late, key=lambda m: m.kafka_ms)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(log=late_histories(), cutting=cuttings)
@example(log=_LATE_CART, cutting=SECOND_STEPS)
@example(log=_LATE_FIRST_ORDER, cutting=SECOND_STEPS)
def test_late_arrivals_under_any_cutting_give_only_times_the_log_holds(
    base_config, stack, shared, log, cutting
):  # fmt: skip
    outcome = _run(base_config, stack, log, cutting, shared)
    assert _wrong_times(log, outcome) == []
    ids = [r["trigger_id"] for r in (*outcome.triggers, *outcome.suppressions)]
    assert len(ids) == len(set(ids))
