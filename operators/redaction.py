"""What a dead letter may keep of a rejected message: personal data hashed or dropped.

This module owns the redaction of the copy of a rejected message that its
dead letter carries (docs/events.md, "dead letters"; docs/guarantees.md §5).
It works on decoded strings, so JSON escapes (``\\u0040`` for ``@``) cannot
hide an address from it:

- a message that parses as JSON is redacted value by value and written again
  (compact JSON): ``email`` and ``phone`` fields, and ``*_hash`` fields not in
  our hashes' format, become keyed hashes (``privacy.pii_salt``); fields named
  in ``privacy.personal_fields`` (names, addresses, free text) are dropped
  unless ``privacy.dead_letter_personal_fields`` is ``keep``; e-mail addresses
  and ``+``-international phone numbers in any other string, keys included,
  become ``<email_hash:...>`` / ``<phone_hash:...>``. ISO-8601 dates with an
  expanded year (``+10000-01-01T...``) are not phone numbers. A message nested
  deeper than ``MAX_DEPTH`` is treated as text;
- anything else is text (invalid UTF-8 kept byte for byte): its ``\\uXXXX``
  escapes are decoded first, then the same patterns, and ``"email"``,
  ``"phone"`` and personal fields written as JSON fields, are applied.

When nothing needed redaction the copy is the original bytes exactly.
"""

from __future__ import annotations

import hashlib
import re
from typing import Any, NamedTuple

import orjson

from crmstream.config import CrmConfig
from crmstream.operators.fields import HASH_FIELDS, HASH_FORMAT

# Data minimisation: never kept in state or emitted; their keyed hashes are.
PII_FIELDS = frozenset({"email", "phone"})
MAX_DEPTH = 64  # deeper JSON is redacted as text (orjson writes at most 255 levels)
# Anything@anything: an address cut short (a message cut by its producer, a value
# cut in a reason) has no dot in its domain. Starts only where a run of address
# characters starts: linear time on long runs. \w is Unicode-aware.
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@[\w.-]*")
_PHONE_INTL = re.compile(r"\+\d[\d ()./-]{6,}\d")  # +CC ... anywhere
# In reasons (our own text), values may be cut at 60 characters: a cut number has
# fewer digits.
_PHONE_CUT = re.compile(r"\+\d[\d ()./-]{3,}")
# "+10000-01-01T00:00:00Z": an ISO-8601 date with an expanded year, not a phone.
_ISO_DATE = re.compile(r"\+\d{4,6}-\d\d-\d\d(?=T|$)")
# With no escapes a string holds no quote, so each match ends a key: more matches than
# the decoded value has keys means a key written twice (its first value is not in the
# value); escaped quotes can only add matches, which writes the copy again (safe).
_KEY_END = re.compile(rb'"\s*:')
_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})(?:\\u([dD][c-fC-F][0-9a-fA-F]{2}))?")


class _TooDeep(Exception):
    """The message nests deeper than ``MAX_DEPTH``: it is redacted as text."""


class Redacted(NamedTuple):
    """A rejected message's copy for its dead letter."""

    copy: bytes
    form: str  # "exact": the original bytes; "json": redacted and written again; "text"
    dropped: list[str]  # personal fields left out, by their name in privacy.personal_fields

    @property
    def changed(self) -> bool:
        return self.form != "exact"


def keyed_hash(key: bytes, field: str, value: str) -> str:
    """Keyed BLAKE2b-128 of a normalised e-mail (trimmed, lower case) or phone (digits)."""
    text = value.strip().lower() if field == "email" else "".join(filter(str.isdigit, value))
    return hashlib.blake2b(text.encode(), key=key, digest_size=16).hexdigest()


def pii_key(config: CrmConfig) -> bytes:
    """The key of the keyed hashes, from ``privacy.pii_salt``."""
    return hashlib.blake2b(config.privacy.pii_salt.encode()).digest()[:64]


