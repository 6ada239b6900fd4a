"""Timers kept in the customer's state under one ``wake`` member (operators/timer_slots.py):
what goes in comes back out exactly, or stays a member of the timer set."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.operators import params as P
from crmstream.operators.timer_slots import FOLDED, TimerSlots, slot_of
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
SLOTS = TimerSlots(CONFIG)
T0 = 1_767_225_600_000  # 2026-01-01
DAY = P.MS_PER_DAY
CART_1 = int(RULES.cart_abandoned.first_delay_minutes * 60_000)
CART_2 = int(RULES.cart_abandoned.second_delay_hours * P.MS_PER_HOUR)


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
def test_what_a_record_keeps_comes_back_exactly_and_by_its_due_time(
    cart, order, first, step, keep, upto
):
    records = _record(cart, order)
    scheduled = [
        t for t, k in zip(_timers("ann", cart, order, first, step), keep, strict=True) if k
    ]
    others = [Timer("ann", "delivery", "o-1", order + DAY), Timer("ann", "welcome", "e1", first)]
    timers = scheduled + others
    kept = SLOTS.keep(timers, np.zeros(len(timers), np.intp), records)
    # Only the kinds a record cannot keep stay members of the timer set.
    assert [t for t, k in zip(timers, kept.tolist(), strict=True) if not k] == others
    # Written and read back through the packed layout, the record gives them back.
    (stored,) = decode_batch(encode_records(records), ["crm:{ann}:s"])
    stored = stored.reshape(1)
    assert sorted(SLOTS.timers_of(["ann"], stored)[0]) == sorted(scheduled)
    earliest = int(SLOTS.earliest(stored)[0])
    assert earliest == min((t.due_ms for t in scheduled), default=np.iinfo(np.int64).max)
    due = SLOTS.timers_of(["ann"], stored, np.array([upto]))[0]
    assert sorted(due) == sorted(t for t in scheduled if t.due_ms <= upto)
    assert [t.due_ms for t in due] == sorted(t.due_ms for t in due)  # earliest first
    SLOTS.clear([slot_of(t.kind) for t in due], stored, [0] * len(due))
    (left,) = SLOTS.timers_of(["ann"], stored)
    assert sorted(left) == sorted(t for t in scheduled if t.due_ms > upto)


def test_a_timer_the_record_cannot_give_back_stays_a_member():
    records = _record(T0, T0)
    odd = [
        Timer("bo", "cart_1", "", T0 + CART_1 + 1),  # not the last cart's due time
        Timer("bo", "dormant_30", str(T0 - DAY), T0 + 29 * DAY),  # an older anchor
        Timer("bo", "potential", str(T0), T0 + 5 * DAY),  # another delay
        Timer("bo", "dormant_70000", str(T0), T0 + 70_000 * DAY),  # beyond the field
    ]
    kept = SLOTS.keep(odd, np.zeros(len(odd), np.intp), records)
    assert not kept.any()
    assert SLOTS.timers_of(["bo"], records) == [[]]


def test_a_kind_scheduled_again_replaces_the_pending_one():
    records = _record(T0, T0)
    SLOTS.keep(_timers("cy", T0, T0, T0, 30)[:2], np.zeros(2, np.intp), records)
    assert int(SLOTS.earliest(records)[0]) == T0 + CART_1
    later = T0 + 3 * P.MS_PER_HOUR  # a later cart add moves both nudges
    records["last_cart_ms"] = later
    SLOTS.keep(_timers("cy", later, T0, T0, 30)[:2], np.zeros(2, np.intp), records)
    assert [t.due_ms for t in SLOTS.timers_of(["cy"], records)[0]] == [
        later + CART_1,
        later + CART_2,
    ]


def _due(kind: str, record: np.ndarray) -> int:
    """The due time a record gives back for a kept kind, from docs/triggers.md (not from
    the code under test): the newest cart add plus the nudge's delay, the newest order
    plus the win-back step, the first order plus the potential delay, or the field."""
    r = record[0]
    if kind in ("recheck", "birthday"):
        return int(r[f"{kind}_due_ms"])
    if kind.startswith("cart"):
        flag = FLAG_CART_1 if kind == "cart_1" else FLAG_CART_2
        delay = CART_1 if kind == "cart_1" else CART_2
        return int(r["last_cart_ms"]) + delay if r["rule_flags"] & flag else 0
    if kind == "dormant":
        days = int(r["dormant_days"])
        return int(r["last_order_ms"]) + days * DAY if days else 0
    ref = int(r["potential_ref_ms"])
    return ref + RULES.potential_no_repeat.days * DAY if ref else 0


def _fold_one_at_a_time(
    timers: list[Timer], records: np.ndarray, index: dict[str, int]
) -> list[bool]:
    """The model ``keep`` must match: each timer put into its record on its own, in
    order, and taken back out when the record does not give back its due time and ref."""
    kept = []
    for timer in timers:
        kind = "dormant" if timer.kind.startswith("dormant_") else timer.kind
        if kind not in FOLDED:
            kept.append(False)
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
                kept.append(False)
                continue
            record["dormant_days"] = days
        else:
            record["potential_ref_ms"] = int(timer.ref)
        if _due(kind, record) != timer.due_ms:
            record[...] = was
            kept.append(False)
            continue
        kept.append(True)
    return kept


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
    expected_records = records.copy()
    expected = _fold_one_at_a_time(timers, expected_records, index)
    rows = np.array([index[t.customer] for t in timers], np.intp)
    assert SLOTS.keep(timers, rows, records).tolist() == expected
    assert records.tobytes() == expected_records.tobytes()
