"""The orders and customers topics' compiled fast paths (operators/fast_paths.py) against
the checked way.

``EventValidator.parse`` tries a fast path first on these topics; whatever it returns
must be what ``parse_checked`` returns on the same message, for every message:
valid ones (the same ``ParsedEvent``, its kept fields included) and invalid ones (the
checked way's rejection, word for word, because the fast path leaves them to it).
"""

from __future__ import annotations

import itertools
import json
import math
import re

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.operators.events import TOPIC_ROLE_TYPES, EventValidator, ParsedEvent
from crmstream.operators.fast_paths import FastPaths
from crmstream.operators.fields import Limits

CONFIG = load_config(env={})
VALIDATOR = EventValidator(CONFIG)
FAST = FastPaths(Limits.of(CONFIG))
NOW = 1_767_225_600_000
DAY = 86_400_000
CLICK = CONFIG.kafka.topics.clickstream
ORDERS = CONFIG.kafka.topics.orders
CUSTOMERS = CONFIG.kafka.topics.customers
ORDER_TYPES = sorted(TOPIC_ROLE_TYPES["orders"])
CUSTOMER_TYPES = sorted(TOPIC_ROLE_TYPES["customers"])


def both_ways(value: bytes, topic: str = ORDERS):
    args = (b"k", value, topic, 3, 1042, NOW, NOW)
    return VALIDATOR.parse(*args), VALIDATOR.parse_checked(*args)


def same(a: object, b: object) -> bool:
    """Equal, and equal in type and order to the last kept field: ``==`` alone takes the
    int 2**70 for the float 2.0**70, and dicts in any key order for equal."""
    return a == b and repr(a) == repr(b)


def fast(body: dict) -> ParsedEvent | None:
    """The fast path of the body's topic alone (None: it leaves the body to the checked way)."""
    if body["event_type"] in TOPIC_ROLE_TYPES["orders"]:
        return FAST.order(orjson.dumps(body), ORDERS, 3, 1042, NOW, NOW)
    return FAST.customer(orjson.dumps(body), CUSTOMERS, 3, 1042, NOW, NOW)


def order_event(event_type: str) -> dict:
    """A valid event of the type with every field the fast path decodes."""
    return {
        "event_id": "e1",
        "customer_id": "c1",
        "event_type": event_type,
        "event_time": NOW - 5_000,
        "order_id": "o-1",
        "amount": 42.5,
        "currency": "EUR",
        "items": [
            {"product_id": "p1", "category": "beauty", "price": 20.0, "quantity": 1},
            {"product_id": "p2", "category": "shoes", "price": 22.5},
        ],
        "promised_delivery_time": NOW + 3 * DAY,
        "status": "delay",
        "channel": "web",
        "country": "DE",
    }


