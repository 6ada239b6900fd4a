"""The main CRM dataflow: Kafka -> parse/route -> per-shard state and rules -> Kafka.

This module owns the wiring of the Bytewax steps (docs/architecture.md draws
it) and the ways to run it: in this process (``run_in_process``, used by the
demo and tests) or as one process of a Bytewax cluster (``run_cluster_process``,
used by ``crmstream run``).
"""

from __future__ import annotations

import contextlib
import sqlite3
from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir

from crmstream.flows.routing import shard_keys
from crmstream.flows.runtime import Runtime, tune_gc
from crmstream.flows.shard import ShardLogic, route_batch
from crmstream.flows.source import CrmKafkaSource, StopSignals
from crmstream.metrics import get_metrics
from crmstream.operators.kernels import warm_up
from crmstream.state import model
from crmstream.state.layout import check_layout


class _DiscardPartition(StatelessSinkPartition[object]):
    def write_batch(self, items: list[object]) -> None:
        pass


class _DiscardSink(DynamicSink[object]):
    """Bytewax needs an output; triggers already left through the shards' producer."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DiscardPartition:
        return _DiscardPartition()


FLOW_ID = "crmstream"
INPUT_STEP = "kafka_in"


class RecoveryStoreError(RuntimeError):
    """A Bytewax recovery directory this flow cannot resume from."""


def check_recovery_store(directory: Path) -> None:
    """Fail clearly when a file of the recovery store is not a readable Bytewax store.

    The store holds no input positions (the source resumes from Redis), so a
    store from an older release, whose input snapshots name partitions the
    flow no longer reads, resumes as it is: Bytewax ignores them.
    """
    for db in sorted(directory.glob("*.sqlite3")):
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            try:
                conn.execute("SELECT step_id, state_key FROM snaps LIMIT 1").fetchall()
            except sqlite3.DatabaseError as exc:
                raise RecoveryStoreError(
                    f"recovery store {db} is not readable: {exc}. Redis holds the progress, "
                    f"so nothing is lost: remove the directory (or give a new one) and start again"
                ) from None


def input_source(
    runtime: Runtime, tail: bool = True, signals: StopSignals | None = None
) -> CrmKafkaSource:
    """The flow's input: every configured input topic, resumed from the offsets in Redis."""
    cfg = runtime.config

    def resume_offsets(positions: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        return runtime.store.resume_offsets(cfg.processing.shards, positions)

    return CrmKafkaSource(
        brokers=runtime.endpoints.brokers,
        topics=list(cfg.kafka.topics.inputs),
        client_config=dict(cfg.kafka.client),
        consumer_config=dict(cfg.kafka.consumer),
        resume_offsets=resume_offsets,
        batch_size=cfg.kafka.batch_size,
        step_ms=cfg.processing.step_ms,
        tail=tail,
        signals=signals,
        stall_s=cfg.kafka.stall_warning_seconds,
        group=cfg.kafka.consumer_group,
        group_commit_s=cfg.kafka.consumer_group_commit_seconds,
        clock_ms=runtime.clock_ms,
        max_future_ms=int(cfg.processing.max_future_skew_seconds * 1000),
    )


def commit_group_offsets(runtime: Runtime, timeout_s: float = 10.0) -> int:
    """Commit the offsets Redis holds as applied, for every input partition, to
    ``kafka.consumer_group`` (the source commits them while it runs; this is the last
    word after a run ends, once every shard has committed). Returns how many
    partitions were committed; 0 without a group."""
    from confluent_kafka import Consumer

    from crmstream.flows.source import GroupCommits

    group = runtime.config.kafka.consumer_group
    if not group:
        return 0
    source = input_source(runtime, tail=False)
    positions = source.positions()
    consumer = Consumer({**source.consumer_config(), "enable.partition.eof": False})
    try:
        commits = GroupCommits(
            lambda pos: runtime.store.resume_offsets(runtime.config.processing.shards, pos),
            positions,
            0.0,
        )
        commits.commit(consumer, asynchronous=False)
    finally:
        consumer.close()
    return len(positions)


def build_flow(
    runtime: Runtime, tail: bool = True, signals: StopSignals | None = None, workers: int = 1
) -> Dataflow:
    """The CRM dataflow over the configured input topics, for ``workers`` Bytewax workers
    in all (they decide the shard keys: each worker runs the same number of shards)."""
    cfg = runtime.config
    warm_up(cfg)
    get_metrics().precreate(cfg)
    source = input_source(runtime, tail, signals)
    flow = Dataflow(FLOW_ID)
    raw = op.input(INPUT_STEP, flow, source)
    keys = shard_keys(cfg.processing.shards, workers)
    routed = op.flat_map_batch(
        "parse_and_route", raw, lambda batch: route_batch(runtime, batch, keys)
    )
    partitions = source.positions()
    applied = op.stateful_batch(
        "shard_state", routed, lambda _resume: ShardLogic(runtime, tail, partitions)
    )
    op.output("done", applied, _DiscardSink())
    tune_gc(cfg.processing.gc_young_threshold)
    return flow


def check_state_layout(runtime: Runtime) -> None:
    """Stop before reading input if Redis holds state cut by other shard settings; then
    take up the active value-model parameter set (``state.model.adopt``).

    :raises LayoutError: naming the configured and the stored settings.
    """
    processing = runtime.config.processing
    check_layout(runtime.store, processing.shards, processing.step_ms)
    runtime.use_config(model.adopt(runtime.config, runtime.store.client))


def check_input(runtime: Runtime) -> None:
    """Stop before reading input if an input partition is not what the shards applied
    (``flows.input_ends``): it no longer exists, ends at or before an offset some shard
    has applied, or holds a record of another Kafka time there. Every process of a
    cluster checks every partition before its workers start, so each names them all.

    :raises SourceError: naming the partitions, the offsets and the shards.
    """
    cfg = runtime.config
    inputs = set(cfg.kafka.topics.inputs)
    shards = cfg.processing.shards
    applied = {
        pos: found
        for pos, found in runtime.store.applied_offsets(shards).items()
        if pos[0] in inputs
    }
    if applied:
        starts = runtime.store.resume_offsets(shards, list(applied))
        input_source(runtime, tail=False).check_input_ends(applied, starts)


def run_in_process(
    runtime: Runtime, tail: bool = False, signals: StopSignals | None = None
) -> None:
    """Run the flow with one worker in this thread until the input ends or is stopped."""
    from bytewax.testing import run_main

    check_state_layout(runtime)
    check_input(runtime)
    run_main(build_flow(runtime, tail=tail, signals=signals), epoch_interval=_epoch(runtime))


def run_cluster_process(
    runtime: Runtime,
    workers_per_process: int = 1,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    recovery_dir: str | None = None,
    tail: bool = True,
    signals: StopSignals | None = None,
) -> None:
    """Run this process's part of the flow (``bytewax.run`` semantics: -w, -i, -a, -r).
    ``signals``: set ``stop`` to drain (``crmstream.lifecycle``)."""
    from bytewax._bytewax import cli_main

    processes = len(addresses) if addresses else 1
    check_state_layout(runtime)
    check_input(runtime)
    flow = build_flow(runtime, tail=tail, signals=signals, workers=workers_per_process * processes)
    recovery = None
    if recovery_dir:
        path = Path(recovery_dir)
        if not any(path.glob("*.sqlite3")):
            path.mkdir(parents=True, exist_ok=True)
            init_db_dir(path, 1)  # a new recovery store: one partition
        else:
            check_recovery_store(path)
        recovery = RecoveryConfig(recovery_dir)
    cli_main(
        flow,
        workers_per_process=workers_per_process,
        process_id=process_id,
        addresses=addresses,
        epoch_interval=_epoch(runtime),
        recovery_config=recovery,
    )


def _epoch(runtime: Runtime) -> timedelta:
    return timedelta(seconds=runtime.config.processing.epoch_interval_seconds)
