"""Structure-aware messages for the fuzz suites: every field of every event type, damaged.

For every field of every event type (docs/events.md) a value of a wrong type,
out of range, huge, empty or holding control characters, any of them written
with JSON escapes; and damage to the message as a whole: sizes around the
limits (``processing.max_event_bytes`` and the producer's
``message.max.bytes``), invalid UTF-8, a byte-order mark, duplicate keys, deep
nesting, truncation, keys near the producer's limit. Each message comes with
its fate as the contract states it, not as the validator decides: ``bad`` ones
must be dead-lettered (naming ``field`` where one field was damaged), the
others are valid events written oddly and must be applied.
"""

from __future__ import annotations

import json
import random
from typing import Any, NamedTuple

from hypothesis import strategies as st

from crmstream.operators.events import TOPIC_ROLE_TYPES

T0 = 1_767_225_600_000  # 2026-01-01T00:00:00Z
DAY = 86_400_000
EMAIL, NAME = "Pii.Planted@Example.COM", "Ada Lovelace"
ROLE_OF = {t: role for role, types in TOPIC_ROLE_TYPES.items() for t in types}
PRODUCT = ("product_view", "favourite", "add_to_cart", "remove_from_cart")


class Raw(NamedTuple):
    """JSON text written as it is (NaN, 1e999, a lone surrogate's escape, ...)."""

    text: str


class Pairs(NamedTuple):
    """An object written with these key/value pairs, in order, keys repeated at will."""

    pairs: list[tuple[str, Any]]


class Message(NamedTuple):
    role: str
    key: bytes | None
    value: bytes
    bad: bool
    field: str | None  # the field a bad message's dead letter must name; None: any
    label: str  # what was done, for the printed tally


def template(event_type: str, customer: str, at_ms: int, n: int) -> dict[str, Any]:
    """A valid event of the type with every field the type reads."""
    body: dict[str, Any] = {
        "event_id": f"{customer}-{n}",
        "customer_id": customer,
        "event_type": event_type,
        "event_time": at_ms,
    }
    if ROLE_OF[event_type] == "clickstream":
        body |= {"channel": "app", "country": "DE"}
    if event_type in PRODUCT:
        body |= {"product_id": f"p{n % 7}", "category": "beauty", "price": 19.5, "currency": "EUR"}
    elif event_type in ("page_view", "share"):
        body["category"] = "toys"
    elif event_type == "search":
        body |= {"category": "shoes", "query": "red shoes"}
    elif event_type == "checkout_started":
        body |= {"price": 40.0, "currency": "USD"}
    elif event_type in ("order_placed", "order_paid", "order_refunded"):
        item = {"product_id": "p1", "category": "beauty", "price": 30.0, "quantity": 1}
        body |= {"order_id": f"o-{customer}", "amount": 30.0, "currency": "USD", "items": [item]}
    elif event_type == "order_shipped":
        body |= {"order_id": f"o-{customer}", "promised_delivery_time": at_ms + 2 * DAY}
    elif event_type in ("order_cancelled", "order_delivered", "order_returned"):
        body["order_id"] = f"o-{customer}"
    elif event_type == "logistics_update":
        body |= {"order_id": f"o-{customer}", "status": "customs_hold"}
    elif event_type == "profile_updated":
        body |= {"country": "JP", "timezone": "Asia/Tokyo", "language": "ja-JP",
                 "birthday": "01-20", "preferred_channel": "email"}  # fmt: skip
    elif event_type in ("consent_granted", "consent_withdrawn"):
        body["channel"] = "push"
    elif event_type == "recommendation_dismissed":
        body["category"] = "toys"
    elif event_type == "service_ticket":
        body["sentiment"] = -0.8
    elif event_type == "product_review":
        body |= {"product_id": "p1", "rating": 1}
    return body


# One customer's story: every event type, with timers pending at its end (cart nudges,
# a delivery delay, a birthday, win-back steps), fired by ``clock_events``.
STORY = (
    "profile_updated", "consent_granted", "page_view", "product_view", "product_view",
    "product_view", "search", "favourite", "add_to_cart", "remove_from_cart", "add_to_cart",
    "share", "session_start", "checkout_started", "order_placed", "order_paid",
    "order_shipped", "logistics_update", "recommendation_dismissed", "contacted_too_often",
    "service_ticket", "product_review", "order_returned", "order_refunded", "order_cancelled",
    "consent_withdrawn", "order_delivered",
)  # fmt: skip


