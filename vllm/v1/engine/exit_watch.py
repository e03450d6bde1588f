# SPDX-License-Identifier: Apache-2.0
"""See an engine process begin to die, not finish dying (issue 4: failover time).

Upstream's engine monitor waits on the process sentinel, a pipe the kernel closes
when it releases the process's files; by then it has torn down the whole address
space, which for an engine holding GiBs of host memory (weights staged, pinned
buffers, the CUDA context) takes ~0.1 s after a SIGKILL. The kernel marks the
process as exiting (PF_EXITING) before any of that, and ``/proc/PID/stat`` shows it,
so a poll sees the death ~100x sooner (``benchmarks/death_detection.py``). A process
that starts to exit never comes back, so acting then is as safe as acting on the
sentinel; a process that hangs in its teardown (a GPU fallen off the bus) is seen
too, where the sentinel would never fire.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from vllm.logger import init_logger

logger = init_logger(__name__)

PF_EXITING = 0x4  # include/linux/sched.h


def is_exiting(pid: int) -> bool:
    """True once the kernel has begun the exit of process ``pid`` (or it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return True
    # After the parenthesised command name (which may hold spaces): the state is
    # field 3 and the flags field 9 of proc(5).
    fields = stat[stat.rindex(b")") + 2:].split()
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)


class EngineExitWatch:
    """A thread that calls ``on_exit(pid)`` once, when a watched process begins its
    exit. ``watch`` replaces what is watched (after a failover: the new primary)."""

    def __init__(self, on_exit: Callable[[int], None], poll_s: float) -> None:
        self._on_exit = on_exit
        self._poll_s = poll_s
        self._pids: tuple[int, ...] = ()
        self._wake = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="EngineExitWatch",
                                        daemon=True)
        self._thread.start()

    def watch(self, pids: list[int]) -> None:
        self._pids = tuple(pids)
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._pids = ()
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            pids = self._pids
            if not pids:
                self._wake.wait()
                self._wake.clear()
                continue
            for pid in pids:
                if is_exiting(pid):
                    if self._pids == pids:  # not replaced meanwhile
                        self._pids = ()
                        try:
                            self._on_exit(pid)
                        except Exception:
                            logger.exception("mirror: engine exit callback failed")
                    break
            self._wake.wait(self._poll_s)
            self._wake.clear()
