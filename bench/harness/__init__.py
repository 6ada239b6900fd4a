"""The benchmark harness: crmstream against its ceiling, a naive baseline, Quix and Pathway.

One command (``make bench-all``, or ``python -m crmstream.bench.harness``)
writes one recorded shop workload to the input topics, then every contender
reads that same topic on the same broker and Redis, one after another:

1. ceiling: a raw confluent-kafka consume + orjson parse loop, as many
   processes as crmstream uses;
2. crmstream: the full flow (state model, triggers, policies), 1 process and
   2 processes (Bytewax ``-i``/``-a``);
3. naive: the tutorial-style Bytewax flow (``bench/naive.py``): ``key_on`` and a
   per-event stateful step doing one Redis GET and one SET per event;
4. Quix Streams (``bench/quix_job.py``) in its own virtualenv ``.venv-quix``;
5. Pathway (``bench/pathway_job.py``), 1 and 2 threads, in ``.venv-pathway``;
6. the hot-key stress run: the ceiling and crmstream on the Zipf 1.1 workload,
   with each shard's progress over its own input (``shards``).

For each: events/s and the ratio to the ceiling, CPU µs per event, peak RSS
per process, state bytes per customer; then p50/p99 event-to-trigger latency
with the contender tailing live input offered at 25/50/75 % of crmstream's
measured maximum, next to a "kafka floor" (a raw consumer of the same live
input, no processing), with the CPU the contender, the broker and the
generator used meanwhile, and how late crmstream's timers fired.
Writes ``<out>/harness.json``, ``<out>/harness.png`` and prints a table. Every
figure is a ratio within one run; the machine is shared and noisy.
``--smoke`` runs everything on a tiny input to keep the harness working (CI).

Each contender also runs as ``python -m crmstream.bench.harness <role> ...``
(a child process that prints one JSON line), so the harness can measure its
resident memory and run several at once.

The package's parts: ``children`` (the roles run in a contender's process),
``contenders`` (the commands and the peers' virtualenvs), ``measure`` (a
child's report and RSS, CPU sampling, results), ``runs`` (one size, every
contender in turn), ``shards`` (the hot-key run's shard progress),
``latency`` (the latency rows), ``report`` (tables and RESULTS.md), ``plot``
and ``cli``. The names the tests and other benchmarks
import are re-exported here.
"""

from __future__ import annotations

from crmstream.bench.harness.children import (
    BENCH_FETCH_BYTES,
    Stopwatch,
    _listening,
    await_peers,
    consume_and_parse,
    fetch_config,
    kafka_floor,
)
from crmstream.bench.harness.cli import main
from crmstream.bench.harness.contenders import (
    QUIX_VENV,
    QUIX_VERSION,
    ROOT,
    _crm_cmd,
    _naive_cmd,
    _quix_cmd,
    ensure_quix_venv,
)
from crmstream.bench.harness.measure import Child, CpuWatch, Result, median_run, together
from crmstream.bench.harness.report import _fetch_words, _runs_cell, write_results_md

__all__ = [
    "BENCH_FETCH_BYTES",
    "QUIX_VENV",
    "QUIX_VERSION",
    "ROOT",
    "Child",
    "CpuWatch",
    "Result",
    "Stopwatch",
    "_crm_cmd",
    "_fetch_words",
    "_listening",
    "_naive_cmd",
    "_quix_cmd",
    "_runs_cell",
    "await_peers",
    "consume_and_parse",
    "ensure_quix_venv",
    "fetch_config",
    "kafka_floor",
    "main",
    "median_run",
    "together",
    "write_results_md",
]
