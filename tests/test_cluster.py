"""Cluster mode: the flow as 2 Bytewax processes (-i/-a) equals the single-process run."""

from __future__ import annotations

import itertools
import os

import pytest
import redis

from crmstream.bench.workload import Workload, WorkloadSpec, publish
from crmstream.config import load_config
from crmstream.embedded import free_port
from crmstream.state.dump import canonical_dump, differences
from crmstream.topics import create_topics
from tests.conftest import read_topic
from tests.faults import flow_process, ids_of, run_sets, run_to_end

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 60_000
_runs = itertools.count()


def test_two_processes_on_four_partitions_equal_one_process(stack, tmp_path):
    tag = f"cl{next(_runs)}x{os.getpid()}"
    opts = ("kafka.partitions=4", "processing.step_ms=100")
    single = run_sets(stack, f"{tag}.in", f"{tag}.one", f"{tag}o", *opts)
    double = run_sets(stack, f"{tag}.in", f"{tag}.two", f"{tag}t", *opts)
    single_cfg, double_cfg = load_config(None, single, env={}), load_config(None, double, env={})
    create_topics(list(stack.brokers), single_cfg)
    create_topics(list(stack.brokers), double_cfg)
    spec = WorkloadSpec(customers=8_000, seed=23, malformed_rate=0.002)
    publish(list(stack.brokers), single_cfg, Workload(single_cfg, spec), max_events=EVENTS)

    one_s = run_to_end(single, tmp_path / "one.log")
    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    cluster_args = [a for address in addresses for a in ("-a", address)]
    logs = [tmp_path / "p0.log", tmp_path / "p1.log"]
    with (
        flow_process(double, logs[0], "-i", "0", *cluster_args) as p0,
        flow_process(double, logs[1], "-i", "1", *cluster_args) as p1,
    ):
        codes = [p0.wait(timeout=600), p1.wait(timeout=600)]
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs]

    client = redis.Redis.from_url(stack.redis_url)
    one, two = canonical_dump(client, f"{tag}o"), canonical_dump(client, f"{tag}t")
    diff = differences(one, two)
    one_ids = ids_of(read_topic(stack, single_cfg.kafka.topics.triggers))
    two_ids = ids_of(read_topic(stack, double_cfg.kafka.topics.triggers))
    print(
        f"cluster: {EVENTS:,} events on 4 partitions; 1 process {one_s:.1f} s; 2 processes: "
        f"{len(one):,} vs {len(two):,} keys, {len(diff)} differ; trigger ids "
        f"{len(set(one_ids)):,} vs {len(set(two_ids)):,}"
    )
    assert len(one) > 3000
    assert not diff, diff[:5]
    assert sorted(one_ids) == sorted(two_ids) and one_ids
