"""Reading a replay file (``flows.replay.file_events``): what is replayed, what is not.

Without servers: the file's lines become (topic, key, value) records; a line the
producer could not send is left out with a warning naming it, and every other line is
kept, in order.
"""

from __future__ import annotations

import logging

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crmstream.config import load_config
from crmstream.flows.replay import file_events
from crmstream.flows.sink import record_limit

CONFIG = load_config(None, [], env={})
LIMIT = record_limit(CONFIG.kafka.producer_properties())


def _line(customer: str, pad: int) -> bytes:
    """A session_start of ``customer`` whose value is padded by ``pad`` bytes."""
    return orjson.dumps({"event_id": f"e-{customer}", "customer_id": customer,
                         "event_type": "session_start", "event_time": 1_767_258_600_000,
                         "x": "a" * pad})  # fmt: skip


def _fitting(customer: str, over: int) -> bytes:
    """A line whose key and value are ``over`` bytes beyond the producer's limit."""
    base = len(_line(customer, 0)) + len(customer)
    return _line(customer, LIMIT - base + over)


@pytest.mark.parametrize("over", [0, 1])
def test_a_line_at_the_producers_limit_is_replayed_and_one_byte_over_is_named(
    tmp_path, caplog, over
):
    lines = [_line("c1", 3), b"", b"   ", _fitting("c2", over), _line("c3", 5)]
    path = tmp_path / "events.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    with caplog.at_level(logging.WARNING):
        got = [value for _topic, _key, value in file_events(path, CONFIG)]
    kept = [lines[0], *([lines[3]] if over <= 0 else []), lines[4]]
    assert got == kept
    warned = [r.getMessage() for r in caplog.records if "not replayed" in r.getMessage()]
    if over <= 0:
        assert warned == []
    else:
        assert len(warned) == 1
        assert f"line 4 ({len(lines[3]):,} bytes)" in warned[0]
        assert f"{LIMIT:,}" in warned[0]


@settings(max_examples=15, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["a", "bb", "c3"]), st.integers(-50, 50)),
                min_size=1, max_size=6))  # fmt: skip
def test_every_line_the_producer_can_send_is_replayed_in_order(tmp_path_factory, shapes):
    """Lines a few bytes either side of the limit: exactly those that fit come out, in
    file order, each keyed by its customer."""
    lines = [_fitting(customer, over) for customer, over in shapes]
    path = tmp_path_factory.mktemp("replay") / "events.jsonl"
    path.write_bytes(b"\n".join(lines))
    got = list(file_events(path, CONFIG))
    fits = [(c, line) for (c, over), line in zip(shapes, lines, strict=True) if over <= 0]
    assert [(key.decode(), value) for _topic, key, value in got] == fits
