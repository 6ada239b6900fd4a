"""Durable event-time timers: one Redis sorted set per shard, scored by due time.

This module owns the timer keys and their member format. A timer is a
wake-up call for one customer: ``<customer>\\x1f<kind>[\\x1f<ref>]`` scored by
its due time (epoch ms). Scheduling the same member again moves it; the
condition behind a timer is checked again against the customer's state when it
fires, so a stale or moved timer is harmless. Timer writes ride in the shard's
MULTI/EXEC with the state they belong to, so they survive restarts exactly as
the state does. Firing reads only the due range of one shard's set, never all
customers.
"""

from __future__ import annotations

import time
from typing import NamedTuple

import redis

from crmstream.metrics import observe_redis

SEP = "\x1f"


class Timer(NamedTuple):
    customer: str
    kind: str
    ref: str  # e.g. an order id; "" when the kind needs none
    due_ms: int

    @property
    def member(self) -> str:
        return timer_member(self.customer, self.kind, self.ref)


def timer_member(customer: str, kind: str, ref: str = "") -> str:
    return f"{customer}{SEP}{kind}{SEP}{ref}"


def parse_member(member: bytes | str, due_ms: float) -> Timer:
    text = member.decode() if isinstance(member, bytes) else member
    customer, kind, ref = text.split(SEP, 2)
    return Timer(customer, kind, ref, int(due_ms))


class TimerStore:
    """Per-shard timer sets."""

    def __init__(self, client: redis.Redis, prefix: str):
        self._client = client
        self._prefix = prefix

    def key(self, shard: int) -> str:
        return f"{self._prefix}:timers:{shard}"

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
        return [parse_member(member, score) for member, score in raw]

    def pending(self, shard: int) -> int:
        return int(self._client.zcard(self.key(shard)))
