"""Dead-letter copies (operators/redaction.py, flows/dead_letters.py): personal data found on
decoded strings whatever the escaping, personal fields dropped by default, non-PII left
alone, and a bounded copy with the original's length and SHA-256."""

from __future__ import annotations

import base64
import hashlib
import json
import random
import re

import orjson
import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.flows.dead_letters import dead_letter_bytes, dead_letter_record
from crmstream.operators.events import EventValidator, InvalidEvent
from crmstream.operators.redaction import Redactor

CONFIG = load_config(env={})
REDACT = Redactor(CONFIG)
EMAIL, PHONE = "Pii.Planted@Example.COM", "+1 (555) 010-0999"
PLANTED = ["pii.planted", "example.com", "555) 010", "5550100999", "Ada Lovelace", "12 Analytical"]


def hits(text: str | bytes) -> list[str]:
    if isinstance(text, bytes):
        text = text.decode("utf-8", "replace")
    # \uXXXX escapes decoded, as a subscriber's JSON parser would.
    text = re.sub(r"\\u([0-9a-fA-F]{4})", lambda m: chr(int(m[1], 16)), text)
    return [p for p in PLANTED if p.lower() in text.lower()]


def escaped(text: str, rng: random.Random) -> str:
    """``text`` as JSON string content with some characters written as \\uXXXX."""
    return "".join(f"\\u{ord(c):04x}" if rng.random() < 0.5 else c for c in text)


@pytest.mark.parametrize(
    "raw",
    [
        # issue 34: escapes decoded only by the subscriber's parser reached it in clear
        b'{"event_id": 1, "note_x": "mail pii.planted\\u0040example.com"}',
        b'{"event_id": 1, "em\\u0061il": "Pii.Planted@Example.COM"}',
        b'{"event_id": 1, "contact": "call \\u002b1 (555) 010-0999"}',
        b'{"event_id": 1, "contact": "\\u002b\\u0031 (555) 010-0999"}',
        # not JSON (cut off): escapes are decoded before the patterns apply
        b'{"event_id": 1, "contact": "pii.planted\\u0040example.com", "ph',
        b'{"phone": "+1 (555) 010-0999", "email": "pii.planted@example.com", oops',
        b'{"Phone": 15550100999, "x": 1, ',
        # a key written twice: the decoded value holds only the second
        b'{"memo": "pii.planted@example.com", "memo": "nothing"}',
        # a caller's *_hash field holding the address itself
        b'{"email_hash": "Pii.Planted@Example.COM", "phone_hash": "5550100999"}',
        b'{"email_hash": "Pii.Planted@Example.COM", "phone_hash": "5550100999", ',
        # personal fields: names, addresses, free text (dropped by default)
        b'{"name": "Ada Lovelace", "address": {"street": "12 Analytical Way"}}',
        b'{"items": [{"Full_Name": "Ada Lovelace"}], "shipping_address": "12 Analytical Way"}',
        b'{"name": "Ada Lovelace", "address": "12 Analytical Way", oops',
        b'{"n\\u0061me": "Ada Lovelace"}',
        b'{"address": {"line": "12 Analytical Way", "x": [1, "}"]}, "name": "Ada Lovelace", ',
        b'{"Address": ["12 Analytical Way", {"to": "Ada Lovelace"}], oops',
        b'{"address": {"line": "12 Analytical Way", "to": "Ada Lovel',
        # cut inside the address by its producer
        b'{"memo": "write to pii.planted@examp',
    ],
)
def test_no_planted_personal_data_survives_in_the_copy_or_its_decoded_form(raw):
    copy = REDACT.redact(raw)
    assert copy.form != "exact", copy
    assert hits(copy.copy) == [], copy.copy
    for name in copy.dropped:
        assert name in CONFIG.privacy.personal_fields


