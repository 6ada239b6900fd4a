"""State model benchmark: kernel throughput compiled vs. interpreted, and Redis bytes per customer.

This module owns the issue-3 figures (``make bench-state``):

1. kernels: the same ``apply_events`` + ``derive`` code over the same recorded
   workload in batches of 2000, once compiled by Numba and once interpreted
   (a subprocess with ``NUMBA_DISABLE_JIT=1``), in one run; the ratio is what
   Numba buys us;
2. bytes per customer: the full flow writes the workload's customers into an
   embedded redis-server; ``MEMORY USAGE`` of the state key and of the profile
   hash is averaged over a sample of customers.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from rich.console import Console
from rich.table import Table

from crmstream.bench.workload import Workload, WorkloadSpec, publish
from crmstream.config import CrmConfig, load_config
from crmstream.operators.derive import derive_batch
from crmstream.operators.events import EventValidator, ParsedEvent
from crmstream.operators.kernels import (
    BatchEvents,
    apply_batch,
)
from crmstream.operators.params import params_from
from crmstream.operators.timer_slots import TimerSlots
from crmstream.state.encoding import STATE_BYTES, decode_batch, fresh_records
from crmstream.state.timers import parse_member

BATCH = 2000


def recorded_batches(config: CrmConfig, events: int, customers: int) -> tuple[list, int]:
    """The workload parsed into kernel batches (customer indexes across the whole run)."""
    validator = EventValidator(config)
    topics = config.kafka.topics.by_role
    workload = Workload(config, WorkloadSpec(customers=customers, malformed_rate=0.0))
    index: dict[str, int] = {}
    parsed = []
    for i, ev in zip(range(events), workload.events(), strict=False):
        p = validator.parse(ev.key, ev.value, topics[ev.role], 0, i, 0, workload.now_ms)
        if type(p) is ParsedEvent:
            parsed.append(p)
            index.setdefault(p.customer_id, len(index))
    batches = []
    for start in range(0, len(parsed), BATCH):
        chunk = parsed[start : start + BATCH]
        cols = (
            np.array([index[e.customer_id] for e in chunk], np.int32),
            np.array([e.type_code for e in chunk], np.int8),
            np.array([e.category for e in chunk], np.int16),
            np.array([e.event_time_ms for e in chunk], np.int64),
            np.array([e.amount_base for e in chunk], np.float64),
            np.array([e.aux for e in chunk], np.float64),
        )
        order = np.lexsort((np.arange(len(chunk)), cols[3], cols[0]))
        batches.append(BatchEvents(*(c[order] for c in cols)))
    return batches, len(index)


def time_kernels(config: CrmConfig, events: int, customers: int) -> tuple[int, float]:
    """(events, seconds) for apply + derive over the recorded batches in this process."""
    batches, n_customers = recorded_batches(config, events, customers)
    params = params_from(config)
    records = fresh_records(n_customers)
    if os.environ.get("NUMBA_DISABLE_JIT") == "1":
        records = records.view(np.recarray)  # attribute access for the interpreted kernels
    else:
        warm = fresh_records(1)
        apply_batch(warm, batches[0]._replace(cust_idx=np.zeros_like(batches[0].cust_idx)), params)
        derive_batch(warm, np.zeros(1, np.int64), params)
    started = time.perf_counter()
    for batch in batches:
        apply_batch(records, batch, params)
        touched = np.unique(batch.cust_idx)
        subset = records[touched]
        derive_batch(subset, subset["last_seen_ms"].copy(), params)
        records[touched] = subset
    return sum(len(b.cust_idx) for b in batches), time.perf_counter() - started


def bytes_per_customer(config: CrmConfig, events: int, customers: int, sample: int) -> dict:
    """Run the real flow into an embedded Redis; MEMORY USAGE per customer."""
    import redis

    from crmstream.embedded import EmbeddedStack
    from crmstream.flows.crm import run_in_process
    from crmstream.flows.runtime import Runtime

    with EmbeddedStack(config) as stack:
        assert stack.endpoints is not None
        workload = Workload(config, WorkloadSpec(customers=customers, malformed_rate=0.0))
        publish(stack.endpoints.brokers, config, workload, max_events=events)
        runtime = Runtime(config, stack.endpoints)
        started = time.perf_counter()
        run_in_process(runtime, tail=False)
        flow_seconds = time.perf_counter() - started
        runtime.close()
        client = redis.Redis.from_url(stack.endpoints.redis_url)
        prefix = config.redis.key_prefix
        keys = [k.decode() for k in client.scan_iter(f"{prefix}:{{*}}:s", count=1000)]
        picked = keys[:sample]
        state = [client.memory_usage(k, samples=0) for k in picked]
        profile = [client.memory_usage(k[:-1] + "p", samples=0) for k in picked]
        breakdown = key_memory_by_kind(client, prefix)
        timer_kinds: dict[str, int] = {}
        for key in client.scan_iter(f"{prefix}:timers:*", count=100):
            for member, _ in client.zscan_iter(key, count=1000):
                kind = parse_member(member, 0).kind
                timer_kinds[kind] = timer_kinds.get(kind, 0) + 1
        # The timers kept in the states (under the wake members), by kind.
        slots = TimerSlots(config)
        for start in range(0, len(keys), 5000):
            chunk = keys[start : start + 5000]
            records = decode_batch(client.mget(chunk), chunk)
            for timers in slots.timers_of(chunk, records):
                for timer in timers:
                    kind = "in state: " + timer.kind
                    timer_kinds[kind] = timer_kinds.get(kind, 0) + 1
        return {
            "customers_in_state": len(keys),
            **{f"{kind}_bytes_per_customer": b / len(keys) for kind, b in breakdown.items()},
            **{f"{kind}_timers_per_customer": n / len(keys) for kind, n in timer_kinds.items()},
            "state_key_bytes": float(np.mean(state)),
            "profile_key_bytes": float(np.mean(profile)),
            "total_bytes": float(np.mean(state) + np.mean(profile)),
            "redis_used_memory_per_customer": client.info("memory")["used_memory"] / len(keys),
            "flow_events_per_s": events / flow_seconds,
        }


def key_memory_by_kind(client: Any, prefix: str) -> dict[str, int]:
    """``MEMORY USAGE`` of every key, summed by kind: the suffix of a customer key
    (``s`` state, ``p`` profile, ``o`` open orders) or the name after the prefix
    (``timers``, ``progress``, ``customers``, ...)."""
    totals: dict[str, int] = {}
    keys = [k.decode() for k in client.scan_iter(f"{prefix}:*", count=1000)]
    for start in range(0, len(keys), 1000):
        chunk = keys[start : start + 1000]
        pipe = client.pipeline(transaction=False)
        for key in chunk:
            pipe.memory_usage(key, samples=0)
        for key, used in zip(chunk, pipe.execute(), strict=True):
            rest = key[len(prefix) + 1 :]
            kind = rest.rsplit(":", 1)[1] if rest.startswith("{") else rest.split(":", 1)[0]
            totals[kind] = totals.get(kind, 0) + int(used or 0)
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--interpreted-events", type=int, default=20_000)
    parser.add_argument("--customers", type=int, default=20_000)
    parser.add_argument("--sample", type=int, default=2000)
    parser.add_argument("--kernels-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--memory-only", action="store_true", help="only the Redis bytes per customer"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/state.json"))
    args = parser.parse_args()
    config = load_config()
    if args.kernels_only:  # the interpreted half, in a NUMBA_DISABLE_JIT subprocess
        print(orjson.dumps(time_kernels(config, args.events, args.customers)).decode())
        return
    console = Console()
    if args.memory_only:
        console.print(f"flow + Redis bytes per customer over {args.events:,} events ...")
        memory = bytes_per_customer(config, args.events, args.customers, args.sample)
        table = Table(title="Redis bytes per customer")
        table.add_column("measure")
        table.add_column("value", justify="right")
        table.add_row("binary state layout, bytes", f"{STATE_BYTES}")
        for key, value in memory.items():
            table.add_row(key.replace("_", " "), f"{value:,.2f}" if value < 10 else f"{value:,.0f}")
        console.print(table)
        return
    console.print(f"kernels: compiled over {args.events:,} events ...")
    jit_n, jit_s = time_kernels(config, args.events, args.customers)
    console.print(f"kernels: interpreted over {args.interpreted_events:,} events ...")
    env = {**os.environ, "NUMBA_DISABLE_JIT": "1"}
    raw = subprocess.run(
        [
            sys.executable,
            "-m",
            "crmstream.bench.state_bench",
            "--kernels-only",
            "--events",
            str(args.interpreted_events),
            "--customers",
            str(args.customers),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    py_n, py_s = orjson.loads(raw.strip().splitlines()[-1])
    console.print(f"flow + Redis bytes per customer over {args.events:,} events ...")
    memory = bytes_per_customer(config, args.events, args.customers, args.sample)

    jit_rate, py_rate = jit_n / jit_s, py_n / py_s
    table = Table(title="state model benchmark")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_row("kernels compiled (apply + derive), events/s", f"{jit_rate:,.0f}")
    table.add_row("kernels interpreted (same code), events/s", f"{py_rate:,.0f}")
    table.add_row("speed-up", f"{jit_rate / py_rate:,.1f}x")
    table.add_row("binary state layout, bytes", f"{STATE_BYTES}")
    for key, value in memory.items():
        table.add_row(key.replace("_", " "), f"{value:,.2f}" if value < 10 else f"{value:,.0f}")
    console.print(table)
    result = {
        "kernel_compiled_events_per_s": jit_rate,
        "kernel_interpreted_events_per_s": py_rate,
        "speedup": jit_rate / py_rate,
        "state_layout_bytes": STATE_BYTES,
        **memory,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
