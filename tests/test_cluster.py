"""Cluster mode: the flow as 2 Bytewax processes (-i/-a) equals the single-process run."""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess

import pytest
import redis
from redis.cluster import RedisCluster

from crmstream.bench.workload import Workload, WorkloadSpec, publish
from crmstream.config import load_config
from crmstream.embedded import free_port
from crmstream.flows.runtime import Endpoints
from crmstream.state.dump import canonical_dump, differences
from crmstream.topics import create_topics
from tests.conftest import read_topic
from tests.faults import Server, flow_process, ids_of, run_sets, run_to_end, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 60_000
REDIS_CLI = shutil.which("redis-cli")
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


def _redis_cluster(tmp_path, masters: int = 3) -> tuple[list[Server], list[int]]:
    servers = []
    for i in range(masters):
        server = Server("redis", tmp_path / f"node{i}", below=55_000)  # bus: port + 10000
        server.extra = ("--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf")
        servers.append(server.start())
    ports = [s.port for s in servers]
    subprocess.run(
        [REDIS_CLI, "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
         "--cluster-replicas", "0", "--cluster-yes"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    node = redis.Redis(port=ports[0])
    wait_until(lambda: node.cluster("info")["cluster_state"] == "ok", 30, "cluster state ok")
    return servers, ports


@pytest.mark.skipif(
    REDIS_CLI is None and not os.environ.get("CI"),
    reason="redis-cli missing: `make setup` installs Debian's redis-server (with redis-tools)",
)
def test_flow_on_a_three_master_redis_cluster_equals_a_single_redis(stack, tmp_path):
    servers, ports = _redis_cluster(tmp_path)
    try:
        tag = f"rc{next(_runs)}x{os.getpid()}"
        url = f"redis://127.0.0.1:{ports[0]}/0"
        cluster_endpoints = Endpoints(list(stack.brokers), url)
        opts = ("kafka.partitions=2", "processing.step_ms=100")
        single = run_sets(stack, f"{tag}.in", f"{tag}.one", f"{tag}o", *opts)
        clustered = run_sets(
            cluster_endpoints, f"{tag}.in", f"{tag}.cl", f"{tag}c", *opts, "redis.cluster=true"
        )
        single_cfg = load_config(None, single, env={})
        cluster_cfg = load_config(None, clustered, env={})
        create_topics(list(stack.brokers), single_cfg)
        create_topics(list(stack.brokers), cluster_cfg)
        spec = WorkloadSpec(customers=3_000, seed=31, malformed_rate=0.002)
        publish(list(stack.brokers), single_cfg, Workload(single_cfg, spec), max_events=20_000)

        run_to_end(single, tmp_path / "one.log")
        run_to_end(clustered, tmp_path / "cluster.log")

        client = RedisCluster(host="127.0.0.1", port=ports[0])
        on_cluster = canonical_dump(client, f"{tag}c")
        on_single = canonical_dump(redis.Redis.from_url(stack.redis_url), f"{tag}o")
        diff = differences(on_single, on_cluster)
        per_node = [redis.Redis(port=p).dbsize() for p in ports]
        customer_keys = [k for k in on_cluster if k.startswith("{")]
        customers = {k.split("}")[0] + "}" for k in customer_keys}
        slots_split = [
            c for c in customers
            if len({client.keyslot(f"{tag}c:{c}:{s}") for s in ("s", "p", "o")}) != 1
        ]  # fmt: skip
        print(
            f"redis cluster: 3 masters, keys per node {per_node}; {len(on_cluster):,} keys "
            f"({len(customers):,} customers, every customer key hash-tagged: "
            f"{all(k.startswith('{') and '}:' in k for k in customer_keys)}); "
            f"{len(diff)} differ from the single-Redis run"
        )
        assert min(per_node) > 0, "keys spread over all three masters"
        assert len(customers) > 500
        assert not slots_split
        assert not diff, diff[:5]
        one_ids = ids_of(read_topic(stack, single_cfg.kafka.topics.triggers))
        cl_ids = ids_of(read_topic(stack, cluster_cfg.kafka.topics.triggers))
        assert sorted(one_ids) == sorted(cl_ids) and one_ids
    finally:
        for server in servers:
            server.stop()
