"""Loading the configuration: YAML file, then env vars, then CLI ``--set`` flags.

This module owns where configuration values come from and how a bad value is
reported. Later sources override earlier ones key by key. Every validation
error names the dotted key, the offending value and the source that set it,
e.g. ``rules.browse_interest.consecutive_views = 0 (from env
CRMSTREAM__RULES__BROWSE_INTEREST__CONSECUTIVE_VIEWS): Input should be greater
than or equal to 2``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from crmstream.config.schema import CrmConfig

ENV_PREFIX = "CRMSTREAM__"
_SECRET_KEY = re.compile(
    r"(password|passwd|secret|token|credential|salt|ssl\.key\.pem|jaas\.config|oauthbearer\.config)",
    re.IGNORECASE,
)
_REFERENCE = re.compile(r"^\$\{(env|file):([^}]+)\}$")


class ConfigError(ValueError):
    """A configuration value is missing, malformed or out of range."""


class _ConfigYamlLoader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's plain scalars: only ``true`` and ``false`` are
    booleans, and numbers have no base-60 or leading-zero octal forms.

    PyYAML follows YAML 1.1, where the country code ``NO`` (Norway) and ``off`` are
    False and ``22:00`` is the integer 1320: a region keyed ``NO``, a season's
    ``countries: [NO, SE]`` or ``start: 22:00`` would fail to validate with values the
    operator never wrote. Those stay text now; a boolean setting given as ``no`` or
    ``off`` (``--set metrics.enabled=off``) is still read as False, by the schema.
    """


_IMPLICIT = {"tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"}
_ConfigYamlLoader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _IMPLICIT]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)
_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:int",
    re.compile(r"^(?:[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"),
    list("-+0123456789"),
)
_ConfigYamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?\.[0-9][0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def load_yaml(text: str) -> Any:
    """Parse configuration YAML (``_ConfigYamlLoader``: YAML 1.2 booleans and numbers)."""
    return yaml.load(text, Loader=_ConfigYamlLoader)  # a SafeLoader: no arbitrary objects


def default_config_text() -> str:
    """The embedded default configuration (config/default.yaml)."""
    return resources.files("crmstream.config").joinpath("default.yaml").read_text("utf-8")


def _parse_scalar(text: str) -> Any:
    """Parse an env/CLI value as a YAML scalar or flow collection.

    "false" becomes False, "3" an int, "[a, b]" a list; "no", "off" and "NO" stay
    text (the schema reads "no" and "off" as False where it wants a boolean);
    anything YAML cannot parse stays a string.
    """
    try:
        return load_yaml(text) if text.strip() else None
    except yaml.YAMLError:
        return text


# Mappings whose keys are dotted property names (librdkafka's ``linger.ms``): after
# their path, the rest of a dotted key is one key. Environment variable names cannot
# hold dots, so there ``_`` stands for ``.`` (librdkafka's names have no ``_``).
_FLAT_MAPS = (("kafka", "client"), ("kafka", "consumer"), ("kafka", "producer"))


def _path(dotted: str, from_env: bool = False) -> list[str]:
    """The keys of a dotted override, ``kafka.client.linger.ms`` as
    ``["kafka", "client", "linger.ms"]``."""
    parts = dotted.split(".")
    for prefix in _FLAT_MAPS:
        n = len(prefix)
        if tuple(parts[:n]) == prefix and len(parts) > n:
            rest = ".".join(parts[n:])
            return [*prefix, rest.replace("_", ".") if from_env else rest]
    return parts


def _set_dotted(tree: dict[str, Any], parts: list[str], value: Any) -> None:
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    node[parts[-1]] = value


def _get_dotted(tree: Mapping[str, Any], path: Sequence[str | int]) -> Any:
    node: Any = tree
    for part in path:
        try:
            node = node[part]
        except (KeyError, IndexError, TypeError):
            return "<missing>"
    return node


def _env_overrides(env: Mapping[str, str]) -> dict[str, str]:
    """Map CRMSTREAM__KAFKA__BROKERS=... to {"kafka.brokers": ...}."""
    found = {}
    for name, value in env.items():
        if name.startswith(ENV_PREFIX) and len(name) > len(ENV_PREFIX):
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".")
            found[dotted] = value
    return found


