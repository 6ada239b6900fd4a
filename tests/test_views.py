"""The read-only views over the output topics, on a real broker: `triggers` (--last, --limit,
--json, --suppressions, --since, full ids), `explain` (id prefixes, --json) and
`dead-letters`, all reading the topics from their end rather than from offset 0."""

from __future__ import annotations

import itertools
import os
import re
import subprocess
import sys
import time

import orjson
import pytest

from crmstream.config.schema import TopicsConfig
from crmstream.flows.sink import DeliveryCheckedProducer

pytestmark = pytest.mark.integration
CLI = [sys.executable, "-m", "crmstream"]
OLD = 5_000  # old trigger records
_tags = itertools.count()


def crm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "COLUMNS": "250"})  # fmt: skip


def _trigger(i: int, kind: str = "browse_interest", customer: str | None = None) -> dict:
    return {
        "schema_version": 1,
        "trigger_id": f"{i:08d}" + "ab" * 12,
        "trigger_type": kind,
        "customer_id": customer or f"c{i % 50}",
        "rule": {"name": kind, "version": 1},
        "reason": {"values": {"n": i}, "thresholds": {}},
        "event_time": "2026-01-01T00:00:00.000+00:00",
        "causal_event_id": f"e{i}",
    }


@pytest.fixture(scope="module")
def outputs(stack):
    """Output topics holding 5,000 old triggers (one of them a rare type, and one an hour
    old by its Kafka time), then 10 new ones, a suppression and dead letters."""
    from crmstream.config import load_config
    from crmstream.topics import create_topics

    tag = f"views{next(_tags)}x{os.getpid()}"
    sets = [f"kafka.topics.{role}={tag}.{role}" for role in TopicsConfig.model_fields]
    config = load_config(None, [*sets, "kafka.partitions=2"], env={})
    create_topics(list(stack.brokers), config)
    topics = config.kafka.topics
    producer = DeliveryCheckedProducer(list(stack.brokers), {}, 30.0)
    hour_ago = int(time.time() * 1000) - 3_600_000

    def send(topic: str, record: dict, partition_key: str, ts: int | None = None) -> None:
        value = orjson.dumps(record)
        if ts is None:
            producer.produce(topic, partition_key.encode(), value)
        else:
            producer._producer.produce(topic, value, partition_key.encode(), timestamp=ts)

    send(topics.triggers, _trigger(0, "birthday", "rare"), "rare", ts=hour_ago)
    for i in range(1, OLD):
        send(topics.triggers, _trigger(i), f"c{i % 50}", ts=hour_ago)
    producer.flush()
    for i in range(OLD, OLD + 10):
        send(topics.triggers, _trigger(i), f"c{i % 50}")
    # two ids sharing their first 8 characters: a prefix of 8 is ambiguous, 9 is not
    send(topics.triggers, _trigger(OLD + 20), "twin")
    twin = _trigger(OLD + 20)
    twin["trigger_id"] = f"{OLD + 20:08d}" + "cd" * 12
    send(topics.triggers, twin, "twin")
    stopped = {**_trigger(OLD + 30, "churn_risk", "calm"), "policy": "cooldown",
               "reason": "cooling down", "candidate": {"values": {"score": 0.9}}}  # fmt: skip
    send(topics.suppressions, stopped, "calm")
    for i in range(30):
        src = {"topic": f"{tag}.orders" if i % 3 else f"{tag}.clickstream", "partition": i % 2,
               "offset": 100 + i}  # fmt: skip
        send(topics.dead_letter, {"schema_version": 1, "reason": f"bad {i}",
                                  "field": "price" if i % 2 else None, "customer_id": f"d{i}",
                                  "source": src}, f"d{i}")  # fmt: skip
    producer.flush()
    args = ["--brokers", ",".join(stack.brokers)] + [x for s in sets for x in ("--set", s)]
    return tag, args, topics


def _read_count(stderr: str) -> int:
    match = re.search(r"read (\d+) records of", stderr)
    assert match, stderr
    return int(match.group(1))


def test_triggers_json_honours_last_and_reads_only_the_end(outputs):
    """`triggers --json --last 3` printed all 2,285 records of the topic, read from offset 0."""
    _tag, args, _topics = outputs
    result = crm("triggers", *args, "--json", "--last", "3", "--log-level", "info")
    assert result.returncode == 0, result.stderr
    records = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert len(records) == 3
    assert all(r["causal_event_id"] != "e0" for r in records)
    read = _read_count(result.stderr)
    assert read < OLD / 4, f"read {read} records for the last 3"
    limited = crm("triggers", *args, "--json", "--last", "20", "--limit", "2")
    assert len(limited.stdout.splitlines()) == 2


