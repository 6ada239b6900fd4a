"""Which Bytewax worker runs which shard and reads which input partitions, and their names.

This module owns the two choices that decide how evenly a multi-worker run
spreads its work. Neither affects correctness: any key on any worker gives
the same results. They only decide whether two workers get half the work
each or one gets most of it.

- **Shard keys.** Bytewax sends a ``stateful_batch`` item to worker
  ``SipHash-1-3(key) % workers`` (Rust's ``DefaultHasher`` over the key's
  bytes and a 0xFF terminator, zero keys). Plain keys ``"0000".."0015"``
  land 10/6 on two workers. ``shard_keys`` picks, for each shard ``s``, a
  key that lands on worker ``s % workers``, so every worker runs the same
  number of shards. ``tests/test_routing.py`` checks the prediction
  against a real two-worker Bytewax run; should a Bytewax release change
  its hash, that test fails and the balance (not the results) is lost.
- **Partition shares.** Each worker reads every ``workers``-th input
  partition in the sorted order of their names (``worker_share``). Named
  ``<topic>-<partition>`` (zero-padded), each topic's partitions alternate
  between workers, so the busy clickstream topic is read and parsed by all
  of them rather than by one.

A shard keeps no Bytewax snapshot (Redis is the state of record), so a key
that changes with the worker count loses nothing on restart.
"""

from __future__ import annotations

_MASK = (1 << 64) - 1


def _rotl(x: int, b: int) -> int:
    return ((x << b) | (x >> (64 - b))) & _MASK


def _sip_round(v0: int, v1: int, v2: int, v3: int) -> tuple[int, int, int, int]:
    v0 = (v0 + v1) & _MASK
    v1 = _rotl(v1, 13) ^ v0
    v0 = _rotl(v0, 32)
    v2 = (v2 + v3) & _MASK
    v3 = _rotl(v3, 16) ^ v2
    v0 = (v0 + v3) & _MASK
    v3 = _rotl(v3, 21) ^ v0
    v2 = (v2 + v1) & _MASK
    v1 = _rotl(v1, 17) ^ v2
    v2 = _rotl(v2, 32)
    return v0, v1, v2, v3


def siphash13(data: bytes, k0: int = 0, k1: int = 0) -> int:
    """SipHash-1-3 of ``data`` (one compression round, three finalisation rounds)."""
    v0, v1 = k0 ^ 0x736F6D6570736575, k1 ^ 0x646F72616E646F6D
    v2, v3 = k0 ^ 0x6C7967656E657261, k1 ^ 0x7465646279746573
    n = len(data)
    whole = n - n % 8
    for i in range(0, whole, 8):
        m = int.from_bytes(data[i : i + 8], "little")
        v3 ^= m
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
        v0 ^= m
    last = ((n & 0xFF) << 56) | int.from_bytes(data[whole:], "little")
    v3 ^= last
    v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    v0 ^= last
    v2 ^= 0xFF
    for _ in range(3):
        v0, v1, v2, v3 = _sip_round(v0, v1, v2, v3)
    return v0 ^ v1 ^ v2 ^ v3


def bytewax_worker(key: str, workers: int) -> int:
    """The worker Bytewax routes a ``stateful_batch`` item with this key to."""
    return siphash13(key.encode() + b"\xff") % workers


def shard_keys(shards: int, workers: int) -> list[str]:
    """One routing key per shard, shard ``s`` on worker ``s % workers``."""
    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    keys = []
    for shard in range(shards):
        key, salt = f"{shard:04d}", 0
        while workers > 1 and bytewax_worker(key, workers) != shard % workers:
            salt += 1
            key = f"{shard:04d}.{salt}"
        keys.append(key)
    return keys


def part_name(topic: str, partition: int) -> str:
    """An input partition's Bytewax name (see the module docstring for the order)."""
    return f"{topic}-{partition:05d}"


def parse_part_name(name: str) -> tuple[str, int]:
    """(topic, partition) of a name made by ``part_name``; topics may contain '-'."""
    topic, sep, idx = name.rpartition("-")
    if not sep or not topic or not idx.isdigit():
        raise ValueError(f"not an input partition name: {name!r}")
    return topic, int(idx)


def worker_share(parts: list[str], worker_index: int, workers: int) -> list[tuple[str, int]]:
    """The input partitions (by ``part_name``) that worker ``worker_index`` of ``workers`` reads."""
    return [parse_part_name(p) for p in sorted(parts)[worker_index::workers]]
