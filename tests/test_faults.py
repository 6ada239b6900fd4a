"""Infrastructure faults with real processes: Redis restarted, the broker frozen, Redis paused.

Each test runs `crmstream run` as a child process against its own redis-server
or Tansu broker, injects the fault while the flow is working, and compares the
result with an uninterrupted run over the same input: the canonical Redis
dumps must be identical and every trigger id must have been delivered.
"""

from __future__ import annotations

import itertools
import os
import re
import signal
import threading
import time
from contextlib import contextmanager

import pytest
import redis

from crmstream.bench.workload import Workload, WorkloadSpec, publish
from crmstream.config import load_config
from crmstream.flows.runtime import Endpoints
from crmstream.state.dump import canonical_dump, differences
from crmstream.topics import create_topics
from tests.conftest import read_topic
from tests.faults import (
    Server,
    committed,
    flow_process,
    ids_of,
    rss_mb,
    run_sets,
    run_to_end,
    wait_until,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 100_000
_runs = itertools.count()
OPTS = ("kafka.partitions=2", "processing.step_ms=100")


def _prepare(endpoints: Endpoints, tag: str, events: int = EVENTS):
    clean = run_sets(endpoints, f"{tag}.in", f"{tag}.clean", f"{tag}c", *OPTS)
    fault = run_sets(endpoints, f"{tag}.in", f"{tag}.fault", f"{tag}f", *OPTS)
    clean_cfg, fault_cfg = load_config(None, clean, env={}), load_config(None, fault, env={})
    create_topics(list(endpoints.brokers), clean_cfg)
    create_topics(list(endpoints.brokers), fault_cfg)
    if events:
        spec = WorkloadSpec(customers=10_000, seed=11, malformed_rate=0.002)
        publish(list(endpoints.brokers), clean_cfg, Workload(clean_cfg, spec), max_events=events)
    return clean, fault, clean_cfg, fault_cfg


@contextmanager
def _fault_run(endpoints: Endpoints, tag: str, tmp_path):
    """Run the flow uninterrupted over the input, then start the faulted run and yield it
    (process, Redis client, log) once 30 % of the input is committed."""
    clean, fault, _clean_cfg, _fault_cfg = _prepare(endpoints, tag)
    run_to_end(clean, tmp_path / "clean.log")
    client = redis.Redis.from_url(endpoints.redis_url)
    log = tmp_path / "fault.log"
    with flow_process(fault, log) as proc:
        wait_until(lambda: committed(client, f"{tag}f") >= EVENTS * 0.3, 120, "30 % done")
        yield proc, client, log


def _compare(endpoints, tag):
    client = redis.Redis.from_url(endpoints.redis_url)
    clean_dump, fault_dump = canonical_dump(client, f"{tag}c"), canonical_dump(client, f"{tag}f")
    diff = differences(clean_dump, fault_dump)
    clean_ids = ids_of(read_topic(endpoints, f"{tag}.clean.triggers"))  # run_sets' naming
    fault_ids = ids_of(read_topic(endpoints, f"{tag}.fault.triggers"))
    return clean_dump, diff, clean_ids, fault_ids


def test_redis_restarted_mid_run_loses_nothing(stack, tmp_path):
    """redis-server (AOF, fsync always) is stopped for 3 s and started again mid-run."""
    server = Server("redis", tmp_path / "redis").start()
    try:
        endpoints = Endpoints(list(stack.brokers), f"redis://{server.address}/0")
        tag = f"rr{next(_runs)}x{os.getpid()}"
        with _fault_run(endpoints, tag, tmp_path) as (proc, client, log):
            at = committed(client, f"{tag}f")
            server.stop()  # SIGTERM: Redis flushes its AOF and exits
            time.sleep(3)
            server.start()
            rc = proc.wait(timeout=300)
        text = log.read_text()
        retries = text.count("Redis call failed")
        dump, diff, clean_ids, fault_ids = _compare(endpoints, tag)
        print(
            f"redis restart: {EVENTS:,} events; outage at {at:,} committed, 3 s down; "
            f"flow exit {rc}; {retries} logged retries; {len(dump):,} keys, {len(diff)} differ; "
            f"trigger ids {len(set(clean_ids)):,} clean vs {len(set(fault_ids)):,}"
        )
        assert rc == 0, text[-3000:]
        assert retries >= 1
        assert not diff, diff[:5]
        assert set(fault_ids) == set(clean_ids) and clean_ids
    finally:
        server.stop()


def test_broker_frozen_for_20_s_then_back_loses_nothing(tmp_path):
    """The broker is frozen with SIGSTOP for 20 s (Tansu here keeps data in memory only,
    so a restart would lose it) and resumed with SIGCONT while the flow runs."""
    broker = Server("tansu", tmp_path / "tansu").start()
    redis_server = Server("redis", tmp_path / "redis").start()
    try:
        endpoints = Endpoints([broker.address], f"redis://{redis_server.address}/0")
        tag = f"bf{next(_runs)}x{os.getpid()}"
        with _fault_run(endpoints, tag, tmp_path) as (proc, client, log):
            os.kill(broker.proc.pid, signal.SIGSTOP)
            frozen_at = committed(client, f"{tag}f")
            time.sleep(20)
            during = committed(client, f"{tag}f")
            # the step does not wait for the broker: what it emits waits in the outbox
            held = sum(client.llen(k) for k in client.scan_iter(f"{tag}f:outbox:*", count=10_000))
            os.kill(broker.proc.pid, signal.SIGCONT)
            rc = proc.wait(timeout=300)
        dump, diff, clean_ids, fault_ids = _compare(endpoints, tag)
        text = log.read_text()
        print(
            f"broker freeze: {EVENTS:,} events; frozen 20 s at {frozen_at:,} committed "
            f"({during:,} at the end of the freeze, {held:,} records held in the outbox); "
            f"flow exit {rc}; {len(dump):,} keys, "
            f"{len(diff)} differ; trigger ids {len(set(clean_ids)):,} clean vs "
            f"{len(set(fault_ids)):,}; broker warnings in the log: {text.count('reachable?')}"
        )
        assert rc == 0, text[-3000:]
        assert held > 0  # the freeze did hold the output back
        assert "is the broker reachable?" in text
        assert not diff, diff[:5]
        assert set(fault_ids) == set(clean_ids) and clean_ids
    finally:
        broker.stop()
        redis_server.stop()


def test_paused_redis_grows_lag_with_bounded_memory_and_the_flow_catches_up(stack, tmp_path):
    """Redis stops answering (CLIENT PAUSE 8 s) while events keep arriving (up to 4,000/s:
    what the producer manages here)."""
    server = Server("redis", tmp_path / "redis").start()
    try:
        endpoints = Endpoints(list(stack.brokers), f"redis://{server.address}/0")
        tag = f"rp{next(_runs)}x{os.getpid()}"
        _clean, fault, _c, fault_cfg = _prepare(endpoints, tag, events=0)
        client = redis.Redis.from_url(endpoints.redis_url)
        stop = threading.Event()
        produced = []

        def produce():
            spec = WorkloadSpec(customers=10_000, seed=5)
            stats = publish(
                list(endpoints.brokers),
                fault_cfg,
                Workload(fault_cfg, spec),
                duration_s=60,
                rate=4000,
                live_time=True,
                stop=stop,
                on_progress=lambda n: produced.append(n),
            )
            produced.append(stats.events)

        producer = threading.Thread(target=produce, daemon=True)
        log = tmp_path / "fault.log"
        with flow_process(fault, log, "--no-until-end") as proc:
            producer.start()
            wait_until(lambda: committed(client, f"{tag}f") >= 20_000, 120, "20k applied")
            rss_before = rss_mb(proc.pid)
            lag_before = produced[-1] - committed(client, f"{tag}f")
            client.execute_command("CLIENT", "PAUSE", 8000, "ALL")
            sent_before = produced[-1]
            peak_rss = rss_before
            for _ in range(14):  # sampling memory through the pause, not a wait for the flow
                time.sleep(0.5)
                peak_rss = max(peak_rss, rss_mb(proc.pid))
            sent_during = produced[-1] - sent_before
            wait_until(lambda: committed(client, f"{tag}f") > 0, 30, "Redis back")
            lag_paused = produced[-1] - committed(client, f"{tag}f")
            stop.set()
            producer.join(60)
            total = produced[-1]
            wait_until(lambda: committed(client, f"{tag}f") >= total, 120, "catch-up")
            assert proc.poll() is None, "the flow must survive the pause"
        text = log.read_text()
        slow = len(re.findall(r"Redis \w+ took", text))
        print(
            f"redis pause: 8 s at up to 4,000 events/s offered ({sent_during:,} sent in 7 s "
            f"of it); lag {lag_before:,} before, "
            f"{lag_paused:,} after the pause, 0 after catch-up of {total:,} events; "
            f"RSS {rss_before:.0f} MiB before, peak {peak_rss:.0f} MiB during; slow-call "
            f"warnings in the log: {slow}"
        )
        # Lag grows by what arrives while Redis is paused: no rate is needed from the machine
        # (a loaded one may send far fewer than 4,000 events/s), only that some arrived.
        assert sent_during > 0
        assert lag_paused > lag_before
        assert peak_rss < rss_before + 256
        assert slow >= 1
    finally:
        server.stop()
