"""The shard layout the Redis state was written with, and changing it (``crmstream reshard``).

This module owns ``{prefix}:layout``, a hash of the two settings the state is
cut by: ``processing.shards`` (which shard's timer set, outbox, progress and
customer count a customer belongs to: ``shard_of``) and
``processing.step_ms`` (the unit of the progress records' step numbers).

A flow process checks the layout before it reads any input
(``check_layout``): a state written with other settings would leave timers and
outbox records in shards nobody runs, so the process stops with an error that
names both values instead. The first process on an empty prefix records the
layout. A state written before the layout key existed is recognised by the
shard numbers in its customer-count hash, and recorded once a process
configured the same way starts.

``reshard`` rewrites the per-shard keys for new settings. It stages the old
per-shard keys under ``{prefix}:reshard:*`` (RENAME), then moves timers and
outbox records in chunks, each chunk in one MULTI/EXEC that adds it to its new
shard and removes it from the staged key, so an interrupted run can be started
again and finishes the same move: nothing is lost or written twice. While it
runs, the layout names its target and no flow process starts.
"""

from __future__ import annotations

import zlib
from collections import Counter
from collections.abc import Callable
from functools import partial
from typing import NamedTuple

from redis.cluster import RedisCluster

from crmstream.state.commands import CommandBatch
from crmstream.state.store import (
    Position,
    Progress,
    StateStore,
    decode_progress,
    encode_progress,
    lowest_progress,
)
from crmstream.state.timers import parse_member

_CHUNK = 5_000


class LayoutError(RuntimeError):
    """The state in Redis was written with other shard settings, or a reshard is unfinished."""


class Layout(NamedTuple):
    shards: int
    step_ms: int


def shard_of(customer_id: str, shards: int) -> int:
    """Stable shard of a customer (CRC-32, the same in every process and run).

    ``flows.shard.route_batch`` computes it in line for valid events;
    tests/test_route_batch.py holds it to this function message by message."""
    return zlib.crc32(customer_id.encode()) % shards


def layout_key(store: StateStore) -> str:
    return f"{store.prefix}:layout"


def _staged(store: StateStore, kind: str, shard: int) -> str:
    return f"{store.prefix}:reshard:{kind}:{shard}"


def _shard_keys(store: StateStore, shard: int) -> dict[str, str]:
    return {
        "progress": store.progress_key(shard),
        "timers": store.timers.key(shard),
        "outbox": store.outbox_key(shard),
        "quarantine": store.quarantine_key(shard),
    }


def stored_layout(store: StateStore, step_ms: int) -> tuple[Layout | None, Layout | None]:
    """The layout the state was written with (None: no state yet) and, while a reshard is
    unfinished, its target. A state older than the layout key gets ``step_ms``."""
    key = layout_key(store)
    stored = store.client.hgetall(key)
    try:
        raw = {k.decode(): int(v) for k, v in stored.items()}
        if "shards" in raw and not (raw["shards"] > 0 and raw.get("step_ms", 0) > 0):
            raise ValueError("shards and step_ms must be > 0")
        if "to_shards" in raw and not (raw["to_shards"] > 0 and raw.get("to_step_ms", 0) > 0):
            raise ValueError("to_shards and to_step_ms must be > 0")
    except (ValueError, KeyError) as error:  # UnicodeDecodeError too
        raise LayoutError(
            f"the layout at {key!r} is not what crmstream writes ({stored!r:.120}: {error}); "
            "put it right (fields shards and step_ms, whole numbers) before starting"
        ) from None
    if "shards" in raw:
        target = Layout(raw["to_shards"], raw["to_step_ms"]) if "to_shards" in raw else None
        return Layout(raw["shards"], raw["step_ms"]), target
    # Every commit counts the shard's customers in this hash, so it names every shard
    # that ever wrote anything.
    fields = [int(f) for f in store.client.hkeys(store.customers_key())]
    return (Layout(max(fields) + 1, step_ms) if fields else None), None


