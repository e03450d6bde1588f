"""Run a peer (a standby) in a spawned process for the duration of a test."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def spawned_peer(target: Callable[..., None], *args: Any,
                 stop_message: Any) -> Iterator[tuple[Any, Any, Any]]:
    """Yields (first message from the peer, peer->test queue, test->peer queue);
    sends ``stop_message`` and reaps the process on exit."""
    ctx = mp.get_context("spawn")
    to_test, to_peer = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=target, args=(to_test, to_peer, *args))
    proc.start()
    try:
        yield to_test.get(timeout=120), to_test, to_peer
    finally:
        to_peer.put(stop_message)
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
