"""Failure stays with one customer (DESIGN.md decision 14, flows/quarantine.py).

A customer whose stored state, open orders or timers make its work raise is set
aside: its events of the round are dead-lettered with ``processing_error``, its due
timers are quarantined, and every other customer's round commits as if it were not
there. The next round, and a restart, go on. Run on the real redis-server and broker.
"""

from __future__ import annotations

import itertools
from typing import Any

import orjson
import pytest

from crmstream.config import CrmConfig
from crmstream.flows.route import route_batch
from crmstream.flows.routing import shard_keys
from crmstream.flows.runtime import Runtime
from crmstream.flows.source import RawMessage
from crmstream.state.store import StateStore, connect
from crmstream.state.timers import Timer, parse_member
from tests.conftest import read_topic, run_flow
from tests.shard_driver import Cutting, Message, driver_config, run_log

pytestmark = pytest.mark.integration

T0 = 1_767_258_600_000  # 2026-01-01T09:10:00Z
H = 3_600_000
_ids = itertools.count()
_prefixes = itertools.count()


def _msg(role: str, customer: str, kind: str, at: int, **fields: Any) -> Message:
    body = {"event_id": f"{customer}-{next(_ids)}", "customer_id": customer,
            "event_type": kind, "event_time": at, **fields}  # fmt: skip
    return Message(role, 0, customer.encode(), orjson.dumps(body), at)


def _history(customer: str, start: int) -> list[Message]:
    """Three views of one category (browse interest) and a cart add (a nudge an hour later)."""
    views = [_msg("clickstream", customer, "product_view", start + k * 1000, product_id="p",
                  category="beauty") for k in range(3)]  # fmt: skip
    cart = _msg("clickstream", customer, "add_to_cart", start + 5000, product_id="p",
                category="beauty")  # fmt: skip
    return [*views, cart]


@pytest.fixture(scope="module")
def config(stack) -> CrmConfig:
    return driver_config(stack, "isolation-runs", "policies.quiet_hours.start=00:00",
                         "policies.quiet_hours.end=00:00")  # fmt: skip


def _own(config: CrmConfig) -> CrmConfig:
    prefix = f"iso{next(_prefixes)}"
    redis = config.redis.model_copy(update={"key_prefix": prefix})
    return config.model_copy(update={"redis": redis})


def _store(config: CrmConfig, stack) -> StateStore:
    return StateStore(connect(stack.redis_url, config.redis), config.redis.key_prefix)


def _shard_of(config: CrmConfig, customer: str) -> int:
    from crmstream.state.layout import shard_of

    return shard_of(customer, config.processing.shards)


def _plant_bad_hold(config: CrmConfig, stack, customer: str) -> None:
    """A quiet-hours hold whose record is not JSON (as a corrupted or hand-edited member
    would be), due before the history starts."""
    store = _store(config, stack)
    member = Timer(customer, "deferred", "{not json", T0 - H).member
    store.client.zadd(store.timers.key(_shard_of(config, customer)), {member: T0 - H})


def _plant_hold_of_another(config: CrmConfig, stack, customer: str) -> None:
    """A quiet-hours hold under this customer whose record is another customer's (the
    third outsider's case: it went out for the other customer, past its policies)."""
    store = _store(config, stack)
    record = {
        "trigger_id": "feedface" * 4,
        "customer_id": "good",
        "trigger_type": "cart_abandoned",
        "channel": "email",
        "event_time": "2026-01-01T00:00:00Z",
    }
    member = Timer(customer, "deferred", orjson.dumps(record).decode(), T0 - H).member
    store.client.zadd(store.timers.key(_shard_of(config, customer)), {member: T0 - H})


def _plant_bad_state(config: CrmConfig, stack, customer: str) -> None:
    store = _store(config, stack)
    store.client.set(store.state_key(customer), b"\x06\xff\xff\xff")  # layout 6, corrupt


