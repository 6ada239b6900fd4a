"""Dead-letter records: what a dead letter says, and what it keeps of what it stands for.

This module owns the dead-letter record (docs/events.md, "dead letters"): the
envelope of a rejected input message (reason, field, customer, source
position) and of an outgoing record that cannot be sent (``unsendable_record``:
a trigger, suppression or dead letter over the producer's
``message.max.bytes`` or refused by the broker). Each keeps a bounded copy of
what it stands for: at most ``processing.dead_letter_max_original_bytes`` of
the redacted copy (operators/redaction.py), with the original's length and
SHA-256, so that a message of any size gives a dead letter the producer
accepts (issue 34: a 0.75 MB message's dead letter, its bytes in base64, was
refused at every start).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
from typing import Any

import orjson

from crmstream.operators.events import InvalidEvent, is_customer_id
from crmstream.operators.redaction import Redacted, Redactor

DEAD_LETTER_SCHEMA_VERSION = 2  # 2: original_* fields; the copy is bounded and redacted
TEXT_BYTES = 4096  # original_text is given for copies up to this size
# A dead letter without its copy: reason (a few hundred bytes), customer id (128
# characters, up to 6 bytes each once escaped), source, hashes, dropped field names.
ENVELOPE_BYTES = 8192


def dead_letter_bytes(copy_bytes: int) -> int:
    """The most a dead letter keeping ``copy_bytes`` of a copy can take: the copy in
    base64 (4 bytes for 3), ``original_text`` with every byte escaped (6 each) while
    it is given, and the envelope."""
    return -(-copy_bytes * 4 // 3) + 6 * min(copy_bytes, TEXT_BYTES) + ENVELOPE_BYTES


def dead_letter_record(bad: InvalidEvent, redact: Redactor) -> bytes:
    """The dead letter of a rejected input message (docs/events.md)."""
    value = bad.value or b""
    copy = redact.redact(value)
    return orjson.dumps(
        {
            "schema_version": DEAD_LETTER_SCHEMA_VERSION,
            "reason": redact.reason(bad.reason),
            "field": bad.field,
            "customer_id": bad.customer_id,
            "source": {"topic": bad.topic, "partition": bad.partition, "offset": bad.offset},
            **original_fields(value, copy, redact.max_original_bytes),
        }
    )


def original_fields(value: bytes, copy: Redacted, limit: int) -> dict[str, Any]:
    """The ``original_*`` fields: the copy cut to ``limit`` bytes, and the original's
    length and SHA-256.

    The SHA-256 lets whoever holds the original match it. It is left out (null)
    when the whole copy is shown redacted: with everything but the hidden values
    in view, an unkeyed hash would let anyone confirm a guess of them (an address
    from a list). A cut copy hides the rest of the message, so it keeps the hash.
    """
    kept = copy.copy[:limit]
    truncated = len(copy.copy) > limit
    text = None
    if len(kept) <= TEXT_BYTES:
        with contextlib.suppress(UnicodeDecodeError):  # not UTF-8: base64 only
            text = kept.decode("utf-8")
    return {
        "original_bytes": len(value),
        "original_sha256": (
            hashlib.sha256(value).hexdigest() if truncated or not copy.changed else None
        ),
        "original_copy": copy.form,
        "original_truncated": truncated,
        "dropped_fields": sorted(set(copy.dropped)),
        "original_base64": base64.b64encode(kept).decode("ascii"),
        "original_text": text,
    }


def unsendable_record(
    topic: str, key: bytes | None, value: bytes, why: str, copy_bytes: int, record_limit: int
) -> tuple[bytes | None, bytes]:
    """The dead letter (key, value) that stands for an outgoing record that cannot be
    sent: the topic it was for, why, its length, SHA-256 and first ``copy_bytes``
    bytes, fewer if the dead letter would not fit ``record_limit`` (key and value
    bytes the producer accepts). The content is crmstream's own output: triggers
    and suppressions hold no personal data in clear, dead letters are redacted."""
    customer = key.decode("utf-8", "replace") if key is not None and len(key) <= 512 else None
    customer = customer if is_customer_id(customer) else None
    out_key = None if customer is None else key
    while True:
        record = orjson.dumps(
            {
                "schema_version": DEAD_LETTER_SCHEMA_VERSION,
                "reason": f"a record for topic {topic!r} was not sent: {why}",
                "field": None,
                "customer_id": customer,
                "source": None,
                "unsent": {"topic": topic, "key_bytes": None if key is None else len(key)},
                **original_fields(value, Redacted(value, "exact", []), copy_bytes),
            }
        )
        if copy_bytes == 0 or len(record) + len(out_key or b"") <= record_limit:
            return out_key, record
        copy_bytes //= 2
