"""Fuzz: 10k malformed messages mixed into a valid stream change nothing but the dead letters.

Two runs over the same valid events: one with 10,000 malformed messages
interleaved (random bytes and structured mutations of real events), one
without. Every malformed message must reach the dead-letter topic with a
reason and its source position, and the state and triggers must be those of
the clean run. Kafka timestamps are set explicitly so that both runs cut the
valid events into the same processing steps; a state blob's applied offsets
necessarily differ (the malformed messages take offsets) and are masked.
"""

from __future__ import annotations

import itertools
import os
import random
from typing import Any

import numpy as np
import orjson
import pytest
import redis
from confluent_kafka import Producer

from crmstream.bench.workload import Workload, WorkloadSpec
from crmstream.config import load_config
from crmstream.operators.events import TOPIC_ROLE_TYPES
from crmstream.state.dump import canonical_dump, differences
from crmstream.state.encoding import STATE_DTYPE, decode_batch, encode_records
from crmstream.topics import create_topics
from tests.conftest import read_topic, run_flow
from tests.faults import ids_of, run_sets

pytestmark = [pytest.mark.integration, pytest.mark.slow]

VALID, MALFORMED = 30_000, 10_000
MAX_BYTES = 4096
_runs = itertools.count()


def _mutations(rng: random.Random, body: dict[str, Any], raw: bytes) -> tuple[str, bytes]:
    """One malformed message derived from a valid event: (kind, bytes)."""
    kind = rng.choice(
        [
            "random_bytes", "truncated", "invalid_utf8", "missing_field", "wrong_type",
            "unknown_type", "huge", "nan", "infinity", "far_future", "far_past",
            "negative_amount", "absurd_amount", "not_an_object", "wrong_topic_type", "empty",
        ]
    )  # fmt: skip
    b = dict(body)
    if kind == "random_bytes":
        return kind, bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200))) + b"\x00{"
    if kind == "truncated":
        return kind, raw[: rng.randrange(1, len(raw) - 1)]
    if kind == "invalid_utf8":
        cut = raw.index(b'"customer_id"') + 16
        return kind, raw[:cut] + b"\xff\xfe" + raw[cut:]
    if kind == "missing_field":
        del b[rng.choice(["event_id", "customer_id", "event_type", "event_time"])]
    elif kind == "wrong_type":
        field = rng.choice(["customer_id", "event_time", "event_id"])
        b[field] = rng.choice(
            [12345, ["x"], {"a": 1}, True, "soon" if field == "event_time" else 7]
        )
    elif kind == "unknown_type":
        b["event_type"] = rng.choice(["product_vieww", "", "ORDER_PLACED", "wish"])
    elif kind == "huge":
        b["padding"] = "x" * (MAX_BYTES + rng.randrange(1, 50_000))
    elif kind in ("nan", "infinity"):
        token = b"NaN" if kind == "nan" else rng.choice([b"Infinity", b"-Infinity", b"1e999"])
        return kind, orjson.dumps({**b, "event_time": 0}).replace(
            b'"event_time":0', b'"event_time":' + token
        )
    elif kind == "far_future":
        b["event_time"] = rng.choice(
            [4_102_444_800_000, 253_402_300_799_000, "2999-01-01T00:00:00Z"]
        )
    elif kind == "far_past":
        b["event_time"] = rng.choice([0, -5, 86_400_000, "1970-01-02T00:00:00Z"])
    elif kind in ("negative_amount", "absurd_amount"):
        value = -rng.uniform(0.01, 1e6) if kind == "negative_amount" else rng.choice([1e12, 1e300])
        b["event_type"], b["order_id"], b["currency"] = "order_placed", "o-fuzz", "USD"
        b["amount"] = value
        b.pop("category", None)
        b.pop("product_id", None)
    elif kind == "not_an_object":
        return kind, rng.choice([b"[]", b'"event"', b"null", b"42", b"[1, 2, 3]"])
    elif kind == "wrong_topic_type":
        # A real type of another topic: a review, or a view where the event was a feedback one.
        if b.get("event_type") in TOPIC_ROLE_TYPES["feedback"]:
            b["event_type"] = "product_view"
            b.setdefault("category", "books")
        else:
            b["event_type"] = "product_review"
            b["rating"] = 5
        b.setdefault("product_id", "p-fuzz")
    elif kind == "empty":
        return kind, b""
    return kind, orjson.dumps(b)


