"""What every crmstream command writes to stderr: log format, level, rate limits, errors.

This module owns the shape of crmstream's diagnostic output. ``--log-format``
picks one of three formats: ``plain`` (one line per record, never wrapped, for
files and log collectors), ``json`` (one JSON object per line) and ``rich``
(colours and columns, only on a terminal: asked for elsewhere it is plain).
``auto``, the default, is rich on a terminal and plain otherwise.
``--log-level`` sets the threshold (warning by default).

Repeats are rate-limited: a record with the same logger and message template
(for librdkafka's logger: the same facility and client) is shown at most once
per ``RATE_LIMIT_SECONDS``; the next one shown says how many were held back.
Errors the user can act on (``error``) and start-up notes (``notice``) are
written in the chosen format too, one line each.
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

FORMATS = ("auto", "plain", "json", "rich")
LEVELS = ("debug", "info", "warning", "error")
RATE_LIMIT_SECONDS = 60.0


class RateLimit(logging.Filter):
    """Let a repeated record through at most once per ``interval_s``; the next one let
    through says how many like it were held back meanwhile."""

    def __init__(
        self, interval_s: float = RATE_LIMIT_SECONDS, clock: Callable[[], float] = time.monotonic
    ):
        super().__init__()
        self._interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._seen: dict[tuple[Any, ...], list[float]] = {}  # key -> [last shown, held back]

    @staticmethod
    def key(record: logging.LogRecord) -> tuple[Any, ...]:
        args = record.args if isinstance(record.args, tuple) else ()
        # librdkafka logs everything through one template ("%s [%s] %s"): its facility
        # (FAIL, CONFWARN, ...) and client name tell its repeats apart.
        detail = args[:2] if record.name == "librdkafka" else ()
        return (record.name, record.levelno, str(record.msg), *detail)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.CRITICAL or getattr(record, "unlimited", False):
            return True
        key = self.key(record)
        now = self._clock()
        with self._lock:
            entry = self._seen.get(key)
            if entry is not None and now - entry[0] < self._interval_s:
                entry[1] += 1
                return False
            held = int(entry[1]) if entry is not None else 0
            self._seen[key] = [now, 0]
        if held:
            record.msg = (
                f"{record.getMessage()} ({held} more like this in the last "
                f"{self._interval_s:g} s not shown)"
            )
            record.args = None
        return True


class PlainFormatter(logging.Formatter):
    """``2026-01-01T10:00:00.123Z WARNING crmstream.flows.source: message``, one line:
    a message's own line breaks are kept as ``\\n`` (a traceback stays as it is)."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3]
        line = f"{stamp}Z {record.levelname} {record.name}: " + record.getMessage().replace(
            "\n", "\\n"
        )
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class JsonFormatter(logging.Formatter):
    """One JSON object per record: time, level, logger, message (and exception)."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is at the time (``native_output`` replaces it
    while a flow runs)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()


class _Output:
    """The chosen format and stream (set by ``setup``)."""

    format: str = "plain"
    stream: TextIO | None = None  # None: sys.stderr at the time of writing


_out = _Output()


def resolve_format(requested: str, stream: TextIO) -> str:
    """``auto`` and ``rich`` are rich only on a terminal; plain elsewhere."""
    if requested in ("auto", "rich"):
        return "rich" if stream.isatty() else "plain"
    return requested


def setup(
    log_format: str = "auto",
    level: str = "warning",
    stream: TextIO | None = None,
    rate_limit_s: float = RATE_LIMIT_SECONDS,
) -> str:
    """Configure the root logger for a command; returns the format in use."""
    target: TextIO = stream or _CurrentStderr()  # type: ignore[assignment]
    chosen = resolve_format(log_format, stream or sys.stderr)
    if chosen == "rich":
        from rich.console import Console
        from rich.logging import RichHandler

        handler: logging.Handler = RichHandler(
            console=Console(file=stream, stderr=stream is None), show_path=False
        )
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(target)
        handler.setFormatter(JsonFormatter() if chosen == "json" else PlainFormatter())
    handler.addFilter(RateLimit(rate_limit_s))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    _out.format, _out.stream = chosen, stream
    return chosen


def current_format() -> str:
    return _out.format


def _write(level: str, message: str, colour: str | None) -> None:
    stream = _out.stream or sys.stderr
    if _out.format == "json":
        entry = {
            "time": datetime.now(UTC).isoformat(timespec="milliseconds"),
            "level": level,
            "logger": "crmstream",
            "message": message,
        }
        stream.write(orjson.dumps(entry).decode() + "\n")
    elif _out.format == "rich" and colour is not None:
        from rich.console import Console
        from rich.markup import escape

        Console(file=stream, soft_wrap=True, highlight=False).print(
            f"[{colour}]{level}:[/] {escape(message)}"
        )
    else:
        prefix = f"{level}: " if level != "info" else ""
        stream.write(prefix + message + "\n")
    stream.flush()


def error(message: str) -> None:
    """An error the user can act on, as one record (never wrapped)."""
    _write("error", message, "red")


def warning(message: str) -> None:
    _write("warning", message, "yellow")


def notice(message: str) -> None:
    """A start-up note (where metrics are served, which servers were started)."""
    _write("info", message, None)
