"""Measuring a contender: its process, its CPU and the servers', its result.

This module owns what the harness reads while contenders run: each child's
JSON report and peak RSS (``Child``), the broker's and redis-server's CPU and
the machine's idle time (``CpuWatch``), how a cluster's run is timed
(``together``), a run's ``Result`` and the median of several, and the
latencies read back from a trigger topic.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from crmstream.bench.harness.children import percentile
from crmstream.bench.harness.contenders import ROOT


def _ended_at(report: dict[str, Any]) -> float:
    return report["started_at"] + report["seconds"]


def together(reports: list[dict[str, Any]]) -> float:
    """Seconds from the moment the last process was ready to work (kernels loaded, for
    crmstream) until the last one finished. Processes of a Bytewax cluster wait for each
    other before the dataflow starts, so an earlier-ready process's wait for a slower
    start-up is not work; the slowest process's own time would count it."""
    return max(map(_ended_at, reports)) - max(r["started_at"] for r in reports)


@dataclass
class Child:
    """A contender process: its JSON report and its peak resident memory."""

    cmd: list[str]
    env: dict[str, str] | None = None  # None: the harness's own
    proc: subprocess.Popen[str] | None = None
    peak_rss_mb: float = 0.0
    _watch: threading.Thread | None = None

    def start(self) -> Child:
        self.proc = subprocess.Popen(
            self.cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=ROOT,
            env=self.env,
        )
        self._watch = threading.Thread(target=self._rss, daemon=True)
        self._watch.start()
        return self

    def _rss(self) -> None:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):  # the kernel's own peak RSS
                        self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.2)

    def wait(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.cmd[:4]} failed ({self.proc.returncode}): {err[-3000:]}")
        for line in err.splitlines():  # a client given a setting it ignores: say so
            if "CONFWARN" in line:
                print(f"[{' '.join(self.cmd[1:4])}] {line}", file=sys.stderr)
        return orjson.loads(out.strip().splitlines()[-1])

    def finish(self) -> dict[str, Any]:
        """Stop a tailing child (SIGTERM) and return the JSON it prints as it ends."""
        assert self.proc is not None
        self.proc.terminate()
        return self.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