@settings(max_examples=300, deadline=None)
@given(
    seed=st.integers(0, 2**32),
    where=st.sampled_from(["value", "key", "nested", "list", "pii_field", "name"]),
    cut=st.none() | st.floats(0.3, 1.0),
    pii=st.sampled_from([EMAIL, PHONE, "Ada Lovelace"]),
)
def test_planted_data_written_any_way_is_never_in_a_copy(seed, where, cut, pii):
    """Any escaping of any character, any place, whole or cut off: no clear copy."""
    rng = random.Random(seed)
    if pii == "Ada Lovelace":  # a name is personal by its field, not its shape
        where = rng.choice(["name", "nested_name"])
    field = {"value": "memo", "nested": "memo", "list": "memo", "key": "k",
             "pii_field": rng.choice(["email", "phone", "EMAIL"]), "name": "name",
             "nested_name": "last_name"}[where]  # fmt: skip
    secret = escaped(pii, rng)
    if where == "key":
        body = f'{{"event_id": "e1", "{secret}": 1}}'
    elif where in ("nested", "nested_name"):
        body = f'{{"event_id": "e1", "a": {{"b": [{{"{field}": "x {secret} y"}}]}}}}'
    elif where == "list":
        body = f'{{"event_id": "e1", "{field}": ["{secret}", 1]}}'
    else:
        body = f'{{"event_id": "e1", "{field}": "{secret}", "n": 3}}'
    raw = body.encode()
    start = raw.index(secret.encode())
    if cut is not None:
        raw = raw[: max(start + 1, int(len(raw) * cut))]  # cut after its first character
    copy = REDACT.redact(raw)
    left = hits(copy.copy)
    # Cut before its "@", an address's start is a word like any other: not findable.
    at = raw.find(b"@", start) if b"@" in raw[start:] else raw.find(b"\\u0040", start)
    assert left == [] or (pii == EMAIL and at < 0 and left == ["pii.planted"]), (raw, copy)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"event_id": "e1", "event_time": "+10000-01-01T00:00:00Z", "n": 1}',
        b'{"event_id": "e1", "promised_delivery_time": "+010000-01-01T00:00:00.000+00:00"}',
        b'{"event_id": "e1", "event_time": "2026-01-01T00:00:00+01:00"}',
        b"not json at all, +10000-01-01T00:00:00Z",
        b'{"event_id": "e1", "amount": 12.5, "text_id": "\\u00e9"}',
        b'\xef\xbb\xbf{"event_id": "e1"}',
        b"\xff\xfe{}",
        b'{"event_id": "e1", "n": [1, 2, {"deep": true}]}',
        b"",
    ],
)
def test_non_personal_messages_are_kept_byte_for_byte(raw):
    """issue 34: the phone pattern rewrote "+10000-01-01T..." dates; nothing else changes."""
    copy = REDACT.redact(raw)
    assert (copy.form, copy.copy, copy.dropped) == ("exact", raw, [])


def test_personal_fields_are_kept_when_configured():
    keep = Redactor(load_config(None, ["privacy.dead_letter_personal_fields=keep"], env={}))
    raw = b'{"name": "Ada Lovelace", "email": "pii.planted@example.com"}'
    copy = keep.redact(raw)
    decoded = orjson.loads(copy.copy)
    assert decoded["name"] == "Ada Lovelace" and "email" not in decoded
    assert decoded["email_hash"] == EventValidator(CONFIG).pii_hash("email", EMAIL)
    own = Redactor(load_config(None, ["privacy.personal_fields=[nickname]"], env={}))
    decoded = orjson.loads(own.redact(b'{"name": "Ada", "NickName": "Countess"}').copy)
    assert decoded == {"name": "Ada"}


def test_deep_nesting_is_redacted_as_text():
    raw = b'{"a": ' + b"[" * 900 + b'"pii.planted@example.com"' + b"]" * 900 + b"}"
    copy = REDACT.redact(raw)
    assert copy.form == "text" and hits(copy.copy) == []
    value = {"email": {"x": [[[[[]]]]]}}
    for _ in range(300):  # past orjson's 255 levels: the hash is of the type name
        value = {"email": value}
    copy = REDACT.redact(json.dumps(value).encode())
    assert copy.form == "json" and b"email_hash" in copy.copy


def _invalid(value: bytes, reason: str = "message on t[0]@5: not valid") -> InvalidEvent:
    return InvalidEvent(reason, None, "c1", b"k", value, "t", 0, 5)