ITEM_FIELDS = ("product_id", "category", "price", "quantity")
ORDER_FIELDS = tuple(order_event("order_paid"))
VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.sampled_from(
        [
            "", "x" * 128, "x" * 129, "é" * 3, "}c", "c\u200b", "de", "DE", "DEU", "app",
            "mini_program", "push", "beauty", "no-such-category", "JPY", "XXX", "in_transit",
            "customs_hold", "lost", "2026-01-01T00:00:00+00:00", "\ud800", "a@b.c",
        ]
    ),
    st.sampled_from(
        [0, -0.0, -1, 1e9, 1e9 + 1, 1e6, 1e6 + 1, 1e-320, 5, 5.0, 2**63, 2**70, NOW, NOW - 1,
         NOW + 366 * DAY, NOW - 366 * DAY, NOW + 10**9, -(10**15)]
    ),
    st.floats(0, 1e9),
    st.integers(NOW - 400 * DAY, NOW + 400 * DAY),
    st.lists(st.integers(0, 3), max_size=2),
    st.dictionaries(st.sampled_from(ITEM_FIELDS), st.sampled_from(["p", 1.0]), max_size=2),
)  # fmt: skip
ITEM = st.fixed_dictionaries(
    {"product_id": st.sampled_from(["p1", "", "x" * 129]),
     "category": st.sampled_from(["beauty", "shoes", "home", "nope", None]),
     "price": st.sampled_from([0, 1.5, 20.0, 20, -1, 1e9 + 1, "3"])},
    optional={"quantity": st.sampled_from([1, 0, 1e6, 1e6 + 1, -1, None, "2"]),
              "sku": st.just("s")},
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(
    event_type=st.sampled_from(ORDER_TYPES),
    changes=st.dictionaries(
        st.sampled_from((*ORDER_FIELDS, "query", "price", "email", "timezone", "")),
        VALUES,
        max_size=3,
    ),
    removed=st.sets(st.sampled_from(ORDER_FIELDS), max_size=3),
    items=st.none() | st.lists(ITEM, max_size=4),
    topic=st.sampled_from([ORDERS, ORDERS, ORDERS, CLICK]),
    ascii_only=st.booleans(),
)
@example(  # a null channel and country are kept as null, an absent one is not kept
    event_type="order_shipped", changes={"channel": None, "country": None},
    removed={"status"}, items=None, topic=ORDERS, ascii_only=True,
)  # fmt: skip
@example(  # a kept integer past 64 bits: orjson reads it as a float, msgspec as an int
    event_type="logistics_update", changes={"promised_delivery_time": 2**70}, removed=set(),
    items=None, topic=ORDERS, ascii_only=True,
)  # fmt: skip
@example(  # past int64, within uint64: orjson reads an int
    event_type="order_delivered", changes={"promised_delivery_time": 2**63 + 5}, removed=set(),
    items=None, topic=ORDERS, ascii_only=True,
)  # fmt: skip
@example(  # items of a type that reads none are not checked
    event_type="order_delivered", changes={}, removed=set(),
    items=[{"product_id": "", "category": "nope", "price": -1}], topic=ORDERS, ascii_only=True,
)  # fmt: skip
def test_the_order_fast_path_gives_what_the_checked_way_gives(
    event_type, changes, removed, items, topic, ascii_only
):
    body = {k: v for k, v in order_event(event_type).items() if k not in removed}
    body.update(changes)
    if items is not None:
        body["items"] = items
    # json, not orjson: it writes integers past 64 bits and lone surrogates too.
    value = json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    parsed, checked = both_ways(value, topic)
    assert same(parsed, checked)


TOKENS = [
    b"\xff", b"\xc3\xa9", b"\\", b'"', b"e", b"E", b"9", b"-", b".", b",", b":", b"}", b"{",
    b"[", b"]", b"\x00", b"\t", b" ", b"\\u0000", b"\\ud800", b"1e999", b"NaN", b"null",
    b"true", b'"x":1,', b'"amount":-1,', b'"amount":5,', b'"order_id":"o2",',
    b'"channel":"web",', b'"timezone":"UTC",', b"0" * 30,
]  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(
    event_type=st.sampled_from(ORDER_TYPES + CUSTOMER_TYPES),
    edits=st.lists(
        st.tuples(st.floats(0, 1), st.integers(0, 3), st.sampled_from(TOKENS)),
        min_size=1,
        max_size=3,
    ),
)
def test_the_fast_paths_give_what_the_checked_way_gives_on_damaged_bytes(event_type, edits):
    """Bytes edited anywhere (a repeated key among them): the two decoders' corner cases."""
    orders = event_type in ORDER_TYPES
    raw = orjson.dumps(order_event(event_type) if orders else customer_event(event_type))
    for where, cut, token in edits:
        at = int(where * len(raw))
        raw = raw[:at] + token + raw[at + cut :]
    parsed, checked = both_ways(raw, ORDERS if orders else CUSTOMERS)
    assert same(parsed, checked)


@pytest.mark.parametrize("event_type", ORDER_TYPES + CUSTOMER_TYPES)
def test_the_fast_path_takes_a_valid_event_of_every_type_of_its_topics(event_type):
    """Each type's valid event is decided by the fast path itself (not left to the
    checked way), with the checked way's result."""
    orders = event_type in ORDER_TYPES
    body = order_event(event_type) if orders else customer_event(event_type)
    parsed = fast(body)
    assert parsed is not None
    assert same(parsed, both_ways(orjson.dumps(body), ORDERS if orders else CUSTOMERS)[1])


def test_the_priciest_item_names_the_category_and_the_first_of_equals_wins():
    body = order_event("order_placed")
    body["items"] = [
        {"product_id": "a", "category": "home", "price": 5},
        {"product_id": "b", "category": "beauty", "price": 9.5},
        {"product_id": "c", "category": "shoes", "price": 9.5},
    ]
    parsed = fast(body)
    assert parsed is not None
    assert parsed.category == CONFIG.taxonomy.categories.index("beauty")
    assert same(parsed, both_ways(orjson.dumps(body))[1])


def customer_event(event_type: str) -> dict:
    """A valid event of the type with every field the fast path decodes."""
    consent = event_type.startswith("consent_")
    return {
        "event_id": "e1",
        "customer_id": "c1",
        "event_type": event_type,
        "event_time": NOW - 5_000,
        "channel": "sms" if consent else "app",
        "country": "JP",
        "timezone": "Asia/Tokyo",
        "language": "ja-JP",
        "birthday": "02-29",
        "preferred_channel": "line",
    }


CUSTOMER_FIELDS = tuple(customer_event("profile_updated"))
# Per field the values on either side of its checks, drawn as often as any JSON value.
CUSTOMER_POOLS = {
    "channel": ["push", "email", "sms", "whatsapp", "line", "web", "app", "mini_program",
                "fax", "", None],
    "country": ["DE", "de", "DEU", "D1", "", None],
    "timezone": ["Asia/Tokyo", "UTC", "utc", "Mars/Olympus", "Europe/Berlin ", "", None],
    "birthday": ["02-29", "02-30", "13-01", "00-10", "2-14", "12-31", "０２-１４", "", None],
    "language": ["en", "en-GB", "e", "x" * 35, "x" * 36, "zh-Hant-TW", "en_GB", "de-", None],
    "preferred_channel": ["push", "line", "web", "app", "", None],
    "event_type": [*CUSTOMER_TYPES, "page_view", "order_paid"],
}  # fmt: skip
CUSTOMER_CHANGES = st.lists(
    st.sampled_from((*CUSTOMER_POOLS, "event_time", "customer_id", "order_id", "status",
                     "category", "phone", "")),
    unique=True,
    max_size=3,
).flatmap(
    lambda keys: st.fixed_dictionaries(
        {k: st.sampled_from(CUSTOMER_POOLS[k]) | VALUES if k in CUSTOMER_POOLS else VALUES
         for k in keys}
    )
)  # fmt: skip


@settings(max_examples=2000, deadline=None)
@given(
    event_type=st.sampled_from(CUSTOMER_TYPES),
    changes=CUSTOMER_CHANGES,
    removed=st.sets(st.sampled_from(CUSTOMER_FIELDS), max_size=4),
    topic=st.sampled_from([CUSTOMERS, CUSTOMERS, CUSTOMERS, ORDERS]),
    ascii_only=st.booleans(),
)
@example(  # fields profile_updated checks are kept unchecked on the other types
    event_type="consent_withdrawn",
    changes={"timezone": "Mars/Olympus", "birthday": "13-01", "language": "x" * 36},
    removed=set(), topic=CUSTOMERS, ascii_only=True,
)  # fmt: skip
def test_the_customer_fast_path_gives_what_the_checked_way_gives(
    event_type, changes, removed, topic, ascii_only
):
    body = {k: v for k, v in customer_event(event_type).items() if k not in removed}
    body.update(changes)
    value = json.dumps(body, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")
    parsed, checked = both_ways(value, topic)
    assert same(parsed, checked)


@pytest.mark.parametrize(
    "change",
    [
        {"email": "a@b.c"},  # hashed by the checked way
        {"query": "x"},  # checked by the checked way
        {"price": 3.0},  # read by the checked way
        {"promised_delivery_time": "2026-01-05T00:00:00+00:00"},  # ISO-8601 text
        {"event_time": "2026-01-01T00:00:00+00:00"},
        {"unknown": 1},
    ],
)
def test_fields_the_fast_path_does_not_decode_go_the_checked_way(change):
    body = {**order_event("order_shipped"), **change}
    assert fast(body) is None
    parsed, checked = both_ways(orjson.dumps(body))
    assert same(parsed, checked)


@pytest.mark.parametrize("role", ["orders", "customers"])
def test_the_fast_path_takes_the_workloads_events(monkeypatch, role):
    """All generated order and customer events pass the fast path, with the checked
    result."""
    from crmstream.bench.workload import Workload, WorkloadSpec

    topic = {"orders": ORDERS, "customers": CUSTOMERS}[role]
    # Sessions 15 minutes apart: 20,000 events span months, so orders ship, arrive,
    # are delayed, returned and refunded.
    stream = Workload(CONFIG, WorkloadSpec(customers=300, session_gap_ms=900_000)).events()
    events = [e for e in itertools.islice(stream, 20_000) if e.role == role]
    assert len(events) > 300
    now = 2_000_000_000_000
    checked = [
        VALIDATOR.parse_checked(e.key, e.value, topic, 0, i, 0, now) for i, e in enumerate(events)
    ]
    slow = []
    real = EventValidator.parse_checked
    monkeypatch.setattr(
        EventValidator, "parse_checked", lambda self, *a: slow.append(a[3]) or real(self, *a)
    )
    parsed = [VALIDATOR.parse(e.key, e.value, topic, 0, i, 0, now) for i, e in enumerate(events)]
    assert same(parsed, checked)
    valid = sum(isinstance(r, ParsedEvent) for r in checked)
    kinds = {r.type_code for r in checked if isinstance(r, ParsedEvent)}
    print(f"{len(events)} {role} events of {len(kinds)} types, {valid} valid, "
          f"{len(slow)} went the checked way")  # fmt: skip
    assert len(kinds) >= (6 if role == "orders" else 2)
    assert len(slow) == len(events) - valid


# ------------------------------- numbers orjson and msgspec read differently (outsider)
# A decimal halfway between two adjacent doubles, written with more than about 768
# significant digits: orjson rounds it up, msgspec (and float()) to even. The fast paths
# take no message long enough to hold such a number (events.FAST_PATH_MAX_BYTES).
Z = b"0" * 800
OUTSIDER_CASES = [  # (topic, message) as found, each once read differently by the two ways
    (CLICK, b'{"event_id":"e1","customer_id":"c1","event_type":"checkout_started",'
            b'"event_time":1767225600000,"price":1000000000.000000059604644775390625'
            + Z + b',"currency":"USD"}'),
    (CLICK, b'{"event_id":"e1","customer_id":"c1","event_type":"checkout_started",'
            b'"event_time":1767225600000,"price":19.9000000000000003552713678800500929355621337890625'
            + Z + b',"currency":"USD"}'),
    (ORDERS, b'{"event_id":"e1","customer_id":"c1","event_type":"order_placed",'
             b'"event_time":1767225600000,"order_id":"o1","amount":1000000000.000000059604644775390625'
             + Z + b',"currency":"USD"}'),
    (ORDERS, b'{"event_id":"e1","customer_id":"c1","event_type":"order_placed",'
             b'"event_time":1767225600000,"order_id":"o1","amount":1,"currency":"USD","items":'
             b'[{"product_id":"p","price":1,"category":"womens_fashion","quantity":'
             b'1000000.0000000000582076609134674072265625' + Z + b"}]}"),
    (ORDERS, b'{"event_id":"e1","customer_id":"c1","event_type":"order_paid",'
             b'"event_time":1767225600000,"order_id":"o1","amount":20,"currency":"EUR","items":'
             b'[{"product_id":"p1","price":10,"category":"womens_fashion"},{"product_id":"p2",'
             b'"price":10.00000000000000088817841970012523233890533447265625'
             + Z + b',"category":"mens_fashion"}]}'),
]  # fmt: skip


@pytest.mark.parametrize("topic,value", OUTSIDER_CASES)
def test_a_number_orjson_rounds_differently_gets_the_checked_result(topic, value):
    assert same(*both_ways(value, topic))


def halfway(v: float) -> str:
    """The decimal exactly halfway between ``v`` and the next double up."""
    from decimal import Decimal, localcontext

    with localcontext() as exact:
        exact.prec = 2000  # a double's exact decimal has at most 767 significant digits
        text = format((Decimal(v) + Decimal(math.nextafter(v, math.inf))) / 2, "f")
    return text if "." in text else text + ".0"


@settings(max_examples=400, deadline=None)
@given(
    v=st.floats(0, 1e9) | st.sampled_from([1e9, 1e6, 19.9, 10.0, 1.0, 0.0, 5e-324]),
    zeros=st.integers(0, 900),
    where=st.sampled_from(["price", "amount", "item_price", "quantity"]),
)
def test_long_halfway_numbers_get_the_checked_result_at_any_message_length(v, zeros, where):
    """Messages on both sides of the fast paths' length bound, with a number as long as
    the message allows that orjson may round differently from msgspec."""
    number = (halfway(v) + "0" * zeros).encode()
    if where == "price":
        body, topic, field = click_event_of("checkout_started"), CLICK, b'"price":'
    else:
        body, topic = order_event("order_placed"), ORDERS
        body["items"] = [{"product_id": "p", "category": "beauty", "price": 1.0, "quantity": 2}]
        field = {"amount": b'"amount":', "item_price": b'"price":', "quantity": b'"quantity":'}
        field = field[where]
    raw = orjson.dumps(body)
    at = raw.index(field) + len(field)
    end = at + len(re.match(rb"[-0-9.eE+]+", raw[at:]).group())
    assert same(*both_ways(raw[:at] + number + raw[end:], topic))


def click_event_of(event_type: str) -> dict:
    return {"event_id": "e1", "customer_id": "c1", "event_type": event_type,
            "event_time": NOW - 5_000, "price": 1.0, "currency": "USD"}  # fmt: skip


def test_an_event_time_past_64_bits_gets_the_checked_result():
    """orjson reads it as a float, which the checked way refuses; msgspec as an int."""
    for topic, body in ((CLICK, click_event_of("page_view")), (CUSTOMERS, customer_event(
            "profile_updated")), (ORDERS, order_event("order_shipped"))):  # fmt: skip
        raw = orjson.dumps(body).replace(str(NOW - 5_000).encode(), str(2**64).encode())
        args = (b"k", raw, topic, 3, 1042, NOW, 2**65)  # a clock past it
        assert same(VALIDATOR.parse(*args), VALIDATOR.parse_checked(*args))


# ------------------------------------------- edges decided alike, whatever hypothesis draws
def _order(event_type: str, **changes) -> dict:
    body = order_event(event_type)
    body.update(changes)
    return {k: v for k, v in body.items() if v is not _DROP}


_DROP = object()
MIN_MS = CONFIG.processing.min_event_time_ms
SKEW_MS = CONFIG.processing.max_future_skew_seconds * 1000
EDGES = [  # (topic, body): each decided alike by both ways, on every run
    (ORDERS, _order("order_placed", amount=_DROP)),  # amount required
    (ORDERS, _order("order_paid", currency=None)),
    (ORDERS, _order("order_paid", customer_id="}c")),  # the hash-tag rule
    (ORDERS, _order("order_paid", customer_id="c\x00")),  # not printable
    (ORDERS, _order("logistics_update", promised_delivery_time=0)),  # kept, though 0
    (ORDERS, _order("order_paid", status="")),  # kept, though empty
    (ORDERS, _order("order_paid", status="lost")),  # kept, not checked
    (ORDERS, _order("logistics_update", status="lost")),  # checked
    (ORDERS, _order("order_shipped", promised_delivery_time=NOW + 365 * DAY - 5_000)),
    (ORDERS, _order("order_shipped", promised_delivery_time=NOW + 365 * DAY - 4_999)),
    *(  # the accepted event times' bounds, and one past each
        (topic, {**body, "event_time": t})
        for topic, body in (
            (ORDERS, order_event("order_paid")),
            (CUSTOMERS, customer_event("consent_granted")),
        )
        for t in (MIN_MS - 1, MIN_MS, NOW + SKEW_MS, NOW + SKEW_MS + 1)
    ),
    (ORDERS, _order("order_paid", channel=None)),  # kept as null
    (ORDERS, _order("order_paid", country="de")),
    (ORDERS, _order("order_placed", items=[{"product_id": "p", "category": "x", "price": 1}])),
    (CUSTOMERS, {**customer_event("consent_granted"), "channel": "web"}),  # not a contact one
    (CUSTOMERS, {**customer_event("profile_updated"), "birthday": "13-01"}),
    (CUSTOMERS, {**customer_event("profile_updated"), "preferred_channel": "fax"}),
    (CUSTOMERS, {**customer_event("profile_updated"), "language": "x" * 36}),
    (CUSTOMERS, {**customer_event("consent_granted"), "birthday": "", "timezone": ""}),
    (CUSTOMERS, {**customer_event("consent_granted"), "customer_id": "}c"}),
    (CUSTOMERS, {**customer_event("consent_granted"), "channel": None}),
    (CUSTOMERS, {**customer_event("profile_updated"), "channel": "push"}),
    (CUSTOMERS, {**customer_event("profile_updated"), "timezone": "Mars/Olympus"}),
]


@pytest.mark.parametrize("topic,body", EDGES)
def test_edges_are_decided_alike(topic, body):
    assert same(*both_ways(orjson.dumps(body), topic))


@pytest.mark.parametrize(
    "change",
    [{"timezone": "Mars/Olympus"}, {"birthday": "13-01"}, {"language": "x" * 36},
     {"preferred_channel": "fax"}],
)  # fmt: skip
@pytest.mark.parametrize(
    "event_type", ["consent_granted", "consent_withdrawn", "erasure_requested"]
)
def test_profile_fields_other_types_keep_unchecked_take_the_fast_path(event_type, change):
    """profile_updated checks these fields; the other customer types keep them as they
    are, and the fast path takes them so."""
    body = {**customer_event(event_type), **change}
    parsed = fast(body)
    assert parsed is not None
    assert same(parsed, both_ways(orjson.dumps(body), CUSTOMERS)[1])


def test_a_promise_before_1970_is_refused_when_the_shop_takes_events_from_1970():
    """With ``processing.min_event_time`` at 1970, an event 10 days after it may promise
    no earlier than 1970 (a timer due before it could not fire)."""
    config = load_config(overrides=["processing.min_event_time=1970-01-01T00:00:00+00:00"],
                         env={})  # fmt: skip
    validator = EventValidator(config)
    body = {**order_event("order_shipped"), "event_time": 10 * DAY}
    for promised, valid in ((-1, False), (0, True)):
        body["promised_delivery_time"] = promised
        args = (b"k", orjson.dumps(body), ORDERS, 3, 1042, NOW, NOW)
        parsed, checked = validator.parse(*args), validator.parse_checked(*args)
        assert same(parsed, checked)
        assert isinstance(checked, ParsedEvent) is valid


@pytest.mark.parametrize("length", [770, 800, 850, 1000])
def test_messages_just_past_the_fast_paths_bound_get_the_checked_result(length):
    """A halfway number padded to ``length`` characters (orjson misreads it from about
    770), in messages from 800 to 1,100 bytes."""
    number = halfway(1e9)
    number = (number + "0" * (length - len(number))).encode()
    for topic, raw in (
        (CLICK, orjson.dumps(click_event_of("checkout_started")).replace(b"1.0", number)),
        (ORDERS, orjson.dumps(order_event("order_placed")).replace(b"42.5", number)),
    ):
        assert number in raw
        assert same(*both_ways(raw, topic))
