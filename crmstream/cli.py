"""The ``crmstream`` command line: the app, its global options, run, reshard, topics, config.

This module owns argument parsing, the global options (``--version``,
``--log-format``, ``--log-level``) and how a command ends: every failure a
user can act on becomes one line and exit code 2 (``crmstream.failures``;
README, "Exit codes"), never a traceback. Each command first checks that the
infrastructure it needs answers (``crmstream.preflight``), then calls the
module that does the work. demo, generate and replay are in
``crmstream.cli_local``, the read-only views (triggers, explain, dead-letters,
profile) in ``crmstream.cli_views``.
"""

from __future__ import annotations

import os
import sys
import traceback
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer
import yaml
from rich.console import Console
from typer.core import TyperGroup
from typer.exceptions import TyperException

from crmstream import logs
from crmstream.config import CrmConfig, load_config, mask_secrets
from crmstream.failures import (
    EXIT_ERROR,
    EXIT_INTERNAL,
    EXIT_INTERRUPTED,
    CommandError,
    describe,
)


class _Group(TyperGroup):
    """Ends every command the same way: a failure the user can act on is one line and
    exit 2; anything else (a bug) prints its traceback and exits 70."""

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.Exit, typer.Abort, TyperException, SystemExit):
            raise  # typer's own ends: exit codes and usage errors
        except BrokenPipeError:
            # The output's reader went away (`| head`): no bug; click ends it quietly with
            # exit 1 (outsider 49 saw "internal error", exit 70).
            raise
        except KeyboardInterrupt:
            logs.warning("interrupted")
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except BaseException as exc:
            message = describe(exc)
            if message is None:
                traceback.print_exc()
                logs.error(f"internal error ({type(exc).__name__}): please report it")
                raise typer.Exit(EXIT_INTERNAL) from None
            logs.error(message)
            raise typer.Exit(EXIT_ERROR) from None


app = typer.Typer(
    cls=_Group,
    help="crmstream: real-time CRM triggers from Kafka events.\n\n"
    "Examples:\n\n  crmstream demo\n\n"
    "  crmstream run --config prod.yaml -i 0 -a host0:2101 -a host1:2101\n\n"
    "  crmstream --log-format json run --config prod.yaml\n\n"
    "  crmstream profile c0000042 --redis-url redis://localhost:6379/0\n\n"
    "Only demo and replay start an embedded broker and redis-server (for what is not "
    "configured); every other command needs kafka.brokers and/or redis.url.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
topics_app = typer.Typer(help="Kafka topic administration.", no_args_is_help=True)
config_app = typer.Typer(help="Inspect and validate configuration.", no_args_is_help=True)
app.add_typer(topics_app, name="topics")
app.add_typer(config_app, name="config")

err_console = Console(stderr=True, soft_wrap=True)


def console() -> Console:
    """Standard output: a terminal's width, or wide and unwrapped into files and pipes."""
    if sys.stdout.isatty():
        return Console()
    return Console(width=int(os.environ.get("COLUMNS", "0") or 0) or 200, soft_wrap=True)


ConfigOpt = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        help="YAML config file (default: the embedded default).",
        exists=True,
        dir_okay=False,
    ),
]
SetOpt = Annotated[
    list[str] | None, typer.Option("--set", help="Override a key: section.key=value (repeatable).")
]
BrokersOpt = Annotated[
    str | None,
    typer.Option(
        "--brokers",
        help="Kafka bootstrap servers, host:port[,host:port] (or kafka.brokers). Required.",
    ),
]
RedisOpt = Annotated[
    str | None, typer.Option("--redis-url", help="Redis URL (or redis.url). Required.")
]
EmbeddedBrokersOpt = Annotated[
    str | None,
    typer.Option(
        "--brokers",
        help="Kafka bootstrap servers, host:port[,host:port]. Unset: this command starts "
        "an embedded broker.",
    ),
]
EmbeddedRedisOpt = Annotated[
    str | None,
    typer.Option("--redis-url", help="Redis URL. Unset: this command starts a redis-server."),
]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Log at INFO level.")]


