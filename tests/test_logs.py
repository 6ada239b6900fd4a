"""Log output: formats (plain and JSON one line per record, rich only on a terminal),
levels, and rate-limited repeats."""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys

import orjson
import pytest

from crmstream import logs

CLI = [sys.executable, "-m", "crmstream"]


def _record(name: str, msg: str, *args: object, level: int = logging.WARNING):
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_a_repeated_warning_shows_once_a_minute_and_says_how_many_it_held_back():
    """43 "is the broker reachable?" warnings in 20 minutes on a healthy broker (issue 35):
    at most one a minute now, the next saying how many were held back."""
    now = [0.0]
    limit = logs.RateLimit(60.0, clock=lambda: now[0])
    shown = []
    for i in range(43):
        now[0] = i * 28.0  # every 28 s for 20 minutes
        record = _record("crmstream.flows.source", "%s[%d]: no data: is the broker reachable?",
                         "crm.orders", i % 4)  # fmt: skip
        if limit.filter(record):
            shown.append(record.getMessage())
    assert len(shown) <= 21, shown
    assert "no data: is the broker reachable?" in shown[0]
    assert "more like this in the last 60 s not shown" in shown[1], shown[1]
    # Other messages, and librdkafka's other facilities, are not held back by these.
    assert limit.filter(_record("crmstream.flows.sink", "%d record(s) still waiting", 3))
    fail = _record("librdkafka", "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Connect failed")
    warn = _record("librdkafka", "%s [%s] %s", "CONFWARN", "rdkafka#consumer-1", "ignored")
    assert limit.filter(fail) and limit.filter(warn)
    again = _record("librdkafka", "%s [%s] %s", "FAIL", "rdkafka#consumer-1", "Connect failed 2")
    assert not limit.filter(again)
    # A critical record is never held back.
    assert limit.filter(_record("x", "boom", level=logging.CRITICAL))
    assert limit.filter(_record("x", "boom", level=logging.CRITICAL))


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logs.setup("plain", "warning", stream=None)
    root.handlers[:] = handlers


def test_plain_and_json_are_one_line_per_record_and_never_wrapped(restore_logging):
    long = "x" * 300 + " end"
    out = io.StringIO()
    assert logs.setup("plain", "info", stream=out) == "plain"
    logging.getLogger("crmstream.test").info("first line\nsecond %s", long)
    lines = out.getvalue().splitlines()
    assert len(lines) == 1, lines
    assert lines[0].endswith("INFO crmstream.test: first line\\nsecond " + long)
    out = io.StringIO()
    assert logs.setup("json", "warning", stream=out) == "json"
    logging.getLogger("crmstream.test").info("not shown at warning")
    logging.getLogger("crmstream.test").warning("shown %d", 3)
    logs.error("one line " + long)
    entries = [orjson.loads(line) for line in out.getvalue().splitlines()]
    assert [(e["level"], e["message"]) for e in entries] == [
        ("warning", "shown 3"),
        ("error", "one line " + long),
    ]


def test_rich_only_on_a_terminal(restore_logging):
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    assert logs.setup("rich", "warning", stream=io.StringIO()) == "plain"
    assert logs.setup("auto", "warning", stream=io.StringIO()) == "plain"
    assert logs.setup("auto", "warning", stream=Terminal()) == "rich"


def _crm(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=120,
        env={k: v for k, v in {**os.environ, **(env or {})}.items() if k != "COLUMNS"},
    )  # fmt: skip


def test_the_cli_writes_errors_as_json_or_as_one_unwrapped_line():
    """An error into a file was wrapped at 80 columns; --log-format json is JSON."""
    bad = ["config", "validate", "--set", "kafka.consumer.fetch.wait.max.msx=3"]
    plain = _crm(*bad)
    assert plain.returncode == 2
    (line,) = plain.stderr.splitlines()  # one wrong value: one line
    assert "kafka.consumer.fetch.wait.max.msx = 3" in line and "No such configuration" in line
    as_json = _crm("--log-format", "json", *bad)
    assert as_json.returncode == 2
    (entry,) = [orjson.loads(x) for x in as_json.stderr.splitlines()]
    assert entry["level"] == "error" and "fetch.wait.max.msx" in entry["message"]
    from_env = _crm(*bad, env={"CRMSTREAM_LOG_FORMAT": "json"})
    assert orjson.loads(from_env.stderr)["level"] == "error"
    level = _crm("--log-level", "loud", "config", "validate")
    assert level.returncode == 2 and "loud" in level.stderr


def test_version():
    result = _crm("--version")
    assert result.returncode == 0
    assert result.stdout.startswith("crmstream 0.1.0 (Python 3.11")
    assert "bytewax 0.21.1" in result.stdout and "librdkafka" in result.stdout


def test_the_readme_lists_every_exit_code_as_the_code_defines_it():
    from pathlib import Path

    from crmstream.failures import EXIT_CODES

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    table = readme.split("### Exit codes", 1)[1].split("\n\n", 2)[1]
    rows = {int(line.split("|")[1]): line.split("|")[2].strip()
            for line in table.splitlines()[2:]}  # fmt: skip
    assert rows == EXIT_CODES


@pytest.mark.parametrize("count", [6, 25, 300])
def test_every_customer_set_aside_is_named_in_the_log_despite_the_rate_limit(count):
    """Outsider 49: the once-a-minute limit took the "customer ... set aside" records of
    different customers for repeats and named 2 of 6. Each is named now, up to
    ``NAMED_PER_ROUND`` a round one by one and the rest in one line."""
    from crmstream.flows import quarantine as q

    limit = logs.RateLimit(60.0, clock=lambda: 0.0)
    shown: list[str] = []
    handler = logging.Handler()
    handler.addFilter(limit)
    handler.emit = lambda record: shown.append(record.getMessage())  # type: ignore[method-assign]
    logger = logging.getLogger("crmstream.flows.quarantine")
    logger.addHandler(handler)
    try:
        customers = {f"c{k:02d}": ValueError(f"bad {k}") for k in range(count)}
        q.quarantine(customers, [], [], {}, "dl", None, 0, 3)
        q.quarantine({"later": ValueError("later")}, [], [], {}, "dl", None, 0, 3)
    finally:
        logger.removeHandler(handler)
    one_by_one = [s for s in shown if " set aside: processing_error" in s]
    assert [s.split("'")[1] for s in one_by_one] == [
        *list(customers)[: q.NAMED_PER_ROUND], "later"]  # fmt: skip
    rest = [s for s in shown if "more customers set aside" in s]
    # Every other customer of the round is named, a hundred to a line (outsider 50: 60 of
    # 300 were not).
    assert [c for line in rest for c in re.findall(r"'([^']+)'", line)] == list(customers)[
        q.NAMED_PER_ROUND :
    ]
    if q.NAMED_PER_ROUND < count <= q.NAMED_PER_ROUND + 100:
        assert rest == [
            f"shard 3: {count - q.NAMED_PER_ROUND} more customers set aside in the "
            "round (crmstream quarantine list shows each): "
            + ", ".join(repr(c) for c in list(customers)[q.NAMED_PER_ROUND :])
        ]
