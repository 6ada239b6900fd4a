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
