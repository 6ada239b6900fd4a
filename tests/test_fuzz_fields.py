"""Structure-aware fuzz (issue 34): every field of every event type, and whole messages,
damaged, through the validator and through the real flow, restarted after each run.

Messages come from tests/fuzz_messages.py with their fate as docs/events.md
states it. Against the validator (many examples, no servers): a bad message is
rejected naming its field, an odd but valid one is accepted, nothing raises, and
every dead letter fits the producer and shows no planted personal data. Against
the real flow (Tansu broker and redis-server of tests/conftest.py): one run with
the valid stream and the odd events, one with the bad messages mixed in; both
are restarted with a later event that fires the timers they committed. Every bad
message is dead-lettered exactly once (by source position) and nothing else is;
both runs and their restarts finish (no crash loop); state and trigger ids are
those of the run without the bad messages. The default suite runs a few
examples; ``-m slow`` runs many more (``FUZZ_EXAMPLES``).
"""

from __future__ import annotations

import base64
import itertools
import os
import random
import time
from collections import Counter

import orjson
import pytest
import redis
from confluent_kafka import Producer
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.flows.dead_letters import dead_letter_bytes, dead_letter_record
from crmstream.flows.sink import RECORD_FRAMING_BYTES
from crmstream.operators.events import EventValidator, InvalidEvent, ParsedEvent
from crmstream.state.dump import differences
from crmstream.topics import create_topics
from tests.conftest import read_topic, run_flow
from tests.faults import ids_of, run_sets
from tests.fuzz_messages import (
    T0,
    Message,
    bad_field,
    bad_message,
    base_events,
    clock_events,
    every_bad_field,
    odd_valid,
)
from tests.test_fuzz import _masked_state
from tests.test_privacy import raw_redis

OUTPUT_MAX_BYTES = 100_000  # the flow's producer: input messages go past it
KEY_LIMIT = OUTPUT_MAX_BYTES - RECORD_FRAMING_BYTES
MAX_EVENT_BYTES = 65_536
NOW_MS = int(time.time() * 1000)
PLANTED = (b"pii.planted", b"example.com", b"ada lovelace", b"analytical", b"5550100999")
BAD = st.one_of(bad_field(NOW_MS), bad_field(NOW_MS), bad_message(MAX_EVENT_BYTES, KEY_LIMIT))
_runs = itertools.count()


def _planted(blob: bytes) -> list[bytes]:
    return [p for p in PLANTED if p in blob.lower()]


# ------------------------------------------------------------- the validator alone

CONFIG = load_config(env={})
VALIDATOR = EventValidator(CONFIG)
TOPIC = {role: topic for topic, role in CONFIG.kafka.topics.inputs.items()}


def _check(message: Message) -> None:
    args = (message.key, message.value, TOPIC[message.role], 1, 7, T0, NOW_MS)
    fast, checked = VALIDATOR.parse(*args), VALIDATOR.parse_checked(*args)
    assert fast == checked
    if not message.bad:
        assert isinstance(checked, ParsedEvent), (message, checked)
        return
    assert isinstance(checked, InvalidEvent), (message, checked)
    if message.field is not None:
        assert checked.field == message.field, (message.label, checked.reason)
        assert message.field in checked.reason, checked.reason
    record = dead_letter_record(checked, VALIDATOR.redact)
    assert len(record) <= dead_letter_bytes(CONFIG.processing.dead_letter_max_original_bytes)
    dead = orjson.loads(record)
    shown = record + base64.b64decode(dead["original_base64"])
    assert _planted(shown) == [], (message.label, dead)
    assert dead["original_bytes"] == len(message.value)


@pytest.mark.parametrize("escape", [0.0, 1.0])
def test_every_bad_value_of_every_field_of_every_type_is_rejected_by_name(escape):
    """Exhaustive: each bad value of tests/fuzz_messages.py in each field of each event
    type, plain and with every character of every string escaped."""
    messages = every_bad_field(NOW_MS, escape)
    for message in messages:
        _check(message)
    print(f"{len(messages)} bad field values, each rejected naming its field")


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.one_of(BAD, odd_valid()))
def test_damaged_fields_and_messages_are_rejected_and_odd_events_accepted(message):
    """Mixed at random: escapes in part, personal data riding along, damage to whole
    messages, and valid events written oddly."""
    _check(message)


# ------------------------------------------------------------- the real flow

EXAMPLES = 4
SLOW_EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "15"))
CUSTOMERS = 24


def _configs(stack):
    tag = f"ff{next(_runs)}x{os.getpid()}"
    opts = (
        "kafka.partitions=2",
        "processing.step_ms=5000",
        f"kafka.producer.message.max.bytes={OUTPUT_MAX_BYTES}",
    )
    made = []
    for side in ("a", "b"):
        sets = run_sets(stack, f"{tag}.{side}", f"{tag}.{side}", f"{tag}{side}", *opts)
        config = load_config(None, sets, env={})
        create_topics(list(stack.brokers), config)
        made.append(config)
    return made


def _produce(producer, config, messages, times, positions=None):
    """Each message at its Kafka time; ``positions`` collects where each bad one landed."""
    topics = config.kafka.topics.by_role
    for message, ts in zip(messages, times, strict=True):

        def landed(err, msg, message=message):
            assert err is None, err
            if message.bad and positions is not None:
                positions[(msg.topic(), msg.partition(), msg.offset())] = message

        producer.produce(topics[message.role], message.value, message.key, timestamp=ts,
                         on_delivery=landed)  # fmt: skip
        producer.poll(0)
    assert producer.flush(60) == 0


