"""A step's commit against a real redis-server: applied once even when Redis ran it
and its reply was lost, and the profiles it writes are what load_profiles reads.

redis-py retries a pipeline whose connection broke. For a MULTI/EXEC whose EXEC
reached Redis, that runs the transaction a second time: the outbox trim and
append and the customer count are not idempotent. A relay in front of a real
redis-server (tests/faults.py) loses one EXEC's reply after Redis ran it, or the
EXEC itself.
"""

from __future__ import annotations

import itertools
from urllib.parse import urlsplit

import pytest
import redis

from crmstream.config.schema import RedisConfig
from crmstream.metrics import get_metrics
from crmstream.state.store import Progress, StateStore, connect
from tests.faults import TransactionFaultProxy

pytestmark = pytest.mark.integration
_ids = itertools.count()


@pytest.fixture
def relayed(stack):
    proxy = TransactionFaultProxy(urlsplit(stack.redis_url).netloc).start()
    config = RedisConfig(retry_base_seconds=0.01, retry_max_seconds=0.05, retry_attempts=5)
    store = StateStore(connect(f"redis://{proxy.address}/0", config), f"ack{next(_ids)}")
    yield proxy, store, redis.Redis.from_url(stack.redis_url)
    proxy.close()


def _gauge(name: str, shard: str = "0") -> float:
    return getattr(get_metrics(), name).labels(shard)._value.get()


def test_a_commit_whose_reply_was_lost_is_not_applied_twice(relayed, caplog):
    proxy, store, direct = relayed
    pos = ("in", 0)
    store.commit(
        0, {"c1": b"v1"}, {}, {pos: Progress(5, 1, 100)}, customers_delta=1, outbox=[b"r1", b"r2"]
    )
    proxy.lose_next("reply")
    store.commit(
        0,
        {"c1": b"v2", "c2": b"w1"},
        {},
        {pos: Progress(9, 2, 200)},
        customers_delta=1,
        outbox=[b"r3"],
        outbox_trim=1,
    )
    assert proxy.lost == 1  # the second commit's reply was lost after Redis ran it
    assert direct.lrange(store.outbox_key(0), 0, -1) == [b"r2", b"r3"]
    assert direct.hget(store.customers_key(), "0") == b"2"
    assert store.load_progress(0) == {pos: Progress(9, 2, 200)}
    assert (_gauge("customers"), _gauge("pending_timers")) == (2, 0)
    assert direct.get(store.state_key("c2")) == b"w1"
    assert "had run the transaction whose reply was lost" in caplog.text
    assert _gauge("customers") == 2  # read back after the lost reply
    # and the store goes on committing on its new connection
    store.commit(0, {}, {}, {pos: Progress(12, 3, 300)}, customers_delta=0, outbox_trim=2)
    assert direct.llen(store.outbox_key(0)) == 0
    assert store.load_progress(0) == {pos: Progress(12, 3, 300)}


def test_a_commit_whose_connection_broke_before_exec_is_applied(relayed):
    """The other side of the check: a transaction Redis never ran is sent again."""
    proxy, store, direct = relayed
    pos = ("in", 0)
    store.commit(0, {"c1": b"v1"}, {}, {pos: Progress(5, 1, 100)}, customers_delta=1)
    proxy.lose_next("request")
    store.commit(
        0, {"c1": b"v2"}, {}, {pos: Progress(9, 2, 200)}, customers_delta=1, outbox=[b"r1"]
    )
    assert proxy.lost == 1  # Redis never saw that EXEC
    assert direct.hget(store.customers_key(), "0") == b"2"
    assert direct.lrange(store.outbox_key(0), 0, -1) == [b"r1"]
    assert store.load_progress(0) == {pos: Progress(9, 2, 200)}
    assert (_gauge("customers"), _gauge("pending_timers")) == (2, 0)


def test_profiles_a_commit_writes_are_the_hashes_load_profiles_reads(stack):
    """A step's profiles, whatever each one's field count and however its customer id
    is spelled, land as one hash per customer with the commit, and load_profiles
    reads back the fields asked for (an empty dict for a customer without any)."""
    direct = redis.Redis.from_url(stack.redis_url)
    store = StateStore(direct, f"prof{next(_ids)}")
    profiles = {
        "c1": {"stage": "active", "segment": "vip", "top_categories": "shoes,bags"},
        "c{2}": {"country": "DE", "language": "de", "consent.email": "granted@2026"},
        'c"3': {"timezone": "Europe/Zürich"},
        "c4": {},  # nothing to write: no key
    }
    pos = ("in", 0)
    store.commit(0, {"c1": b"s1"}, profiles, {pos: Progress(3, 1, 100)}, customers_delta=1)
    for customer, fields in profiles.items():
        raw = direct.hgetall(store.profile_key(customer))
        assert {k.decode(): v.decode() for k, v in raw.items()} == fields, customer
    every = ("stage", "segment", "top_categories", "country", "language", "consent.email")
    every += ("timezone", "churn_level")
    assert store.load_profiles([*profiles, "never-seen"], every) == {
        **profiles,
        "never-seen": {},
    }
    assert store.load_profiles([], every) == {}
    # Only the fields asked for, those present.
    assert store.load_profiles(["c1", "c{2}"], ("segment", "language", "timezone")) == {
        "c1": {"segment": "vip"},
        "c{2}": {"language": "de"},
    }
    # A later commit adds and overwrites fields; it leaves the others as they were.
    store.commit(0, {}, {"c1": {"stage": "at_risk", "churn_level": "high"}}, {})
    assert store.load_profiles(["c1"], every)["c1"] == {
        "stage": "at_risk",
        "segment": "vip",
        "top_categories": "shoes,bags",
        "churn_level": "high",
    }
    assert store.load_progress(0) == {pos: Progress(3, 1, 100)}
    assert direct.get(store.state_key("c1")) == b"s1"
