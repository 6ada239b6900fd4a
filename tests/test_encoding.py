"""The binary state layout (round trips, size, clear errors for unknown layouts) and the
outbox entry format."""

from __future__ import annotations

import zlib

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from crmstream.state.encoding import (
    CHECK_BYTES,
    LAYOUT_VERSION,
    STATE_BYTES,
    STATE_DTYPE,
    StateEncodingError,
    _index_ranges,
    check_ranges,
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
        assert len(blob) <= 1 + 3 * len(edits) + 2 * (STATE_BYTES // 255 + 1) + CHECK_BYTES
    assert decode_batch(packed, ["k"] * len(packed)).tobytes() == records.tobytes()


def test_a_fresh_record_packs_to_its_version_byte_and_checksum():
    head = bytes([LAYOUT_VERSION])
    assert encode_records(fresh_records(2)) == [_checked(head)] * 2


def _checked(blob6: bytes) -> bytes:
    """The layout-7 blob of a layout-6 one: version byte 7, then the trailer (the CRC-32
    of the blob before it XOR that blob's length)."""
    body = bytes([7]) + blob6[1:]
    return body + (zlib.crc32(body) ^ len(body)).to_bytes(4, "little")


@given(st.binary(max_size=300), st.integers(0, 300), st.integers(0, 300))
def test_the_compiled_checksum_is_zlibs_crc32(data, a, b):
    """Slicing by 8 with a byte-wise tail: every length and offset, as zlib computes it."""
    from crmstream.state.encoding import _CRC_TABLES, crc32_of

    start, end = sorted((min(a, len(data)), min(b, len(data))))
    buf = np.frombuffer(data, np.uint8)
    assert int(crc32_of(buf, start, end, _CRC_TABLES)) == zlib.crc32(data[start:end])
    assert crc32_of.signatures, "crc32_of ran as plain Python, not compiled"


@given(st.binary(min_size=STATE_BYTES - 1, max_size=STATE_BYTES - 1), st.data())
def test_a_stored_blob_cut_short_extended_or_changed_is_refused_naming_the_key(payload, data):
    """Layout 7's checksum: whatever is done to a stored blob (any cut, any bytes
    appended, any byte changed) decodes to an error naming the key, never to another
    record. Layout 6 had no check, and a blob cut at a token's end read as a record
    whose later fields were reset."""
    records = np.frombuffer(bytes([LAYOUT_VERSION]) + payload, dtype=STATE_DTYPE).copy()
    (blob,) = encode_records(records)
    damage = data.draw(st.sampled_from(["cut", "extend", "change"]))
    if damage == "cut":
        bad = blob[: data.draw(st.integers(1, len(blob) - 1))]
    elif damage == "extend":
        bad = blob + data.draw(st.binary(min_size=1, max_size=8))
    else:
        at = data.draw(st.integers(1, len(blob) - 1))  # byte 0 chooses the layout
        flip = data.draw(st.integers(1, 255))
        bad = blob[:at] + bytes([blob[at] ^ flip]) + blob[at + 1 :]
    with pytest.raises(StateEncodingError, match=r"state at .crm:\{c1\}:s. is a corrupt layout-7"):
        decode_batch([bad], ["crm:{c1}:s"])
    assert decode_batch([blob], ["crm:{c1}:s"]).tobytes() == records.tobytes()


@given(
    st.dictionaries(st.integers(1, STATE_BYTES - 1), st.integers(0, 255), max_size=40),
    st.integers(0, 255),
)
def test_a_blob_whose_version_byte_was_changed_is_refused(edits, version):
    """Byte 0 changed to any other value: refused naming the key, whatever layout it now
    claims. Without the check of the rest, byte 0 set to 6 read the trailer as tokens,
    and set to 1, 2 or 3 read a blob of such a layout's size as that layout."""
    assume(version != LAYOUT_VERSION)
    records = fresh_records(1)
    for offset, value in edits.items():
        records.view(np.uint8)[offset] = value
    (blob,) = encode_records(records)
    with pytest.raises(StateEncodingError, match=r"state at .crm:\{c1\}:s. "):
        decode_batch([bytes([version]) + blob[1:]], ["crm:{c1}:s"])


def test_a_blob_whose_trailer_reads_as_tokens_with_its_version_byte_set_to_6_is_refused():
    """A layout-7 blob whose trailer, read as layout 6's tokens, fits the record: byte 0
    set to 6 would read it as another record."""
    template = fresh_records(1).tobytes()
    for amount in range(1, 100_000):
        records = fresh_records(1)
        records["orders_total"] = amount
        (blob,) = encode_records(records)
        if _unpack_by_the_docs(bytes([6]) + blob[1:], template) is not None:
            break
    assert _unpack_by_the_docs(bytes([6]) + blob[1:], template) is not None
    with pytest.raises(StateEncodingError, match="version byte was changed"):
        decode_batch([bytes([6]) + blob[1:]], ["crm:{c1}:s"])


@pytest.mark.parametrize("version", [1, 2, 3])
def test_a_blob_of_an_older_layouts_size_with_its_version_byte_changed_is_refused(version):
    """The outsider's case: a layout-7 blob exactly as long as a plain layout-1, -2 or -3
    record (368, 889 or 986 bytes), byte 0 set to that layout."""
    from crmstream.state import legacy

    size = {1: legacy.STATE_DTYPE_V1, 2: legacy.STATE_DTYPE_V2, 3: legacy.STATE_DTYPE_V3}
    for changed in range(1, 2 * STATE_BYTES):
        records = fresh_records(1)
        raw = records.view(np.uint8)
        raw[1 : 1 + changed] ^= 0x5A  # a literal run of ``changed`` bytes
        (blob,) = encode_records(records)
        if len(blob) == size[version].itemsize:
            break
    assert len(blob) == size[version].itemsize
    with pytest.raises(StateEncodingError, match="version byte was changed"):
        decode_batch([None, bytes([version]) + blob[1:]], ["crm:{c0}:s", "crm:{c1}:s"])


def test_the_crc32_residue_appended_is_refused():
    """CRC-32 of M || CRC(M) is one constant for every M; with a bare CRC-32 trailer,
    appending its 4 bytes (1c df 44 21) to any blob passed the check."""
    for changed in (0, 1, 40, 300):
        records = fresh_records(1)
        records.view(np.uint8)[1 : 1 + changed] ^= 0x33
        (blob,) = encode_records(records)
        with pytest.raises(StateEncodingError, match="checksum"):
            decode_batch([blob + bytes.fromhex("1cdf4421")], ["crm:{c1}:s"])


@pytest.mark.parametrize("version", [1, 2, 3])
@given(data=st.data())
def test_any_bytes_of_a_plain_older_layouts_size_read_or_raise_a_clear_error(version, data):
    """A plain layout-1, -2 or -3 blob holding any values: read (and then written back
    and read again alike), or refused naming the key; never another exception."""
    from crmstream.state import legacy

    dtype = {1: legacy.STATE_DTYPE_V1, 2: legacy.STATE_DTYPE_V2, 3: legacy.STATE_DTYPE_V3}
    size = dtype[version].itemsize
    blob = bytes([version]) + data.draw(st.binary(min_size=size - 1, max_size=size - 1))
    try:
        records = decode_batch([None, blob], ["crm:{c0}:s", "crm:{c1}:s"])
    except StateEncodingError as error:
        assert "crm:{c1}:s" in str(error)
    else:
        again = decode_batch(encode_records(records), ["crm:{c0}:s", "crm:{c1}:s"])
        assert again.tobytes() == records.tobytes()


def test_a_layout_5_blob_whose_30_day_buckets_are_all_empty_reads():
    """The outsider's case: ``base_30d`` set, every bucket empty (the ring moved past the
    last order). It read with ``max()`` of nothing; now nothing is put on a day."""
    from crmstream.state.legacy import STATE_DTYPE_V5

    old = _old_record(STATE_DTYPE_V5, 5, base_30d=666, orders_total=2)
    blob = _pack_by_the_docs(old.tobytes(), fresh_records(1, STATE_DTYPE_V5, 5).tobytes())
    (new,) = decode_batch([blob], ["crm:{c1}:s"])
    assert new["orders_total"] == 2 and not new["orders_1d"].any()


@given(st.lists(st.binary(min_size=STATE_BYTES - 1, max_size=STATE_BYTES - 1), max_size=4))
def test_layout_6_blobs_are_read_as_they_are_and_written_back_checked(payloads):
    """A layout-6 blob is a layout-7 one without its trailer: read as the same record
    (mixed in one batch with layout-7 blobs), it writes back as layout 7."""
    records = _in_ranges(
        np.frombuffer(
            b"".join(bytes([LAYOUT_VERSION]) + p for p in payloads), dtype=STATE_DTYPE
        ).copy()
    )
    blobs = encode_records(records)
    old = [bytes([6]) + b[1:-CHECK_BYTES] for b in blobs]
    mixed = [o if i % 2 else b for i, (o, b) in enumerate(zip(old, blobs, strict=True))]
    for batch in (old, mixed):
        again = decode_batch(batch, [f"k{i}" for i in range(len(batch))])
        assert again.tobytes() == records.tobytes()
        assert encode_records(again) == blobs


def _in_ranges(records: np.ndarray) -> np.ndarray:
    """``records`` with each index field (``encoding._index_ranges``) wrapped into its
    range, as every record the kernels write has it."""
    for name, lo, hi in _index_ranges():
        records[name] = (records[name].astype(np.int64) - lo) % (hi - lo + 1) + lo
    return records


def _out_of_range(raw: bytes) -> bool:
    try:
        check_ranges(np.frombuffer(raw, STATE_DTYPE), ["k"])
    except StateEncodingError:
        return True
    return False


def _layout_5_names() -> tuple[str, ...]:
    from crmstream.state.legacy import STATE_DTYPE_V5

    return STATE_DTYPE_V5.names


@pytest.mark.parametrize(
    "field, version",
    [(name, 6) for name, _, _ in _index_ranges()]
    + [(name, 5) for name, _, _ in _index_ranges() if name in _layout_5_names()],
)
def test_an_unchecked_blob_whose_index_field_is_out_of_range_is_refused(field, version):
    """The second outsider's case: a layout-6 blob (no check) whose duplicate-ring cursor
    was 33 read without error, and the kernel wrote that customer's event ids into the
    next customer's record. Every field that indexes a table or ring is range-checked on
    a record read from a layout with no check; the neighbours in the batch are read."""
    lo, hi = {name: (lo, hi) for name, lo, hi in _index_ranges()}[field]
    records = fresh_records(3)
    info = np.iinfo(records.dtype[field])
    records[field][1] = hi + 1 if hi < info.max else lo - 1
    if version == 5:
        from crmstream.state.legacy import STATE_DTYPE_V5

        old = np.zeros(3, STATE_DTYPE_V5)
        for name in STATE_DTYPE_V5.names:
            if name in STATE_DTYPE.names:
                old[name] = records[name]
        old["version"] = 5
        template = fresh_records(1, STATE_DTYPE_V5, 5).tobytes()
        blobs = [_pack_by_the_docs(r.tobytes(), template) for r in old]
    else:
        blobs = [bytes([6]) + b[1:-CHECK_BYTES] for b in encode_records(records)]
    keys = ["crm:{c0}:s", "crm:{c1}:s", "crm:{c2}:s"]
    with pytest.raises(StateEncodingError, match=rf"state at .crm:\{{c1\}}:s. .*{field} = "):
        decode_batch(blobs, keys)
    decode_batch([blobs[0], None, blobs[2]], keys)  # the others read


def _unpack_by_the_docs(blob: bytes, template: bytes) -> bytes | None:
    """The record a packed blob stands for, read as documented (tokens of (zeros, n, n
    literal bytes) XOR the fresh record, zeros after the last token implied); None when
    a token is cut short or runs past the record."""
    out = bytearray(template)
    out[0] = blob[0]
    pos, i = 1, 1
    while pos < len(blob):
        if pos + 2 > len(blob):
            return None
        i += blob[pos]
        n = blob[pos + 1]
        pos += 2
        if i + n > len(template) or pos + n > len(blob):
            return None
        for j in range(n):
            out[i + j] = blob[pos + j] ^ template[i + j]
        i, pos = i + n, pos + n
    return bytes(out)


@given(st.binary(max_size=64), st.lists(st.tuples(st.integers(0, 255), st.binary(max_size=9)),
                                        max_size=12))  # fmt: skip
def test_any_packed_bytes_decode_to_what_the_format_says_or_raise_a_clear_error(tail, tokens):
    """Random bytes, and well-formed token runs with random bytes after them: decoded to
    exactly the record the documented format gives, or, where the format says the blob
    is cut short or runs past the record, a StateEncodingError naming the key."""
    template = fresh_records(1).tobytes()
    for payload in (tail, b"".join(bytes([z, len(lit)]) + lit for z, lit in tokens) + tail[:3]):
        blob = bytes([6]) + payload  # layout 6: the packing without the checksum
        expected = _unpack_by_the_docs(blob, template)
        for stored in (blob, _checked(blob)):
            try:
                (record,) = decode_batch([stored], ["crm:{c1}:s"])
            except StateEncodingError as error:
                assert "crm:{c1}:s" in str(error)
                if expected is None:
                    assert "corrupt" in str(error)
                else:  # it reads as a record no layout-7 writer makes: refused
                    assert stored[0] == 6 and _out_of_range(expected), stored
            else:
                assert expected is not None, stored
                assert record.tobytes()[1:] == expected[1:]
                assert record["version"] == LAYOUT_VERSION


@given(st.sampled_from([4, 5]), st.binary(max_size=64))
def test_any_packed_bytes_of_older_layouts_decode_or_raise_a_clear_error(version, payload):
    """Older layouts migrate (state/legacy.py): decoded, the record writes back as the
    current layout and reads back the same."""
    blob = bytes([version]) + payload
    try:
        records = decode_batch([blob], ["crm:{c1}:s"])
    except StateEncodingError as error:
        assert "crm:{c1}:s" in str(error) and "corrupt" in str(error)
    else:
        again = decode_batch(encode_records(records), ["crm:{c1}:s"])
        assert again.tobytes() == records.tobytes()
        assert int(records["version"][0]) == LAYOUT_VERSION


@pytest.mark.parametrize("version", [4, 5, 6, LAYOUT_VERSION])
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


def _old_record(dtype: np.dtype, version: int, **fields: object) -> np.ndarray:
    """A record of an older layout at its initial values, with ``fields`` set."""
    from crmstream.state.encoding import fresh_records as fresh

    old = fresh(1, dtype, version)
    for name, value in fields.items():
        old[name] = value
    return old


def test_layout_4_state_is_read_with_no_timers_in_the_record():
    """A layout-4 blob (packed against the layout-4 fresh record) decodes to the same
    fields, the later layouts' fields at their initial values, and is written back as
    the current layout."""
    from crmstream.state.legacy import STATE_DTYPE_V4

    old = _old_record(STATE_DTYPE_V4, 4, orders_total=7, recheck_due_ms=1_767_000_000_000,
                      birthday_md=1224)  # fmt: skip
    old["recent_ids"][0, 0] = 99
    template = fresh_records(1, STATE_DTYPE_V4, 4)
    blob = _pack_by_the_docs(old.tobytes(), template.tobytes())
    (new,) = decode_batch([blob], ["crm:{c1}:s"])
    assert new["version"] == LAYOUT_VERSION
    for name in STATE_DTYPE_V4.names:
        if name in STATE_DTYPE.names and name != "version":
            assert np.array_equal(new[name], old[0][name]), name
    fresh = fresh_records(1)[0]
    for name in set(STATE_DTYPE.names) - set(STATE_DTYPE_V4.names):
        assert np.array_equal(new[name], fresh[name]), name
    assert encode_records(new.reshape(1))[0][0] == LAYOUT_VERSION


def test_layout_5_state_is_read_with_its_30_day_buckets_on_days():
    """Layout 5 kept orders and spend in 30-day buckets aligned to the epoch. Each
    bucket lands on the latest purchase day the 64-day bitmap knows inside it, else on
    its last day up to the last purchase; every other field carries over."""
    from crmstream.state.legacy import RING_30D, STATE_DTYPE_V5

    last = 20_000  # epoch day; its bucket is 666 (days 19_980 .. 20_009)
    bits = 1 | 1 << 5 | 1 << 25  # purchases on days 20_000, 19_995 and 19_975
    old = _old_record(STATE_DTYPE_V5, 5, base_30d=666, purchase_days=4, orders_total=6,
                      spend_total=150.0, first_purchase_day=19_700, last_purchase_day=last,
                      purchase_day_bits=bits, dormant_days=30, ipt_sq_sum=12.5)  # fmt: skip
    for month, orders, spend in ((666, 3, 90.0), (665, 1, 20.0), (656, 2, 40.0), (654, 9, 1.0)):
        old["orders_30d"][0, month % RING_30D] = orders
        old["spend_30d"][0, month % RING_30D] = spend
    blob = _pack_by_the_docs(old.tobytes(), fresh_records(1, STATE_DTYPE_V5, 5).tobytes())
    (new,) = decode_batch([blob], ["crm:{c1}:s"])
    assert new["version"] == LAYOUT_VERSION
    for name in STATE_DTYPE_V5.names:
        if name in STATE_DTYPE.names and name != "version":
            assert np.array_equal(new[name], old[0][name]), name
    ring = {d: (int(new["orders_1d"][d % 365]), float(new["spend_1d"][d % 365]))
            for d in range(last - 364, last + 1) if new["orders_1d"][d % 365]}  # fmt: skip
    # 666 -> day 20_000 (the bitmap's newest in it), 665 -> 19_975 (known), 656 and the
    # oldest bucket, 654, on their last days
    assert ring == {20_000: (3, 90.0), 19_975: (1, 20.0), 19_709: (2, 40.0), 19_649: (9, 1.0)}
    assert new["base_orders_1d"] == last
    assert new["first_day_spend"] == 25.0  # several purchase days: the average order
    assert new["model_version"] == 0
    assert encode_records(new.reshape(1))[0][0] == LAYOUT_VERSION


def test_layout_3_state_is_migrated_with_no_pending_wake_up():
    from crmstream.state.legacy import STATE_DTYPE_V3

    old = _old_record(STATE_DTYPE_V3, 3, orders_total=7)
    old["recent_ids"][0, 0] = 99
    (new,) = decode_batch([old.tobytes()], ["crm:{c1}:s"])
    assert new["version"] == LAYOUT_VERSION and new["orders_total"] == 7
    assert new["recent_ids"][0] == 99
    assert (new["recheck_due_ms"], new["birthday_due_ms"], new["birthday_md"]) == (0, 0, 0)


BUDGET_PURCHASE_DAYS = 40  # docs/state.md: the 1 KiB bound holds up to this many


@settings(max_examples=25, deadline=None)
@given(
    order_days=st.sets(
        st.integers(0, 364), min_size=BUDGET_PURCHASE_DAYS, max_size=BUDGET_PURCHASE_DAYS
    ),
    amounts=st.lists(st.floats(0.01, 100_000, allow_nan=False), min_size=1, max_size=8),
    seed=st.integers(0, 2**16),
)
def test_a_busy_year_packs_within_the_budget(order_days, amounts, seed):
    """A customer active every day of the year (a session, three views of random
    categories and a cart add each day) with 40 purchase days stores at most 1 KiB."""
    from crmstream.config import load_config
    from crmstream.operators import derive as D
    from crmstream.operators import kernels as K
    from crmstream.operators import params as P

    params = P.params_from(load_config(env={}))
    rng = np.random.default_rng(seed)
    start = 20_000 * P.MS_PER_DAY
    rows = []
    for day in range(365):
        t = start + day * P.MS_PER_DAY + int(rng.integers(0, P.MS_PER_DAY - 10))
        rows += [(0, P.SESSION_START, -1, t, 0.0, 0.0), (0, P.ADD_TO_CART, 3, t + 2, 0.0, 0.0)]
        rows += [(0, P.PRODUCT_VIEW, int(c), t + 1, 0.0, 0.0) for c in rng.integers(0, 32, 3)]
        if day in order_days:
            rows.append((0, P.ORDER_PLACED, 2, t + 3, amounts[day % len(amounts)], 0.0))
    rows.sort(key=lambda r: r[3])
    records = fresh_records(1)
    K.apply_batch(records, K.events_of(rows), params)
    D.derive_batch(records, records["last_seen_ms"].copy(), params)
    assert len(encode_records(records)[0]) <= 1024


@pytest.mark.parametrize("blob", [b"\x09" + bytes(STATE_BYTES - 1), b"\x01\x02"])
def test_unknown_layout_names_the_key(blob):
    with pytest.raises(StateEncodingError, match=r"state at .crm:\{c1\}:s. has layout version"):
        decode_batch([blob], ["crm:{c1}:s"])


def test_layout_1_state_is_migrated_on_read():
    from crmstream.state.encoding import KIND_CARTS, KIND_VIEWS, RING_1D
    from crmstream.state.legacy import STATE_DTYPE_V1

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
    from crmstream.state.legacy import STATE_DTYPE_V2

    old = _old_record(STATE_DTYPE_V2, 2, orders_total=7, applied_offset=[9, 3, -1, -1])
    old["pref"][0, 3] = 0.5

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


@pytest.mark.parametrize("past", [0, 1])
def test_a_token_that_ends_at_the_records_end_decodes_and_one_byte_past_it_does_not(past):
    template = fresh_records(1).tobytes()
    skip, n = len(template) - 1 - 3, 3 + past  # to 3 bytes before the end, then n bytes
    blob = bytearray([6])
    while skip > 255:
        blob += bytes([255, 0])
        skip -= 255
    blob += bytes([skip, n]) + b"\x01" * n
    expected = _unpack_by_the_docs(bytes(blob), template)
    for stored in (bytes(blob), _checked(bytes(blob))):
        if past:
            assert expected is None
            with pytest.raises(StateEncodingError, match="corrupt"):
                decode_batch([stored], ["crm:{c1}:s"])
        else:
            assert decode_batch([stored], ["crm:{c1}:s"]).tobytes()[1:] == expected[1:]
