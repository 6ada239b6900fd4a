"""The harness's runs: one workload size, every contender on it, in turn.

This module owns the order and the bookkeeping of a harness run: the embedded
broker and redis-server shared by every contender (``Harness``), the workload
written once per size, the quick contenders (the ceiling and crmstream, 1 and 2
processes) run ``--repeats`` times in turn and each reported by its median run,
the slower ones (the naive baseline, Quix Streams) once, and the ratios. The
latency rows are ``latency.LatencyRuns``'s; the tables ``report``'s.
"""

from __future__ import annotations

import argparse
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

from crmstream.bench.activity import ZIPF_S
from crmstream.bench.harness.children import BENCH_FETCH_BYTES
from crmstream.bench.harness.contenders import (
    PeerUnavailable,
    _crm_cmd,
    _me,
    _naive_cmd,
    _pathway_cmd,
    _quix_cmd,
    ensure_pathway_venv,
    ensure_quix_venv,
    pathway_env,
)
from crmstream.bench.harness.measure import (
    Child,
    CpuWatch,
    Result,
    cpu_of,
    cpu_seconds_of,
    median_run,
    together,
)
from crmstream.bench.harness.report import _cpu_cell, write

INPUT_ROLES = ("clickstream", "orders", "customers", "feedback")
__all__ = ["BENCH_FETCH_BYTES", "Harness", "SizeRun"]


class Harness:
    """One harness run: the embedded servers, then every size in turn, then the report."""

    def __init__(self, args: argparse.Namespace):
        from rich.console import Console

        self.args = args
        self.console = Console()
        self.results: dict[str, Any] = {"runs": []}
        self.broker_pid: int | None = None  # the embedded broker, for its CPU use

    def log(self, text: str) -> None:
        self.console.print(text)

    def pathway_python(self) -> Path | None:
        """The Pathway job's interpreter, or None (left out: the reason is logged and
        recorded under ``left_out`` in harness.json)."""
        if self.args.no_pathway:
            return None
        try:
            return ensure_pathway_venv(self.log)
        except PeerUnavailable as exc:
            self.log(f"[red]Pathway is left out: {exc}[/]")
            self.results.setdefault("left_out", {})["pathway"] = str(exc)
            return None

    def run(self) -> None:
        from crmstream.config import load_config
        from crmstream.embedded import EmbeddedStack

        config = load_config(None, [f"kafka.partitions={self.args.partitions}"], env={})
        quix = ensure_quix_venv(self.log) if not self.args.no_quix else None
        self.pathway = self.pathway_python()
        with EmbeddedStack(config) as stack:
            assert stack.endpoints is not None
            self.broker_pid = next((p.pid for name, p in stack.processes if name == "tansu"), None)
            for customers in self.args.customers:
                size = SizeRun(self, stack.endpoints, customers, quix)
                self.results["runs"].append(size.run())
        self.results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python " + (
            platform.python_version()
        )
        self.results["generator_linger_ms"] = self.args.generator_linger_ms
        self.results["fetch_bytes"] = self.args.fetch_bytes
        write(self.results, self.args, self.console)


