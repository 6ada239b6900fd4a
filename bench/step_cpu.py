"""The shard step's own CPU per event, in a ``flow_bench`` run.

``python -m crmstream.bench.step_cpu [flow_bench options]`` runs ``flow_bench`` with
its options and adds one line: the CPU time (of the thread that runs it) spent in the
shard step's computing (``StepWork.compute``: the checks, the customer step, the
policies, the records) and in the customer step alone (``CustomerStep.run``), per
event the customer step was given. Thread CPU time, not wall time: waiting for the
CPU does not count, so two trees can be compared on a shared machine by alternating
runs (bench/RESULTS.md, "Issue 38, round 1").
"""

from __future__ import annotations

import runpy
import sys
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from crmstream.flows.step_work import StepWork
from crmstream.operators.customer_step import CustomerStep

_spent: Counter = Counter()


def _timed(method: Callable[..., Any], name: str) -> Callable[..., Any]:
    def timed(*args: Any, **kwargs: Any) -> Any:
        started = time.thread_time()
        try:
            return method(*args, **kwargs)
        finally:
            _spent[name] += time.thread_time() - started

    return timed


def _counted(run: Callable[..., Any]) -> Callable[..., Any]:
    def counted(self: CustomerStep, step: Any) -> Any:
        _spent["events"] += len(step.events)
        return run(self, step)

    return counted


def main() -> None:
    StepWork.compute = _timed(StepWork.compute, "compute")  # type: ignore[method-assign]
    CustomerStep.run = _timed(_counted(CustomerStep.run), "customer_step")  # type: ignore
    sys.argv = ["flow_bench", *sys.argv[1:]]
    try:
        runpy.run_module("crmstream.bench.flow_bench", run_name="__main__")
    finally:
        events = _spent["events"] or 1
        print(
            f"step CPU per event ({_spent['events']:,} events): "
            f"StepWork.compute {_spent['compute'] * 1e6 / events:.2f} µs, "
            f"CustomerStep.run {_spent['customer_step'] * 1e6 / events:.2f} µs"
        )


if __name__ == "__main__":
    main()
