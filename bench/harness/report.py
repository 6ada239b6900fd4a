"""The harness's report: the printed tables, ``harness.json`` and RESULTS.md's section.

This module owns how a harness run is shown: the throughput and latency
tables (printed with rich and written as Markdown between the
``<!-- harness:start -->`` and ``<!-- harness:end -->`` markers of
bench/RESULTS.md, leaving the rest of the file alone) and the notes that say
how to read them.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import orjson

from crmstream.bench.harness.plot import plot


def write(results: dict[str, Any], args: Any, console: Any) -> None:
    """Print the tables, write ``<out>/harness.json`` and the plot, and (unless smoke)
    the harness section of RESULTS.md and ``bench/harness.png``."""
    from rich.table import Table

    def show(title: str, columns: tuple[str, ...], rows: list[list[str]]) -> None:
        table = Table(title=title)
        for col in columns:
            table.add_column(col, justify="right")
        for row in rows:
            table.add_row(*row)
        console.print(table)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "harness.json").write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    for run in results["runs"]:
        title = f"{run['customers']:,} customers, {run['events']:,} events"
        show(title, THROUGHPUT_COLUMNS, [_throughput_cells(c) for c in run["contenders"]])
        console.print(f"ratios: {run['ratios']}")
        for name, rows in _shard_tables(run):
            show(name, SHARD_COLUMNS, rows)
        if run.get("hot_key"):
            hot = run["hot_key"]
            rows = [_throughput_cells(c) for c in hot["contenders"]]
            show(f"hot-key stress ({HOT_KEY_WORDS})", THROUGHPUT_COLUMNS, rows)
            console.print(f"hot-key ratios: {hot['ratios']}")
        if run.get("latency"):
            rows = [_latency_cells(r) for r in run["latency"]]
            show("event-to-trigger latency under offered load", LATENCY_COLUMNS, rows)
    for name, why in results.get("left_out", {}).items():
        console.print(f"[red]{name} left out: {why}[/]")
    plot(results, out / "harness.png")
    console.print(f"wrote {out / 'harness.json'} and {out / 'harness.png'}")
    if not args.smoke and args.results:
        write_results_md(results, Path(args.results))
        shutil.copyfile(out / "harness.png", Path(args.results).with_name("harness.png"))
        console.print(f"updated {args.results} and bench/harness.png")


THROUGHPUT_COLUMNS = (
    "contender",
    "events/s",
    "events/s of each run",
    "ratio to ceiling",
    "CPU µs/event",
    "peak RSS MiB/proc",
    "state B/customer",
    "CPU % processes / broker / redis / idle",
)
SHARD_COLUMNS = ("shard", "own events", "50 % applied after s", "90 %", "all")
HOT_KEY_WORDS = (
    "Zipf 1.1 customer activity, the busiest of 100k customers holding 13.5 % of the "
    "sessions; reported, not a target"
)


def _throughput_cells(c: dict[str, Any]) -> list[str]:
    """One contender's row of a throughput table, as text (printed and RESULTS.md)."""
    ratio = f"{c['ratio_to_ceiling']:.3f}"
    if c.get("ceiling") and "thread" in c["name"]:
        ratio += f" (to {c['ceiling']})"
    cpu_us = c.get("cpu_us_per_event")
    return [
        c["name"],
        f"{c['events_per_s']:,}",
        _runs_cell(c),
        ratio,
        "-" if cpu_us is None else f"{cpu_us:.1f}",
        ", ".join(map(str, c["peak_rss_mb"])),
        str(c["state_bytes_per_customer"] or "-"),
        _cpu_cell(c.get("cpu_pct")) or "-",
    ]


def _shard_cells(shard: dict[str, Any]) -> list[str]:
    marks = [shard["seconds_to"][m] for m in ("50%", "90%", "100%")]
    return [
        str(shard["shard"]),
        f"{shard['own_events']:,}",
        *("-" if m is None else str(m) for m in marks),
    ]


def _shard_tables(run: dict[str, Any]) -> list[tuple[str, list[list[str]]]]:
    """Each shard's progress over its own input in the 2-process crmstream runs: the
    calibrated workload's first run and the hot-key one's."""
    tables = []
    sources = [("calibrated workload", run)]
    if run.get("hot_key"):
        sources.append(("hot-key workload", run["hot_key"]))
    for label, source in sources:
        for c in source["contenders"]:
            if c.get("shards"):
                rows = [_shard_cells(one) for one in c["shards"]]
                tables.append((f"{c['name']}, {label}: each shard's own input", rows))
    return tables


def _cpu_cell(cpu: dict[str, Any] | None) -> str:
    if not cpu:
        return ""
    procs = "+".join(map(str, cpu["processes"]))
    rest = " / ".join(str(cpu.get(k, "-")) for k in ("broker", "redis", "idle"))
    return f"{procs} / {rest}"