def _masked_state(client: redis.Redis, prefix: str) -> dict[str, bytes]:
    """The canonical dump without progress records, and state blobs with applied offsets zeroed."""
    dump = canonical_dump(client, prefix)
    out = {}
    for name, value in dump.items():
        if name.startswith("progress:"):
            continue
        if name.endswith(":s"):
            (record,) = decode_batch([client.get(f"{prefix}:{name}")], [name])
            record["applied_offset"] = 0
            value = encode_records(np.array([record], dtype=STATE_DTYPE))[0]
        out[name] = value
    return out


def test_ten_thousand_malformed_messages_change_nothing_but_the_dead_letters(stack):
    tag = f"fz{next(_runs)}x{os.getpid()}"
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "2026")))
    opts = (
        "kafka.partitions=2",
        f"processing.max_event_bytes={MAX_BYTES}",
        "processing.step_ms=5000",
    )
    clean = load_config(None, run_sets(stack, f"{tag}.a", f"{tag}.a", f"{tag}a", *opts), env={})
    fuzzed = load_config(None, run_sets(stack, f"{tag}.b", f"{tag}.b", f"{tag}b", *opts), env={})
    create_topics(list(stack.brokers), clean)
    create_topics(list(stack.brokers), fuzzed)

    workload = Workload(clean, WorkloadSpec(customers=3_000, seed=3, malformed_rate=0.0))
    events = list(itertools.islice(workload.events(), VALID))
    every = VALID // MALFORMED
    producer = Producer({"bootstrap.servers": ",".join(stack.brokers), "linger.ms": 5})
    kinds: dict[str, int] = {}
    t0 = 1_767_225_600_000
    for i, event in enumerate(events):
        ts = t0 + i * 10  # 10 ms apart: the same steps in both runs
        topic_a = clean.kafka.topics.by_role[event.role]
        topic_b = fuzzed.kafka.topics.by_role[event.role]
        producer.produce(topic_a, event.value, event.key, timestamp=ts)
        producer.produce(topic_b, event.value, event.key, timestamp=ts)
        if i % every == 0 and sum(kinds.values()) < MALFORMED:
            kind, bad = _mutations(rng, orjson.loads(event.value), event.value)
            kinds[kind] = kinds.get(kind, 0) + 1
            producer.produce(topic_b, bad, event.key, timestamp=ts)
        if i % 5000 == 0:
            producer.flush()
    assert producer.flush(30) == 0
    assert sum(kinds.values()) == MALFORMED

    run_flow(clean, stack)
    run_flow(fuzzed, stack)

    client = redis.Redis.from_url(stack.redis_url)
    a, b = _masked_state(client, f"{tag}a"), _masked_state(client, f"{tag}b")
    diff = differences(a, b)
    dead = read_topic(stack, fuzzed.kafka.topics.dead_letter)
    positions = {
        (d["source"]["topic"], d["source"]["partition"], d["source"]["offset"]) for d in dead
    }
    clean_ids = ids_of(read_topic(stack, clean.kafka.topics.triggers))
    fuzz_ids = ids_of(read_topic(stack, fuzzed.kafka.topics.triggers))
    print(
        f"fuzz: {VALID:,} valid + {MALFORMED:,} malformed ({len(kinds)} kinds: {kinds}); "
        f"dead letters {len(dead):,} at {len(positions):,} distinct positions; state keys "
        f"{len(a):,} vs {len(b):,}, {len(diff)} differ; trigger ids {len(set(clean_ids)):,} "
        f"vs {len(set(fuzz_ids)):,}; clean-run dead letters "
        f"{len(read_topic(stack, clean.kafka.topics.dead_letter))}"
    )
    assert len(dead) == MALFORMED and len(positions) == MALFORMED
    assert all(d["reason"] and d["source"]["topic"].startswith(f"{tag}.b.") for d in dead)
    assert not diff, diff[:5]
    assert len(a) > 1000
    assert set(fuzz_ids) == set(clean_ids) and clean_ids
