"""The compiled fast paths of the orders and customers topics (``EventValidator.parse``).

This module owns the fast paths of two input topics (the clickstream's is in
``operators.events``, in line): msgspec decodes and type-checks a message in C
into ``_Order`` (its items into ``_Item``) or ``_Customer``, and the few checks
types cannot say are made here, with the same predicates the checked way uses.
A fast path accepts only what ``EventValidator.parse_checked`` accepts, with
the same ``ParsedEvent`` (tests/test_fast_paths.py holds them to that with
hypothesis); a message it does not accept (``None``) goes the checked way,
which words the rejection. So no valid event of these topics builds a Python
dict per message unless it carries a field the fast paths leave to the checked
way (hashes, PII, a query, a price, unknown fields, ISO-8601 times) or is longer
than ``events.FAST_PATH_MAX_BYTES``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from crmstream.operators.events import (
    CHANNELS,
    CONTACT_CHANNELS,
    EVENT_CODE,
    LOGISTICS_STATUS_CODE,
    MAX_ORDER_ITEMS,
    TOPIC_ROLE_TYPES,
    Int64,
    ParsedEvent,
    new_tuple,
)
from crmstream.operators.fields import (
    MAX_ID_LEN,
    MAX_QUANTITY,
    Limits,
    is_country,
    is_customer_id,
    is_language,
    is_month_day,
)
from crmstream.operators.zones import find_zone

_FastId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ID_LEN)]
_Money = Annotated[float, msgspec.Meta(ge=0.0, le=1e9)]  # fields.number(..., 0.0, 1e9)
_UNSET = msgspec.UNSET
_Unset = msgspec.UnsetType


class _Item(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An order item as ``EventValidator._primary_category`` accepts it."""

    product_id: _FastId
    price: _Money
    category: str  # in the taxonomy: checked after decoding
    quantity: Annotated[float, msgspec.Meta(ge=0.0, le=MAX_QUANTITY)] | _Unset = _UNSET


