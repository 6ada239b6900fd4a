"""Splitting a read batch into one item per shard and step, checked message by message."""

from __future__ import annotations

import pickle
from types import SimpleNamespace

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.flows.shard import NO_STEP, route_batch
from crmstream.flows.source import CAUGHT_UP_OFFSET, RawMessage
from crmstream.operators.events import EventValidator, InvalidEvent, ParsedEvent
from crmstream.state.layout import shard_of

CONFIG = load_config(env={}, overrides=["processing.shards=3"])
NOW = 1_767_225_600_000
TOPICS = (CONFIG.kafka.topics.clickstream, CONFIG.kafka.topics.orders)
RUNTIME = SimpleNamespace(config=CONFIG, validator=EventValidator(CONFIG), clock_ms=lambda: NOW)
KEYS = [f"key-{s}" for s in range(3)]


def _value(customer: int, at_ms: int, valid: bool) -> bytes:
    if not valid:
        return b'{"event_id": "x", "customer_id": "c%d", "event_type":' % customer
    body = {
        "event_id": f"e{customer}-{at_ms}",
        "customer_id": f"c{customer}",
        "event_type": "session_start",
        "event_time": at_ms,
    }
    return orjson.dumps(body)


# One read: runs of messages, each from one partition: (partition, messages, step
# increase, valid flags, read to its end afterwards).
RUNS = st.lists(
    st.tuples(
        st.integers(0, 3),
        st.lists(st.tuples(st.integers(0, 9), st.booleans(), st.integers(0, 1)), max_size=5),
        st.booleans(),
    ),
    max_size=8,
)


def _batch(runs) -> list[RawMessage]:
    offsets, steps, batch = {}, {}, []
    for part, messages, caught_up in runs:
        topic, partition = TOPICS[part % 2], part // 2
        pos = (topic, partition)
        for customer, valid, step_up in messages:
            steps[pos] = steps.get(pos, 100) + step_up
            offsets[pos] = offset = offsets.get(pos, -1) + 1
            at = NOW - 60_000 + offset * 7
            value = _value(customer, at, valid)
            batch.append(RawMessage(b"k", value, topic, partition, offset, at, steps[pos]))
        if caught_up:
            batch.append(RawMessage(None, None, topic, partition, CAUGHT_UP_OFFSET, 0, 0))
    return batch


def _one_by_one(batch: list[RawMessage]):
    """What each message adds, taken one at a time."""
    steps: dict[int, dict] = {}
    caught_up: set = set()
    for msg in batch:
        pos = (msg.topic, msg.partition)
        if msg.offset == CAUGHT_UP_OFFSET:
            caught_up.add(pos)
            continue
        caught_up.discard(pos)
        step = steps.setdefault(
            msg.step,
            {"events": [[], [], []], "invalid": [[], [], []], "positions": {}, "times": {}},
        )
        result = RUNTIME.validator.parse(*msg[:6], NOW)
        if isinstance(result, ParsedEvent):
            step["events"][shard_of(result.customer_id, 3)].append(result)
            step["times"][pos] = max(step["times"].get(pos, -1), result.event_time_ms)
        else:
            owner = result.customer_id or f"{msg.topic}|{msg.partition}"
            step["invalid"][shard_of(owner, 3)].append(result)
        step["positions"][pos] = max(step["positions"].get(pos, -1), msg.offset)
    return steps, frozenset(caught_up)


@settings(max_examples=300, deadline=None)
@given(RUNS)
def test_each_shard_and_step_gets_what_each_message_adds(runs):
    batch = _batch(runs)
    want, caught_up = _one_by_one(batch)
    items = route_batch(RUNTIME, batch, KEYS)
    if not want:
        expected = [(KEYS[s], s, NO_STEP, caught_up) for s in range(3)] if caught_up else []
        assert [(k, i.shard, i.step, i.caught_up) for k, i in items] == expected
        return
    assert [(key, item.shard, item.step) for key, item in items] == [
        (KEYS[s], s, step) for step in sorted(want) for s in range(3)
    ]
    for _key, item in items:
        step = want[item.step]
        assert item.events == step["events"][item.shard]
        assert item.invalid == step["invalid"][item.shard]
        assert item.positions == step["positions"]
        assert item.event_times == step["times"]
        assert item.caught_up == (caught_up if item.step == max(want) else frozenset())
        # As Bytewax sends it to a shard on another worker process: the same item, with
        # typed events, pickled as plain tuples (ShardBatch.__reduce__).
        sent = pickle.loads(pickle.dumps(item))
        assert sent == item and type(sent) is type(item)
        assert all(type(ev) is ParsedEvent for ev in sent.events)
        assert all(type(bad) is InvalidEvent for bad in sent.invalid)
        _, args = item.__reduce__()
        assert all(type(ev) is tuple for ev in args[2] + args[3])
