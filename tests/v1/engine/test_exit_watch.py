"""The exit watch (vllm/v1/engine/exit_watch.py) on real processes: it sees a
SIGKILLed process that holds memory begin its exit before upstream's process
sentinel fires, and never a live or stopped one."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from multiprocessing.connection import wait

from vllm.v1.engine.exit_watch import EngineExitWatch, is_exiting

# Touches 2 GiB, says so, then sleeps: the kernel has that much to tear down.
HOLDER = ("import sys, time; b = bytearray(2 << 30); b[::4096] = b'x' * (len(b) // 4096); "
          "print('ready', flush=True); time.sleep(600)")


def holder() -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def test_a_live_or_stopped_process_is_not_exiting_a_dead_one_is():
    proc = holder()
    try:
        assert not is_exiting(proc.pid)
        os.kill(proc.pid, signal.SIGSTOP)  # a hung engine: the step timeout's case
        time.sleep(0.05)
        assert not is_exiting(proc.pid)
    finally:
        proc.kill()
    proc.wait()
    assert is_exiting(proc.pid)  # reaped: gone


def test_the_watch_sees_a_killed_process_before_its_sentinel():
    # The sentinel upstream waits on: a pipe whose write end only the child holds.
    r, w = os.pipe()
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                            pass_fds=(w,))
    os.close(w)
    assert proc.stdout.readline().strip() == "ready"
    seen: dict[str, float] = {}
    fired = threading.Event()

    def on_exit(pid: int) -> None:
        seen["watch"] = time.monotonic()
        assert pid == proc.pid
        fired.set()

    watch = EngineExitWatch(on_exit, poll_s=0.001)
    watch.watch([proc.pid])
    try:
        time.sleep(0.05)
        assert not fired.is_set()
        t0 = time.monotonic()
        proc.kill()
        wait([r], timeout=30)
        seen["sentinel"] = time.monotonic()
        assert fired.wait(5)
    finally:
        watch.stop()
        os.close(r)
        proc.wait()
    # Called once, before the kernel finished the teardown the sentinel waits for.
    assert seen["watch"] < seen["sentinel"], {k: v - t0 for k, v in seen.items()}
