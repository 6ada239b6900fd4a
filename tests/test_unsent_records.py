"""Nothing committed can fail the next start (issue 34): no outbox record the producer
refuses, and one an earlier run left there is dead-lettered once, never retried forever."""

from __future__ import annotations

import hashlib
import time
from typing import Any

import orjson
import pytest
import redis

from crmstream.flows.sink import (
    RECORD_FRAMING_BYTES,
    DeliveryCheckedProducer,
    DeliveryError,
    Outgoing,
    bound_outgoing,
    encode_outgoing,
)
from crmstream.metrics import get_metrics
from tests.conftest import live_flow, read_topic, run_flow

pytestmark = pytest.mark.integration


def _unsent(topic: str, cause: str) -> float:
    return get_metrics().unsent_records.labels(topic, cause)._value.get()


@pytest.mark.parametrize("max_bytes", [2_000, 10_000, 1_000_000])
@pytest.mark.parametrize("key_len", [0, 1, 300])
def test_the_record_limit_is_exactly_what_librdkafka_accepts(stack, max_bytes, key_len):
    """``record_limit`` is librdkafka's own local check: a record of key and value that
    long is accepted, one byte more is refused (the framing it counts is measured)."""
    producer = DeliveryCheckedProducer(list(stack.brokers), {"message.max.bytes": max_bytes}, 30.0)
    limit = producer.record_limit
    assert limit == max_bytes - RECORD_FRAMING_BYTES
    key = b"k" * key_len if key_len else None
    producer.produce("unsent-limit", key, b"v" * (limit - key_len))
    with pytest.raises(DeliveryError, match="Message size too large"):
        producer.produce("unsent-limit", key, b"v" * (limit - key_len + 1))
    producer.flush()


def test_records_over_the_limit_never_reach_the_outbox(stack):
    """Over the limit by its key: sent without it; by its value: a dead letter with the
    record's length, SHA-256 and first bytes stands for it. Both fit, both counted."""
    producer = DeliveryCheckedProducer(
        list(stack.brokers), {"message.max.bytes": 60_000}, 30.0, "unsent-dl", 16_384
    )
    limit = producer.record_limit
    fits = Outgoing("unsent-t", b"c1", b"x" * (limit - 2))
    long_key = Outgoing("unsent-dl", b"k" * limit, b'{"reason": "..."}')
    big = Outgoing("unsent-t", b"c1", b"{" + b"y" * limit)
    before = (_unsent("unsent-dl", "oversize"), _unsent("unsent-t", "oversize"))
    out = bound_outgoing([fits, long_key, big], producer)
    assert out[0] is fits and out[1] == Outgoing("unsent-dl", None, long_key.value)
    assert out[2].topic == "unsent-dl" and out[2].key == b"c1"
    stand_in = orjson.loads(out[2].value)
    assert stand_in["unsent"] == {"topic": "unsent-t", "key_bytes": 2}
    assert stand_in["original_bytes"] == len(big.value) and stand_in["original_truncated"]
    assert stand_in["original_sha256"] == hashlib.sha256(big.value).hexdigest()
    assert "over the producer's limit" in stand_in["reason"]
    assert all(len(r.value) + len(r.key or b"") <= limit for r in out)
    for record in out:  # librdkafka takes every one of them
        producer.produce(*record)
    producer.flush()
    after = (_unsent("unsent-dl", "oversize"), _unsent("unsent-t", "oversize"))
    assert (after[0] - before[0], after[1] - before[1]) == (1, 1)
    assert bound_outgoing([fits], producer)[0] is fits


def _one_run(isolated_config, script, stack, customer: str) -> tuple[Any, Any, redis.Redis, str]:
    """A one-shard configuration after one run of one view: (config, its script, a
    client, the shard's outbox key)."""
    config = isolated_config("processing.shards=1")
    s = script(config)
    s.view(customer, "toys", 0)
    s.flush()
    run_flow(config, stack)
    client = redis.Redis.from_url(stack.redis_url)
    return config, s, client, f"{config.redis.key_prefix}:outbox:0"


