"""The benchmark harness's --smoke mode runs every contender end to end (no timing asserted)."""

from __future__ import annotations

import subprocess
import sys
import time

import orjson
import pytest

from crmstream.bench.workload import Workload, WorkloadSpec, publish_scheduled
from tests.conftest import read_topic

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def run_bench(module: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    """``python -m crmstream.bench.<module> args``; fails the test on a non-zero exit."""
    run = subprocess.run(
        [sys.executable, "-m", f"crmstream.bench.{module}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


def test_harness_smoke_runs_every_contender_and_writes_the_table_and_plot(tmp_path):
    run = run_bench("harness", "--smoke", "--out", str(tmp_path), timeout=1500)
    # the fetch size reaches consumers only: librdkafka warns when anything else gets it
    assert "CONFWARN" not in run.stdout + run.stderr
    result = orjson.loads((tmp_path / "harness.json").read_bytes())
    (size,) = result["runs"]
    names = [c["name"] for c in size["contenders"]]
    assert names == [
        "ceiling (1 proc)",
        "crmstream (1 proc)",
        "ceiling (2 proc)",
        "crmstream (2 proc)",
        "Pathway (1 thread)",
        "Pathway (2 threads)",
        "naive (1 proc)",
        "Quix Streams (1 proc)",
    ], result.get("left_out")
    assert result["fetch_bytes"] == 8 << 20  # the harness's default (bench/README.md)
    assert size["activity"] == "cdnow"
    for contender in size["contenders"]:
        if contender["name"].startswith("Pathway"):
            # Pathway's rows: every valid event's, and those malformed ones its schema takes
            assert size["events"] - size["malformed"] <= contender["events"] <= size["events"]
        else:
            assert contender["events"] == size["events"], contender  # everyone read all input
        # every process of every contender read with the same fetch size, as it reported it
        assert contender["fetch_bytes"] == [8 << 20] * contender["processes"], contender
        assert all(m > 0 for m in contender["peak_rss_mb"])
        assert contender["cpu_us_per_event"] > 0, contender  # CPU per event of every one
    for contender in size["contenders"][:6]:  # run twice each, in turn
        # --smoke runs each of these twice, in turn, and reports the lower (median) run
        rates = contender["runs_events_per_s"]
        assert len(rates) == 2 and contender["events_per_s"] == min(rates), contender
    assert size["contenders"][5]["ceiling"] == "ceiling (2 proc)"  # Pathway, 2 threads
    for contender in size["contenders"][:4]:  # CPU in the timed window: each process, servers
        cpu = contender["cpu_pct"]
        assert len(cpu["processes"]) == contender["processes"], contender
        assert all(p > 0 for p in cpu["processes"]) and set(cpu) >= {"broker", "redis", "idle"}, cpu
    for contender in size["contenders"][6:]:  # the naive baseline and Quix run once
        assert contender["runs_events_per_s"] == [contender["events_per_s"]], contender
    assert set(size["ratios"]) >= {"crmstream_vs_pathway_1thread", "crmstream_vs_quix"}
    # each shard's progress over its own input, calibrated and hot-key workloads, 2 processes
    hot = size["hot_key"]
    assert hot["activity"] == "zipf" and [c["name"] for c in hot["contenders"]] == names[:4]
    for run in (size, hot):
        shards = run["contenders"][3]["shards"]
        assert [s["shard"] for s in shards] == [0, 1], shards
        assert sum(s["own_events"] for s in shards) == run["events"], shards
        assert all(s["seconds_to"]["100%"] is not None for s in shards), shards
    latency = {r["contender"]: r for r in size["latency"]}
    assert set(latency) == {"kafka floor", "crmstream", "naive", "quix", "pathway"}
    assert all(r["triggers"] > 0 for name, r in latency.items() if name != "kafka floor")
    # crmstream's cart nudges fell due in the window: how late each left
    crm = latency["crmstream"]
    assert crm["timers"] > 0 and 0 <= crm["timer_late_p50_ms"] <= crm["timer_late_max_ms"]
    floor = latency["kafka floor"]
    assert floor["triggers"] is None and floor["events_read"] > 0 and floor["p99_ms"] is not None
    for r in latency.values():  # CPU use in the window: the contender, the broker, the sender
        assert set(r["cpu_pct"]) == {"contender", "broker", "generator"}, r
        assert r["cpu_pct"]["generator"] > 0, r
    assert (tmp_path / "harness.png").stat().st_size > 10_000
    print(f"harness smoke: {size['ratios']}")


@pytest.mark.parametrize("variants", [True, False], ids=["with-variants", "plain"])
def test_flow_bench_runs_with_and_without_the_variants(tmp_path, variants):
    out = tmp_path / "flow.json"
    flags = ["--exactly-once-cost", "--gc-cost", "--front-only", "--io-floor"] if variants else []
    if variants:  # the harness's fetch size, to the consumers only: no librdkafka warning
        flags += ["--fetch-bytes", str(8 << 20)]
    run = run_bench(
        "flow_bench", "--events", "4000", "--customers", "500", *flags, "--out", str(out)
    )
    result = orjson.loads(out.read_bytes())
    assert result["flow_messages"] == result["ceiling_messages"] == 4000
    assert result["flow_events_per_s"] > 0
    assert result["flow_cpu_us_per_event"] > 0 and result["ceiling_cpu_us_per_event"] > 0
    assert "crmstream flow" in run.stdout
    if not variants:  # `make bench`: the plain comparison only
        assert "at_least_once_events_per_s" not in result
        assert "python_gc_events_per_s" not in result
        assert "Python's GC settings" not in run.stdout
        assert "front_events_per_s" not in result and "front half" not in run.stdout
        assert "io_floor_events_per_s" not in result and "I/O floor" not in run.stdout
    else:
        assert result["at_least_once_events_per_s"] > 0
        assert len(result["python_gc_events_per_s"]) == len(result["python_gc_seconds"]) == 2
        assert "seconds in the garbage collector" in run.stdout
        # the front half handled every message (checked by the bench) and is timed
        assert result["front_events_per_s"] > 0 and result["front_cpu_us_per_event"] > 0
        assert "front half alone" in run.stdout
        # the I/O floor applied every message and wrote every customer's state (checked by
        # the bench) and is timed
        assert result["io_floor_events_per_s"] > 0 and result["io_floor_cpu_us_per_event"] > 0
        assert "state I/O floor" in run.stdout
        assert result["fetch_bytes"] == 8 << 20
        assert "CONFWARN" not in run.stdout + run.stderr
    print(f"flow bench smoke: {result}")


@pytest.mark.integration
def test_scheduled_publishing_paces_events_and_stamps_their_send_time(isolated_config, stack):
    config = isolated_config()
    rate, seconds = 2_000, 1.5
    workload = Workload(config, WorkloadSpec(customers=300, malformed_rate=0.0))
    before_ms = time.time() * 1000
    stats = publish_scheduled(list(stack.brokers), config, workload, rate, seconds)
    after_ms = time.time() * 1000
    events = [e for t in config.kafka.topics.inputs for e in read_topic(stack, t)]
    times = sorted(e["event_time"] for e in events)
    assert stats.events == len(events) == 3_000
    # Send times, inside the window; paced: the last is sent no earlier than (n-1)/rate
    # after the first (the sender only ever waits, so no upper bound is implied).
    assert before_ms <= times[0] and times[-1] <= after_ms, (before_ms, times[0], after_ms)
    assert times[-1] - times[0] >= (len(times) - 1) * 1000 / rate - 2
    promised = [e["promised_delivery_time"] for e in events if "promised_delivery_time" in e]
    assert all(p > before_ms for p in promised)


def test_timer_bench_fires_the_first_days_timers():
    run = run_bench("timer_bench", "--customers", "2000")
    text = " ".join(run.stdout.split())
    # 10 timers per customer; the first three days fire 3 of them (two cart nudges, welcome).
    assert "timers written 20,000; fired 6,000" in text, text
    assert "left pending 14,000" in text, text


def test_parse_bench_checks_both_ways_agree_and_reports_each_topic(tmp_path):
    out = tmp_path / "parse.json"
    run_bench(
        "parse_bench", "--events", "3000", "--customers", "500", "--repeat", "1",
        "--out", str(out), timeout=300,
    )  # fmt: skip
    result = orjson.loads(out.read_bytes())
    assert result["events"] == 3000 and result["differing"] == 0
    assert result["clickstream"] > 2000 and result["orders"] > 50 and result["customers"] > 50
    for label in ("clickstream", "orders", "customers", "all"):
        assert all(result[f"{k}_{label}_us"] > 0 for k in ("loads", "parse_checked", "parse"))


def test_exchange_bench_round_trips_the_items_both_ways(tmp_path):
    out = tmp_path / "exchange.json"
    run = run_bench(
        "exchange_bench", "--events", "3000", "--customers", "500", "--repeat", "1",
        "--out", str(out), timeout=300,
    )  # fmt: skip
    result = orjson.loads(out.read_bytes())
    assert 2900 < result["events"] <= 3000 and result["items"] >= 2  # malformed ones are not
    assert all(v["dump"] > 0 and v["load"] > 0 for v in result["us_per_event"].values())
    assert "ratio before/after" in run.stdout
