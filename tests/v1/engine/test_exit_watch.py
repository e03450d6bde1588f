"""The exit watch (vllm/v1/engine/exit_watch.py) on real processes: it sees a
SIGKILLed process that holds memory begin its exit before upstream's process
sentinel fires, with the event loop busy, and never a live or stopped one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from multiprocessing.connection import wait

from vllm.v1.engine.exit_watch import EngineExitWatch
from vllm.v1.engine.exit_watcher import is_exiting

# Touches 2 GiB, says so, then sleeps: the kernel has that much to tear down.
HOLDER = ("import sys, time; b = bytearray(2 << 30); b[::4096] = b'x' * (len(b) // 4096); "
          "print('ready', flush=True); time.sleep(600)")


def holder(**kw) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER], stdout=subprocess.PIPE, text=True,
                            **kw)
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


async def _kill_and_watch(proc: subprocess.Popen, sentinel: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    seen: dict[str, float] = {}
    calls: list[int] = []
    fired = asyncio.Event()

    def on_exit(pid: int) -> None:
        seen.setdefault("watch", time.monotonic())
        calls.append(pid)
        fired.set()

    async def busy_loop() -> None:
        # The API server's loop under load: Python work in 2 ms slices.
        while "sentinel" not in seen:
            end = time.monotonic() + 0.002
            while time.monotonic() < end:
                pass
            await asyncio.sleep(0)

    watch = EngineExitWatch(loop, on_exit, poll_s=0.001)
    watch.watch([proc.pid])
    try:
        await asyncio.sleep(0.2)
        assert not fired.is_set()
        busy = asyncio.create_task(busy_loop())
        t0 = time.monotonic()
        proc.kill()
        await loop.run_in_executor(None, wait, [sentinel], 30)
        seen["sentinel"] = time.monotonic()
        await busy
        await asyncio.wait_for(fired.wait(), 5)
        await asyncio.sleep(0.05)
        assert calls == [proc.pid]  # once per watch()
    finally:
        watch.stop()
    return {k: v - t0 for k, v in seen.items()}


def test_the_watch_sees_a_killed_process_before_its_sentinel():
    # The sentinel upstream waits on: a pipe whose write end only the child holds.
    r, w = os.pipe()
    proc = holder(pass_fds=(w,))
    os.close(w)
    try:
        seen = asyncio.run(_kill_and_watch(proc, r))
    finally:
        os.close(r)
        proc.kill()
        proc.wait()
    # Before the kernel finished the teardown the sentinel waits for.
    assert seen["watch"] < seen["sentinel"], seen