def base_events(customers: int) -> list[Message]:
    """The valid stream every fuzz run carries: each customer's story, interleaved."""
    out = []
    for step, kind in enumerate(STORY):
        for i in range(customers):
            customer = f"c{i:03d}"
            if kind == "order_delivered" and i % 2:
                continue  # never delivered: a delivery-delay trigger is due later
            if kind == "consent_withdrawn" and i % 3:
                continue
            at = T0 + i * 7_000 + step * 60_000
            body = template(kind, customer, at, step)
            out.append(Message(ROLE_OF[kind], customer.encode(), render(body), False, None, kind))
    for i in range(0, customers, 7):  # some erased, with their timers pending
        customer = f"c{i:03d}"
        body = template("erasure_requested", customer, T0 + DAY // 2, 99)
        out.append(Message("customers", customer.encode(), render(body), False, None, "erasure"))
    return out


def clock_events(days: int) -> list[Message]:
    """A later event that moves the watermark past the pending timers."""
    body = template("session_start", "clock", T0 + days * DAY, 0)
    return [Message("clickstream", b"clock", render(body), False, None, "clock")]


def render(value: Any, escape: float = 0.0, rng: random.Random | None = None) -> bytes:
    """JSON text of ``value`` (``Raw`` and ``Pairs`` as they say), each character of a
    string written as a \\uXXXX escape with probability ``escape``."""
    rng = rng or random.Random(0)
    return _text(value, escape, rng).encode("utf-8", "surrogatepass")


def _text(value: Any, escape: float, rng: random.Random) -> str:
    if isinstance(value, Raw):
        return value.text
    if isinstance(value, dict):
        value = Pairs(list(value.items()))
    if isinstance(value, Pairs):
        inner = ",".join(
            f"{_string(k, escape, rng)}:{_text(v, escape, rng)}" for k, v in value.pairs
        )
        return "{" + inner + "}"
    if isinstance(value, list):
        return "[" + ",".join(_text(v, escape, rng) for v in value) + "]"
    if isinstance(value, str):
        return _string(value, escape, rng)
    return json.dumps(value)


def _string(text: str, escape: float, rng: random.Random) -> str:
    out = []
    for c in text:
        code = ord(c)
        if c in '"\\' or code < 0x20 or (escape and rng.random() < escape):
            if code > 0xFFFF:
                code -= 0x10000
                out.append(f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}")
            else:
                out.append(f"\\u{code:04x}")
        else:
            out.append(c)
    return '"' + "".join(out) + '"'


def _deep(depth: int, leaf: Any = 1) -> Raw:
    """``leaf`` inside ``depth`` arrays, as JSON text (no recursion to write it)."""
    return Raw("[" * depth + json.dumps(leaf) + "]" * depth)


CONTROL = ["\x00", "\x01", "\x1f", "\x7f", "\x85", "\u200b", "\u2028", "\ufeff", "\n", "\t"]
WRONG_TYPES = [12345, 1.5, True, ["x"], {"a": 1}]
NUMBER_WRONG = ["12", True, ["1"], {"n": 1}, None]
NOT_FINITE = [Raw("NaN"), Raw("Infinity"), Raw("-Infinity"), Raw("1e999")]


def bad_values(field: str, event_type: str, now_ms: int) -> list[tuple[Any, str]]:
    """Values the contract rejects in ``field`` of an ``event_type`` event: (value, kind)."""
    ids = [(v, "wrong_type") for v in WRONG_TYPES] + [("", "empty"), ("x" * 129, "huge"),
                                                        ("x" * 20_000, "huge")]  # fmt: skip
    consent = event_type.startswith("consent_")
    table: dict[str, list[tuple[Any, str]]] = {
        "event_id": ids,
        "product_id": ids,
        "order_id": ids,
        "customer_id": ids + [(f"c{c}1", "control") for c in CONTROL]
        + [("}c1", "out_of_alphabet"), ("v1\x1fwake", "control")],
        "event_type": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("page_veiw", "out_of_range"), ("PRODUCT_VIEW", "out_of_range"),
           (f"{event_type}\x00", "control"), ("x" * 10_000, "huge"),
           (next(t for r, ts in TOPIC_ROLE_TYPES.items() if r != ROLE_OF[event_type]
                 for t in sorted(ts)), "other_topic")],
        "event_time": [(v, "wrong_type") for v in (1.5, True, [T0], {"t": 1}, "soon")]
        + [("", "empty"), (0, "out_of_range"), (-1, "out_of_range"),
           (946_684_799_999, "out_of_range"), (now_ms + 2 * DAY, "out_of_range"),
           (10**30, "huge"), ("+10000-01-01T00:00:00+00:00", "out_of_range"),
           ("2026-01-01T00:00:00", "out_of_range"), ("2026-01-01T00:00:00\x00+00:00", "control"),
           (Raw("1e999"), "not_finite")],
        "channel": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("fax", "out_of_range"), ("APP", "out_of_range"),
           ("web" if consent else "push", "out_of_range"), ("app\x00", "control")],
        "country": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("de", "out_of_range"), ("DEU", "out_of_range"),
           ("ÀÉ", "out_of_range"), ("D\x00", "control"), ("D" * 5000, "huge")],
        "category": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("unknown", "out_of_range"), ("Beauty", "out_of_range"),
           ("beauty\x00", "control"), ("b" * 10_000, "huge"), (_deep(200, "beauty"), "nested")],
        "price": [(v, "wrong_type") for v in NUMBER_WRONG]
        + [(-0.01, "out_of_range"), (1e9 + 1, "out_of_range"), (10**20, "huge")]
        + [(v, "not_finite") for v in NOT_FINITE],
        "currency": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("usd", "out_of_range"), ("XXX", "out_of_range"),
           ("US\x00", "control")],
        "amount": [(v, "wrong_type") for v in NUMBER_WRONG]
        + [(-1, "out_of_range"), (1e9 + 1, "out_of_range")]
        + [(v, "not_finite") for v in NOT_FINITE],
        "items": [({"product_id": "p"}, "wrong_type"), ("x", "wrong_type"), ([1], "wrong_type"),
                  ([{"product_id": "p", "category": "beauty", "price": 1}] * 501, "huge"),
                  ([{"product_id": "p", "category": "beauty", "price": -1}], "out_of_range"),
                  ([{"category": "beauty", "price": 1}], "empty"),
                  ([{"product_id": "p", "category": "nope", "price": 1}], "out_of_range"),
                  ([{"product_id": "p", "category": "beauty", "price": 1, "quantity": -1}],
                   "out_of_range"),
                  ([{"product_id": "p", "category": "beauty", "price": 1, "quantity": "2"}],
                   "wrong_type"),
                  ([{"product_id": "p\x00", "category": "beauty\x00", "price": 1}], "control")],
        "promised_delivery_time": [(v, "wrong_type") for v in (1.5, True, ["x"], "soon", None)]
        + [("", "empty"), (-(10**15), "out_of_range"), (T0 + 400 * DAY, "out_of_range"),
           (10**30, "huge"), ("0001-01-01T00:00:00+00:00", "out_of_range")],
        "status": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("lost", "out_of_range"), ("delay\x00", "control")],
        "sentiment": [(v, "wrong_type") for v in NUMBER_WRONG]
        + [(1.5, "out_of_range"), (-2, "out_of_range")] + [(v, "not_finite") for v in NOT_FINITE],
        "rating": [(v, "wrong_type") for v in ("5", True, 4.5, None, [5])]
        + [(0, "out_of_range"), (6, "out_of_range")],
        "timezone": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("America", "out_of_range"), ("Europe", "out_of_range"),
           ("a" * 300, "huge"), ("Mars/Olympus", "out_of_range"), ("UTC\x00", "control"),
           ("../../../../etc/passwd", "out_of_range")],
        "language": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("e", "out_of_range"), ("en_US", "out_of_range"),
           ("x" * 40, "huge"), ("en\x00", "control")],
        "birthday": [(v, "wrong_type") for v in (1225, True, ["12-25"])]
        + [("", "empty"), ("13-01", "out_of_range"), ("02-30", "out_of_range"),
           ("1-01", "out_of_range"), ("\u0661\u0662-01", "out_of_range"),
           ("12-2\x00", "control")],
        "preferred_channel": [(v, "wrong_type") for v in WRONG_TYPES]
        + [("", "empty"), ("fax", "out_of_range"), ("sms\x00", "control")],
        "email": [(v, "wrong_type") for v in (5, [EMAIL], {"a": EMAIL}, True)],
        "phone": [(v, "wrong_type") for v in (15550100999.5, [EMAIL], {"a": 1}, False)],
        "email_hash": [(EMAIL, "out_of_range"), ("A" * 32, "out_of_range"),
                       ("0" * 31, "out_of_range"), (7, "wrong_type"), ("", "empty")],
        "phone_hash": [("5550100999", "out_of_range"), ("0" * 33, "huge"),
                       ("\x00" * 32, "control")],
        "query": [(v, "wrong_type") for v in WRONG_TYPES] + [("q" * 1025, "huge")],
    }  # fmt: skip
    return table[field]