def test_an_oversize_message_keeps_a_bounded_prefix_its_length_and_sha256():
    """issue 34: a 0.75 MB message's dead letter held it all in base64 (4/3 larger), the
    producer refused it and it failed every start from the outbox."""
    raw = orjson.dumps({"event_id": "big", "email": EMAIL, "pad": "x" * 900_000})
    record = orjson.loads(dead_letter_record(_invalid(raw), REDACT))
    limit = CONFIG.processing.dead_letter_max_original_bytes
    kept = base64.b64decode(record["original_base64"])
    assert len(kept) == limit and record["original_truncated"] is True
    assert record["original_bytes"] == len(raw)
    assert record["original_sha256"] == hashlib.sha256(raw).hexdigest()
    assert record["original_copy"] == "json" and hits(kept) == []
    assert REDACT.redact(raw).copy.startswith(kept)
    assert len(dead_letter_record(_invalid(raw), REDACT)) <= dead_letter_bytes(limit)


def test_a_whole_redacted_copy_gives_no_unkeyed_hash_of_the_original():
    small = b'{"event_id": "e", "email": "pii.planted@example.com"}'
    record = orjson.loads(dead_letter_record(_invalid(small), REDACT))
    assert record["original_sha256"] is None and record["original_truncated"] is False
    assert record["original_copy"] == "json" and hits(record["original_text"]) == []
    plain = orjson.loads(dead_letter_record(_invalid(b"{oops"), REDACT))
    assert plain["original_sha256"] == hashlib.sha256(b"{oops").hexdigest()
    assert (plain["original_text"], plain["original_copy"]) == ("{oops", "exact")


