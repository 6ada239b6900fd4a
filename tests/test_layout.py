"""The shard layout guard and ``reshard``, against the real flow, broker and Redis."""

from __future__ import annotations

import itertools
from urllib.parse import urlsplit

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from crmstream.config.schema import RedisConfig, TopicsConfig
from crmstream.flows.sink import Outgoing, decode_outgoing, encode_outgoing
from crmstream.state import layout
from crmstream.state.layout import Layout, LayoutError, check_layout, reshard, shard_of
from crmstream.state.store import Progress, StateStore, connect, encode_progress
from crmstream.state.timers import parse_member, timer_member
from tests.conftest import read_topic, run_flow
from tests.test_cli import crm

pytestmark = pytest.mark.integration
H = 3600.0
CUSTOMERS = [f"c{i:02d}" for i in range(40)]


def _store(config, stack) -> StateStore:
    return StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)


def _with(config, shards: int, step_ms: int):
    processing = config.processing.model_copy(update={"shards": shards, "step_ms": step_ms})
    return config.model_copy(update={"processing": processing})


# Members that name no timer: a wrong length prefix, a customer id that is not UTF-8, a
# prefix that is not a number, one of the earlier format with too few separators.
_DAMAGED = [b"\xff99:c0\x1fwake\x1f", b"\xff3:\xff\xfe\xfd\x1fwake\x1f", b"\xffx:abc\x1fwake\x1f",
            b"no-separators"]  # fmt: skip


def _timers(store: StateStore, shards: int) -> dict[bytes, tuple[int, float]]:
    """Every pending timer: member -> (shard, due)."""
    found = {}
    for shard in range(shards):
        for member, due in store.client.zrange(store.timers.key(shard), 0, -1, withscores=True):
            assert member not in found, f"timer {member!r} in two shards"
            found[member] = (shard, due)
    return found


def _carts_pending(config, stack, script):
    """A flow run with 8 shards that leaves a cart nudge per customer (due at 60 min) and an
    undelivered outbox record (as a crash between commit and delivery leaves one)."""
    s = script(config)
    for i, customer in enumerate(CUSTOMERS):
        s.event("clickstream", customer, "add_to_cart", i, product_id="p", category="shoes")
    s.event("clickstream", "zz", "session_start", 0.5 * H)  # the clock moves, no nudge due
    s.flush()
    run_flow(config, stack)
    store = _store(config, stack)
    marker = Outgoing(config.kafka.topics.triggers, b"m", b'{"marker": "outbox of shard 5"}')
    store.client.rpush(store.outbox_key(5), encode_outgoing(marker))
    return store


def test_a_changed_shard_count_stops_the_flow_before_it_reads(isolated_config, stack, script):
    config = isolated_config("processing.shards=8")
    store = _carts_pending(config, stack, script)
    assert check_layout(store, 8, 1000) == Layout(8, 1000)  # the first run recorded it
    progress = store.client.hgetall(store.progress_key(0))
    with pytest.raises(LayoutError) as err:
        run_flow(_with(config, 4, 1000), stack)
    text = str(err.value)
    assert "processing.shards=4" in text and "shards=8" in text
    assert "crmstream reshard --shards 4 --step-ms 1000" in text
    assert store.client.hgetall(store.progress_key(0)) == progress
    with pytest.raises(LayoutError, match=r"processing\.step_ms=500.*step_ms=1000"):
        check_layout(store, 8, 500)
    # A state written before the layout key existed: its shards come from the counts.
    store.client.delete(layout.layout_key(store))
    with pytest.raises(LayoutError, match="written with shards=8"):
        check_layout(store, 4, 1000)
    assert not store.client.exists(layout.layout_key(store))
    assert check_layout(store, 8, 1000) == Layout(8, 1000)
    assert store.client.hgetall(layout.layout_key(store)) == {b"shards": b"8", b"step_ms": b"1000"}


