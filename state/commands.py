"""Batches of Redis commands packed as they are queued and sent in one write.

This module owns the store's fast path to a single Redis server. redis-py's
pipeline keeps each command as a Python tuple, runs it through several layers
when it is queued and again when it is packed, and converts each reply with a
Python callback. A shard step sends thousands of small commands (a profile
``HSET`` per customer, an ``HMGET`` per customer with triggers), and those
layers cost more than Redis does. Here each command is packed at once by
hiredis (C), the batch goes out in one write, and hiredis parses the replies.

Only the commands the store uses are offered, with redis-py's signatures, so the
same staging code queues on a ``CommandBatch`` (a single server) or on a redis-py
pipeline (Redis Cluster, where commands go to the node owning each key).
Replies are Redis's own: bytes, integers, lists; ``OK`` stays ``b"OK"``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import hiredis
import redis

Value = bytes | str | int | float

_MULTI = hiredis.pack_command(("MULTI",))
_EXEC = hiredis.pack_command(("EXEC",))


class PartialTransaction(redis.ResponseError):
    """Redis ran a MULTI/EXEC and refused one of its commands as it ran (a key of the wrong
    type, a value out of its range): Redis does not roll back, so the others were applied."""


class CommandBatch:
    """Commands for one round trip; ``execute`` sends them and returns their replies."""

    def __init__(self) -> None:
        self._packed: list[bytes] = []
        self._names: list[tuple[Value, ...]] = []

    def __len__(self) -> int:
        return len(self._packed)

    def command(self, *args: Value) -> None:
        """Queue one command, e.g. ``command("HMGET", key, "a", "b")``."""
        try:
            self._packed.append(hiredis.pack_command(args))
        except TypeError as exc:  # redis-py raises DataError for such values too
            raise redis.DataError(f"{args[0]}: {exc}") from None
        self._names.append(args[:2])  # the command and its key, for an error

    # -- the subset of redis-py's command API that the store stages -------------
    def mset(self, mapping: Mapping[str, Value]) -> None:
        self.command("MSET", *_flat(mapping))

    def hset(self, name: str, mapping: Mapping[str, Value]) -> None:
        self.command("HSET", name, *_flat(mapping))

    def hdel(self, name: str, *keys: str) -> None:
        self.command("HDEL", name, *keys)

    def hincrby(self, name: str, key: str, amount: int = 1) -> None:
        self.command("HINCRBY", name, key, amount)

    def zadd(self, name: str, mapping: Mapping[str, int | float]) -> None:
        args: list[Value] = ["ZADD", name]
        for member, score in mapping.items():
            args += (score, member)
        self.command(*args)

    def zrem(self, name: str, *members: str) -> None:
        self.command("ZREM", name, *members)

    def zcard(self, name: str) -> None:
        self.command("ZCARD", name)

    def delete(self, *names: str) -> None:
        self.command("DEL", *names)

    def set(self, name: str, value: Value, ex: int | None = None) -> None:
        if ex is None:
            self.command("SET", name, value)
        else:
            self.command("SET", name, value, "EX", ex)

    def rpush(self, name: str, *values: Value) -> None:
        self.command("RPUSH", name, *values)

    def ltrim(self, name: str, start: int, end: int) -> None:
        self.command("LTRIM", name, start, end)

    def xadd(self, name: str, fields: Mapping[str, Value]) -> None:
        self.command("XADD", name, "*", *_flat(fields))

    # -- sending ---------------------------------------------------------------
    def execute(
        self, client: redis.Redis, transaction: bool = False, refusals: bool = False
    ) -> list:
        """Send the batch on one of ``client``'s connections and read every reply.

        ``transaction``: wrapped in MULTI/EXEC; the replies are EXEC's. A reply that
        is an error raises ``redis.ResponseError`` naming the command, unless
        ``refusals`` (no transaction): then each error reply is in its place among the
        replies, as an exception, for the caller to weigh. Any failure
        closes the connection (no reply is left unread on it); the caller decides
        whether to try again (connection errors and timeouts are worth it).
        """
        if not self._packed:
            return []
        packed = [_MULTI, *self._packed, _EXEC] if transaction else self._packed
        pool = client.connection_pool
        conn = pool.get_connection()
        try:
            conn.send_packed_command([b"".join(packed)])
            if transaction:
                conn.read_response()  # OK to MULTI
                for _ in self._packed:
                    conn.read_response()  # QUEUED, or the command's error (raised)
            replies = conn.read_response() if transaction else self._read(conn)
            if replies is None:  # EXEC without a result: the transaction was discarded
                raise redis.ResponseError("Redis discarded the transaction (EXEC returned nil)")
        except BaseException:
            conn.disconnect()
            raise
        finally:
            pool.release(conn)
        if refusals and not transaction:
            return replies
        for name, reply in zip(self._names, replies, strict=True):
            if isinstance(reply, redis.ResponseError):
                what = " ".join(map(str, name[:1])) + (f" {name[1]!r}" if len(name) > 1 else "")
                if transaction:  # outsider 52: reported as an outage, "nothing is lost"
                    raise PartialTransaction(
                        f"{what} in a transaction of {len(self)}: {reply}; Redis applied the "
                        "transaction's other commands (it does not roll back)"
                    )
                raise redis.ResponseError(f"{what} in a batch of {len(self)}: {reply}")
        return replies

    def _read(self, conn: redis.connection.AbstractConnection) -> list:
        replies = []
        for _ in self._names:
            try:
                replies.append(conn.read_response())
            except redis.ResponseError as exc:  # read the rest: the connection stays usable
                replies.append(exc)
        return replies


def _flat(mapping: Mapping[str, Value]) -> Iterable[Value]:
    """``{a: 1, b: 2}`` as ``a, 1, b, 2``."""
    flat: list[Value] = []
    for pair in mapping.items():
        flat += pair
    return flat
