"""`crmstream run` stops cleanly: SIGTERM or SIGINT drains it, also as PID 1 of its own PID
namespace (a container's entrypoint, a pod's exec), where a process without a handler
ignores SIGTERM. The drain finishes the step, commits and flushes the producer, so the run
leaves nothing in any outbox and a restart re-sends nothing: the drained-and-resumed run
equals an uninterrupted one, trigger for trigger, with no re-deliveries.

Also: a drain that cannot finish exits 3 after processing.drain_timeout_seconds; a signal
to one process of a cluster drains them all; a cluster process whose peer died says so in
one line.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import subprocess
from pathlib import Path

import pytest
import redis

from crmstream.bench.workload import Workload, WorkloadSpec, publish
from crmstream.config import load_config
from crmstream.state.dump import canonical_dump, differences
from crmstream.topics import create_topics
from tests.conftest import read_topic
from tests.faults import (
    Server,
    committed,
    flow_command,
    ids_of,
    run_sets,
    run_to_end,
    wait_until,
)

pytestmark = pytest.mark.integration
EVENTS = 60_000
_runs = itertools.count()
needs_pid_namespace = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("unshare") is None,
    reason="a PID namespace needs root and unshare (util-linux)",
)


def _pid1_of(unshare: subprocess.Popen) -> int:
    """The host pid of the namespace's PID 1: unshare --fork's only child."""
    children = Path(f"/proc/{unshare.pid}/task/{unshare.pid}/children")
    found: list[str] = []

    def started() -> bool:
        found[:] = children.read_text().split() if children.exists() else []
        return bool(found)

    wait_until(started, 60, "unshare to start its child")
    return int(found[0])


def _input(stack, tag: str, *opts: str):
    clean = run_sets(stack, f"{tag}.in", f"{tag}.clean", f"{tag}c", *opts)
    drained = run_sets(stack, f"{tag}.in", f"{tag}.drained", f"{tag}d", *opts)
    configs = load_config(None, clean, env={}), load_config(None, drained, env={})
    for config in configs:
        create_topics(list(stack.brokers), config)
    publish(list(stack.brokers), configs[0],
            Workload(configs[0], WorkloadSpec(customers=3_000, seed=11, malformed_rate=0.002)),
            max_events=EVENTS)  # fmt: skip
    return clean, drained, configs


@needs_pid_namespace
@pytest.mark.parametrize(
    "signum",
    [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)],
    ids=["SIGTERM", "SIGINT"],
)
def test_pid_1_drains_on_a_signal_and_a_resumed_run_equals_an_uninterrupted_one(
    signum, stack, tmp_path
):
    tag = f"drain{next(_runs)}x{os.getpid()}"
    clean, drained, (clean_cfg, drained_cfg) = _input(
        stack, tag, "kafka.partitions=2", "processing.step_ms=100"
    )
    run_to_end(clean, tmp_path / "clean.log")
    client = redis.Redis.from_url(stack.redis_url)
    log = tmp_path / "drained.log"
    with log.open("ab") as out:
        command = ["unshare", "--pid", "--fork", "--mount-proc", *flow_command(drained)]
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        try:
            pid1 = _pid1_of(proc)

            def started() -> bool:
                return committed(client, f"{tag}d") >= EVENTS // 20 or proc.poll() is not None

            wait_until(started, 300, "the flow to apply a twentieth of the input")
            assert proc.poll() is None, log.read_text()[-3000:]
            os.kill(pid1, signum)
            rc = proc.wait(timeout=300)  # generous: the drain itself has a 30 s deadline
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    text = log.read_text()
    assert rc == 0, text[-3000:]
    assert f"{signal.Signals(signum).name}: draining" in text and "drained in" in text, text
    assert "Traceback" not in text and "panicked" not in text, text
    # Catching up, the source reads far ahead of the shards, and the drain applies every
    # step it has handed on: it may well have read the whole input by now. What matters is
    # that those steps are whole: a reader stopped where it happened to be left a step
    # half applied, and the resumed run below then differed from the uninterrupted one
    # in about 1,300 keys.
    done = committed(client, f"{tag}d")
    assert done > 0
    shards = drained_cfg.processing.shards
    outboxes = [client.llen(f"{tag}d:outbox:{shard}") for shard in range(shards)]
    assert not any(outboxes), f"records left undelivered: {outboxes}"

    run_to_end(drained, log)  # resume and finish the input
    assert "left in the outbox by an earlier run" not in log.read_text()
    diff = differences(canonical_dump(client, f"{tag}c"), canonical_dump(client, f"{tag}d"))
    assert not diff, f"{len(diff)} keys differ, e.g. {diff[:5]}"
    want = ids_of(read_topic(stack, clean_cfg.kafka.topics.triggers))
    got = ids_of(read_topic(stack, drained_cfg.kafka.topics.triggers))
    print(f"{signal.Signals(signum).name} at {done:,} of {EVENTS:,} applied: "
          f"{len(got):,} triggers, {len(want):,} in the uninterrupted run")  # fmt: skip
    assert len(want) == len(set(want)) > 100
    assert sorted(got) == sorted(want)  # the same ids, none delivered twice


@pytest.mark.slow  # a fault test: the slow suite (keeps the default one under 15 min)
def test_a_drain_that_cannot_finish_exits_3_after_the_drain_timeout(stack, tmp_path):
    """Redis frozen: the step cannot commit, so the drain waits until its deadline."""
    tag = f"stuck{next(_runs)}x{os.getpid()}"
    server = Server("redis", tmp_path / "redis").start()
    try:
        sets = run_sets(
            stack, f"{tag}.in", f"{tag}.out", tag, f"redis.url=redis://{server.address}/0",
            "processing.drain_timeout_seconds=3", "redis.retry_attempts=1000",
        )  # fmt: skip
        config = load_config(None, sets, env={})
        create_topics(list(stack.brokers), config)
        publish(list(stack.brokers), config, Workload(config, WorkloadSpec(customers=500)),
                max_events=2_000)  # fmt: skip
        client = redis.Redis.from_url(f"redis://{server.address}/0")
        log = tmp_path / "run.log"
        with log.open("ab") as out:
            proc = subprocess.Popen(flow_command(sets, "--no-until-end"), stdout=out,
                                    stderr=subprocess.STDOUT)  # fmt: skip
            try:
                wait_until(lambda: committed(client, tag) > 0 or proc.poll() is not None, 300,
                           "the flow to commit")  # fmt: skip
                os.kill(server.proc.pid, signal.SIGSTOP)
                proc.send_signal(signal.SIGTERM)
                rc = proc.wait(timeout=300)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
    finally:
        server.stop()
    text = log.read_text()
    assert rc == 3, text[-3000:]
    assert "the drain did not finish within 3 s" in text, text[-3000:]


@pytest.mark.slow
def test_a_signal_to_one_process_drains_the_whole_cluster(stack, tmp_path):
    """A Bytewax cluster finishes only when every process's input has ended: the signalled
    process asks the others, through Redis, to drain too; all exit 0."""
    tag = f"cdrain{next(_runs)}x{os.getpid()}"
    sets = run_sets(stack, f"{tag}.in", f"{tag}.out", tag, "kafka.partitions=2")
    config = load_config(None, sets, env={})
    create_topics(list(stack.brokers), config)
    publish(list(stack.brokers), config, Workload(config, WorkloadSpec(customers=500)),
            max_events=2_000)  # fmt: skip
    from crmstream.embedded import free_port

    addresses = [f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"]
    cluster = ["-a", addresses[0], "-a", addresses[1]]
    client = redis.Redis.from_url(stack.redis_url)
    procs, logs = [], []
    try:
        for i in (0, 1):
            logs.append(tmp_path / f"p{i}.log")
            with logs[i].open("ab") as out:
                procs.append(subprocess.Popen(
                    flow_command(sets, "--no-until-end", "-i", str(i), *cluster),
                    stdout=out, stderr=subprocess.STDOUT))  # fmt: skip
        def applied() -> bool:
            return committed(client, tag) >= 2_000 or any(p.poll() is not None for p in procs)

        wait_until(applied, 300, "the cluster to apply the input")
        procs[1].send_signal(signal.SIGTERM)
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    texts = [log.read_text() for log in logs]
    assert codes == [0, 0], texts
    assert "SIGTERM: draining" in texts[1]
    assert "another process of the cluster is draining" in texts[0]


@pytest.mark.slow
def test_a_cluster_process_whose_peer_died_says_so_in_one_line(stack, tmp_path):
    """It used to end with pyo3_runtime.PanicException and no message of ours."""
    tag = f"peer{next(_runs)}x{os.getpid()}"
    sets = run_sets(stack, f"{tag}.in", f"{tag}.out", tag, "kafka.partitions=2")
    config = load_config(None, sets, env={})
    create_topics(list(stack.brokers), config)
    publish(list(stack.brokers), config, Workload(config, WorkloadSpec(customers=500)),
            max_events=2_000)  # fmt: skip
    from crmstream.embedded import free_port

    cluster = ["-a", f"127.0.0.1:{free_port()}", "-a", f"127.0.0.1:{free_port()}"]
    procs = []
    env = {**os.environ, "RUST_BACKTRACE": "1"}
    try:
        for i in (0, 1):
            procs.append(subprocess.Popen(
                flow_command(sets, "--no-until-end", "-i", str(i), *cluster),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env))  # fmt: skip
        client = redis.Redis.from_url(stack.redis_url)
        # each process runs one of the 2 shards: both have committed once both progress
        # records exist, so the cluster is connected
        both = [f"{tag}:progress:0", f"{tag}:progress:1"]
        def connected() -> bool:
            return client.exists(*both) == 2 or any(p.poll() is not None for p in procs)

        wait_until(connected, 300, "both processes to commit")
        procs[1].send_signal(signal.SIGKILL)
        _out, err = procs[0].communicate(timeout=300)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert procs[0].returncode == 2, err[-3000:]
    lines = err.strip().splitlines()
    assert lines[-1].startswith("error: the Bytewax cluster stopped"), err[-3000:]
    assert "another process of the cluster exited" in lines[-1]
    assert "Traceback" not in err and "panicked" not in err and "PanicException" not in err, err


def test_a_second_signal_stops_at_once_and_the_deadline_ends_a_stuck_drain():
    """In process, with the exit injected: the first SIGTERM asks the sources to finish
    the step; a second one, or the deadline, ends the process with exit code 3."""
    import threading

    from crmstream.flows.source import StopSignals
    from crmstream.lifecycle import GracefulStop

    exits: list[int] = []
    signals = StopSignals(threading.Event(), threading.Event(), threading.Event())
    asked = threading.Event()
    stop = GracefulStop(signals, 600, on_first=asked.set, exit=exits.append).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(signals.finish.is_set, 30, "the drain to begin")
        assert asked.is_set() and not signals.stop.is_set() and exits == []
        os.kill(os.getpid(), signal.SIGINT)
        wait_until(lambda: exits == [3], 30, "the second signal to exit 3")
    finally:
        stop.restore()
    signals = StopSignals(threading.Event(), threading.Event(), threading.Event())
    stop = GracefulStop(signals, 0.2, exit=exits.append).install()
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        wait_until(lambda: exits == [3, 3], 30, "the deadline to exit 3")
    finally:
        stop.restore()


def test_the_cluster_agrees_on_the_highest_step_any_worker_handed_on(stack):
    from crmstream.flows.finish import RedisBarrier

    prefix = f"barrier{next(_runs)}x{os.getpid()}"
    client = redis.Redis.from_url(stack.redis_url)
    workers = [RedisBarrier(client, prefix) for _ in range(3)]
    for barrier in workers:
        barrier.generation = "7"
    assert workers[0].agree(0, 3, 41) is None  # the others have not reported
    assert workers[1].agree(1, 3, 57) is None
    assert workers[2].agree(2, 3, 12) == 57
    assert workers[0].agree(0, 3, 99) == 57  # a report is made once per drain
    other = RedisBarrier(client, prefix)
    other.generation = "8"  # the next drain starts afresh
    assert other.agree(0, 3, 1) is None
    assert RedisBarrier(client, prefix).agree(0, 1, 5) == 5  # a single worker: its own step
