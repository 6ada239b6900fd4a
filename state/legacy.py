"""Older state layouts (1 to 5) and their migration to the current one.

This module owns the frozen definitions of every earlier layout and the
reading of their blobs. ``state.encoding.decode_batch`` hands it the blobs
whose version byte is not the current layout's; each is read into a layout-5
record (layouts 4 and 5 are packed against a fresh layout-5 record, layouts 1
to 3 are plain records), and ``upgrade_v5`` turns those into current records.
Nothing here is on the hot path once a store has been rewritten.

Layout 6 replaced layout 5's 30-day buckets of orders and spend (13 buckets
aligned to the epoch, so a "90 d" window covered 61 to 90 days) with a
365-day ring of daily orders and spend. A bucket's days are not known, so
each bucket's orders and spend are put on the latest purchase day the
64-day purchase-day bitmap knows inside that bucket, else on the bucket's last
day not after the customer's last purchase day. The true 90 d and 365 d
figures of a migrated customer are therefore exact only for the orders after
the migration (within 30 days for older ones) until a year has passed.
Layout 6 also keeps the first purchase day's spend; for a migrated customer
with more than one purchase day it is estimated as the average order value.
"""

from __future__ import annotations

import numpy as np

from crmstream.operators.events import NUM_EVENT_TYPES
from crmstream.state.encoding import (
    EMPTY_BASE,
    KIND_CARTS,
    KIND_ORDERS,
    KIND_VIEWS,
    LAYOUT_VERSION,
    PREF_CATEGORIES,
    RING_1D,
    RING_1H,
    RING_1W,
    RING_10M,
    RING_ORDERS,
    ROLES,
    SHORT_KINDS,
    STATE_DTYPE,
    WINDOW_KINDS,
    StateEncodingError,
    fresh_records,
    unpack_into,
)

RING_30D = 13  # layout 5's 30-day buckets of orders and spend

STATE_DTYPE_V5 = np.dtype(
    [
        ("version", np.uint8),
        ("rule_flags", np.uint8),
        ("stage", np.uint8),
        ("segment", np.uint8),
        ("tier", np.uint8),
        ("churn_level", np.uint8),
        ("streak_category", np.int8),
        ("neg_feedback", np.uint8),
        ("delays", np.uint8),
        ("streak_len", np.uint16),
        ("purchase_days", np.uint16),
        ("first_seen_ms", np.int64),
        ("last_seen_ms", np.int64),
        ("applied_partition", np.int32, (len(ROLES),)),
        ("applied_offset", np.int64, (len(ROLES),)),
        ("type_counts", np.uint16, (NUM_EVENT_TYPES,)),
        ("base_10m", np.int32),
        ("base_1h", np.int32),
        ("base_1d", np.int32),
        ("base_1w", np.int32),
        ("base_30d", np.int32),
        ("win_10m", np.uint8, (RING_10M, SHORT_KINDS)),
        ("win_1h", np.uint8, (RING_1H, SHORT_KINDS)),
        ("win_1d", np.uint8, (RING_1D, len(WINDOW_KINDS))),
        ("win_1w", np.uint16, (RING_1W, len(WINDOW_KINDS))),
        ("orders_30d", np.uint8, (RING_30D,)),
        ("spend_30d", np.float32, (RING_30D,)),
        ("orders_total", np.uint32),
        ("spend_total", np.float64),
        ("last_order_amount", np.float32),
        ("first_purchase_day", np.int32),
        ("last_purchase_day", np.int32),
        ("purchase_day_bits", np.uint64),
        ("ipt_sq_sum", np.float64),
        ("too_often_day", np.int32),
        ("pref_ref_ms", np.int64),
        ("pref", np.float32, (PREF_CATEGORIES,)),
        ("pref_snap_day", np.int32),
        ("pref_snap", np.uint8, (PREF_CATEGORIES,)),
        ("stage_since_ms", np.int64),
        ("prev_stage", np.uint8),
        ("last_cart_ms", np.int64),
        ("last_order_ms", np.int64),
        ("trigger_last_min", np.uint32, (16,)),
        ("sent_min", np.uint32, (8,)),
        ("recent_ids", np.uint64, (8,)),
        ("recent_s", np.uint32, (8,)),
        ("recent_next", np.uint8),
        ("recheck_due_ms", np.int64),
        ("birthday_due_ms", np.int64),
        ("birthday_md", np.uint16),
        ("dormant_days", np.uint16),
        ("potential_ref_ms", np.int64),
    ]
)
# Layout 4: layout 5 without the fields after ``birthday_md`` (and the cart bits).
STATE_DTYPE_V4 = np.dtype(STATE_DTYPE_V5.descr[: STATE_DTYPE_V5.names.index("birthday_md") + 1])
# Layout 3: layout 4 without the wake-up fields, stored unpacked.
STATE_DTYPE_V3 = np.dtype(
    [
        d
        for d in STATE_DTYPE_V4.descr
        if d[0] not in ("recheck_due_ms", "birthday_due_ms", "birthday_md")
    ]
)
# Layout 2 (state model): layout 3 without the duplicate ring.
STATE_DTYPE_V2 = np.dtype(
    [d for d in STATE_DTYPE_V3.descr if d[0] not in ("recent_ids", "recent_s", "recent_next")]
)
# Layout 1 (foundation): kept to migrate blobs written before layout 2.
STATE_DTYPE_V1 = np.dtype(
    [
        ("version", np.uint8),
        ("flags", np.uint8),
        ("streak_category", np.int16),
        ("streak_len", np.uint16),
        ("_reserved", np.uint16),
        ("first_seen_ms", np.int64),
        ("last_seen_ms", np.int64),
        ("applied_partition", np.int32, (4,)),
        ("applied_offset", np.int64, (4,)),
        ("type_counts", np.uint32, (NUM_EVENT_TYPES,)),
        ("ring_base_day", np.int32),
        ("ring_views", np.uint16, (32,)),
        ("ring_carts", np.uint16, (32,)),
        ("ring_orders", np.uint16, (32,)),
    ]
)

