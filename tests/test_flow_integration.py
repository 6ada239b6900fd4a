"""Integration: scripted events through the real flow, real Tansu and real redis-server."""

from __future__ import annotations

import base64
import hashlib
import time

import orjson
import pytest
import redis

from crmstream.flows.runtime import Runtime
from crmstream.profile import customer_view
from crmstream.state.layout import shard_of
from crmstream.state.store import StateStore, connect
from tests.conftest import live_flow, read_topic, run_flow
from tests.faults import wait_until

pytestmark = pytest.mark.integration


def _by_type(records, kind):
    return [r for r in records if r["trigger_type"] == kind]


def test_three_views_in_one_category_fire_one_browse_interest(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    s.view("alice", "beauty", 0)
    s.view("alice", "beauty", 10)
    third = s.view("alice", "beauty", 20)
    s.view("alice", "beauty", 30)  # a 4th view continues the streak: no second trigger
    s.view("bob", "beauty", 0)
    s.view("bob", "beauty", 10)
    s.view("carol", "beauty", 0)
    s.view("carol", "shoes", 10)  # another category breaks the streak
    s.view("carol", "beauty", 20)
    s.flush()
    run_flow(config, stack)

    triggers = read_topic(stack, config.kafka.topics.triggers)
    browse = _by_type(triggers, "browse_interest")
    assert [t["customer_id"] for t in browse] == ["alice"]
    record = browse[0]
    assert record["causal_event_id"] == third
    assert record["rule"] == {"name": "browse_interest", "version": 1, "model_version": 0}
    assert record["reason"]["values"] == {"category": "beauty", "consecutive_views": 3}
    assert record["reason"]["thresholds"] == {"consecutive_views": 3}
    assert record["event_time"] == "2026-01-01T00:00:20.000+00:00"
    for key in ("trigger_id", "detected_at", "emitted_at"):
        assert record[key]


def test_threshold_comes_from_config(isolated_config, script, stack):
    config = isolated_config("rules.browse_interest.consecutive_views=2")
    s = script(config)
    s.view("bob", "toys", 0)
    s.view("bob", "toys", 5)
    s.flush()
    run_flow(config, stack)
    assert [t["customer_id"] for t in read_topic(stack, config.kafka.topics.triggers)] == ["bob"]


def test_high_intent_fires_once_and_not_after_an_order(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    for i in range(5):
        s.view("dora", "shoes", i * 60)
        s.view("ed", "shoes", i * 60)
    s.event("clickstream", "dora", "add_to_cart", 400, product_id="x", category="shoes")
    fifth_signal = s.event(
        "clickstream", "dora", "add_to_cart", 500, product_id="y", category="shoes"
    )
    s.event("clickstream", "dora", "add_to_cart", 600, product_id="z", category="shoes")
    # ed bought within the window: same browsing, no trigger
    s.event("orders", "ed", "order_placed", 100, order_id="o1", amount=10, currency="EUR")
    s.event("clickstream", "ed", "add_to_cart", 400, product_id="x", category="shoes")
    s.event("clickstream", "ed", "add_to_cart", 500, product_id="y", category="shoes")
    s.flush()
    run_flow(config, stack)

    intent = _by_type(read_topic(stack, config.kafka.topics.triggers), "high_intent_no_purchase")
    assert [(t["customer_id"], t["causal_event_id"]) for t in intent] == [("dora", fifth_signal)]
    assert intent[0]["reason"]["values"] == {"views": 5, "cart_adds": 2, "orders": 0}
    assert intent[0]["reason"]["window"]["days"] == 30


def test_malformed_events_go_to_dead_letters_and_the_rest_is_processed(
    isolated_config, script, stack
):
    config = isolated_config(partitions=1)
    s = script(config)
    s.view("alice", "beauty", 0)
    s.raw("clickstream", b"{not json")
    sent = [b'{"event_id":"m1","event_type":"product_view","event_time":1,'
            b'"product_id":"p","category":"beauty"}']  # fmt: skip
    s.raw("clickstream", sent[0])
    s.view("alice", "beauty", 10, event_id="wrongtype", price="12")
    s.view("alice", "beauty", 10, event_id="negprice", price=-3, currency="USD")
    s.event("clickstream", "alice", "page_veiw", 10, event_id="unknowntype")
    s.view("alice", "beauty", 20)
    s.view("alice", "beauty", 30)
    s.flush()
    run_flow(config, stack)

    dead = read_topic(stack, config.kafka.topics.dead_letter)
    by_offset = {d["source"]["offset"]: d for d in dead}
    assert sorted(by_offset) == [1, 2, 3, 4, 5]
    assert by_offset[1]["field"] is None and "not valid UTF-8 JSON" in by_offset[1]["reason"]
    assert by_offset[2]["field"] == "customer_id"
    assert by_offset[3]["field"] == "price" and "'12'" in by_offset[3]["reason"]
    assert by_offset[4]["field"] == "price" and "-3" in by_offset[4]["reason"]
    assert by_offset[5]["field"] == "event_type" and "page_veiw" in by_offset[5]["reason"]
    assert by_offset[4]["reason"].startswith(
        f"event 'negprice' on {config.kafka.topics.clickstream}[0]@4"
    )
    assert by_offset[1]["original_text"] == "{not json"
    # docs/events.md, "dead letters": keyed by the original key, schema 2, and with
    # nothing to redact the copy is the original bytes exactly, with their SHA-256
    originals = {1: b"{not json", 2: sent[0]}
    keyed = read_topic(stack, config.kafka.topics.dead_letter, keys=True)
    for key, record in keyed:
        offset = record["source"]["offset"]
        assert key == (b"k" if offset in (1, 2) else b"alice"), (offset, key)
        assert record["schema_version"] == 2
        assert record["source"] == {"topic": config.kafka.topics.clickstream,
                                    "partition": 0, "offset": offset}  # fmt: skip
        assert record["customer_id"] == (None if offset in (1, 2) else "alice")
        assert (record["original_copy"], record["original_truncated"]) == ("exact", False)
        assert record["dropped_fields"] == []
        copy = base64.b64decode(record["original_base64"])
        assert record["original_bytes"] == len(copy)
        assert record["original_sha256"] == hashlib.sha256(copy).hexdigest()
        assert record["original_text"] == copy.decode()
        if offset in originals:
            assert copy == originals[offset]
    # the valid events around them made a streak of 3; triggers are keyed by customer
    triggers = read_topic(stack, config.kafka.topics.triggers, keys=True)
    assert [(k, t["customer_id"]) for k, t in triggers] == [(b"alice", "alice")]


def test_replaying_the_same_input_into_fresh_state_gives_the_same_trigger_ids(
    isolated_config, script, stack
):
    config = isolated_config()
    s = script(config)
    for c in range(20):
        for i in range(5):
            s.view(f"cust{c}", "beauty" if c % 2 else "books", i)
        for i in range(3):
            s.event(
                "clickstream", f"cust{c}", "add_to_cart", 120 + i, product_id="p", category="books"
            )
    s.flush()
    run_flow(config, stack)
    first = read_topic(stack, config.kafka.topics.triggers)

    # same input topics, a fresh Redis state (another key prefix), another trigger topic
    replay = config.model_copy(
        update={
            "redis": config.redis.model_copy(update={"key_prefix": config.redis.key_prefix + "r"}),
            "kafka": config.kafka.model_copy(
                update={
                    "topics": config.kafka.topics.model_copy(
                        update={"triggers": config.kafka.topics.triggers + ".replay"}
                    )
                }
            ),
        }
    )
    from crmstream.topics import create_topics

    create_topics(list(stack.brokers), replay)
    run_flow(replay, stack)
    second = read_topic(stack, replay.kafka.topics.triggers)
    assert len(first) == 40  # 20 browse + 20 high intent (> 60 s apart: no arbitration)
    assert sorted(t["trigger_id"] for t in first) == sorted(t["trigger_id"] for t in second)


def test_restart_resumes_from_redis_offsets_without_double_counting(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    s.view("fay", "pets", 0)
    s.view("fay", "pets", 1)
    s.flush()
    run_flow(config, stack)
    s.view("fay", "pets", 2)
    s.flush()
    run_flow(config, stack)  # a second run re-reads nothing it already applied

    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    view = customer_view(store, config, "fay")
    assert view is not None
    assert view["event_counts"] == {"product_view": 3}
    assert view["browse_streak"] == {"category": "pets", "views": 3}
    triggers = read_topic(stack, config.kafka.topics.triggers)
    assert [t["customer_id"] for t in triggers] == ["fay"]
    offsets = store.resume_offsets(
        config.processing.shards, [(config.kafka.topics.clickstream, p) for p in (0, 1)]
    )
    # next offsets after all three events, across partitions
    assert sum(off for off, _step in offsets.values()) == 3


def test_state_replayed_under_a_lost_progress_record_is_not_counted_twice(
    isolated_config, script, stack
):
    """Per-customer applied offsets guard the state even when shard progress is gone."""
    config = isolated_config()
    s = script(config)
    s.view("gus", "garden", 0)
    s.view("gus", "garden", 1)
    s.flush()
    run_flow(config, stack)
    client = redis.Redis.from_url(stack.redis_url)
    deleted = client.delete(*client.keys(f"{config.redis.key_prefix}:progress:*"))
    assert deleted >= 1
    run_flow(config, stack)  # reads everything again from offset 0
    store = StateStore(client, config.redis.key_prefix)
    view = customer_view(store, config, "gus")
    assert view["event_counts"] == {"product_view": 2}


def test_a_shard_that_reads_again_what_it_applied_skips_only_that(isolated_config, script, stack):
    """One shard's progress is lost, so the partition is read again from its start; the
    other shard drops what it had applied (up to its own committed offset) and no more."""
    config = isolated_config("processing.shards=2", partitions=1)
    names = [f"c{i}" for i in range(20)]
    amy = next(c for c in names if shard_of(c, 2) == 0)
    bob = next(c for c in names if shard_of(c, 2) == 1)
    s = script(config)
    for at in (0, 1):  # offsets 0..3, interleaved
        s.view(amy, "pets", at)
        s.view(bob, "books", at)
    s.flush()
    run_flow(config, stack)
    client = redis.Redis.from_url(stack.redis_url)
    store = StateStore(client, config.redis.key_prefix)
    assert client.delete(store.progress_key(0)) == 1
    s.view(bob, "books", 2)  # offset 4: the first one past bob's shard's committed offset
    s.view(amy, "pets", 2)
    s.flush()
    run_flow(config, stack)  # reads offsets 0..5 again
    for customer in (amy, bob):
        view = customer_view(store, config, customer)
        assert view["event_counts"] == {"product_view": 3}, customer


def test_profile_keeps_attributes_but_never_pii(isolated_config, script, stack):
    config = isolated_config()
    s = script(config)
    s.event(
        "customers",
        "hana",
        "profile_updated",
        0,
        country="JP",
        timezone="Asia/Tokyo",
        language="ja-JP",
        email="hana@example.com",
        phone="+81-90-0000-0000",
    )
    s.event("customers", "hana", "consent_withdrawn", 5, channel="email")
    s.flush()
    runtime: Runtime = run_flow(config, stack)
    del runtime
    client = redis.Redis.from_url(stack.redis_url)
    keys = client.keys(f"{config.redis.key_prefix}:*hana*")
    assert keys
    for key in keys:
        dump = client.dump(key)
        assert b"hana@example.com" not in dump and b"+81-90" not in dump
    profile = {
        k.decode(): v.decode()
        for k, v in client.hgetall(f"{config.redis.key_prefix}:{{hana}}:p").items()
    }
    assert profile["country"] == "JP"
    assert profile["consent.email"].startswith("withdrawn@")


def _sample(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    prefix = f"{name}{{{want}}} " if want else f"{name} "
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def test_metrics_endpoint_counts_what_the_flow_did(isolated_config, script, stack):
    import urllib.request

    from crmstream.metrics import serve

    config = isolated_config(partitions=1)
    port = serve("127.0.0.1", 0)

    def scrape() -> str:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()

    topic = config.kafka.topics.clickstream
    before = scrape()
    s = script(config)
    views = [s.view("ivy", "watches", i) for i in range(3)]
    s.view("ivy", "watches", 4, event_id=views[0])  # the first view again: a duplicate
    s.event("orders", "ivy", "order_cancelled", 5, order_id="o-1")
    s.raw("clickstream", b"nope")
    s.flush()
    run_flow(config, stack)
    after = scrape()

    def delta(name: str, **labels: str) -> float:
        return _sample(after, name, **labels) - _sample(before, name, **labels)

    assert delta("crmstream_events_in_total", topic=topic, event_type="product_view") == 3
    assert delta("crmstream_duplicate_events_total", topic=topic) == 1
    orders = config.kafka.topics.orders
    assert delta("crmstream_events_in_total", topic=orders, event_type="order_cancelled") == 1
    assert delta("crmstream_events_in_total", topic=topic, event_type="order_cancelled") == 0
    assert delta("crmstream_events_in_total", topic=orders, event_type="product_view") == 0
    assert delta("crmstream_invalid_events_total", topic=topic, field="message") == 1
    assert delta("crmstream_triggers_total", trigger_type="browse_interest") == 1
    assert delta("crmstream_event_to_trigger_seconds_count", trigger_type="browse_interest") == 1
    assert delta("crmstream_redis_roundtrip_seconds_count", operation="commit") >= 1
    assert delta("crmstream_shard_batch_events_count") >= 1


def test_replaying_a_shop_workload_twice_gives_byte_identical_triggers(isolated_config, stack):
    """A generated shop (sessions, carts, orders, deliveries, feedback) replayed twice into
    fresh state: the trigger and suppression records agree byte for byte but emitted_at."""
    from crmstream.bench.workload import Workload, WorkloadSpec, publish
    from crmstream.topics import create_topics

    config = isolated_config(policies=True)
    workload = Workload(config, WorkloadSpec(customers=300, malformed_rate=0.01, seed=11,
                                             session_gap_ms=600_000))  # fmt: skip
    publish(list(stack.brokers), config, workload, max_events=6000)
    run_flow(config, stack)

    def fresh(tag):
        t = config.kafka.topics
        return config.model_copy(update={
            "redis": config.redis.model_copy(update={"key_prefix": config.redis.key_prefix + tag}),
            "kafka": config.kafka.model_copy(update={"topics": t.model_copy(update={
                "triggers": t.triggers + tag, "suppressions": t.suppressions + tag,
                "dead_letter": t.dead_letter + tag})}),
        })  # fmt: skip

    again = fresh("r")
    create_topics(list(stack.brokers), again)
    run_flow(again, stack)

    def canonical(records):
        return sorted(orjson.dumps({k: v for k, v in r.items() if k != "emitted_at"},
                                   option=orjson.OPT_SORT_KEYS) for r in records)  # fmt: skip

    first = read_topic(stack, config.kafka.topics.triggers)
    second = read_topic(stack, again.kafka.topics.triggers)
    kinds = {r["trigger_type"] for r in first}
    assert len(first) > 50 and len(kinds) >= 4, (len(first), kinds)
    assert canonical(first) == canonical(second)
    assert canonical(read_topic(stack, config.kafka.topics.suppressions)) == canonical(
        read_topic(stack, again.kafka.topics.suppressions)
    )


def test_duplicate_event_ids_within_the_horizon_are_applied_once(isolated_config, script, stack):
    """A producer retry re-sends an event at a new offset: its event_id makes it a duplicate."""
    config = isolated_config()
    s = script(config)
    s.view("hal", "garden", 0, event_id="dup-1")
    s.view("hal", "garden", 1, event_id="dup-1")  # the same event again (new offset)
    s.view("hal", "garden", 2, event_id="dup-2")
    s.flush()
    run_flow(config, stack)

    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    view = customer_view(store, config, "hal")
    assert view is not None
    assert view["event_counts"] == {"product_view": 2}
    assert view["browse_streak"] == {"category": "garden", "views": 2}
    assert read_topic(stack, config.kafka.topics.triggers) == []  # 2 distinct views, not 3


def test_duplicate_check_can_be_switched_off(isolated_config, script, stack):
    config = isolated_config("processing.dedup_horizon_seconds=0")
    s = script(config)
    s.view("ida", "garden", 0, event_id="dup-1")
    s.view("ida", "garden", 1, event_id="dup-1")
    s.flush()
    run_flow(config, stack)
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    assert customer_view(store, config, "ida")["event_counts"] == {"product_view": 2}


def test_records_left_in_the_outbox_are_sent_by_the_next_run(isolated_config, script, stack):
    """A crash after the commit and before the broker's acknowledgement leaves records in
    the shard's outbox: the next run sends them, and a clean run leaves the outbox empty."""
    from crmstream.flows.sink import Outgoing, encode_outgoing

    config = isolated_config()
    s = script(config)
    s.view("gus", "pets", 0)
    s.view("gus", "pets", 1)
    s.view("gus", "pets", 2)
    s.flush()
    run_flow(config, stack)
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    outboxes = [store.outbox_key(shard) for shard in range(config.processing.shards)]
    assert store.client.exists(*outboxes) == 0
    assert len(read_topic(stack, config.kafka.topics.triggers)) == 1

    left = {"trigger_id": "left-by-a-crash", "customer_id": "hal", "trigger_type": "test"}
    planted = [
        Outgoing(config.kafka.topics.triggers, b"hal", orjson.dumps(left)),
        Outgoing(config.kafka.topics.suppressions, None, orjson.dumps({"trigger_id": "s1"})),
    ]
    store.client.rpush(outboxes[-1], *[encode_outgoing(r) for r in planted])
    s.view("ivy", "toys", 3)  # any input starts every shard
    s.flush()
    run_flow(config, stack)

    triggers = read_topic(stack, config.kafka.topics.triggers)
    assert [t["trigger_id"] for t in triggers].count("left-by-a-crash") == 1
    suppressions = read_topic(stack, config.kafka.topics.suppressions)
    assert [r["trigger_id"] for r in suppressions] == ["s1"]
    assert store.client.exists(*outboxes) == 0


def test_live_steps_never_run_ahead_of_the_input_time(isolated_config, script, stack):
    """Live input applies a step once every partition has reached its end, then
    more messages of that step come. The committed step numbers must still follow
    the input's Kafka time: a restart resumes from them, and steps numbered ahead
    of the input would leave a backlog no later step to close on."""
    config = isolated_config()
    s = script(config)
    with live_flow(config, stack) as (signals, flow):
        # the flow is up and tailing: it has applied a first event (a condition, no sleep)
        s.view("c0", "toys", 0)
        s.flush()
        store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
        wait_until(lambda: store.client.exists(store.state_key("c0")), 120, "the first event")
        for i in range(1, 400):  # live input over about 4 s: many partial steps
            s.view(f"c{i % 40}", "toys", i * 0.01)
            if i % 10 == 9:
                s.flush()
                time.sleep(0.1)  # pacing: the input arrives over time (not a wait for the flow)
        s.flush()
        last_step = int(time.time() * 1000) // config.processing.step_ms  # after every send
        signals.drain.set()
        flow.join(60)
        assert not flow.is_alive(), "the flow did not drain"
    store = StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)
    progress = [p for shard in range(config.processing.shards)
                for p in store.load_progress(shard).values()]  # fmt: skip
    assert sum(p.offset + 1 for p in progress if p.offset >= 0) > 0
    steps = sorted(p.step for p in progress)
    print(f"committed steps {steps[0]}..{steps[-1]}; input's last step {last_step}")
    assert steps[-1] <= last_step, f"step {steps[-1]} runs {steps[-1] - last_step} ahead"
