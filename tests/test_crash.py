"""Crash recovery with real processes: kill -9 the flow at random points, compare with a clean run.

The flow runs as `crmstream run --until-end` child processes over a fixed input
of 200k events on the real broker and redis-server. One run goes through
uninterrupted; another is killed with SIGKILL at five random moments and
restarted after each (with Bytewax recovery enabled). The canonical dumps of
their Redis state must be byte-identical, and the crashed run must have
delivered every trigger id of the clean run and nothing else.
"""

from __future__ import annotations

import itertools
import os
import random
import signal
import time
from collections import Counter

import pytest
import redis

from crmstream.bench.workload import Workload, WorkloadSpec, publish
from crmstream.config import load_config
from crmstream.state.dump import canonical_dump, differences, digest
from crmstream.topics import create_topics
from tests.conftest import read_topic
from tests.faults import committed, flow_process, ids_of, run_sets, run_to_end

pytestmark = [pytest.mark.integration, pytest.mark.slow]

EVENTS = 200_000
KILLS = 5
_runs = itertools.count()


def _dead_letter_positions(records):
    return Counter(
        (r["source"]["topic"], r["source"]["partition"], r["source"]["offset"]) for r in records
    )


def test_kill_9_at_five_random_points_equals_an_uninterrupted_run(stack, tmp_path):
    tag = f"crash{next(_runs)}x{os.getpid()}"
    seed = int(os.environ.get("CRASH_SEED", random.randrange(1_000_000)))
    rng = random.Random(seed)
    # 100 ms steps: the 200k events are produced in a few seconds of Kafka time.
    opts = ("kafka.partitions=2", "processing.step_ms=100")
    clean = run_sets(stack, f"{tag}.in", f"{tag}.clean", f"{tag}c", *opts)
    crash = run_sets(stack, f"{tag}.in", f"{tag}.crash", f"{tag}k", *opts)
    clean_cfg, crash_cfg = load_config(None, clean, env={}), load_config(None, crash, env={})
    create_topics(list(stack.brokers), clean_cfg)
    create_topics(list(stack.brokers), crash_cfg)
    stats = publish(
        list(stack.brokers),
        clean_cfg,
        Workload(clean_cfg, WorkloadSpec(customers=20_000, seed=seed, malformed_rate=0.002)),
        max_events=EVENTS,
    )
    assert stats.events == EVENTS

    clean_s = run_to_end(clean, tmp_path / "clean.log")

    # Kill points: random shares of the input, each kill once the committed progress
    # has passed its share (so every restarted process gets work done first).
    client = redis.Redis.from_url(stack.redis_url)
    # One random point in the first half of each of KILLS bands over 5-85 % of the
    # input. A kill lands up to 0.3 s after its point, and the flow can commit
    # 15k events meanwhile; uniform points could bunch near the end, so that a
    # restarted process committed the whole rest before its kill (fresh-clone CI
    # runs counted 4 kills instead of 5 in rounds 3 and 6, seed 824795 the last).
    # The other cause was a slow ``committed`` (faults.py): seed 274399 killed at
    # 64,341 for a point at 14,995.
    band = 0.8 / KILLS
    kill_at = [0.05 + k * band + rng.uniform(0, band / 2) for k in range(KILLS)]
    recovery = tmp_path / "recovery"
    killed, seen_at_kill = 0, []
    for share in kill_at:
        with flow_process(crash, tmp_path / "crash.log", "-r", str(recovery)) as proc:
            deadline = time.monotonic() + 300
            start = committed(client, f"{tag}k")
            while proc.poll() is None and time.monotonic() < deadline:
                done = committed(client, f"{tag}k")
                if done > start and done >= share * EVENTS:
                    time.sleep(rng.uniform(0, 0.3))  # land anywhere in the next step
                    proc.send_signal(signal.SIGKILL)
                    proc.wait()
                    killed += 1
                    seen_at_kill.append(committed(client, f"{tag}k"))
                    break
                time.sleep(0.02)
    run_to_end(crash, tmp_path / "crash.log", 600, "-r", str(recovery))

    clean_dump = canonical_dump(client, f"{tag}c")
    crash_dump = canonical_dump(client, f"{tag}k")
    diff = differences(clean_dump, crash_dump)

    topics_clean, topics_crash = clean_cfg.kafka.topics, crash_cfg.kafka.topics
    clean_triggers = ids_of(read_topic(stack, topics_clean.triggers))
    crash_triggers = ids_of(read_topic(stack, topics_crash.triggers))
    clean_dlq = _dead_letter_positions(read_topic(stack, topics_clean.dead_letter))
    crash_dlq = _dead_letter_positions(read_topic(stack, topics_crash.dead_letter))
    print(
        f"crash test (seed {seed}): {EVENTS:,} events ({stats.malformed:,} malformed); "
        f"clean run {clean_s:.1f} s; {killed} kills (-9) at committed events "
        f"{seen_at_kill} for points {[round(p * EVENTS) for p in kill_at]}; "
        f"state keys {len(clean_dump):,} vs {len(crash_dump):,}, "
        f"differing {len(diff)}, digests {digest(clean_dump)[:16]} / {digest(crash_dump)[:16]}; "
        f"trigger ids {len(set(clean_triggers)):,} clean vs {len(set(crash_triggers)):,} "
        f"after crashes ({len(crash_triggers) - len(set(crash_triggers)):,} re-deliveries); "
        f"DLQ {sum(clean_dlq.values()):,} clean vs {len(crash_dlq):,} distinct after crashes"
    )
    assert killed == KILLS
    assert len(clean_dump) > 5_000
    assert not diff, f"{len(diff)} keys differ, e.g. {diff[:5]}"
    assert digest(clean_dump) == digest(crash_dump)
    assert len(clean_triggers) == len(set(clean_triggers)) > 1000
    assert set(crash_triggers) == set(clean_triggers)
    assert set(crash_dlq) == set(clean_dlq) and clean_dlq