def check_layout(store: StateStore, shards: int, step_ms: int) -> Layout:
    """Record the layout on an empty prefix, or check the configured one against it.

    :raises LayoutError: naming the configured and the stored values and what to do.
    """
    wanted = Layout(shards, step_ms)
    found, target = stored_layout(store, step_ms)
    if target is not None:
        raise LayoutError(
            f"a reshard of {store.prefix!r} from {found.shards} shards / step_ms {found.step_ms} "
            f"to {target.shards} / {target.step_ms} did not finish: run `crmstream reshard "
            f"--shards {target.shards} --step-ms {target.step_ms}` again to finish it"
        )
    if found is None:
        _record(store, wanted)
        found, _ = stored_layout(store, step_ms)  # another process may have been first
    if found != wanted:
        raise LayoutError(
            f"processing.shards={shards} and processing.step_ms={step_ms}, but the state under "
            f"key prefix {store.prefix!r} was written with shards={found.shards} and "
            f"step_ms={found.step_ms}. Either configure those, or stop the producers, let the "
            f"flow drain, stop it and run `crmstream reshard --shards {shards} "
            f'--step-ms {step_ms}` (docs/operations.md, "Changing shards")'
        )
    if not store.client.exists(layout_key(store)):
        _record(store, wanted)  # a state from before the layout key: recognised, now recorded
    return found


def _record(store: StateStore, layout: Layout) -> None:
    pipe = store.client.pipeline(transaction=True)
    pipe.hsetnx(layout_key(store), "shards", layout.shards)
    pipe.hsetnx(layout_key(store), "step_ms", layout.step_ms)
    pipe.execute()


class ReshardReport(NamedTuple):
    source: Layout
    target: Layout
    timers: int
    outbox: int
    positions: int
    customers: int
    quarantined: int = 0


def reshard(
    store: StateStore,
    target: Layout,
    legacy_step_ms: int,
    progress: Callable[[str, int], None] = lambda _what, _n: None,
) -> ReshardReport:
    """Rewrite the per-shard keys of a stopped, drained flow for ``target``.

    Timers and outbox records move to their new shards; every new shard's
    progress is, per input partition, the lowest over the old shards (what a
    restart resumes from anyway: each customer's state skips what it applied),
    with its step renumbered to the new ``step_ms``; the customer counts are
    recounted. ``progress(what, n)`` is told as work is done. Starting it again
    after an interruption finishes the same reshard.

    :raises LayoutError: on Redis Cluster, with no state, or while another
        reshard to a different target is unfinished.
    """
    if isinstance(store.client, RedisCluster):
        raise LayoutError(
            "reshard needs a single Redis primary (it renames per-shard keys in one "
            "transaction); on Redis Cluster, drain the flow and start it on a new key prefix"
        )
    source, unfinished = stored_layout(store, legacy_step_ms)
    if source is None:
        raise LayoutError(f"no state under key prefix {store.prefix!r}: nothing to reshard")
    if unfinished is not None and unfinished != target:
        raise LayoutError(
            f"a reshard of {store.prefix!r} to {unfinished.shards} shards / step_ms "
            f"{unfinished.step_ms} did not finish: finish it first (`crmstream reshard --shards "
            f"{unfinished.shards} --step-ms {unfinished.step_ms}`)"
        )
    client, key = store.client, layout_key(store)
    if unfinished is None:
        client.hset(
            key,
            mapping={
                "shards": source.shards,
                "step_ms": source.step_ms,
                "to_shards": target.shards,
                "to_step_ms": target.step_ms,
            },
        )
    if not client.hexists(key, "staged"):
        pipe = client.pipeline(transaction=True)
        for shard in range(source.shards):
            for kind, name in _shard_keys(store, shard).items():
                if client.exists(name):
                    pipe.rename(name, _staged(store, kind, shard))
        pipe.hset(key, "staged", 1)
        pipe.execute()
    timers = _move_timers(store, source, target, progress)
    outbox = _move_outbox(store, source, target, progress)
    quarantined = _move_quarantine(store, source, target, progress)
    positions = _merge_progress(store, source, target)
    customers = _recount(store, target, progress)
    pipe = client.pipeline(transaction=True)
    pipe.delete(key, *(store.commit_key(shard) for shard in range(source.shards)))
    pipe.hset(key, mapping={"shards": target.shards, "step_ms": target.step_ms})
    pipe.execute()
    return ReshardReport(source, target, timers, outbox, positions, customers, quarantined)


def _move_timers(
    store: StateStore, source: Layout, target: Layout, progress: Callable[[str, int], None]
) -> int:
    moved = 0
    for shard in range(source.shards):
        staged = _staged(store, "timers", shard)
        while chunk := store.client.zrange(staged, 0, _CHUNK - 1, withscores=True):
            by_shard: dict[int, dict[bytes, float]] = {}
            for member, due in chunk:
                by_shard.setdefault(_new_shard(member, shard, target), {})[member] = due
            pipe = store.client.pipeline(transaction=True)
            for new, members in by_shard.items():
                pipe.zadd(store.timers.key(new), members)
            pipe.zrem(staged, *(member for member, _ in chunk))
            pipe.execute()
            moved += len(chunk)
            progress("timers", len(chunk))
    return moved


