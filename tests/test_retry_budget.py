"""The flow's Redis client gives up within its retry budget, whatever the outage: a
frozen Redis (connections accepted, nothing answered) made every attempt wait the socket
timeout, and redis-py's health check of an idle connection retried inside each attempt:
a call was still retrying after 20 minutes (bench/retry_budget.py)."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import redis

from crmstream.config import load_config
from crmstream.state.store import connect
from tests.faults import Server

pytestmark = pytest.mark.integration


def test_a_frozen_redis_ends_the_call_once_the_budget_is_spent(tmp_path):
    config = load_config(overrides=["redis.retry_attempts=1000", "redis.socket_timeout_seconds=0.5",
                                    "redis.retry_budget_seconds=2"], env={})  # fmt: skip
    server = Server("redis", tmp_path / "redis").start()
    try:
        client = connect(f"redis://{server.address}/0", config.redis)
        assert client.connection_pool.connection_kwargs["health_check_interval"] == 0
        client.set("k", 1)
        os.kill(server.proc.pid, signal.SIGSTOP)
        client.connection_pool.disconnect()
        outcome: list[BaseException | None] = []

        def call() -> None:
            try:
                client.get("k")
                outcome.append(None)
            except BaseException as exc:
                outcome.append(exc)

        worker = threading.Thread(target=call, daemon=True)
        worker.start()
        worker.join(120)  # 1,000 attempts of 0.5 s would take over 8 minutes
        assert outcome, "the call was still retrying"
        assert isinstance(outcome[0], redis.TimeoutError), outcome
    finally:
        server.stop()
