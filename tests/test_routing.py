"""Work placement across Bytewax workers: shard keys, partition shares, recovery stores.

The routing module predicts where Bytewax puts things. These tests hold the
predictions against real multi-worker Bytewax runs, so a Bytewax release
that routes differently fails here rather than silently unbalancing a cluster.
"""

from __future__ import annotations

import collections
import sqlite3
import threading
from datetime import timedelta

import bytewax.operators as op
import pytest
from bytewax._bytewax import cli_main
from bytewax.dataflow import Dataflow
from bytewax.inputs import (
    DynamicSource,
    FixedPartitionedSource,
    StatefulSourcePartition,
    StatelessSourcePartition,
)
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main
from hypothesis import given
from hypothesis import strategies as st

from crmstream.flows.crm import INPUT_STEP, RecoveryStoreError, check_recovery_store
from crmstream.flows.routing import (
    bytewax_worker,
    parse_part_name,
    part_name,
    shard_keys,
    siphash13,
    worker_share,
)


def _run(flow: Dataflow, workers: int, recovery: RecoveryConfig | None = None) -> None:
    cli_main(
        flow,
        workers_per_process=workers,
        process_id=None,
        addresses=None,
        epoch_interval=timedelta(seconds=1),
        recovery_config=recovery,
    )


def _keys_by_worker(keys: list[str], workers: int) -> list[set[str]]:
    """Run keys through a real stateful step on ``workers`` worker threads; the keys each
    thread handled."""
    seen: dict[int, set[str]] = collections.defaultdict(set)
    lock = threading.Lock()

    def record(_step: str, item: tuple[str, int]) -> None:
        with lock:
            seen[threading.get_ident()].add(item[0])

    flow = Dataflow("routing")
    items = op.input("in", flow, TestingSource([(k, 1) for k in keys]))
    counted = op.stateful_map("count", items, lambda state, v: ((state or 0) + v, v))
    op.inspect("record", counted, record)
    _run(flow, workers)
    return list(seen.values())


def test_siphash13_matches_rust_default_hasher():
    # Values printed by Rust 1.x's BuildHasherDefault::<DefaultHasher>::hash_one(String)
    # (the key's bytes, then 0xFF) and DefaultHasher::write(0..15) then finish().
    assert bytewax_worker("0003", 1 << 64) == 10589147352277747040
    assert bytewax_worker("0000", 1 << 64) == 2936415774502490772
    long = "a-much-longer-key-than-eight-bytes"
    assert bytewax_worker(long, 1 << 64) == 17586054850813238135
    assert siphash13(bytes(range(15))) == 17514137373579004394


@pytest.mark.parametrize(("shards", "workers"), [(8, 2), (16, 2), (8, 3), (12, 4)])
def test_shard_keys_spread_shards_evenly_over_real_bytewax_workers(shards, workers):
    keys = shard_keys(shards, workers)
    assert len(set(keys)) == shards
    groups = _keys_by_worker(keys, workers)
    predicted = collections.defaultdict(set)
    for key in keys:
        predicted[bytewax_worker(key, workers)].add(key)
    assert sorted(map(sorted, groups)) == sorted(map(sorted, predicted.values()))
    sizes = sorted(len(g) for g in groups)
    assert len(groups) == min(workers, shards)
    assert sizes[-1] - sizes[0] <= 1, sizes


def test_plain_shard_names_would_be_unbalanced():
    """Why shard_keys exists: the plain names of 16 shards land 10/6 on two workers."""
    plain = [f"{s:04d}" for s in range(16)]
    groups = _keys_by_worker(plain, 2)
    assert sorted(len(g) for g in groups) == [6, 10]
    assert shard_keys(1, 1) == ["0000"]
    with pytest.raises(ValueError, match="workers must be at least 1, got 0"):
        shard_keys(4, 0)


def _quiet(_step: str, _item: object) -> None:
    pass


@pytest.mark.parametrize("workers", [1, 2, 3])
def test_each_topic_s_partitions_are_shared_out_between_workers(workers):
    topics = ["shop.clickstream", "shop.customers", "shop-feedback", "shop.orders"]
    parts = [part_name(t, p) for t in reversed(topics) for p in range(4)]
    shares = [worker_share(parts, w, workers) for w in range(workers)]
    every = sorted(pos for share in shares for pos in share)
    assert every == sorted((t, p) for t in topics for p in range(4))  # each read once
    for topic in topics:
        counts = [sum(1 for t, _p in share if t == topic) for share in shares]
        assert max(counts) - min(counts) <= 1, (topic, counts)


@given(st.from_regex(r"[A-Za-z0-9._-]{1,60}", fullmatch=True), st.integers(0, 99_999))
def test_part_names_round_trip(topic, partition):
    assert parse_part_name(part_name(topic, partition)) == (topic, partition)


@pytest.mark.parametrize("name", ["0-clickstream", "clickstream", "-00001", "orders-x1"])
def test_a_foreign_part_name_is_refused_by_name(name):
    with pytest.raises(ValueError, match=f"not an input partition name: {name!r}"):
        parse_part_name(name)


class _OldPart(StatefulSourcePartition[str, int]):
    """An input partition as releases before the one-consumer source kept it: with a snapshot."""

    def __init__(self, name: str):
        self._name, self._done = name, False

    def next_batch(self) -> list[str]:
        if self._done:
            raise StopIteration
        self._done = True
        return [self._name]

    def snapshot(self) -> int:
        return 1


class _OldParts(FixedPartitionedSource[str, int]):
    def __init__(self, names: list[str]):
        self.names = names

    def list_parts(self) -> list[str]:
        return self.names

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _OldPart:
        return _OldPart(for_part)


class _Reader(StatelessSourcePartition[str]):
    def __init__(self, seen: list[str]):
        self._seen, self._done = seen, False

    def next_batch(self) -> list[str]:
        if self._done:
            raise StopIteration
        self._done = True
        self._seen.append("read")
        return ["read"]


class _Readers(DynamicSource[str]):
    def __init__(self) -> None:
        self.seen: list[str] = []

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _Reader:
        return _Reader(self.seen)


def test_a_recovery_store_with_old_input_snapshots_still_resumes(tmp_path):
    """Older releases kept input positions in the store, under names this flow may not read."""
    init_db_dir(tmp_path, 1)
    old = ["0-clickstream", "1-clickstream"]  # names written before part_name existed
    flow = Dataflow("crmstream")
    op.inspect("seen", op.input(INPUT_STEP, flow, _OldParts(old)), _quiet)
    run_main(flow, epoch_interval=timedelta(seconds=1), recovery_config=RecoveryConfig(tmp_path))
    (db,) = tmp_path.glob("*.sqlite3")
    with sqlite3.connect(db) as conn:
        stored = {k for (k,) in conn.execute("SELECT state_key FROM snaps")}
    assert set(old) <= stored

    check_recovery_store(tmp_path)
    readers = _Readers()
    flow = Dataflow("crmstream")
    op.inspect("seen", op.input(INPUT_STEP, flow, readers), _quiet)
    run_main(flow, epoch_interval=timedelta(seconds=1), recovery_config=RecoveryConfig(tmp_path))
    assert readers.seen == ["read"]


def test_an_unreadable_recovery_store_fails_clearly(tmp_path):
    init_db_dir(tmp_path, 1)
    (db,) = tmp_path.glob("*.sqlite3")
    db.write_bytes(b"not a database" * 100)
    with pytest.raises(RecoveryStoreError) as err:
        check_recovery_store(tmp_path)
    assert str(db) in str(err.value) and "remove the directory" in str(err.value)