@given(st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_a_reason_never_shows_an_address_even_cut(tail):
    reason = f"event 'e' on t[0]@5: field 'category' ... got 'pii.planted@exa{tail!r}"
    record = orjson.loads(dead_letter_record(_invalid(b"{}", reason), REDACT))
    assert hits(record["reason"]) == []


_SAFE = st.one_of(st.integers(-5, 10**6), st.floats(-1e6, 1e6), st.booleans(), st.none(),
                  st.text("abcxyz -_.0123456789", max_size=12))  # fmt: skip
_KEYS = ["event_id", "customer_id", "amount", "misc", "Email", "email", "PHONE", "phone",
         "name", "Address", "note", "first_name", "items"]  # fmt: skip


@settings(max_examples=300)
@given(st.lists(st.tuples(st.sampled_from(_KEYS),
                          st.one_of(_SAFE, st.lists(_SAFE, max_size=3),
                                    st.dictionaries(st.sampled_from(["a", "b"]), _SAFE,
                                                    max_size=2))),
                unique_by=lambda kv: kv[0], max_size=8))  # fmt: skip
def test_a_json_copy_is_the_message_with_exactly_the_documented_changes(pairs):
    """docs/events.md, "What a dead letter keeps": an ``email`` / ``phone`` field (any
    case) becomes ``<name>_hash`` holding the keyed hash a valid event gets (of the text),
    a field of ``privacy.personal_fields`` is left out and named in ``dropped_fields``,
    and everything else is kept as it was, in its order: the copy is that object as
    compact JSON (``exact``: the original bytes, when nothing changes)."""
    validator = EventValidator(CONFIG)
    personal = {f.casefold() for f in CONFIG.privacy.personal_fields}
    raw = json.dumps(dict(pairs)).encode()
    expected, dropped = {}, []
    for name, value in pairs:
        folded = name.casefold()
        if folded in ("email", "phone"):
            if value is not None:
                text = value if isinstance(value, str) else orjson.dumps(value).decode()
                expected[f"{name}_hash"] = validator.pii_hash(folded, text)
        elif folded in personal:
            dropped.append(folded)
        else:
            expected[name] = value
    record = orjson.loads(dead_letter_record(_invalid(raw), REDACT))
    copy = base64.b64decode(record["original_base64"])
    assert record["dropped_fields"] == sorted(set(dropped))
    assert record["original_bytes"] == len(raw) and record["original_truncated"] is False
    if expected == dict(pairs) and not dropped:
        assert (record["original_copy"], copy) == ("exact", raw)
        assert record["original_sha256"] == hashlib.sha256(raw).hexdigest()
    else:
        assert record["original_copy"] == "json"
        assert copy == orjson.dumps(expected)
        assert record["original_sha256"] is None


_EMPTY = object()  # an innermost container left empty


def _nested(levels: int, kinds: str, leaf: object) -> bytes:
    """An object ``{"email": ..., "x": ...}`` holding a chain of containers, ``levels`` of
    them in all counting itself (each ``{`` or ``[`` in turn from ``kinds``), the
    innermost holding ``leaf``."""
    value = leaf
    for level in range(levels - 1, 0, -1):  # innermost first
        brace = kinds[level % len(kinds)] == "{"
        items = [] if value is _EMPTY else [value]
        value = {f"x{i}": item for i, item in enumerate(items)} if brace else items
    top: dict = {"event_id": "e1", "email": EMAIL}
    if value is not _EMPTY:
        top["x"] = value
    return json.dumps(top).encode()


@pytest.mark.parametrize("leaf", ["text", 7, None, True, _EMPTY], ids=repr)
@pytest.mark.parametrize("kinds", ["{", "[", "{["])
@pytest.mark.parametrize("levels", [1, 2, 63, 64, 65, 66, 200])
def test_json_nested_deeper_than_64_levels_and_only_that_is_redacted_as_text(levels, kinds, leaf):
    """docs/events.md: "JSON nested deeper than 64 levels is treated as text": a level is
    an object or an array, whatever the innermost one holds (a number, true, null, a
    string or nothing); either way no planted data is left."""
    copy = REDACT.redact(_nested(levels, kinds, leaf))
    assert copy.form == ("json" if levels <= 64 else "text"), (levels, kinds, leaf)
    assert hits(copy.copy) == []
    if copy.form == "json":
        email_hash = EventValidator(CONFIG).pii_hash("email", EMAIL)
        assert orjson.loads(copy.copy)["email_hash"] == email_hash


# No quote or backslash, and none of the characters JSON writes as \b \f \n \r \t:
# text has only its \uXXXX escapes decoded.
_NO_QUOTE = st.characters(blacklist_characters='"\\\b\f\n\r\t', blacklist_categories=("Cs",))


@pytest.mark.parametrize("field", ["email", "EMAIL", "Phone", "email_hash", "Phone_Hash"])
@settings(max_examples=60)
@given(value=st.text(_NO_QUOTE, max_size=30) | st.sampled_from([EMAIL, f"  {EMAIL} ", PHONE]))
def test_a_text_copy_hashes_a_pii_field_as_a_valid_event_would(field, value):
    """docs/events.md: a message that is not JSON "gets the same treatment": its ``email`` /
    ``phone`` fields (and ``*_hash`` fields not in our format) get the keyed hash that
    valid events get, of the field's text (not of its quotes) -- the hash its JSON copy
    holds."""
    from crmstream.operators.fields import HASH_FORMAT

    if field.endswith("_Hash") or field.endswith("_hash"):
        assume(HASH_FORMAT.fullmatch(value) is None)
    kind = field.casefold().removesuffix("_hash")
    expected = EventValidator(CONFIG).pii_hash(kind, value)
    head = f'{{"event_id": "e1", "{field}": {json.dumps(value, ensure_ascii=False)}'
    as_json = orjson.loads(REDACT.redact((head + "}").encode()).copy)
    assert as_json[field if field.casefold().endswith("_hash") else f"{field}_hash"] == expected
    copy = REDACT.redact((head + ", oops").encode())
    assert copy.form == "text" and expected in copy.copy.decode()


_SECRET = st.recursive(
    st.sampled_from(["SECRET", "SECRET } ] , {", 'SECRET "q" [', 7, None]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["k", "v", "SECRETK"]), inner, max_size=3)
    ),
    max_leaves=8,
)
_PLAIN = st.recursive(
    st.sampled_from(["ok", "a ] b } c", 'q "x" {', 12, False, None]),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.sampled_from(["k", "v"]), inner, max_size=3)
    ),
    max_leaves=6,
)
_TEXT_FIELDS = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["address", "Name", "note", "shipping_address"]), _SECRET),
        st.tuples(st.sampled_from(["event_id", "misc", "amount", "ctx"]), _PLAIN),
    ),
    min_size=1, max_size=6, unique_by=lambda f: f[0].casefold(),
)  # fmt: skip


