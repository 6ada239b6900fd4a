"""Latency under offered load: each contender tailing live input at a fixed rate.

This module owns the harness's latency rows. For each offered load (a share of
crmstream's measured 1-process maximum) the Kafka floor (a raw consumer, no
processing) and then each contender tail fresh topics while the generator sends
live events at that rate (``workload.publish_scheduled``); p50 and p99 of
``emitted_at - event_time`` over the triggers an event caused, and the CPU the
contender, the broker and the generator used during the sending window.

Timer lateness: crmstream's cart-abandoned nudge is due ``--timer-delay-s``
after the cart (3 s; the default configuration says 1 h, so no timer would
fall due in a 20 s window), so its timers fall due all through the window, as
in a steady state where they fire at the rate carts came in one delay before.
A timer's trigger carries its due time as ``event_time`` (docs/events.md):
``emitted_at`` minus it is how late the trigger left.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from crmstream.bench.harness.contenders import (
    PATHWAY_LATENCY_AUTOCOMMIT_MS,
    _crm_cmd,
    _me,
    _naive_cmd,
    _pathway_cmd,
    _quix_cmd,
    pathway_env,
)
from crmstream.bench.harness.measure import (
    Child,
    _cpu_seconds,
    _pct,
    stamped_latencies,
    trigger_latencies,
)

if TYPE_CHECKING:
    from crmstream.bench.harness.runs import SizeRun

OUTPUT_ROLES = ("triggers", "suppressions", "dead_letter")


class LatencyRuns:
    """The latency rows of one workload size."""

    def __init__(self, size: SizeRun, crm_max: float):
        self.size, self.args, self.crm_max = size, size.args, crm_max

    def contenders(self) -> list[str]:
        names = ["floor", "crmstream"] + ([] if self.args.no_naive else ["naive"])
        names += ["quix"] if self.size.quix is not None else []
        return names + (["pathway"] if self.size.h.pathway is not None else [])

    def run(self) -> list[dict[str, Any]]:
        rows = []
        for load in self.args.loads:
            rate = self.crm_max * load
            for name in self.contenders():
                row = self.one(name, load, rate)
                self.size.h.log(f"  latency {name} at {load:.0%} ({rate:,.0f}/s): {row}")
                rows.append(row)
        return rows

    def sets(self, name: str, tag: str) -> list[str]:
        roles = (
            "clickstream",
            "orders",
            "customers",
            "feedback",
            *OUTPUT_ROLES,
        )
        return [
            f"kafka.partitions={self.args.partitions}",
            *(f"kafka.topics.{r}={tag}.{r}" for r in roles),
            f"redis.key_prefix={tag}",
            "metrics.enabled=false",
            "policies.quiet_hours.start=00:00",
            "policies.quiet_hours.end=00:00",
            *(self.crm_sets() if name == "crmstream" else []),
        ]

    def crm_sets(self) -> list[str]:
        """crmstream's own settings in the latency runs: the cart nudge's delay (timer
        lateness, module docstring) and ``--crm-set``."""
        delay = self.args.timer_delay_s
        nudge = [f"rules.cart_abandoned.first_delay_minutes={delay / 60}"] if delay > 0 else []
        return nudge + self.args.crm_set

    def command(self, name: str, tag: str, config: Any) -> list[str]:
        endpoints, args = self.size.endpoints, self.args
        brokers = ",".join(endpoints.brokers)
        topics = ",".join(config.kafka.topics.inputs)
        triggers = config.kafka.topics.triggers
        if name == "floor":
            return _me(
                "floor", "--brokers", brokers, "--topics", topics,
                "--fetch-bytes", str(args.fetch_bytes),
            )  # fmt: skip
        if name == "crmstream":
            sets = self.sets(name, tag)
            return _crm_cmd(brokers, endpoints.redis_url, sets, args.fetch_bytes, "--tail")
        if name == "naive":
            return _naive_cmd(
                brokers, endpoints.redis_url, topics, triggers, tag, args.fetch_bytes, True
            )
        if name == "pathway":
            assert self.size.h.pathway is not None
            return _pathway_cmd(
                self.size.h.pathway, brokers, topics, triggers, tag,
                fetch_bytes=args.fetch_bytes, autocommit_ms=PATHWAY_LATENCY_AUTOCOMMIT_MS,
            )  # fmt: skip
        assert self.size.quix is not None
        state = Path(args.out) / f"quix-state-{tag}"
        return _quix_cmd(
            self.size.quix, brokers, topics, triggers, state, tag, args.partitions,
            args.fetch_bytes, idle_s=0,
        )  # fmt: skip

    def one(self, name: str, load: float, rate: float) -> dict[str, Any]:
        from crmstream.bench.workload import Workload, WorkloadSpec, publish_scheduled
        from crmstream.config import load_config
        from crmstream.topics import create_topics

        endpoints = self.size.endpoints
        tag = f"l{self.size.customers}{name}{int(load * 100)}"
        config = load_config(None, self.sets(name, tag), env={})
        create_topics(endpoints.brokers, config)
        env = pathway_env(1) if name == "pathway" else None
        child = Child(self.command(name, tag, config), env=env).start()
        assert child.proc is not None
        pids = {"contender": child.proc.pid, "broker": self.size.h.broker_pid}
        marks: dict[str, tuple[float, dict[str, float]]] = {}

        def window(edge: str) -> None:
            own = os.times()
            cpu = {k: _cpu_seconds(pid) for k, pid in pids.items()}
            marks[edge] = (time.monotonic(), {**cpu, "generator": own.user + own.system})

        # The floor needs no start-up; the others compile, join and assign.
        time.sleep(2 if name == "floor" else self.args.startup_s)
        publish_scheduled(
            endpoints.brokers,
            config,
            Workload(config, WorkloadSpec(customers=self.size.customers)),
            rate=rate,
            duration_s=self.args.load_seconds,
            window=window,
            linger_ms=self.args.generator_linger_ms,
        )
        time.sleep(2 if name == "floor" else self.args.drain_s)
        late: list[float] = []
        if name == "floor":
            floor = child.finish()
            count, p50, p99 = floor["events"], floor["p50_ms"], floor["p99_ms"]
        else:
            child.stop()
            topic = config.kafka.topics.triggers
            if name == "pathway":
                latencies = stamped_latencies(endpoints, topic)
            else:
                latencies, late = trigger_latencies(endpoints, topic)
            count, p50, p99 = len(latencies), _pct(latencies, 0.50), _pct(latencies, 0.99)
        (opened, cpu0), (closed, cpu1) = marks["open"], marks["close"]
        return {
            "contender": "kafka floor" if name == "floor" else name,
            "offered_load": load,
            "offered_events_per_s": round(rate),
            # the floor's latencies are over every input event, not triggers
            "triggers": None if name == "floor" else count,
            "events_read": count if name == "floor" else None,
            "p50_ms": p50,
            "p99_ms": p99,
            # crmstream's timers: how late their triggers left (module docstring)
            "timers": len(late) if name == "crmstream" else None,
            "timer_late_p50_ms": _pct(late, 0.50),
            "timer_late_p99_ms": _pct(late, 0.99),
            "timer_late_max_ms": round(max(late), 1) if late else None,
            # % of one core during the window: the contender, the broker, the generator
            "cpu_pct": {
                k: round(100 * (cpu1[k] - cpu0[k]) / (closed - opened))
                for k in cpu0
                if cpu0[k] is not None and cpu1[k] is not None
            },
        }
