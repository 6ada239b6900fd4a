"""The Numba kernel against its plain-Python reference, over random event sequences."""

from __future__ import annotations

import itertools

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmstream.operators import kernels
from crmstream.operators.kernels import (
    ADD_TO_CART,
    MS_PER_DAY,
    ORDER_PLACED,
    PRODUCT_VIEW,
    RuleParams,
)
from crmstream.operators.reference import reference_apply
from crmstream.state.encoding import decode_batch, encode_records, fresh_records

BASE_MS = 20_000 * MS_PER_DAY
TYPES = [PRODUCT_VIEW, PRODUCT_VIEW, PRODUCT_VIEW, ADD_TO_CART, ORDER_PLACED, 0, 2]

event_strategy = st.tuples(
    st.sampled_from(["a", "b", "c"]),
    st.sampled_from(TYPES),
    st.integers(0, 3),
    # mostly forward in time, with late events and jumps past the ring
    st.integers(-40 * MS_PER_DAY, 80 * MS_PER_DAY),
)


def run_kernel(batches, browse_views, window, min_views, min_carts):
    """Apply the events batch by batch through encode/decode, as the flow does."""
    customers = ["a", "b", "c"]
    stored: dict[str, bytes | None] = dict.fromkeys(customers)
    fired = []
    offset = 0
    for batch in batches:
        records = decode_batch([stored[c] for c in customers], customers)
        idx = {c: i for i, c in enumerate(customers)}
        n = len(batch)
        cust = np.array([idx[e[0]] for e in batch], np.int32)
        types = np.array([e[1] for e in batch], np.int8)
        cats = np.array([e[2] for e in batch], np.int16)
        times = np.array([BASE_MS + e[3] for e in batch], np.int64)
        params = RuleParams(True, browse_views, True, window, min_views, min_carts)
        firings = kernels.apply_batch(records, cust, types, cats, times, params)
        for k in range(len(firings.event)):
            fired.append((offset + int(firings.event[k]), *(int(col[k]) for col in firings[1:])))
        stored = dict(zip(customers, encode_records(records), strict=True))
        offset += n
    return fired, decode_batch([stored[c] for c in customers], customers)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(event_strategy, max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=4),
    browse_views=st.integers(2, 4),
    window=st.integers(1, 32),
    min_views=st.integers(1, 5),
    min_carts=st.integers(1, 3),
)
def test_kernel_matches_reference_across_batch_boundaries(
    events, cuts, browse_views, window, min_views, min_carts
):
    bounds = sorted({0, len(events), *[c for c in cuts if c <= len(events)]})
    batches = [events[a:b] for a, b in itertools.pairwise(bounds)]
    got, records = run_kernel(batches, browse_views, window, min_views, min_carts)
    ref_events = [(c, t, cat, BASE_MS + dt) for c, t, cat, dt in events]
    state = {}
    expected = reference_apply(ref_events, state, browse_views, window, min_views, min_carts)
    assert got == expected
    for i, cust in enumerate(["a", "b", "c"]):
        ref = state.get(cust)
        counts = {t: int(n) for t, n in enumerate(records[i]["type_counts"]) if n}
        assert counts == (ref.counts if ref else {})
        if ref:
            assert int(records[i]["last_seen_ms"]) == ref.last_seen_ms
            assert int(records[i]["first_seen_ms"]) == ref.first_seen_ms
            assert int(records[i]["streak_len"]) == ref.streak_len


def test_compiled_path_really_ran():
    records = fresh_records(1)
    firings = kernels.apply_batch(
        records,
        np.zeros(1, np.int32),
        np.array([PRODUCT_VIEW], np.int8),
        np.zeros(1, np.int16),
        np.array([BASE_MS], np.int64),
        RuleParams(True, 1, True, 30, 5, 2),
    )
    assert kernels.apply_events.signatures, "apply_events ran as plain Python, not compiled"
    assert records["type_counts"][0, PRODUCT_VIEW] == 1
    assert list(firings.rule) == [kernels.RULE_BROWSE_INTEREST]


def test_out_of_order_events_within_the_ring_give_the_in_order_counts():
    views = [("a", PRODUCT_VIEW, 1, d * MS_PER_DAY) for d in range(10)]
    carts = [("a", ADD_TO_CART, 1, d * MS_PER_DAY) for d in (3, 7)]
    in_order = views + carts
    shuffled = list(reversed(in_order))
    _, a = run_kernel([in_order], 50, 30, 99, 99)
    _, b = run_kernel([shuffled], 50, 30, 99, 99)
    for name in ("ring_views", "ring_carts", "type_counts", "ring_base_day"):
        assert np.array_equal(a[name], b[name]), name