def load_config(
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> CrmConfig:
    """Build the effective configuration.

    :arg path: a YAML file; None means the embedded default.
    :arg overrides: ``dotted.key=value`` strings (CLI ``--set``), applied last.
    :arg env: the environment to read ``CRMSTREAM__*`` from (default os.environ).
    :raises ConfigError: naming the key, the value and where it came from.
    """
    env = os.environ if env is None else env
    if path is None:
        source, text = "embedded default config", default_config_text()
    else:
        source = str(path)
        try:
            text = Path(path).read_text("utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read config file {source!r}: {exc.strerror}") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError(
                f"config file {source!r} is not UTF-8 text (byte {exc.start}: "
                f"{exc.object[exc.start : exc.end]!r})"
            ) from None
    try:
        tree = load_yaml(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {source!r} is not valid YAML: {exc}") from exc
    try:
        return _build(tree, path, source, overrides, env)
    except RecursionError:  # a YAML alias inside its own value: a: &a [*a]
        raise ConfigError(
            f"config file {source!r} holds a value that contains itself (a recursive alias)"
        ) from None


def _build(
    tree: Any,
    path: str | Path | None,
    source: str,
    overrides: Sequence[str],
    env: Mapping[str, str],
) -> CrmConfig:
    """The configuration from the file's tree, the environment and the overrides."""
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {source!r} must be a mapping, got {type(tree).__name__}")
    origin: dict[str, str] = {}
    if path is not None:  # a file overrides the embedded default key by key
        origin = {dotted: source for dotted in _leaves(tree)}
        tree = _merged(load_yaml(default_config_text()), tree)
        source = "embedded default config"
    for dotted, raw in _env_overrides(env).items():
        path = _path(dotted, from_env=True)
        _set_dotted(tree, path, _parse_scalar(raw))
        origin[".".join(path)] = f"env {ENV_PREFIX}{dotted.upper().replace('.', '__')}"
    for item in overrides:
        dotted, sep, raw = item.partition("=")
        if not sep or not dotted.strip():
            raise ConfigError(f"--set takes key=value, got {item!r}")
        path = _path(dotted.strip())
        _set_dotted(tree, path, _parse_scalar(raw))
        origin[".".join(path)] = "--set"

    tree = _resolve_references(tree, origin, source, env)
    try:
        return CrmConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, tree, source, origin)) from None


