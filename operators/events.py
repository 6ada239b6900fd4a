"""Input event contracts: event types, their fields, and strict validation.

This module owns what a valid input event is (docs/events.md is its prose
twin). ``EventValidator.parse`` turns one Kafka message into either a
``ParsedEvent`` or an ``InvalidEvent`` whose reason names the offending field
and value. It is the only per-event Python on the hot path, so it is a flat
table of checks with no per-event allocation beyond the result tuple.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any, Literal, NamedTuple

import msgspec
import orjson

from crmstream.config import CrmConfig
from crmstream.operators.fields import (
    HASH_FIELDS,
    MAX_ID_LEN,
    MAX_QUANTITY,
    MAX_QUERY_LEN,
    Limits,
    check_hash,
    choice,
    id_field,
    is_country,
    is_customer_id,
    is_language,
    is_month_day,
    number,
    parse_time_ms,
    show,
)
from crmstream.operators.fields import FieldError as _Invalid
from crmstream.operators.redaction import PII_FIELDS, Redactor, keyed_hash, pii_key
from crmstream.operators.zones import find_zone

# Dense, stable codes: state arrays are indexed by them, so never renumber;
# append new types at the end and bump the state layout version.
EVENT_TYPES: tuple[str, ...] = (
    # clickstream
    "page_view",
    "product_view",
    "search",
    "favourite",
    "add_to_cart",
    "remove_from_cart",
    "checkout_started",
    "share",
    "session_start",
    # orders
    "order_placed",
    "order_paid",
    "order_cancelled",
    "order_shipped",
    "order_delivered",
    "order_returned",
    "order_refunded",
    "logistics_update",
    # customers
    "profile_updated",
    "consent_granted",
    "consent_withdrawn",
    "erasure_requested",
    # feedback
    "recommendation_dismissed",
    "contacted_too_often",
    "service_ticket",
    "product_review",
)
EVENT_CODE: dict[str, int] = {name: code for code, name in enumerate(EVENT_TYPES)}
NUM_EVENT_TYPES = len(EVENT_TYPES)

TOPIC_ROLE_TYPES: dict[str, frozenset[str]] = {
    "clickstream": frozenset(EVENT_TYPES[0:9]),
    "orders": frozenset(EVENT_TYPES[9:17]),
    "customers": frozenset(EVENT_TYPES[17:21]),
    "feedback": frozenset(EVENT_TYPES[21:25]),
}

CHANNELS = frozenset({"app", "web", "mini_program"})
CONTACT_CHANNELS = frozenset({"push", "email", "sms", "whatsapp", "line"})
LOGISTICS_STATUS_CODE = {"in_transit": 0.0, "customs_hold": 1.0, "delay": 2.0}
LOGISTICS_STATUSES = frozenset(LOGISTICS_STATUS_CODE)
MAX_ORDER_ITEMS = 500

_HASH_SET = frozenset(HASH_FIELDS)
# The fields of a non-clickstream event that rules, timers and profiles read
# (``ParsedEvent.fields``); others are not carried past validation.
KEPT_FIELDS = (
    "order_id",
    "promised_delivery_time",
    "status",
    "channel",
    "country",
    "timezone",
    "language",
    "birthday",
    "preferred_channel",
    *HASH_FIELDS,
)


class ParsedEvent(NamedTuple):
    """A valid event, reduced to what the state kernels and rules read."""

    customer_id: str
    event_id: str
    type_code: int
    event_time_ms: int
    category: int  # index in the taxonomy, -1 when the event has none
    amount_base: float  # amount in the base currency, 0.0 when none
    topic: str
    partition: int
    offset: int
    ingest_ms: int  # the Kafka message timestamp
    aux: float  # sentiment (tickets), rating (reviews), status code (logistics), else 0
    # The validated fields rules, timers and profiles read (``KEPT_FIELDS``) of orders,
    # customer and feedback events; empty for clickstream events, whose other fields
    # no rule reads: that keeps the items exchanged between worker processes small.
    fields: dict[str, Any]


class InvalidEvent(NamedTuple):
    """A message that failed validation, bound for the dead-letter topic."""

    reason: str
    field: str | None
    customer_id: str | None
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int


@dataclass(frozen=True)
class _FieldSpec:
    required: tuple[str, ...] = ()
    product: bool = False  # product_id + category required, price optional
    amount: bool = False  # amount + currency required
    optional_category: bool = False


_SPECS: dict[str, _FieldSpec] = {
    "page_view": _FieldSpec(optional_category=True),
    "product_view": _FieldSpec(product=True),
    "search": _FieldSpec(optional_category=True),
    "favourite": _FieldSpec(product=True),
    "add_to_cart": _FieldSpec(product=True),
    "remove_from_cart": _FieldSpec(product=True),
    "checkout_started": _FieldSpec(),
    "share": _FieldSpec(optional_category=True),
    "session_start": _FieldSpec(),
    "order_placed": _FieldSpec(required=("order_id",), amount=True),
    "order_paid": _FieldSpec(required=("order_id",), amount=True),
    "order_cancelled": _FieldSpec(required=("order_id",)),
    "order_shipped": _FieldSpec(required=("order_id", "promised_delivery_time")),
    "order_delivered": _FieldSpec(required=("order_id",)),
    "order_returned": _FieldSpec(required=("order_id",)),
    "order_refunded": _FieldSpec(required=("order_id",), amount=True),
    "logistics_update": _FieldSpec(required=("order_id", "status")),
    "profile_updated": _FieldSpec(),
    "consent_granted": _FieldSpec(required=("channel",)),
    "consent_withdrawn": _FieldSpec(required=("channel",)),
    "erasure_requested": _FieldSpec(),
    "recommendation_dismissed": _FieldSpec(required=("category",)),
    "contacted_too_often": _FieldSpec(),
    "service_ticket": _FieldSpec(required=("sentiment",)),
    "product_review": _FieldSpec(required=("product_id", "rating")),
}
assert set(_SPECS) == set(EVENT_TYPES)


# A namedtuple's own constructor is a Python function; tuple.__new__ is not. Per event
# that is about 0.3 µs: new_tuple(ParsedEvent, (...)) here, RawMessage in the source,
# and a ShardBatch's events unpickled on another worker process.
new_tuple = tuple.__new__

_FastId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
# An integer orjson reads as an integer too: it reads one past 64 bits as a float (which
# the checked way refuses as a time), msgspec as an int.
Int64 = Annotated[int, msgspec.Meta(ge=-(2**63), le=2**63 - 1)]
# The longest message a fast path takes. orjson rounds a decimal number of more than
# about 768 significant digits that lies halfway between two doubles the wrong way
# (msgspec and Python's float() round it to even): in a message no longer than this,
# no number has that many digits. Longer ones go the checked way; generated shop
# events are at most 675 bytes.
FAST_PATH_MAX_BYTES = 768


class _Click(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A clickstream event as the compiled fast path decodes it (see ``EventValidator.parse``).

    The fields ``_validate`` reads for clickstream types, each with a type at
    least as narrow as it accepts there. Unknown fields are refused rather than
    skipped: msgspec skips a field without the checks orjson makes (UTF-8, a
    number too large for a float), so a skipped field could let through what
    the checked way rejects. A refused message goes the checked way, which
    ignores unknown fields and words any rejection; so does one with ``email``
    or ``phone``, which it hashes or rejects.
    """

    event_id: _FastId
    customer_id: _FastId
    event_type: Literal[tuple(sorted(TOPIC_ROLE_TYPES["clickstream"]))]  # type: ignore[valid-type]
    event_time: Int64  # ISO-8601 text goes the checked way
    channel: Literal["app", "web", "mini_program"] | None = None
    country: str | None = None
    product_id: _FastId | None = None
    category: str | None = None
    price: Annotated[float, msgspec.Meta(ge=0.0, le=1e9)] | msgspec.UnsetType = msgspec.UNSET
    currency: str | None = None
    query: Annotated[str, msgspec.Meta(max_length=MAX_QUERY_LEN)] | None = None  # no rule reads it


