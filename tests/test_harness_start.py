"""The harness starts a 2-process crmstream run only once process 0 listens.

Timely sleeps a whole second after a refused connect; bench/RESULTS.md, round 13.
"""

from __future__ import annotations

import socket
import threading

from crmstream.bench.harness import _listening, await_peers


def test_await_peers_waits_until_the_earlier_process_listens():
    with socket.socket() as peer:
        peer.bind(("127.0.0.1", 0))  # bound, not yet listening: a connect would be refused
        port = peer.getsockname()[1]
        assert not _listening(port)
        opens = threading.Timer(0.3, peer.listen)
        opens.start()
        waited = await_peers([f"127.0.0.1:{port}", "127.0.0.1:1"], part=1, timeout_s=120)
        opens.join()
        assert _listening(port)
        # It waited for the listener (the timer ran from just before the call), and
        # returned because of it, not at the deadline.
        assert 0.2 <= waited < 120
    assert not _listening(port)


def test_await_peers_goes_on_after_its_timeout():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        waited = await_peers([f"127.0.0.1:{port}", "127.0.0.1:1"], part=1, timeout_s=0.2)
    assert waited >= 0.2  # timely's own retries take over from here
