#!/usr/bin/env python3
"""How soon a parent can know that a child process holding a GPU was SIGKILLed.

Upstream's engine monitor waits on the process sentinel (a pipe the kernel closes
when the process's files are released), which comes after the kernel has torn down
the process's address space. The mirror's failover starts from that moment, so it is
the floor of kill -> next token. The feature measured here: polling
``/proc/PID/stat`` for the exiting flag (PF_EXITING, set as the kernel begins the
exit) or the process gone, against the sentinel (the baseline), in the same run.

    python benchmarks/death_detection.py --device cuda --gpu-gib 20 --pinned-mib 512
    python benchmarks/death_detection.py --device cpu --host-gib 4

The poll here is a thread of an idle process; in the API server it runs as a process
of its own (``vllm/v1/engine/exit_watch.py``), since a thread of a busy server waits
for the GIL. The child allocates what an engine holds (device memory, pinned host memory, host
memory), keeps the device busy (a matmul loop), says it is ready, and is killed.
Prints per-run times from the kill and the medians, and writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import signal
import statistics
import sys
import threading
import time
from multiprocessing.connection import wait

from vllm.v1.engine.exit_watcher import is_exiting


def child(device: str, gpu_gib: float, pinned_mib: int, host_gib: float, ready) -> None:
    import torch

    keep = []
    if host_gib:
        keep.append(torch.ones(int(host_gib * 2**30) // 4, dtype=torch.float32))
    if device == "cuda":
        keep.append(torch.empty(int(gpu_gib * 2**30), dtype=torch.uint8, device="cuda"))
        if pinned_mib:
            keep.append(torch.empty(pinned_mib * 2**20, dtype=torch.uint8).pin_memory())
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.bfloat16)
        torch.cuda.synchronize()
    else:
        a = torch.randn(512, 512)
    ready.set()
    while True:  # busy like a decoding engine when the kill lands
        for _ in range(8):
            a = (a @ a).clamp_(-1, 1)
        if device == "cuda":
            torch.cuda.synchronize()


def one_run(args: argparse.Namespace) -> dict[str, float]:
    ctx = mp.get_context("spawn")
    ready = ctx.Event()
    proc = ctx.Process(target=child, args=(args.device, args.gpu_gib, args.pinned_mib,
                                           args.host_gib, ready), daemon=True)
    proc.start()
    if not ready.wait(300):
        proc.kill()
        raise RuntimeError("child did not get ready in 300 s")
    time.sleep(args.settle_s)
    seen: dict[str, float] = {}

    def poll() -> None:
        while not is_exiting(proc.pid):
            time.sleep(args.poll_ms / 1e3)
        seen["proc_exiting"] = time.monotonic()

    def sentinel() -> None:
        wait([proc.sentinel])
        seen["sentinel"] = time.monotonic()

    threads = [threading.Thread(target=poll), threading.Thread(target=sentinel)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)
    for t in threads:
        t.join(60)
    proc.join(60)
    seen["reaped"] = time.monotonic()
    return {k: round((v - t0) * 1e3, 2) for k, v in seen.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    p.add_argument("--gpu-gib", type=float, default=20.0)
    p.add_argument("--pinned-mib", type=int, default=512)
    p.add_argument("--host-gib", type=float, default=2.0)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--poll-ms", type=float, default=1.0)
    p.add_argument("--settle-s", type=float, default=0.5)
    p.add_argument("--out", default="death_detection.json")
    args = p.parse_args()
    runs = [one_run(args) for _ in range(args.runs)]
    print(f"{'run':>4} {'proc_exiting ms':>16} {'sentinel ms':>12} {'reaped ms':>10}")
    for i, r in enumerate(runs):
        print(f"{i:>4} {r['proc_exiting']:>16.2f} {r['sentinel']:>12.2f} {r['reaped']:>10.2f}")
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    ratio = med["sentinel"] / max(med["proc_exiting"], 1e-3)
    print(f"median: proc_exiting {med['proc_exiting']:.2f} ms, sentinel (upstream) "
          f"{med['sentinel']:.2f} ms, reaped {med['reaped']:.2f} ms; "
          f"sentinel / proc_exiting = {ratio:.1f}x")
    device = args.device
    if device == "cuda":
        import torch
        device = torch.cuda.get_device_name()
    with open(args.out, "w") as f:
        json.dump({"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                   "host": platform.node(), "kernel": platform.release(), "device": device,
                   "command": " ".join(sys.argv), "args": vars(args), "runs": runs,
                   "median_ms": med, "sentinel_over_proc_exiting": ratio}, f, indent=1)


if __name__ == "__main__":
    main()
