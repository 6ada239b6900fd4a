"""Versioned value-model parameter sets in Redis: what ``crmstream fit`` saves, the flow uses.

This module owns ``{prefix}:model``, a hash of the fitted BG/NBD and
Gamma-Gamma parameter sets: ``v<N>`` holds set N as JSON (parameters,
standard errors, what it was fitted on and when), ``latest`` the highest N
given out and ``active`` the set in use (absent or 0: the configuration's
``bgnbd`` and ``gamma_gamma``). Sets are never rewritten: a new fit is a new
version, and going back is activating an older one.

A flow process reads the active set once, at start (``adopt``), when
``value.use_fitted`` is true; its version goes into ``value.model_version``,
which every trigger and every derived state records. Processes started at
different times can therefore run different sets (a rolling restart); the
version on each trigger shows which.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
import redis

from crmstream.config import CrmConfig

log = logging.getLogger(__name__)


class ModelError(ValueError):
    """A parameter set is missing, malformed or cannot be used."""


def model_key(prefix: str) -> str:
    return f"{prefix}:model"


def save(client: redis.Redis, prefix: str, model: dict[str, Any], activate: bool = True) -> int:
    """Store ``model`` (``bgnbd``: r, alpha, a, b; ``gamma_gamma``: p, q, v; anything else is
    kept as it is) as a new version; make it the active one unless ``activate`` is false.

    :raises ModelError: when a parameter is missing or not a positive number.
    """
    check(model)
    key = model_key(prefix)
    version = int(client.hincrby(key, "latest", 1))
    record = {**model, "version": version}
    pipe = client.pipeline(transaction=True)
    pipe.hset(key, f"v{version}", orjson.dumps(record))
    if activate:
        pipe.hset(key, "active", version)
    pipe.execute()
    return version


def check(model: dict[str, Any]) -> None:
    """:raises ModelError: naming the first parameter that is missing or out of range."""
    wanted = {"bgnbd": ("r", "alpha", "a", "b"), "gamma_gamma": ("p", "q", "v")}
    for section, names in wanted.items():
        values = model.get(section)
        if not isinstance(values, dict):
            raise ModelError(f"parameter set has no {section!r} section")
        for name in names:
            value = values.get(name)
            if not isinstance(value, int | float) or not value > 0:
                raise ModelError(f"{section}.{name} must be a number > 0, got {value!r}")
    if not model["gamma_gamma"]["q"] > 1:
        raise ModelError(f"gamma_gamma.q must be > 1, got {model['gamma_gamma']['q']!r}")
    bg = model["bgnbd"]
    if bg["a"] == 1 or bg["a"] + bg["b"] == 1:
        raise ModelError(
            f"bgnbd a={bg['a']}, b={bg['b']}: a = 1 and a + b = 1 are singular points of the "
            f"expected purchases"
        )


def versions(client: redis.Redis, prefix: str) -> tuple[int, list[dict[str, Any]]]:
    """The active version (0: the configuration's parameters) and every saved set, oldest
    first."""
    raw = {k.decode(): v for k, v in client.hgetall(model_key(prefix)).items()}
    sets = sorted(
        (orjson.loads(v) for k, v in raw.items() if k.startswith("v")),
        key=lambda s: s["version"],
    )
    return int(raw.get("active", 0)), sets


def load(client: redis.Redis, prefix: str, version: int) -> dict[str, Any]:
    """Set ``version``. :raises ModelError: when there is none."""
    raw = client.hget(model_key(prefix), f"v{version}")
    if raw is None:
        raise ModelError(f"no parameter set version {version} under key {model_key(prefix)!r}")
    return orjson.loads(raw)


def activate(client: redis.Redis, prefix: str, version: int) -> None:
    """Make ``version`` the set flow processes use from their next start (0: the
    configuration's). :raises ModelError: when it does not exist."""
    if version:
        load(client, prefix, version)
        client.hset(model_key(prefix), "active", version)
    else:
        client.hdel(model_key(prefix), "active")


def with_model(config: CrmConfig, model: dict[str, Any] | None) -> CrmConfig:
    """``config`` with a parameter set's BG/NBD and Gamma-Gamma parameters and version
    (None: unchanged)."""
    if model is None:
        return config
    check(model)
    return config.model_copy(
        update={
            "bgnbd": config.bgnbd.model_copy(update=dict(model["bgnbd"])),
            "gamma_gamma": config.gamma_gamma.model_copy(update=dict(model["gamma_gamma"])),
            "value": config.value.model_copy(update={"model_version": int(model["version"])}),
        }
    )


def active_model(config: CrmConfig, client: redis.Redis) -> dict[str, Any] | None:
    """The active fitted set, when ``value.use_fitted`` is on and one is active."""
    if not config.value.use_fitted:
        return None
    version, _ = versions(client, config.redis.key_prefix)
    return load(client, config.redis.key_prefix, version) if version else None


def adopt(config: CrmConfig, client: redis.Redis) -> CrmConfig:
    """The configuration a flow process runs with: the active fitted set's parameters and
    version over the configured ones (module docstring)."""
    model = active_model(config, client)
    if model is None:
        log.info("value model: the configured parameters (version %d)", config.value.model_version)
        return config
    log.info(
        "value model: fitted parameter set %d (%s customers, fitted %s)",
        model["version"], model.get("customers", "?"), model.get("fitted_at", "?"),
    )  # fmt: skip
    return with_model(config, model)
