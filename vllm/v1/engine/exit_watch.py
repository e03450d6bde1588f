# SPDX-License-Identifier: Apache-2.0
"""See an engine process begin to die, not finish dying (issue 4: failover time).

Upstream's engine monitor waits on the process sentinel, a pipe the kernel closes
when it releases the process's files; by then it has torn down the whole address
space, which for an engine holding GiBs of memory takes ~0.1 s after a SIGKILL
(H100, ~1B engine: 116-176 ms). The kernel marks the process as exiting
(PF_EXITING) before any of that, and ``/proc/PID/stat`` shows it, so a poll sees
the death ~100x sooner (``benchmarks/death_detection.py``: 1.3 ms vs 131 ms on the
H100). A process that starts to exit never comes back, so acting then is as safe as
acting on the sentinel; one that hangs in its teardown (a GPU fallen off the bus)
is seen too, where the sentinel would never fire.

The poll runs in a small process of its own (``exit_watcher.py``), not a thread:
a thread of an API server busy with 64 streams waits for the GIL, and on the H100
it saw the death later than the sentinel did. Its report reaches the event loop
through a pipe the loop watches (``add_reader``), so no thread of this process
takes the GIL for it either.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable

from vllm.logger import init_logger

from vllm.v1.engine import exit_watcher

logger = init_logger(__name__)


class EngineExitWatch:
    """Calls ``on_exit(pid)`` on ``loop``, once per :meth:`watch`, when a watched
    process begins its exit. ``watch`` replaces what is watched (after a failover:
    the new primary)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_exit: Callable[[int], None],
                 poll_s: float) -> None:
        self._loop = loop
        self._on_exit = on_exit
        # Its own session: a Ctrl-C to the server's process group is not its concern
        # (it exits when the server does: EOF on its stdin).
        self._proc = subprocess.Popen(
            [sys.executable, "-S", exit_watcher.__file__, str(poll_s)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True,
            start_new_session=True)
        self._out = self._proc.stdout.fileno()
        self._pending = b""
        self._stopped = False
        try:
            os.set_blocking(self._out, False)
            loop.add_reader(self._out, self._read)
        except BaseException:
            self._proc.kill()
            self._proc.wait()
            raise

    def watch(self, pids: list[int]) -> None:
        try:
            self._proc.stdin.write(b" ".join(b"%d" % p for p in pids) + b"\n")
            self._proc.stdin.flush()
        except OSError as e:  # the poller died: upstream's sentinel still works
            logger.warning("mirror: engine exit watch unavailable (%s)", e)

    def _read(self) -> None:
        try:
            data = os.read(self._out, 4096)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:  # the poller exited: upstream's sentinel still works
            self._loop.remove_reader(self._out)
            if not self._stopped:
                logger.warning("mirror: engine exit watch stopped (exit code %s); engine "
                               "deaths are seen by upstream's monitor", self._proc.poll())
            return
        self._pending += data
        *lines, self._pending = self._pending.split(b"\n")
        for line in lines:
            try:
                self._on_exit(int(line))
            except Exception:
                logger.exception("mirror: engine exit callback failed")

    def _close_reader(self) -> None:
        self._loop.remove_reader(self._out)
        self._proc.stdout.close()

    def stop(self) -> None:
        """From any thread."""
        self._stopped = True
        try:
            self._loop.call_soon_threadsafe(self._close_reader)
        except RuntimeError:  # the loop is closed: nothing reads any more
            self._proc.stdout.close()
        try:
            self._proc.stdin.close()  # EOF: the poller exits
        except OSError:
            pass
        try:
            self._proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
