"""CommandBatch against a real redis-server: each command it offers leaves what
redis-py's own pipeline leaves, replies come back in order, and an error names
its command and leaves the connection usable."""

from __future__ import annotations

import itertools

import pytest
import redis

from crmstream.state.commands import CommandBatch, PartialTransaction

pytestmark = pytest.mark.integration
_ids = itertools.count()


@pytest.fixture
def client(stack):
    client = redis.Redis.from_url(stack.redis_url)
    yield client
    client.close()


def _stage(pipe, p: str) -> None:
    """Every command the store stages, with the value types it passes."""
    pipe.mset({f"{p}:s1": b"\x00blob", f"{p}:s2": "text", f"{p}:{{c}}:s": b""})
    pipe.hset(f"{p}:h", mapping={"stage": "active", "zürich": "Europe/Zürich", "n": 3})
    pipe.hset(f"{p}:h2", mapping={"a": "1", "b": "2", "c": "3"})
    pipe.hdel(f"{p}:h2", "a", "c", "absent")
    pipe.hincrby(f"{p}:count", "0", 5)
    pipe.hincrby(f"{p}:count", "0", -2)
    pipe.zadd(f"{p}:z", {"c1\x1fcart\x1fx": 1_700_000_000_000, "c2": 5, "c3": 7})
    pipe.zrem(f"{p}:z", "c3", "absent")
    pipe.rpush(f"{p}:l", b"r1", b"r2", b"r3", b"r4")
    pipe.ltrim(f"{p}:l", 1, -1)
    pipe.set(f"{p}:t", 1234, ex=600)
    pipe.set(f"{p}:u", "plain")
    pipe.delete(f"{p}:u", f"{p}:absent")
    pipe.xadd(f"{p}:audit", {"action": "erasure", "subject": "ab12"})
    pipe.zcard(f"{p}:z")


def _contents(client: redis.Redis, p: str) -> dict:
    keys = sorted(k.decode()[len(p) :] for k in client.scan_iter(match=f"{p}:*"))
    return {
        "keys": keys,
        "strings": client.mget(f"{p}:s1", f"{p}:s2", f"{p}:{{c}}:s", f"{p}:t"),
        "ttl": 0 < client.ttl(f"{p}:t") <= 600,
        "hashes": (client.hgetall(f"{p}:h"), client.hgetall(f"{p}:h2")),
        "count": client.hgetall(f"{p}:count"),
        "zset": client.zrange(f"{p}:z", 0, -1, withscores=True),
        "list": client.lrange(f"{p}:l", 0, -1),
        "stream": [fields for _id, fields in client.xrange(f"{p}:audit")],
    }


@pytest.mark.parametrize("transaction", [False, True])
def test_every_command_leaves_what_a_redis_py_pipeline_leaves(client, transaction):
    ours, theirs = f"cb{next(_ids)}", f"cb{next(_ids)}"
    pipe = client.pipeline(transaction=transaction)
    _stage(pipe, theirs)
    expected = pipe.execute()
    batch = CommandBatch()
    _stage(batch, ours)
    replies = batch.execute(client, transaction=transaction)
    assert len(replies) == len(batch) == len(expected) == 15
    assert replies[-1] == expected[-1] == 2  # ZCARD
    assert replies[4:6] == expected[4:6] == [5, 3]  # HINCRBY
    assert _contents(client, ours) == _contents(client, theirs)
    assert _contents(client, ours)["list"] == [b"r2", b"r3", b"r4"]


def test_an_error_in_a_transaction_names_its_command_and_the_connection_goes_on(client):
    p = f"cb{next(_ids)}"
    client.set(f"{p}:str", "x")
    batch = CommandBatch()
    batch.hset(f"{p}:h", mapping={"a": "1"})
    batch.rpush(f"{p}:str", b"r")  # WRONGTYPE when EXEC runs it
    with pytest.raises(PartialTransaction, match=rf"RPUSH '{p}:str' in a transaction of 2: "
                       r"WRONGTYPE.*; Redis applied the transaction's other commands"):  # fmt: skip
        batch.execute(client, transaction=True)
    assert client.hget(f"{p}:h", "a") == b"1"  # MULTI/EXEC does not roll back
    # A command Redis refuses to queue aborts the whole transaction.
    batch = CommandBatch()
    batch.hset(f"{p}:h", mapping={"a": "2"})
    batch.command("HSET", f"{p}:h")  # wrong number of arguments
    with pytest.raises(redis.ResponseError, match="wrong number of arguments") as refused:
        batch.execute(client, transaction=True)
    assert not isinstance(refused.value, PartialTransaction)  # nothing of it was applied
    assert client.hget(f"{p}:h", "a") == b"1"
    after = CommandBatch()
    after.zcard(f"{p}:nothing")
    assert after.execute(client, transaction=True) == [0]


def test_an_error_outside_a_transaction_leaves_the_other_commands_applied(client):
    p = f"cb{next(_ids)}"
    client.set(f"{p}:str", "x")
    batch = CommandBatch()
    batch.command("HMGET", f"{p}:str", "a")  # WRONGTYPE
    batch.set(f"{p}:after", "y")
    with pytest.raises(redis.ResponseError, match=rf"HMGET '{p}:str' in a batch of 2: WRONGTYPE"):
        batch.execute(client)
    assert client.get(f"{p}:after") == b"y"
    reads = CommandBatch()
    reads.command("HMGET", f"{p}:none", "a", "b")
    reads.command("GET", f"{p}:after")
    assert reads.execute(client) == [[None, None], b"y"]


def test_a_value_redis_cannot_take_is_refused_when_queued():
    batch = CommandBatch()
    with pytest.raises(redis.DataError, match=r"^HSET: "):
        batch.hset("k", mapping={"a": None})
    assert len(batch) == 0
    assert batch.execute(None) == []  # nothing queued: no round trip
