"""The compact, versioned binary layout of one customer's hot state.

This module owns the bytes stored under a customer's state key: a NumPy
structured dtype whose first byte is the layout version. ``decode_batch`` turns
the blobs of a whole batch into one structured array (missing customers become
fresh records) and ``encode_records`` turns it back into bytes, so the kernels
only ever see arrays. A blob of an older layout is migrated on read; a blob of
an unknown or corrupt layout raises ``StateEncodingError`` naming the key.
Layout 7 ends each blob with a check (``check_of``: the CRC-32 of the bytes before
it, XOR their count), so a blob cut short, extended or with a changed byte is refused
instead of read as another record, and so is one whose version byte was changed.

Windows are rings of buckets at fixed resolutions (see docs/state.md):
10-minute and hourly buckets for the 1 h and 24 h windows, daily buckets for
7 d / 14 d / 30 d, weekly buckets for 90 d, and a 365-day ring of daily orders
and spend for the true 90 d / 365 d figures. Small counters saturate instead
of wrapping. Older layouts and their migration live in ``state.legacy``.
"""

from __future__ import annotations

from zlib import crc32

import numpy as np
from numba import njit

from crmstream.operators.events import NUM_EVENT_TYPES

LAYOUT_VERSION = 7
# Input roles whose applied positions each customer records (exactly-once).
ROLES: tuple[str, ...] = ("clickstream", "orders", "customers", "feedback")
ROLE_INDEX = {role: i for i, role in enumerate(ROLES)}

PREF_CATEGORIES = 32  # preference vector width: the taxonomy holds at most this many
# Window kinds. The 10-minute and hourly rings keep only the first two.
KIND_ACTIVITY, KIND_VIEWS, KIND_CARTS, KIND_SESSIONS, KIND_ORDERS = range(5)
WINDOW_KINDS = ("activity", "product_views", "cart_adds", "sessions", "orders")
SHORT_KINDS = 2
RING_10M, RING_1H, RING_1D, RING_1W = 6, 24, 30, 13
# Daily orders and spend: the 90 d and 365 d figures cover exactly their days.
RING_ORDERS = 365
SIGNALS = (
    "activity_drop",
    "login_drop",
    "cart_abandon",
    "purchase_overdue",
    "aov_swing",
    "returns",
    "negative_feedback",
    "delivery_delays",
    "contacted_too_often",
    "not_alive",
)
NUM_SIGNALS = len(SIGNALS)
STAGES = ("prospect", "new", "growing", "loyal", "at_risk", "dormant", "lost")
SEGMENTS = ("prospect", "regular", "potential", "high_value", "dormant", "high_clv")
TIERS = ("none", "silver", "gold")
CHURN_LEVELS = ("low", "medium", "high")

FLAG_HIGH_INTENT = 1  # the high-intent condition held at the last event
FLAG_CHURN_HIGH = 2  # churn is in the high band (with hysteresis)
FLAG_SHIFT_FIRED = 4  # interest shift fired since the last preference snapshot
FLAG_CART_1 = 8  # the first cart nudge is pending (due: last_cart_ms + its delay)
FLAG_CART_2 = 16  # the second cart nudge is pending

EMPTY_BASE = np.iinfo(np.int32).min