class _Order(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """An order event as the fast path decodes it.

    Every field the checked way reads or keeps for the orders topic's types,
    each typed at least as narrowly as it accepts there. ``UNSET`` tells a field
    that is absent from one that is null: the checked way keeps a null one in
    ``ParsedEvent.fields``. Unknown fields are refused, not skipped (see
    ``events._Click``): such a message goes the checked way.
    """

    event_id: _FastId
    customer_id: _FastId
    event_type: Literal[tuple(sorted(TOPIC_ROLE_TYPES["orders"]))]  # type: ignore[valid-type]
    event_time: Int64  # ISO-8601 text goes the checked way
    order_id: _FastId  # required by every order type
    amount: _Money | _Unset = _UNSET
    currency: str | _Unset | None = _UNSET
    items: Annotated[list[_Item], msgspec.Meta(max_length=MAX_ORDER_ITEMS)] | _Unset = _UNSET
    # Kept as it is by the types that do not check it: a 64-bit integer (events.Int64).
    promised_delivery_time: Int64 | _Unset = _UNSET
    status: str | _Unset = _UNSET
    channel: Literal["app", "web", "mini_program"] | _Unset | None = _UNSET
    country: str | _Unset | None = _UNSET


class _Customer(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A customer event as the fast path decodes it: every field the checked way reads
    or keeps for the customers topic's types (see ``_Order``)."""

    event_id: _FastId
    customer_id: _FastId
    event_type: Literal[tuple(sorted(TOPIC_ROLE_TYPES["customers"]))]  # type: ignore[valid-type]
    event_time: Int64
    channel: str | _Unset | None = _UNSET
    country: str | _Unset | None = _UNSET
    # Checked for profile_updated; kept as they are for the other types.
    timezone: str | _Unset | None = _UNSET
    language: str | _Unset | None = _UNSET
    birthday: str | _Unset | None = _UNSET
    preferred_channel: str | _Unset | None = _UNSET


_ORDER = msgspec.json.Decoder(_Order)
_CUSTOMER = msgspec.json.Decoder(_Customer)
_CONSENT_CODES = frozenset(EVENT_CODE[t] for t in ("consent_granted", "consent_withdrawn"))
_PROFILE_UPDATED = EVENT_CODE["profile_updated"]
# The types whose spec asks for amount + currency (and reads items); the one that asks
# for a promised delivery time; the one that asks for a status.
_AMOUNT_CODES = frozenset(EVENT_CODE[t] for t in ("order_placed", "order_paid", "order_refunded"))
_SHIPPED = EVENT_CODE["order_shipped"]
_LOGISTICS = EVENT_CODE["logistics_update"]


class FastPaths:
    """The fast paths of the orders and customers topics, built once from the
    configuration's limits (``EventValidator`` hands over its own)."""

    def __init__(self, limits: Limits):
        (self._category_index, self._rates, self._min_time_ms, self._max_skew_ms,
         self._promise_before_ms, self._promise_after_ms) = limits  # fmt: skip

    def _decode(self, decoder: msgspec.json.Decoder, value: bytes, now_ms: int) -> Any:
        """The message as ``decoder``'s struct if it passes the checks of every type that
        types cannot say (the time's range, the customer-id alphabet, the country code),
        else None."""
        try:
            e = decoder.decode(value)
        except msgspec.DecodeError:  # ValidationError too
            return None
        country = e.country
        ok = (
            self._min_time_ms <= e.event_time <= now_ms + self._max_skew_ms
            and is_customer_id(e.customer_id)
            and (country is None or country is _UNSET or is_country(country))
        )
        return e if ok else None

    def order(
        self,
        value: bytes,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        now_ms: int,
    ) -> ParsedEvent | None:
        """The order event in ``value``, or None: the checked way decides it."""
        o = self._decode(_ORDER, value, now_ms)
        if o is None:
            return None
        t, country = o.event_time, o.country
        code = EVENT_CODE[o.event_type]
        category, amount_base, aux = -1, 0.0, 0.0
        promised = o.promised_delivery_time
        status = o.status
        if code in _AMOUNT_CODES:
            rate = self._rates.get(o.currency) if type(o.currency) is str else None
            if o.amount is _UNSET or rate is None:
                return None
            if o.items is not _UNSET:
                category = self._primary_category(o.items)
                if category is None:
                    return None
            amount_base = o.amount * rate
        elif code == _SHIPPED:
            if promised is _UNSET or not (
                max(0, t - self._promise_before_ms) <= promised <= t + self._promise_after_ms
            ):
                return None
        elif code == _LOGISTICS:
            aux = LOGISTICS_STATUS_CODE.get(status) if status is not _UNSET else None
            if aux is None:
                return None
        # What the checked way keeps of the event (events.KEPT_FIELDS), in that order.
        fields = {"order_id": o.order_id}
        if promised is not _UNSET:
            fields["promised_delivery_time"] = promised
        if status is not _UNSET:
            fields["status"] = status
        if o.channel is not _UNSET:
            fields["channel"] = o.channel
        if country is not _UNSET:
            fields["country"] = country
        return new_tuple(
            ParsedEvent,
            (o.customer_id, o.event_id, code, t, category, amount_base, topic, partition,
             offset, timestamp_ms, aux, fields),
        )  # fmt: skip

    def customer(
        self,
        value: bytes,
        topic: str,
        partition: int,
        offset: int,
        timestamp_ms: int,
        now_ms: int,
    ) -> ParsedEvent | None:
        """The customer event in ``value``, or None: the checked way decides it."""
        c = self._decode(_CUSTOMER, value, now_ms)
        if c is None:
            return None
        t, country = c.event_time, c.country
        code = EVENT_CODE[c.event_type]
        channel = c.channel
        if code in _CONSENT_CODES:  # a contact channel, required
            if channel not in CONTACT_CHANNELS:
                return None
        elif not (channel is None or channel is _UNSET or channel in CHANNELS):
            return None
        timezone, language = c.timezone, c.language
        birthday, preferred = c.birthday, c.preferred_channel
        if code == _PROFILE_UPDATED and not (
            (timezone is None or timezone is _UNSET or find_zone(timezone) is not None)
            and (birthday is None or birthday is _UNSET or is_month_day(birthday))
            and (preferred is None or preferred is _UNSET or preferred in CONTACT_CHANNELS)
            and (language is None or language is _UNSET or is_language(language))
        ):
            return None
        # What the checked way keeps of the event (events.KEPT_FIELDS), in that order.
        fields = {}
        if channel is not _UNSET:
            fields["channel"] = channel
        if country is not _UNSET:
            fields["country"] = country
        if timezone is not _UNSET:
            fields["timezone"] = timezone
        if language is not _UNSET:
            fields["language"] = language
        if birthday is not _UNSET:
            fields["birthday"] = birthday
        if preferred is not _UNSET:
            fields["preferred_channel"] = preferred
        return new_tuple(
            ParsedEvent,
            (c.customer_id, c.event_id, code, t, -1, 0.0, topic, partition, offset,
             timestamp_ms, 0.0, fields),
        )  # fmt: skip

    def _primary_category(self, items: list[_Item]) -> int | None:
        """The category of the priciest item (the first of equals; -1 for no items), or
        None when an item's category is not in the taxonomy."""
        index = self._category_index
        best, best_price = -1, -1.0
        for item in items:
            category = index.get(item.category, -1)
            if category < 0:
                return None
            if item.price > best_price:
                best, best_price = category, item.price
        return best