# Layout 4 is a prefix of layout 5 with the same initial values, so its packed
# blobs unpack into a layout-5 record as they are (the later fields stay at 0).
_TEMPLATE_V5 = np.frombuffer(fresh_records(1, STATE_DTYPE_V5, 5).tobytes(), np.uint8)
_PACKED_V5 = (bytes([4]), bytes([5]))


def migrate(blobs: list[bytes | None], keys: list[str], rows: list[int], into: np.ndarray) -> None:
    """Read the older-layout blobs at ``rows`` into those rows of ``into`` (fresh
    current records).

    :raises StateEncodingError: naming the key of a blob of no known layout, of a
        packed blob that does not fit its layout, or of one whose fields do not fit
        the current layout (a value out of its field's range).
    """
    try:
        _migrate(blobs, keys, rows, into)
    except StateEncodingError:
        raise
    except (ArithmeticError, ValueError, IndexError, TypeError):
        for i in rows:  # which one: each on its own
            try:
                _migrate(blobs, keys, [i], into)
            except StateEncodingError:
                raise
            except (ArithmeticError, ValueError, IndexError, TypeError) as error:
                raise StateEncodingError(
                    f"state at {keys[i]!r} is a layout-{blobs[i][0]} blob "
                    f"({len(blobs[i])} bytes) that does not read as one: "
                    f"{type(error).__name__}: {error}"
                ) from error
        raise


def _migrate(blobs: list[bytes | None], keys: list[str], rows: list[int], into: np.ndarray) -> None:
    old = fresh_records(len(blobs), STATE_DTYPE_V5, 5)
    packed = [i for i in rows if blobs[i][:1] in _PACKED_V5]
    if packed:
        unpack_into(old, blobs, keys, packed, _TEMPLATE_V5)
    for i in rows:
        if blobs[i][:1] not in _PACKED_V5:
            _read_plain(blobs[i], keys[i], old[i : i + 1])
    into[rows] = upgrade_v5(old[rows])