STATE_DTYPE = np.dtype(
    [
        ("version", np.uint8),
        ("rule_flags", np.uint8),  # FLAG_* bits
        ("stage", np.uint8),
        ("segment", np.uint8),
        ("tier", np.uint8),
        ("churn_level", np.uint8),
        ("streak_category", np.int8),  # category of the running product-view streak, -1 none
        ("neg_feedback", np.uint8),  # negative tickets and low reviews (saturating)
        ("delays", np.uint8),  # delivery delays and customs holds suffered (saturating)
        ("streak_len", np.uint16),
        ("purchase_days", np.uint16),  # distinct purchase days (BTYD: x = purchase_days - 1)
        ("first_seen_ms", np.int64),
        ("last_seen_ms", np.int64),
        # Highest input offset applied to this customer, per input role, and its partition.
        ("applied_partition", np.int32, (len(ROLES),)),
        ("applied_offset", np.int64, (len(ROLES),)),
        ("type_counts", np.uint16, (NUM_EVENT_TYPES,)),  # lifetime, saturating at 65535
        ("base_10m", np.int32),
        ("base_1h", np.int32),
        ("base_1d", np.int32),
        ("base_1w", np.int32),
        ("base_orders_1d", np.int32),  # newest day of orders_1d / spend_1d (layout 6)
        ("win_10m", np.uint8, (RING_10M, SHORT_KINDS)),
        ("win_1h", np.uint8, (RING_1H, SHORT_KINDS)),
        ("win_1d", np.uint8, (RING_1D, len(WINDOW_KINDS))),
        ("win_1w", np.uint16, (RING_1W, len(WINDOW_KINDS))),
        ("orders_1d", np.uint8, (RING_ORDERS,)),  # orders per day (saturating), layout 6
        ("spend_1d", np.float32, (RING_ORDERS,)),  # spend per day, base currency, layout 6
        ("orders_total", np.uint32),
        ("spend_total", np.float64),
        # Spend on the first purchase day (layout 6): Gamma-Gamma's mean spend per
        # repeat purchase day is (spend_total - first_day_spend) / (purchase_days - 1).
        ("first_day_spend", np.float64),
        ("last_order_amount", np.float32),
        ("first_purchase_day", np.int32),
        ("last_purchase_day", np.int32),
        ("purchase_day_bits", np.uint64),  # bit i: a purchase on last_purchase_day - i
        ("ipt_sq_sum", np.float64),  # sum of squared gaps between purchase days
        ("too_often_day", np.int32),  # last "contacted too often" (epoch day)
        ("pref_ref_ms", np.int64),  # time the preference vector is decayed to
        ("pref", np.float32, (PREF_CATEGORIES,)),
        ("pref_snap_day", np.int32),
        # The vector ~7 days ago, scaled to its largest entry = 255 (direction is what counts).
        ("pref_snap", np.uint8, (PREF_CATEGORIES,)),
        ("stage_since_ms", np.int64),
        ("prev_stage", np.uint8),
        ("last_cart_ms", np.int64),  # newest cart add (cart-abandoned timers check it)
        ("last_order_ms", np.int64),  # newest order placed
        # Policies: minute (epoch) each trigger type last went out, and the last sends.
        ("trigger_last_min", np.uint32, (16,)),
        ("sent_min", np.uint32, (8,)),
        # Duplicates: 64-bit hashes of the last DEDUP_IDS event ids, their event
        # times (epoch seconds) and the ring's next slot (layout 3).
        ("recent_ids", np.uint64, (8,)),
        ("recent_s", np.uint32, (8,)),
        ("recent_next", np.uint8),
        # The customer's pending churn recheck and birthday reminder (0: none) and
        # the birthday as month * 100 + day: one "wake" timer stands for both (layout 4).
        ("recheck_due_ms", np.int64),
        ("birthday_due_ms", np.int64),
        ("birthday_md", np.uint16),
        # Layout 5: the win-back step pending (N of dormant_<N>, anchored at
        # last_order_ms; 0: none) and the first order's time while potential
        # no-repeat is pending (0: none); pending cart nudges are FLAG_CART_* bits.
        ("dormant_days", np.uint16),
        ("potential_ref_ms", np.int64),
        # Layout 6: the value-model parameter set the stored labels were derived
        # with (0: the configuration's; state.model).
        ("model_version", np.uint16),
        # The customer's event-time clock (its newest event or fired timer: derived
        # labels are evaluated as of it and never move back), and the last candidate
        # that won priority arbitration: its time and trigger type (+1; 0 none).
        ("clock_ms", np.int64),
        ("arb_ms", np.int64),
        ("arb_type", np.uint8),
        ("reserved", np.uint8, (7,)),  # pads the record to whole 64-bit words (_pack)
    ]
)
STATE_BYTES = STATE_DTYPE.itemsize
DEDUP_IDS = 8

_VERSION_BYTE = bytes([LAYOUT_VERSION])
# Layout 6: layout 7's record and packing without the checksum (read, then rewritten).
_UNCHECKED_BYTE = bytes([6])
# Layout 7's trailer, little-endian: the CRC-32 of the blob before it XOR that blob's
# length. The length makes the check of a blob with bytes appended depend on its length:
# a bare CRC-32 of M || CRC(M) is one constant, so appending those 4 bytes would pass.
CHECK_BYTES = 4


class StateEncodingError(ValueError):
    """A stored state blob cannot be decoded."""


