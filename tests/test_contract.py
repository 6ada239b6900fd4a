"""docs/events.md, rule by rule: the boundaries each rule states, generated from its text.

Each row of ``RULES`` quotes a rule of the input contract as a regular
expression over docs/events.md. The numbers and value lists the expression
captures generate the cases: the bounds themselves are accepted, the next
value past each bound is rejected naming the field, every listed value is
accepted and a value outside the list is rejected. So a bound changed in the
docs changes the test, and a docs rule that no longer matches fails it.
``test_every_field_and_value_the_contract_names_has_a_rule`` fails when
docs/events.md names a field or value that no row (and no list of bad values
of tests/fuzz_messages.py, which the fuzz suite runs) covers: a rule added to
the docs without a test. Valid events come from tests/fuzz_messages.py.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NamedTuple

import orjson
import pytest

from crmstream.config import load_config
from crmstream.operators.events import EventValidator, InvalidEvent, ParsedEvent
from tests.fuzz_messages import ROLE_OF, T0, bad_values, template

DOCS = (Path(__file__).parents[1] / "docs" / "events.md").read_text()
INPUT = DOCS[DOCS.index("## Common fields") : DOCS.index("## Output: triggers")]
CONFIG = load_config(None, [], env={})
VALIDATOR = EventValidator(CONFIG)
TOPIC = {role: topic for topic, role in CONFIG.kafka.topics.inputs.items()}
NOW = T0 + 3 * 86_400_000
DAY = 86_400_000
MISSING = object()  # a case that leaves the field out


class Case(NamedTuple):
    event_type: str
    field: str
    value: Any  # MISSING: the field left out
    ok: bool


class Rule(NamedTuple):
    name: str
    pattern: str  # over docs/events.md; its groups feed ``cases``
    fields: tuple[str, ...]  # the fields it covers
    cases: Callable[[re.Match], Iterator[Case]]
    values: Callable[[re.Match], set[str]] = lambda m: set()  # values it names


def _number(text: str) -> float:
    return float(text.replace("−", "-").replace(",", ""))


def _listed(text: str) -> list[str]:
    return re.findall(r"`([^`]+)`", text)


def _range(event_type: str, field: str, lo: float, hi: float, integer: bool = False):
    if integer:
        yield from (Case(event_type, field, v, ok) for v, ok in
                    ((int(lo), True), (int(hi), True), (int(lo) - 1, False),
                     (int(hi) + 1, False), (lo + 0.5, False)))  # fmt: skip
        return
    for v, ok in ((lo, True), (hi, True), (math.nextafter(lo, -math.inf), False),
                  (math.nextafter(hi, math.inf), False), (str(lo), False)):  # fmt: skip
        yield Case(event_type, field, v, ok)


def _lengths(event_type: str, field: str, lo: int, hi: int, char: str = "x"):
    for n, ok in ((lo, True), (hi, True), (lo - 1, False), (hi + 1, False)):
        yield Case(event_type, field, char * n, ok)


def _choices(event_type: str, field: str, values: list[str], outside: list[str]):
    yield from (Case(event_type, field, v, True) for v in values)
    yield from (Case(event_type, field, v, False) for v in outside)


def _iso(length: int) -> str:
    """An ISO-8601 time of T0 with a UTC offset, ``length`` characters long (fraction
    digits added)."""
    head, tail = "2026-01-01T00:00:00", "+00:00"
    digits = length - len(head) - len(tail) - 1
    return f"{head}.{'0' * digits}{tail}"


def _topics_cases(_m: re.Match) -> Iterator[Case]:
    """Each type of each topic table is accepted on its topic (checked by every case's
    template) and rejected on the others (``event_type`` moved to another topic's
    message: see ``_check``)."""
    for event_type in sorted(TYPES_BY_ROLE_IN_DOCS[ROLE_OF_DOCS_FIRST]):
        yield Case(event_type, "event_type", event_type, True)
    for role, types in TYPES_BY_ROLE_IN_DOCS.items():
        for event_type in sorted(types):
            other = next(r for r in TYPES_BY_ROLE_IN_DOCS if r != role)
            yield Case(event_type, "event_type", ("other topic", other), False)


def _types_by_role() -> dict[str, set[str]]:
    """The event types docs/events.md lists under each input topic's heading."""
    out: dict[str, set[str]] = {}
    parts = re.split(r"`kafka\.topics\.(\w+)` \(default", INPUT)
    for role, text in zip(parts[1::2], parts[2::2], strict=True):
        table = text.split("\n\n")[1]
        rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
        out[role] = {t for row in rows for t in _listed(row.split("|")[1])}
    return out