def test_an_outbox_record_the_producer_refuses_is_dead_lettered_once_at_start(
    isolated_config, script, stack
):
    """issue 34: an earlier version committed the dead letter of a 0.8 MB message (its
    bytes in base64, 1.07 MB) to the outbox; the producer refused it at every start.
    Now the start sends a dead letter standing for it, the outbox empties, and the
    next start sends nothing more."""
    config, s, client, outbox = _one_run(isolated_config, script, stack, "ua")
    dead_letters = config.kafka.topics.dead_letter
    refused = Outgoing(dead_letters, b"k", b'{"original_base64": "' + b"QUJD" * 270_000 + b'"}')
    after = Outgoing(config.kafka.topics.triggers, b"ua", b'{"trigger_id": "left-behind"}')
    client.rpush(outbox, encode_outgoing(refused), encode_outgoing(after))
    before = _unsent(dead_letters, "refused")

    s.view("ub", "toys", 10)
    s.flush()
    run_flow(config, stack)  # before issue 34: DeliveryError at every start

    assert client.llen(outbox) == 0
    dead = read_topic(stack, dead_letters)
    assert len(dead) == 1, dead
    (stand_in,) = dead
    assert stand_in["unsent"] == {"topic": dead_letters, "key_bytes": 1}
    assert stand_in["original_bytes"] == len(refused.value)
    assert stand_in["original_sha256"] == hashlib.sha256(refused.value).hexdigest()
    assert "Message size too large" in stand_in["reason"]
    assert _unsent(dead_letters, "refused") - before == 1
    triggers = read_topic(stack, config.kafka.topics.triggers)
    assert {"trigger_id": "left-behind"} in triggers
    run_flow(config, stack)  # and the next start has nothing left to send
    assert len(read_topic(stack, dead_letters, idle_s=1)) == 1


def test_outbox_entries_that_are_not_records_are_dead_lettered_at_start(
    isolated_config, script, stack
):
    """The third and fourth outsiders' cases: an outbox entry cut short (2 bytes), one
    whose topic is not UTF-8, empty or longer than Kafka allows failed every start; one
    whose key length runs past its end or is negative went out malformed; one addressed
    to an input topic went there. Each is now sent as a dead letter keeping its bytes
    (cause ``damaged``), and the records after them go out."""
    from crmstream.flows.shard import DAMAGED_TOPIC

    config, _, client, outbox = _one_run(isolated_config, script, stack, "da")
    dead_letters = config.kafka.topics.dead_letter
    short = b"\x00\x04"
    not_utf8 = encode_outgoing(Outgoing("t\u00fc", b"k", b"{}")).replace(b"\xc3\xbc", b"\xff\xfe")
    after = Outgoing(config.kafka.topics.triggers, b"da", b'{"trigger_id": "after-damage"}')
    import struct

    triggers = config.kafka.topics.triggers.encode()
    damaged = [
        short,
        not_utf8,
        struct.pack(">Hi", 0, -1) + b"{}",  # no topic
        struct.pack(">Hi", 300, -1) + b"t" * 300 + b"{}",  # longer than a topic name
        struct.pack(">Hi", len(triggers), 99) + triggers + b"k{}",  # key past the end
        struct.pack(">Hi", len(triggers), -5) + triggers + b"{}",  # a negative key length
        encode_outgoing(Outgoing(config.kafka.topics.orders, b"k", b"{}")),  # an input
    ]
    client.rpush(outbox, *damaged, encode_outgoing(after))
    before = _unsent(DAMAGED_TOPIC, "damaged")

    run_flow(config, stack)

    assert client.llen(outbox) == 0
    dead = read_topic(stack, dead_letters)
    assert len(dead) == len(damaged), dead
    for letter in dead:  # keyless: on any partition, so in any order
        assert letter["unsent"]["topic"] == DAMAGED_TOPIC
        assert f"of '{outbox}' is " in letter["reason"], letter["reason"]
    assert sorted(d["original_sha256"] for d in dead) == sorted(
        hashlib.sha256(entry).hexdigest() for entry in damaged
    )
    assert _unsent(DAMAGED_TOPIC, "damaged") - before == len(damaged)
    assert read_topic(stack, config.kafka.topics.orders, idle_s=1) == []
    assert {"trigger_id": "after-damage"} in read_topic(stack, config.kafka.topics.triggers)


