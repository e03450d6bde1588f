# SPDX-License-Identifier: Apache-2.0
"""The exit watch's poller, run as its own small process (``python -S`` on this
file; no vLLM import) so that its polling never waits for the API server's GIL: a
thread of a busy API server was starved for tens of milliseconds (see
``vllm/v1/engine/exit_watch.py``).

Protocol: stdin gets lines of process ids to watch (a new line replaces the set; an
empty line clears it); stdout gets ``PID`` lines, one per process seen to begin its
exit (then nothing is watched until the next line). EOF on stdin ends it.
"""

from __future__ import annotations

import os
import select
import sys

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


def main(poll_s: float) -> None:
    pids: tuple[int, ...] = ()
    pending = b""
    while True:
        ready, _, _ = select.select([0], [], [], poll_s if pids else None)
        if ready:
            data = os.read(0, 65536)
            if not data:
                return  # the API server is gone
            pending += data
            *lines, pending = pending.split(b"\n")
            if lines:
                pids = tuple(int(x) for x in lines[-1].split())
            continue
        for pid in pids:
            if is_exiting(pid):
                os.write(1, b"%d\n" % pid)
                pids = ()
                break


if __name__ == "__main__":
    main(float(sys.argv[1]))
