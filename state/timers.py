"""Durable event-time timers: one Redis sorted set per shard, scored by due time.

This module owns the timer keys and their member format. A timer is a
wake-up call for one customer, a member scored by its due time (epoch ms):

    b"\\xff" <customer's UTF-8 length, decimal> ":" <customer> "\\x1f" <kind> "\\x1f" <ref>

The customer is length-prefixed, so no customer id can be confused with
another whatever it contains; the kind is one of the catalogue's names
(never holding the separator) and the ref (an order id, a held trigger
record, ...) runs to the end. The leading byte 0xFF never occurs in UTF-8, so a
member of the earlier format, ``<customer>\\x1f<kind>\\x1f<ref>`` (all text, split
on the first separators: a customer id holding ``\\x1f`` was misread, issue 34),
is told apart and still parsed: Redis may hold such members from an earlier
version. Scheduling the same member again moves it; the condition behind a
timer is checked again against the customer's state when it fires, so a stale
or moved timer is harmless. Timer writes ride in the shard's MULTI/EXEC with the
state they belong to, so they survive restarts exactly as the state does.
Firing reads only the due range of one shard's set, never all customers.
"""

from __future__ import annotations

import logging
import time
from typing import NamedTuple

import orjson
import redis
from redis.cluster import RedisCluster

from crmstream.metrics import get_metrics, observe_redis

log = logging.getLogger(__name__)

# A timer due before 1970 cannot fire: the state keeps send times as unsigned
# minutes since 1970 (state/encoding.py), and before year 1 there is no date at all.
EARLIEST_DUE_MS = 0
SEP = "\x1f"
MARK = b"\xff"  # first byte of a member in the length-prefixed format (never in UTF-8)
_SEP = SEP.encode()


class Timer(NamedTuple):
    customer: str
    kind: str
    ref: str  # e.g. an order id; "" when the kind needs none
    due_ms: int

    @property
    def member(self) -> bytes:
        return timer_member(self.customer, self.kind, self.ref)


def timer_member(customer: str, kind: str, ref: str = "") -> bytes:
    """The sorted-set member of a timer (the format is in the module docstring)."""
    if SEP in kind:
        raise ValueError(f"timer kind {kind!r} holds the separator")
    who = customer.encode()
    return b"%s%d:%s%s%s%s%s" % (MARK, len(who), who, _SEP, kind.encode(), _SEP, ref.encode())


def member_prefix(customer: str) -> bytes:
    """What every member of the customer's timers starts with (length-prefixed format)."""
    who = customer.encode()
    return b"%s%d:%s%s" % (MARK, len(who), who, _SEP)


def parse_member(member: bytes | str, due_ms: float) -> Timer:
    """A member of either format as a ``Timer``; ValueError names a malformed one."""
    raw = member.encode() if isinstance(member, str) else member
    if raw[:1] != MARK:  # written by an earlier version: text split on the separators
        parts = raw.decode().split(SEP, 2)
        if len(parts) != 3:
            raise ValueError(f"not a timer member: {raw[:80]!r}")
        return Timer(parts[0], parts[1], parts[2], int(due_ms))
    length, colon, rest = raw[1:].partition(b":")
    if not colon or not length.isdigit() or rest[int(length) : int(length) + 1] != _SEP:
        raise ValueError(f"not a timer member: {raw[:80]!r}")
    n = int(length)
    kind, sep, ref = rest[n + 1 :].partition(_SEP)
    if not sep:
        raise ValueError(f"not a timer member: {raw[:80]!r}")
    return Timer(rest[:n].decode(), kind.decode(), ref.decode(), int(due_ms))