def fields_of(event_type: str) -> list[str]:
    """The fields a bad value may go in for this type: its own, and the common ones."""
    own = [f for f in template(event_type, "c", T0, 0) if f != "event_type"]
    common = ["event_type", "channel", "country", "email", "phone", "email_hash", "phone_hash"]
    if event_type == "search":
        own.append("query")
    return list(dict.fromkeys(own + common))


def every_bad_field(now_ms: int, escape: float = 0.0) -> list[Message]:
    """Every bad value of every field of every event type, once each."""
    out = []
    for n, event_type in enumerate(sorted(ROLE_OF)):
        for field in fields_of(event_type):
            for value, kind in bad_values(field, event_type, now_ms):
                body = template(event_type, "f1", T0 + n, n) | {field: value}
                raw = render(body, escape, random.Random(n))
                expected = None if kind == "not_finite" or len(raw) > 65_536 else field
                label = f"{event_type}.{field}:{kind}"
                out.append(Message(ROLE_OF[event_type], b"f1", raw, True, expected, label))
    return out


@st.composite
def bad_field(draw: st.DrawFn, now_ms: int, max_event_bytes: int = 65_536) -> Message:
    """One event with one field damaged, maybe with personal data riding along."""
    event_type = draw(st.sampled_from(sorted(ROLE_OF)))
    field = draw(st.sampled_from(fields_of(event_type)))
    value, kind = draw(st.sampled_from(bad_values(field, event_type, now_ms)))
    n = draw(st.integers(0, 10**6))
    body = template(event_type, f"f{n % 50}", T0 + n, n) | {field: value}
    body["event_id"] = body["event_id"] if field == "event_id" else f"bad-{n}"
    if draw(st.booleans()):  # personal data that must not reach the dead letter in clear
        body |= {"email": EMAIL, "name": NAME} if field not in ("email", "name") else {}
    escape = draw(st.sampled_from([0.0, 0.0, 0.3, 1.0]))
    expected = None if kind == "not_finite" else field  # NaN: not JSON at all
    raw = render(body, escape, random.Random(n))
    if len(raw) > max_event_bytes:
        expected = None  # too large to be read at all
    return Message(ROLE_OF[event_type], f"f{n % 50}".encode(), raw, True, expected,
                   f"{field}:{kind}{':escaped' if escape else ''}")  # fmt: skip