def _plant_unchecked_out_of_range_state(config: CrmConfig, stack, customer: str) -> None:
    """A layout-6 blob (no check) whose duplicate-ring cursor is past the ring: read, the
    kernel wrote the customer's event ids into the next customer's record."""
    from crmstream.state.encoding import CHECK_BYTES, encode_records, fresh_records

    records = fresh_records(1)
    records["recent_next"] = 33
    (blob,) = encode_records(records)
    store = _store(config, stack)
    store.client.set(store.state_key(customer), bytes([6]) + blob[1:-CHECK_BYTES])


def _plant_wrong_type_state(config: CrmConfig, stack, customer: str) -> None:
    """The state key is a hash, not a string: MGET answers nil for it, as for a new
    customer; read so, the customer's history would start again and overwrite the key."""
    store = _store(config, stack)
    store.client.hset(store.state_key(customer), "hand", "edited")


def _plant_wrong_type_tombstone(config: CrmConfig, stack, customer: str) -> None:
    """The erasure tombstone is a list: read as no tombstone, the erased customer's
    events would apply."""
    store = _store(config, stack)
    store.client.rpush(store.tombstone_key(customer), "1767225600000")


def _plant_bad_orders(config: CrmConfig, stack, customer: str) -> None:
    """An open order whose promise is not a time, and its delivery timer, due before the
    history starts (so the customer's first round reads the orders)."""
    store = _store(config, stack)
    store.client.hset(store.promises_key(customer), "o1", "soon")
    member = Timer(customer, "delivery", "o1", T0 - H).member
    store.client.zadd(store.timers.key(_shard_of(config, customer)), {member: T0 - H})


def _plant_wrong_type_orders(config: CrmConfig, stack, customer: str) -> None:
    """The open-orders key is a string, not a hash: Redis refuses HGETALL on it
    (WRONGTYPE), for this customer's key only; and a delivery timer that reads it."""
    store = _store(config, stack)
    store.client.set(store.promises_key(customer), "not a hash")
    member = Timer(customer, "delivery", "o1", T0 - H).member
    store.client.zadd(store.timers.key(_shard_of(config, customer)), {member: T0 - H})


def _plant_bad_tombstone(config: CrmConfig, stack, customer: str) -> None:
    """An erasure tombstone whose value is not a time."""
    store = _store(config, stack)
    store.client.set(store.tombstone_key(customer), "garbage")


CASES = {
    "a hold that is not JSON": _plant_bad_hold,
    "a hold whose record is another customer's": _plant_hold_of_another,
    "a corrupt state blob": _plant_bad_state,
    "unreadable open orders": _plant_bad_orders,
    "an open-orders key of the wrong type": _plant_wrong_type_orders,
    "an erasure tombstone that is not a time": _plant_bad_tombstone,
    "a state key of the wrong type": _plant_wrong_type_state,
    "an unchecked state blob with its ring cursor out of range": (
        _plant_unchecked_out_of_range_state
    ),
    "an erasure tombstone of the wrong type": _plant_wrong_type_tombstone,
}


def _kinds(records: list[dict[str, Any]], customer: str) -> list[str]:
    return sorted(r["trigger_type"] for r in records if r["customer_id"] == customer)