def _required_by_type() -> dict[str, list[str]]:
    """The fields the type tables of docs/events.md list as required."""
    out: dict[str, list[str]] = {}
    for text in re.split(r"`kafka\.topics\.\w+` \(default", INPUT)[1:]:
        table = text.split("\n\n")[1].splitlines()
        header = [h.strip() for h in table[0].strip("|").split("|")]
        column = next(i for i, h in enumerate(header) if h.startswith("required"))
        for row in table[2:]:
            cells = [c.strip() for c in row.strip("|").split("|")]
            # the fields, without what parentheses hold (optional fields, rules) and the
            # values after a colon
            cell = cells[column]
            while re.search(r"\([^()]*\)", cell):
                cell = re.sub(r"\([^()]*\)", "", cell)
            required = _listed(cell.split(":")[0])
            for event_type in _listed(cells[0]):
                out[event_type] = [f for f in required if f not in out]
    return out


TYPES_BY_ROLE_IN_DOCS = _types_by_role()
ROLE_OF_DOCS_FIRST = next(iter(TYPES_BY_ROLE_IN_DOCS))


def _required_cases(_m: re.Match) -> Iterator[Case]:
    for event_type, fields in sorted(_required_by_type().items()):
        for field in fields:
            yield Case(event_type, field, MISSING, False)


