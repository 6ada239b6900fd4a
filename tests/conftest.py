"""Shared fixtures: one real Tansu broker and one real redis-server per test session.

Each test gets its own topics and Redis key prefix (``isolated_config``), so
tests share the servers without sharing data. Outputs are read back with
kafka-python, a Kafka client independent of the librdkafka the flow uses, the
way a downstream subscriber would read them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition

from crmstream.config import CrmConfig, load_config
from crmstream.config.schema import TopicsConfig
from crmstream.embedded import EmbeddedStack
from crmstream.flows.crm import run_in_process
from crmstream.flows.runtime import Endpoints, Runtime
from crmstream.flows.sink import DeliveryCheckedProducer
from crmstream.flows.source import StopSignals
from crmstream.topics import create_topics

T0_MS = 1_767_225_600_000  # 2026-01-01T00:00:00Z: scripted events count from here
_ids = itertools.count()


@pytest.fixture(scope="session")
def stack() -> Iterator[Endpoints]:
    """A real broker and redis-server for the whole session. At its end, every trigger id
    written to any test's trigger and suppression topics is checked once more
    (``one_record_per_trigger_id``)."""
    with EmbeddedStack(load_config()) as embedded:
        assert embedded.endpoints is not None
        yield embedded.endpoints
        one_record_per_trigger_id(embedded.endpoints)


def one_record_per_trigger_id(endpoints: Endpoints) -> None:
    """Over the whole session's outputs: a trigger id is in at most one record of a test's
    trigger and suppression topics together (the same record sent again, at least once,
    is one record; a trigger both sent and suppressed, or two different records under
    one id, is not)."""
    from kafka import KafkaConsumer

    consumer = KafkaConsumer(bootstrap_servers=list(endpoints.brokers),
                             enable_auto_commit=False, auto_offset_reset="earliest")  # fmt: skip
    try:
        # Tests whose topics take many runs' outputs ("-runs") check each run themselves.
        topics = [t for t in consumer.topics() if t.endswith((".triggers", ".suppressions"))
                  and not t.split(".")[0].endswith("-runs")]  # fmt: skip
        parts = [TopicPartition(t, p) for t in topics
                 for p in sorted(consumer.partitions_for_topic(t) or ())]  # fmt: skip
        if not parts:
            return
        consumer.assign(parts)
        consumer.seek_to_beginning()
        ends = {tp: end for tp, end in consumer.end_offsets(parts).items() if end > 0}
        seen: dict[tuple[str, str], dict[str, set]] = {}  # (test tag, id) -> topic -> records
        deadline = time.monotonic() + 300
        while ends:
            assert time.monotonic() < deadline, "could not read every output topic"
            for tp, messages in consumer.poll(timeout_ms=500, max_records=50_000).items():
                tag, kind = tp.topic.rsplit(".", 1)
                for msg in messages:
                    try:
                        record = orjson.loads(msg.value)
                    except orjson.JSONDecodeError:
                        continue  # a test's own raw bytes: not a trigger record
                    if not isinstance(record, dict) or "trigger_id" not in record:
                        continue
                    record.pop("emitted_at", None)
                    body = orjson.dumps(record, option=orjson.OPT_SORT_KEYS)
                    seen.setdefault((tag, record["trigger_id"]), {}).setdefault(kind, set()).add(
                        body
                    )
                if messages and messages[-1].offset + 1 >= ends.get(tp, 0):
                    ends.pop(tp, None)
        clashes = [
            (tag, trigger_id, {k: len(v) for k, v in kinds.items()})
            for (tag, trigger_id), kinds in seen.items()
            if len(kinds) > 1 or any(len(v) > 1 for v in kinds.values())
        ]
        assert clashes == [], f"trigger ids in more than one record: {clashes[:10]}"
    finally:
        consumer.close()


def isolated(
    stack: Endpoints, *overrides: str, partitions: int = 2, policies: bool = False
) -> CrmConfig:
    """A config with its own topics (created) and Redis key prefix, plus ``overrides``.

    ``policies=False`` (scenario tests of trigger conditions) turns quiet hours off
    and lifts the caps; policy tests pass ``policies=True``."""
    tag = f"t{next(_ids)}x{os.getpid()}"
    roles = TopicsConfig.model_fields
    sets = [f"kafka.topics.{r}={tag}.{r}" for r in roles]
    sets += [
        f"kafka.brokers={','.join(stack.brokers)}",
        f"redis.url={stack.redis_url}",
        f"redis.key_prefix={tag}",
        f"kafka.partitions={partitions}",
        "metrics.enabled=false",
    ]
    if not policies:
        sets += [
            "policies.quiet_hours.start=00:00",
            "policies.quiet_hours.end=00:00",
            "policies.caps.per_day=8",
            "policies.caps.per_week=8",
        ]
    sets += list(overrides)
    config = load_config(None, sets, env={})
    create_topics(list(stack.brokers), config)
    return config


@pytest.fixture
def isolated_config(stack: Endpoints, request: pytest.FixtureRequest):
    """Build a config with this test's own topics and key prefix (plus overrides)."""

    def build(*overrides: str, partitions: int = 2, policies: bool = False) -> CrmConfig:
        return isolated(stack, *overrides, partitions=partitions, policies=policies)

    return build