@pytest.mark.parametrize("case", sorted(CASES))
# Both hold all of the bad customer's first events in one step (the round that fails);
# its events in later rounds are applied as usual, its offending timers being set aside.
@pytest.mark.parametrize("cutting", [Cutting(10**13, (5000,), 0), Cutting(H, (1,), 0)])
def test_one_customer_that_raises_is_set_aside_and_the_rest_commits(config, stack, case, cutting):
    bad_history = _history("bad", T0)
    shipped = _msg("orders", "bad", "order_shipped", T0 + 6000, order_id="o1",
                   promised_delivery_time=T0 + 3 * H)  # fmt: skip
    log = sorted([*_history("good", T0), *bad_history, shipped,
                  _msg("clickstream", "zed", "session_start", T0 + 2 * H)],
                 key=lambda m: m.kafka_ms)  # fmt: skip
    clean = _own(config)
    expected = run_log(clean, stack, [m for m in log if m.key != b"bad"], cutting, T0 + 2 * H)

    own = _own(config)
    CASES[case](own, stack, "bad")
    got = run_log(own, stack, log, cutting, T0 + 2 * H)
    # The good customers' triggers are exactly those of a run without the bad one.
    assert [r for r in got.triggers if r["customer_id"] != "bad"] == expected.triggers
    assert _kinds(got.triggers, "good") == ["browse_interest", "cart_abandoned"]
    assert _kinds(got.triggers, "bad") == []
    # Each of the bad customer's events is dead-lettered once, with its source position.
    dead = [d for d in got.dead_letters if d["customer_id"] == "bad"]
    positions = {}  # (role, offset) of each message of the log, as the driver numbers them
    for m in log:
        positions.setdefault(m.role, []).append(m)
    want = sorted((role, k) for role, msgs in positions.items()
                  for k, m in enumerate(msgs) if m.key == b"bad")  # fmt: skip
    got_at = sorted((d["source"]["topic"].split(".")[-1], d["source"]["offset"]) for d in dead)
    assert got_at == want
    assert all(d["reason"].startswith("processing_error: ") for d in dead)
    store = _store(own, stack)
    shard = _shard_of(own, "bad")
    # Its timers are out of the timer set and in the quarantine; its state is as it was.
    timers = got.redis.get(f"{own.redis.key_prefix}:timers:{shard}", [])
    in_set = [parse_member(m, 0).customer for m, _ in timers]
    assert "bad" not in in_set
    quarantined = store.load_quarantine(own.processing.shards)[shard]
    kept = [orjson.loads(v) for v in quarantined.values()]
    assert all(k["customer"] == "bad" and k["reason"].startswith("processing_error") for k in kept)
    if case in ("a hold that is not JSON", "a hold whose record is another customer's"):
        assert any(k["kind"] == "deferred" for k in kept)
        # the reason names the hold (a bare "JSONDecodeError" named nothing: outsider 4)
        assert all("the quiet-hours hold " in d["reason"] for d in dead), dead[0]["reason"]
    if case == "a corrupt state blob":
        assert store.client.get(store.state_key("bad")) == b"\x06\xff\xff\xff"
    if case == "a state key of the wrong type":
        assert store.client.hgetall(store.state_key("bad")) == {b"hand": b"edited"}

    # The next round, in a new process, goes on: nothing committed fails it.
    zed = _msg("clickstream", "zed", "session_start", T0 + 5 * H)
    later = [*_history("good", T0 + 3 * H), zed]
    topics = own.kafka.topics.by_role
    first = {(topics[role], 0): len(msgs) for role, msgs in positions.items()}
    again = run_log(own, stack, later, cutting, T0 + 5 * H, first_offsets=first)
    fired = _kinds([*again.triggers, *again.suppressions], "good")  # the caps may stop one
    assert "cart_abandoned" in fired


def test_a_message_whose_validation_raises_is_dead_lettered(config, stack, monkeypatch):
    """Validation never raises by design (tests/test_fuzz_fields.py); if it did, the
    message alone goes to the dead letters and the rest of the batch is parsed."""
    runtime = Runtime(config, stack)
    parse = runtime.validator.parse

    def flaky(key, value, topic, partition, offset, ts, now):
        if b'"boom"' in (value or b""):
            raise RecursionError("maximum recursion depth exceeded")
        return parse(key, value, topic, partition, offset, ts, now)

    monkeypatch.setattr(runtime.validator, "parse", flaky)
    topic = config.kafka.topics.clickstream
    good = orjson.dumps({"event_id": "e1", "customer_id": "c1", "event_type": "session_start",
                         "event_time": T0})  # fmt: skip
    bad = orjson.dumps({"event_id": "boom", "customer_id": "c2", "event_type": "session_start",
                        "event_time": T0})  # fmt: skip
    batch = [
        RawMessage(b"c1", good, topic, 0, 0, T0, 0),
        RawMessage(b"c2", bad, topic, 0, 1, T0, 0),
    ]
    items = [item for _key, item in route_batch(runtime, batch, shard_keys(2, 1))]
    parsed = [ev.event_id for item in items for ev in item.events]
    invalid = [bad for item in items for bad in item.invalid]
    assert parsed == ["e1"]
    assert [(b.offset, b.reason) for b in invalid] == [
        (1, "processing_error: RecursionError: maximum recursion depth exceeded")
    ]


