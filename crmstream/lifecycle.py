"""How a flow process stops: signals, the drain and its deadline, and the cluster's drain.

This module owns graceful shutdown of ``crmstream run``:

- ``GracefulStop`` installs handlers for SIGTERM and SIGINT. Without one, a
  process that is PID 1 (a container's entrypoint, a pod's ``exec``) ignores
  SIGTERM, so ``docker stop`` and pod deletion ended in SIGKILL, and Bytewax
  turned SIGINT into a panic and exit 1. The first signal sets the source's
  ``stop`` event: each worker's source stops reading, and at Bytewax's end of
  input every shard applies what it has read, fires the timers due, commits,
  and waits until the broker has acknowledged its outbox
  (``ShardLogic.on_eof``); the command then flushes the producer and exits 0.
  A drain still running after ``processing.drain_timeout_seconds``, or a
  second signal, ends the process with exit code 3: nothing is lost, since
  Redis holds what was committed and the next start resumes from it.
- ``ClusterDrain``: a Bytewax cluster finishes only when every process's input
  has ended, so one process cannot drain alone. The process that gets the
  signal increments ``{prefix}:drain`` in Redis; every process of the cluster
  polls that counter once a second and stops its sources when it changes.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType

import redis

from crmstream.failures import EXIT_DRAIN_TIMEOUT
from crmstream.flows.source import StopSignals

log = logging.getLogger(__name__)


def _hard_exit(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


class GracefulStop:
    """SIGTERM/SIGINT handlers that drain the flow, with a deadline (see module docstring).

    ``exit`` is called with exit code 3 when the deadline passes or a second signal
    comes (tests inject it; the default ends the process at once).
    """

    def __init__(
        self,
        signals: StopSignals,
        drain_timeout_s: float,
        on_first: Callable[[], None] = lambda: None,
        exit: Callable[[int], None] = _hard_exit,
    ):
        self._signals = signals
        self._timeout_s = drain_timeout_s
        self._on_first = on_first
        self._exit = exit
        self._received: list[int] = []
        self._previous: dict[int, object] = {}
        self.requested_at: float | None = None

    def install(self) -> GracefulStop:
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)  # type: ignore[arg-type]
        self._previous.clear()

    def on_first(self, callback: Callable[[], None]) -> None:
        """Also call ``callback`` at the first signal (the cluster's drain request)."""
        self._on_first = callback

    @property
    def stopping(self) -> bool:
        return bool(self._received)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        self._received.append(signum)
        name = signal.Signals(signum).name
        if len(self._received) > 1:
            log.error("%s again: stopping without finishing the drain (nothing is lost: the "
                      "next start resumes from Redis)", name)  # fmt: skip
            self._exit(EXIT_DRAIN_TIMEOUT)
            return
        log.warning(
            "%s: draining (stop reading, finish the step, commit, flush the producer); "
            "at most %g s (processing.drain_timeout_seconds), a second signal stops at once",
            name,
            self._timeout_s,
        )
        self._start_deadline()
        # Asking the cluster touches Redis, which may be what hangs: never in the handler.
        threading.Thread(target=self._request_then_drain, name="crmstream-drain-request",
                         daemon=True).start()  # fmt: skip

    def _request_then_drain(self) -> None:
        try:  # first: it names the drain the step barrier is keyed by
            self._on_first()
        except Exception as exc:  # telling the cluster is best effort: this process drains
            log.warning("could not ask the other processes to drain: %s", exc)
        self.begin_drain()

    def begin_drain(self) -> None:
        """Stop the sources at the next step boundary, within the deadline (also for a
        drain another process of the cluster asked for)."""
        self._start_deadline()
        if self._signals.finish is not None:
            self._signals.finish.set()  # finish the step the cluster agrees on
        else:
            self._signals.stop.set()

    def _start_deadline(self) -> None:
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic()
        watchdog = threading.Thread(target=self._deadline, name="crmstream-drain", daemon=True)
        watchdog.start()

    def _deadline(self) -> None:
        time.sleep(self._timeout_s)
        log.error(
            "the drain did not finish within %g s (processing.drain_timeout_seconds): "
            "exiting; nothing is lost, the next start resumes from Redis",
            self._timeout_s,
        )
        self._exit(EXIT_DRAIN_TIMEOUT)


class ClusterDrain:
    """The cluster's drain counter in Redis (see module docstring)."""

    def __init__(
        self,
        client: redis.Redis,
        key: str,
        poll_s: float = 1.0,
        on_generation: Callable[[str], None] = lambda _g: None,
    ):
        """``on_generation`` learns which drain this is (the counter's new value): the
        step barrier of that drain is keyed by it (``flows.finish.RedisBarrier``)."""
        self._client = client
        self._key = key
        self._poll_s = poll_s
        self._on_generation = on_generation
        self._baseline = self._read()
        self._closed = threading.Event()

    def _read(self) -> bytes | None:
        return self._client.get(self._key)

    def request(self) -> None:
        """Ask every process of the cluster to drain."""
        self._baseline = str(self._client.incr(self._key)).encode()
        self._on_generation(self._baseline.decode())

    def watch(self, on_request: Callable[[], None]) -> None:
        """Call ``on_request`` (once) when another process asks for a drain."""

        def poll() -> None:
            while not self._closed.wait(self._poll_s):
                try:
                    now = self._read()
                except redis.RedisError as exc:  # the flow reports Redis trouble itself
                    log.debug("drain counter unreadable: %s", exc)
                    continue
                if now != self._baseline:
                    log.warning("another process of the cluster is draining: draining too")
                    self._on_generation((now or b"0").decode())
                    on_request()
                    return

        threading.Thread(target=poll, name="crmstream-cluster-drain", daemon=True).start()

    def close(self) -> None:
        self._closed.set()
