"""Up-front checks that the infrastructure a command needs answers, before any work starts.

This module owns the connectivity checks every command makes first. Kafka: a
metadata request, and that the topics the command reads or writes exist.
Redis: a PING with the configured credentials and TLS files. Each check gives
up after ``kafka.connect_timeout_seconds`` / ``redis.connect_timeout_seconds``
(10 s by default) with one line that says what is wrong (``PreflightError``).
Failures no retry fixes are reported at once: authentication refused, an
untrusted server certificate, a server that wants a client certificate, TLS
spoken to a plain port or plain text to a TLS port.

Without these checks, an unreachable broker showed nothing for 33 s and then a
traceback, and Redis refusing a TLS handshake was retried for minutes.
"""

from __future__ import annotations

import logging
import socket
import ssl
import time
from collections.abc import Iterable
from typing import Any
from urllib.parse import urlparse

import redis
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient
from redis.backoff import NoBackoff
from redis.exceptions import AuthorizationError
from redis.retry import Retry

from crmstream.clients import librdkafka_config
from crmstream.config.schema import RedisConfig
from crmstream.failures import CommandError
from crmstream.state.store import credentials, safe_url, tls_failure

log = logging.getLogger(__name__)


class PreflightError(CommandError):
    """The infrastructure a command needs does not answer, or refuses it."""


# -- Redis --------------------------------------------------------------------------


def check_redis(url: str, config: RedisConfig, timeout_s: float | None = None) -> None:
    """PING Redis as the flow will connect to it, retrying transient errors until
    ``timeout_s`` (default ``redis.connect_timeout_seconds``).

    :raises PreflightError: naming the server (credentials masked) and the reason.
    """
    timeout_s = config.connect_timeout_seconds if timeout_s is None else timeout_s
    deadline = time.monotonic() + timeout_s
    # A few attempts fit in the budget: a TLS handshake to a plain port hangs until the
    # attempt's timeout, and is recognised after the first one.
    attempt_s = max(0.5, min(config.socket_timeout_seconds, timeout_s / 3))
    where = safe_url(url)
    log.info("asking Redis at %s for PONG (up to %g s)", where, timeout_s)
    delay = 0.1
    while True:
        client = redis.Redis.from_url(
            url,
            **credentials(url, config),
            socket_timeout=attempt_s,
            socket_connect_timeout=attempt_s,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
            return
        except (redis.AuthenticationError, AuthorizationError) as exc:
            raise PreflightError(f"Redis at {where} refused authentication: {exc}") from None
        except redis.ResponseError as exc:  # NOAUTH, WRONGPASS, ...
            raise PreflightError(f"Redis at {where} refused the client: {exc}") from None
        except redis.RedisError as exc:
            hint = tls_failure(exc) or _wrong_protocol(url, config, exc, attempt_s)
            if hint is not None:
                raise PreflightError(f"Redis at {where}: {hint}") from None
            last = " ".join(str(exc).split())
        finally:
            client.close()
        if time.monotonic() + delay >= deadline:
            raise PreflightError(f"cannot reach Redis at {where} within {timeout_s:g} s: {last}")
        time.sleep(delay)
        delay = min(2 * delay, 1.0)


def _wrong_protocol(
    url: str, config: RedisConfig, error: Exception, timeout_s: float
) -> str | None:
    """When a connection broke or hung in a way a protocol mismatch explains, ask the
    port itself: a TLS client's handshake sent to a plain Redis port hangs (Redis reads
    it as an unfinished command), and a plain client's command sent to a TLS port is
    answered by a reset."""
    parsed = urlparse(url)
    if parsed.scheme not in ("redis", "rediss") or parsed.hostname is None:
        return None
    host, port = parsed.hostname, parsed.port or 6379
    text = f"{error} {error.__cause__ or error.__context__ or ''}".lower()
    timed_out = "timed out" in text or "timeout" in text
    if parsed.scheme == "rediss" and timed_out and _answers_plain_ping(host, port, timeout_s):
        return (
            f"the server at {host}:{port} answers plain text, not TLS (the TLS "
            "handshake got no answer): use a redis:// URL or the server's TLS port"
        )
    broken = any(
        n in text
        for n in ("reset by peer", "closed by server", "error while", "eof occurred", "broken pipe")
    )
    if parsed.scheme == "rediss" and broken:
        # TLS 1.3: the server checks the client's certificate after the handshake and
        # answers with an alert; a client that writes first may see only the closed
        # connection. Listening first shows the alert.
        refusal = _tls_refusal(host, port, config, timeout_s)
        if refusal is not None:
            return refusal
    if parsed.scheme == "redis" and broken and _speaks_tls(host, port, timeout_s):
        return (
            f"the server at {host}:{port} speaks TLS: use a rediss:// URL (with redis.tls_ca_file)"
        )
    return None


def _tls_refusal(host: str, port: int, config: RedisConfig, timeout_s: float) -> str | None:
    """What the server's TLS alert says when it refuses this client after the
    handshake (no client certificate, an unknown CA); None when it stays silent."""
    context = ssl.create_default_context(cafile=config.tls_ca_file)
    context.check_hostname = False
    if config.tls_cert_file:
        context.load_cert_chain(config.tls_cert_file, config.tls_key_file)
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=host) as tls,
        ):
            tls.settimeout(min(timeout_s, 2.0))
            tls.recv(1)  # a server that accepted us waits for a command
    except ssl.SSLError as exc:
        return tls_failure(exc)
    except OSError:
        return None
    return None