RESULTS_START, RESULTS_END = "<!-- harness:start -->", "<!-- harness:end -->"
RUNS_NOTE = (
    "The ceiling, crmstream and Pathway rows are each contender's median run of those "
    "listed (taken in turn: ceiling, crmstream, ceiling with 2 processes, crmstream with 2, "
    "Pathway with 1 and 2 threads, then again); the ratios are those of the median runs. "
    "Pathway with 2 threads is compared with the 2-process ceiling. The naive baseline and "
    "Quix Streams run once. CPU µs/event: every process's CPU time (user + system, all "
    "threads) over its timed window, per event."
)
CPU_NOTE = (
    "CPU is in % of one core: each process's own over its timed window (`+` between "
    "processes), the broker's and redis-server's over the window the rate is timed on, "
    "sampled every 0.05 s; idle is the machine's idle time over that window (all cores "
    f"together: at most {100 * (os.cpu_count() or 1)})."
)
LATENCY_COLUMNS = (
    "contender",
    "offered",
    "events/s",
    "triggers",
    "p50 ms",
    "p99 ms",
    "timers",
    "timer late p50 / p99 / max ms",
    "CPU % contender / broker / generator",
)
LATENCY_NOTE = (
    "The kafka floor is a raw consumer that only reads each event's time: its p50/p99 "
    "are over every input event, what the broker and the shared machine add before any "
    "processing. The other rows' p50/p99 are over the triggers an event caused. "
    "crmstream's cart nudge fell due `--timer-delay-s` after each cart in these runs, so its "
    "timers fell due all through the window; *timer late* is `emitted_at` minus the due "
    "time of each timer's trigger. Pathway's latency is its trigger record's Kafka timestamp "
    "minus the customer's last event time. CPU is in % of one core over the sending window "
    f"(the machine has {os.cpu_count()} cores)."
)


def _runs_cell(contender: dict[str, Any]) -> str:
    """The rates of a contender's runs, when it ran more than once."""
    rates = contender.get("runs_events_per_s", [])
    return "; ".join(f"{r:,}" for r in rates) if len(rates) > 1 else "-"


def _latency_cells(r: dict[str, Any]) -> list[str]:
    """One row of the latency table, as text (the printed table and RESULTS.md)."""
    cpu = r.get("cpu_pct", {})
    return [
        r["contender"],
        f"{r['offered_load']:.0%}",
        f"{r['offered_events_per_s']:,}",
        "-" if r["triggers"] is None else str(r["triggers"]),
        str(r["p50_ms"]),
        str(r["p99_ms"]),
        "-" if r.get("timers") is None else str(r["timers"]),
        "-"
        if not r.get("timers")
        else " / ".join(str(r[f"timer_late_{k}_ms"]) for k in ("p50", "p99", "max")),
        " / ".join(str(cpu.get(k, "-")) for k in ("contender", "broker", "generator")),
    ]


def _md_table(columns: tuple[str, ...], rows: list[list[str]]) -> list[str]:
    return [
        "| " + " | ".join(columns) + " |",
        "|---|" + "---:|" * (len(columns) - 1),
        *("| " + " | ".join(row) + " |" for row in rows),
    ]


def _fetch_words(fetch_bytes: int | None) -> str:
    if fetch_bytes is None:
        return "an unrecorded size"
    if not fetch_bytes:
        return "librdkafka's own 1 MiB"
    return (
        f"{fetch_bytes / (1 << 20):g} MiB" if fetch_bytes % (1 << 10) == 0 else f"{fetch_bytes} B"
    )


def write_results_md(results: dict[str, Any], path: Path) -> None:
    """Replace the harness section of bench/RESULTS.md with this run's tables."""
    lines = [
        RESULTS_START,
        "### Latest harness run (written by the harness)",
        "",
        f"Command: `python -m crmstream.bench.harness {' '.join(sys.argv[1:])}`; "
        f"machine: {results['machine']}; plot: `bench/harness.png`.",
        "",
        f"Every contender's consumer fetched {_fetch_words(results.get('fetch_bytes'))} "
        "per partition (`--fetch-bytes`, bench/README.md).",
    ]
    for run in results["runs"]:
        lines += ["", f"{run['customers']:,} customers, {run['events']:,} events:", ""]
        lines += _md_table(THROUGHPUT_COLUMNS, [_throughput_cells(c) for c in run["contenders"]])
        lines += ["", f"Ratios: {run['ratios']}", ""]
        if any(len(c.get("runs_events_per_s", [])) > 1 for c in run["contenders"]):
            lines += [RUNS_NOTE, ""]
        lines.append(CPU_NOTE)
        if run.get("hot_key"):
            hot = run["hot_key"]
            lines += ["", f"Hot-key stress ({HOT_KEY_WORDS}), each contender once:", ""]
            lines += _md_table(
                THROUGHPUT_COLUMNS, [_throughput_cells(c) for c in hot["contenders"]]
            )
            lines += ["", f"Hot-key ratios: {hot['ratios']}"]
        for name, rows in _shard_tables(run):
            lines += ["", f"{name} (seconds after the later process was ready):", ""]
            lines += _md_table(SHARD_COLUMNS, rows)
        if run.get("latency"):
            latency = [_latency_cells(r) for r in run["latency"]]
            lines += ["", *_md_table(LATENCY_COLUMNS, latency)]
            linger = results.get("generator_linger_ms", "?")
            lines += [
                "",
                f"{LATENCY_NOTE} The live generator's producer lingers {linger} ms "
                "(bench/README.md); that wait counts as latency.",
            ]
    for name, why in results.get("left_out", {}).items():
        lines += ["", f"{name} was left out: {why}"]
    lines.append(RESULTS_END)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join(lines)
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        text = head + block + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