_CLICK_DECODER = msgspec.json.Decoder(_Click)
_PRODUCT_CODES = frozenset(EVENT_CODE[t] for t, spec in _SPECS.items() if spec.product)
_CATEGORY_CODES = frozenset(
    EVENT_CODE[t] for t, spec in _SPECS.items() if spec.product or spec.optional_category
)


class EventValidator:
    """Strict parser for input messages, built once from the configuration."""

    def __init__(self, config: CrmConfig):
        self._roles = config.kafka.topics.inputs
        self._click_topics = frozenset(t for t, r in self._roles.items() if r == "clickstream")
        from crmstream.operators.fast_paths import FastPaths  # it imports this module

        limits = Limits.of(config)
        paths = FastPaths(limits)
        by_role = {"orders": paths.order, "customers": paths.customer}
        self._fast_paths = {t: by_role[r] for t, r in self._roles.items() if r in by_role}
        (self._category_index, self._rates, self._min_time_ms, self._max_skew_ms,
         self._promise_before_ms, self._promise_after_ms) = limits  # fmt: skip
        self._max_bytes = config.processing.max_event_bytes
        self._fast_max_bytes = min(self._max_bytes, FAST_PATH_MAX_BYTES)
        self._pii_key = pii_key(config)
        # Rejected messages' copies for the dead-letter topic (operators/redaction.py).
        self.redact = Redactor(config)

    def pii_hash(self, field: str, value: Any) -> str:
        """Keyed BLAKE2b-128 of a normalised e-mail (trimmed, lower case) or phone (digits)."""
        if type(value) is not str:
            raise _Invalid(field, f"field {field!r} must be a string")
        return keyed_hash(self._pii_key, field, value)

    def parse(
        self,
        key: bytes | None,
        value: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        now_ms: int,
    ) -> ParsedEvent | InvalidEvent:
        """Validate one message; ``now_ms`` is the batch's wall clock, read once per batch.

        A clickstream message (nine events in ten) first tries the compiled fast
        path: msgspec decodes and type-checks it in C into ``_Click`` and the few
        checks left are made here. An order or customer message tries its topic's
        (``operators.fast_paths``). A fast path takes messages of at most
        ``FAST_PATH_MAX_BYTES`` and accepts only what ``parse_checked`` accepts,
        with the same result (tests/test_events.py and tests/test_fast_paths.py
        hold them to that with hypothesis); what it does not accept goes the
        checked way, which words the rejection.
        """
        fast = value is not None and len(value) <= self._fast_max_bytes
        if fast and topic in self._click_topics:
            try:
                c = _CLICK_DECODER.decode(value)
            except msgspec.DecodeError:  # ValidationError too
                pass
            else:
                # The checks ``_validate`` makes on a clickstream event that types cannot
                # say, in line (no second call per message); one failing leaves the
                # message to the checked way, which words the rejection.
                ok = (
                    self._min_time_ms <= c.event_time <= now_ms + self._max_skew_ms
                    # msgspec typed them str: is_customer_id's and _is_country's other checks
                    and c.customer_id.isprintable()
                    and c.customer_id[0] != "}"
                    and (
                        c.country is None
                        or (
                            len(c.country) == 2
                            and c.country.isascii()
                            and c.country.isalpha()
                            and c.country.isupper()
                        )
                    )
                )
                code = EVENT_CODE[c.event_type]
                category = -1
                if ok and code in _CATEGORY_CODES:
                    product = code in _PRODUCT_CODES
                    if product and c.product_id is None:
                        ok = False
                    elif product or c.category is not None:
                        category = self._category_index.get(c.category, -1)
                        ok = category >= 0
                amount_base = 0.0
                if ok and c.price is not msgspec.UNSET:
                    rate = self._rates.get(c.currency)
                    if rate is None:
                        ok = False
                    else:
                        amount_base = c.price * rate
                if ok:
                    return new_tuple(
                        ParsedEvent,
                        (
                            c.customer_id,
                            c.event_id,
                            code,
                            c.event_time,
                            category,
                            amount_base,
                            topic,
                            partition,
                            offset,
                            timestamp_ms,
                            0.0,
                            {},
                        ),
                    )
        elif fast:
            path = self._fast_paths.get(topic)
            if path is not None:
                found = path(value, topic, partition, offset, timestamp_ms, now_ms)
                if found is not None:
                    return found
        return self.parse_checked(key, value, topic, partition, offset, timestamp_ms, now_ms)

    def _in_time_range(self, event_time_ms: int, now_ms: int) -> bool:
        return self._min_time_ms <= event_time_ms <= now_ms + self._max_skew_ms

    def parse_checked(
        self,
        key: bytes | None,
        value: bytes | None,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        now_ms: int,
    ) -> ParsedEvent | InvalidEvent:
        """``parse`` without the fast path: every check in Python, each rejection worded."""
        customer_id = None
        obj: Any = None
        try:
            if value is None:
                raise _Invalid(None, "message has no value (tombstone)")
            if len(value) > self._max_bytes:
                raise _Invalid(
                    None, f"message is {len(value)} bytes, over the {self._max_bytes}-byte limit"
                )
            try:
                obj = orjson.loads(value)
            except orjson.JSONDecodeError as exc:
                raise _Invalid(None, f"not valid UTF-8 JSON: {_json_error(value, exc)}") from None
            if type(obj) is not dict:
                raise _Invalid(None, f"event must be a JSON object, got {type(obj).__name__}")
            customer_id = obj.get("customer_id")
            customer_id = customer_id if is_customer_id(customer_id) else None
            return self._validate(obj, topic, partition, offset, timestamp_ms, now_ms)
        except _Invalid as bad:
            event_id = obj.get("event_id") if type(obj) is dict else None
            shown = type(event_id) is str and len(event_id) <= MAX_ID_LEN
            label = f"event {event_id!r}" if shown else "message"
            reason = f"{label} on {topic}[{partition}]@{offset}: {bad.message}"
            return InvalidEvent(
                reason, bad.field, customer_id, key, value, topic, partition, offset
            )

    def role(self, topic: str) -> str:
        """The input role (clickstream, orders, customers, feedback) of a topic."""
        return self._roles[topic]

    def _validate(
        self,
        obj: dict[str, Any],
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        now_ms: int,
    ) -> ParsedEvent:
        event_id = id_field(obj, "event_id")
        customer_id = id_field(obj, "customer_id")
        if not is_customer_id(customer_id):
            raise _Invalid(
                "customer_id",
                "field 'customer_id' must be printable characters (no control or format "
                f"characters) not starting with '}}', got {show(customer_id)}",
            )
        event_type = obj.get("event_type")
        spec = _SPECS.get(event_type) if type(event_type) is str else None
        if spec is None:
            raise _Invalid(
                "event_type",
                f"field 'event_type' is not a known event type, got {show(event_type)}",
            )
        role = self._roles.get(topic)
        if role is None:
            raise _Invalid(None, f"topic {topic!r} is not a configured input topic")
        if event_type not in TOPIC_ROLE_TYPES[role]:
            raise _Invalid(
                "event_type",
                f"field 'event_type' is {event_type!r}, which does not belong on the {role} topic",
            )
        if "event_time" not in obj:
            raise _Invalid("event_time", "field 'event_time' is required")
        event_time_ms = parse_time_ms(obj["event_time"])
        if not self._in_time_range(event_time_ms, now_ms):
            raise _Invalid(
                "event_time",
                f"field 'event_time' is out of the accepted range, got {show(obj['event_time'])}",
            )
        if not _HASH_SET.isdisjoint(obj):  # one C call for the usual event without them
            for name in HASH_FIELDS:
                if name in obj:
                    check_hash(obj, name)
        if not PII_FIELDS.isdisjoint(obj):  # no set built per event, unlike intersection
            for name in PII_FIELDS.intersection(obj):
                # Data minimisation: e-mail and phone never reach state or outputs in
                # clear; a keyed hash stays so that systems holding the key can match.
                value = obj.pop(name)
                if value is not None:
                    obj[f"{name}_hash"] = self.pii_hash(name, value)
        if "channel" in spec.required:  # consent events name a contact channel
            choice(obj, "channel", CONTACT_CHANNELS, required=True)
        else:  # elsewhere it is the surface the customer used
            choice(obj, "channel", CHANNELS, required=False)
        country = obj.get("country")
        if country is not None and not is_country(country):
            raise _Invalid(
                "country", f"field 'country' must be an ISO 3166 alpha-2 code, got {show(country)}"
            )
        for name in spec.required:
            if name in ("channel", "category", "sentiment", "rating", "status"):
                continue  # checked with their own rules below
            if name == "promised_delivery_time":
                self._check_promise(obj.get(name), event_time_ms)
            else:
                id_field(obj, name)

        category = -1
        if spec.product or spec.optional_category or "category" in spec.required:
            if spec.product:
                id_field(obj, "product_id")
            raw = obj.get("category")
            if raw is not None or spec.product or "category" in spec.required:
                category = self._category_index.get(raw, -1) if type(raw) is str else -1
                if category < 0:
                    raise _Invalid(
                        "category",
                        f"field 'category' must be a category of the "
                        f"configured taxonomy, got {show(raw)}",
                    )

        aux = 0.0
        if "items" in obj and spec.amount:
            category = self._primary_category(obj["items"])
        amount_base = 0.0
        if spec.amount:
            amount = number(obj, "amount", 0.0, 1e9)
            amount_base = amount * self._rate(obj)
        elif "price" in obj:
            price = number(obj, "price", 0.0, 1e9)
            amount_base = price * self._rate(obj)
        if "sentiment" in spec.required:
            aux = number(obj, "sentiment", -1.0, 1.0)
        if "rating" in spec.required:
            rating = obj.get("rating")
            if type(rating) is not int or not 1 <= rating <= 5:
                raise _Invalid(
                    "rating", f"field 'rating' must be an integer 1..5, got {show(rating)}"
                )
            aux = float(rating)
        if "status" in spec.required:
            choice(obj, "status", LOGISTICS_STATUSES, required=True)
            aux = LOGISTICS_STATUS_CODE[obj["status"]]
        if event_type == "profile_updated":
            self._check_profile(obj)
        query = obj.get("query")
        if query is not None and (type(query) is not str or len(query) > MAX_QUERY_LEN):
            raise _Invalid(
                "query",
                f"field 'query' must be text of at most {MAX_QUERY_LEN} characters, "
                f"got {show(query)}",
            )

        return new_tuple(
            ParsedEvent,
            (
                customer_id,
                event_id,
                EVENT_CODE[event_type],
                event_time_ms,
                category,
                amount_base,
                topic,
                partition,
                offset,
                timestamp_ms,
                aux,
                {} if role == "clickstream" else {k: obj[k] for k in KEPT_FIELDS if k in obj},
            ),
        )

    def _primary_category(self, items: Any) -> int:
        """Validate order items; the category of the priciest item (-1 for no items)."""
        if type(items) is not list or len(items) > MAX_ORDER_ITEMS:
            raise _Invalid(
                "items",
                f"field 'items' must be a list of at most {MAX_ORDER_ITEMS} objects, "
                f"got {show(items)}",
            )
        best, best_price = -1, -1.0
        for i, item in enumerate(items):
            if type(item) is not dict:
                raise _Invalid("items", f"items[{i}] must be an object, got {show(item)}")
            try:
                id_field(item, "product_id")
                price = number(item, "price", 0.0, 1e9)
                if "quantity" in item:  # not read by any rule; checked all the same
                    number(item, "quantity", 0.0, MAX_QUANTITY)
            except _Invalid as bad:
                raise _Invalid("items", f"items[{i}]: {bad.message}") from None
            raw = item.get("category")
            category = self._category_index.get(raw, -1) if type(raw) is str else -1
            if category < 0:
                raise _Invalid(
                    "items",
                    f"items[{i}].category must be a category of the configured "
                    f"taxonomy, got {show(raw)}",
                )
            if price > best_price:
                best, best_price = category, price
        return best

    def _rate(self, obj: dict[str, Any]) -> float:
        currency = obj.get("currency")
        rate = self._rates.get(currency) if type(currency) is str else None
        if rate is None:
            raise _Invalid(
                "currency",
                f"field 'currency' must be a configured currency "
                f"({len(self._rates)} known), got {show(currency)}",
            )
        return rate

    def _check_profile(self, obj: dict[str, Any]) -> None:
        tz = obj.get("timezone")
        if tz is not None and (type(tz) is not str or find_zone(tz) is None):
            raise _Invalid(
                "timezone", f"field 'timezone' must be an IANA time zone, got {show(tz)}"
            )
        birthday = obj.get("birthday")
        if birthday is not None and not is_month_day(birthday):
            raise _Invalid("birthday", f"field 'birthday' must be MM-DD, got {show(birthday)}")
        choice(obj, "preferred_channel", CONTACT_CHANNELS, required=False)
        language = obj.get("language")
        if language is not None and not is_language(language):
            raise _Invalid(
                "language", f"field 'language' must be a BCP-47 tag, got {show(language)}"
            )

    def _check_promise(self, value: Any, event_time_ms: int) -> None:
        """A promised delivery time within the configured days of the event's own time:
        one of -1e15 ms was committed as a timer whose firing raised (issue 34)."""
        name = "promised_delivery_time"
        promised = parse_time_ms(value, name)
        lo, hi = self._promise_before_ms, self._promise_after_ms
        # Not before 1970 either: a timer due then could not fire (state/timers.py).
        if not max(0, event_time_ms - lo) <= promised <= event_time_ms + hi:
            raise _Invalid(
                name,
                f"field {name!r} must be within {lo // 86_400_000} days before and "
                f"{hi // 86_400_000} days after the event's time, got {show(value)}",
            )


def _json_error(value: bytes, exc: orjson.JSONDecodeError) -> str:
    """Why a message is not JSON; for bytes that are not UTF-8, where and which (orjson
    says only "str is not valid UTF-8" of those)."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError as bad:
        return f"invalid UTF-8 at byte {bad.start}: {value[bad.start : bad.end]!r}"
    return str(exc)
