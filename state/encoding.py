"""The compact, versioned binary layout of one customer's hot state.

This module owns the bytes stored under a customer's state key: a NumPy
structured dtype whose first byte is the layout version. ``decode_batch`` turns
the blobs of a whole batch into one structured array (missing customers become
fresh records) and ``encode_records`` turns it back into bytes, so the kernels
only ever see arrays. A blob of an older layout is migrated on read; a blob of
an unknown or corrupt layout raises ``StateEncodingError`` naming the key.
"""

from __future__ import annotations

import numpy as np

from crmstream.operators.events import NUM_EVENT_TYPES

LAYOUT_VERSION = 1
# Input roles whose applied positions each customer records (exactly-once).
ROLES: tuple[str, ...] = ("clickstream", "orders", "customers", "feedback")
ROLE_INDEX = {role: i for i, role in enumerate(ROLES)}
RING_DAYS = 32  # daily buckets; windows of up to 32 days read from them

FLAG_HIGH_INTENT_FIRED = 1  # bit 0: the high-intent condition held at the last event

STATE_DTYPE = np.dtype(
    [
        ("version", np.uint8),
        ("flags", np.uint8),
        ("streak_category", np.int16),  # category of the running product-view streak, -1 none
        ("streak_len", np.uint16),
        ("_reserved", np.uint16),
        ("first_seen_ms", np.int64),
        ("last_seen_ms", np.int64),
        # Highest input offset applied to this customer, per input role.
        # Producers key events by customer, so one role maps to one partition.
        ("applied_partition", np.int32, (len(ROLES),)),
        ("applied_offset", np.int64, (len(ROLES),)),
        ("type_counts", np.uint32, (NUM_EVENT_TYPES,)),  # lifetime counts per event type
        ("ring_base_day", np.int32),  # newest event day (epoch days) in the ring
        ("ring_views", np.uint16, (RING_DAYS,)),
        ("ring_carts", np.uint16, (RING_DAYS,)),
        ("ring_orders", np.uint16, (RING_DAYS,)),
    ]
)
STATE_BYTES = STATE_DTYPE.itemsize


class StateEncodingError(ValueError):
    """A stored state blob cannot be decoded."""


def fresh_records(n: int) -> np.ndarray:
    """``n`` empty customer records of the current layout."""
    records = np.zeros(n, dtype=STATE_DTYPE)
    records["version"] = LAYOUT_VERSION
    records["streak_category"] = -1
    records["applied_partition"] = -1
    records["applied_offset"] = -1
    records["first_seen_ms"] = np.iinfo(np.int64).max
    records["ring_base_day"] = np.iinfo(np.int32).min
    return records


def decode_batch(blobs: list[bytes | None], keys: list[str]) -> np.ndarray:
    """Decode a batch's blobs (None = new customer) into one structured array."""
    records = fresh_records(len(blobs))
    for i, blob in enumerate(blobs):
        if blob is None:
            continue
        if len(blob) == STATE_BYTES and blob[0] == LAYOUT_VERSION:
            records[i] = np.frombuffer(blob, dtype=STATE_DTYPE)[0]
        else:
            records[i] = _migrate(blob, keys[i])
    return records


def _migrate(blob: bytes, key: str) -> np.ndarray:
    version = blob[0] if blob else None
    # Layout 1 is the first; later layouts register their migrations here.
    raise StateEncodingError(
        f"state at {key!r} has layout version {version!r} and {len(blob)} bytes; "
        f"this build reads layout {LAYOUT_VERSION} ({STATE_BYTES} bytes)"
    )


def encode_records(records: np.ndarray) -> list[bytes]:
    """One blob per record."""
    raw = records.tobytes()
    return [raw[i : i + STATE_BYTES] for i in range(0, len(raw), STATE_BYTES)]