def test_reshard_moves_timers_and_outbox_and_the_flow_goes_on(isolated_config, stack, script):
    config = isolated_config("processing.shards=8")
    store = _carts_pending(config, stack, script)
    before = _timers(store, 8)
    # Each customer's cart nudges wait in its state, under one wake member due at 60 min.
    wakes = {t.customer for t in (parse_member(m, 0) for m in before) if t.kind == "wake"}
    assert wakes >= set(CUSTOMERS)
    assert len({shard for shard, _ in before.values()}) > 3  # spread over the old shards
    progress = [store.load_progress(shard) for shard in range(8)]

    report = reshard(store, Layout(3, 500), legacy_step_ms=1000)

    assert (report.timers, report.outbox) == (len(before), 1)
    after = _timers(store, 8)
    assert {m: due for m, (_, due) in after.items()} == {m: due for m, (_, due) in before.items()}
    for member, (shard, _) in after.items():
        assert shard == shard_of(parse_member(member, 0).customer, 3)
    for shard in range(3, 8):
        for key in (store.progress_key(shard), store.outbox_key(shard)):
            assert not store.client.exists(key)
    assert not list(store.client.scan_iter(match=f"{store.prefix}:reshard:*"))
    assert store.load_outbox(5 % 3) and sum(len(store.load_outbox(s)) for s in range(3)) == 1
    for shard in range(3):
        merged = store.load_progress(shard)
        assert set(merged) == set(progress[0])
        for pos, rec in merged.items():
            lowest = min((p[pos] for p in progress), key=lambda r: r.offset)
            assert (rec.offset, rec.max_event_ms) == (lowest.offset, lowest.max_event_ms)
            assert rec.step == lowest.step * 2  # the same time bucket in 500 ms steps
    counts = {int(k): int(v) for k, v in store.client.hgetall(store.customers_key()).items()}
    assert sum(counts.values()) == report.customers == len(CUSTOMERS) + 1
    assert counts == {s: sum(shard_of(c, 3) == s for c in [*CUSTOMERS, "zz"]) for s in range(3)}
    assert check_layout(store, 3, 500) == Layout(3, 500)

    # The flow goes on with the new layout: every moved cart timer fires once, the
    # moved outbox record is sent, and no event is applied twice.
    resharded = _with(config, 3, 500)
    s = script(resharded)
    s.event("clickstream", "zz", "session_start", 3 * H)  # past every first nudge
    s.flush()
    run_flow(resharded, stack)
    records = read_topic(stack, config.kafka.topics.triggers)
    nudged = sorted(
        r["customer_id"]
        for r in records
        if r.get("trigger_type") == "cart_abandoned" and r["payload"]["nudge"] == 1
    )
    assert nudged == CUSTOMERS
    assert [r for r in records if "marker" in r] == [{"marker": "outbox of shard 5"}]
    assert not store.load_outbox(2)
    profile = store.client.hgetall(store.profile_key("c07"))
    assert profile, "c07's profile is still there"


def test_an_interrupted_reshard_blocks_the_flow_and_finishes_when_run_again(
    isolated_config, stack, script, monkeypatch
):
    config = isolated_config("processing.shards=8")
    store = _carts_pending(config, stack, script)
    before = {m: due for m, (_, due) in _timers(store, 8).items()}
    monkeypatch.setattr(layout, "_CHUNK", 3)
    calls = []

    def crash(what: str, n: int) -> None:
        calls.append((what, n))
        if len(calls) == 4:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        reshard(store, Layout(2, 1000), legacy_step_ms=1000, progress=crash)
    with pytest.raises(LayoutError, match=r"did not finish.*--shards 2 --step-ms 1000"):
        check_layout(store, 2, 1000)
    with pytest.raises(LayoutError, match="finish it first"):
        reshard(store, Layout(4, 1000), legacy_step_ms=1000)

    report = reshard(store, Layout(2, 1000), legacy_step_ms=1000)

    # the four chunks moved before the crash (a chunk holds up to 3 of a shard's timers)
    assert [what for what, _ in calls] == ["timers"] * 4
    assert report.timers == len(before) - sum(n for _, n in calls) > 0
    assert {m: due for m, (_, due) in _timers(store, 8).items()} == before
    assert sum(len(store.load_outbox(s)) for s in range(8)) == 1
    assert check_layout(store, 2, 1000) == Layout(2, 1000)