def version_text() -> str:
    from crmstream.metrics import build_versions

    crm, python, bytewax, ck, librdkafka, redis_py = build_versions()
    return (
        f"crmstream {crm} (Python {python}, bytewax {bytewax}, confluent-kafka {ck}, "
        f"librdkafka {librdkafka}, redis-py {redis_py})"
    )


def _print_version(value: bool) -> None:
    if value:
        sys.stdout.write(version_text() + "\n")
        raise typer.Exit()


_chosen_level = ["warning"]
LogFormat = Enum("LogFormat", {name: name for name in logs.FORMATS}, type=str)  # type: ignore[misc]
LogLevel = Enum("LogLevel", {name: name for name in logs.LEVELS}, type=str)  # type: ignore[misc]


@app.callback()
def _global(
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_print_version, is_eager=True, help="Print versions and exit."
        ),
    ] = False,
    log_format: Annotated[
        LogFormat,
        typer.Option(
            "--log-format",
            envvar="CRMSTREAM_LOG_FORMAT",
            case_sensitive=False,
            help="plain: one line per record (files, collectors); json: one object per line; "
            "rich: colours, on a terminal only; auto: rich on a terminal, else plain.",
        ),
    ] = LogFormat.auto,
    log_level: Annotated[
        LogLevel,
        typer.Option(
            "--log-level",
            envvar="CRMSTREAM_LOG_LEVEL",
            case_sensitive=False,
            help="Lowest level logged.",
        ),
    ] = LogLevel.warning,
) -> None:
    """crmstream: real-time CRM triggers from Kafka events."""
    _chosen_level[0] = log_level.value
    logs.setup(log_format.value, log_level.value)


def _setup_logging(verbose: bool) -> None:
    """``-v``: INFO, unless ``--log-level`` asked for DEBUG."""
    if verbose and _chosen_level[0] != "debug":
        import logging

        logging.getLogger().setLevel(logging.INFO)


def _config(
    path: Path | None,
    sets: list[str] | None,
    brokers: str | None = None,
    redis_url: str | None = None,
) -> CrmConfig:
    """The effective configuration (a ConfigError ends the command in one report)."""
    overrides = list(sets or [])
    if brokers:
        overrides.append(f"kafka.brokers={brokers}")
    if redis_url:
        overrides.append(f"redis.url={redis_url}")
    return load_config(path, overrides)


def _fail(message: str) -> CommandError:
    return CommandError(message)


