"""Validation benchmark: the compiled fast path against the checked way, in one run.

This module owns the validator's figures (``make bench-parse``). It builds a
recorded shop workload (malformed messages included) and times, per message
and in the same process, over the same messages:

1. ``orjson.loads`` alone (what any JSON consumer pays);
2. ``EventValidator.parse_checked``: orjson and every check in Python;
3. ``EventValidator.parse``: clickstream, order and customer messages first try
   their msgspec fast paths (``operators/events.py``, ``operators/fast_paths.py``),
   the rest go the checked way.

It reports microseconds per message for each of those topics and for the whole mix,
checks that ``parse`` and ``parse_checked`` give the same result for every
message, and writes bench/out/parse.json. Ratios are the figures to compare;
the machine is shared and noisy.
"""

from __future__ import annotations

import argparse
import timeit
from collections.abc import Callable
from pathlib import Path

import orjson
from rich.console import Console
from rich.table import Table

from crmstream.bench.workload import recorded_messages
from crmstream.config import load_config
from crmstream.operators.events import EventValidator

NOW_MS = 4_000_000_000_000  # after every generated event time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--customers", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=5, help="best of this many passes")
    parser.add_argument("--out", type=Path, default=Path("bench/out/parse.json"))
    args = parser.parse_args()
    console = Console()
    config = load_config(None, [], env={})
    console.print(f"building {args.events:,} events for {args.customers:,} customers ...")
    messages = [
        (m.key, m.value, m.topic, 0, m.offset, 0, NOW_MS)
        for m in recorded_messages(config, args.customers, args.events)
    ]
    topics = config.kafka.topics
    parts = {
        label: [m for m in messages if m[2] == topic]
        for label, topic in (
            ("clickstream", topics.clickstream),
            ("orders", topics.orders),
            ("customers", topics.customers),
        )
    }
    parts["all"] = messages
    validator = EventValidator(config)

    fast = [validator.parse(*m) for m in messages]
    checked = [validator.parse_checked(*m) for m in messages]
    differing = sum(a != b for a, b in zip(fast, checked, strict=True))
    if differing:
        raise SystemExit(f"parse and parse_checked differ on {differing} message(s)")

    def loads(batch: list[tuple]) -> None:
        for m in batch:
            try:  # noqa: SIM105 - a context manager per message would slow the baseline
                orjson.loads(m[1])
            except orjson.JSONDecodeError:
                pass

    def calls(function: Callable) -> Callable[[list[tuple]], None]:
        def run(batch: list[tuple]) -> None:
            for m in batch:
                function(*m)

        return run

    contenders = {  # key in parse.json: (label, runner)
        "loads": ("orjson.loads alone", loads),
        "parse_checked": ("parse_checked (orjson + Python checks)", calls(validator.parse_checked)),
        "parse": ("parse (fast path first)", calls(validator.parse)),
    }
    result: dict[str, object] = {
        "events": len(messages),
        **{label: len(batch) for label, batch in parts.items() if label != "all"},
        "differing": differing,
    }
    table = Table(title=f"validation: {len(messages):,} messages, best of {args.repeat}")
    for col in ("contender", *(f"µs/message, {label}" for label in parts)):
        table.add_column(col, justify="right")
    for key, (name, run) in contenders.items():
        row = []
        for label, batch in parts.items():
            if not batch:
                raise SystemExit(f"the workload has no {label} messages: give more --events")
            best = min(timeit.repeat(lambda b=batch, r=run: r(b), number=1, repeat=args.repeat))
            us = best / len(batch) * 1e6
            result[f"{key}_{label}_us"] = round(us, 3)
            row.append(f"{us:.2f}")
        table.add_row(name, *row)
    console.print(table)
    for label in parts:
        ratio = result[f"parse_checked_{label}_us"] / result[f"parse_{label}_us"]
        result[f"speedup_{label}"] = round(ratio, 2)
        console.print(f"parse_checked / parse ({label}): {ratio:.2f}x")
    console.print(f"parse and parse_checked agree on all {len(messages):,} messages")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(orjson.dumps(result, option=orjson.OPT_INDENT_2).decode())


if __name__ == "__main__":
    main()
