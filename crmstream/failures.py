"""How a failure ends a command: its exit code, and one line instead of a traceback.

This module owns crmstream's exit codes (README, "Exit codes") and the message
for each failure a user can act on: configuration, infrastructure that cannot
be reached or refuses us (Kafka, Redis, authentication, TLS), state written
with other settings, a Bytewax cluster process that stopped. ``describe``
finds the cause under Bytewax's wrappers (an exception raised inside a step
reaches the caller as ``BytewaxRuntimeError`` chained to it). Anything it does
not recognise is a bug: the command prints the traceback and exits with
``EXIT_INTERNAL``.
"""

from __future__ import annotations

import ssl

EXIT_OK = 0  # done; also a run stopped by SIGTERM/SIGINT that drained in time
EXIT_NOT_FOUND = 1  # the query ran and found nothing (explain, profile, dead-letters)
EXIT_ERROR = 2  # a failure the user can act on, reported in one line
EXIT_DRAIN_TIMEOUT = 3  # stopped by a signal, but the drain did not finish in time
EXIT_INTERNAL = 70  # a bug (EX_SOFTWARE): the traceback is printed
EXIT_INTERRUPTED = 130  # Ctrl-C of a command that does not drain (demo)

EXIT_CODES = {
    EXIT_OK: "success; for `run`, also a stop by SIGTERM or SIGINT that drained in time",
    EXIT_NOT_FOUND: "nothing found: no such trigger id, customer or dead letter; also an output "
    "whose reader stopped reading (piped to `head`), as click ends it",
    EXIT_ERROR: "an error reported in one line: usage, configuration, Kafka or Redis "
    "unreachable or refusing (authentication, TLS), state layout, a cluster peer that stopped, "
    "a `reshard` confirmation answered no",
    EXIT_DRAIN_TIMEOUT: "`run` stopped by a signal, but the drain did not finish within "
    "`processing.drain_timeout_seconds` (the state stays consistent; the next start resumes)",
    EXIT_INTERNAL: "an internal error (a bug): the traceback is printed",
    EXIT_INTERRUPTED: "interrupted with Ctrl-C (demo, replay; `--follow` views end with 0)",
}


class CommandError(RuntimeError):
    """A failure whose message is the whole report (exit 2)."""


def root_cause(exc: BaseException) -> BaseException:
    """The exception under Bytewax's ``BytewaxRuntimeError`` wrappers."""
    seen = set()
    while type(exc).__name__ == "BytewaxRuntimeError" and id(exc) not in seen:
        seen.add(id(exc))
        inner = exc.__cause__ or exc.__context__
        if inner is None:
            break
        exc = inner
    return exc


def _first_line(text: str) -> str:
    return " ".join(text.split())


def describe(exc: BaseException) -> str | None:
    """One line for a failure the user can act on; None for anything else (a bug)."""
    import redis
    from confluent_kafka import KafkaException

    from crmstream.config import ConfigError
    from crmstream.embedded import EmbeddedStackError
    from crmstream.flows.crm import RecoveryStoreError
    from crmstream.flows.replay import ReplayError
    from crmstream.flows.sink import DeliveryError
    from crmstream.flows.source import SourceError
    from crmstream.state.commands import PartialTransaction
    from crmstream.state.encoding import StateEncodingError
    from crmstream.state.layout import LayoutError
    from crmstream.state.store import StateStoreError, tls_failure
    from crmstream.topics import TopicError

    cause = root_cause(exc)
    if isinstance(cause, ConfigError):
        return str(cause)  # may list several keys, one per line
    ours = (
        CommandError,
        StateStoreError,
        LayoutError,
        RecoveryStoreError,
        SourceError,
        TopicError,
        DeliveryError,
        EmbeddedStackError,
        ReplayError,
        StateEncodingError,
    )
    if isinstance(cause, ours):
        return _first_line(str(cause))
    if isinstance(cause, redis.AuthenticationError):
        return f"Redis refused authentication: {_first_line(str(cause))}"
    if isinstance(cause, PartialTransaction):
        what = (
            "a key crmstream writes holds another kind of value (edited by hand?)"
            if "WRONGTYPE" in str(cause)
            else "a value Redis does not accept (please report it)"
        )
        return (
            f"Redis refused a command of a commit as it ran it ({_first_line(str(cause))}): "
            f"{what}. The rest of that commit was applied, so its step counts as done "
            "without this write; put the key right before starting again (docs/operations.md, "
            '"Recovery after failures")'
        )
    if isinstance(cause, redis.ResponseError) and "WRONGTYPE" in str(cause):
        return (
            f"Redis refused a command on a key of the wrong type ({_first_line(str(cause))}): "
            "a key crmstream writes holds another kind of value (edited by hand?); put it "
            "right or remove it before starting"
        )
    if isinstance(cause, redis.RedisError):
        hint = tls_failure(cause)
        if hint:
            return f"Redis: {hint}"
        return (
            f"Redis failed beyond its retry budget ({type(cause).__name__}: "
            f"{_first_line(str(cause))}); restart once Redis answers again (nothing is lost)"
        )
    if isinstance(cause, ssl.SSLError):
        return f"TLS: {_first_line(str(cause))}"
    if isinstance(cause, KafkaException):
        err = cause.args[0] if cause.args else None
        text = err.str() if hasattr(err, "str") else str(cause)
        return f"Kafka: {_first_line(text)}"
    if type(cause).__name__ == "PanicException":
        return (
            f"the Bytewax cluster stopped ({_first_line(str(cause))}): another process of the "
            "cluster exited or cannot be reached; check its log. Every process resumes from "
            "Redis when the cluster starts again"
        )
    return None