def test_a_filter_reads_back_until_it_has_enough(outputs):
    _tag, args, _topics = outputs
    result = crm("triggers", *args, "--json", "--type", "birthday", "--log-level", "info")
    assert result.returncode == 0, result.stderr
    (rare,) = [orjson.loads(line) for line in result.stdout.splitlines()]
    assert rare["customer_id"] == "rare"
    assert _read_count(result.stderr) >= OLD  # it was the very first record
    recent = crm("triggers", *args, "--json", "--last", "1000", "--since", "30m")
    got = [orjson.loads(line) for line in recent.stdout.splitlines()]
    assert got and all(int(r["trigger_id"][:8]) >= OLD for r in got), len(got)
    assert crm("triggers", *args, "--since", "soon").returncode == 2


def test_the_table_shows_whole_ids_and_suppressions(outputs):
    _tag, args, _topics = outputs
    table = crm("triggers", *args, "--last", "20", "--suppressions")
    assert table.returncode == 0, table.stderr
    assert f"{OLD + 30:08d}" + "ab" * 12 in table.stdout  # 32 characters, not 12
    assert "suppressed: cooldown" in table.stdout and "calm" in table.stdout


@pytest.mark.slow  # the default suite took 16:25 at 6bcfa5c: in the slow suite (CI runs it)
def test_explain_takes_a_unique_prefix_and_prints_json(outputs):
    _tag, args, _topics = outputs
    full = f"{OLD + 5:08d}" + "ab" * 12
    by_prefix = crm("explain", full[:10], *args)
    assert by_prefix.returncode == 0, by_prefix.stderr
    assert f"trigger id  {full}" in by_prefix.stdout and "SENT" in by_prefix.stdout
    as_json = orjson.loads(crm("explain", full, "--json", *args).stdout)
    assert as_json["trigger_id"] == full
    assert [r["outcome"] for r in as_json["records"]] == ["sent"]
    assert as_json["records"][0]["record"]["causal_event_id"] == f"e{OLD + 5}"
    stopped = orjson.loads(crm("explain", f"{OLD + 30:08d}ab", "--json", *args).stdout)
    assert stopped["records"][0]["outcome"] == "suppressed"
    twins = crm("explain", f"{OLD + 20:08d}", *args)
    assert twins.returncode == 2 and "matches 2 ids" in twins.stderr, twins.stderr
    assert crm("explain", f"{OLD + 20:08d}c", *args).returncode == 0
    short = crm("explain", "0000", *args)
    assert short.returncode == 2 and "at least 8 characters" in short.stderr
    missing = crm("explain", "f" * 32, *args)
    assert missing.returncode == 1 and "no trigger or suppression" in missing.stderr


def test_a_dead_letter_without_a_source_is_shown_and_filtered_out(stack):
    """Outsider 53: a dead letter standing for a damaged outbox entry has no source
    (``"source": null``); the view raised AttributeError and exited 70."""
    from crmstream.config import load_config
    from crmstream.topics import create_topics

    tag = f"views{next(_tags)}x{os.getpid()}"
    sets = [f"kafka.topics.{role}={tag}.{role}" for role in TopicsConfig.model_fields]
    config = load_config(None, sets, env={})
    create_topics(list(stack.brokers), config)
    producer = DeliveryCheckedProducer(list(stack.brokers), {}, 30.0)
    record = {"schema_version": 1, "reason": "entry 0 of 'x:outbox:0' is not an outbox record",
              "field": None, "customer_id": None, "source": None}  # fmt: skip
    producer.produce(config.kafka.topics.dead_letter, None, orjson.dumps(record))
    producer.flush()
    args = ["--brokers", ",".join(stack.brokers)] + [x for s in sets for x in ("--set", s)]
    table = crm("dead-letters", *args, "--last", "5")
    assert table.returncode == 0 and "not an outbox record" in table.stdout, table.stderr
    filtered = crm("dead-letters", *args, "--json", "--topic", f"{tag}.orders")
    assert filtered.returncode == 0 and filtered.stdout == "", filtered.stderr


def test_dead_letters_filter_and_show_one_in_full(outputs):
    tag, args, _topics = outputs
    result = crm("dead-letters", *args, "--json", "--topic", f"{tag}.orders",
                 "--field", "price", "--last", "50")  # fmt: skip
    assert result.returncode == 0, result.stderr
    got = [orjson.loads(line) for line in result.stdout.splitlines()]
    want = [i for i in range(30) if i % 3 and i % 2]
    assert sorted(r["customer_id"] for r in got) == sorted(f"d{i}" for i in want)
    table = crm("dead-letters", *args, "--last", "2")
    assert table.returncode == 0 and "bad 29" in table.stdout and "bad 27" not in table.stdout
    one = crm("dead-letters", *args, "--source", f"{tag}.orders:1:107")
    assert one.returncode == 0 and orjson.loads(one.stdout)["reason"] == "bad 7"
    none = crm("dead-letters", *args, "--source", f"{tag}.orders:1:999")
    assert none.returncode == 1 and "no dead letter" in none.stderr
    bad = crm("dead-letters", *args, "--source", "orders-107")
    assert bad.returncode == 2 and "TOPIC:PARTITION:OFFSET" in bad.stderr