@st.composite
def bad_message(draw: st.DrawFn, max_event_bytes: int, key_limit: int) -> Message:
    """A message damaged as a whole."""
    event_type = draw(st.sampled_from(sorted(ROLE_OF)))
    n = draw(st.integers(0, 10**6))
    body = template(event_type, f"m{n % 50}", T0 + n, n) | {"event_id": f"bad-{n}"}
    raw = render(body)
    role, key = ROLE_OF[event_type], f"m{n % 50}".encode()
    kind = draw(st.sampled_from([
        "invalid_utf8", "bom", "deep_nesting", "duplicate_last_bad", "truncated", "not_object",
        "empty", "oversize", "near_output_limit", "huge_key", "lone_surrogate", "trailing",
    ]))  # fmt: skip
    field = None
    if kind == "invalid_utf8":
        at = raw.index(b'"customer_id"') + 16
        raw = raw[:at] + draw(st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80"])) + raw[at:]
    elif kind == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif kind == "deep_nesting":
        depth = draw(st.sampled_from([1025, 5000]))
        raw = b"[" * depth + b"]" * depth
    elif kind == "duplicate_last_bad":
        pairs = [*body.items(), ("event_time", "soon")]
        raw, field = render(Pairs(pairs)), "event_time"
    elif kind == "truncated":
        raw = raw[: draw(st.integers(1, len(raw) - 1))]
    elif kind == "not_object":
        raw = draw(st.sampled_from([b"[]", b"null", b'"event"', b"42", b"[1, 2]", b"true"]))
    elif kind == "empty":
        raw = b""
    elif kind in ("oversize", "near_output_limit"):
        size = draw(st.sampled_from(
            [max_event_bytes + 1, 200_000, 999_000] if kind == "oversize"
            else [key_limit - 100, key_limit, key_limit + 100]
        ))  # fmt: skip
        pad = max(0, size - len(raw) - 20)
        raw = render(body | {"email": EMAIL, "pad": "x" * pad})[:size]
    elif kind == "huge_key":  # the dead letter's key alone is near the producer's limit
        key = b"k" * draw(st.sampled_from([key_limit - 50, key_limit + 10]))
        raw = b"{oops"
    elif kind == "lone_surrogate":
        raw = raw.replace(b'"customer_id":"', b'"customer_id":"\\ud800', 1)  # not JSON
    elif kind == "trailing":
        raw = raw + draw(st.sampled_from([b"x", b"{}", b",", b"\x00"]))
    return Message(role, key, raw, True, field, kind)


@st.composite
def odd_valid(draw: st.DrawFn) -> Message:
    """A valid event written oddly: it must be applied as the plain one would be."""
    event_type = draw(st.sampled_from(sorted(ROLE_OF)))
    n = draw(st.integers(0, 10**6))
    customer = draw(st.sampled_from(["c001", "c002", "o-é", "o}x", "顧客 42", f"o{n % 9}"]))
    body = template(event_type, customer, T0 + DAY // 3 + n, n) | {"event_id": f"odd-{n}"}
    kind = draw(st.sampled_from([
        "escaped", "control_in_ids", "unknown_fields", "duplicate_last_good", "near_max_bytes",
        "huge_key", "personal_data", "email_null",
    ]))  # fmt: skip
    key = customer.encode()
    escape = 0.0
    if kind == "escaped":
        escape = draw(st.sampled_from([0.3, 1.0]))
    elif kind == "control_in_ids":
        for f in ("event_id", "product_id", "order_id"):
            if f in body:
                body[f] = body[f] + draw(st.sampled_from(CONTROL))
    elif kind == "unknown_fields":
        body |= {"extra": _deep(draw(st.sampled_from([10, 900]))), "memo\x00": "\x01\u2028"}
    elif kind == "duplicate_last_good":
        first = {"event_time": "soon", "category": "nope", "customer_id": 5}
        pairs = [(f, v) for f, v in first.items() if f in body] + list(body.items())
        return Message(ROLE_OF[event_type], key, render(Pairs(pairs)), False, None, kind)
    elif kind == "near_max_bytes":
        body["pad"] = "x" * draw(st.sampled_from([30_000, 65_000]))
        raw = render(body)
        if len(raw) > 65_536:
            body["pad"] = body["pad"][: 65_536 - len(raw)]
    elif kind == "huge_key":
        key = b"k" * draw(st.sampled_from([50_000, 99_000]))
    elif kind == "personal_data":
        body |= {"email": EMAIL, "phone": "+1 (555) 010-0999", "name": NAME,
                 "address": {"street": "12 Analytical Way"}}  # fmt: skip
    elif kind == "email_null":
        body |= {"email": None, "phone": None}
    raw = render(body, escape, random.Random(n))
    return Message(ROLE_OF[event_type], key, raw, False, None, kind)