class Redactor:
    """Redacts rejected messages for the dead-letter topic, built once from the config."""

    def __init__(self, config: CrmConfig):
        self._key = pii_key(config)
        privacy = config.privacy
        self._personal = frozenset(
            () if privacy.dead_letter_personal_fields == "keep" else privacy.personal_fields
        )
        names = sorted(PII_FIELDS.union(HASH_FIELDS, self._personal), key=len, reverse=True)
        alternatives = "|".join(map(re.escape, names))
        # A field's name as written in JSON text, and its colon (``_value_end`` finds
        # where its value ends).
        self._field = re.compile(rf'"({alternatives})"\s*:\s*', re.IGNORECASE)
        self.max_original_bytes = config.processing.dead_letter_max_original_bytes

    def redact(self, raw: bytes) -> Redacted:
        """The copy of ``raw`` a dead letter may carry."""
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return self._redact_text(raw)
        dropped: list[str] = []
        try:
            clean = self._value(obj, dropped, 0)
        except _TooDeep:
            return self._redact_text(raw)
        if clean == obj and not dropped and len(_KEY_END.findall(raw)) == _count_keys(obj):
            return Redacted(raw, "exact", [])
        return Redacted(orjson.dumps(clean), "json", dropped)

    def text(self, text: str) -> str:
        """E-mail addresses and +international phone numbers in ``text`` hashed."""
        text = _EMAIL.sub(lambda m: self._marker("email", m[0]), text)
        return _PHONE_INTL.sub(self._phone, text)

    def reason(self, reason: str) -> str:
        """A rejection reason with addresses and numbers hashed, also where the value
        shown was cut short."""
        reason = _EMAIL.sub(lambda m: self._marker("email", m[0]), reason)
        return _PHONE_CUT.sub(self._phone, reason)

    def pii_hash(self, field: str, value: str) -> str:
        return keyed_hash(self._key, field, value)

    def _marker(self, field: str, value: str) -> str:
        return f"<{field}_hash:{keyed_hash(self._key, field, value)}>"

    def _phone(self, match: re.Match[str]) -> str:
        if _ISO_DATE.match(match.string, match.start()):
            return match[0]
        return self._marker("phone", match[0])

    def _value(self, value: Any, dropped: list[str], depth: int) -> Any:
        if type(value) is str:
            return self.text(value)
        if type(value) is not list and type(value) is not dict:  # number, bool, null
            return value
        if depth >= MAX_DEPTH:  # an object or array inside MAX_DEPTH others
            raise _TooDeep
        if type(value) is list:
            return [self._value(item, dropped, depth + 1) for item in value]
        out: dict[str, Any] = {}
        for name, item in value.items():
            folded = name.casefold()
            if folded in PII_FIELDS:
                if item is not None:
                    out[f"{name}_hash"] = self.pii_hash(folded, _as_text(item))
            elif folded in HASH_FIELDS and not _is_hash(item):
                out[name] = self.pii_hash(folded[:-5], _as_text(item))
            elif folded in self._personal:
                dropped.append(folded)
            else:
                out[self.text(name)] = self._value(item, dropped, depth + 1)
        return out

    def _redact_text(self, raw: bytes) -> Redacted:
        # surrogateescape: invalid UTF-8 bytes come back unchanged when written again.
        original = raw.decode("utf-8", "surrogateescape")
        decoded = _ESCAPE.sub(_unescape, original)
        dropped: list[str] = []
        parts, at = [], 0
        for match in self._field.finditer(decoded):
            if match.start() < at:  # inside a value already replaced
                continue
            end = _value_end(decoded, match.end())
            value = decoded[match.end() : end]
            folded = match[1].casefold()
            if folded in self._personal:
                dropped.append(folded)
                shown = '"<dropped>"'
            elif folded in HASH_FIELDS and _is_hash(value.strip('"')):
                continue
            else:
                kind = folded.removesuffix("_hash")
                shown = f'"<{kind}_hash:{self.pii_hash(kind, value.strip(chr(34)))}>"'
            parts += (decoded[at : match.end()], shown)
            at = end
        text = self.text("".join(parts) + decoded[at:])
        if text == decoded:  # nothing to hide, escapes or not: the original as it came
            return Redacted(raw, "exact", [])
        return Redacted(text.encode("utf-8", "surrogateescape"), "text", dropped)


_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?')  # a JSON string, maybe cut off
_BARE = re.compile(r"[^,{}\[\]\s]*")  # a number, true, false, null
_NESTED = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"?|[{}\[\]]')  # strings and brackets


def _value_end(text: str, start: int) -> int:
    """Where the JSON value starting at ``start`` ends: past a string's closing quote,
    an object's or array's closing bracket (strings inside skipped), or a bare token;
    the end of the text for a value cut off by it. Scans in C, but for brackets."""
    if text.startswith('"', start):
        return _STRING.match(text, start).end()
    if not text.startswith(("{", "["), start):
        return _BARE.match(text, start).end()
    depth = 0
    for token in _NESTED.finditer(text, start):
        bracket = token[0]
        if bracket in "{[":
            depth += 1
        elif bracket in "}]":
            depth -= 1
            if depth == 0:
                return token.end()
    return len(text)


def _unescape(match: re.Match[str]) -> str:
    """A ``\\uXXXX`` escape (or a surrogate pair of them) as its character; a lone
    surrogate stays written as an escape (it has no character)."""
    first = int(match[1], 16)
    if match[2] is not None and 0xD800 <= first <= 0xDBFF:
        return chr(0x10000 + ((first - 0xD800) << 10) + (int(match[2], 16) - 0xDC00))
    head = f"\\u{match[1]}" if 0xD800 <= first <= 0xDFFF else chr(first)
    tail = "" if match[2] is None else f"\\u{match[2]}"  # a low surrogate alone: as written
    return head + tail


def _is_hash(value: Any) -> bool:
    return type(value) is str and HASH_FORMAT.fullmatch(value) is not None


def _as_text(value: Any) -> str:
    """What a PII field's value is hashed as: the text, or the JSON of anything else."""
    if type(value) is str:
        return value
    try:
        return orjson.dumps(value).decode()
    except orjson.JSONEncodeError:  # nested past orjson's 255 levels
        return type(value).__name__


def _count_keys(value: Any) -> int:
    """Keys of every object in a decoded value (nested at most ``MAX_DEPTH`` deep)."""
    if type(value) is dict:
        return len(value) + sum(_count_keys(v) for v in value.values())
    if type(value) is list:
        return sum(_count_keys(v) for v in value)
    return 0