def _answers_plain_ping(host: str, port: int, timeout_s: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError:
        return False
    return reply.startswith((b"+PONG", b"-NOAUTH", b"-ERR", b"-WRONGPASS"))


def _speaks_tls(host: str, port: int, timeout_s: float) -> bool:
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    try:
        with (
            socket.create_connection((host, port), timeout=timeout_s) as sock,
            context.wrap_socket(sock, server_hostname=host),
        ):
            return True
    except ssl.SSLError as exc:
        # The server answered with a TLS alert (e.g. it wants a client certificate).
        return "alert" in str(exc).lower()
    except OSError:
        return False


# -- Kafka --------------------------------------------------------------------------

# librdkafka errors no retry fixes (SASL refused, TLS failed, a fatal client error).
_PERMANENT_KAFKA = {KafkaError._AUTHENTICATION, KafkaError._SSL, KafkaError._INVALID_ARG}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        args = record.args if isinstance(record.args, tuple) else ()
        if args and args[0] in ("FAIL", "ERROR"):
            self.lines.append(str(args[-1]).split("]: ", 1)[-1])


def check_kafka(
    brokers: list[str],
    properties: dict[str, Any],
    timeout_s: float,
    topics: Iterable[str] = (),
) -> None:
    """Ask the brokers for metadata (with ``properties``: ``kafka.client`` and the
    command's kind) until ``timeout_s``, then check that ``topics`` exist.

    librdkafka's own lines are collected rather than logged: the one error line
    says what it saw last.

    :raises PreflightError: naming the brokers and the reason, or the missing topics.
    """
    logger = logging.getLogger("crmstream.preflight.librdkafka")
    logger.propagate = False
    logger.setLevel(logging.DEBUG)
    collected = _Collect()
    logger.addHandler(collected)
    refused: list[str] = []
    seen: list[str] = []

    def on_error(err: KafkaError) -> None:
        seen.append(err.str())
        if err.fatal() or err.code() in _PERMANENT_KAFKA or "SSL handshake failed" in err.str():
            refused.append(err.str())

    where = ",".join(brokers)
    log.info("asking the Kafka brokers %s for metadata (up to %g s)", where, timeout_s)
    config = {**librdkafka_config(brokers, properties), "logger": logger, "error_cb": on_error}
    try:
        admin = AdminClient(config)
    except KafkaException as exc:
        logger.removeHandler(collected)
        raise PreflightError(f"Kafka client configuration: {exc.args[0].str()}") from None
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            try:
                metadata = admin.list_topics(
                    timeout=max(0.1, min(1.0, deadline - time.monotonic()))
                )
                break
            except KafkaException:
                admin.poll(0)  # serve the error callback and the logger
            if refused:
                raise PreflightError(f"Kafka brokers {where} refused the client: {refused[-1]}")
            if time.monotonic() >= deadline:
                reason = (collected.lines or seen or [""])[-1]
                raise PreflightError(
                    f"cannot reach the Kafka brokers {where} within {timeout_s:g} s: "
                    + (
                        reason
                        or "no answer (does kafka.client's security.protocol match the listener?)"
                    )
                )
    finally:
        logger.removeHandler(collected)
    missing = [
        t for t in topics if t not in metadata.topics or metadata.topics[t].error is not None
    ]
    if missing:
        raise PreflightError(
            f"topic(s) {', '.join(missing)} do not exist on {where}: create them with "
            "`crmstream topics create` (or check kafka.topics)"
        )