class SizeRun:
    """Every contender on one workload size: ``customers`` customers, the events written
    once to topics of their own, read by each contender in turn."""

    def __init__(
        self,
        harness: Harness,
        endpoints: Any,
        customers: int,
        quix: Path | None,
        activity: str = "cdnow",
    ):
        from crmstream.config import load_config

        self.h, self.args = harness, harness.args
        self.endpoints, self.customers, self.quix = endpoints, customers, quix
        self.activity = activity  # bench/activity.py: "zipf" for the hot-key stress run
        self.tag = f"h{customers}" + ("" if activity == "cdnow" else activity[0])
        self.events = self.args.events or customers * 2
        self.base = [f"kafka.partitions={self.args.partitions}"]
        self.inputs = [f"kafka.topics.{r}={self.tag}.{r}" for r in INPUT_ROLES]
        self.config = load_config(None, self.base + self.inputs, env={})
        self.brokers = ",".join(endpoints.brokers)
        self.topics = ",".join(self.config.kafka.topics.inputs)
        self.client: Any = None
        self.malformed = 0  # of the events written (``write_workload``)
        self._ends: dict[tuple[str, int], int] | None = None

    def sets_for(self, name: str) -> list[str]:
        """crmstream settings of the contender ``name``: the size's input topics, and
        output topics and a Redis key prefix of its own."""
        tag = self.tag
        return [
            *self.base,
            *self.inputs,
            f"kafka.topics.triggers={tag}.{name}.triggers",
            f"kafka.topics.suppressions={tag}.{name}.suppressions",
            f"kafka.topics.dead_letter={tag}.{name}.dead-letter",
            f"redis.key_prefix={tag}{name}",
            "metrics.enabled=false",
            *self.args.crm_set,
        ]

    def _create(self, sets: list[str]) -> None:
        from crmstream.config import load_config
        from crmstream.topics import create_topics

        create_topics(self.endpoints.brokers, load_config(None, sets, env={}))

    def write_workload(self) -> None:
        from crmstream.bench.workload import Workload, WorkloadSpec, publish
        from crmstream.topics import create_topics

        create_topics(self.endpoints.brokers, self.config)
        self.h.log(f"[bold]{self.customers:,} customers[/]: writing {self.events:,} events ...")
        stats = publish(
            self.endpoints.brokers,
            self.config,
            Workload(self.config, WorkloadSpec(customers=self.customers, activity=self.activity)),
            max_events=self.events,
        )
        self.malformed = stats.malformed

    # contenders -----------------------------------------------------------------

    def ceiling(self, n: int) -> Result:
        # The watch samples before the children start: their timed windows lie inside.
        with CpuWatch(self.h.broker_pid, self.client) as watch:
            children = [
                Child(
                    _me(
                        "ceiling",
                        "--brokers",
                        self.brokers,
                        "--topics",
                        self.topics,
                        "--part",
                        str(i),
                        "--of",
                        str(n),
                        "--fetch-bytes",
                        str(self.args.fetch_bytes),
                    )
                ).start()
                for i in range(n)
            ]
            reports = [c.wait(3600) for c in children]
        return Result(
            f"ceiling ({n} proc)",
            n,
            sum(r["events"] for r in reports),
            together(reports),
            [c.peak_rss_mb for c in children],
            cpu_pct=cpu_of(reports, watch),
            fetch_bytes=[r["fetch_bytes"] for r in reports],
            cpu_seconds=cpu_seconds_of(reports),
        )

    def crm(self, n: int, repeat: int, progress: bool = False) -> Result:
        """crmstream with ``n`` processes; with ``progress``, each shard's progress over
        its own input sampled from Redis while it runs (``shards.ShardProgress``)."""
        import contextlib

        from crmstream.bench.harness.shards import ShardProgress
        from crmstream.config import load_config
        from crmstream.embedded import free_port

        name = f"crm{n}" + (f"r{repeat}" if repeat else "")
        sets = self.sets_for(name)
        self._create(sets)
        client = self.client
        before = int(client.info("memory")["used_memory"])
        addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(n))
        # The watch samples before the children start: their timed windows lie inside.
        with CpuWatch(self.h.broker_pid, client) as watch:
            children = [
                Child(
                    _crm_cmd(
                        self.brokers,
                        self.endpoints.redis_url,
                        sets,
                        self.args.fetch_bytes,
                        "--part",
                        str(i),
                        "--of",
                        str(n),
                        "--addresses",
                        addresses,
                    )
                ).start()
                for i in range(n)
            ]
            shards = load_config(None, sets, env={}).processing.shards
            sampler = (
                ShardProgress(client, f"{self.tag}{name}", shards, self.ends())
                if progress
                else contextlib.nullcontext()
            )
            with sampler:
                reports = [c.wait(3600) for c in children]
        shard_rows = (
            sampler.report(max(r["started_at"] for r in reports))
            if isinstance(sampler, ShardProgress)
            else None
        )
        if shard_rows:
            self.h.log(f"    shards' own input applied after (s): {shard_rows}")
        used = int(client.info("memory")["used_memory"]) - before
        states = sum(int(v) for v in client.hgetall(f"{self.tag}{name}:customers").values())
        cpu = cpu_of(reports, watch)
        self._log_cluster(reports, cpu)
        # Every repeat starts from an empty Redis, as the first did (the others'
        # keys would change its memory and hash-table growth).
        client.flushdb()
        return Result(
            f"crmstream ({n} proc)",
            n,
            sum(r["events"] for r in reports),
            together(reports),
            [c.peak_rss_mb for c in children],
            used / max(states, 1),
            cpu,
            [r["fetch_bytes"] for r in reports],
            cpu_seconds_of(reports),
            shards=shard_rows,
        )

    def ends(self) -> dict[tuple[str, int], int]:
        """Each input partition's message count (read once per size)."""
        from crmstream.bench.harness.shards import partition_ends

        if self._ends is None:
            self._ends = partition_ends(
                self.endpoints.brokers, list(self.config.kafka.topics.inputs)
            )
        return self._ends

    def _log_cluster(self, reports: list[dict[str, Any]], cpu: dict[str, Any]) -> None:
        ready = [r["started_at"] for r in reports]
        waits = [round(r["peer_wait_seconds"], 2) for r in reports]
        split = [f"{r['events']:,}" for r in reports]  # the skew: a customer has one shard
        waited = (
            f", waited {waits} s for the processes before each to listen, events {split}"
            if len(reports) > 1
            else ""
        )
        self.h.log(
            f"    own times {[round(r['seconds'], 2) for r in reports]} s, ready "
            f"{max(ready) - min(ready):.2f} s apart, {together(reports):.2f} s together"
            f"{waited}; CPU % of a core, processes / broker / redis / machine idle: "
            f"{_cpu_cell(cpu)}"
        )

    def naive(self) -> Result:
        sets = self.sets_for("naive")
        self._create(sets)
        client = self.client
        before = int(client.info("memory")["used_memory"])
        child = Child(
            _naive_cmd(
                self.brokers,
                self.endpoints.redis_url,
                self.topics,
                f"{self.tag}.naive.triggers",
                f"{self.tag}naive",
                self.args.fetch_bytes,
            )
        ).start()
        report = child.wait(7200)
        used = int(client.info("memory")["used_memory"]) - before
        keys = sum(1 for _ in client.scan_iter(match=f"{self.tag}naive:*", count=5000))
        return Result(
            "naive (1 proc)",
            1,
            report["events"],
            report["seconds"],
            [child.peak_rss_mb],
            used / max(keys, 1),
            fetch_bytes=[report["fetch_bytes"]],
            cpu_seconds=report.get("cpu_seconds"),
        )

    def quix_run(self, python: Path) -> Result:
        self._create(self.sets_for("quix"))
        state = Path(self.args.out) / f"quix-state-{self.tag}"
        child = Child(
            _quix_cmd(
                python,
                self.brokers,
                self.topics,
                f"{self.tag}.quix.triggers",
                state,
                f"{self.tag}-quix",
                self.args.partitions,
                self.args.fetch_bytes,
            )
        ).start()
        report = child.wait(7200)
        size = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
        return Result(
            "Quix Streams (1 proc)",
            1,
            report["events"],
            report["seconds"],
            [child.peak_rss_mb],
            size / self.customers,
            fetch_bytes=[report["fetch_bytes"]],
            cpu_seconds=report.get("cpu_seconds"),
        )

    def pathway_run(self, python: Path, threads: int, repeat: int) -> Result:
        """The Pathway job with ``threads`` worker threads (one process), until it has
        every valid event's row; compared with the ceiling of as many processes."""
        name = f"pw{threads}" + (f"r{repeat}" if repeat else "")
        self._create(self.sets_for(name))
        child = Child(
            _pathway_cmd(
                python,
                self.brokers,
                self.topics,
                f"{self.tag}.{name}.triggers",
                f"{self.tag}-{name}",
                expect_rows=self.events - self.malformed,
                fetch_bytes=self.args.fetch_bytes,
            ),
            env=pathway_env(threads),
        ).start()
        report = child.wait(7200)
        self.h.log(
            f"    rows {report['events']:,} (first update after "
            f"{report['first_update_s']:.2f} s with {report['first_update_rows']:,}), "
            f"Pathway {report['pathway_version']}"
        )
        return Result(
            f"Pathway ({threads} thread{'s' if threads > 1 else ''})",
            1,
            report["events"],
            report["seconds"],
            [child.peak_rss_mb],
            fetch_bytes=[report["fetch_bytes"]],
            cpu_seconds=report["cpu_seconds"],
            cores=threads,
        )

    # the run ----------------------------------------------------------------------

    def quick_contenders(self, repeat: int) -> list[tuple[str, Callable[[], Result]]]:
        """The contenders run ``--repeats`` times, in turn, in this order."""
        quick = [
            ("ceiling, 1 process", lambda: self.ceiling(1)),
            ("crmstream, 1 process", lambda: self.crm(1, repeat)),
            ("ceiling, 2 processes", lambda: self.ceiling(2)),
            ("crmstream, 2 processes", lambda: self.crm(2, repeat, progress=repeat == 0)),
        ]
        python = self.h.pathway
        if python is not None:
            quick += [
                (f"Pathway, {n} thread(s)", lambda n=n: self.pathway_run(python, n, repeat))
                for n in (1, 2)
            ]
        return quick

    def run(self) -> dict[str, Any]:
        import redis

        self.write_workload()
        self.client = redis.Redis.from_url(self.endpoints.redis_url)
        # The quick contenders run ``--repeats`` times, in turn, and each is
        # reported by its median run: one run's rate moved by a third between
        # harness runs on this shared machine (bench/RESULTS.md, round 13).
        repeats = self.args.repeats
        tries: list[list[Result]] = []
        for repeat in range(repeats):
            of = f" (run {repeat + 1} of {repeats})" if repeats > 1 else ""
            for i, (label, fn) in enumerate(self.quick_contenders(repeat)):
                self.h.log(f"  {label}{of} ...")
                if repeat == 0:
                    tries.append([])
                tries[i].append(fn())
        if not self.args.no_naive:
            self.h.log("  naive baseline ...")
            tries.append([self.naive()])
        if self.quix is not None:
            self.h.log("  Quix Streams ...")
            tries.append([self.quix_run(self.quix)])
        runs = [median_run(own) for own in tries]
        out: dict[str, Any] = {
            "customers": self.customers,
            "events": self.events,
            "malformed": self.malformed,
            "activity": self.activity,
            "contenders": [self.row(r, own, runs) for r, own in zip(runs, tries, strict=True)],
            "ratios": ratios({r.name: r for r in runs}),
        }
        if not self.args.no_hot_key:
            self.h.log(f"  hot-key stress workload (Zipf {ZIPF_S}), reported, not a target ...")
            hot = SizeRun(self.h, self.endpoints, self.customers, None, activity="zipf")
            out["hot_key"] = hot.stress()
        if not self.args.no_latency:
            from crmstream.bench.harness.latency import LatencyRuns

            crm1 = next(r for r in runs if r.name == "crmstream (1 proc)")
            out["latency"] = LatencyRuns(self, crm1.rate).run()
        return out

    def stress(self) -> dict[str, Any]:
        """The ceiling and crmstream, 1 and 2 processes, once each on this size's workload
        (the hot-key one), with each shard's progress in the 2-process run."""
        import redis

        self.write_workload()
        self.client = redis.Redis.from_url(self.endpoints.redis_url)
        runs = []
        for label, fn in (
            ("ceiling, 1 process", lambda: self.ceiling(1)),
            ("crmstream, 1 process", lambda: self.crm(1, 0)),
            ("ceiling, 2 processes", lambda: self.ceiling(2)),
            ("crmstream, 2 processes", lambda: self.crm(2, 0, progress=True)),
        ):
            self.h.log(f"    hot key: {label} ...")
            runs.append(fn())
        by = {r.name: r for r in runs}
        return {
            "activity": self.activity,
            "events": self.events,
            "contenders": [self.row(r, [r], runs) for r in runs],
            "ratios": {
                "crmstream_vs_ceiling": round(
                    by["crmstream (1 proc)"].rate / by["ceiling (1 proc)"].rate, 4
                ),
                "crmstream_2proc_vs_1proc": round(
                    by["crmstream (2 proc)"].rate / by["crmstream (1 proc)"].rate, 3
                ),
            },
        }

    @staticmethod
    def row(r: Result, own: list[Result], runs: list[Result]) -> dict[str, Any]:
        """A contender's row: its median run, and the rates of all its runs."""
        cores = r.cores or r.processes
        ref = next(c for c in runs if c.name == f"ceiling ({2 if cores == 2 else 1} proc)")
        return {
            "name": r.name,
            "processes": r.processes,
            "events": r.events,
            "seconds": round(r.seconds, 3),
            "events_per_s": round(r.rate),
            "ratio_to_ceiling": round(r.rate / ref.rate, 4),
            "peak_rss_mb": [round(m) for m in r.peak_rss_mb],
            "state_bytes_per_customer": (
                round(r.state_bytes_per_customer)
                if r.state_bytes_per_customer is not None
                else None
            ),
            "cpu_pct": r.cpu_pct,
            "cpu_us_per_event": (
                round(r.cpu_us_per_event, 2) if r.cpu_us_per_event is not None else None
            ),
            "ceiling": ref.name,
            "fetch_bytes": r.fetch_bytes,
            "runs_events_per_s": [round(one.rate) for one in own],
            # sampled in the first run only, which need not be the median one
            "shards": next((one.shards for one in own if one.shards), None),
        }


def ratios(by: dict[str, Result]) -> dict[str, float]:
    """crmstream's ratios to the other contenders' median runs, within one size."""
    crm1, crm2 = by["crmstream (1 proc)"], by["crmstream (2 proc)"]
    out = {
        "crmstream_vs_ceiling": round(crm1.rate / by["ceiling (1 proc)"].rate, 4),
        "crmstream_2proc_vs_1proc": round(crm2.rate / crm1.rate, 3),
    }
    if "naive (1 proc)" in by:
        out["crmstream_vs_naive"] = round(crm1.rate / by["naive (1 proc)"].rate, 2)
    if "Quix Streams (1 proc)" in by:
        out["crmstream_vs_quix"] = round(crm1.rate / by["Quix Streams (1 proc)"].rate, 2)
    if "Pathway (1 thread)" in by:
        out["crmstream_vs_pathway_1thread"] = round(crm1.rate / by["Pathway (1 thread)"].rate, 2)
        out["crmstream_2proc_vs_pathway_2threads"] = round(
            crm2.rate / by["Pathway (2 threads)"].rate, 2
        )
    return out
