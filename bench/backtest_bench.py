"""A backtest against a plain replay of the same history, in one run.

This module owns the backtest benchmark (``make bench-backtest``). It records a
shop workload to a JSON-lines file (as ``crmstream generate --output`` does),
replays it once through the flow (``flows.replay``: produce, then the flow to
the end of its input), then backtests it with a lower daily cap
(``crmstream.backtest``: produce once, the flow under the base, the flow under
the candidate, both runs' outputs read back, the diff). Each part runs on its
own embedded broker and redis-server, after the kernels are loaded. It reports
each phase's seconds and the flow's events/s in the replay and in each
backtest run, and their ratios: a backtest run is a replay of the history, so
its flow should run at the replay's speed.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from crmstream.backtest import prepare, run_backtest
from crmstream.bench.workload import Workload, WorkloadSpec
from crmstream.config import CrmConfig, load_config
from crmstream.embedded import infrastructure
from crmstream.flows.crm import check_state_layout
from crmstream.flows.replay import file_events, produce_events, run_to_end
from crmstream.flows.runtime import Runtime
from crmstream.operators.kernels import warm_up


def record(config: CrmConfig, path: Path, events: int, customers: int) -> None:
    """``crmstream generate --events N --customers C --output PATH``."""
    workload = Workload(config, WorkloadSpec(customers=customers))
    with path.open("wb") as handle:
        for _, event in zip(range(events), workload.events(), strict=False):
            handle.write(event.value + b"\n")


def replay_once(config: CrmConfig, path: Path) -> dict[str, float]:
    """``crmstream replay PATH``, timed: produce, then the flow to the end."""
    events = list(file_events(path, config))
    with infrastructure(config) as endpoints:
        runtime = Runtime(config, endpoints)
        try:
            check_state_layout(runtime)
            started = time.monotonic()
            produce_events(endpoints, config, events, None)
            produced = time.monotonic()
            run_to_end(runtime, len(events), None)
            done = time.monotonic()
        finally:
            runtime.close()
    return {"produce": produced - started, "run": done - produced}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--customers", type=int, default=10_000)
    parser.add_argument("--input", type=Path, help="a recorded history instead of a new one")
    parser.add_argument("--candidate", default="policies:\n  caps:\n    per_day: 2\n",
                        help="the candidate configuration's YAML")  # fmt: skip
    args = parser.parse_args()
    console = Console()
    config = load_config(None, ["metrics.enabled=false"])
    warm_up(config)
    with tempfile.TemporaryDirectory(prefix="crmstream-bt-bench-") as tmp:
        path = args.input or Path(tmp) / "history.jsonl"
        if args.input is None:
            started = time.monotonic()
            record(config, path, args.events, args.customers)
            console.print(f"recorded {args.events:,} events in {time.monotonic() - started:.1f} s")
        n = sum(1 for line in path.open("rb") if line.strip())
        replay = replay_once(config, path)
        candidate = Path(tmp) / "candidate.yaml"
        candidate.write_text(args.candidate)
        setup = prepare(None, candidate, ["metrics.enabled=false"], str(path))
        result = run_backtest(setup, str(path))
    secs = result.seconds
    table = Table(title=f"{n:,} events: a replay and a backtest of them")
    table.add_column("phase")
    for col in ("seconds", "flow events/s", "vs. the replay's flow"):
        table.add_column(col, justify="right")
    rate = n / replay["run"]
    table.add_row("replay: produce", f"{replay['produce']:.1f}", "", "")
    table.add_row("replay: flow", f"{replay['run']:.1f}", f"{rate:,.0f}", "1.00")
    for key, label in (("read_history", "backtest: read the file"),
                       ("produce", "backtest: produce once"),
                       ("run_base", "backtest: flow, base"),
                       ("run_candidate", "backtest: flow, candidate"),
                       ("read_base", "backtest: read base outputs"),
                       ("read_candidate", "backtest: read candidate outputs"),
                       ("compare", "backtest: diff"),
                       ("total", "backtest: total")):  # fmt: skip
        runs = key.startswith("run_")
        table.add_row(label, f"{secs[key]:.1f}", f"{n / secs[key]:,.0f}" if runs else "",
                      f"{(n / secs[key]) / rate:.2f}" if runs else "")  # fmt: skip
    console.print(table)
    total_replay = replay["produce"] + replay["run"]
    console.print(
        f"backtest total / replay total: {secs['total'] / total_replay:.2f}; "
        f"{len(result.changes):,} trigger ids changed; base "
        f"{len(result.base.outcomes):,} and candidate {len(result.candidate.outcomes):,} "
        f"triggers and suppressions"
    )


if __name__ == "__main__":
    main()
