"""The harness gives every contender's consumer the same fetch size (``--fetch-bytes``).

The runs' broker spends CPU per fetch that grows with the partition's length, so
the fetch size moves the ceiling as much as crmstream (bench/RESULTS.md, round 22).
"""

from __future__ import annotations

from pathlib import Path

import orjson

from crmstream.bench.harness import (
    BENCH_FETCH_BYTES,
    _crm_cmd,
    _fetch_words,
    _naive_cmd,
    _quix_cmd,
    fetch_config,
)
from crmstream.config import load_config
from crmstream.flows.crm import input_source
from crmstream.flows.runtime import Endpoints, Runtime


def _after(cmd: list[str], flag: str) -> str:
    return cmd[cmd.index(flag) + 1]


def test_no_fetch_size_leaves_librdkafkas_own():
    assert fetch_config(0) == {}
    assert fetch_config(BENCH_FETCH_BYTES) == {"max.partition.fetch.bytes": 8 << 20}


def _crm_sets(fetch_bytes: int) -> list[str]:
    cmd = _crm_cmd("b:1", "redis://r", ["redis.key_prefix=h"], fetch_bytes, "--tail")
    assert cmd[-1] == "--tail"
    return orjson.loads(_after(cmd, "--sets"))


def test_crmstream_gets_the_fetch_size_through_its_consumer_config():
    sets = _crm_sets(3 << 20)
    assert sets == ["redis.key_prefix=h", f"kafka.consumer.max.partition.fetch.bytes={3 << 20}"]
    config = load_config(None, sets, env={})
    assert config.kafka.consumer == {"max.partition.fetch.bytes": 3 << 20}
    assert config.kafka.client == {} and config.kafka.producer_properties() == {}
    source = input_source(Runtime(config, Endpoints(["b:9092"], "redis://r")), tail=False)
    assert source.consumer_config()["max.partition.fetch.bytes"] == 3 << 20
    assert _crm_sets(0) == ["redis.key_prefix=h"]


def test_the_baselines_get_the_same_fetch_size():
    naive = _naive_cmd("b:1", "redis://r", "t", "out", "p", 5 << 20, tail=True)
    assert _after(naive, "--fetch-bytes") == str(5 << 20) and naive[-1] == "--tail"
    quix = _quix_cmd(Path("python"), "b:1", "t", "out", Path("state"), "g", 4, 5 << 20, idle_s=0)
    assert _after(quix, "--fetch-bytes") == str(5 << 20)
    assert _after(quix, "--idle-timeout") == "0"


def test_the_results_name_the_fetch_size():
    assert _fetch_words(8 << 20) == "8 MiB"
    assert _fetch_words(0) == "librdkafka's own 1 MiB"
    assert _fetch_words(None) == "an unrecorded size"