def check_of(body: bytes | memoryview) -> bytes:
    """Layout 7's trailer for ``body`` (the version byte and the tokens)."""
    return (crc32(body) ^ len(body)).to_bytes(CHECK_BYTES, "little")


def checks(blob: bytes) -> bool:
    """Whether ``blob`` ends in the layout-7 check of the bytes before it."""
    body = len(blob) - CHECK_BYTES
    return body >= 1 and check_of(memoryview(blob)[:body]) == blob[body:]


def fresh_records(
    n: int, dtype: np.dtype = STATE_DTYPE, version: int = LAYOUT_VERSION
) -> np.ndarray:
    """``n`` empty customer records of the current layout (or of an older ``dtype``:
    every field it has gets the same initial value)."""
    records = np.zeros(n, dtype=dtype)
    records["version"] = version
    initial = {
        "streak_category": -1,
        "applied_partition": -1,
        "applied_offset": -1,
        "first_seen_ms": np.iinfo(np.int64).max,
        "last_seen_ms": np.iinfo(np.int64).min,
        "pref_ref_ms": np.iinfo(np.int64).min,
        "clock_ms": np.iinfo(np.int64).min,
    }
    for name in (
        "base_10m", "base_1h", "base_1d", "base_1w", "base_30d", "base_orders_1d",
        "first_purchase_day", "last_purchase_day", "too_often_day", "pref_snap_day",
    ):  # fmt: skip
        initial[name] = EMPTY_BASE
    for name, value in initial.items():
        if name in dtype.names:
            records[name] = value
    return records


