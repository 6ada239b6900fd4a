"""Checks of single fields of input events, each failure worded with the field and value.

This module owns the field-level rules of docs/events.md that do not depend on
the configuration: ids and the customer-id alphabet, numbers in range, choices,
times (epoch ms or ISO-8601), country codes, caller-supplied hashes, and how a
rejected value is shown in a reason (``show``: bounded in size and depth); and
``Limits``, the bounds the configuration sets, derived once for both ways of
parsing. ``operators.events`` combines them per event type.
"""

from __future__ import annotations

import math
import re
import reprlib
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from crmstream.config import CrmConfig

MAX_ID_LEN = 128
MAX_QUERY_LEN = 1024  # search text: no rule reads it, but every string has a bound
MAX_LANGUAGE_LEN = 35  # RFC 5646 4.4.1: the length every implementation should accept
MAX_QUANTITY = 1e6
MAX_ISO_LEN = 40  # "2026-01-01T00:00:00.123456789+00:00" is 35
# A caller may send its own keyed hashes: stored only in the format ours have.
HASH_FIELDS = ("email_hash", "phone_hash")
HASH_FORMAT = re.compile(r"[0-9a-f]{32}")
LANGUAGE = re.compile(r"[A-Za-z]{2,8}(?:-[A-Za-z0-9]{1,8})*")
MONTH_DAY = re.compile(r"[0-9]{2}-[0-9]{2}")


def is_customer_id(value: Any) -> bool:
    """The customer-id alphabet (docs/events.md): 1-128 printable characters (letters,
    marks, numbers, punctuation, symbols and the ASCII space: no control, format,
    separator or private-use characters, ``str.isprintable``), not starting with "}",
    which would end the ``{customer}`` hash tag of the customer's Redis keys empty and
    scatter them over Redis Cluster slots."""
    return (
        type(value) is str
        and 0 < len(value) <= MAX_ID_LEN
        and value.isprintable()
        and value[0] != "}"
    )


class FieldError(Exception):
    """A field (None: the message as a whole) failed a check; the message says how."""

    def __init__(self, field: str | None, message: str):
        super().__init__(message)
        self.field = field
        self.message = message


def is_country(value: Any) -> bool:
    """An ISO 3166 alpha-2 code as accepted: two upper-case ASCII letters."""
    return (
        type(value) is str
        and len(value) == 2
        and value.isascii()
        and value.isalpha()  # "D\x00".isupper() is true
        and value.isupper()
    )


def is_month_day(value: Any) -> bool:
    """A birthday as accepted: "MM-DD", a day of the (leap) year 2000."""
    if type(value) is not str or MONTH_DAY.fullmatch(value) is None:
        return False
    try:
        datetime(2000, int(value[:2]), int(value[3:]))
    except ValueError:
        return False
    return True


def is_language(value: Any) -> bool:
    """A BCP-47 language tag as accepted (its shape, up to ``MAX_LANGUAGE_LEN``)."""
    return (
        type(value) is str
        and len(value) <= MAX_LANGUAGE_LEN
        and LANGUAGE.fullmatch(value) is not None
    )


# Bounded in depth and size: the repr of a 1,000-deep list would raise RecursionError.
_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 2, 60, 60, 40


def show(value: Any) -> str:
    text = _REPR.repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def id_field(obj: dict[str, Any], name: str) -> str:
    value = obj.get(name)
    if value is None:
        raise FieldError(name, f"field {name!r} is required")
    if type(value) is not str or not value or len(value) > MAX_ID_LEN:
        raise FieldError(
            name, f"field {name!r} must be a string of 1..{MAX_ID_LEN} chars, got {show(value)}"
        )
    return value


def number(obj: dict[str, Any], name: str, lo: float, hi: float) -> float:
    value = obj.get(name)
    if type(value) not in (int, float) or not math.isfinite(value) or not lo <= value <= hi:
        raise FieldError(
            name, f"field {name!r} must be a number in [{lo:g}, {hi:g}], got {show(value)}"
        )
    return float(value)


def choice(obj: dict[str, Any], name: str, allowed: frozenset[str], required: bool) -> None:
    value = obj.get(name)
    if value is None and not required:
        return
    if type(value) is not str or value not in allowed:  # a list or object is unhashable
        raise FieldError(
            name, f"field {name!r} must be one of {sorted(allowed)}, got {show(value)}"
        )


def parse_time_ms(value: Any, name: str = "event_time") -> int:
    """Epoch milliseconds (int) or ISO-8601 with a UTC offset -> epoch ms."""
    if type(value) is int:
        return value
    if type(value) is str:
        # Python's fromisoformat takes any character between the date and the time,
        # a NUL included: ISO-8601 text is short printable ASCII.
        if not (len(value) <= MAX_ISO_LEN and value.isascii() and value.isprintable()):
            raise FieldError(name, f"field {name!r} is not ISO-8601, got {show(value)}")
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise FieldError(name, f"field {name!r} is not ISO-8601, got {show(value)}") from None
        if parsed.tzinfo is None:
            raise FieldError(name, f"field {name!r} needs a UTC offset, got {show(value)}")
        return int(parsed.timestamp() * 1000)
    raise FieldError(
        name,
        f"field {name!r} must be epoch milliseconds (integer) or ISO-8601 text, got {show(value)}",
    )


def check_hash(obj: dict[str, Any], name: str) -> None:
    """A caller's own ``email_hash`` / ``phone_hash`` is kept only in our hashes' format
    (32 lower-case hex characters); the value is never shown, it may be an address."""
    value = obj[name]
    if value is not None and (type(value) is not str or HASH_FORMAT.fullmatch(value) is None):
        shown = f"{len(value)} characters" if type(value) is str else type(value).__name__
        raise FieldError(
            name,
            f"field {name!r} must be 32 lower-case hex characters (a keyed hash: send "
            f"'{name[:-5]}' to have it hashed), got {shown} (not shown)",
        )


class Limits(NamedTuple):
    """What the configuration allows of an event, derived once: the checked way and the
    fast paths (``operators.fast_paths``) read the same."""

    category_index: dict[str, int]  # taxonomy category -> its index
    rates: dict[str, float]  # currency -> rate to the base currency
    min_time_ms: int  # event times before this are refused
    max_skew_ms: int  # ... and after the batch's clock plus this
    promise_before_ms: int  # promised delivery times this long before the event refused
    promise_after_ms: int  # ... and this long after it

    @classmethod
    def of(cls, config: CrmConfig) -> Limits:
        processing = config.processing
        return cls(
            {c: i for i, c in enumerate(config.taxonomy.categories)},
            dict(config.currency.rates),
            processing.min_event_time_ms,
            processing.max_future_skew_seconds * 1000,
            processing.promised_delivery_max_days_before * 86_400_000,
            processing.promised_delivery_max_days_after * 86_400_000,
        )
