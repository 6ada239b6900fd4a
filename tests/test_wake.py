"""Timers kept in the customer's state under one ``wake`` member (operators/catalog.py):
what goes in comes back out exactly, or stays a member of the timer set."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.operators import kernels as K
from crmstream.operators.catalog import WAKE, TimerPlan, TriggerCatalog
from crmstream.state.encoding import decode_batch, encode_records, fresh_records
from crmstream.state.timers import Timer

CONFIG = load_config(None, [], env={})
RULES = CONFIG.rules
CATALOG = TriggerCatalog(CONFIG, K.params_from(CONFIG).churn_weights)
T0 = 1_767_225_600_000  # 2026-01-01
DAY = K.MS_PER_DAY
CART_1 = int(RULES.cart_abandoned.first_delay_minutes * 60_000)
CART_2 = int(RULES.cart_abandoned.second_delay_hours * K.MS_PER_HOUR)


def _record(cart_ms: int, order_ms: int) -> np.ndarray:
    records = fresh_records(1)
    records["last_cart_ms"], records["last_order_ms"] = cart_ms, order_ms
    return records


def _timers(customer: str, cart_ms: int, order_ms: int, first_order_ms: int, step: int):
    """Every kind a record can keep, scheduled the way the catalogue schedules it."""
    return [
        Timer(customer, "cart_1", "", cart_ms + CART_1),
        Timer(customer, "cart_2", "", cart_ms + CART_2),
        Timer(customer, f"dormant_{step}", str(order_ms), order_ms + step * DAY),
        Timer(
            customer,
            "potential",
            str(first_order_ms),
            first_order_ms + RULES.potential_no_repeat.days * DAY,
        ),
        Timer(customer, "recheck", "", order_ms + 7 * DAY),
        Timer(customer, "birthday", "12-24", T0 + 300 * DAY),
    ]


_times = st.integers(T0, T0 + 400 * DAY)


@settings(max_examples=200, deadline=None)
@given(
    cart=_times,
    order=_times,
    first=_times,
    step=st.sampled_from(RULES.dormant_win_back.days),
    keep=st.lists(st.booleans(), min_size=6, max_size=6),
    upto=_times,
)
def test_what_a_record_keeps_comes_back_exactly_and_fires_by_the_watermark(
    cart, order, first, step, keep, upto
):
    records = _record(cart, order)
    scheduled = [
        t for t, k in zip(_timers("ann", cart, order, first, step), keep, strict=True) if k
    ]
    others = [Timer("ann", "delivery", "o-1", order + DAY), Timer("ann", "welcome", "e1", first)]
    plan = TimerPlan(scheduled + others, [], {}, {})
    CATALOG.fold_wake(plan, records, {"ann": 0}, set(), [])

    # Only the wake member and the kinds a record cannot keep go to the timer set.
    members = [t for t in plan.schedule if t.kind != WAKE]
    assert members == others
    wakes = [t for t in plan.schedule if t.kind == WAKE]
    # Written and read back through the packed layout, the record gives them back.
    (stored,) = decode_batch(encode_records(records), ["crm:{ann}:s"])
    stored = stored.reshape(1)
    assert sorted(CATALOG.folded_timers(["ann"], stored)[0]) == sorted(scheduled)
    if not scheduled:
        assert wakes == []
        return
    assert wakes == [Timer("ann", WAKE, "", min(t.due_ms for t in scheduled))]

    fired = CATALOG.expand_wakes(wakes, stored, {"ann": 0}, [upto])["ann"]
    assert sorted(fired) == sorted(t for t in scheduled if t.due_ms <= upto)
    assert [t.due_ms for t in fired] == sorted(t.due_ms for t in fired)  # earliest first
    (left,) = CATALOG.folded_timers(["ann"], stored)
    assert sorted(left) == sorted(t for t in scheduled if t.due_ms > upto)


def test_a_timer_the_record_cannot_give_back_stays_a_member():
    records = _record(T0, T0)
    odd = [
        Timer("bo", "cart_1", "", T0 + CART_1 + 1),  # not the last cart's due time
        Timer("bo", "dormant_30", str(T0 - DAY), T0 + 29 * DAY),  # an older anchor
        Timer("bo", "potential", str(T0), T0 + 5 * DAY),  # another delay
        Timer("bo", "dormant_70000", str(T0), T0 + 70_000 * DAY),  # beyond the field
    ]
    plan = TimerPlan(list(odd), [], {}, {})
    CATALOG.fold_wake(plan, records, {"bo": 0}, set(), [])
    assert plan.schedule == odd
    assert CATALOG.folded_timers(["bo"], records) == [[]]


def test_a_kind_scheduled_again_replaces_the_pending_one_and_moves_the_wake():
    records = _record(T0, T0)
    plan = TimerPlan(_timers("cy", T0, T0, T0, 30)[:2], [], {}, {})
    CATALOG.fold_wake(plan, records, {"cy": 0}, set(), [])
    assert plan.schedule == [Timer("cy", WAKE, "", T0 + CART_1)]
    later = T0 + 3 * K.MS_PER_HOUR  # a later cart add moves both nudges
    records["last_cart_ms"] = later
    plan = TimerPlan(_timers("cy", later, T0, T0, 30)[:2], [], {}, {})
    CATALOG.fold_wake(plan, records, {"cy": 0}, set(), [])
    assert plan.schedule == [Timer("cy", WAKE, "", later + CART_1)]
    assert [t.due_ms for t in CATALOG.folded_timers(["cy"], records)[0]] == [
        later + CART_1,
        later + CART_2,
    ]


def test_a_timer_the_step_fired_itself_clears_the_pending_one_of_its_kind():
    records = _record(T0, T0)
    plan = TimerPlan(_timers("di", T0, T0, T0, 30)[:2], [], {}, {})
    CATALOG.fold_wake(plan, records, {"di": 0}, set(), [])
    fired_in_step = [Timer("di", "cart_1", "", T0 + CART_1)]
    plan = TimerPlan([], [], {}, {})
    CATALOG.fold_wake(plan, records, {"di": 0}, set(), fired_in_step)
    assert [t.kind for t in CATALOG.folded_timers(["di"], records)[0]] == ["cart_2"]
    assert plan.schedule == [Timer("di", WAKE, "", T0 + CART_2)]