@pytest.mark.parametrize(
    "value", ["garbage", "-7:1:1", "5:1:9223372036854775807", "5:-9:1"], ids=str
)
def test_a_progress_field_that_is_not_progress_stops_the_start_naming_it(
    value, isolated_config, stack
):
    """A progress value edited by hand failed every start with "invalid literal for
    int()" inside a Bytewax traceback; an offset of -7 with a Kafka error naming no key;
    an event time at the int64 limit set many customers aside. It now names the key and
    the field."""
    from crmstream.failures import describe, root_cause
    from crmstream.state.store import StateStoreError

    config = isolated_config("processing.shards=1")
    client = redis.Redis.from_url(stack.redis_url)
    key = f"{config.redis.key_prefix}:progress:0"
    client.hset(key, f"{config.kafka.topics.by_role['clickstream']}|0", value)
    with pytest.raises(Exception) as raised:  # Bytewax wraps what the dataflow raised
        run_flow(config, stack)
    assert isinstance(root_cause(raised.value), StateStoreError), raised.value
    line = describe(raised.value)  # what the CLI prints, with exit code 2
    assert line is not None and "\n" not in line, line
    assert f"progress at '{key}'" in line and repr(value.encode()) in line, line


@pytest.mark.parametrize(
    "fields",
    [{"shards": "two", "step_ms": "1000"}, {b"\xff": "1"}, {"shards": "0", "step_ms": "1"}],
)
def test_a_layout_that_is_not_what_crmstream_writes_stops_the_start_naming_it(
    fields, isolated_config, stack
):
    """The fourth outsider's case: ``shards=two`` in the layout key was an internal error
    with a traceback (exit 70)."""
    from crmstream.failures import describe, root_cause
    from crmstream.state.layout import LayoutError

    config = isolated_config("processing.shards=1")
    client = redis.Redis.from_url(stack.redis_url)
    key = f"{config.redis.key_prefix}:layout"
    client.hset(key, mapping=fields)
    with pytest.raises(Exception) as raised:
        run_flow(config, stack)
    assert isinstance(root_cause(raised.value), LayoutError), raised.value
    line = describe(raised.value)
    assert line is not None and f"the layout at '{key}'" in line, line


def test_a_key_of_the_wrong_type_is_not_called_an_outage():
    """The fourth outsider's case: a shard's key of the wrong type (timers, outbox,
    quarantine, customers) was reported as "Redis failed beyond its retry budget ...
    restart once Redis answers again"; the command now names its key."""
    from crmstream.failures import describe

    error = redis.ResponseError(
        "HINCRBY 'crm:customers' in a batch of 23: WRONGTYPE Operation against a key "
        "holding the wrong kind of value"
    )
    line = describe(error)
    assert line is not None and "key of the wrong type" in line and "'crm:customers'" in line
    assert "retry budget" not in line