def test_the_real_flow_runs_on_past_a_customer_whose_state_is_corrupt(
    isolated_config, script, stack
):
    """Through Kafka and Bytewax: the flow completes, the customer's events are dead
    letters, every other customer's triggers go out; run again, it starts cleanly."""
    config = isolated_config()
    _plant_bad_state(config, stack, "bad")
    s = script(config)
    for cust in ("good", "bad"):
        for k in range(3):
            s.view(cust, "beauty", k)
    s.flush()
    run_flow(config, stack)
    triggers = read_topic(stack, config.kafka.topics.triggers)
    got = [(r["customer_id"], r["trigger_type"]) for r in triggers]
    assert got == [("good", "browse_interest")]
    dead = read_topic(stack, config.kafka.topics.dead_letter)
    assert sorted(d["customer_id"] for d in dead) == ["bad"] * 3
    assert all(d["reason"].startswith("processing_error: StateEncodingError") for d in dead)
    s.view("good", "shoes", 10)
    s.flush()
    run_flow(config, stack)  # a restart over the committed state: no crash loop


def test_quarantined_timers_are_listed_and_released(config, stack):
    """``crmstream quarantine list`` shows the set-aside timers with their reason;
    ``release`` puts them back in the timer set at their due times."""
    from typer.testing import CliRunner

    from crmstream.cli import app

    own = _own(config)
    _plant_bad_hold(own, stack, "bad")
    run_log(own, stack, _history("bad", T0), Cutting(10**13, (5000,), 0), T0 + H)
    args = ["--redis-url", own.redis.url, "--set", f"redis.key_prefix={own.redis.key_prefix}"]
    listed = CliRunner().invoke(app, ["quarantine", "list", "--json", *args])
    assert listed.exit_code == 0, listed.output
    rows = [orjson.loads(line) for line in listed.output.splitlines()]
    assert {(r["customer"], r["kind"]) for r in rows} >= {("bad", "deferred")}
    assert all(
        r["reason"].startswith("processing_error: ValueError: the quiet-hours hold")
        and "does not hold a trigger record" in r["reason"]
        for r in rows
    )
    released = CliRunner().invoke(app, ["quarantine", "release", "bad", *args])
    assert released.exit_code == 0, released.output
    store = _store(own, stack)
    shard = _shard_of(own, "bad")
    assert store.load_quarantine(own.processing.shards)[shard] == {}
    back = {parse_member(m, s).kind: s for m, s in store.client.zrange(
        store.timers.key(shard), 0, -1, withscores=True)}  # fmt: skip
    assert back["deferred"] == T0 - H
    missing = CliRunner().invoke(app, ["quarantine", "release", "nobody", *args])
    assert missing.exit_code == 1 and "nobody" in missing.output  # nothing found
    none_left = CliRunner().invoke(app, ["quarantine", "release", "--all", *args])
    assert none_left.exit_code == 1, none_left.output
    assert "no quarantined timers for any customer" in none_left.output


_BAD_ENTRIES = {
    "not JSON": (b"{not json", "is not JSON"),
    "other types": (b'{"customer": 5, "kind": {}, "reason": [1]}', "is not an object with"),
    "due not a number": (
        b'{"customer": "bad", "kind": "recheck", "reason": "r", "due_ms": "abc"}',
        "due at 'abc'",
    ),
    "due past 9999": (
        b'{"customer": "bad", "kind": "recheck", "reason": "r", "due_ms": 1e23}',
        "due at 1e+23",
    ),
    "another customer's": (
        b'{"customer": "good", "kind": "recheck", "reason": "r", "due_ms": 5}',
        "customer 'good''s, under a timer of 'bad'",
    ),
}