class Script:
    """Scripted input events for one test, produced with delivery checks."""

    def __init__(self, config: CrmConfig, endpoints: Endpoints):
        self.config = config
        self.endpoints = endpoints
        self._producer = DeliveryCheckedProducer(list(endpoints.brokers), {}, 30.0)
        self._seq = itertools.count()
        self.topics = config.kafka.topics.by_role

    def event(self, role: str, customer: str, kind: str, at_s: float = 0, **fields: Any) -> str:
        event_id = fields.pop("event_id", f"{customer}-{next(self._seq)}")
        body = {
            "event_id": event_id,
            "customer_id": customer,
            "event_type": kind,
            "event_time": T0_MS + int(at_s * 1000),
            **fields,
        }
        self.raw(role, orjson.dumps(body), customer.encode())
        return event_id

    def view(self, customer: str, category: str, at_s: float = 0, **fields: Any) -> str:
        return self.event(
            "clickstream",
            customer,
            "product_view",
            at_s,
            product_id=f"p-{next(self._seq)}",
            category=category,
            **fields,
        )

    def raw(self, role: str, value: bytes, key: bytes | None = b"k") -> None:
        self._producer.produce(self.topics[role], key, value)

    def flush(self) -> None:
        self._producer.flush()


@pytest.fixture
def script(stack: Endpoints):
    def build(config: CrmConfig) -> Script:
        return Script(config, stack)

    return build


def run_flow(config: CrmConfig, endpoints: Endpoints, clock_ms: Any = None) -> Runtime:
    """Run the flow until every input partition is read to its end."""
    runtime = (
        Runtime(config, endpoints) if clock_ms is None else Runtime(config, endpoints, clock_ms)
    )
    try:
        run_in_process(runtime, tail=False)
    finally:
        runtime.close()
    return runtime


@contextlib.contextmanager
def live_flow(
    config: CrmConfig, endpoints: Endpoints
) -> Iterator[tuple[StopSignals, threading.Thread]]:
    """The flow tailing its input in a thread, as ``crmstream run`` does; stopped and
    closed on exit. Set the signals' ``drain`` to have it read to the end and stop."""
    signals = StopSignals(threading.Event(), threading.Event())
    runtime = Runtime(config, endpoints)
    flow = threading.Thread(target=run_in_process, args=(runtime,),
                            kwargs={"tail": True, "signals": signals}, daemon=True)  # fmt: skip
    flow.start()
    try:
        yield signals, flow
    finally:
        signals.stop.set()
        flow.join(30)
        runtime.close()


def wait_until_started(config: CrmConfig, endpoints: Endpoints, timeout_s: float = 120) -> None:
    """Wait, on a condition, until a flow started with ``config`` has checked the state's
    layout (it records it before it reads any input): no sleep as synchronisation."""
    from crmstream.state.layout import layout_key
    from crmstream.state.store import StateStore, connect

    store = StateStore(connect(endpoints.redis_url, config.redis), config.redis.key_prefix)
    deadline = time.monotonic() + timeout_s
    try:
        while not store.client.exists(layout_key(store)):
            assert time.monotonic() < deadline, f"the flow did not start in {timeout_s:g} s"
            time.sleep(0.05)
    finally:
        store.client.close()


def read_topic(
    endpoints: Endpoints, topic: str, idle_s: float = 3.0, keys: bool = False
) -> list[Any]:
    """Every record on a topic, read with kafka-python (``keys``: as (key, record) pairs).

    Reads at least up to the end offsets the broker reports when the call starts,
    however slow the fetches (a plain idle timeout alone could stop early on a
    loaded machine), then on until nothing new has come for ``idle_s``.
    """
    consumer = KafkaConsumer(
        bootstrap_servers=list(endpoints.brokers),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    try:
        parts = consumer.partitions_for_topic(topic)
        deadline = time.monotonic() + 10
        while not parts and time.monotonic() < deadline:
            time.sleep(0.2)
            parts = consumer.partitions_for_topic(topic)
        assert parts, f"topic {topic!r} does not exist"
        assigned = [TopicPartition(topic, p) for p in sorted(parts)]
        consumer.assign(assigned)
        consumer.seek_to_beginning()
        ends = consumer.end_offsets(assigned)
        records: list[dict[str, Any]] = []
        deadline = time.monotonic() + 120
        idle_since = time.monotonic()
        while True:
            batch = consumer.poll(timeout_ms=200)
            for messages in batch.values():
                records.extend((msg.key, orjson.loads(msg.value)) if keys
                               else orjson.loads(msg.value) for msg in messages)  # fmt: skip
            now = time.monotonic()
            if batch:
                idle_since = now
            at_end = all(consumer.position(tp) >= end for tp, end in ends.items())
            if at_end and now - idle_since >= idle_s:
                return records
            assert now < deadline, (
                f"{topic!r}: read {len(records):,} records in 120 s and did not reach "
                f"the end offsets {ends}"
            )
    finally:
        consumer.close()