def test_reshard_command(isolated_config, stack, script):
    config = isolated_config("processing.shards=8")
    _carts_pending(config, stack, script)
    sets = ["--set", f"redis.key_prefix={config.redis.key_prefix}"]
    result = crm("reshard", "--shards", "2", "--yes", "--redis-url", stack.redis_url, *sets)
    assert result.returncode == 0, result.stderr
    assert "8 shards, step_ms 1000 -> 2 shards, step_ms 1000" in result.stdout
    assert f"{len(CUSTOMERS) + 1} customers counted" in result.stdout
    again = crm("reshard", "--shards", "2", "--yes", "--redis-url", stack.redis_url, *sets)
    assert again.returncode == 0 and "already has 2 shards" in again.stdout
    empty = crm("reshard", "--yes", "--redis-url", stack.redis_url, "--set", "redis.key_prefix=e")
    assert empty.returncode == 2 and "no state under key prefix 'e'" in empty.stderr

    # `crmstream run` with the old shard count now: the layout error, exit 2, no traceback.
    sets += ["--set", "metrics.port=0", "--set", "processing.shards=8"]
    for role in TopicsConfig.model_fields:
        sets += ["--set", f"kafka.topics.{role}={getattr(config.kafka.topics, role)}"]
    brokers = ",".join(stack.brokers)
    ran = crm("run", "--brokers", brokers, "--redis-url", stack.redis_url, "--until-end", *sets)
    assert ran.returncode == 2 and "Traceback" not in ran.stderr
    assert "processing.shards=8" in ran.stderr and "written with shards=2" in ran.stderr


_ids = itertools.count()


def _member(customer: str, kind: str, earlier: bool) -> bytes:
    return f"{customer}\x1f{kind}\x1f".encode() if earlier else timer_member(customer, kind)


