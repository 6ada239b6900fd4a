"""Helpers for the fault suites: the flow as a real child process, and run comparisons."""

from __future__ import annotations

import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
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
    """``crmstream run``; ``args`` may include ``--until-end`` or ``--no-until-end``."""
    if "--no-until-end" not in args:
        args = ("--until-end", *args)
    cmd = [CRMSTREAM, "run", *args]
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


class Server:
    """A dedicated redis-server or Tansu broker for one fault test, restartable in place."""

    def __init__(self, kind: str, workdir: Path, *extra: str, below: int = 65536):
        from crmstream.embedded import free_port

        self.kind = kind
        self.port = free_port()
        while self.port >= below:  # e.g. a cluster node needs port + 10000 for its bus
            self.port = free_port()
        self.workdir = workdir
        self.extra = extra
        self.proc: subprocess.Popen[bytes] | None = None

    def args(self) -> list[str]:
        from crmstream.embedded import redis_args, tansu_args

        if self.kind == "redis":
            return redis_args(self.port, self.workdir, True, *self.extra)
        return tansu_args(self.port)

    def start(self) -> Server:
        from crmstream.embedded import spawn, wait_for_port

        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = spawn(self.args(), self.workdir / f"{self.kind}.log")
        wait_for_port(self.port, self.proc, self.kind, 30)
        return self

    def stop(self) -> None:
        from crmstream.embedded import stop_process

        if self.proc is not None:
            if self.proc.poll() is None:
                os.kill(self.proc.pid, signal.SIGCONT)  # a frozen process cannot stop
            stop_process(self.proc)
            self.proc = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def rss_mb(pid: int) -> float:
    """Resident set size of a process (Linux /proc), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def committed(client: Any, prefix: str) -> int:
    """Input messages applied so far: per partition, the furthest shard's next offset."""
    from crmstream.state.store import Progress

    furthest: dict[bytes, int] = {}
    # SCAN's default count of 10 took 250 ms over 10k keys: the crash test's kills then
    # landed tens of thousands of events after their points (4 kills instead of 5).
    for key in client.scan_iter(match=f"{prefix}:progress:*", count=10_000):
        for field, value in client.hgetall(key).items():
            offset = Progress.decode(value).offset + 1
            furthest[field] = max(furthest.get(field, 0), offset)
    return sum(furthest.values())


def wait_until(condition: Any, timeout_s: float, what: str, interval_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")
        time.sleep(interval_s)


class TransactionFaultProxy:
    """A TCP relay in front of a redis-server that can break one transaction's connection.

    ``lose_next("reply")``: the next ``EXEC`` goes on to Redis; once Redis answers
    (the transaction has run) the answer is thrown away and the client's
    connection closed. The client sees the connection lost without knowing
    whether its transaction ran. ``lose_next("request")``: the data holding the
    next ``EXEC`` is not passed on and the connection is closed, so Redis never
    runs that transaction. Everything else is relayed as is; ``lost`` counts the
    faults made.
    """

    def __init__(self, target: str):
        host, _, port = target.rpartition(":")
        self._target = (host, int(port))
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.address = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._armed: str | None = None
        self.lost = 0
        self._lock = threading.Lock()
        self._open: list[socket.socket] = []

    def start(self) -> TransactionFaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def lose_next(self, what: str) -> None:
        assert what in ("reply", "request"), what
        with self._lock:
            self._armed = what

    def close(self) -> None:
        self._listener.close()
        with self._lock:
            for sock in self._open:
                with suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self._target)
            with self._lock:
                self._open += [client, server]
            threading.Thread(target=self._relay, args=(client, server), daemon=True).start()

    def _relay(self, client: socket.socket, server: socket.socket) -> None:
        selector = selectors.DefaultSelector()
        selector.register(client, selectors.EVENT_READ)
        selector.register(server, selectors.EVENT_READ)
        exec_sent = False
        try:
            while True:
                for key, _ in selector.select():
                    data = key.fileobj.recv(65536)
                    if not data:
                        return
                    if key.fileobj is client:
                        with self._lock:
                            fault, armed = None, self._armed
                            if armed and b"EXEC\r\n" in data:
                                fault, self._armed = armed, None
                        if fault == "request":
                            self.lost += 1
                            return
                        exec_sent = exec_sent or fault == "reply"
                        server.sendall(data)
                    elif exec_sent:  # Redis has run the transaction: lose its answer
                        self.lost += 1
                        return
                    else:
                        client.sendall(data)
        except OSError:
            return
        finally:
            selector.close()
            client.close()
            server.close()