# Layouts 4 to 7 store a record packed: its bytes XOR a fresh record's (so a field
# still at its initial value becomes zeros), then runs of zeros squeezed out.
# Packed, after the version byte: tokens of (zeros, n, n literal bytes), each
# count one byte; zeros after the last token are implied. Layout 7 then appends
# CHECK_BYTES of check over the version byte and the tokens (``check_of``).
_TEMPLATE = np.frombuffer(fresh_records(1).tobytes(), np.uint8)
# _pack compares whole 64-bit words of a record with the template's.
assert STATE_BYTES % 8 == 0, f"pad STATE_DTYPE to a multiple of 8 bytes, not {STATE_BYTES}"
_TEMPLATE_WORDS = _TEMPLATE.view(np.uint64)
# The worst case (no zeros at all), its checksum included.
_MAX_PACKED = 1 + STATE_BYTES + 2 * (STATE_BYTES // 255 + 2) + CHECK_BYTES
_MIN_ZERO_RUN = 3  # shorter zero runs stay inside a literal (a token costs 2 bytes)


def _crc_tables() -> np.ndarray:
    """CRC-32's byte tables for slicing by 8 (zlib's CRC: reflected polynomial
    0xEDB88320): row 0 is the classic table, row k a byte's effect k bytes on."""
    tables = np.empty((8, 256), np.uint32)
    for n in range(256):
        c = n
        for _ in range(8):
            c = 0xEDB88320 ^ (c >> 1) if c & 1 else c >> 1
        tables[0, n] = c
    for k in range(1, 8):
        for n in range(256):
            prev = int(tables[k - 1, n])
            tables[k, n] = (prev >> 8) ^ int(tables[0, prev & 0xFF])
    return tables


_CRC_TABLES = _crc_tables()


@njit(cache=True, nogil=True)
def crc32_of(buf, start, end, t):  # pragma: no cover - compiled
    """CRC-32 of ``buf[start:end]`` (bytes), as ``zlib.crc32`` gives it, 8 bytes a turn."""
    c = np.uint32(0xFFFFFFFF)
    i = start
    while i + 8 <= end:
        one = c ^ (
            np.uint32(buf[i])
            | np.uint32(buf[i + 1]) << np.uint32(8)
            | np.uint32(buf[i + 2]) << np.uint32(16)
            | np.uint32(buf[i + 3]) << np.uint32(24)
        )
        c = (
            t[7, one & 0xFF]
            ^ t[6, (one >> np.uint32(8)) & 0xFF]
            ^ t[5, (one >> np.uint32(16)) & 0xFF]
            ^ t[4, one >> np.uint32(24)]
            ^ t[3, buf[i + 4]]
            ^ t[2, buf[i + 5]]
            ^ t[1, buf[i + 6]]
            ^ t[0, buf[i + 7]]
        )
        i += 8
    while i < end:
        c = t[0, (c ^ buf[i]) & 0xFF] ^ (c >> np.uint32(8))
        i += 1
    return c ^ np.uint32(0xFFFFFFFF)


@njit(cache=True, nogil=True)
def _pack(raw, words, template, template_words, out, ends, tables):  # pragma: no cover
    """Pack each row of ``raw`` (records as bytes; ``words``: the same as 64-bit words)
    into ``out``, each followed by its CRC-32; ``ends[i]`` is where row i ends."""
    width = raw.shape[1]
    pos = 0
    for r in range(raw.shape[0]):
        first = pos
        out[pos] = template[0]  # the version byte: this layout's
        pos += 1
        i = 1
        while i < width:
            start = i
            while i < width:  # bytes still at the template's value: 8 at a time where aligned
                if i & 7 == 0 and words[r, i >> 3] == template_words[i >> 3]:
                    i += 8
                elif raw[r, i] == template[i]:
                    i += 1
                else:
                    break
            if i == width:
                break  # trailing zeros are implied
            zeros = i - start
            while zeros > 255:
                out[pos] = 255
                out[pos + 1] = 0
                pos += 2
                zeros -= 255
            head = pos
            pos += 2
            n = 0
            while i < width and n < 255:
                run = 0  # a long enough zero run ends the literal
                while i + run < width and run < _MIN_ZERO_RUN:
                    if raw[r, i + run] != template[i + run]:
                        break
                    run += 1
                if run == _MIN_ZERO_RUN or i + run == width:
                    break
                out[pos] = raw[r, i] ^ template[i]
                pos += 1
                n += 1
                i += 1
            out[head] = zeros
            out[head + 1] = n
        crc = crc32_of(out, first, pos, tables) ^ np.uint32(pos - first)
        for b in range(4):  # CHECK_BYTES, little-endian
            out[pos + b] = (crc >> np.uint32(8 * b)) & 0xFF
        pos += 4
        ends[r] = pos


@njit(cache=True, nogil=True)
def _unpack(buf, starts, ends, rows, template, into, trailer, tables):  # pragma: no cover
    """Unpack blobs ``buf[starts[k]:ends[k]]`` into ``into[rows[k]]``, rows that hold
    the ``template`` (fresh records); returns the first corrupt blob's position in
    ``rows``, or -1. ``trailer``: 4 (CHECK_BYTES) when each blob ends in the check of
    the bytes before it (``check_of``), else 0."""
    width = into.shape[1]
    for k in range(starts.shape[0]):
        row = rows[k]
        end = ends[k] - trailer
        if end < starts[k] + 1:
            return k
        if trailer:
            stored = np.uint32(0)
            for b in range(4):
                stored |= np.uint32(buf[end + b]) << np.uint32(8 * b)
            if crc32_of(buf, starts[k], end, tables) ^ np.uint32(end - starts[k]) != stored:
                return k
        into[row, 0] = buf[starts[k]]
        pos, i = starts[k] + 1, 1
        while pos < end:
            if pos + 2 > end:
                return k
            i += buf[pos]
            n = buf[pos + 1]
            pos += 2
            if i + n > width or pos + n > end:
                return k
            for j in range(n):
                into[row, i + j] = buf[pos + j] ^ template[i + j]
            i += n
            pos += n
    return -1


def decode_batch(blobs: list[bytes | None], keys: list[str]) -> np.ndarray:
    """Decode a batch's blobs (None = new customer) into one structured array."""
    records = np.empty(len(blobs), STATE_DTYPE)
    records.view(np.uint8).reshape(len(blobs), STATE_BYTES)[:] = _TEMPLATE  # fresh records
    packed: list[int] = []
    unchecked: list[int] = []
    older: list[int] = []
    for i, blob in enumerate(blobs):
        if blob is None:
            continue
        head = blob[:1]
        if head == _VERSION_BYTE:
            packed.append(i)
        else:
            (unchecked if head == _UNCHECKED_BYTE else older).append(i)
    if packed:
        unpack_into(records, blobs, keys, packed, _TEMPLATE, CHECK_BYTES)
    for i in (*unchecked, *older):
        if checks(_VERSION_BYTE + blobs[i][1:]):
            raise StateEncodingError(
                f"state at {keys[i]!r} reads as layout {blobs[i][0]} but is a layout-"
                f"{LAYOUT_VERSION} blob ({len(blobs[i])} bytes) whose version byte was changed"
            )
    if unchecked:
        unpack_into(records, blobs, keys, unchecked, _TEMPLATE)
        records["version"][unchecked] = LAYOUT_VERSION
    if older:
        from crmstream.state import legacy  # only while blobs of older layouts remain

        legacy.migrate(blobs, keys, older, records)
    unsure = unchecked + older  # a layout-7 blob that checks was written by encode_records
    if unsure:
        check_ranges(records[unsure], [keys[i] for i in unsure])
    return records


def _index_ranges() -> tuple[tuple[str, int, int], ...]:
    """The fields whose value indexes a table or ring, with the values they may hold."""
    from crmstream.operators.policies import TRIGGER_TYPES  # it imports this module

    return (
        ("stage", 0, len(STAGES) - 1),
        ("prev_stage", 0, len(STAGES) - 1),
        ("segment", 0, len(SEGMENTS) - 1),
        ("tier", 0, len(TIERS) - 1),
        ("churn_level", 0, len(CHURN_LEVELS) - 1),
        ("streak_category", -1, PREF_CATEGORIES - 1),
        ("recent_next", 0, DEDUP_IDS - 1),
        ("arb_type", 0, len(TRIGGER_TYPES)),  # 0: none, else the type's index + 1
    )


def check_ranges(records: np.ndarray, keys: list[str]) -> None:
    """Raise StateEncodingError naming the first record's key (``keys[i]``: the key of
    ``records[i]``) whose index fields are out of range. A record read from a layout with
    no check can hold any byte; the kernels do not check bounds, so a ring cursor past
    its ring would write into the next customer's record, and a label past its table
    would fail later, less clearly."""
    ranges = _index_ranges()
    bad = np.zeros(len(records), bool)
    for name, lo, hi in ranges:
        column = records[name]
        bad |= (column < lo) | (column > hi)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        found = [
            f"{name} = {records[name][i]} (not in {lo}..{hi})"
            for name, lo, hi in ranges
            if not lo <= records[name][i] <= hi
        ]
        raise StateEncodingError(
            f"state at {keys[i]!r} holds a value out of range: {', '.join(found)}"
        )


def unpack_into(
    records: np.ndarray,
    blobs: list[bytes | None],
    keys: list[str],
    rows: list[int],
    template: np.ndarray,
    trailer: int = 0,
) -> None:
    """Unpack the packed blobs at ``rows`` into those rows of ``records`` (fresh records of
    the layout ``template``, a fresh record's bytes, is of); each row gets its blob's
    version byte. The last ``trailer`` bytes of each blob are not part of the record."""
    parts = [blobs[i] for i in rows]
    ends = np.cumsum([len(p) for p in parts])
    starts = ends - [len(p) for p in parts]
    buf = np.frombuffer(b"".join(parts), np.uint8)
    width = records.dtype.itemsize
    raw = records.view(np.uint8).reshape(len(records), width)
    bad = _unpack(buf, starts, ends, np.array(rows, np.int64), template, raw, trailer, _CRC_TABLES)
    if bad >= 0:
        blob = blobs[rows[bad]]
        why = ""
        if trailer and not checks(blob):
            why = ": its checksum does not match (cut short, extended or changed)"
        raise StateEncodingError(
            f"state at {keys[rows[bad]]!r} is a corrupt layout-{blob[0]} blob "
            f"({len(blob)} bytes){why}"
        )


def encode_records(records: np.ndarray) -> list[bytes]:
    """One packed blob per record, each ending in its CRC-32 (layout 7)."""
    n = len(records)
    raw = np.ascontiguousarray(records).view(np.uint8).reshape(n, STATE_BYTES)
    out = np.empty(n * _MAX_PACKED, np.uint8)
    ends = np.empty(n, np.int64)
    _pack(raw, raw.view(np.uint64), _TEMPLATE, _TEMPLATE_WORDS, out, ends, _CRC_TABLES)
    data = out[: ends[-1]].tobytes() if n else b""
    bounds = [0, *ends.tolist()]
    return [data[bounds[i] : bounds[i + 1]] for i in range(n)]
