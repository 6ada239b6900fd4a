"""How long the flow's Redis client keeps retrying before it gives up: the retry budget.

Measures, against a real redis-server, the time from the first failure of a call
(``StateStore``'s client, built by ``state.store.connect`` with the configured
``redis.retry_*`` settings) to the error that ends the flow, in two outages:

- ``stopped``: redis-server is not running (a restart, a crash): every attempt is
  refused at once, so the budget is the sum of the jittered backoffs;
- ``frozen``: redis-server accepts connections and answers nothing (SIGSTOP, a
  hung host): every attempt waits ``redis.socket_timeout_seconds``.

    python -m crmstream.bench.retry_budget [--runs 5] [--frozen]

docs/guarantees.md quotes the figures.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

import redis

from crmstream.config import load_config
from crmstream.state.store import connect


def _server(workdir: Path):
    from crmstream.embedded import free_port, redis_args, spawn, wait_for_port

    port = free_port()
    proc = spawn(redis_args(port, workdir), workdir / "redis.log")
    wait_for_port(port, proc, "redis-server", 30)
    return proc, f"redis://127.0.0.1:{port}/0"


def measure(kind: str, sets: list[str]) -> float:
    """Seconds from the outage to the call's final error."""
    from crmstream.embedded import stop_process

    config = load_config(overrides=sets, env={})
    with tempfile.TemporaryDirectory() as tmp:
        proc, url = _server(Path(tmp))
        client = connect(url, config.redis)
        client.set("budget", 1)
        try:
            if kind == "stopped":
                stop_process(proc)
            else:
                os.kill(proc.pid, signal.SIGSTOP)
            client.connection_pool.disconnect()  # the next call opens a new connection
            started = time.monotonic()
            try:
                client.get("budget")
            except redis.RedisError:
                return time.monotonic() - started
            raise SystemExit(f"{kind}: the call succeeded during the outage")
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGCONT)
                stop_process(proc)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--frozen", action="store_true", help="also a frozen server (minutes)")
    parser.add_argument("--set", action="append", default=[], help="config override")
    args = parser.parse_args()
    logging.getLogger("crmstream.state.store").setLevel(logging.ERROR)  # a line per retry
    config = load_config(overrides=args.set, env={}).redis
    print(
        f"redis.retry_attempts={config.retry_attempts} retry_base_seconds="
        f"{config.retry_base_seconds} retry_max_seconds={config.retry_max_seconds} "
        f"socket_timeout_seconds={config.socket_timeout_seconds}"
    )
    kinds = ["stopped"] + (["frozen"] if args.frozen else [])
    for kind in kinds:
        runs = args.runs if kind == "stopped" else 1
        seconds = [measure(kind, args.set) for _ in range(runs)]
        print(
            f"{kind}: gave up after {min(seconds):.1f} / {statistics.median(seconds):.1f} / "
            f"{max(seconds):.1f} s (min / median / max of {runs})"
        )


if __name__ == "__main__":
    main()
