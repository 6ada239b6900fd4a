"""The binary state layout (round trips, size, clear errors for unknown layouts) and the
outbox entry format."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crmstream.state.encoding import (
    LAYOUT_VERSION,
    STATE_BYTES,
    STATE_DTYPE,
    StateEncodingError,
    decode_batch,
    encode_records,
    fresh_records,
)


@pytest.fixture(autouse=True, scope="module")
def _compiled():
    """Compile (or load) the packing kernels once, outside hypothesis' deadlines."""
    decode_batch(encode_records(fresh_records(1)), ["k"])


def test_new_customers_decode_to_fresh_records():
    records = decode_batch([None, None], ["k1", "k2"])
    assert np.array_equal(records, fresh_records(2))
    assert records["version"][0] == LAYOUT_VERSION


@given(
    st.lists(st.binary(min_size=STATE_BYTES - 1, max_size=STATE_BYTES - 1), max_size=5),
)
def test_round_trip_is_exact(payloads):
    """Any record (here: arbitrary bytes) packs and unpacks to itself."""
    records = np.frombuffer(
        b"".join(bytes([LAYOUT_VERSION]) + p for p in payloads), dtype=STATE_DTYPE
    ).copy()
    packed = encode_records(records)
    assert all(blob[0] == LAYOUT_VERSION for blob in packed)
    again = decode_batch(packed, [f"k{i}" for i in range(len(packed))])
    assert again.tobytes() == records.tobytes()
    assert encode_records(again) == packed


@given(
    st.lists(
        st.dictionaries(
            st.integers(1, STATE_BYTES - 1), st.integers(0, 255), max_size=STATE_BYTES // 4
        ),
        min_size=1,
        max_size=5,
    )
)
def test_sparse_changes_pack_small_and_round_trip(changes):
    """Records that differ from a fresh one in a few bytes (the usual customer) pack to
    about those bytes, and unpack exactly."""
    records = fresh_records(len(changes))
    raw = records.view(np.uint8).reshape(len(changes), STATE_BYTES)
    for row, edits in enumerate(changes):
        for offset, value in edits.items():
            raw[row, offset] = value
    packed = encode_records(records)
    for blob, edits in zip(packed, changes, strict=True):
        assert len(blob) <= 1 + 3 * len(edits) + 2 * (STATE_BYTES // 255 + 1)
    assert decode_batch(packed, ["k"] * len(packed)).tobytes() == records.tobytes()


def test_a_fresh_record_packs_to_its_version_byte():
    assert encode_records(fresh_records(2)) == [bytes([LAYOUT_VERSION])] * 2


@given(st.sampled_from([4, LAYOUT_VERSION]), st.binary(max_size=64))
def test_any_packed_bytes_decode_or_raise_a_clear_error(version, payload):
    blob = bytes([version]) + payload
    try:
        decode_batch([blob], ["crm:{c1}:s"])
    except StateEncodingError as error:
        assert "crm:{c1}:s" in str(error) and "corrupt" in str(error)


@pytest.mark.parametrize("version", [4, LAYOUT_VERSION])
def test_truncated_packed_state_names_the_key(version):
    with pytest.raises(
        StateEncodingError, match=rf"state at .crm:\{{c1\}}:s. is a corrupt layout-{version}"
    ):
        decode_batch([bytes([version, 0, 200, 1, 2])], ["crm:{c1}:s"])


def _pack_by_the_docs(raw: bytes, template: bytes) -> bytes:
    """The packed format as documented, one token per changed byte: (zeros skipped,
    1, byte XOR template), a skip over 255 split into (255, 0) tokens."""
    out, last = bytearray(raw[:1]), 0
    for i in range(1, len(raw)):
        if raw[i] == template[i]:
            continue
        gap = i - last - 1
        while gap > 255:
            out += bytes([255, 0])
            gap -= 255
        out += bytes([gap, 1, raw[i] ^ template[i]])
        last = i
    return bytes(out)


def test_layout_4_state_is_read_with_no_timers_in_the_record():
    """A layout-4 blob (packed against the layout-4 fresh record) decodes to the same
    fields, the later layouts' fields as a fresh record has them, and is written back in
    the current layout."""
    from crmstream.state.encoding import STATE_DTYPE_V4

    current = fresh_records(1)
    current["orders_total"] = 7
    current["recent_ids"][0, 0] = 99
    current["recheck_due_ms"] = 1_767_000_000_000
    current["birthday_md"] = 1224
    old = np.zeros(1, dtype=STATE_DTYPE_V4)
    template = np.zeros(1, dtype=STATE_DTYPE_V4)
    for name in STATE_DTYPE_V4.names:
        old[name] = current[name]
        template[name] = fresh_records(1)[name]
    old["version"] = 4
    blob = _pack_by_the_docs(old.tobytes(), template.tobytes())
    (new,) = decode_batch([blob], ["crm:{c1}:s"])
    assert new["version"] == LAYOUT_VERSION
    for name in STATE_DTYPE_V4.names:
        if name != "version":
            assert np.array_equal(new[name], current[0][name]), name
    fresh = fresh_records(1)[0]
    for name in STATE_DTYPE.names[len(STATE_DTYPE_V4.names) :]:
        assert new[name] == fresh[name], name
    assert encode_records(new.reshape(1))[0][0] == LAYOUT_VERSION


def test_layout_3_state_is_migrated_with_no_pending_wake_up():
    from crmstream.state.encoding import STATE_DTYPE_V3

    current = fresh_records(1)
    current["orders_total"] = 7
    current["recent_ids"][0, 0] = 99
    old = np.zeros(1, dtype=STATE_DTYPE_V3)
    for name in STATE_DTYPE_V3.names:
        old[name] = current[name]
    old["version"] = 3
    (new,) = decode_batch([old.tobytes()], ["crm:{c1}:s"])
    assert new["version"] == LAYOUT_VERSION and new["orders_total"] == 7
    assert new["recent_ids"][0] == 99
    assert (new["recheck_due_ms"], new["birthday_due_ms"], new["birthday_md"]) == (0, 0, 0)


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


@given(st.text(min_size=1, max_size=40), st.one_of(st.none(), st.binary(max_size=40)), st.binary())
def test_outbox_entries_round_trip(topic, key, value):
    from crmstream.flows.sink import Outgoing, decode_outgoing, encode_outgoing

    record = Outgoing(topic, key, value)
    assert decode_outgoing(encode_outgoing(record)) == record


def test_outbox_entries_keep_their_bytes():
    """Entries an earlier version left in Redis must still decode: the layout is pinned."""
    from crmstream.flows.sink import Outgoing, encode_outgoing

    entry = encode_outgoing(Outgoing("t.ü", b"k1", b"{}"))
    assert entry == b"\x00\x04\x00\x00\x00\x02t.\xc3\xbck1{}"
    assert encode_outgoing(Outgoing("t", None, b"v")) == b"\x00\x01\xff\xff\xff\xfftv"
    assert encode_outgoing(Outgoing("t", b"", b"v")) == b"\x00\x01\x00\x00\x00\x00tv"
