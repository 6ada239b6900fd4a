"""What native code writes to stderr while the flow runs, turned into log records.

This module owns file descriptor 2 while a dataflow runs. Bytewax (Rust) writes
straight to it: a panic message for every exception raised inside a step
("thread '<unnamed>' panicked at src/operators.rs ...", with a whole backtrace
when ``RUST_BACKTRACE`` is set) and timely's connection retries ("worker 1:
error connecting to worker 0 ..."). Those bypass Python's logging, so they
would break the one-line error report and the JSON log format.

``native_stderr_as_logs`` points fd 2 at a pipe for the duration of a block,
and Python's own ``sys.stderr`` at a copy of the original fd, so Python output
is untouched. A thread reads the pipe: a Rust panic report becomes one DEBUG
record of the ``bytewax`` logger (the exception it reports reaches the caller,
which reports it in one line), and every other line one WARNING record of it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import sys
import threading
from collections.abc import Iterator

log = logging.getLogger("bytewax")

_PANIC_START = re.compile(r"^thread '.*' panicked at ")
# What follows a panic's first line and its message: the backtrace and Rust's notes.
_PANIC_REST = re.compile(r"^(\s+\d+: |\s+at |stack backtrace:|note: )")


class _Forwarder:
    def __init__(self, read_fd: int):
        self._file = open(read_fd, encoding="utf-8", errors="replace", closefd=True)  # noqa: SIM115
        self.thread = threading.Thread(target=self._run, name="crmstream-stderr", daemon=True)

    def _run(self) -> None:
        panic: list[str] = []
        for raw in self._file:
            line = raw.rstrip("\n")
            if _PANIC_START.match(line):
                self._flush_panic(panic)
                panic = [line]
            elif panic and (len(panic) == 1 or _PANIC_REST.match(line)) and len(panic) < 400:
                panic.append(line)
            else:
                self._flush_panic(panic)
                panic = []
                if line.strip():
                    log.warning("%s", line)
        self._flush_panic(panic)
        self._file.close()

    @staticmethod
    def _flush_panic(lines: list[str]) -> None:
        if lines:
            log.debug("Bytewax reported a panic (the error follows): %s", " | ".join(lines[:3]))


@contextlib.contextmanager
def native_stderr_as_logs() -> Iterator[None]:
    """Within the block, lines native code writes to fd 2 become log records."""
    try:
        sys.stderr.flush()
        original = os.dup(2)
    except (OSError, AttributeError, ValueError):  # no real fd 2 (e.g. a test runner)
        yield
        return
    read_fd, write_fd = os.pipe()
    python_stderr = sys.stderr
    sys.stderr = io.TextIOWrapper(
        io.FileIO(os.dup(original), "w", closefd=True), encoding="utf-8", line_buffering=True
    )
    os.dup2(write_fd, 2)
    os.close(write_fd)
    forwarder = _Forwarder(read_fd)
    forwarder.thread.start()
    try:
        yield
    finally:
        with contextlib.suppress(OSError, ValueError):
            sys.stderr.flush()
        os.dup2(original, 2)  # closes the pipe's last write end: the forwarder ends
        forwarder.thread.join(5)
        replaced, sys.stderr = sys.stderr, python_stderr
        with contextlib.suppress(OSError, ValueError):
            replaced.close()
        os.close(original)
