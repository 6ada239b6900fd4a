"""What every Kafka client of crmstream is configured with.

This module owns the settings all of crmstream's librdkafka clients share:
the bootstrap servers, the deployment's properties for that kind of client
(``kafka.client``, with ``kafka.consumer`` or ``kafka.producer`` over it), and
a logger. Left without one, librdkafka writes its lines straight to stderr,
informational ones included; with it they go through Python's ``librdkafka``
logger, which the CLI shows from WARNING up. Each client adds its own settings
around these.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

_LOG = logging.getLogger("librdkafka")


def librdkafka_config(brokers: list[str], properties: Mapping[str, Any]) -> dict[str, Any]:
    """The bootstrap servers, ``properties`` and the logger."""
    return {"bootstrap.servers": ",".join(brokers), **properties, "logger": _LOG}