@pytest.mark.parametrize("refused", ["an expiry out of range", "a key of the wrong type"])
def test_a_command_refused_inside_a_commit_is_said_to_have_left_the_rest_applied(
    isolated_config, stack, refused
):
    """Outsider 52: Redis refused the erasure tombstone's expiry inside a step's commit,
    ran the rest of the MULTI/EXEC (it does not roll back), and the flow ended saying
    "restart once Redis answers again (nothing is lost)". The error now says the rest
    was applied, and names the command and its key."""
    from crmstream.failures import describe
    from crmstream.state.commands import PartialTransaction
    from crmstream.state.store import StateStore, connect

    config = isolated_config()
    prefix = config.redis.key_prefix
    store = StateStore(connect(stack.redis_url, config.redis), prefix)
    client = redis.Redis.from_url(stack.redis_url)
    client.set(f"{prefix}:odd", "a string")

    def stage(batch) -> None:
        batch.set(f"{prefix}:before", "1")
        if refused == "an expiry out of range":
            batch.set(f"{prefix}:erased:x", "1", ex=10**18)
        else:
            batch.hset(f"{prefix}:odd", mapping={"f": "v"})
        batch.set(f"{prefix}:after", "1")

    with pytest.raises(PartialTransaction) as raised:
        store.transact_once(0, stage)
    assert client.get(f"{prefix}:before") == b"1" and client.get(f"{prefix}:after") == b"1"
    line = describe(raised.value)
    assert line is not None and "The rest of that commit was applied" in line, line
    assert "nothing is lost" not in line and "retry budget" not in line
    key = f"{prefix}:erased:x" if refused == "an expiry out of range" else f"{prefix}:odd"
    assert repr(key) in line, line


def _wait_for(condition, what: str, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.5)


def test_the_four_messages_of_issue_34_leave_a_running_flow_running(isolated_config, script, stack):
    """Each of the four messages that stopped the flow (and, committed, every restart),
    sent into a running flow: dead-lettered with a reason naming the value, the flow
    goes on (a later event's trigger arrives), and it restarts cleanly."""
    config = isolated_config("processing.shards=1")
    s = script(config)
    bad = {
        "promised_delivery_time": ("orders", orjson.dumps({
            "event_id": "i1", "customer_id": "ia", "event_type": "order_shipped",
            "event_time": 1_767_225_600_000, "order_id": "o1",
            "promised_delivery_time": -1_000_000_000_000_000})),
        "timezone": ("customers", orjson.dumps({
            "event_id": "i2", "customer_id": "ia", "event_type": "profile_updated",
            "event_time": 1_767_225_600_000, "timezone": "America"})),
        "timezone ": ("customers", orjson.dumps({
            "event_id": "i3", "customer_id": "ia", "event_type": "profile_updated",
            "event_time": 1_767_225_600_000, "timezone": "a" * 300})),
        "size": ("clickstream", orjson.dumps({
            "event_id": "i4", "customer_id": "ia", "event_type": "page_view",
            "event_time": 1_767_225_600_000, "pad": "x" * 800_000})),
        "customer_id": ("clickstream", orjson.dumps({
            "event_id": "i5", "customer_id": "v1\x1fwake", "event_type": "add_to_cart",
            "event_time": 1_767_225_600_000, "product_id": "p", "category": "toys"})),
    }  # fmt: skip
    with live_flow(config, stack):
        for role, value in bad.values():
            s.raw(role, value)
        for i in range(3):  # after them: a trigger shows the flow still runs
            s.view("ib", "toys", 30 + i)
        s.flush()
        topics = config.kafka.topics

        def done() -> bool:
            triggers = read_topic(stack, topics.triggers, idle_s=0.5)
            dead = read_topic(stack, topics.dead_letter, idle_s=0.5)
            return len(dead) >= len(bad) and any(t["customer_id"] == "ib" for t in triggers)

        _wait_for(done, "the dead letters and the trigger")
    dead = read_topic(stack, topics.dead_letter)
    reasons = {d["reason"].split(": ", 1)[1] for d in dead}
    assert len(dead) == len(bad) == len(reasons)
    assert any("-1000000000000000" in r for r in reasons)
    assert any("'America'" in r for r in reasons)
    assert any("over the 65536-byte limit" in r for r in reasons)
    assert any("'v1\\x1fwake'" in r for r in reasons)
    big = next(d for d in dead if d["original_bytes"] > 800_000)
    assert big["original_truncated"] and big["original_sha256"]
    run_flow(config, stack)  # the restart: nothing committed fails it, nothing resent
    assert len(read_topic(stack, topics.dead_letter, idle_s=1)) == len(bad)