class CpuWatch:
    """Samples the CPU time of the broker and of redis-server, and the machine's idle time,
    in a thread, so that their share of a contender's timed window can be read afterwards."""

    def __init__(self, broker_pid: int | None, redis_client: Any, every_s: float = 0.05):
        self._broker_pid, self._redis, self._every = broker_pid, redis_client, every_s
        self._samples: list[tuple[float, dict[str, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        cpu = self._redis.info("cpu")
        self._samples.append(
            (
                time.time(),
                {
                    "broker": _cpu_seconds(self._broker_pid),
                    "redis": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
                    "idle": _idle_seconds(),
                },
            )
        )

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def __enter__(self) -> CpuWatch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def pct(self, start: float, end: float) -> dict[str, int]:
        """% of one core each used from the last sample at or before ``start`` to the first
        at or after ``end`` (the window rounded out to the samples; the first and last are
        taken on entry and exit, so they bracket any window inside the ``with``)."""
        first = max((s for s in self._samples if s[0] <= start), key=lambda s: s[0])
        last = min((s for s in self._samples if s[0] >= end), key=lambda s: s[0])
        return {
            k: round(100 * (last[1][k] - v) / (last[0] - first[0]))
            for k, v in first[1].items()
            if v is not None and last[1][k] is not None
        }


def cpu_of(reports: list[dict[str, Any]], watch: CpuWatch) -> dict[str, Any]:
    """Each process's CPU over its own timed window and the broker's and Redis's over the
    window ``together`` times, all in % of one core."""
    start = max(r["started_at"] for r in reports)
    end = max(map(_ended_at, reports))
    return {
        "processes": [round(100 * r["cpu_seconds"] / r["seconds"]) for r in reports],
        **watch.pct(start, end),
    }


def median_run(runs: list[Result]) -> Result:
    """The run with the median rate (of an even number, the lower of the middle two)."""
    return sorted(runs, key=lambda r: r.rate)[(len(runs) - 1) // 2]


@dataclass
class Result:
    name: str
    processes: int
    events: int
    seconds: float
    peak_rss_mb: list[float]
    state_bytes_per_customer: float | None = None
    cpu_pct: dict[str, Any] | None = None  # % of a core: "processes" (list), broker, redis, idle
    fetch_bytes: list[int] = field(default_factory=list)  # each process's, as it reported it
    cpu_seconds: float | None = None  # all its processes' CPU over their timed windows
    cores: int | None = None  # the ceiling it is compared with (default: ``processes``)
    shards: list[dict[str, Any]] | None = None  # each shard's progress (harness.shards)

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0

    @property
    def cpu_us_per_event(self) -> float | None:
        """CPU time (user + system, every thread) per event, in µs."""
        if self.cpu_seconds is None or not self.events:
            return None
        return 1e6 * self.cpu_seconds / self.events


def cpu_seconds_of(reports: list[dict[str, Any]]) -> float | None:
    """The CPU seconds the reports' processes give, added up; None if one gives none."""
    if any("cpu_seconds" not in r for r in reports):
        return None
    return sum(r["cpu_seconds"] for r in reports)


def _trigger_latencies(endpoints: Any, topic: str) -> list[float]:
    """emitted_at - event_time of every event-caused trigger on the topic, in ms (live
    input: the event time is the wall clock when the generator sent it,
    ``workload.publish_scheduled``)."""
    return trigger_latencies(endpoints, topic)[0]


def trigger_latencies(endpoints: Any, topic: str) -> tuple[list[float], list[float]]:
    """(event-caused, timer) trigger latencies on the topic, in ms: ``emitted_at`` minus
    ``event_time``, which for a timer's trigger is its due time (docs/events.md), so the
    second list is how late each timer's trigger left."""
    from crmstream.ops import TopicReader

    with TopicReader(list(endpoints.brokers), {}, [topic], 30) as reader:
        records = reader.every()
    return split_latencies(record.value for record in records)


def split_latencies(records: Iterable[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """``emitted_at - event_time`` in ms of trigger records, those an event caused apart
    from those a timer fired (``causal_event_id`` ``timer:<kind>:<ref>:<due>``)."""
    from datetime import datetime

    events, timers = [], []
    for record in records:
        emitted = datetime.fromisoformat(record["emitted_at"]).timestamp()
        at = datetime.fromisoformat(record["event_time"]).timestamp()
        cause = str(record.get("causal_event_id", ""))
        (timers if cause.startswith("timer:") else events).append((emitted - at) * 1000)
    return events, timers


def stamped_latencies(endpoints: Any, topic: str) -> list[float]:
    """Kafka timestamp (producer create time) minus ``event_time`` (epoch ms) of every
    record on the topic with ``diff`` 1, in ms: the Pathway job's triggers, whose
    records carry no emission time of their own."""
    from confluent_kafka import Consumer, KafkaError, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": ",".join(endpoints.brokers),
            "group.id": "bench-stamped",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
        }
    )
    meta = consumer.list_topics(topic, timeout=30).topics[topic]
    consumer.assign([TopicPartition(topic, p, 0) for p in meta.partitions])
    remaining, out = len(meta.partitions), []
    while remaining:
        for msg in consumer.consume(1000, 1.0):
            if msg.error() is not None:
                remaining -= msg.error().code() == KafkaError._PARTITION_EOF
                continue
            record = orjson.loads(msg.value())
            if record.get("diff", 1) == 1:
                out.append(msg.timestamp()[1] - int(record["event_time"]))
    consumer.close()
    return out


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, all threads) a live process has used, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_seconds() -> float | None:
    """Idle time of all the machine's cores together (idle + iowait), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


_pct = percentile
