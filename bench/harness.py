"""The benchmark harness: crmstream against its ceiling, a naive baseline and Quix Streams.

One command (``make bench-all``, or ``python -m crmstream.bench.harness``)
writes one recorded shop workload to the input topics, then every contender
reads that same topic on the same broker and Redis, one after another:

1. ceiling: a raw confluent-kafka consume + orjson parse loop, as many
   processes as crmstream uses;
2. crmstream: the full flow (state model, triggers, policies), 1 process and
   2 processes (Bytewax ``-i``/``-a``);
3. naive: the tutorial-style Bytewax flow (``bench/naive.py``): ``key_on`` and a
   per-event stateful step doing one Redis GET and one SET per event;
4. Quix Streams (``bench/quix_job.py``) in its own virtualenv ``.venv-quix``.

For each: events/s and the ratio to the ceiling, peak RSS per process, state
bytes per customer; then p50/p99 event-to-trigger latency with the contender
tailing live input offered at 25/50/75 % of crmstream's measured maximum, next
to a "kafka floor" (a raw consumer of the same live input, no processing), with
the CPU the contender, the broker and the generator used meanwhile.
Writes ``<out>/harness.json``, ``<out>/harness.png`` and prints a table. Every
figure is a ratio within one run; the machine is shared and noisy.
``--smoke`` runs everything on a tiny input to keep the harness working (CI).

Each contender also runs as ``python -m crmstream.bench.harness <role> ...``
(a child process that prints one JSON line), so the harness can measure its
resident memory and run several at once.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
QUIX_VENV = ROOT / ".venv-quix"
QUIX_VERSION = "3.28.1"


# ---------------------------------------------------------------- child roles


class Stopwatch:
    """Wall time and CPU time (all threads) of a block, and the wall-clock time it began:
    a child's report (``together`` lines processes up by ``started_at``)."""

    def __enter__(self) -> Stopwatch:
        self.started_at = time.time()
        self._wall, self._cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self._wall
        self.cpu_seconds = time.process_time() - self._cpu

    def report(self) -> dict[str, float]:
        return {
            "seconds": self.seconds,
            "cpu_seconds": self.cpu_seconds,
            "started_at": self.started_at,
        }


def _ended_at(report: dict[str, Any]) -> float:
    return report["started_at"] + report["seconds"]


def consume_and_parse(
    brokers: str, topics: list[str], part: int = 0, of: int = 1, fetch_bytes: int = 0
) -> dict:
    """The ceiling: consume + parse every input partition with index % of == part, to its
    end, nothing else; {"events": n, "seconds": s, "cpu_seconds": CPU time of the process,
    librdkafka's threads included}."""
    from confluent_kafka import KafkaError

    consumer, remaining = _raw_consumer(brokers, topics, "bench-ceiling", part, of, fetch_bytes)
    count = 0
    with Stopwatch() as watch:
        while remaining:
            for msg in consumer.consume(2000, 0.5):
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        remaining -= 1
                    continue
                try:  # noqa: SIM105 - a context manager per message would slow the ceiling
                    orjson.loads(msg.value())
                except orjson.JSONDecodeError:
                    pass
                count += 1
    consumer.close()
    return {"events": count, "fetch_bytes": fetch_bytes, **watch.report()}


# The broker of these runs (Tansu) spends CPU per fetch that grows with the partition's
# length: with librdkafka's 1 MiB per partition it took 4.0 to 4.6 µs per event to serve
# a 2M-event input, with 8 MiB 2.5 to 2.6 (bench/RESULTS.md, round 22).
BENCH_FETCH_BYTES = 8 << 20


def fetch_config(fetch_bytes: int) -> dict[str, int]:
    """The fetch size the harness gives every contender's consumer (``--fetch-bytes``;
    0: librdkafka's own 1 MiB). bench/README.md says why."""
    return {"max.partition.fetch.bytes": fetch_bytes} if fetch_bytes else {}


def _raw_consumer(
    brokers: str, topics: list[str], group: str, part: int = 0, of: int = 1, fetch_bytes: int = 0
) -> tuple[Any, int]:
    """A consumer assigned every input partition with index % of == part, from offset 0
    (with the flow's own fetch settings and the harness's fetch size); and how many
    partitions that is."""
    from confluent_kafka import Consumer, TopicPartition

    from crmstream.flows.source import FETCH_DEFAULTS

    consumer = Consumer(
        {
            "bootstrap.servers": brokers,
            "group.id": group,
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            **FETCH_DEFAULTS,
            **fetch_config(fetch_bytes),
        }
    )
    parts = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=30).topics[topic]
        parts += [TopicPartition(topic, p, 0) for p in sorted(meta.partitions)]
    parts = [p for i, p in enumerate(parts) if i % of == part]
    consumer.assign(parts)
    return consumer, len(parts)