def need_kafka(cfg: CrmConfig, command: str, topics: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The configured brokers, checked to answer (and to hold ``topics``)."""
    from crmstream.preflight import check_kafka

    if not cfg.kafka.brokers:
        raise _fail(
            f"{command} needs kafka.brokers (--brokers host:port, or CRMSTREAM__KAFKA__BROKERS)"
        )
    brokers = list(cfg.kafka.brokers)
    check_kafka(brokers, dict(cfg.kafka.client), cfg.kafka.connect_timeout_seconds, topics)
    return brokers


def need_redis(cfg: CrmConfig, command: str) -> str:
    """The configured Redis URL, checked to answer."""
    from crmstream.preflight import check_redis

    if not cfg.redis.url:
        raise _fail(
            f"{command} needs redis.url (--redis-url redis://host:6379/0, or CRMSTREAM__REDIS__URL)"
        )
    check_redis(cfg.redis.url, cfg.redis)
    return cfg.redis.url


# demo, generate and replay (registered here: they are listed first in --help)
from crmstream import cli_local  # noqa: E402,F401


@app.command()
def run(
    workers: Annotated[
        int,
        typer.Option(
            "-w",
            "--workers-per-process",
            help="Worker threads per process (prefer processes: threads share the GIL).",
        ),
    ] = 1,
    process_id: Annotated[
        int | None, typer.Option("-i", "--process-id", help="This process's index in the cluster.")
    ] = None,
    addresses: Annotated[
        list[str] | None,
        typer.Option(
            "-a", "--addresses", help="host:port of every cluster process, in order (repeatable)."
        ),
    ] = None,
    statefulset: Annotated[
        bool,
        typer.Option(
            "--statefulset",
            help="Kubernetes: derive -i from the pod's ordinal and -a from --replicas and "
            "--peer-service (pods <set>-<k>.<service>:<cluster-port>).",
        ),
    ] = False,
    replicas: Annotated[
        int, typer.Option(envvar="CRMSTREAM_REPLICAS", help="--statefulset: spec.replicas.")
    ] = 1,
    peer_service: Annotated[
        str | None,
        typer.Option(
            envvar="CRMSTREAM_PEER_SERVICE",
            help="--statefulset: the headless Service (default: the StatefulSet's name).",
        ),
    ] = None,
    pod_name: Annotated[
        str | None,
        typer.Option(envvar="HOSTNAME", help="--statefulset: this pod's name (<set>-<ordinal>)."),
    ] = None,
    cluster_port: Annotated[
        int, typer.Option(help="--statefulset: the port every process listens on.")
    ] = 2101,
    peer_wait: Annotated[
        float,
        typer.Option(help="Seconds to wait for every -a address to resolve before giving up."),
    ] = 300.0,
    recovery_dir: Annotated[
        Path | None,
        typer.Option(
            "-r", "--recovery-directory", help="Bytewax recovery database directory (optional)."
        ),
    ] = None,
    until_end: Annotated[
        bool, typer.Option(help="Stop at the end of the input instead of tailing (backfills).")
    ] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
    redis_url: RedisOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run the flow against configured Kafka and Redis (one process of a cluster).

    SIGTERM or SIGINT drains it: it stops reading, finishes the step, commits, flushes
    the producer and exits 0 (within processing.drain_timeout_seconds, else exit 3).

    Example: crmstream run --brokers kafka:9092 --redis-url redis://redis:6379/0 -i 0
    -a crm-0:2101 -a crm-1:2101
    """
    from crmstream.runner import RunOptions, run_flow_process

    _setup_logging(verbose)
    cfg = _config(config, set_, brokers, redis_url)
    if not cfg.kafka.brokers or not cfg.redis.url:
        raise _fail(
            "run needs kafka.brokers and redis.url (only `crmstream demo` and `crmstream "
            "replay` start an embedded broker and redis-server)"
        )
    if statefulset:
        from crmstream.cluster import statefulset_peers

        if process_id is not None or addresses:
            raise _fail("--statefulset derives -i and -a: give neither")
        process_id, addresses = statefulset_peers(
            pod_name or "", replicas, peer_service, cluster_port
        )
        logs.notice(f"StatefulSet process {process_id} of {len(addresses)}: {' '.join(addresses)}")
    options = RunOptions(workers, process_id, addresses, recovery_dir, not until_end, peer_wait)
    run_flow_process(cfg, options)


@app.command()
def reshard(
    shards: Annotated[
        int | None,
        typer.Option(min=1, help="New processing.shards (default: the configured one)."),
    ] = None,
    step_ms: Annotated[
        int | None,
        typer.Option(min=1, help="New processing.step_ms (default: the configured one)."),
    ] = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask for confirmation.")] = False,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    redis_url: RedisOpt = None,
) -> None:
    """Rewrite the Redis state's per-shard keys for new shard settings.

    Stop the producers, let the flow drain (lag 0) and stop it first. Timers and
    undelivered outbox records move to their new shards; nothing else is
    rewritten. Interrupted, run it again: it finishes the same move. A state
    written before the layout was recorded is taken to have the configured step_ms.

    Example: crmstream reshard --shards 4 --redis-url redis://redis:6379/0
    """
    from rich.progress import Progress

    from crmstream.state.layout import Layout, stored_layout
    from crmstream.state.layout import reshard as do_reshard
    from crmstream.state.store import StateStore, connect

    cfg = _config(config, set_, redis_url=redis_url)
    url = need_redis(cfg, "reshard")
    target = Layout(shards or cfg.processing.shards, step_ms or cfg.processing.step_ms)
    if not 1 <= target.shards <= 4096 or target.step_ms < 1:
        raise _fail(
            f"shards must be 1..4096 and step_ms >= 1, got {target.shards}, {target.step_ms}"
        )
    out = console()
    store = StateStore(connect(url, cfg.redis), cfg.redis.key_prefix)
    source, unfinished = stored_layout(store, cfg.processing.step_ms)
    if source is None:
        raise _fail(f"no state under key prefix {cfg.redis.key_prefix!r}: nothing to reshard")
    if source == target and unfinished is None:
        out.print(f"the state already has {source.shards} shards, step_ms {source.step_ms}")
        return
    out.print(
        f"{cfg.redis.key_prefix!r}: {source.shards} shards, step_ms {source.step_ms} -> "
        f"{target.shards} shards, step_ms {target.step_ms}"
        + (" (finishing an interrupted reshard)" if unfinished else "")
    )
    if not yes and not typer.confirm("Is the flow stopped and drained?"):
        err_console.print("nothing changed: stop and drain the flow first, then run it again")
        raise typer.Exit(EXIT_ERROR)  # not 1, which says "nothing found" (README)
    with Progress(console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def advance(what: str, n: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(f"moving {what}", total=None)
            bar.advance(tasks[what], n)

        report = do_reshard(store, target, cfg.processing.step_ms, advance)
    out.print(
        f"resharded: {report.timers:,} timers, {report.quarantined:,} quarantined timers and "
        f"{report.outbox:,} outbox records moved; "
        f"{report.positions} input partitions' progress merged; "
        f"{report.customers:,} customers counted. Start the flow with processing.shards="
        f"{target.shards} and processing.step_ms={target.step_ms}."
    )


@topics_app.command("create")
def topics_create(
    partitions: Annotated[
        int | None, typer.Option(min=1, help="Partitions per topic (default: kafka.partitions).")
    ] = None,
    replication_factor: Annotated[
        int | None,
        typer.Option(min=1, help="Replicas per partition (default: kafka.replication_factor)."),
    ] = None,
    config: ConfigOpt = None,
    set_: SetOpt = None,
    brokers: BrokersOpt = None,
) -> None:
    """Create every input and output topic (existing ones are left as they are).

    Example: crmstream topics create --brokers localhost:9092 --partitions 8
    """
    from crmstream.topics import create_topics

    cfg = _config(config, set_, brokers)
    brokers_list = need_kafka(cfg, "topics create")
    result = create_topics(brokers_list, cfg, partitions, replication_factor)
    out = console()
    for name, outcome in result.items():
        out.print(f"{name}: {outcome}")


@config_app.command("show")
def config_show(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Print the effective configuration as YAML, secrets masked.

    Example: CRMSTREAM__PROCESSING__SHARDS=16 crmstream config show
    """
    cfg = _config(config, set_)
    dump = mask_secrets(cfg.model_dump(mode="json"))
    console().print(yaml.safe_dump(dump, sort_keys=False), end="", markup=False, highlight=False)


@config_app.command("validate")
def config_validate(config: ConfigOpt = None, set_: SetOpt = None) -> None:
    """Check a configuration and exit non-zero, naming the key, if it is invalid.

    Builds every kind of Kafka client with the configured librdkafka properties,
    without connecting, so an unknown property or a bad value is caught here.

    Example: crmstream config validate --config prod.yaml
    """
    from crmstream.clients import validate_properties

    cfg = _config(config, set_)
    for warning in validate_properties(cfg):
        logs.warning(f"librdkafka: {warning}")
    console().print("configuration is valid")


GLOBAL_OPTIONS = ("--log-format", "--log-level")


def hoist_global_options(args: list[str]) -> list[str]:
    """``--log-format`` and ``--log-level`` given after the command name, moved before it
    (they are options of ``crmstream`` itself): ``crmstream run --log-level info`` works."""
    front: list[str] = []
    rest: list[str] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            rest += args[i:]
            break
        name = arg.split("=", 1)[0]
        if name in GLOBAL_OPTIONS:
            if "=" in arg:
                front.append(arg)
            else:
                front += args[i : i + 2]
                i += 1
        else:
            rest.append(arg)
        i += 1
    return front + rest


def main() -> None:
    app(args=hoist_global_options(sys.argv[1:]), prog_name="crmstream")


from crmstream import cli_views  # noqa: E402,F401  (registers the view commands)
from crmstream.cli_backtest import backtest  # noqa: E402
from crmstream.cli_quarantine import quarantine_app  # noqa: E402
from crmstream.cli_value import fit, model_app  # noqa: E402

app.command()(fit)
app.command()(backtest)
app.add_typer(model_app, name="model")
app.add_typer(quarantine_app, name="quarantine")