@pytest.mark.parametrize("case", sorted(_BAD_ENTRIES))
def test_a_quarantine_entry_that_is_not_what_the_flow_writes_is_listed_and_released_at_once(
    case, config, stack
):
    """The third and fourth outsiders' cases: an entry that is not JSON, or with fields
    of other types, made ``quarantine list`` end in a traceback (exit 70); a due time
    that is not a number stopped ``release --all`` with a Redis outage message; one past
    the year 9999 was released never to fire; another customer's entry was listed and
    released as that customer's. Each is listed as what it is, and released at once."""
    from typer.testing import CliRunner

    from crmstream.cli import app

    own = _own(config)
    store = _store(own, stack)
    shard = _shard_of(own, "bad")
    member = Timer("bad", "recheck", "", T0).member
    raw, says = _BAD_ENTRIES[case]
    store.client.hset(store.quarantine_key(shard), member, raw)
    args = ["--redis-url", own.redis.url, "--set", f"redis.key_prefix={own.redis.key_prefix}"]
    listed = CliRunner().invoke(app, ["quarantine", "list", "--json", *args])
    assert listed.exit_code == 0, listed.output
    (row,) = [orjson.loads(line) for line in listed.output.splitlines()]
    assert (row["customer"], row["kind"]) == ("bad", "recheck")
    assert f"{store.quarantine_key(shard)!r} is " in row["reason"] and says in row["reason"]
    released = CliRunner().invoke(app, ["quarantine", "release", "bad", *args])
    assert released.exit_code == 0, released.output
    back = store.client.zrange(store.timers.key(shard), 0, -1, withscores=True)
    assert [m for m, _ in back] == [member]


# Members that name no timer: a wrong length prefix, a customer id that is not UTF-8, a
# prefix that is not a number, and two of the earlier text format with too few separators.
_DAMAGED = [b"\xff99:c0000000\x1fwake\x1f", b"\xff3:\xff\xfe\xfd\x1fwake\x1f",
            b"\xffx:abc\x1fwake\x1f", b"old-format-no-separators", b"c0000000\x1fwake"]  # fmt: skip


@pytest.mark.parametrize("cutting", [Cutting(10**13, (5000,), 0), Cutting(H, (1,), 0)])
def test_timer_members_that_name_no_timer_are_quarantined_and_change_nothing(
    config, stack, cutting
):
    """Damaged members of a timer set belong to no customer: they move to the shard's
    quarantine (kind ``unreadable``) and every customer's triggers are those of a run
    without them; the next run goes on."""
    log = sorted([*_history("good", T0), *_history("other", T0 + 1000),
                  _msg("clickstream", "zed", "session_start", T0 + 2 * H)],
                 key=lambda m: m.kafka_ms)  # fmt: skip
    expected = run_log(_own(config), stack, log, cutting, T0 + 2 * H)
    own = _own(config)
    store = _store(own, stack)
    for shard in range(own.processing.shards):
        store.client.zadd(store.timers.key(shard), {m: T0 - H + k for k, m in enumerate(_DAMAGED)})
    got = run_log(own, stack, log, cutting, T0 + 2 * H)
    assert got.triggers == expected.triggers
    assert got.suppressions == expected.suppressions
    for shard, entries in store.load_quarantine(own.processing.shards).items():
        assert sorted(entries) == sorted(_DAMAGED), shard
        kept = [orjson.loads(v) for v in entries.values()]
        assert {(k["customer"], k["kind"]) for k in kept} == {("(unreadable)", "unreadable")}
        assert all(k["reason"].startswith("unreadable timer member") for k in kept)
        assert not set(_DAMAGED) & set(store.client.zrange(store.timers.key(shard), 0, -1))
    topics = own.kafka.topics.by_role
    later = [*_history("good", T0 + 3 * H), _msg("clickstream", "zed", "session_start", T0 + 5 * H)]
    again = run_log(own, stack, later, cutting, T0 + 5 * H,
                    first_offsets={(topics["clickstream"], 0): len(log)})  # fmt: skip
    assert "cart_abandoned" in _kinds([*again.triggers, *again.suppressions], "good")