def upgrade_v5(old: np.ndarray) -> np.ndarray:
    """Layout-5 records as current records (module docstring: what is estimated)."""
    new = fresh_records(len(old))
    for name in STATE_DTYPE_V5.names:
        if name in STATE_DTYPE.names and name != "version":
            new[name] = old[name]
    for k in range(len(old)):
        _buckets_to_days(old[k], new[k : k + 1])
        days, orders = int(old["purchase_days"][k]), int(old["orders_total"][k])
        if days == 1:
            new["first_day_spend"][k] = old["spend_total"][k]
        elif days > 1 and orders > 0:
            new["first_day_spend"][k] = old["spend_total"][k] / orders
    return new


def _buckets_to_days(old: np.void, new: np.ndarray) -> None:
    """Layout 5's 30-day buckets of orders and spend onto the daily ring of ``new``."""
    base = int(old["base_30d"])
    if base == EMPTY_BASE:
        return
    last = int(old["last_purchase_day"])
    known = []  # purchase days the 64-day bitmap knows, newest first
    if last != EMPTY_BASE:
        bits = int(old["purchase_day_bits"])
        known = [last - i for i in range(64) if bits >> i & 1]
    placed: dict[int, tuple[int, float]] = {}
    for month in range(base - RING_30D + 1, base + 1):
        slot = month % RING_30D
        orders, spend = int(old["orders_30d"][slot]), float(old["spend_30d"][slot])
        if orders == 0 and spend == 0:
            continue
        first, final = month * 30, month * 30 + 29
        inside = [d for d in known if first <= d <= final]
        day = inside[0] if inside else max(first, min(final, last))
        placed[day] = (orders, spend)
    if not placed:  # every bucket empty (the ring moved on past the last order)
        return
    newest = max(placed)
    for day, (orders, spend) in placed.items():
        if day > newest - RING_ORDERS:
            new["orders_1d"][0, day % RING_ORDERS] = min(orders, 255)
            new["spend_1d"][0, day % RING_ORDERS] = spend
    new["base_orders_1d"] = newest


def _read_plain(blob: bytes, key: str, into: np.ndarray) -> None:
    """Read an unpacked layout-1, -2 or -3 blob into ``into`` (a fresh layout-5 record)."""
    for version, dtype in ((3, STATE_DTYPE_V3), (2, STATE_DTYPE_V2)):
        if len(blob) == dtype.itemsize and blob[0] == version:
            old = np.frombuffer(blob, dtype=dtype)[0]
            for name in dtype.names:
                if name != "version":
                    into[name] = old[name]
            return
    if len(blob) == STATE_DTYPE_V1.itemsize and blob[0] == 1:
        old = np.frombuffer(blob, dtype=STATE_DTYPE_V1)[0]
        for name in (
            "streak_len",
            "first_seen_ms",
            "last_seen_ms",
            "applied_partition",
            "applied_offset",
        ):
            into[name] = old[name]
        into["rule_flags"] = old["flags"] & 1
        into["streak_category"] = old["streak_category"]
        into["type_counts"] = np.minimum(old["type_counts"], 65535)
        # Layout 1 kept a 32-day ring of views, carts and orders; carry it over by day.
        base = int(old["ring_base_day"])
        if base != EMPTY_BASE:
            into["base_1d"] = base
            for day in range(base - RING_1D + 1, base + 1):
                new_slot, old_slot = day % RING_1D, day % 32
                for kind, ring in (
                    (KIND_VIEWS, "ring_views"),
                    (KIND_CARTS, "ring_carts"),
                    (KIND_ORDERS, "ring_orders"),
                ):
                    into["win_1d"][0][new_slot, kind] = min(int(old[ring][old_slot]), 255)
        return
    version = blob[0] if blob else None
    raise StateEncodingError(
        f"state at {key!r} has layout version {version!r} and {len(blob)} bytes; "
        f"this build reads layouts 1 to {LAYOUT_VERSION}"
    )