def _merged(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``base`` with ``over`` laid on top; mappings merge, everything else replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = _merged(out[key], value)
        else:
            out[key] = value
    return out


def _leaves(tree: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of every value in a mapping tree (for error messages' "from ...")."""
    names = []
    for key, value in tree.items():
        dotted = f"{prefix}.{key}" if prefix else str(key)
        names += _leaves(value, dotted) if isinstance(value, Mapping) and value else [dotted]
    return names


def _resolve_references(
    tree: Any, origin: Mapping[str, str], source: str, env: Mapping[str, str], dotted: str = ""
) -> Any:
    """Replace ``${env:NAME}`` and ``${file:/path}`` values (secrets kept out of files)."""
    if isinstance(tree, dict):
        return {
            k: _resolve_references(v, origin, source, env, f"{dotted}.{k}" if dotted else str(k))
            for k, v in tree.items()
        }
    if isinstance(tree, list):
        return [_resolve_references(v, origin, source, env, dotted) for v in tree]
    match = _REFERENCE.match(tree) if isinstance(tree, str) else None
    if match is None:
        return tree
    kind, ref = match.groups()
    where = origin.get(dotted, source)
    if kind == "env":
        if ref not in env:
            raise ConfigError(f"{dotted} refers to env {ref}, which is not set (from {where})")
        return env[ref]
    try:
        return Path(ref).read_text("utf-8").rstrip("\n")
    except OSError as exc:
        raise ConfigError(
            f"{dotted} refers to file {ref!r}, which cannot be read: {exc.strerror} (from {where})"
        ) from None


_UNION_TAGS = frozenset({"str", "int", "float", "bool"})


def _errors(exc: ValidationError, tree: Mapping[str, Any]) -> list[tuple[list[Any], str, str]]:
    """(key path, message, error type) per wrong value. A value that no member of a union
    type took (``kafka.client``'s) is one error, not one per member tried: pydantic ends
    its path with the member's name (``str``, ``int``, ...), which is not a key."""
    found: list[tuple[list[Any], str, str]] = []
    tried: dict[tuple[Any, ...], list[str]] = {}
    for err in exc.errors():
        loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-"))]
        if (
            loc
            and loc[-1] in _UNION_TAGS
            and _get_dotted(tree, loc) == "<missing>"
            and _get_dotted(tree, loc[:-1]) != "<missing>"
        ):
            kinds = tried.setdefault(tuple(loc[:-1]), [])
            if not kinds:
                found.append((loc[:-1], "", "union"))
            kinds.append(err["msg"].removeprefix("Input should be a valid "))
            continue
        found.append((loc, err["msg"].removeprefix("Value error, "), err["type"]))

    def message(loc: list[Any], msg: str, kind: str) -> str:
        if kind != "union":
            return msg
        *others, last = tried[tuple(loc)]
        return f"Input should be a valid {', '.join(others) + ' or ' if others else ''}{last}"

    return [(loc, message(loc, msg, kind), kind) for loc, msg, kind in found]


def _describe(
    exc: ValidationError, tree: Mapping[str, Any], source: str, origin: Mapping[str, str]
) -> str:
    lines = []
    for loc, msg, kind in _errors(exc, tree):
        if not loc:  # a check across sections: the message names what is wrong
            named = sorted({where for key, where in origin.items() if key in msg})
            lines.append(f"  {msg} (from {', '.join(named) or source})")
            continue
        dotted = ".".join(str(p) for p in loc)
        value = "***" if _SECRET_KEY.search(dotted) else _get_dotted(tree, loc)
        where = _origin_of(dotted, origin, source)
        if kind == "extra_forbidden":
            msg = "unknown key (check the spelling against config/default.yaml)"
        lines.append(f"  {dotted} = {value!r} (from {where}): {msg}")
    if len(lines) == 1:  # one wrong value: one line
        return "invalid configuration: " + lines[0].strip()
    return "invalid configuration:\n" + "\n".join(lines)


def _origin_of(dotted: str, origin: Mapping[str, str], default: str) -> str:
    """Where the value at ``dotted`` came from: the source that set it or the nearest
    key above it, or else the sources that set keys below it (an unknown section such
    as ``processng`` set by ``CRMSTREAM__PROCESSNG__SHARDS``)."""
    for key in sorted(origin, key=len, reverse=True):
        if dotted == key or dotted.startswith(key + "."):
            return origin[key]
    below = sorted({origin[k] for k in origin if k.startswith(dotted + ".")})
    return ", ".join(below) if below else default


def mask_secrets(tree: Any, _key: str = "") -> Any:
    """A copy of a config dump with passwords, tokens and URL credentials masked."""
    if isinstance(tree, dict):
        return {k: mask_secrets(v, k) for k, v in tree.items()}
    if isinstance(tree, list):
        return [mask_secrets(v, _key) for v in tree]
    if isinstance(tree, str):
        if _SECRET_KEY.search(_key) and tree:
            return "***"
        return re.sub(r"(://[^:/@]*:)[^@]+@", r"\1***@", tree)
    return tree
