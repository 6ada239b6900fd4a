"""Dead letters: the envelope of an input message that failed validation or processing.

This module owns the dead-letter record (docs/events.md, "dead letters"): the
reason, the field, the source position and the original bytes, with e-mail
addresses and phone numbers replaced by their keyed hashes.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

import orjson

from crmstream.operators.events import InvalidEvent

DEAD_LETTER_SCHEMA_VERSION = 1


def dead_letter_record(bad: InvalidEvent, redact: Callable[[bytes], bytes]) -> bytes:
    """The dead-letter envelope: reason, field, source position and the original bytes,
    with e-mail addresses and phone numbers replaced by their keyed hashes."""
    original = redact(bad.value or b"")
    try:
        text: str | None = original.decode("utf-8") if len(original) <= 4096 else None
    except UnicodeDecodeError:
        text = None
    return orjson.dumps(
        {
            "schema_version": DEAD_LETTER_SCHEMA_VERSION,
            "reason": redact(bad.reason.encode()).decode("utf-8", "replace"),
            "field": bad.field,
            "customer_id": bad.customer_id,
            "source": {"topic": bad.topic, "partition": bad.partition, "offset": bad.offset},
            "original_base64": base64.b64encode(original).decode("ascii"),
            "original_text": text,
        }
    )