@settings(max_examples=200)
@given(fields=_TEXT_FIELDS, cut=st.none() | st.integers(0, 40))
@example(fields=[("address", {"k": [7], "v": "SECRET"}), ("misc", "ok")], cut=None)
@example(fields=[("note", [[], {"k": {}}, "SECRET"]), ("ctx", {"k": [1]})], cut=None)
@example(fields=[("misc", 1), ("address", {"k": "} ]", "v": ["SECRET"]}), ("amount", 2)], cut=None)
@example(fields=[("misc", 1), ("Name", {"k": {"v": [7]}, "SECRETK": "SECRET"})], cut=12)
def test_a_text_copy_drops_exactly_the_personal_fields_values(fields, cut):
    """docs/events.md: in a message that is not JSON, personal fields are found where they
    are written as ``"name": value`` and left out, whatever their value (a string, or an
    object or array nested any depth, brackets inside strings included; cut off by the
    end of the message): nothing of the value stays, and nothing after it goes."""
    written = [f'"{name}": {json.dumps(value)}' for name, value in fields]
    personal = [name.casefold() for name, _ in fields if name.casefold() in
                CONFIG.privacy.personal_fields]  # fmt: skip
    if cut is not None and fields[-1][0].casefold() in personal:
        name_len = len(fields[-1][0]) + 4  # "name":<space>
        written[-1] = written[-1][: name_len + cut]  # the message ends inside the value
        raw = ("{" + ", ".join(written)).encode()
    else:
        raw = ("{" + ", ".join(written) + ", oops").encode()
    copy = REDACT.redact(raw)
    text = copy.copy.decode()
    assert "SECRET" not in text, (raw, text)
    assert copy.dropped == personal
    at = 0
    for (name, _), part in zip(fields, written, strict=True):
        if name.casefold() not in personal:  # kept as written, in its place
            at = text.index(part, at) + len(part)
        else:
            at = text.index(f'"{name}"', at)
    assert copy.form == ("text" if personal else "exact")


@pytest.mark.parametrize(
    ("escapes", "decoded"),
    [
        ("\\u0041", "A"),
        ("\\u00e9\\u20AC", "é€"),
        ("\\ud7ff", "\ud7ff"),  # the last character before the surrogates
        ("\\ue000", "\ue000"),  # the first after them
        ("\\uffff", "\uffff"),
        ("\\ud800\\udc00", "\U00010000"),  # a pair: one character
        ("\\ud83d\\ude00", "\U0001f600"),
        ("\\uD83D\\uDE00", "\U0001f600"),
        ("\\udbff\\udfff", "\U0010ffff"),
        # a surrogate that is not half of a pair has no character: as written
        ("\\ud800", "\\ud800"),
        ("\\udbff x", "\\udbff x"),
        ("\\udc00", "\\udc00"),
        ("\\uDFFF", "\\uDFFF"),
        ("\\ud800\\ud800", "\\ud800\\ud800"),
        ("\\ude00\\ud83d", "\\ude00\\ud83d"),  # low then high: not a pair
        ("\\udc00\\udc00", "\\udc00\\udc00"),
        ("\\u0041\\udc00", "A\\udc00"),
        ("\\ud7ff\\udc00", "\ud7ff\\udc00"),
        ("\\ue000\\udfff", "\ue000\\udfff"),
    ],
)
def test_a_text_copy_has_its_escapes_decoded_and_lone_surrogates_as_written(escapes, decoded):
    """The module docstring: text has its ``\\uXXXX`` escapes decoded (a surrogate pair is
    one character); a lone surrogate has no character and stays written as its escape."""
    raw = f"not json: {escapes} mail {EMAIL}".encode()
    copy = REDACT.redact(raw)
    assert copy.form == "text"
    text = copy.copy.decode("utf-8", "surrogateescape")
    assert text.startswith(f"not json: {decoded} mail <email_hash:"), text
    assert hits(copy.copy) == []


_PLAIN_KEYS = st.sampled_from(["a", "b", "event_id", "c d"])
_PLAIN_JSON = st.recursive(
    st.integers(-5, 10**6) | st.booleans() | st.none() | st.text("abc xyz-_.0123", max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_PLAIN_KEYS, inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=200)
@given(value=_PLAIN_JSON, indent=st.none() | st.integers(0, 2))
@example(value={"a": {"b": 1}}, indent=None)
@example(value={"event_id": "e1", "a": [{"a": 1, "b": {"a": 2}}]}, indent=None)
@example(value=[{"a": {"b": {"a": {"b": 1}}}}], indent=1)
def test_json_with_nothing_to_redact_is_kept_byte_for_byte_at_any_nesting(value, indent):
    """docs/events.md: ``exact``, the original bytes, when there is nothing to redact --
    objects inside objects and arrays included, however it is spaced."""
    raw = json.dumps(value, indent=indent).encode()
    copy = REDACT.redact(raw)
    assert (copy.form, copy.copy, copy.dropped) == ("exact", raw, [])