_customer = st.text(st.characters(codec="utf-8"), min_size=1, max_size=6) | st.sampled_from(
    ["a", "a\x1fwake", "a\x1fwake\x1f", "\x1f", "5:a", "\xff"]
)  # ids that the earlier member format confused: only the current format writes them


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    old=st.integers(1, 9),
    new=st.integers(1, 9),
    steps=st.sampled_from([(1000, 1000), (1000, 250), (1000, 3000), (700, 1000)]),
    timers=st.dictionaries(
        st.tuples(_customer, st.sampled_from(["cart_1", "recheck", "wake"]), st.booleans()),
        st.integers(0, 2**40),
        max_size=60,
    ),
    outbox=st.lists(st.binary(max_size=8), max_size=12, unique=True),
    damaged=st.lists(st.sampled_from(_DAMAGED), max_size=3, unique=True),
    quarantined=st.lists(
        st.tuples(_customer, st.sampled_from(["cart_1", "wake", "deferred"])),
        max_size=6,
        unique=True,
    ),
    progress=st.lists(
        st.dictionaries(
            st.sampled_from([("clicks", 0), ("clicks", 1), ("orders", 0)]),
            st.tuples(st.integers(0, 10**6), st.integers(-1, 10**6), st.integers(-1, 2**40)),
            max_size=3,
        ),
        min_size=9,
        max_size=9,
    ),
)
def test_reshard_keeps_every_timer_and_record_and_the_lowest_progress(
    stack, old, new, steps, timers, outbox, damaged, quarantined, progress
):
    """Any old and new shard count: every timer once, in its customer's new shard, with its
    due time; every outbox record once, in order per old shard; per partition the lowest
    progress of the old shards (none where one of them had none), its step renumbered. A
    member that names no timer (damaged in Redis) stops nothing: it is kept, once, with
    its due time (the flow quarantines it when it comes due)."""
    # A database of its own: reshard's recount SCANs the whole database, and the other
    # tests leave many keys in database 0 (it would cost seconds per example).
    own_db = urlsplit(stack.redis_url)._replace(path="/1").geturl()
    store = StateStore(connect(own_db, RedisConfig()), f"prop{next(_ids)}")
    client = store.client
    layout._record(store, Layout(old, steps[0]))
    # Members of the earlier format (Redis may hold them) where the id allows it.
    timers = {(c, k, earlier and "\x1f" not in c): due for (c, k, earlier), due in timers.items()}
    members = {key: _member(*key) for key in timers}
    for key, due in timers.items():
        client.zadd(store.timers.key(shard_of(key[0], old)), {members[key]: due})
    for k, member in enumerate(damaged):
        client.zadd(store.timers.key(k % old), {member: 1000 + k})
    for i, record in enumerate(outbox):
        client.rpush(store.outbox_key(i % old), encode_outgoing(Outgoing("t", None, record)))
    # Quarantined timers, and damaged members the flow quarantined (outsider 49: reshard
    # left them under their old shard).
    entries = {timer_member(c, kind): orjson.dumps({"customer": c, "kind": kind})
               for c, kind in quarantined}  # fmt: skip
    for member, entry in entries.items():
        client.hset(store.quarantine_key(shard_of(parse_member(member, 0).customer, old)),
                    member, entry)  # fmt: skip
    for k, member in enumerate(damaged):
        client.hset(store.quarantine_key(k % old), member, b'{"customer": "(unreadable)"}')
    olds = [{pos: Progress(*rec) for pos, rec in p.items()} for p in progress[:old]]
    for shard, records in enumerate(olds):
        if records:
            client.hset(store.progress_key(shard), mapping=encode_progress(records))

    report = reshard(store, Layout(new, steps[1]), legacy_step_ms=1000)

    assert report.timers == len(timers) + len(damaged) and report.outbox == len(outbox)
    assert report.quarantined == len(entries) + len(damaged)
    kept = {s: client.hgetall(store.quarantine_key(s)) for s in range(max(old, new))}
    for shard in range(new, old):
        assert kept[shard] == {}
    for member, entry in entries.items():
        assert kept[shard_of(parse_member(member, 0).customer, new)].pop(member) == entry
    for member in damaged:
        assert [s for s in range(new) if kept[s].pop(member, None)] != []
    assert all(rest == {} for rest in kept.values())
    found = _timers(store, max(old, new))
    for k, member in enumerate(damaged):
        shard, due = found.pop(member)
        assert shard < new and due == 1000 + k
    assert {m: due for m, (_, due) in found.items()} == {
        members[key]: due for key, due in timers.items()
    }
    for member, (shard, _) in found.items():
        assert shard == shard_of(parse_member(member, 0).customer, new)
    for shard in range(new):
        moved = [r for s in range(shard, old, new) for i, r in enumerate(outbox) if i % old == s]
        assert [decode_outgoing(e).value for e in store.load_outbox(shard)] == moved
    expected = {}
    for pos in set.intersection(*(set(p) for p in olds)):
        low = min((p[pos] for p in olds), key=lambda r: r.offset)
        step = low.step * steps[0] // steps[1] if low.step >= 0 else low.step
        expected[pos] = Progress(low.offset, step, low.max_event_ms)
    for shard in range(new):
        assert store.load_progress(shard) == expected
    for shard in range(new, old):
        assert not client.exists(store.progress_key(shard), store.outbox_key(shard))
    assert check_layout(store, new, steps[1]) == Layout(new, steps[1])
    assert not list(client.scan_iter(match=f"{store.prefix}:reshard:*"))
    client.close()


def test_declining_the_reshard_confirmation_changes_nothing_and_is_no_not_found(
    isolated_config, stack, script
):
    """Outsider 49: answering no exited 1, which the README keeps for "nothing found"."""
    import subprocess
    import sys

    config = isolated_config("processing.shards=3")
    _carts_pending(config, stack, script)
    store = _store(config, stack)
    before = store.client.hgetall(layout.layout_key(store))
    args = ["reshard", "--shards", "2", "--redis-url", stack.redis_url,
            "--set", f"redis.key_prefix={config.redis.key_prefix}"]  # fmt: skip
    result = subprocess.run([sys.executable, "-m", "crmstream", *args], input="n\n",
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "nothing changed" in result.stderr
    assert store.client.hgetall(layout.layout_key(store)) == before