def _new_shard(member: bytes, old: int, target: Layout) -> int:
    """The shard a timer member (or its quarantine entry) belongs to under ``target``."""
    try:
        return shard_of(parse_member(member, 0).customer, target.shards)
    except (ValueError, UnicodeDecodeError):  # damaged: it names no customer
        return old % target.shards  # kept; the flow quarantines it when due


def _move_quarantine(
    store: StateStore, source: Layout, target: Layout, progress: Callable[[str, int], None]
) -> int:
    """Quarantined timers, to their customer's new shard: ``crmstream quarantine release``
    puts them back in that shard's timer set (outsider 49: they stayed under the old
    shard, where a release put them in a timer set the customer's shard does not read)."""
    moved = 0
    for shard in range(source.shards):
        staged = _staged(store, "quarantine", shard)
        entries = store.client.hgetall(staged)
        if not entries:
            continue
        by_shard: dict[int, dict[bytes, bytes]] = {}
        for member, entry in entries.items():
            by_shard.setdefault(_new_shard(member, shard, target), {})[member] = entry
        pipe = store.client.pipeline(transaction=True)
        for new, mapping in by_shard.items():
            pipe.hset(store.quarantine_key(new), mapping=mapping)
        pipe.delete(staged)
        pipe.execute()
        moved += len(entries)
        progress("quarantined timers", len(entries))
    return moved


def _move_outbox(
    store: StateStore, source: Layout, target: Layout, progress: Callable[[str, int], None]
) -> int:
    """Records not yet confirmed delivered: sent again by whichever shard holds them."""
    moved = 0
    for shard in range(source.shards):
        staged = _staged(store, "outbox", shard)
        new = store.outbox_key(shard % target.shards)
        while chunk := store.client.lrange(staged, 0, _CHUNK - 1):
            # once, even when the reply is lost: a second trim would drop unmoved records
            store.transact_once(shard, partial(_move_head, source=staged, to=new, chunk=chunk))
            moved += len(chunk)
            progress("outbox", len(chunk))
    return moved


def _move_head(pipe: CommandBatch, source: str, to: str, chunk: list[bytes]) -> None:
    pipe.rpush(to, *chunk)
    pipe.ltrim(source, len(chunk), -1)


def _merge_progress(store: StateStore, source: Layout, target: Layout) -> int:
    """Per partition the lowest progress over the old shards; a partition some old shard
    never recorded is left out (read from its start; customers skip what they hold)."""
    client = store.client
    staged = [_staged(store, "progress", shard) for shard in range(source.shards)]
    per_shard = [decode_progress(client.hgetall(s), s) for s in staged]
    merged: dict[Position, Progress] = {}  # stays empty when an interrupted run merged them
    pipe = client.pipeline(transaction=True)
    if any(per_shard):
        for pos, low in lowest_progress(per_shard).items():
            step = low.step * source.step_ms // target.step_ms if low.step >= 0 else low.step
            merged[pos] = low._replace(step=step)
        for shard in range(target.shards):
            pipe.delete(store.progress_key(shard))
            if merged:
                pipe.hset(store.progress_key(shard), mapping=encode_progress(merged))
    pipe.delete(*staged)
    pipe.execute()
    return len(merged)


def _recount(store: StateStore, target: Layout, progress: Callable[[str, int], None]) -> int:
    """The customer count per new shard, from the state keys."""
    counts: Counter[int] = Counter()
    prefix = f"{store.prefix}:{{"
    for seen, name in enumerate(
        store.client.scan_iter(match=f"{store.prefix}:{{*}}:s", count=10_000), 1
    ):
        customer = name.decode()[len(prefix) : -len("}:s")]
        counts[shard_of(customer, target.shards)] += 1
        if seen % _CHUNK == 0:
            progress("customers", _CHUNK)
    pipe = store.client.pipeline(transaction=True)
    pipe.delete(store.customers_key())
    pipe.hset(store.customers_key(), mapping={str(s): counts[s] for s in range(target.shards)})
    pipe.execute()
    return sum(counts.values())
