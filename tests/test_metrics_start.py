"""What monitoring sees from the start: every series with known label values exists at 0
(a counter born at its first increment hides that increment from increase(), and a
panel over it stays empty), crmstream_build_info, and the applied offsets committed to
a consumer group so that Kafka's own lag tools see the flow."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from crmstream.config import load_config
from crmstream.metrics import SUPPRESSION_POLICIES, CrmMetrics
from crmstream.operators.events import TOPIC_ROLE_TYPES

ROOT = Path(__file__).resolve().parent.parent


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple], float]:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in registry.collect()
        for s in family.samples
    }


def test_every_known_label_value_is_a_series_at_zero_before_anything_happens():
    config = load_config(env={})
    registry = CollectorRegistry()
    metrics = CrmMetrics(registry)
    before = _samples(registry)
    assert not [k for k in before if k[0] == "crmstream_redis_errors_total"]
    metrics.precreate(config)
    samples = _samples(registry)
    kinds = list(type(config.rules).model_fields)
    for kind in kinds:
        assert samples[("crmstream_triggers_total", (("trigger_type", kind),))] == 0
        for policy in SUPPRESSION_POLICIES:
            key = (("policy", policy), ("trigger_type", kind))
            assert samples[("crmstream_suppressions_total", key)] == 0
        key = (("le", "+Inf"), ("trigger_type", kind))
        assert samples[("crmstream_ingest_to_emit_seconds_bucket", key)] == 0
    for error in ("ConnectionError", "TimeoutError", "BusyLoadingError"):
        assert samples[("crmstream_redis_errors_total", (("error", error),))] == 0
    for topic, role in config.kafka.topics.inputs.items():
        for event_type in TOPIC_ROLE_TYPES[role]:
            key = (("event_type", event_type), ("topic", topic))
            assert samples[("crmstream_events_in_total", key)] == 0
        key = (("field", "message"), ("topic", topic))
        assert samples[("crmstream_invalid_events_total", key)] == 0
        key = (("field", "processing_error"), ("topic", topic))  # a customer set aside
        assert samples[("crmstream_invalid_events_total", key)] == 0
    for topic in config.kafka.topics.outputs:
        assert samples[("crmstream_delivery_failures_total", (("topic", topic),))] == 0
        # Outsider 49: born at their first increment, the alert on them never fired.
        for cause in ("oversize", "refused"):
            key = (("cause", cause), ("topic", topic))
            assert samples[("crmstream_unsent_records_total", key)] == 0
    (info,) = [k for k in samples if k[0] == "crmstream_build_info"]
    labels = dict(info[1])
    assert samples[info] == 1 and labels["version"] == "0.1.0" and labels["bytewax"] == "0.21.1"
    assert re.match(r"^\d+\.\d+\.\d+$", labels["librdkafka"]), labels


def test_the_precreated_policies_are_the_policies_that_suppress():
    """SUPPRESSION_POLICIES must follow operators/policies.py: every policy it records on
    the suppression topic, and no other."""
    source = (ROOT / "operators" / "policies.py").read_text()
    used = set(re.findall(r'Suppressed, \(\w+, "(\w+)"', source))
    assert used == set(SUPPRESSION_POLICIES), used


@pytest.mark.integration
def test_the_applied_offsets_are_committed_to_the_consumer_group(isolated_config, stack, tmp_path):
    """kafka-consumer-groups, Burrow and kafka-exporter saw no group: the source now commits
    the offsets Redis holds as applied (while it runs, and once more at the end)."""
    from kafka import KafkaAdminClient, TopicPartition

    from crmstream.bench.workload import Workload, WorkloadSpec, publish
    from crmstream.flows.runtime import Runtime
    from tests.conftest import live_flow
    from tests.faults import wait_until

    group = f"lag-{tmp_path.name}"
    config = isolated_config(f"kafka.consumer_group={group}",
                             "kafka.consumer_group_commit_seconds=0.2")  # fmt: skip
    publish(list(stack.brokers), config, Workload(config, WorkloadSpec(customers=200)),
            max_events=3_000)  # fmt: skip
    admin = KafkaAdminClient(bootstrap_servers=list(stack.brokers))
    runtime = Runtime(config, stack)
    shards = config.processing.shards

    def applied() -> dict[TopicPartition, int]:
        """Per input partition, what a restart resumes from (the lowest over shards)."""
        per_shard = [runtime.store.load_progress(s) for s in range(shards)]
        out = {}
        for pos in per_shard[0]:
            if all(pos in p for p in per_shard):
                out[TopicPartition(*pos)] = min(p[pos].offset for p in per_shard) + 1
        return out

    def committed() -> dict[TopicPartition, int]:
        offsets = admin.list_group_offsets(group).get(group, {})
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    try:
        with live_flow(config, stack) as (_signals, _flow):
            wait_until(lambda: sum(applied().values()) >= 3_000, 120, "the flow to apply all")
            wait_until(lambda: committed() == applied(), 60, "the group to hold them")
        assert sum(committed().values()) == 3_000
    finally:
        admin.close()
        runtime.close()


@pytest.mark.integration
def test_a_shards_quarantine_counter_is_at_zero_from_the_shards_start(isolated_config, stack):
    """Outsider 49: ``crmstream_quarantined_customers_total{shard}`` was born at its first
    increment, so ``increase()`` saw 0 and CrmstreamCustomersQuarantined never fired for a
    process's first customer set aside."""
    from prometheus_client import REGISTRY

    from crmstream.flows.runtime import Runtime
    from crmstream.flows.shard_step import ShardStep
    from crmstream.flows.sink import Outbox

    config = isolated_config("processing.shards=98")
    name = "crmstream_quarantined_customers_total"
    assert REGISTRY.get_sample_value(name, {"shard": "97"}) is None
    runtime = Runtime(config, stack)
    try:
        ShardStep(runtime, 97, False, Outbox(runtime.producer))
        assert REGISTRY.get_sample_value(name, {"shard": "97"}) == 0
    finally:
        runtime.close()