def kafka_floor(
    brokers: str, topics: list[str], stop: threading.Event, fetch_bytes: int = 0
) -> dict[str, Any]:
    """The latency floor: a raw consumer tailing the input until ``stop``, doing nothing
    but read each event's time. Receive time - event_time over every event, in ms: what
    the broker, the client and the shared machine add before any processing."""
    consumer, _ = _raw_consumer(brokers, topics, "bench-floor", fetch_bytes=fetch_bytes)
    latencies = []
    while not stop.is_set():
        # What is there, else wait for the next message: a batch wait would age the batch.
        for msg in consumer.consume(2000, 0) or consumer.consume(1, 0.1):
            if msg.error() is not None:
                continue
            received_ms = time.time_ns() / 1e6
            try:
                at = orjson.loads(msg.value())["event_time"]
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # a malformed event of the workload
            if isinstance(at, int):
                latencies.append(received_ms - at)
    consumer.close()
    return {
        "events": len(latencies),
        "p50_ms": _pct(latencies, 0.5),
        "p99_ms": _pct(latencies, 0.99),
    }


def role_ceiling(args: argparse.Namespace) -> dict[str, Any]:
    return consume_and_parse(
        args.brokers, args.topics.split(","), args.part, args.of, args.fetch_bytes
    )


def _listening(port: int) -> bool:
    """Whether a socket on this machine listens on TCP ``port`` (Linux: /proc/net/tcp*)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            local, state = row.split()[1:4:2]
            if state == "0A" and int(local.rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                return True
    return False


def await_peers(addresses: list[str], part: int, timeout_s: float = 60.0) -> float:
    """Wait until the cluster's processes before ``part`` listen; the seconds waited.

    Under Bytewax, timely has process i connect to processes 0 .. i-1, and when a
    connect is refused it sleeps a whole second before trying again. Started
    together, process 1 often tried before process 0 listened: a 2-process run
    then began with a 1 s pause, a third of a 3 s run at 100k customers
    (bench/RESULTS.md, round 13). A deployment pays that once per start; the
    harness, which times the run, waits for the listener instead. After
    ``timeout_s`` it goes on, and timely's own retries take over."""
    started = time.monotonic()
    for address in addresses[:part]:
        port = int(address.rsplit(":", 1)[1])
        while not _listening(port) and time.monotonic() - started < timeout_s:
            time.sleep(0.005)
    return time.monotonic() - started


def role_crmstream(args: argparse.Namespace) -> dict[str, Any]:
    """One crmstream process of ``args.of``, timed from after the kernels are loaded and
    the processes it connects to listen."""
    from crmstream.config import load_config
    from crmstream.flows.crm import run_cluster_process
    from crmstream.flows.runtime import Endpoints, Runtime
    from crmstream.metrics import counter_total, get_metrics
    from crmstream.operators.kernels import warm_up

    sets = orjson.loads(args.sets)
    config = load_config(None, sets, env={})
    warm_up(config)
    runtime = Runtime(config, Endpoints(args.brokers.split(","), args.redis_url))
    addresses = args.addresses.split(",") if args.of > 1 else None
    metrics = get_metrics()
    part = args.part if args.of > 1 else None
    waited = await_peers(addresses, args.part) if addresses else 0.0
    with Stopwatch() as watch:
        run_cluster_process(runtime, 1, part, addresses, tail=args.tail)
    runtime.close()
    handled = counter_total(metrics.events_in, metrics.invalid_events, metrics.skipped_events)
    return {
        "events": int(handled),
        "peer_wait_seconds": waited,
        "fetch_bytes": int(config.kafka.consumer_properties().get("max.partition.fetch.bytes", 0)),
        **watch.report(),
    }


def together(reports: list[dict[str, Any]]) -> float:
    """Seconds from the moment the last process was ready to work (kernels loaded, for
    crmstream) until the last one finished. Processes of a Bytewax cluster wait for each
    other before the dataflow starts, so an earlier-ready process's wait for a slower
    start-up is not work; the slowest process's own time would count it."""
    return max(map(_ended_at, reports)) - max(r["started_at"] for r in reports)


def _child_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="harness child")
    parser.add_argument("role", choices=["ceiling", "crmstream", "floor"])
    parser.add_argument("--brokers", required=True)
    parser.add_argument("--topics", default="")
    parser.add_argument("--redis-url", default="")
    parser.add_argument("--sets", default="[]")
    parser.add_argument("--part", type=int, default=0)
    parser.add_argument("--of", type=int, default=1)
    parser.add_argument("--addresses", default="")
    parser.add_argument("--tail", action="store_true")
    parser.add_argument("--fetch-bytes", type=int, default=0)
    args = parser.parse_args(argv)
    if args.role == "floor":
        stop = threading.Event()
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        result = kafka_floor(args.brokers, args.topics.split(","), stop, args.fetch_bytes)
    else:
        result = role_ceiling(args) if args.role == "ceiling" else role_crmstream(args)
    sys.stdout.write(orjson.dumps(result).decode() + "\n")


# ---------------------------------------------------------------- measuring