class TimerStore:
    """Per-shard timer sets."""

    def __init__(self, client: redis.Redis, prefix: str):
        self._client = client
        self._prefix = prefix

    def key(self, shard: int) -> str:
        return f"{self._prefix}:timers:{shard}"

    def quarantine_key(self, shard: int) -> str:
        """The shard's quarantine (``flows.quarantine``): member -> JSON of why."""
        return f"{self._prefix}:quarantine:{shard}"

    def due(self, shard: int, upto_ms: int, limit: int | None = None) -> list[Timer]:
        """The shard's timers due at or before ``upto_ms``, earliest first (at most
        ``limit`` of them; None: all)."""
        started = time.perf_counter()
        if limit is None:
            raw = self._client.zrangebyscore(self.key(shard), "-inf", upto_ms, withscores=True)
        else:
            raw = self._client.zrangebyscore(
                self.key(shard), "-inf", upto_ms, start=0, num=limit, withscores=True
            )
        observe_redis("timers", started)
        if raw and raw[0][1] < EARLIEST_DUE_MS:  # earliest first: one look suffices
            raw = self._drop_unrepresentable(shard, raw)
        timers: list[Timer] = []
        unreadable: list[tuple[bytes, float, Exception]] = []
        for member, score in raw:
            try:
                timers.append(parse_member(member, score))
            except (ValueError, UnicodeDecodeError) as error:
                unreadable.append((member, score, error))
        if unreadable:
            gone = self._set_aside(shard, unreadable)
            raw = [(member, score) for member, score in raw if member not in gone]
        if any(member[:1] != MARK for member, _ in raw):
            raw = self._migrate(shard, raw)
            return [parse_member(member, score) for member, score in raw]
        return timers

    def _set_aside(self, shard: int, unreadable: list[tuple[bytes, float, Exception]]) -> set:
        """Members that name no timer (damaged in Redis) belong to no customer that could
        be set aside with them: they move from the timer set to the shard's quarantine in
        one MULTI/EXEC, logged, so they never stop a round (DESIGN.md decision 14)."""
        now_ms = int(time.time() * 1000)
        entries = {
            member: orjson.dumps({"customer": "(unreadable)", "kind": "unreadable", "ref": "",
                                  "due_ms": int(score), "at_ms": now_ms,
                                  "reason": f"unreadable timer member: {error}"})
            for member, score, error in unreadable
        }  # fmt: skip
        # One MULTI/EXEC where the two keys may share one (not on a Redis Cluster: the
        # quarantine first, so a member is never in neither).
        pipe = self._client.pipeline(transaction=not isinstance(self._client, RedisCluster))
        pipe.hset(self.quarantine_key(shard), mapping=entries)
        pipe.zrem(self.key(shard), *entries)
        pipe.execute()
        get_metrics().quarantined_customers.labels(str(shard)).inc(len(entries))
        log.error(
            "shard %d: %d timer member(s) that name no timer moved to the quarantine "
            "(crmstream quarantine list): %s",
            shard,
            len(entries),
            ", ".join(repr(m[:80]) for m in list(entries)[:5]),
        )
        return set(entries)

    def _drop_unrepresentable(
        self, shard: int, raw: list[tuple[bytes, float]]
    ) -> list[tuple[bytes, float]]:
        """Timers due before 1970 cannot fire (``EARLIEST_DUE_MS``). Only a version
        before issue 34 could write one (a promise of -1e15 ms): they are removed,
        logged, and not fired."""
        gone = [member for member, due in raw if due < EARLIEST_DUE_MS]
        self._client.zrem(self.key(shard), *gone)
        log.warning(
            "shard %d: removed %d timer(s) due before 1970, which cannot fire "
            "(written before their times were validated): %s",
            shard,
            len(gone),
            ", ".join(repr(m[:80]) for m in gone[:5]),
        )
        return [(member, due) for member, due in raw if due >= EARLIEST_DUE_MS]

    def _migrate(self, shard: int, raw: list[tuple[bytes, float]]) -> list[tuple[bytes, float]]:
        """Rewrite due members of the earlier format in the current one, in one
        MULTI/EXEC, before they fire: a fired timer is removed by its current-format
        member. ``ZADD NX``: a current-format member of the same timer (scheduled since)
        keeps its own due time, and the earlier one is dropped without firing."""
        earlier = [(m, due) for m, due in raw if m[:1] != MARK]
        pipe = self._client.pipeline(transaction=True)
        for member, due in earlier:
            pipe.zadd(self.key(shard), {parse_member(member, due).member: due}, nx=True)
            pipe.zrem(self.key(shard), member)
        added = pipe.execute()[::2]
        kept = {m for (m, _), new in zip(earlier, added, strict=True) if new}
        return [
            (m if m[:1] == MARK else parse_member(m, due).member, due)
            for m, due in raw
            if m[:1] == MARK or m in kept
        ]

    def pending(self, shard: int) -> int:
        return int(self._client.zcard(self.key(shard)))
