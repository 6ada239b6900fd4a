"""``crmstream run``: one process of the flow, from its checks to its exit code.

This module owns the order in which a flow process starts and stops:

1. wait until every cluster address resolves (``cluster.wait_for_peers``);
2. build every kind of Kafka client with the configured properties (librdkafka
   refuses unknown ones before anything connects), then check that the brokers
   answer and hold the topics, and that Redis answers (``preflight``): each a
   one-line error within about 10 s;
3. serve metrics;
4. install the SIGTERM/SIGINT drain and join the cluster's drain counter
   (``lifecycle``);
5. run this process's part of the Bytewax cluster with native stderr turned
   into log records (``native_output``);
6. flush the producer, close the clients and commit the applied offsets to
   the consumer group for lag tools.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from crmstream import logs
from crmstream.config import CrmConfig


@dataclass
class RunOptions:
    workers_per_process: int = 1
    process_id: int | None = None
    addresses: list[str] | None = None
    recovery_dir: Path | None = None
    tail: bool = True
    peer_wait_s: float = 300.0


def run_flow_process(cfg: CrmConfig, options: RunOptions) -> None:
    """Run one process of the flow until its input ends (``tail=False``) or a signal
    drains it. Failures raise; the CLI reports them in one line."""
    import threading

    from crmstream.clients import validate_properties
    from crmstream.cluster import wait_for_peers
    from crmstream.flows.crm import commit_group_offsets, run_cluster_process
    from crmstream.flows.finish import RedisBarrier
    from crmstream.flows.runtime import Endpoints, Runtime
    from crmstream.flows.source import StopSignals
    from crmstream.lifecycle import ClusterDrain, GracefulStop
    from crmstream.native_output import native_stderr_as_logs
    from crmstream.preflight import check_kafka, check_redis
    from crmstream.state.store import single_attempt

    assert cfg.kafka.brokers and cfg.redis.url
    signals = StopSignals(threading.Event(), threading.Event(), threading.Event())
    stop = GracefulStop(signals, cfg.processing.drain_timeout_seconds).install()
    try:
        if options.addresses:
            wait_for_peers(options.addresses, options.peer_wait_s,
                           stopped=lambda: stop.requested_at is not None)  # fmt: skip
        if stop.requested_at is not None:  # stopped while waiting: nothing to drain
            logs.notice("stopped before the flow started")
            return
        for warning in validate_properties(cfg):
            logs.warning(f"librdkafka: {warning}")
        brokers = list(cfg.kafka.brokers)
        topics = [*cfg.kafka.topics.inputs, *cfg.kafka.topics.outputs]
        check_kafka(brokers, dict(cfg.kafka.client), cfg.kafka.connect_timeout_seconds, topics)
        check_redis(cfg.redis.url, cfg.redis)
        if stop.requested_at is not None:  # stopped before the flow started: nothing to drain
            logs.notice("stopped before the flow started")
            return
        _serve_metrics(cfg, options.process_id)
        runtime = Runtime(cfg, Endpoints(brokers, cfg.redis.url))
        barrier = RedisBarrier(runtime.store.client, cfg.redis.key_prefix)
        signals = signals._replace(barrier=barrier)  # the same events, and the barrier
        client = runtime.store.client
        drain = ClusterDrain(
            # a frozen Redis must not hold the drain request (a Redis Cluster client has
            # no single pool to copy: it keeps the store's)
            client if cfg.redis.cluster else single_attempt(client),
            f"{cfg.redis.key_prefix}:drain",
            on_generation=lambda generation: setattr(barrier, "generation", generation),
        )
        stop.on_first(drain.request)
        drain.watch(stop.begin_drain)
        try:
            with native_stderr_as_logs():
                run_cluster_process(
                    runtime,
                    options.workers_per_process,
                    options.process_id,
                    options.addresses,
                    str(options.recovery_dir) if options.recovery_dir else None,
                    tail=options.tail,
                    signals=signals,
                )
            runtime.close()  # flush the producer
            commit_group_offsets(runtime)
        finally:
            drain.close()
        if stop.requested_at is not None:
            logs.notice(
                f"drained in {time.monotonic() - stop.requested_at:.1f} s: every shard "
                "committed and the broker acknowledged every record"
            )
    finally:
        stop.restore()


def _serve_metrics(cfg: CrmConfig, process_id: int | None) -> None:
    from crmstream.metrics import expose_bytewax_metrics, serve

    if not cfg.metrics.enabled:
        return
    offset = (process_id or 0) if cfg.metrics.offset_by_process else 0
    port = cfg.metrics.port + offset if cfg.metrics.port else 0
    try:
        bound = serve(cfg.metrics.bind_address, port)
    except OSError as exc:  # a port in use, an address that is not this host's
        from crmstream.failures import CommandError

        raise CommandError(
            f"cannot serve metrics on {cfg.metrics.bind_address}:{port} "
            f"(metrics.bind_address, metrics.port): {exc.strerror or exc}"
        ) from None
    logs.notice(f"metrics on http://{cfg.metrics.bind_address}:{bound}/metrics")
    if cfg.metrics.bytewax_api_port:
        expose_bytewax_metrics(cfg.metrics.bytewax_api_port + offset)
