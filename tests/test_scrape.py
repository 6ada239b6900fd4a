"""A real Prometheus scrapes a running flow; PromQL returns the triggers the test produced."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import urllib.parse
import urllib.request

import orjson
import pytest

from crmstream.embedded import free_port, spawn, stop_process, wait_for_port
from tests.conftest import read_topic
from tests.faults import flow_process, wait_until

pytestmark = pytest.mark.integration

PROMETHEUS = shutil.which("prometheus")


def _query(port: int, promql: str) -> list[dict]:
    url = f"http://127.0.0.1:{port}/api/v1/query?query={urllib.parse.quote(promql)}"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = orjson.loads(response.read())
    assert body["status"] == "success", body
    return body["data"]["result"]


@pytest.mark.skipif(
    PROMETHEUS is None and not os.environ.get("CI"),
    reason="prometheus missing: `make setup` installs Debian's prometheus",
)
def test_prometheus_scrapes_the_flow_and_counts_its_triggers(
    isolated_config, script, stack, tmp_path
):
    metrics_port, prom_port = free_port(), free_port()
    config = isolated_config()
    s = script(config)
    for customer in ("pa", "pb", "pc"):  # three browse_interest triggers
        for i in range(3):
            s.view(customer, "books", i)
    s.view("pd", "books", 0)  # no trigger
    s.raw("clickstream", b"not json")  # one dead letter
    s.flush()

    sets = [
        *(f"kafka.topics.{r}={t}" for r, t in config.kafka.topics.model_dump().items()),
        f"kafka.brokers={','.join(stack.brokers)}",
        f"redis.url={stack.redis_url}",
        f"redis.key_prefix={config.redis.key_prefix}",
        "kafka.partitions=2",
        "metrics.enabled=true",
        "metrics.bind_address=127.0.0.1",
        f"metrics.port={metrics_port}",
        f"metrics.bytewax_api_port={free_port()}",
        "policies.quiet_hours.start=00:00",
        "policies.quiet_hours.end=00:00",
    ]
    (tmp_path / "prometheus.yml").write_text(
        "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
        "scrape_configs:\n"
        "  - job_name: crmstream\n"
        f"    static_configs: [{{targets: ['127.0.0.1:{metrics_port}']}}]\n"
    )
    prometheus = spawn(
        [
            PROMETHEUS,
            f"--config.file={tmp_path / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{prom_port}",
        ],
        tmp_path / "prometheus.log",
    )
    try:
        wait_for_port(prom_port, prometheus, "prometheus", 60)
        with flow_process(sets, tmp_path / "flow.log", "--no-until-end") as flow:
            produced = []

            def triggers_on_topic() -> bool:
                produced[:] = read_topic(stack, config.kafka.topics.triggers, idle_s=1)
                return len(produced) >= 3

            wait_until(triggers_on_topic, 90, "three triggers", interval_s=0.5)
            expected = len(produced)

            def scraped() -> bool:
                result = _query(prom_port, 'sum(crmstream_triggers_total{job="crmstream"})')
                return bool(result) and float(result[0]["value"][1]) == expected

            wait_until(scraped, 60, f"Prometheus to see {expected} triggers", interval_s=0.5)
            up = _query(prom_port, 'up{job="crmstream"}')
            dead = _query(prom_port, 'sum(crmstream_invalid_events_total{job="crmstream"})')
            by_type = _query(prom_port, "sum by (trigger_type) (crmstream_triggers_total)")
            bytewax = _query(prom_port, '{job="crmstream", __name__=~"bytewax_.*"}')
            assert flow.poll() is None
        print(
            f"scrape: {expected} triggers on the topic; Prometheus: "
            f"{[(r['metric'].get('trigger_type'), r['value'][1]) for r in by_type]}, "
            f"dead letters {dead[0]['value'][1]}, up {up[0]['value'][1]}, "
            f"{len(bytewax)} Bytewax series"
        )
        fired = [r["metric"]["trigger_type"] for r in by_type if float(r["value"][1])]
        assert fired == ["browse_interest"]
        # every trigger type is a series from the start, at 0 (CrmMetrics.precreate)
        assert len(by_type) == 13, by_type
        assert float(dead[0]["value"][1]) == 1
        assert up[0]["value"][1] == "1"
        assert bytewax, "Bytewax's own metrics are served alongside ours"
    finally:
        stop_process(prometheus)
        time.sleep(0)  # keep the tsdb lock released before tmp_path cleanup
        subprocess.run(["true"], check=False)
