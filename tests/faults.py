"""Helpers for the fault suites: the flow as a real child process, and run comparisons."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from crmstream.config.schema import TopicsConfig
from crmstream.flows.runtime import Endpoints

CRMSTREAM = str(Path(sys.executable).with_name("crmstream"))


def run_sets(stack: Endpoints, inputs: str, outputs: str, prefix: str, *extra: str) -> list[str]:
    """``--set`` overrides for a run reading ``inputs``.* topics and writing ``outputs``.*."""
    sets = []
    for role in TopicsConfig.model_fields:
        tag = inputs if role in ("clickstream", "orders", "customers", "feedback") else outputs
        sets.append(f"kafka.topics.{role}={tag}.{role}")
    sets += [
        f"kafka.brokers={','.join(stack.brokers)}",
        f"redis.url={stack.redis_url}",
        f"redis.key_prefix={prefix}",
        "metrics.enabled=false",
        *extra,
    ]
    return sets


def flow_command(sets: list[str], *args: str) -> list[str]:
    cmd = [CRMSTREAM, "run", "--until-end", *args]
    for s in sets:
        cmd += ["--set", s]
    return cmd


@contextmanager
def flow_process(sets: list[str], log: Path, *args: str) -> Iterator[subprocess.Popen[Any]]:
    """``crmstream run --until-end`` as a child process; killed if still running at exit."""
    with log.open("ab") as out:
        proc = subprocess.Popen(
            flow_command(sets, *args), stdout=out, stderr=subprocess.STDOUT, env=dict(os.environ)
        )
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()


def run_to_end(sets: list[str], log: Path, timeout_s: float = 600, *args: str) -> float:
    """Run the flow to the end of its input; returns the seconds it took."""
    started = time.monotonic()
    with flow_process(sets, log, *args) as proc:
        rc = proc.wait(timeout=timeout_s)
    assert rc == 0, f"flow exited with {rc}; log: {log.read_text()[-3000:]}"
    return time.monotonic() - started


def ids_of(records: list[dict[str, Any]], key: str = "trigger_id") -> list[str]:
    return [r[key] for r in records]
