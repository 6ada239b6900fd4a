"""A canonical dump of everything crmstream keeps in Redis under one key prefix.

This module owns the comparison form of the state: two runs over the same
input must produce byte-identical dumps (docs/guarantees.md). Each key maps to
one canonical byte string: strings as stored, hashes and sorted sets sorted,
streams as their entries' fields without the entry ids and without
``applied_at`` (both are wall-clock times of the write, not state). The
shards' ``commit:<shard>`` keys are left out: each holds a token of the last
transaction (``StateStore.transact_once``), unique to the run by design; so
are the drain counter and barriers (``drain``, ``drain:<n>:steps``), which
count how the runs were stopped, not what they computed.
"""

from __future__ import annotations

import hashlib

import orjson
import redis

WALL_CLOCK_FIELDS = frozenset({b"applied_at"})
# key names (after the prefix) that are not state: transaction tokens, the drain counter
NOT_STATE = ("commit:", "drain")


def canonical_dump(client: redis.Redis, prefix: str) -> dict[str, bytes]:
    """Every key under ``prefix:`` (named without the prefix) and its canonical value."""
    dump: dict[str, bytes] = {}
    for key in sorted(client.scan_iter(match=f"{prefix}:*", count=1000)):
        name = key.decode()[len(prefix) + 1 :]
        if name.startswith(NOT_STATE):
            continue
        kind = client.type(key).decode()
        if kind == "string":
            value = client.get(key)
        elif kind == "hash":
            value = orjson.dumps(sorted((k.hex(), v.hex()) for k, v in client.hgetall(key).items()))
        elif kind == "zset":
            value = orjson.dumps(
                sorted((m.hex(), s) for m, s in client.zrange(key, 0, -1, withscores=True))
            )
        elif kind == "stream":
            value = orjson.dumps(
                [
                    sorted(
                        (k.hex(), v.hex()) for k, v in fields.items() if k not in WALL_CLOCK_FIELDS
                    )
                    for _id, fields in client.xrange(key)
                ]
            )
        elif kind == "set":
            value = orjson.dumps(sorted(m.hex() for m in client.smembers(key)))
        elif kind == "list":
            value = orjson.dumps([m.hex() for m in client.lrange(key, 0, -1)])
        else:
            continue  # the key expired between SCAN and TYPE
        if value is not None:
            dump[name] = kind.encode() + b"\0" + value
    return dump


def digest(dump: dict[str, bytes]) -> str:
    """SHA-256 over the whole dump in key order."""
    h = hashlib.sha256()
    for name in sorted(dump):
        h.update(name.encode() + b"\0" + dump[name] + b"\n")
    return h.hexdigest()


def differences(a: dict[str, bytes], b: dict[str, bytes]) -> list[str]:
    """Keys missing from either dump or holding different values."""
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
