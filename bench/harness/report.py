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

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "harness.json").write_text(orjson.dumps(results, option=orjson.OPT_INDENT_2).decode())
    for run in results["runs"]:
        table = Table(title=f"{run['customers']:,} customers, {run['events']:,} events")
        for col in (
            "contender",
            "events/s",
            RUNS_COLUMN,
            "ratio to ceiling",
            "peak RSS MiB/proc",
            "state B/customer",
            CPU_COLUMN,
        ):
            table.add_column(col, justify="right")
        for c in run["contenders"]:
            table.add_row(
                c["name"],
                f"{c['events_per_s']:,}",
                _runs_cell(c),
                f"{c['ratio_to_ceiling']:.3f}",
                ",".join(map(str, c["peak_rss_mb"])),
                str(c["state_bytes_per_customer"] or "-"),
                _cpu_cell(c.get("cpu_pct")) or "-",
            )
        console.print(table)
        console.print(f"ratios: {run['ratios']}")
        if run.get("latency"):
            lat = Table(title="event-to-trigger latency under offered load")
            for col in LATENCY_COLUMNS:
                lat.add_column(col, justify="right")
            for r in run["latency"]:
                lat.add_row(*_latency_cells(r))
            console.print(lat)
    plot(results, out / "harness.png")
    console.print(f"wrote {out / 'harness.json'} and {out / 'harness.png'}")
    if not args.smoke and args.results:
        write_results_md(results, Path(args.results))
        shutil.copyfile(out / "harness.png", Path(args.results).with_name("harness.png"))
        console.print(f"updated {args.results} and bench/harness.png")


def _cpu_cell(cpu: dict[str, Any] | None) -> str:
    if not cpu:
        return ""
    procs = "+".join(map(str, cpu["processes"]))
    rest = " / ".join(str(cpu.get(k, "-")) for k in ("broker", "redis", "idle"))
    return f"{procs} / {rest}"


RESULTS_START, RESULTS_END = "<!-- harness:start -->", "<!-- harness:end -->"
RUNS_COLUMN = "events/s of each run"
RUNS_NOTE = (
    "The ceiling and crmstream rows are each contender's median run of those listed "
    "(taken in turn: ceiling, crmstream, ceiling with 2 processes, crmstream with 2, "
    "then again); the ratios are those of the median runs. The naive baseline and Quix "
    "Streams run once."
)
CPU_COLUMN = "CPU % processes / broker / redis / idle"
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
    "CPU % contender / broker / generator",
)
LATENCY_NOTE = (
    "The kafka floor is a raw consumer that only reads each event's time: its p50/p99 "
    "are over every input event, what the broker and the shared machine add before any "
    "processing. CPU is in % of one core over the sending window (the machine has "
    f"{os.cpu_count()} cores)."
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
        " / ".join(str(cpu.get(k, "-")) for k in ("contender", "broker", "generator")),
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
        lines += [
            f"| contender | events/s | {RUNS_COLUMN} | ratio to ceiling | peak RSS MiB/proc "
            f"| state B/customer | {CPU_COLUMN} |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in run["contenders"]:
            rss = ", ".join(map(str, c["peak_rss_mb"]))
            lines.append(
                f"| {c['name']} | {c['events_per_s']:,} | {_runs_cell(c)} | "
                f"{c['ratio_to_ceiling']:.3f} | {rss} | {c['state_bytes_per_customer'] or ''} "
                f"| {_cpu_cell(c.get('cpu_pct'))} |"
            )
        lines += ["", f"Ratios: {run['ratios']}", ""]
        if any(len(c.get("runs_events_per_s", [])) > 1 for c in run["contenders"]):
            lines += [RUNS_NOTE, ""]
        lines.append(CPU_NOTE)
        if run.get("latency"):
            lines += [
                "",
                "| " + " | ".join(LATENCY_COLUMNS) + " |",
                "|---|" + "---:|" * (len(LATENCY_COLUMNS) - 1),
            ]
            lines += ["| " + " | ".join(_latency_cells(r)) + " |" for r in run["latency"]]
            linger = results.get("generator_linger_ms", "?")
            lines += [
                "",
                f"{LATENCY_NOTE} The live generator's producer lingers {linger} ms "
                "(bench/README.md); that wait counts as latency.",
            ]
    lines.append(RESULTS_END)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join(lines)
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        text = head + block + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)