@pytest.mark.parametrize("case", ["a corrupt state blob", "an open-orders key of the wrong type"])
def test_a_customer_set_aside_at_the_load_keeps_its_pending_wake_in_the_quarantine(
    config, stack, case
):
    """Outsider 49: a customer set aside at the load (its state or open orders cannot be
    read) lost its pending timers: its ``wake`` left the timer set and nothing went to the
    quarantine, so after the repair and ``release`` its cart nudge never fired."""
    from typer.testing import CliRunner

    from crmstream.cli import app

    own = _own(config)
    cutting = Cutting(10**13, (5000,), 0)
    first = [_msg("clickstream", c, "add_to_cart", T0, product_id="p", category="beauty")
             for c in ("bad", "good")]  # fmt: skip
    run_log(own, stack, first, cutting, T0 + 60_000)  # both nudges pending: due T0 + 1 h
    store = _store(own, stack)
    shard = _shard_of(own, "bad")
    wake = Timer("bad", "wake", "", 0).member
    due = store.client.zscore(store.timers.key(shard), wake)
    assert due == T0 + H
    blob = store.client.get(store.state_key("bad"))
    if case == "a corrupt state blob":
        store.client.set(store.state_key("bad"), b"\x06\xff\xff\xff")
    else:
        store.client.set(store.promises_key("bad"), "not a hash")
    offsets = {(own.kafka.topics.clickstream, 0): 2}
    # An order event reads the open orders; any event reads the state.
    touch = _msg("orders", "bad", "order_delivered", T0 + 120_000, order_id="o1")
    offsets[(own.kafka.topics.orders, 0)] = 0
    from prometheus_client import REGISTRY

    def dead(topic: str = own.kafka.topics.orders) -> float:
        labels = {"topic": topic, "field": "processing_error"}
        return REGISTRY.get_sample_value("crmstream_invalid_events_total", labels) or 0.0

    before = dead()
    run_log(own, stack, [touch], cutting, T0 + 120_000, first_offsets=offsets)
    assert dead() - before == 1  # its event is a dead letter, counted as one (outsider 49)
    # ... and shown as one of a customer set aside, not as an unreadable message.
    shown = CliRunner().invoke(app, [
        "dead-letters", "--brokers", ",".join(stack.brokers), "--field", "processing_error",
        "--json", "--last", "200", "--set",
        f"kafka.topics.dead_letter={own.kafka.topics.dead_letter}"])  # fmt: skip
    assert shown.exit_code == 0, shown.output
    assert any(orjson.loads(line)["customer_id"] == "bad" for line in shown.output.splitlines())
    assert store.client.zscore(store.timers.key(shard), wake) is None  # out of the timer set
    kept = {m: orjson.loads(v) for m, v in store.load_quarantine(own.processing.shards)[shard]
            .items()}  # fmt: skip
    assert kept[wake]["customer"] == "bad" and kept[wake]["due_ms"] == T0 + H
    assert kept[wake]["reason"].startswith("processing_error: ")

    # The operator repairs the key and releases the customer: its nudge fires when due.
    if case == "a corrupt state blob":
        store.client.set(store.state_key("bad"), blob)
    else:
        store.client.delete(store.promises_key("bad"))
    args = ["--redis-url", own.redis.url, "--set", f"redis.key_prefix={own.redis.key_prefix}"]
    released = CliRunner().invoke(app, ["quarantine", "release", "bad", *args])
    assert released.exit_code == 0, released.output
    assert store.client.zscore(store.timers.key(shard), wake) == T0 + H
    later = [_msg("clickstream", "zed", "session_start", T0 + 2 * H)]
    offsets[(own.kafka.topics.orders, 0)] = 1
    after = run_log(own, stack, later, cutting, T0 + 2 * H, first_offsets=offsets)
    assert _kinds(after.triggers, "bad") == ["cart_abandoned"]


