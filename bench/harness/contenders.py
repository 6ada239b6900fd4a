"""The contenders the harness runs, as commands, and the virtualenvs they need.

This module owns how each contender is started: crmstream and the ceiling as
roles of this package (``children``), the naive baseline as
``crmstream.bench.naive``, and the peers that run in their own virtualenvs
because their pins clash with crmstream's or their dependencies are heavy:
Quix Streams (``.venv-quix``, ``bench/quix_job.py``) and Pathway
(``.venv-pathway``, ``bench/pathway_job.py``). Every consumer gets the same
fetch size (``children.fetch_config``).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

from crmstream.bench.harness.children import fetch_config

ROOT = Path(__file__).resolve().parents[2]
QUIX_VENV = ROOT / ".venv-quix"
QUIX_VERSION = "3.28.1"
PATHWAY_VENV = ROOT / ".venv-pathway"
PATHWAY_VERSION = "0.33.0"
# Pathway's latency runs: its reader hands rows to the dataflow every this many ms
# (Pathway's own default, 1500, is kept for the throughput runs).
PATHWAY_LATENCY_AUTOCOMMIT_MS = 100


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


def _pathway_cmd(
    python: Path,
    brokers: str,
    topics: str,
    triggers: str,
    group: str,
    expect_rows: int = 0,
    fetch_bytes: int = 0,
    autocommit_ms: int | None = None,
) -> list[str]:
    """The Pathway job; ``expect_rows`` 0 runs it until it is stopped (latency)."""
    cmd = [
        str(python),
        str(ROOT / "bench" / "pathway_job.py"),
        "--brokers", brokers,
        "--topics", topics,
        "--triggers", triggers,
        "--group", group,
        "--expect-rows", str(expect_rows),
        "--fetch-bytes", str(fetch_bytes),
    ]  # fmt: skip
    return cmd + (["--autocommit-ms", str(autocommit_ms)] if autocommit_ms else [])


def pathway_env(threads: int) -> dict[str, str]:
    """The environment of a Pathway job with ``threads`` worker threads."""
    import os

    return {**os.environ, "PATHWAY_THREADS": str(threads)}


class PeerUnavailable(RuntimeError):
    """A peer contender cannot be installed or run here; the message says why."""


def ensure_pathway_venv(log: Any) -> Path:
    """``.venv-pathway`` with pathway, made when missing or holding another version.

    Pathway brings about a hundred packages crmstream does not use (Google Cloud
    clients, Panel and Bokeh, scikit-learn, deltalake): none clashes with crmstream's
    pins (``pip install --dry-run`` in .venv), but they stay out of its environment.

    :raises PeerUnavailable: naming the step that failed and its last output line.
    """
    python = PATHWAY_VENV / "bin" / "python"
    probe = [str(python), "-c", "import pathway; print(pathway.__version__)"]

    def version() -> str:
        run = subprocess.run(probe, capture_output=True, text=True, timeout=300)
        if run.returncode != 0:
            lines = (run.stderr or run.stdout).strip().splitlines() or ["no output"]
            raise PeerUnavailable(f"importing pathway failed: {lines[-1]}")
        return run.stdout.strip()

    try:
        if python.exists() and version() == PATHWAY_VERSION:
            return python
        log(f"creating {PATHWAY_VENV.name} with pathway {PATHWAY_VERSION} (about 1.6 GB) ...")
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", str(PATHWAY_VENV)], check=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", f"pathway=={PATHWAY_VERSION}"]
        run = subprocess.run(pip, capture_output=True, text=True, timeout=1800)
        if run.returncode != 0:
            lines = run.stderr.strip().splitlines() or ["no output"]
            raise PeerUnavailable(f"pip install pathway=={PATHWAY_VERSION} failed: {lines[-1]}")
        found = version()
    except (subprocess.SubprocessError, OSError) as exc:
        raise PeerUnavailable(f"cannot set up {PATHWAY_VENV.name}: {exc}") from exc
    if found != PATHWAY_VERSION:
        raise PeerUnavailable(f"{PATHWAY_VENV.name} holds pathway {found}, not {PATHWAY_VERSION}")
    return python
