"""Connecting to Redis: the client the store and the commands use, its retries and the
one-line reasons a connection is refused (TLS, authentication).

Split out of ``state.store`` (which re-exports these names): this module owns how a
client is made and retried, the store what it reads and writes.
"""

from __future__ import annotations

import logging
import time

import redis
from redis.backoff import ExponentialWithJitterBackoff, NoBackoff
from redis.cluster import RedisCluster
from redis.exceptions import AuthorizationError
from redis.retry import Retry

from crmstream.config.schema import RedisConfig
from crmstream.metrics import get_metrics

log = logging.getLogger("crmstream.state.store")  # the logger these lines always had


class StateStoreError(RuntimeError):
    """Redis refused the store's request for a reason a retry will not fix."""


class ObservedRetry(Retry):
    """redis-py's retry with jittered backoff that also logs and counts each failure, and
    gives up once a call has been failing for ``budget_s`` whatever the attempts left
    (``redis.retry_budget_seconds``): with Redis frozen each attempt waits the socket
    timeout, and 30 attempts of 10 s were minutes."""

    def __init__(self, *args: object, budget_s: float | None = None, **kwargs: object):
        super().__init__(*args, **kwargs)
        self._budget_s = budget_s

    def call_with_retry(self, do, fail, is_retryable=None, with_failure_count=False):
        deadline = None if self._budget_s is None else time.monotonic() + self._budget_s

        def observed(error: Exception, *count: int) -> object:
            get_metrics().redis_errors.labels(type(error).__name__).inc()
            if deadline is not None and time.monotonic() >= deadline:
                raise error  # the budget is spent: no more attempts
            log.warning(
                "Redis call failed (%s: %s); retrying with backoff", type(error).__name__, error
            )
            return fail(error, *count)

        def retryable(error: Exception) -> bool:
            if _permanent(error):
                return False
            return is_retryable(error) if is_retryable is not None else True

        return super().call_with_retry(do, observed, retryable, with_failure_count)


def _permanent(error: Exception) -> bool:
    """Errors no retry fixes: bad credentials, missing permissions, TLS refused either way."""
    if isinstance(error, redis.AuthenticationError | AuthorizationError):
        return True
    return tls_failure(error) is not None


# TLS failures no retry fixes, as OpenSSL words them, and what each means for the user.
_TLS_FAILURES = (
    ("certificate verify failed", "the server's certificate is not trusted (redis.tls_ca_file)"),
    (
        "certificate_required",
        "the server requires a client certificate (redis.tls_cert_file, redis.tls_key_file)",
    ),
    (
        "certificate required",
        "the server requires a client certificate (redis.tls_cert_file, redis.tls_key_file)",
    ),
    ("unknown ca", "the server does not trust the client certificate's CA"),
    ("bad certificate", "the server refused the client certificate"),
    ("wrong_version_number", "the server does not speak TLS: use a redis:// URL"),
    ("wrong version number", "the server does not speak TLS: use a redis:// URL"),
)


def tls_failure(error: BaseException) -> str | None:
    """What a TLS failure no retry fixes means (None for anything else): the error's own
    text or its cause's (redis-py wraps the ``ssl`` error)."""
    texts = [str(error), str(error.__cause__ or error.__context__ or "")]
    text = " ".join(texts).lower()
    for needle, meaning in _TLS_FAILURES:
        if needle in text:
            return f"{meaning} ({' '.join(texts[0].split())})"
    return None


def connect(url: str, config: RedisConfig) -> redis.Redis:
    """A client that retries transient errors with jittered backoff and fails fast otherwise.

    Connection loss, timeouts and a loading replica are retried; authentication
    and configuration errors (``AuthenticationError``, ``ResponseError``) are not.
    """
    retry = ObservedRetry(
        ExponentialWithJitterBackoff(base=config.retry_base_seconds, cap=config.retry_max_seconds),
        retries=config.retry_attempts,
        supported_errors=(
            redis.ConnectionError,
            redis.TimeoutError,
            redis.BusyLoadingError,
        ),
        budget_s=config.retry_budget_seconds,
    )
    options: dict[str, object] = {
        **credentials(url, config),
        "socket_timeout": config.socket_timeout_seconds,
        "socket_connect_timeout": config.socket_timeout_seconds,
        "retry": retry,
    }
    if config.cluster:  # any node's address: the client discovers the others
        client = RedisCluster.from_url(url, **options)
    else:
        # No health checks: redis-py runs an idle connection's check inside a command's
        # attempt with the same retry, so a frozen Redis multiplied the attempts (a call
        # was still retrying after 20 minutes). A dead idle connection fails its next
        # command instead, and that command is retried.
        client = redis.Redis.from_url(url, **options, health_check_interval=0)
    try:
        client.ping()
    except (redis.AuthenticationError, AuthorizationError) as exc:
        raise StateStoreError(f"Redis at {safe_url(url)} refused authentication: {exc}") from None
    except redis.ConnectionError as exc:
        hint = tls_failure(exc)
        if hint is not None:
            raise StateStoreError(f"Redis at {safe_url(url)}: {hint}") from None
        raise StateStoreError(f"cannot reach Redis at {safe_url(url)}: {exc}") from None
    except redis.ResponseError as exc:  # e.g. NOAUTH, or WRONGPASS for an ACL user
        raise StateStoreError(f"Redis at {safe_url(url)} refused the client: {exc}") from None
    return client


def credentials(url: str, config: RedisConfig) -> dict[str, str]:
    """redis-py's options for the configured user, password and TLS files."""
    auth: dict[str, str] = {}
    if config.username:
        auth["username"] = config.username
    if config.password:
        auth["password"] = config.password
    if url.startswith("rediss://"):
        for option, path in (
            ("ssl_ca_certs", config.tls_ca_file),
            ("ssl_certfile", config.tls_cert_file),
            ("ssl_keyfile", config.tls_key_file),
        ):
            if path:
                auth[option] = path
    return auth


def single_attempt(client: redis.Redis) -> redis.Redis:
    """A client on the same server, credentials and TLS as ``client`` whose calls fail
    at the first error instead of retrying."""
    pool = client.connection_pool
    kwargs = {**pool.connection_kwargs, "retry": Retry(NoBackoff(), 0)}
    return redis.Redis(
        connection_pool=redis.ConnectionPool(connection_class=pool.connection_class, **kwargs)
    )


def safe_url(url: str) -> str:
    """The URL with its credentials masked."""
    _head, sep, tail = url.rpartition("@")
    return f"{url.split('://')[0]}://***@{tail}" if sep else url
