"""Timers kept in the customer's state under one ``wake`` member (operators/catalog.py):
what goes in comes back out exactly, or stays a member of the timer set."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.operators import kernels as K
from crmstream.operators.catalog import WAKE, TimerPlan, TriggerCatalog
from crmstream.state.encoding import (
    FLAG_CART_1,
    FLAG_CART_2,
    decode_batch,
    encode_records,
    fresh_records,
)
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


def _fold_one_at_a_time(plan: TimerPlan, records: np.ndarray, index: dict[str, int]) -> None:
    """The model ``fold_wake`` must match: each of the plan's timers put into its record
    on its own, in plan order, and taken back out when the record does not give back
    its due time and ref."""
    kept, owners = [], set()
    for timer in plan.schedule:
        kind = "dormant" if timer.kind.startswith("dormant_") else timer.kind
        if kind not in ("recheck", "birthday", "cart_1", "cart_2", "dormant", "potential"):
            kept.append(timer)
            continue
        record = records[index[timer.customer] : index[timer.customer] + 1]
        was = record.copy()
        if kind == "birthday":
            record["birthday_md"] = int(timer.ref[:2]) * 100 + int(timer.ref[3:])
        if kind in ("recheck", "birthday"):
            record[f"{kind}_due_ms"] = timer.due_ms
        elif kind.startswith("cart"):
            record["rule_flags"] |= FLAG_CART_1 if kind == "cart_1" else FLAG_CART_2
        elif kind == "dormant":
            days = int(timer.kind.split("_")[1])
            if days > 65535 or timer.ref != str(int(record["last_order_ms"][0])):
                kept.append(timer)
                continue
            record["dormant_days"] = days
        else:
            record["potential_ref_ms"] = int(timer.ref)
        if int(CATALOG._due_of(kind, record)[0]) != timer.due_ms:
            record[...] = was
            kept.append(timer)
            continue
        owners.add(timer.customer)
    for customer in sorted(owners):
        dues = CATALOG.due_columns(records[index[customer] : index[customer] + 1])[0]
        if (dues > 0).any():
            kept.append(Timer(customer, WAKE, "", int(dues[dues > 0].min())))
    plan.schedule[:] = kept


@st.composite
def _plans(draw):
    """Several customers' records and a plan mixing every kind, kinds repeated for one
    customer, timers a record gives back and timers it does not."""
    customers = ["ann", "bo", "cy"]
    records = fresh_records(len(customers))
    for i in range(len(customers)):
        records["last_cart_ms"][i] = draw(_times)
        records["last_order_ms"][i] = draw(_times)
    timers = []
    for _ in range(draw(st.integers(0, 14))):
        i = draw(st.integers(0, len(customers) - 1))
        cart, order = int(records["last_cart_ms"][i]), int(records["last_order_ms"][i])
        exact = draw(st.booleans())
        off = 0 if exact else draw(st.integers(-2 * DAY, 2 * DAY))
        step = draw(st.sampled_from([*RULES.dormant_win_back.days, 70_000]))
        first = draw(_times)
        anchor = order if exact or draw(st.booleans()) else order - DAY
        timers.append(
            draw(
                st.sampled_from(
                    [
                        Timer(customers[i], "cart_1", "", cart + CART_1 + off),
                        Timer(customers[i], "cart_2", "", cart + CART_2 + off),
                        Timer(customers[i], f"dormant_{step}", str(anchor), anchor + step * DAY),
                        Timer(
                            customers[i],
                            "potential",
                            str(first),
                            first + RULES.potential_no_repeat.days * DAY + off,
                        ),
                        Timer(customers[i], "recheck", "", first),
                        Timer(
                            customers[i],
                            "birthday",
                            draw(st.sampled_from(["02-29", "12-24"])),
                            first,
                        ),
                        Timer(customers[i], "delivery", "o-1", first),
                    ]
                )
            )
        )
    return customers, records, timers


@settings(max_examples=300, deadline=None)
@given(_plans())
def test_fold_keeps_what_putting_the_timers_in_one_at_a_time_keeps(case):
    customers, records, timers = case
    index = {c: i for i, c in enumerate(customers)}
    expected_records, expected = records.copy(), TimerPlan(list(timers), [], {}, {})
    _fold_one_at_a_time(expected, expected_records, index)
    plan = TimerPlan(list(timers), [], {}, {})
    CATALOG.fold_wake(plan, records, index, set(), [])
    assert plan.schedule == expected.schedule
    assert records.tobytes() == expected_records.tobytes()
