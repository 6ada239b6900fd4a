"""What one crmstream process shares between its shards: clients, codecs and the clock.

This module owns the per-process objects the dataflow's steps use. They are
built once per process, lazily, because Bytewax builds a step's logic inside
each worker; connections are made on first use so that merely constructing a
flow touches no network.
"""

from __future__ import annotations

import gc
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

from crmstream.config import CrmConfig
from crmstream.flows.sink import DeliveryCheckedProducer
from crmstream.operators.events import EventValidator
from crmstream.operators.rules import TriggerBuilder
from crmstream.state.store import StateStore, connect


def tune_gc(young_threshold: int) -> None:
    """The flow's garbage-collector policy (``processing.gc_young_threshold``).

    The flow's per-event objects (messages, parsed events, their dicts) hold no
    reference cycles, so the collector finds nothing in them, but with Python's
    defaults it scans them thousands of times a second, and a step of a
    backfill holds hundreds of thousands of them. Collect young objects once
    ``young_threshold`` tracked objects were allocated, net of those freed,
    since the last collection (700 by default), and freeze what start-up built
    (modules, Numba's compiled kernels, the configuration) so that no
    collection scans it again. 0 leaves Python's settings alone.
    """
    if young_threshold <= 0:
        return
    gc.collect()
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(young_threshold, older, oldest)


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


class ShopClock:
    """Shop time that runs ``speed`` times as fast as the wall clock, from ``start_ms``.

    The accelerated demo gives the generator (its events' times) and the flow (its
    ``Runtime.clock_ms``: the idle watermark, future-skew checks, ``emitted_at``) the
    same one, so an hour-long cart delay or a 30-day win-back passes in seconds while
    the flow itself runs unchanged: timers fire as the event-time watermark passes them.
    """

    def __init__(self, speed: float = 1.0, start_ms: int | None = None):
        if speed <= 0:
            raise ValueError(f"speed must be > 0, got {speed}")
        self.speed = speed
        self.start_ms = wall_clock_ms() if start_ms is None else start_ms
        self._t0_ns = time.monotonic_ns()

    def __call__(self) -> int:
        return self.start_ms + int((time.monotonic_ns() - self._t0_ns) * self.speed / 1e6)


@dataclass
class Endpoints:
    """Resolved infrastructure addresses (configured, or of the embedded stack)."""

    brokers: list[str]
    redis_url: str


@dataclass
class Runtime:
    """Per-process shared objects; the clock is injected so tests can drive it."""

    config: CrmConfig
    endpoints: Endpoints
    clock_ms: Callable[[], int] = wall_clock_ms

    @cached_property
    def store(self) -> StateStore:
        client = connect(self.endpoints.redis_url, self.config.redis)
        return StateStore(client, self.config.redis.key_prefix, self.config.policies.audit_salt)

    @cached_property
    def producer(self) -> DeliveryCheckedProducer:
        kafka = self.config.kafka
        return DeliveryCheckedProducer(
            self.endpoints.brokers,
            kafka.producer_properties(),
            kafka.delivery_timeout_seconds,
            unsent_to=kafka.topics.dead_letter,
            copy_bytes=self.config.processing.dead_letter_max_original_bytes,
        )

    def close(self) -> None:
        """Flush and drop the clients (before the infrastructure goes away)."""
        producer = self.__dict__.pop("producer", None)
        if producer is not None:
            producer.flush()
        store = self.__dict__.pop("store", None)
        if store is not None:
            store.client.close()

    def use_config(self, config: CrmConfig) -> None:
        """Run with ``config`` from now on (e.g. with the active value model): the
        objects built from the old one are built again when next used."""
        self.config = config
        for name in ("validator", "triggers"):
            self.__dict__.pop(name, None)

    @cached_property
    def validator(self) -> EventValidator:
        return EventValidator(self.config)

    @cached_property
    def triggers(self) -> TriggerBuilder:
        return TriggerBuilder(self.config)