def test_quarantine_commands_follow_the_layout_in_redis_and_keep_damaged_members(config, stack):
    """Outsider 49: after a reshard the quarantine stayed under the old shards, ``list``
    read the shard count from the configuration (missing shards), ``release`` put timers in
    a timer set the customer's shard does not read, and ``release --all`` put members that
    name no timer back, to be set aside again."""
    from typer.testing import CliRunner

    from crmstream.cli import app
    from crmstream.state.layout import Layout, reshard

    own = _own(config)
    _plant_bad_hold(own, stack, "bad")
    run_log(own, stack, _history("bad", T0), Cutting(10**13, (5000,), 0), T0 + H)
    store = _store(own, stack)
    damaged = b"\xff99:broken-member"
    unreadable = {"customer": "(unreadable)", "kind": "unreadable", "ref": "",
                  "due_ms": T0, "at_ms": T0, "reason": "unreadable timer member: x"}  # fmt: skip
    store.client.hset(store.quarantine_key(1), damaged, orjson.dumps(unreadable))
    reshard(store, Layout(5, own.processing.step_ms), legacy_step_ms=own.processing.step_ms)
    now = _shard_of(own.model_copy(update={"processing": own.processing.model_copy(
        update={"shards": 5})}), "bad")  # fmt: skip
    # The configuration still says 2 shards: the commands go by what Redis holds.
    args = ["--redis-url", own.redis.url, "--set", f"redis.key_prefix={own.redis.key_prefix}"]
    listed = CliRunner().invoke(app, ["quarantine", "list", "--json", *args])
    assert listed.exit_code == 0, listed.output
    rows = [orjson.loads(line) for line in listed.output.splitlines()]
    got = {(r["customer"], r["kind"]) for r in rows}
    assert got == {("bad", "deferred"), ("(unreadable)", "unreadable")}, rows
    assert {r["shard"] for r in rows if r["customer"] == "bad"} == {now}
    assert [r["due"] for r in rows if r["kind"] == "unreadable"] == [
        "2026-01-01T09:10:00.000+00:00"
    ]
    released = CliRunner().invoke(app, ["quarantine", "release", "--all", *args])
    assert released.exit_code == 0, released.output
    assert "names no timer" in released.output
    kinds = {parse_member(m, 0).kind for m in store.client.zrange(store.timers.key(now), 0, -1)}
    assert "deferred" in kinds
    left = [store.client.hgetall(store.quarantine_key(s)) for s in range(5)]
    assert [entries for entries in left if entries] == [{damaged: orjson.dumps(unreadable)}]


def test_release_keeps_the_sooner_due_time_of_a_timer_the_flow_armed_again(config, stack):
    """Outsider 50: a customer's ``wake`` was quarantined due in 7 days; after the repair a
    cart add re-armed it for 1 hour on; ``release`` wrote the 7 days back over it, and the
    cart nudge fired days late. A released timer the timer set holds keeps the sooner of
    the two due times; one it does not hold is put back at its own."""
    from typer.testing import CliRunner

    from crmstream.cli import app

    own = _own(config)
    store = _store(own, stack)
    shard = _shard_of(own, "bad")
    wake = Timer("bad", "wake", "", 0).member
    delivery = Timer("bad", "delivery", "o9", 0).member
    reason = {"customer": "bad", "reason": "processing_error: ValueError: x", "ref": ""}
    store.client.hset(store.quarantine_key(shard), mapping={
        wake: orjson.dumps({**reason, "kind": "wake", "due_ms": T0 + 7 * 24 * H}),
        delivery: orjson.dumps({**reason, "kind": "delivery", "ref": "o9", "due_ms": T0 + 5 * H}),
    })  # fmt: skip
    store.client.zadd(store.timers.key(shard), {wake: T0 + H})  # re-armed since: sooner
    args = ["--redis-url", own.redis.url, "--set", f"redis.key_prefix={own.redis.key_prefix}"]
    released = CliRunner().invoke(app, ["quarantine", "release", "bad", *args])
    assert released.exit_code == 0, released.output
    assert store.client.zscore(store.timers.key(shard), wake) == T0 + H
    assert store.client.zscore(store.timers.key(shard), delivery) == T0 + 5 * H
    # A quarantined due time sooner than the one in the set wins too.
    store.client.hset(store.quarantine_key(shard), wake,
                      orjson.dumps({**reason, "kind": "wake", "due_ms": T0 + 1000}))  # fmt: skip
    again = CliRunner().invoke(app, ["quarantine", "release", "bad", *args])
    assert again.exit_code == 0, again.output
    assert store.client.zscore(store.timers.key(shard), wake) == T0 + 1000
