"""The main CRM dataflow: Kafka -> parse/route -> per-shard state and rules -> Kafka.

This module owns the wiring of the Bytewax steps (docs/architecture.md draws
it) and the ways to run it: in this process (``run_in_process``, used by the
demo and tests) or as one process of a Bytewax cluster (``run_cluster_process``,
used by ``crmstream run``).
"""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from bytewax.recovery import RecoveryConfig, init_db_dir

from crmstream.flows.runtime import Runtime
from crmstream.flows.shard import ShardLogic, route_batch
from crmstream.flows.source import CrmKafkaSource, StopSignals
from crmstream.operators.kernels import warm_up


class _DiscardPartition(StatelessSinkPartition[object]):
    def write_batch(self, items: list[object]) -> None:
        pass


class _DiscardSink(DynamicSink[object]):
    """Bytewax needs an output; triggers already left through the shards' producer."""

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _DiscardPartition:
        return _DiscardPartition()


def build_flow(runtime: Runtime, tail: bool = True, signals: StopSignals | None = None) -> Dataflow:
    """The CRM dataflow over the configured input topics."""
    cfg = runtime.config
    topics = cfg.kafka.topics
    warm_up(cfg)

    def resume_offsets(positions: list[tuple[str, int]]) -> dict[tuple[str, int], tuple[int, int]]:
        return runtime.store.resume_offsets(cfg.processing.shards, positions)

    source = CrmKafkaSource(
        brokers=runtime.endpoints.brokers,
        topics=list(topics.inputs),
        client_config=dict(cfg.kafka.client),
        resume_offsets=resume_offsets,
        batch_size=cfg.kafka.batch_size,
        step_ms=cfg.processing.step_ms,
        tail=tail,
        signals=signals,
    )
    flow = Dataflow("crmstream")
    raw = op.input("kafka_in", flow, source)
    routed = op.flat_map_batch("parse_and_route", raw, lambda batch: route_batch(runtime, batch))
    partitions = source.positions()
    applied = op.stateful_batch(
        "shard_state", routed, lambda _resume: ShardLogic(runtime, tail, partitions)
    )
    op.output("done", applied, _DiscardSink())
    return flow


def run_in_process(
    runtime: Runtime, tail: bool = False, signals: StopSignals | None = None
) -> None:
    """Run the flow with one worker in this thread until the input ends or is stopped."""
    from bytewax.testing import run_main

    run_main(build_flow(runtime, tail=tail, signals=signals), epoch_interval=_epoch(runtime))


def run_cluster_process(
    runtime: Runtime,
    workers_per_process: int = 1,
    process_id: int | None = None,
    addresses: list[str] | None = None,
    recovery_dir: str | None = None,
    tail: bool = True,
) -> None:
    """Run this process's part of the flow (``bytewax.run`` semantics: -w, -i, -a, -r)."""
    from bytewax._bytewax import cli_main

    recovery = None
    if recovery_dir:
        path = Path(recovery_dir)
        if not any(path.glob("*.sqlite3")):
            path.mkdir(parents=True, exist_ok=True)
            init_db_dir(path, 1)  # a new recovery store: one partition
        recovery = RecoveryConfig(recovery_dir)
    cli_main(
        build_flow(runtime, tail=tail),
        workers_per_process=workers_per_process,
        process_id=process_id,
        addresses=addresses,
        epoch_interval=_epoch(runtime),
        recovery_config=recovery,
    )


def _epoch(runtime: Runtime) -> timedelta:
    return timedelta(seconds=runtime.config.processing.epoch_interval_seconds)