@dataclass
class Child:
    """A contender process: its JSON report and its peak resident memory."""

    cmd: list[str]
    proc: subprocess.Popen[str] | None = None
    peak_rss_mb: float = 0.0
    _watch: threading.Thread | None = None

    def start(self) -> Child:
        self.proc = subprocess.Popen(
            self.cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT
        )
        self._watch = threading.Thread(target=self._rss, daemon=True)
        self._watch.start()
        return self

    def _rss(self) -> None:
        assert self.proc is not None
        status = Path(f"/proc/{self.proc.pid}/status")
        while self.proc.poll() is None:
            try:
                for line in status.read_text().splitlines():
                    if line.startswith("VmHWM:"):  # the kernel's own peak RSS
                        self.peak_rss_mb = max(self.peak_rss_mb, int(line.split()[1]) / 1024)
            except OSError:
                return
            time.sleep(0.2)

    def wait(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None
        out, err = self.proc.communicate(timeout=timeout)
        if self.proc.returncode != 0:
            raise RuntimeError(f"{self.cmd[:4]} failed ({self.proc.returncode}): {err[-3000:]}")
        for line in err.splitlines():  # a client given a setting it ignores: say so
            if "CONFWARN" in line:
                print(f"[{' '.join(self.cmd[1:4])}] {line}", file=sys.stderr)
        return orjson.loads(out.strip().splitlines()[-1])

    def finish(self) -> dict[str, Any]:
        """Stop a tailing child (SIGTERM) and return the JSON it prints as it ends."""
        assert self.proc is not None
        self.proc.terminate()
        return self.wait(timeout=60)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.communicate(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()


def _me(*args: str) -> list[str]:
    return [sys.executable, "-m", "crmstream.bench.harness", *args]


def _crm_cmd(
    brokers: str, redis_url: str, sets: list[str], fetch_bytes: int, *extra: str
) -> list[str]:
    """A crmstream process, its consumers given the fetch size through ``kafka.consumer``,
    as a deployment would set it (``kafka.client`` would give it to the producers too,
    and librdkafka warns about a consumer property on a producer)."""
    fetch = [f"kafka.consumer.{key}={value}" for key, value in fetch_config(fetch_bytes).items()]
    return _me(
        "crmstream",
        "--brokers",
        brokers,
        "--redis-url",
        redis_url,
        "--sets",
        orjson.dumps(sets + fetch).decode(),
        *extra,
    )


def _naive_cmd(
    brokers: str,
    redis_url: str,
    topics: str,
    triggers: str,
    prefix: str,
    fetch_bytes: int = 0,
    tail: bool = False,
) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "crmstream.bench.naive",
        "--brokers",
        brokers,
        "--redis-url",
        redis_url,
        "--topics",
        topics,
        "--triggers",
        triggers,
        "--prefix",
        prefix,
        "--fetch-bytes",
        str(fetch_bytes),
    ]
    return [*cmd, "--tail"] if tail else cmd


def _quix_cmd(
    python: Path,
    brokers: str,
    topics: str,
    triggers: str,
    state: Path,
    group: str,
    partitions: int,
    fetch_bytes: int = 0,
    idle_s: float = 5.0,
) -> list[str]:
    return [
        str(python),
        str(ROOT / "bench" / "quix_job.py"),
        "--brokers",
        brokers,
        "--topics",
        topics,
        "--triggers",
        triggers,
        "--state-dir",
        str(state),
        "--group",
        group,
        "--partitions",
        str(partitions),
        "--idle-timeout",
        str(idle_s),
        "--fetch-bytes",
        str(fetch_bytes),
    ]


def ensure_quix_venv(log: Any) -> Path | None:
    """``.venv-quix`` with quixstreams (it pins confluent-kafka below crmstream's)."""
    python = QUIX_VENV / "bin" / "python"
    if python.exists():
        return python
    log(f"creating {QUIX_VENV.name} with quixstreams {QUIX_VERSION} ...")
    try:
        subprocess.run([sys.executable, "-m", "venv", str(QUIX_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", f"quixstreams=={QUIX_VERSION}"],
            check=True,
            timeout=600,
        )
    except (subprocess.SubprocessError, OSError) as exc:
        log(f"[red]cannot install quixstreams: {exc}; Quix is left out[/]")
        return None
    return python


class CpuWatch:
    """Samples the CPU time of the broker and of redis-server, and the machine's idle time,
    in a thread, so that their share of a contender's timed window can be read afterwards."""

    def __init__(self, broker_pid: int | None, redis_client: Any, every_s: float = 0.05):
        self._broker_pid, self._redis, self._every = broker_pid, redis_client, every_s
        self._samples: list[tuple[float, dict[str, float | None]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        cpu = self._redis.info("cpu")
        self._samples.append(
            (
                time.time(),
                {
                    "broker": _cpu_seconds(self._broker_pid),
                    "redis": float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]),
                    "idle": _idle_seconds(),
                },
            )
        )

    def _loop(self) -> None:
        while not self._stop.wait(self._every):
            self._sample()

    def __enter__(self) -> CpuWatch:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def pct(self, start: float, end: float) -> dict[str, int]:
        """% of one core each used from the last sample at or before ``start`` to the first
        at or after ``end`` (the window rounded out to the samples; the first and last are
        taken on entry and exit, so they bracket any window inside the ``with``)."""
        first = max((s for s in self._samples if s[0] <= start), key=lambda s: s[0])
        last = min((s for s in self._samples if s[0] >= end), key=lambda s: s[0])
        return {
            k: round(100 * (last[1][k] - v) / (last[0] - first[0]))
            for k, v in first[1].items()
            if v is not None and last[1][k] is not None
        }


def cpu_of(reports: list[dict[str, Any]], watch: CpuWatch) -> dict[str, Any]:
    """Each process's CPU over its own timed window and the broker's and Redis's over the
    window ``together`` times, all in % of one core."""
    start = max(r["started_at"] for r in reports)
    end = max(map(_ended_at, reports))
    return {
        "processes": [round(100 * r["cpu_seconds"] / r["seconds"]) for r in reports],
        **watch.pct(start, end),
    }


def _cpu_cell(cpu: dict[str, Any] | None) -> str:
    if not cpu:
        return ""
    procs = "+".join(map(str, cpu["processes"]))
    rest = " / ".join(str(cpu.get(k, "-")) for k in ("broker", "redis", "idle"))
    return f"{procs} / {rest}"


def median_run(runs: list[Result]) -> Result:
    """The run with the median rate (of an even number, the lower of the middle two)."""
    return sorted(runs, key=lambda r: r.rate)[(len(runs) - 1) // 2]


@dataclass
class Result:
    name: str
    processes: int
    events: int
    seconds: float
    peak_rss_mb: list[float]
    state_bytes_per_customer: float | None = None
    cpu_pct: dict[str, Any] | None = None  # % of a core: "processes" (list), broker, redis, idle
    fetch_bytes: list[int] = field(default_factory=list)  # each process's, as it reported it

    @property
    def rate(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else 0.0


class Harness:
    def __init__(self, args: argparse.Namespace):
        from rich.console import Console

        self.args = args
        self.console = Console()
        self.results: dict[str, Any] = {"runs": []}
        self.broker_pid: int | None = None  # the embedded broker, for its CPU use

    def log(self, text: str) -> None:
        self.console.print(text)

    def run(self) -> None:
        from crmstream.config import load_config
        from crmstream.embedded import EmbeddedStack

        config = load_config(None, [f"kafka.partitions={self.args.partitions}"], env={})
        quix = ensure_quix_venv(self.log) if not self.args.no_quix else None
        with EmbeddedStack(config) as stack:
            assert stack.endpoints is not None
            self.broker_pid = next((p.pid for name, p in stack.processes if name == "tansu"), None)
            for customers in self.args.customers:
                self.results["runs"].append(self.one_size(stack.endpoints, customers, quix))
        self.results["machine"] = f"{platform.machine()}, {os.cpu_count()} cores, Python " + (
            platform.python_version()
        )
        self.results["generator_linger_ms"] = self.args.generator_linger_ms
        self.results["fetch_bytes"] = self.args.fetch_bytes
        self.write()

    # one workload size ----------------------------------------------------

    def one_size(self, endpoints: Any, customers: int, quix: Path | None) -> dict[str, Any]:
        import redis

        from crmstream.bench.workload import Workload, WorkloadSpec, publish
        from crmstream.config import load_config
        from crmstream.topics import create_topics

        tag = f"h{customers}"
        events = self.args.events or customers * 2
        base = [f"kafka.partitions={self.args.partitions}"]
        inputs = [
            f"kafka.topics.{r}={tag}.{r}"
            for r in ("clickstream", "orders", "customers", "feedback")
        ]
        config = load_config(None, base + inputs, env={})
        create_topics(endpoints.brokers, config)
        self.log(f"[bold]{customers:,} customers[/]: writing {events:,} events ...")
        publish(
            endpoints.brokers,
            config,
            Workload(config, WorkloadSpec(customers=customers)),
            max_events=events,
        )
        brokers = ",".join(endpoints.brokers)
        topics = ",".join(config.kafka.topics.inputs)
        client = redis.Redis.from_url(endpoints.redis_url)
        out: dict[str, Any] = {"customers": customers, "events": events, "contenders": []}

        def sets_for(name: str) -> list[str]:
            return (
                base
                + inputs
                + [
                    f"kafka.topics.triggers={tag}.{name}.triggers",
                    f"kafka.topics.suppressions={tag}.{name}.suppressions",
                    f"kafka.topics.dead_letter={tag}.{name}.dead-letter",
                    f"redis.key_prefix={tag}{name}",
                    "metrics.enabled=false",
                    *self.args.crm_set,
                ]
            )

        def ceiling(n: int) -> Result:
            children = [
                Child(
                    _me(
                        "ceiling",
                        "--brokers",
                        brokers,
                        "--topics",
                        topics,
                        "--part",
                        str(i),
                        "--of",
                        str(n),
                        "--fetch-bytes",
                        str(self.args.fetch_bytes),
                    )
                ).start()
                for i in range(n)
            ]
            with CpuWatch(self.broker_pid, client) as watch:
                reports = [c.wait(3600) for c in children]
            return Result(
                f"ceiling ({n} proc)",
                n,
                sum(r["events"] for r in reports),
                together(reports),
                [c.peak_rss_mb for c in children],
                cpu_pct=cpu_of(reports, watch),
                fetch_bytes=[r["fetch_bytes"] for r in reports],
            )

        def crm(n: int, repeat: int) -> Result:
            name = f"crm{n}" + (f"r{repeat}" if repeat else "")
            sets = sets_for(name)
            create_topics(endpoints.brokers, load_config(None, sets, env={}))
            before = int(client.info("memory")["used_memory"])
            from crmstream.embedded import free_port

            addresses = ",".join(f"127.0.0.1:{free_port()}" for _ in range(n))
            children = [
                Child(
                    _crm_cmd(
                        brokers,
                        endpoints.redis_url,
                        sets,
                        self.args.fetch_bytes,
                        "--part",
                        str(i),
                        "--of",
                        str(n),
                        "--addresses",
                        addresses,
                    )
                ).start()
                for i in range(n)
            ]
            with CpuWatch(self.broker_pid, client) as watch:
                reports = [c.wait(3600) for c in children]
            used = int(client.info("memory")["used_memory"]) - before
            states = sum(int(v) for v in client.hgetall(f"{tag}{name}:customers").values())
            ready = [r["started_at"] for r in reports]
            cpu = cpu_of(reports, watch)
            waits = [round(r["peer_wait_seconds"], 2) for r in reports]
            split = [f"{r['events']:,}" for r in reports]  # the skew: a customer has one shard
            waited = (
                f", waited {waits} s for the processes before each to listen, events {split}"
                if n > 1
                else ""
            )
            self.log(
                f"    own times {[round(r['seconds'], 2) for r in reports]} s, ready "
                f"{max(ready) - min(ready):.2f} s apart, {together(reports):.2f} s together"
                f"{waited}; CPU % of a core, processes / broker / redis / machine idle: "
                f"{_cpu_cell(cpu)}"
            )
            # Every repeat starts from an empty Redis, as the first did (the others'
            # keys would change its memory and hash-table growth).
            client.flushdb()
            return Result(
                f"crmstream ({n} proc)",
                n,
                sum(r["events"] for r in reports),
                together(reports),
                [c.peak_rss_mb for c in children],
                used / max(states, 1),
                cpu,
                [r["fetch_bytes"] for r in reports],
            )

        def naive() -> Result:
            sets = sets_for("naive")
            create_topics(endpoints.brokers, load_config(None, sets, env={}))
            before = int(client.info("memory")["used_memory"])
            child = Child(
                _naive_cmd(
                    brokers,
                    endpoints.redis_url,
                    topics,
                    f"{tag}.naive.triggers",
                    f"{tag}naive",
                    self.args.fetch_bytes,
                )
            ).start()
            report = child.wait(7200)
            used = int(client.info("memory")["used_memory"]) - before
            keys = sum(1 for _ in client.scan_iter(match=f"{tag}naive:*", count=5000))
            return Result(
                "naive (1 proc)",
                1,
                report["events"],
                report["seconds"],
                [child.peak_rss_mb],
                used / max(keys, 1),
                fetch_bytes=[report["fetch_bytes"]],
            )

        def quix_run(python: Path) -> Result:
            sets = sets_for("quix")
            create_topics(endpoints.brokers, load_config(None, sets, env={}))
            state = Path(self.args.out) / f"quix-state-{tag}"
            child = Child(
                _quix_cmd(
                    python,
                    brokers,
                    topics,
                    f"{tag}.quix.triggers",
                    state,
                    f"{tag}-quix",
                    self.args.partitions,
                    self.args.fetch_bytes,
                )
            ).start()
            report = child.wait(7200)
            size = sum(f.stat().st_size for f in state.rglob("*") if f.is_file())
            return Result(
                "Quix Streams (1 proc)",
                1,
                report["events"],
                report["seconds"],
                [child.peak_rss_mb],
                size / customers,
                fetch_bytes=[report["fetch_bytes"]],
            )

        # The four quick contenders run ``--repeats`` times, in turn, and each is
        # reported by its median run: one run's rate moved by a third between
        # harness runs on this shared machine (bench/RESULTS.md, round 13).
        repeats = self.args.repeats
        rounds: list[list[Result]] = []
        for repeat in range(repeats):
            rounds.append([])
            of = f" (run {repeat + 1} of {repeats})" if repeats > 1 else ""
            for label, fn in (
                ("ceiling, 1 process", lambda: ceiling(1)),
                ("crmstream, 1 process", lambda r=repeat: crm(1, r)),
                ("ceiling, 2 processes", lambda: ceiling(2)),
                ("crmstream, 2 processes", lambda r=repeat: crm(2, r)),
            ):
                self.log(f"  {label}{of} ...")
                rounds[-1].append(fn())
        tries = [[each[i] for each in rounds] for i in range(4)]  # every run of each contender
        if not self.args.no_naive:
            self.log("  naive baseline ...")
            tries.append([naive()])
        if quix is not None:
            self.log("  Quix Streams ...")
            tries.append([quix_run(quix)])
        runs = [median_run(own) for own in tries]
        ceiling1, crm1, ceiling2, crm2 = runs[:4]
        for r, own in zip(runs, tries, strict=True):
            ref = ceiling2 if r.processes == 2 else ceiling1
            out["contenders"].append(
                {
                    "name": r.name,
                    "processes": r.processes,
                    "events": r.events,
                    "seconds": round(r.seconds, 3),
                    "events_per_s": round(r.rate),
                    "ratio_to_ceiling": round(r.rate / ref.rate, 4),
                    "peak_rss_mb": [round(m) for m in r.peak_rss_mb],
                    "state_bytes_per_customer": (
                        round(r.state_bytes_per_customer)
                        if r.state_bytes_per_customer is not None
                        else None
                    ),
                    "cpu_pct": r.cpu_pct,
                    "fetch_bytes": r.fetch_bytes,
                    "runs_events_per_s": [round(one.rate) for one in own],
                }
            )
        by = {r.name: r for r in runs}
        out["ratios"] = {
            "crmstream_vs_ceiling": round(crm1.rate / ceiling1.rate, 4),
            "crmstream_2proc_vs_1proc": round(crm2.rate / crm1.rate, 3),
        }
        if "naive (1 proc)" in by:
            out["ratios"]["crmstream_vs_naive"] = round(crm1.rate / by["naive (1 proc)"].rate, 2)
        if "Quix Streams (1 proc)" in by:
            out["ratios"]["crmstream_vs_quix"] = round(
                crm1.rate / by["Quix Streams (1 proc)"].rate, 2
            )
        if not self.args.no_latency:
            out["latency"] = self.latency(endpoints, customers, crm1.rate, quix)
        return out

    # latency under offered load --------------------------------------------

    def latency(
        self, endpoints: Any, customers: int, crm_max: float, quix: Path | None
    ) -> list[dict[str, Any]]:
        """Per offered load: the Kafka floor (a raw consumer, no processing), then each
        contender tailing fresh topics; latency percentiles and CPU use in the window."""
        rows = []
        for load in self.args.loads:
            rate = crm_max * load
            contenders = ["floor", "crmstream"] + ([] if self.args.no_naive else ["naive"])
            contenders += ["quix"] if quix is not None else []
            for name in contenders:
                row = self._one_latency(endpoints, customers, name, load, rate, quix)
                self.log(f"  latency {name} at {load:.0%} ({rate:,.0f}/s): {row}")
                rows.append(row)
        return rows

    def _one_latency(
        self,
        endpoints: Any,
        customers: int,
        name: str,
        load: float,
        rate: float,
        quix: Path | None,
    ) -> dict[str, Any]:
        from crmstream.bench.workload import Workload, WorkloadSpec, publish_scheduled
        from crmstream.config import load_config
        from crmstream.topics import create_topics

        brokers = ",".join(endpoints.brokers)
        tag = f"l{customers}{name}{int(load * 100)}"
        sets = [
            f"kafka.partitions={self.args.partitions}",
            *(
                f"kafka.topics.{r}={tag}.{r}"
                for r in (
                    "clickstream",
                    "orders",
                    "customers",
                    "feedback",
                    "triggers",
                    "suppressions",
                    "dead_letter",
                )
            ),
            f"redis.key_prefix={tag}",
            "metrics.enabled=false",
            "policies.quiet_hours.start=00:00",
            "policies.quiet_hours.end=00:00",
            *(self.args.crm_set if name == "crmstream" else []),
        ]
        config = load_config(None, sets, env={})
        create_topics(endpoints.brokers, config)
        topics = ",".join(config.kafka.topics.inputs)
        triggers = config.kafka.topics.triggers
        if name == "floor":
            cmd = _me(
                "floor",
                "--brokers",
                brokers,
                "--topics",
                topics,
                "--fetch-bytes",
                str(self.args.fetch_bytes),
            )
        elif name == "crmstream":
            cmd = _crm_cmd(brokers, endpoints.redis_url, sets, self.args.fetch_bytes, "--tail")
        elif name == "naive":
            cmd = _naive_cmd(
                brokers, endpoints.redis_url, topics, triggers, tag, self.args.fetch_bytes, True
            )
        else:
            assert quix is not None
            state = Path(self.args.out) / f"quix-state-{tag}"
            cmd = _quix_cmd(
                quix,
                brokers,
                topics,
                triggers,
                state,
                tag,
                self.args.partitions,
                self.args.fetch_bytes,
                idle_s=0,
            )
        child = Child(cmd).start()
        assert child.proc is not None
        pids = {"contender": child.proc.pid, "broker": self.broker_pid}
        marks: dict[str, tuple[float, dict[str, float]]] = {}

        def window(edge: str) -> None:
            own = os.times()
            cpu = {k: _cpu_seconds(pid) for k, pid in pids.items()}
            marks[edge] = (time.monotonic(), {**cpu, "generator": own.user + own.system})

        # The floor needs no start-up; the others compile, join and assign.
        time.sleep(2 if name == "floor" else self.args.startup_s)
        publish_scheduled(
            endpoints.brokers,
            config,
            Workload(config, WorkloadSpec(customers=customers)),
            rate=rate,
            duration_s=self.args.load_seconds,
            window=window,
            linger_ms=self.args.generator_linger_ms,
        )
        time.sleep(2 if name == "floor" else self.args.drain_s)
        if name == "floor":
            floor = child.finish()
            count, p50, p99 = floor["events"], floor["p50_ms"], floor["p99_ms"]
        else:
            child.stop()
            latencies = _trigger_latencies(endpoints, triggers)
            count, p50, p99 = len(latencies), _pct(latencies, 0.50), _pct(latencies, 0.99)
        (opened, cpu0), (closed, cpu1) = marks["open"], marks["close"]
        return {
            "contender": "kafka floor" if name == "floor" else name,
            "offered_load": load,
            "offered_events_per_s": round(rate),
            # the floor's latencies are over every input event, not triggers
            "triggers": None if name == "floor" else count,
            "events_read": count if name == "floor" else None,
            "p50_ms": p50,
            "p99_ms": p99,
            # % of one core during the window: the contender, the broker, the generator
            "cpu_pct": {
                k: round(100 * (cpu1[k] - cpu0[k]) / (closed - opened))
                for k in cpu0
                if cpu0[k] is not None and cpu1[k] is not None
            },
        }

    # output ------------------------------------------------------------------

    def write(self) -> None:
        from rich.table import Table

        out = Path(self.args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "harness.json").write_text(
            orjson.dumps(self.results, option=orjson.OPT_INDENT_2).decode()
        )
        for run in self.results["runs"]:
            table = Table(title=f"{run['customers']:,} customers, {run['events']:,} events")
            for col in (
                "contender",
                "events/s",
                RUNS_COLUMN,
                "ratio to ceiling",
                "peak RSS MiB/proc",
                "state B/customer",
                CPU_COLUMN,
            ):
                table.add_column(col, justify="right")
            for c in run["contenders"]:
                table.add_row(
                    c["name"],
                    f"{c['events_per_s']:,}",
                    _runs_cell(c),
                    f"{c['ratio_to_ceiling']:.3f}",
                    ",".join(map(str, c["peak_rss_mb"])),
                    str(c["state_bytes_per_customer"] or "-"),
                    _cpu_cell(c.get("cpu_pct")) or "-",
                )
            self.console.print(table)
            self.console.print(f"ratios: {run['ratios']}")
            if run.get("latency"):
                lat = Table(title="event-to-trigger latency under offered load")
                for col in LATENCY_COLUMNS:
                    lat.add_column(col, justify="right")
                for r in run["latency"]:
                    lat.add_row(*_latency_cells(r))
                self.console.print(lat)
        _plot(self.results, out / "harness.png")
        self.log(f"wrote {out / 'harness.json'} and {out / 'harness.png'}")
        if not self.args.smoke and self.args.results:
            _write_results_md(self.results, Path(self.args.results))
            shutil.copyfile(out / "harness.png", Path(self.args.results).with_name("harness.png"))
            self.log(f"updated {self.args.results} and bench/harness.png")


RESULTS_START, RESULTS_END = "<!-- harness:start -->", "<!-- harness:end -->"
RUNS_COLUMN = "events/s of each run"
RUNS_NOTE = (
    "The ceiling and crmstream rows are each contender's median run of those listed "
    "(taken in turn: ceiling, crmstream, ceiling with 2 processes, crmstream with 2, "
    "then again); the ratios are those of the median runs. The naive baseline and Quix "
    "Streams run once."
)
CPU_COLUMN = "CPU % processes / broker / redis / idle"
CPU_NOTE = (
    "CPU is in % of one core: each process's own over its timed window (`+` between "
    "processes), the broker's and redis-server's over the window the rate is timed on, "
    "sampled every 0.05 s; idle is the machine's idle time over that window (all cores "
    f"together: at most {100 * (os.cpu_count() or 1)})."
)
LATENCY_COLUMNS = (
    "contender",
    "offered",
    "events/s",
    "triggers",
    "p50 ms",
    "p99 ms",
    "CPU % contender / broker / generator",
)
LATENCY_NOTE = (
    "The kafka floor is a raw consumer that only reads each event's time: its p50/p99 "
    "are over every input event, what the broker and the shared machine add before any "
    "processing. CPU is in % of one core over the sending window (the machine has "
    f"{os.cpu_count()} cores)."
)


def _runs_cell(contender: dict[str, Any]) -> str:
    """The rates of a contender's runs, when it ran more than once."""
    rates = contender.get("runs_events_per_s", [])
    return "; ".join(f"{r:,}" for r in rates) if len(rates) > 1 else "-"


def _latency_cells(r: dict[str, Any]) -> list[str]:
    """One row of the latency table, as text (the printed table and RESULTS.md)."""
    cpu = r.get("cpu_pct", {})
    return [
        r["contender"],
        f"{r['offered_load']:.0%}",
        f"{r['offered_events_per_s']:,}",
        "-" if r["triggers"] is None else str(r["triggers"]),
        str(r["p50_ms"]),
        str(r["p99_ms"]),
        " / ".join(str(cpu.get(k, "-")) for k in ("contender", "broker", "generator")),
    ]


def _fetch_words(fetch_bytes: int | None) -> str:
    if fetch_bytes is None:
        return "an unrecorded size"
    if not fetch_bytes:
        return "librdkafka's own 1 MiB"
    return (
        f"{fetch_bytes / (1 << 20):g} MiB" if fetch_bytes % (1 << 10) == 0 else f"{fetch_bytes} B"
    )


def _write_results_md(results: dict[str, Any], path: Path) -> None:
    """Replace the harness section of bench/RESULTS.md with this run's tables."""
    lines = [
        RESULTS_START,
        "### Latest harness run (written by the harness)",
        "",
        f"Command: `python -m crmstream.bench.harness {' '.join(sys.argv[1:])}`; "
        f"machine: {results['machine']}; plot: `bench/harness.png`.",
        "",
        f"Every contender's consumer fetched {_fetch_words(results.get('fetch_bytes'))} "
        "per partition (`--fetch-bytes`, bench/README.md).",
    ]
    for run in results["runs"]:
        lines += ["", f"{run['customers']:,} customers, {run['events']:,} events:", ""]
        lines += [
            f"| contender | events/s | {RUNS_COLUMN} | ratio to ceiling | peak RSS MiB/proc "
            f"| state B/customer | {CPU_COLUMN} |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for c in run["contenders"]:
            rss = ", ".join(map(str, c["peak_rss_mb"]))
            lines.append(
                f"| {c['name']} | {c['events_per_s']:,} | {_runs_cell(c)} | "
                f"{c['ratio_to_ceiling']:.3f} | {rss} | {c['state_bytes_per_customer'] or ''} "
                f"| {_cpu_cell(c.get('cpu_pct'))} |"
            )
        lines += ["", f"Ratios: {run['ratios']}", ""]
        if any(len(c.get("runs_events_per_s", [])) > 1 for c in run["contenders"]):
            lines += [RUNS_NOTE, ""]
        lines.append(CPU_NOTE)
        if run.get("latency"):
            lines += [
                "",
                "| " + " | ".join(LATENCY_COLUMNS) + " |",
                "|---|" + "---:|" * (len(LATENCY_COLUMNS) - 1),
            ]
            lines += ["| " + " | ".join(_latency_cells(r)) + " |" for r in run["latency"]]
            linger = results.get("generator_linger_ms", "?")
            lines += [
                "",
                f"{LATENCY_NOTE} The live generator's producer lingers {linger} ms "
                "(bench/README.md); that wait counts as latency.",
            ]
    lines.append(RESULTS_END)
    text = path.read_text() if path.exists() else "# Benchmark results\n"
    block = "\n".join(lines)
    if RESULTS_START in text and RESULTS_END in text:
        head, rest = text.split(RESULTS_START, 1)
        text = head + block + rest.split(RESULTS_END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text)


def _trigger_latencies(endpoints: Any, topic: str) -> list[float]:
    """emitted_at - event_time of every trigger on the topic, in ms (live input: the event
    time is the wall clock when the generator sent it, ``workload.publish_scheduled``)."""
    from datetime import datetime

    from crmstream.ops import TopicReader

    out = []
    with TopicReader(list(endpoints.brokers), {}, [topic], 30) as reader:
        records = reader.latest(lambda _records: False)  # the whole topic
    for rec in records:
        emitted = datetime.fromisoformat(rec.value["emitted_at"]).timestamp()
        at = datetime.fromisoformat(rec.value["event_time"]).timestamp()
        out.append((emitted - at) * 1000)
    return out


def _cpu_seconds(pid: int | None) -> float | None:
    """CPU time (user + system, all threads) a live process has used, from /proc."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _idle_seconds() -> float | None:
    """Idle time of all the machine's cores together (idle + iowait), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    return (int(fields[4]) + int(fields[5])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)


def _plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = results["runs"]
    fig, axes = plt.subplots(len(runs), 2, figsize=(13, 4.5 * len(runs)), squeeze=False)
    for row, run in zip(axes, runs, strict=True):
        names = [c["name"] for c in run["contenders"]]
        rates = [c["events_per_s"] for c in run["contenders"]]
        row[0].barh(names, rates, color="#4477aa")
        row[0].set_xlabel("events/s")
        row[0].set_title(f"throughput, {run['customers']:,} customers")
        row[0].invert_yaxis()
        for contender in sorted({r["contender"] for r in run.get("latency", [])}):
            points = [r for r in run["latency"] if r["contender"] == contender and r["p99_ms"]]
            row[1].plot(
                [p["offered_events_per_s"] for p in points],
                [p["p99_ms"] for p in points],
                marker="o",
                label=f"{contender} p99",
            )
        row[1].axhline(500, color="grey", linestyle="--", label="500 ms target")
        row[1].set_yscale("log")
        row[1].set_xlabel("offered events/s")
        row[1].set_ylabel("event → trigger, ms")
        row[1].set_title("latency against offered load")
        row[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("ceiling", "crmstream", "floor"):
        _child_main(argv)
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--customers", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument("--events", type=int, default=None, help="default: 2 per customer")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--loads", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--load-seconds", type=float, default=20)
    parser.add_argument("--startup-s", type=float, default=8)
    parser.add_argument("--drain-s", type=float, default=5)
    parser.add_argument(
        "--generator-linger-ms",
        type=int,
        default=25,
        help="linger.ms of the live generator's producer (bench/README.md, latency)",
    )
    parser.add_argument(
        "--crm-set", action="append", default=[], help="extra crmstream config key=value"
    )
    parser.add_argument(
        "--fetch-bytes",
        type=int,
        default=BENCH_FETCH_BYTES,
        help="max.partition.fetch.bytes of every contender's consumer, the ceiling's and "
        "the latency floor's included (0: librdkafka's own 1 MiB; bench/README.md)",
    )
    parser.add_argument("--no-quix", action="store_true")
    parser.add_argument(
        "--no-naive", action="store_true", help="leave the naive baseline out (quicker A/B runs)"
    )
    parser.add_argument("--no-latency", action="store_true")
    parser.add_argument(
        "--repeats",
        type=int,
        default=3,
        help="runs of each ceiling and crmstream contender, in turn; each is reported by "
        "its median run (the naive baseline and Quix Streams run once)",
    )
    parser.add_argument(
        "--smoke", action="store_true", help="tiny sizes: keeps the harness working"
    )
    parser.add_argument("--out", default=str(ROOT / "bench" / "out"))
    parser.add_argument(
        "--results",
        default=str(ROOT / "bench" / "RESULTS.md"),
        help="Markdown file whose harness section is replaced (empty: leave it alone)",
    )
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    if args.smoke:
        args.customers, args.events, args.loads, args.repeats = [2_000], 6_000, [0.5], 2
        args.load_seconds, args.startup_s, args.drain_s = 4, 6, 3
    Harness(args).run()


if __name__ == "__main__":
    main()
