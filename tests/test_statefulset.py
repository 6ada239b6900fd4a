"""`crmstream run --statefulset`: -i and -a from the pod's name and the replica count, and
the wait until every address resolves (a rollout used to crash-loop: Bytewax exits within
seconds when its own -a name does not resolve yet)."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from crmstream.cluster import statefulset_peers, wait_for_peers
from crmstream.failures import CommandError


def test_index_and_addresses_come_from_the_pod_name_and_replicas():
    assert statefulset_peers("crmstream-1", 3, None, 2101) == (
        1,
        ["crmstream-0.crmstream:2101", "crmstream-1.crmstream:2101", "crmstream-2.crmstream:2101"],
    )
    # A StatefulSet name with dashes; its own headless Service name.
    assert statefulset_peers("crm-stream-eu-0", 2, "crm-headless", 7000) == (
        0,
        ["crm-stream-eu-0.crm-headless:7000", "crm-stream-eu-1.crm-headless:7000"],
    )
    with pytest.raises(CommandError, match="does not end in -<ordinal>"):
        statefulset_peers("laptop", 2, None, 2101)
    with pytest.raises(CommandError, match="ordinal 2 but --replicas is 2"):
        statefulset_peers("crmstream-2", 2, None, 2101)


class _FakeTime:
    def __init__(self) -> None:
        self.now = 0.0

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


def test_waits_until_every_address_resolves_and_says_which_it_waits_for(caplog):
    fake = _FakeTime()
    appear_at = {"crmstream-0.crmstream": 0.0, "crmstream-1.crmstream": 25.0}
    asked: list[str] = []

    def resolves(host: str) -> bool:
        asked.append(host)
        return fake.now >= appear_at[host]

    addresses = ["crmstream-0.crmstream:2101", "crmstream-1.crmstream:2101"]
    with caplog.at_level(logging.WARNING, logger="crmstream.cluster"):
        wait_for_peers(addresses, 300, resolves, fake.clock, fake.sleep, report_every_s=10)
    assert fake.now >= 25.0
    said = [r.getMessage() for r in caplog.records]
    assert said and all("crmstream-1.crmstream" in m for m in said), said
    assert "crmstream-0.crmstream" not in said[0].split(":", 1)[1]  # resolved at once
    assert len(said) <= 3  # every 10 s, not every try
    assert asked.count("crmstream-0.crmstream") == 1  # a resolved name is not asked again


def test_gives_up_with_a_clear_message_naming_what_does_not_resolve():
    fake = _FakeTime()
    with pytest.raises(CommandError) as err:
        wait_for_peers(["a.svc:1", "b.svc:1"], 60, lambda h: h == "a.svc", fake.clock, fake.sleep)
    message = str(err.value)
    assert "after 60 s: b.svc" in message and "publishNotReadyAddresses" in message
    assert "a.svc" not in message.split(":", 1)[1].split(";")[0]


def test_run_statefulset_needs_a_statefulset_pod_name():
    """Through the CLI: a one-line error, exit 2."""
    env = {**os.environ, "HOSTNAME": "laptop", "CRMSTREAM_REPLICAS": "2"}
    result = subprocess.run(
        [sys.executable, "-m", "crmstream", "run", "--statefulset", "--brokers", "127.0.0.1:9",
         "--redis-url", "redis://127.0.0.1:9/0"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    assert result.stderr.strip().splitlines() == [
        "error: --statefulset: the pod name 'laptop' does not end in -<ordinal>; is this a "
        "StatefulSet's pod? (HOSTNAME or --pod-name)"
    ]


@pytest.mark.slow  # a fault test: the slow suite (keeps the default one under 15 min)
def test_a_sigterm_while_waiting_for_peers_ends_the_wait_with_exit_0(tmp_path):
    """A pod deleted while its peers do not resolve yet stops at once and cleanly."""
    import signal

    config = tmp_path / "c.yaml"
    config.write_text("kafka: {brokers: [127.0.0.1:9]}\nredis: {url: redis://127.0.0.1:9/0}\n"
                      "processing: {drain_timeout_seconds: 600}\n")  # fmt: skip
    proc = subprocess.Popen(
        [sys.executable, "-m", "crmstream", "run", "--config", str(config), "-i", "0",
         "-a", "127.0.0.1:9", "-a", "crmstream-1.nowhere.invalid:2101", "--peer-wait", "600"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # the wait reports itself every 10 s
            if "waiting for 1 of 2 cluster addresses" in line:
                break
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "stopped before the flow started" in err
