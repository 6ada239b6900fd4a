"""The customer step alone, on recorded inputs: its CPU per event, tree against tree.

``python -m crmstream.bench.step_replay record FILE [flow_bench options]`` runs
``flow_bench`` and pickles every input the customer step (``CustomerStep.run``) gets,
with the step's configuration and parameters. ``python -m crmstream.bench.step_replay
replay FILE [--rounds N]`` runs the customer step of the current tree over those inputs
``N`` times and prints its process CPU per event for each round (``--calls``: and
the Python function calls one round makes, a count that load does not move). No Kafka, no Redis, no
other work in the process: two trees (``git worktree``) replaying one recording in
alternation compare the step's own code on identical input (bench/RESULTS.md, "Issue
38, round 1"). A recording is only read by a tree whose step input types match it.
"""

from __future__ import annotations

import argparse
import gc
import pickle
import runpy
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from crmstream.operators.customer_step import CustomerStep


def record(path: Path, flow_bench_args: list[str]) -> None:
    recorded: list[tuple[Any, Any, bytes]] = []
    run = CustomerStep.run

    def recording(self: CustomerStep, step: Any) -> Any:
        recorded.append((self._config, self._params, pickle.dumps(step, protocol=5)))
        return run(self, step)

    CustomerStep.run = recording  # type: ignore[method-assign]
    sys.argv = ["flow_bench", *flow_bench_args]
    try:
        runpy.run_module("crmstream.bench.flow_bench", run_name="__main__")
    finally:
        CustomerStep.run = run  # type: ignore[method-assign]
        path.write_bytes(pickle.dumps(recorded, protocol=5))
        print(f"recorded {len(recorded)} customer steps to {path}")


def replay(path: Path, rounds: int, calls: bool = False) -> list[float]:
    from crmstream.operators.kernels import warm_up

    recorded = pickle.loads(path.read_bytes())
    config, params, _ = recorded[0]
    warm_up(config)
    owner = CustomerStep(config, params)
    blobs = [blob for _, _, blob in recorded]
    events = sum(len(pickle.loads(blob).events) for blob in blobs)
    per_event: list[float] = []
    for _ in range(rounds):
        inputs = [pickle.loads(blob) for blob in blobs]  # the step updates its records
        gc.collect()
        started = time.process_time()
        for step in inputs:
            owner.run(step)
        per_event.append((time.process_time() - started) * 1e6 / events)
    if calls:  # one more round, counting the Python function calls it makes
        import cProfile
        import pstats

        inputs = [pickle.loads(blob) for blob in blobs]
        profile = cProfile.Profile()
        profile.enable()
        for step in inputs:
            owner.run(step)
        profile.disable()
        print(f"customer step: {pstats.Stats(profile).total_calls:,} Python function calls "
              f"over the recording ({events:,} events)")  # fmt: skip
    print(
        f"customer step: {events:,} events in {len(blobs)} steps; CPU µs/event per round: "
        + ", ".join(f"{p:.2f}" for p in per_event)
        + f"; median {statistics.median(per_event):.2f}"
    )
    return per_event


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    rec = sub.add_parser("record", help="run flow_bench, pickling the customer step's inputs")
    rec.add_argument("file", type=Path)
    rep = sub.add_parser("replay", help="the customer step's CPU per event on a recording")
    rep.add_argument("file", type=Path)
    rep.add_argument("--rounds", type=int, default=5)
    rep.add_argument("--calls", action="store_true", help="also count its Python calls")
    args, rest = parser.parse_known_args()
    if args.command == "record":
        record(args.file, rest)
    else:
        if rest:
            parser.error(f"unknown arguments: {rest}")
        replay(args.file, args.rounds, args.calls)


if __name__ == "__main__":
    main()
