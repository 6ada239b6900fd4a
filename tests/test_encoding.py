"""The binary state layout: round trips, size, and clear errors for unknown layouts."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crmstream.state.encoding import (
    LAYOUT_VERSION,
    STATE_BYTES,
    StateEncodingError,
    decode_batch,
    encode_records,
    fresh_records,
)


def test_new_customers_decode_to_fresh_records():
    records = decode_batch([None, None], ["k1", "k2"])
    assert np.array_equal(records, fresh_records(2))
    assert records["version"][0] == LAYOUT_VERSION


@given(st.lists(st.binary(min_size=STATE_BYTES - 1, max_size=STATE_BYTES - 1), max_size=5))
def test_round_trip_is_exact(payloads):
    blobs = [bytes([LAYOUT_VERSION]) + p for p in payloads]
    records = decode_batch(blobs, [f"k{i}" for i in range(len(blobs))])
    assert encode_records(records) == blobs


def test_state_stays_small():
    assert STATE_BYTES <= 1024


@pytest.mark.parametrize("blob", [b"\x09" + bytes(STATE_BYTES - 1), b"\x01\x02"])
def test_unknown_layout_names_the_key(blob):
    with pytest.raises(StateEncodingError, match=r"state at .crm:\{c1\}:s. has layout version"):
        decode_batch([blob], ["crm:{c1}:s"])


def test_layout_1_state_is_migrated_on_read():
    from crmstream.state.encoding import (
        KIND_CARTS,
        KIND_VIEWS,
        RING_1D,
        STATE_DTYPE_V1,
    )

    old = np.zeros(1, dtype=STATE_DTYPE_V1)
    old["version"] = 1
    old["flags"] = 1
    old["streak_category"] = 4
    old["streak_len"] = 2
    old["first_seen_ms"], old["last_seen_ms"] = 1_000, 2_000
    old["applied_partition"] = [1, -1, -1, -1]
    old["applied_offset"] = [41, -1, -1, -1]
    old["type_counts"][0, 1] = 70_000  # more than layout 2's 16-bit counters hold
    base = 20_000
    old["ring_base_day"] = base
    old["ring_views"][0, base % 32] = 3
    old["ring_views"][0, (base - 1) % 32] = 300  # saturates at 255 in layout 2
    old["ring_carts"][0, (base - 29) % 32] = 2
    old["ring_carts"][0, (base - 31) % 32] = 9  # outside layout 2's 30-day ring

    (new,) = decode_batch([old.tobytes()], ["crm:{c1}:s"])
    assert new["version"] == LAYOUT_VERSION
    assert (new["streak_category"], new["streak_len"], new["rule_flags"]) == (4, 2, 1)
    assert (new["first_seen_ms"], new["last_seen_ms"]) == (1_000, 2_000)
    assert list(new["applied_offset"]) == [41, -1, -1, -1]
    assert new["type_counts"][1] == 65_535
    assert new["base_1d"] == base
    assert new["win_1d"][base % RING_1D, KIND_VIEWS] == 3
    assert new["win_1d"][(base - 1) % RING_1D, KIND_VIEWS] == 255
    assert new["win_1d"][(base - 29) % RING_1D, KIND_CARTS] == 2
    assert new["win_1d"][:, KIND_CARTS].sum() == 2
    assert encode_records(np.array([new]))[0][0] == LAYOUT_VERSION


def test_layout_2_state_is_migrated_on_read_with_an_empty_duplicate_ring():
    from crmstream.state.encoding import STATE_DTYPE_V2

    current = fresh_records(1)
    current["orders_total"] = 7
    current["pref"][0, 3] = 0.5
    current["applied_offset"] = [9, 3, -1, -1]
    old = np.zeros(1, dtype=STATE_DTYPE_V2)
    for name in STATE_DTYPE_V2.names:
        old[name] = current[name]
    old["version"] = 2

    (new,) = decode_batch([old.tobytes()], ["crm:{c1}:s"])
    assert new["version"] == LAYOUT_VERSION
    assert (new["orders_total"], new["pref"][3]) == (7, 0.5)
    assert list(new["applied_offset"]) == [9, 3, -1, -1]
    assert not new["recent_ids"].any() and new["recent_next"] == 0
