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
