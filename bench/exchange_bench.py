"""Exchange benchmark: what a shard's items cost to send to another worker process.

With two or more processes, Bytewax pickles each ``stateful_batch`` item whose
shard runs on another process, and unpickles it there. This module builds the
items ``route_batch`` makes from a recorded shop workload and times, in the same
process and over the same items:

1. the items pickled as they were before round 12: events as namedtuples, which
   pickle writes as a class call per instance;
2. the items as sent now (``ShardBatch.__reduce__``): events as plain tuples,
   turned back into ``ParsedEvent`` on load.

It checks that both give back equal items and reports microseconds per event to
dump and to load, and the ratio (``make bench-exchange``). Whether events
cross processes at all depends on the producers' partitioner: see
bench/RESULTS.md, round 12.
"""

from __future__ import annotations

import argparse
import pickle
import timeit
from pathlib import Path
from types import SimpleNamespace

import orjson
from rich.console import Console
from rich.table import Table

from crmstream.bench.workload import recorded_messages
from crmstream.config import load_config
from crmstream.flows.routing import shard_keys
from crmstream.flows.shard import ShardBatch, route_batch
from crmstream.flows.source import RawMessage
from crmstream.operators.events import EventValidator

NOW_MS = 4_000_000_000_000  # after every generated event time


def _as_namedtuples(item: ShardBatch) -> tuple:
    """The item's fields in a plain tuple, events left as namedtuples: the old pickle."""
    return tuple(item)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--batch", type=int, default=2000, help="messages per read batch")
    parser.add_argument("--repeat", type=int, default=5, help="best of this many passes")
    parser.add_argument("--out", type=Path, default=Path("bench/out/exchange.json"))
    args = parser.parse_args()
    console = Console()
    config = load_config(None, [], env={})
    console.print(f"building {args.events:,} events for {args.customers:,} customers ...")
    messages = [
        RawMessage(m.key, m.value, m.topic, 0, m.offset, NOW_MS, 0)
        for m in recorded_messages(config, args.customers, args.events)
    ]
    runtime = SimpleNamespace(
        config=config, validator=EventValidator(config), clock_ms=lambda: NOW_MS
    )
    keys = shard_keys(config.processing.shards, 1)
    items = [
        item
        for start in range(0, len(messages), args.batch)
        for _key, item in route_batch(runtime, messages[start : start + args.batch], keys)
    ]
    events = sum(len(item.events) for item in items)
    old = [_as_namedtuples(item) for item in items]
    new_bytes = [pickle.dumps(item) for item in items]
    if [pickle.loads(b) for b in new_bytes] != items:
        raise SystemExit("an item came back different from what was pickled")

    def best(stmt) -> float:
        return min(timeit.repeat(stmt, number=1, repeat=args.repeat)) / events * 1e6

    old_bytes = [pickle.dumps(item) for item in old]
    rows = {
        "namedtuples (before)": (
            best(lambda: [pickle.dumps(item) for item in old]),
            best(lambda: [pickle.loads(b) for b in old_bytes]),
        ),
        "plain tuples (ShardBatch.__reduce__)": (
            best(lambda: [pickle.dumps(item) for item in items]),
            best(lambda: [pickle.loads(b) for b in new_bytes]),
        ),
    }
    table = Table(title=f"{events:,} events in {len(items):,} items, µs per event")
    for col in ("pickled as", "dump", "load", "both"):
        table.add_column(col, justify="right")
    for name, (dump, load) in rows.items():
        table.add_row(name, f"{dump:.2f}", f"{load:.2f}", f"{dump + load:.2f}")
    console.print(table)
    before, after = (sum(v) for v in rows.values())
    console.print(f"ratio before/after, dump + load: {before / after:.2f}×")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_bytes(
        orjson.dumps(
            {
                "events": events,
                "items": len(items),
                "us_per_event": {k: {"dump": d, "load": lo} for k, (d, lo) in rows.items()},
                "ratio": before / after,
            },
            option=orjson.OPT_INDENT_2,
        )
    )


if __name__ == "__main__":
    main()
