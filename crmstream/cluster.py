"""Finding the other processes of a Bytewax cluster: from a StatefulSet, and waiting for them.

This module owns the ``-i``/``-a`` arguments of ``crmstream run`` when it runs
as a Kubernetes StatefulSet (``--statefulset``): the pod's ordinal is its
process index, and every pod ``<set>-<k>.<service>:<port>`` for k below the
replica count is a process. It also waits until every address resolves:
Bytewax exits within seconds when one does not, and a pod's DNS name appears
only once the pod has an IP (with ``publishNotReadyAddresses`` on the
headless Service, before it is ready), so without the wait a rollout could
crash-loop.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable

from crmstream.failures import CommandError

log = logging.getLogger(__name__)


def statefulset_peers(
    pod_name: str, replicas: int, service: str | None, port: int
) -> tuple[int, list[str]]:
    """This pod's process index and every process's address, in order.

    :arg pod_name: ``<statefulset>-<ordinal>`` (the pod's hostname).
    :arg service: the headless Service's name (default: the StatefulSet's name).
    """
    name, sep, ordinal = pod_name.rpartition("-")
    if not sep or not name or not ordinal.isdigit():
        raise CommandError(
            f"--statefulset: the pod name {pod_name!r} does not end in -<ordinal>; "
            "is this a StatefulSet's pod? (HOSTNAME or --pod-name)"
        )
    index = int(ordinal)
    if replicas < 1 or index >= replicas:
        raise CommandError(
            f"--statefulset: pod {pod_name} has ordinal {index} but --replicas is {replicas}: "
            "set CRMSTREAM_REPLICAS to the StatefulSet's spec.replicas"
        )
    host = service or name
    return index, [f"{name}-{k}.{host}:{port}" for k in range(replicas)]


def _resolves(host: str) -> bool:
    try:
        socket.getaddrinfo(host, None)
        return True
    except (OSError, UnicodeError):
        return False


def wait_for_peers(
    addresses: list[str],
    timeout_s: float,
    resolves: Callable[[str], bool] = _resolves,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
    report_every_s: float = 10.0,
    stopped: Callable[[], bool] = lambda: False,
) -> None:
    """Return once every ``host:port`` in ``addresses`` resolves, or ``stopped()``
    (a SIGTERM while waiting); say which do not every ``report_every_s``.

    :raises CommandError: naming the addresses that did not resolve within ``timeout_s``.
    """
    hosts = list(dict.fromkeys(address.rpartition(":")[0] for address in addresses))
    started = clock()
    reported = started
    while True:
        hosts = [host for host in hosts if not resolves(host)]
        if not hosts or stopped():
            return
        waited = clock() - started
        if waited >= timeout_s:
            raise CommandError(
                f"cluster addresses still do not resolve after {timeout_s:g} s: "
                f"{', '.join(hosts)}; check the -a list (or, on Kubernetes, the headless "
                "Service's name and publishNotReadyAddresses: true, and that the pods are "
                "scheduled)"
            )
        if clock() - reported >= report_every_s:
            reported = clock()
            log.warning(
                "waiting for %d of %d cluster addresses to resolve (%.0f s so far, up to "
                "%g s): %s; the other pods may still be starting",
                len(hosts),
                len(addresses),
                waited,
                timeout_s,
                ", ".join(hosts),
            )
        sleep(min(1.0, max(0.0, timeout_s - waited)))