def _fuzz_the_flow(stack, bad: list[Message], odd: list[Message], rng: random.Random) -> str:
    clean, fuzzed = _configs(stack)
    base = base_events(CUSTOMERS)
    valid = list(base)
    for message in odd:
        valid.insert(rng.randrange(len(valid) + 1), message)
    mixed = list(valid)
    for message in bad:
        mixed.insert(rng.randrange(len(mixed) + 1), message)
    producer = Producer({"bootstrap.servers": ",".join(stack.brokers), "linger.ms": 5,
                         "message.max.bytes": 1_000_000})  # fmt: skip
    # Valid messages 10 ms apart, each at the same Kafka time in both runs (bad ones
    # share their successor's), so that both runs cut the same processing steps.
    ts0 = 1_767_225_600_000
    _produce(producer, clean, valid, [ts0 + i * 10 for i in range(len(valid))])
    times, k = [], 0
    for message in mixed:
        times.append(ts0 + k * 10)
        k += not message.bad
    positions: dict[tuple[str, int, int], Message] = {}
    _produce(producer, fuzzed, mixed, times, positions)
    assert len(positions) == len(bad)

    for run in (1, 2):
        if run == 2:  # the restart, with a later event that fires what run 1 committed
            later = [ts0 + len(valid) * 10 + 60_000]
            _produce(producer, clean, clock_events(60), later)
            _produce(producer, fuzzed, clock_events(60), later)
        run_flow(clean, stack)
        run_flow(fuzzed, stack)  # a crash raises here
        dead = read_topic(stack, fuzzed.kafka.topics.dead_letter, idle_s=1)
        # A dead letter standing for an unsent record has no source: "unsent" here.
        at = Counter(tuple(d["source"].values()) if d["source"] else ("unsent", d["reason"])
                     for d in dead)  # fmt: skip
        assert set(at) == set(positions), (set(positions) - set(at), set(at) - set(positions))
        assert max(at.values(), default=1) == 1, [p for p, n in at.items() if n > 1]
        assert read_topic(stack, clean.kafka.topics.dead_letter, idle_s=0.5) == []
        for record in dead:
            expected = positions[tuple(record["source"].values())]
            if expected.field is not None:
                assert record["field"] == expected.field, (expected.label, record["reason"])
            blob = orjson.dumps(record) + base64.b64decode(record["original_base64"])
            assert _planted(blob) == [], (expected.label, record)

    client = redis.Redis.from_url(stack.redis_url)
    a = _state(client, clean.redis.key_prefix)
    b = _state(client, fuzzed.redis.key_prefix)
    diff = differences(a, b)
    assert not diff, diff[:5]
    stored = raw_redis(client, fuzzed.redis.key_prefix)
    assert [k for k, v in stored.items() if _planted(k.encode() + v)] == []
    clean_ids = ids_of(read_topic(stack, clean.kafka.topics.triggers))
    fuzz_ids = ids_of(read_topic(stack, fuzzed.kafka.topics.triggers))
    assert sorted(fuzz_ids) == sorted(clean_ids) and len(set(clean_ids)) > CUSTOMERS
    fired = {r["trigger_type"] for r in read_topic(stack, fuzzed.kafka.topics.triggers)}
    assert {"delivery_delay", "birthday", "dormant_win_back", "browse_interest"} <= fired, fired
    kinds = Counter(m.label.split(":")[0] for m in bad)
    return (
        f"{len(base)} valid + {len(odd)} odd valid + {len(bad)} bad messages "
        f"({len(kinds)} kinds: {dict(kinds)}), 2 runs each side: dead letters exactly at the "
        f"{len(positions)} bad positions, {len(a)} state keys equal, "
        f"{len(set(clean_ids))} trigger ids equal"
    )


def _state(client: redis.Redis, prefix: str) -> dict[str, bytes]:
    """The masked canonical dump (tests/test_fuzz.py), with the erasure audit stream's
    entries as a set: shards append to it concurrently, in no fixed order."""
    state = _masked_state(client, prefix)
    if "audit" in state:
        kind, _, entries = state["audit"].partition(b"\0")
        state["audit"] = kind + b"\0" + orjson.dumps(sorted(orjson.loads(entries)))
    return state


FLOW_SETTINGS = dict(
    deadline=None,
    suppress_health_check=list(HealthCheck),
    phases=(Phase.explicit, Phase.reuse, Phase.generate),  # a flow run per shrink: too slow
)


@pytest.mark.integration
@pytest.mark.slow  # a minute of flow runs: in the slow suite (CI runs it), beside the 15-run one
@settings(max_examples=EXAMPLES, **FLOW_SETTINGS)
@given(
    bad=st.lists(BAD, min_size=25, max_size=50),
    odd=st.lists(odd_valid(), min_size=4, max_size=10),
    rng=st.randoms(use_true_random=False),
)
def test_damaged_messages_are_dead_lettered_once_and_change_nothing_else(stack, bad, odd, rng):
    print(_fuzz_the_flow(stack, bad, odd, rng))


@pytest.mark.integration
@pytest.mark.slow
@settings(max_examples=SLOW_EXAMPLES, **FLOW_SETTINGS)
@given(
    bad=st.lists(BAD, min_size=100, max_size=300),
    odd=st.lists(odd_valid(), min_size=10, max_size=40),
    rng=st.randoms(use_true_random=False),
)
def test_many_damaged_messages_over_many_runs(stack, bad, odd, rng):
    print(_fuzz_the_flow(stack, bad, odd, rng))
