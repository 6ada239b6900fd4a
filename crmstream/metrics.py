"""Every Prometheus metric crmstream exports, built from one registry in one place.

This module owns metric names, label sets and buckets (docs/metrics.md lists
them). Metrics live on the process-wide default registry so that Bytewax's own
dataflow metrics, which it registers there, are served from the same endpoint.
Label values are bounded: topics, event types, trigger types, field names.
"""

from __future__ import annotations

import logging
import threading
import time

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)

from crmstream.config import CrmConfig

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000, 10000)
_REDIS_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0)


class CrmMetrics:
    """The metric objects of one process."""

    def __init__(self, registry: CollectorRegistry):
        self.events_in = Counter(
            "crmstream_events_in_total",
            "Valid input events accepted, by topic and event type.",
            ["topic", "event_type"],
            registry=registry,
        )
        self.invalid_events = Counter(
            "crmstream_invalid_events_total",
            "Input messages sent to the dead-letter topic, by the field that failed "
            "('message' when the whole message was unreadable).",
            ["topic", "field"],
            registry=registry,
        )
        self.skipped_events = Counter(
            "crmstream_replayed_events_skipped_total",
            "Events skipped because their offset was already applied (replay after restart).",
            ["topic"],
            registry=registry,
        )
        self.duplicate_events = Counter(
            "crmstream_duplicate_events_total",
            "Events dropped because the customer's recent events hold the same event_id.",
            ["topic"],
            registry=registry,
        )
        self.source_stalls = Counter(
            "crmstream_source_stalls_total",
            "Times an input partition not read to its end delivered nothing for "
            "kafka.stall_warning_seconds (30 s by default).",
            ["topic"],
            registry=registry,
        )
        self.late_events = Counter(
            "crmstream_late_events_total",
            "Events older than the allowed lateness: counted in lifetime totals only.",
            registry=registry,
        )
        self.stage_transitions = Counter(
            "crmstream_stage_transitions_total",
            "Customers entering a lifecycle stage.",
            ["stage"],
            registry=registry,
        )
        self.triggers = Counter(
            "crmstream_triggers_total",
            "Triggers delivered to the trigger topic, by type.",
            ["trigger_type"],
            registry=registry,
        )
        self.suppressions = Counter(
            "crmstream_suppressions_total",
            "Trigger candidates stopped by a contact policy, by type and policy.",
            ["trigger_type", "policy"],
            registry=registry,
        )
        self.erasures = Counter(
            "crmstream_erasures_total",
            "Customers erased on request (state, profile and timers deleted).",
            registry=registry,
        )
        self.erased_events_dropped = Counter(
            "crmstream_erased_events_dropped_total",
            "Events of erased customers dropped because they predate the erasure.",
            registry=registry,
        )
        self.quarantined_customers = Counter(
            "crmstream_quarantined_customers_total",
            "Customers set aside because handling their events or timers raised: their events "
            "of the round were dead-lettered and their due timers quarantined.",
            ["shard"],
            registry=registry,
        )
        self.batch_events = Histogram(
            "crmstream_shard_batch_events",
            "Events per shard batch handed to the stateful step.",
            buckets=_BATCH_BUCKETS,
            registry=registry,
        )
        self.redis_seconds = Histogram(
            "crmstream_redis_roundtrip_seconds",
            "Seconds per Redis round trip, by operation (load, commit, timers, profiles).",
            ["operation"],
            buckets=_REDIS_BUCKETS,
            registry=registry,
        )
        self.consumer_lag = Gauge(
            "crmstream_consumer_lag_messages",
            "Messages between the partition's high watermark and the next offset read.",
            ["topic", "partition"],
            registry=registry,
        )
        self.input_partitions_unread = Gauge(
            "crmstream_input_partitions_unread",
            "Partitions of the input topic added since the flow started, which it does not "
            "read until every process restarts (asked of the broker every minute).",
            ["topic"],
            registry=registry,
        )
        self.watermark_lag = Gauge(
            "crmstream_watermark_lag_seconds",
            "Wall clock minus the shard's event-time watermark at its last step.",
            ["shard"],
            registry=registry,
        )
        self.pending_timers = Gauge(
            "crmstream_pending_timers",
            "Members waiting in the shard's timer set after its last commit (a customer's "
            "one wake member stands for the timers its state keeps).",
            ["shard"],
            registry=registry,
        )
        self.outbox_records = Gauge(
            "crmstream_outbox_records",
            "Records committed to the shard's outbox and not yet trimmed as delivered.",
            ["shard"],
            registry=registry,
        )
        self.customers = Gauge(
            "crmstream_customers",
            "Customers with state in Redis, per shard (sum over shards for the total).",
            ["shard"],
            registry=registry,
        )
        self.timer_lateness_seconds = Histogram(
            "crmstream_timer_lateness_seconds",
            "Wall-clock seconds from a timer's due time to its firing (live input).",
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.delivery_waits = Counter(
            "crmstream_delivery_waits_total",
            "5-second periods a flush spent waiting for the broker's acknowledgements.",
            registry=registry,
        )
        self.redis_errors = Counter(
            "crmstream_redis_errors_total",
            "Failed Redis calls, by error class; each is retried with jittered backoff.",
            ["error"],
            registry=registry,
        )
        self.event_to_trigger_seconds = Histogram(
            "crmstream_event_to_trigger_seconds",
            "Seconds from a causal event's event time to the trigger's delivery.",
            ["trigger_type"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.ingest_to_emit_seconds = Histogram(
            "crmstream_ingest_to_emit_seconds",
            "Seconds from the causal message's Kafka timestamp to the trigger's delivery.",
            ["trigger_type"],
            buckets=_LATENCY_BUCKETS,
            registry=registry,
        )
        self.delivery_failures = Counter(
            "crmstream_delivery_failures_total",
            "Output records the broker did not acknowledge, by topic.",
            ["topic"],
            registry=registry,
        )
        self.unsent_records = Counter(
            "crmstream_unsent_records_total",
            "Output records not sent as they were, by topic and cause (oversize: over the "
            "producer's message.max.bytes before the commit; refused: by the producer or "
            "the broker when sent; damaged: an outbox entry that is not a record); a dead "
            "letter with their length, SHA-256 and first bytes went in their place.",
            ["topic", "cause"],
            registry=registry,
        )
        self.build_info = Gauge(
            "crmstream_build_info",
            "Always 1; the labels name the versions this process runs.",
            ["version", "python", "bytewax", "confluent_kafka", "librdkafka", "redis_py"],
            registry=registry,
        )
        self.build_info.labels(*build_versions()).set(1)

    def precreate(self, config: CrmConfig) -> None:
        """Create every labelled series whose label values are known, at 0.

        A series that appears only at its first increment hides that increment
        from ``rate()`` and ``increase()`` (Prometheus sees it start at 1, not 0),
        and a panel over it stays empty until then. Shard gauges are left out:
        each process owns only some shards.
        """
        from crmstream.operators.events import TOPIC_ROLE_TYPES
        from crmstream.state.encoding import STAGES

        topics = config.kafka.topics
        for topic, role in topics.inputs.items():
            for event_type in sorted(TOPIC_ROLE_TYPES[role]):
                self.events_in.labels(topic, event_type)
            for field in INVALID_FIELDS:
                self.invalid_events.labels(topic, field)
            for counter in (self.skipped_events, self.duplicate_events, self.source_stalls):
                counter.labels(topic)
        for stage in STAGES:
            self.stage_transitions.labels(stage)
        for trigger_type in type(config.rules).model_fields:
            self.triggers.labels(trigger_type)
            self.event_to_trigger_seconds.labels(trigger_type)
            self.ingest_to_emit_seconds.labels(trigger_type)
            for policy in SUPPRESSION_POLICIES:
                self.suppressions.labels(trigger_type, policy)
        for operation in REDIS_OPERATIONS:
            self.redis_seconds.labels(operation)
        for error in REDIS_ERRORS:
            self.redis_errors.labels(error)
        for topic in topics.outputs:
            self.delivery_failures.labels(topic)
            for cause in UNSENT_CAUSES:
                self.unsent_records.labels(topic, cause)


# Label values known in advance (``CrmMetrics.precreate``).
# The policies that stop a candidate (operators/policies.py; quiet hours defer, never stop).
SUPPRESSION_POLICIES = ("consent", "erasure", "cooldown", "priority", "frequency_cap", "regional")
REDIS_OPERATIONS = ("load", "commit", "timers", "profiles")
# The errors the Redis client retries (state/store.py ``connect``).
REDIS_ERRORS = ("ConnectionError", "TimeoutError", "BusyLoadingError")
# The message as a whole and the fields every event has; the fields of one event type
# appear at their first rejection.
# ``processing_error``: the events of a customer set aside (flows/quarantine.py).
INVALID_FIELDS = ("message", "event_id", "customer_id", "event_type", "event_time",
                  "processing_error")  # fmt: skip
# Why an output record was not sent as it was (flows/sink.py).
UNSENT_CAUSES = ("oversize", "refused")


def build_versions() -> tuple[str, ...]:
    """The version labels of ``crmstream_build_info``."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    import confluent_kafka

    from crmstream import __version__

    def installed(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "unknown"

    return (
        __version__,
        platform.python_version(),
        installed("bytewax"),
        installed("confluent-kafka"),
        confluent_kafka.libversion()[0],
        installed("redis"),
    )


log = logging.getLogger(__name__)
_lock = threading.Lock()
_metrics: CrmMetrics | None = None


def get_metrics() -> CrmMetrics:
    """This process's metrics, created on first use on the default registry."""
    global _metrics
    with _lock:
        if _metrics is None:
            _metrics = CrmMetrics(REGISTRY)
        return _metrics


def counter_total(*counters: Counter) -> float:
    """The sum of every labelled series of these counters (their ``_total`` samples)."""
    return sum(
        sample.value
        for counter in counters
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    )


SLOW_REDIS_SECONDS = 1.0


def observe_redis(operation: str, started: float) -> None:
    """Record a Redis round trip begun at ``started`` (perf_counter); log it when slow."""
    seconds = time.perf_counter() - started
    get_metrics().redis_seconds.labels(operation).observe(seconds)
    if seconds >= SLOW_REDIS_SECONDS:
        log.warning("Redis %s took %.1f s (consumer lag grows meanwhile)", operation, seconds)


class BytewaxMetrics:
    """A collector that re-serves Bytewax's own ``bytewax_*`` metrics from its API server."""

    def __init__(self, port: int):
        self._url = f"http://127.0.0.1:{port}/metrics"

    def collect(self):  # prometheus_client calls this on every scrape
        from urllib.request import urlopen

        from prometheus_client.parser import text_string_to_metric_families

        try:
            with urlopen(self._url, timeout=1) as response:
                text = response.read().decode()
        except OSError:
            return  # the dataflow is not running (yet): nothing to add
        for family in text_string_to_metric_families(text):
            if family.name.startswith("bytewax_"):
                yield family


class _Endpoint:
    """What our endpoint serves: the process registry plus re-served collectors.

    Bytewax's API server itself serves the process registry too, so collectors
    that read from it must not be in that registry (each scrape would recurse).
    """

    def __init__(self) -> None:
        self.extra: list[BytewaxMetrics] = []

    def collect(self):  # prometheus_client calls this on every scrape
        yield from REGISTRY.collect()
        for collector in self.extra:
            yield from collector.collect()


_endpoint = _Endpoint()


def expose_bytewax_metrics(port: int) -> None:
    """Turn on Bytewax's API server on ``port`` and re-serve its metrics on ours."""
    import os
    import tempfile

    os.environ["BYTEWAX_DATAFLOW_API_ENABLED"] = "true"
    os.environ["BYTEWAX_DATAFLOW_API_PORT"] = str(port)
    # Bytewax writes dataflow.json where this says (default: the working directory).
    os.environ.setdefault("BYTEWAX_DATAFLOW_API_CACHE_PATH", tempfile.mkdtemp(prefix="bytewax-"))
    _endpoint.extra.append(BytewaxMetrics(port))


def serve(bind_address: str, port: int) -> int:
    """Serve /metrics for this process; returns the bound port (``port=0`` picks one)."""
    get_metrics()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_endpoint)
    server, _thread = start_http_server(port, addr=bind_address, registry=registry)
    return server.server_address[1]