RULES: list[Rule] = [
    Rule("event types per topic", r"`kafka\.topics\.clickstream` \(default", ("event_type",),
         _topics_cases),
    Rule("required fields per type", r"\| event_type \| required", (), _required_cases),
    Rule("event_id length", r"\| `event_id` \| string, (\d+)–(\d+) chars", ("event_id",),
         lambda m: _lengths("page_view", "event_id", int(m[1]), int(m[2]))),
    Rule("customer_id length and alphabet",
         r"\| `customer_id` \| string, (\d+)–(\d+) printable chars, not starting with `\}`",
         ("customer_id",),
         lambda m: [*_lengths("page_view", "customer_id", int(m[1]), int(m[2]), "é"),
                    Case("page_view", "customer_id", "}x", False),
                    Case("page_view", "customer_id", "x}", True),
                    Case("page_view", "customer_id", "a\u200bb", False),
                    Case("page_view", "customer_id", "a b", True)]),
    Rule("event_time ISO text",
         r"ISO-8601 text with a UTC offset \(printable ASCII, at most (\d+) characters\)",
         ("event_time",),
         lambda m: [Case("page_view", "event_time", _iso(int(m[1])), True),
                    Case("page_view", "event_time", _iso(int(m[1]) + 1), False),
                    Case("page_view", "event_time", _iso(int(m[1]))[:-6], False),
                    Case("page_view", "event_time", T0, True),
                    Case("page_view", "event_time", float(T0), False)]),
    Rule("event_time range",
         r"not before `processing\.min_event_time`, not more than "
         r"`processing\.max_future_skew_seconds` after the processing clock",
         ("event_time",),
         lambda m: [Case("page_view", "event_time", CONFIG.processing.min_event_time_ms, True),
                    Case("page_view", "event_time", CONFIG.processing.min_event_time_ms - 1,
                         False),
                    Case("page_view", "event_time",
                         NOW + CONFIG.processing.max_future_skew_seconds * 1000, True),
                    Case("page_view", "event_time",
                         NOW + CONFIG.processing.max_future_skew_seconds * 1000 + 1, False)]),
    Rule("surface channel", r"\| `channel` \| optional: ((?:`\w+`(?:, )?)+)", ("channel",),
         lambda m: _choices("page_view", "channel", _listed(m[1]),
                            ["APP", "push", "", "app "]),
         lambda m: set(_listed(m[1]))),
    Rule("country", r"\| `country` \| optional: ISO 3166 alpha-2, two upper-case ASCII letters",
         ("country",),
         lambda m: _choices("page_view", "country", ["DE", "JP"],
                            ["de", "D", "DEU", "ÀÉ", "D1"])),
    Rule("email and phone hashed at ingest",
         r"\| `email`, `phone` \| replaced at ingest by `email_hash` / `phone_hash`",
         ("email", "phone"),
         lambda m: [Case("page_view", "email", "Ann@Example.com", True),
                    Case("page_view", "phone", "+1 555 0100", True),
                    Case("page_view", "email", 5, False), Case("page_view", "phone", [], False)]),
    Rule("caller hashes", r"\| `email_hash`, `phone_hash` \| optional: (\d+) lower-case hex",
         ("email_hash", "phone_hash"),
         lambda m: [c for f in ("email_hash", "phone_hash") for c in _choices(
             "page_view", f, ["0" * int(m[1]), "af" * (int(m[1]) // 2)],
             ["0" * (int(m[1]) - 1), "0" * (int(m[1]) + 1), "A" * int(m[1]), "g" * int(m[1])])]),
    Rule("query length", r"`query` \(text, at most ([\d,]+) characters\)", ("query",),
         lambda m: [Case("search", "query", "q" * int(_number(m[1])), True),
                    Case("search", "query", "q" * (int(_number(m[1])) + 1), False),
                    Case("search", "query", "", True), Case("search", "query", 5, False)]),
    Rule("amount range", r"`amount` \(number ([\d.e]+)\.\.([\d.e]+)\)", ("amount",),
         lambda m: _range("order_placed", "amount", _number(m[1]), _number(m[2]))),
    Rule("items count", r"up to (\d+) `\{product_id, category, price, quantity\}`", ("items",),
         lambda m: [Case("order_placed", "items", [_item()] * int(m[1]), True),
                    Case("order_placed", "items", [_item()] * (int(m[1]) + 1), False),
                    Case("order_placed", "items", [], True),
                    Case("order_placed", "items", [_item() | {"price": -1}], False),
                    Case("order_placed", "items", [_item() | {"category": "x"}], False)]),
    Rule("item quantity", r"`quantity` optional, a number ([\d.e]+)\.\.([\d.e]+)", ("quantity",),
         lambda m: [Case(c.event_type, "items", [_item() | {"quantity": c.value}], c.ok)
                    for c in _range("order_placed", "items", _number(m[1]), _number(m[2]))]),
    Rule("promise window",
         r"at most `processing\.promised_delivery_max_days_before` \((\d+)\) days before and "
         r"`processing\.promised_delivery_max_days_after` \((\d+)\) days after the event's time",
         ("promised_delivery_time",),
         lambda m: [Case("order_shipped", "promised_delivery_time", T0 + d, ok) for d, ok in (
             (-int(m[1]) * DAY, True), (-int(m[1]) * DAY - 1, False),
             (int(m[2]) * DAY, True), (int(m[2]) * DAY + 1, False))]),
    Rule("logistics status", r"`status`: ((?:`\w+`(?:,| or)? ?)+)", ("status",),
         lambda m: _choices("logistics_update", "status", _listed(m[1]),
                            ["lost", "DELAY", ""]),
         lambda m: set(_listed(m[1]))),
    Rule("time zone",
         r"`timezone` \(a name `zoneinfo\.available_timezones\(\)` lists: `([\w/]+)`, "
         r"not the directory `(\w+)`\)", ("timezone",),
         lambda m: _choices("profile_updated", "timezone", [m[1], "UTC", "Asia/Tokyo"],
                            [m[2], "Mars/Base", "", "utc/../UTC"])),
    Rule("language", r"`language` \(BCP-47 shape: (\d+)–(\d+) ASCII letters, then `-` subtags "
         r"of (\d+)–(\d+) letters or digits, (\d+) characters at most\)", ("language",),
         lambda m: _language(*(int(g) for g in m.groups()))),
    Rule("birthday", r"`birthday` \(`MM-DD`, ASCII digits, a day of the calendar; `02-29` "
         r"allowed\)", ("birthday",),
         lambda m: _choices("profile_updated", "birthday", ["02-29", "12-31", "01-01"],
                            ["02-30", "13-01", "00-10", "01-00", "1-01", "\u0661\u0661-01"])),
    Rule("preferred channel", r"`preferred_channel` \(a contact channel: ((?:`\w+`(?:, )?)+)\)",
         ("preferred_channel",),
         lambda m: _choices("profile_updated", "preferred_channel", _listed(m[1]),
                            ["app", "fax", "EMAIL"]),
         lambda m: set(_listed(m[1]))),
    Rule("consent channel", r"\| `consent_granted`, `consent_withdrawn` \| `channel`: "
         r"((?:`\w+`(?:, )?)+)", ("channel",),
         lambda m: _choices("consent_granted", "channel", _listed(m[1]), ["app", "fax"]),
         lambda m: set(_listed(m[1]))),
    Rule("sentiment range", r"`sentiment` \(number ([−\d.]+)\.\.([−\d.]+)\)", ("sentiment",),
         lambda m: _range("service_ticket", "sentiment", _number(m[1]), _number(m[2]))),
    Rule("rating range", r"`rating` \(integer (\d+)\.\.(\d+)\)", ("rating",),
         lambda m: [*_range("product_review", "rating", _number(m[1]), _number(m[2]), True),
                    Case("product_review", "rating", "5", False),
                    Case("product_review", "rating", True, False)]),
    Rule("category", r"`category` must\s+be one of `taxonomy\.categories`", ("category",),
         lambda m: _choices("product_view", "category", list(CONFIG.taxonomy.categories),
                            ["Beauty", "unknown", ""])),
    Rule("currency", r"`currency` one\s+of `currency\.rates`", ("currency",),
         lambda m: _choices("order_placed", "currency", list(CONFIG.currency.rates),
                            ["usd", "XXX"])),
    Rule("price range", r"`price` \(a number ([\d.e]+)\.\.([\d.e]+)\)", ("price",),
         lambda m: _range("product_view", "price", _number(m[1]), _number(m[2]))),
    Rule("ids", r"Every string has a bound: ids (\d+) characters", ("product_id", "order_id"),
         lambda m: [*_lengths("product_view", "product_id", 1, int(m[1])),
                    *_lengths("order_placed", "order_id", 1, int(m[1]))]),
    Rule("message size", r"at most\s+`processing\.max_event_bytes`", (),
         lambda m: iter(())),  # tests/test_thresholds.py holds it at its value
]  # fmt: skip


def _item() -> dict[str, Any]:
    return {"product_id": "p1", "category": "beauty", "price": 10.0, "quantity": 1}


def _language(lo: int, hi: int, sub_lo: int, sub_hi: int, most: int) -> Iterator[Case]:
    ok = ["a" * lo, "a" * hi, "en-" + "1" * sub_lo, "en-" + "x1" * (sub_hi // 2)]
    long = "en" + "-abcdefgh" * 5
    ok.append(long[:most].rstrip("-"))
    bad = ["a" * (lo - 1), "a" * (hi + 1), "en-" + "1" * (sub_hi + 1), "en-", "en_US",
           "1a", long[: most + 1] if long[most] != "-" else long[: most + 2]]  # fmt: skip
    yield from _choices("profile_updated", "language", ok, bad)


def _all_cases() -> list[tuple[str, Case]]:
    out = []
    for rule in RULES:
        match = re.search(rule.pattern, DOCS)
        assert match, f"docs/events.md no longer states the rule {rule.name!r}: {rule.pattern}"
        out += [(rule.name, case) for case in rule.cases(match)]
    return out


CASES = _all_cases()


def _check(case: Case) -> ParsedEvent | InvalidEvent:
    body = template(case.event_type, "c1", T0, 0)
    topic = TOPIC[ROLE_OF[case.event_type]]
    if case.value is MISSING:
        body.pop(case.field, None)
    elif isinstance(case.value, tuple) and case.value[0] == "other topic":
        topic = TOPIC[case.value[1]]
    else:
        body[case.field] = case.value
    raw = orjson.dumps(body)
    args = (b"c1", raw, topic, 0, 1, T0, NOW)
    fast, checked = VALIDATOR.parse(*args), VALIDATOR.parse_checked(*args)
    assert fast == checked, case
    return checked


@pytest.mark.parametrize(("rule", "case"), CASES,
                         ids=[f"{r}:{c.event_type}.{c.field}={str(c.value)[:20]}:{c.ok}"
                              for r, c in CASES])  # fmt: skip
def test_each_rule_at_its_bounds(rule: str, case: Case):
    result = _check(case)
    if case.ok:
        assert isinstance(result, ParsedEvent), (rule, case, getattr(result, "reason", None))
    else:
        assert isinstance(result, InvalidEvent), (rule, case)
        assert result.field == case.field, (rule, case, result.reason)
        assert case.field in result.reason, result.reason


def test_a_hashed_address_never_stays_in_clear():
    result = _check(Case("profile_updated", "email", " Ann@Example.COM ", True))
    assert "email" not in result.fields and re.fullmatch(r"[0-9a-f]{32}",
                                                         result.fields["email_hash"])  # fmt: skip
    same = _check(Case("profile_updated", "email", "ann@example.com", True))
    assert same.fields["email_hash"] == result.fields["email_hash"]


def test_unknown_fields_are_ignored_and_the_last_of_a_repeated_key_counts():
    body = template("order_placed", "c1", T0, 0) | {"memo": {"x": [1]}}
    text = orjson.dumps(body).decode()
    raw = text[:-1] + ',"amount":-5,"amount":12.5}'
    result = VALIDATOR.parse_checked(b"c1", raw.encode(), TOPIC["orders"], 0, 1, T0, NOW)
    assert isinstance(result, ParsedEvent) and result.amount_base == 12.5
    assert "memo" not in result.fields


def test_a_reason_shows_a_rejected_value_cut_at_60_characters():
    """docs/events.md: the value a reason shows is cut at 60 characters (strings in the
    middle, by reprlib; anything longer at the end)."""
    for value, whole in ((["a" * 49, "bbb"], True), (["a" * 50, "bbb"], False),
                         ("q" * 58, True), ("q" * 59, False), ("q" * 5000, False),
                         ("q", True)):  # fmt: skip
        result = _check(Case("page_view", "country", value, False))
        shown = result.reason.split("got ", 1)[1]
        assert len(shown) <= 60, shown
        assert (shown == repr(value)) == whole, (value, shown)
        assert ("..." in shown) != whole
        if isinstance(value, str) and not whole:  # a string keeps both ends, cut between
            assert shown[:2] == "'q" and shown[-2:] == "q'", shown


def test_every_field_and_value_the_contract_names_has_a_rule():
    """Every backticked name in the input part of docs/events.md is a field some rule (or
    the fuzz suite's bad values) tests, a value a rule lists, an event type, a config
    key, or one of the few names below that are neither."""
    covered = {f for rule in RULES for f in rule.fields}
    fuzzed = set()
    for event_type in ROLE_OF:
        for field in (*template(event_type, "c", T0, 0), "query", "email", "phone",
                      "email_hash", "phone_hash"):  # fmt: skip
            try:
                if bad_values(field, event_type, NOW):
                    fuzzed.add(field)
            except KeyError:
                pass
    values = set()
    for rule in RULES:
        match = re.search(rule.pattern, DOCS)
        values |= rule.values(match)
    types = {t for ts in TYPES_BY_ROLE_IN_DOCS.values() for t in ts}
    not_names = {"*_hash": "the two hash fields", "-": "a character", "02-29": "a value",
                 "MM-DD": "a format", "Europe": "a value", "Europe/Paris": "a value",
                 "str.isprintable": "Python", "{customer}": "a key's hash tag", "}": "a char",
                 "\\x00": "a char", "\\x1f": "a char", "\\x7f": "a char", "\\x9f": "a char",
                 "zoneinfo.available_timezones()": "Python",
                 "{product_id, category, price, quantity}": "an item's fields"}  # fmt: skip
    missing = []
    for name in re.findall(r"`([^`\n]+)`", INPUT):
        if name in covered | values | types | set(not_names) or ("." in name and " " not in name):
            continue
        missing.append(name)
    assert missing == [], f"docs/events.md names these without a rule test here: {missing}"
    untested = sorted((covered - fuzzed) - {"quantity", "items"})
    print(f"{len(CASES)} cases from {len(RULES)} rules; fields only here, not fuzzed: {untested}")
