#!/usr/bin/env python3
"""Mirror data plane: one batched NIXL WRITE of a step's blocks (all layers) into a
standby process, against a plain same-device copy of the same bytes, in the same run.

    python benchmarks/mirror_transport.py --device cuda --layers 16 --block-bytes 65536
    python benchmarks/mirror_transport.py --device cpu  --layers 2 --num-blocks 256

Prints a table (per blocks-per-step: p50/p99 WRITE latency and GB/s, the copy baseline
and the ratio) and writes JSON (device, date, versions, command, numbers) to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import multiprocessing as mp
import os
import platform
import random
import statistics
import sys
import time

os.environ.setdefault("UCX_NET_DEVICES", "lo")


def _standby(to_primary, from_primary, device, layers, num_blocks, elems, ring_bytes):
    import queue

    import torch

    from vllm.v1.worker.kv_mirror_staged import StagedStandbyEndpoint
    from vllm.v1.worker.kv_mirror_transport import StandbyEndpoint
    kv = [torch.zeros(num_blocks, elems, dtype=torch.uint8, device=device)
          for _ in range(layers)]
    if ring_bytes:
        endpoint = StagedStandbyEndpoint("bench-standby-staged", kv, num_blocks, ring_bytes)
    else:
        endpoint = StandbyEndpoint("bench-standby", kv, num_blocks)
    to_primary.put(endpoint.descriptor().to_dict())
    ids_of: dict[int, list[int]] = {}
    landed: list[tuple[int, int, int]] = []
    while True:
        try:
            msg = from_primary.get_nowait() if ring_bytes else from_primary.get()
        except queue.Empty:
            msg = None
        if msg == "done":
            break
        if isinstance(msg, tuple) and msg[0] == "primary":
            endpoint.connect_primary(msg[1])
        elif isinstance(msg, tuple) and msg[0] == "ids":
            ids_of[msg[1]] = msg[2]
        elif msg is not None:
            to_primary.put(_digest(kv, msg))  # msg: block ids to checksum
        if ring_bytes:
            landed += endpoint.poll_landed()
            for item in [x for x in landed if x[0] in ids_of]:
                endpoint.scatter(item[0], item[1], ids_of.pop(item[0]))
                landed.remove(item)
    endpoint.close()


def _digest(kv, ids) -> str:
    import hashlib
    h = hashlib.sha256()
    for t in kv:
        h.update(t[list(ids)].cpu().numpy().tobytes())
    return h.hexdigest()


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--layers", type=int, default=16)
    ap.add_argument("--num-blocks", type=int, default=1024)
    ap.add_argument("--block-bytes", type=int, default=32768,
                    help="bytes of one block of one layer (1B shape, bf16, 16 tokens: 32 KiB)")
    ap.add_argument("--blocks-per-step", default="1,8,32,128")
    ap.add_argument("--iters", type=int, default=50)
    ap.add_argument("--transports", default="direct,staged",
                    help="direct: one descriptor per (layer, block); staged: gather into a "
                    "ring, one descriptor, scatter on the standby")
    ap.add_argument("--out", default="mirror_transport.json")
    args = ap.parse_args()

    import torch

    rows, verified, setup_ms = [], {}, {}
    for kind in args.transports.split(","):
        r, ok, setup = _run(kind, args)
        rows += r
        verified[kind], setup_ms[kind] = ok, setup

    dev = (torch.cuda.get_device_name(0) if args.device == "cuda"
           else f"{platform.machine()} CPU x{os.cpu_count()}")
    print(f"device {dev}; {args.layers} layers x {args.block_bytes} B/block; "
          f"connect+prepare ms {setup_ms}; standby bytes verified: {verified}")
    print(f"{'transport':>9} {'blocks':>6} {'MiB':>8} {'mirror p50 ms':>13} {'p99 ms':>8} "
          f"{'GB/s':>7} {'copy p50 ms':>11} {'GB/s':>7} {'mirror/copy':>11}")
    for r in rows:
        print(f"{r['transport']:>9} {r['blocks_per_step']:>6} {r['bytes'] / 2**20:>8.2f} "
              f"{r['write_p50_ms']:>13.3f} "
              f"{r['write_p99_ms']:>8.3f} {r['write_GBps']:>7.2f} {r['copy_p50_ms']:>11.3f} "
              f"{r['copy_GBps']:>7.2f} {r['write_over_copy']:>11.2f}")
    import importlib.metadata as md
    out = {"benchmark": "mirror_transport", "device": dev, "device_kind": args.device,
           "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "versions": {"vllm": md.version("vllm") if _has("vllm") else None,
                        "nixl": md.version("nixl") if _has("nixl") else None,
                        "torch": torch.__version__},
           "command": " ".join([sys.executable, *sys.argv]), "setup_ms": setup_ms,
           "args": vars(args), "verified": verified, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)


def _run(kind: str, args) -> tuple[list[dict], bool, float]:
    """One transport: a standby process, then every blocks-per-step size."""
    import torch

    from vllm.v1.worker.kv_mirror_staged import StagedMirrorTransport, StagedStandbyDescriptor
    from vllm.v1.worker.kv_mirror_transport import MirrorTransport, StandbyDescriptor

    sizes = [int(x) for x in args.blocks_per_step.split(",")]
    ring = 2 * max(sizes) * args.layers * args.block_bytes if kind == "staged" else 0
    ctx = mp.get_context("spawn")
    to_primary, from_primary = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_standby, args=(to_primary, from_primary, args.device,
                                              args.layers, args.num_blocks, args.block_bytes,
                                              ring))
    proc.start()
    rows = []
    try:
        first = to_primary.get(timeout=300)
        kv = [torch.randint(0, 255, (args.num_blocks, args.block_bytes), dtype=torch.uint8,
                            device=args.device) for _ in range(args.layers)]
        local = [torch.zeros_like(t) for t in kv]  # baseline: same-device copy target
        t0 = time.perf_counter()
        if kind == "staged":
            transport = StagedMirrorTransport("bench-primary-staged", kv, args.num_blocks, ring)
            transport.connect(StagedStandbyDescriptor.from_dict(first))
            from_primary.put(("primary", transport.local_metadata()))
        else:
            transport = MirrorTransport("bench-primary", kv, args.num_blocks)
            transport.connect(StandbyDescriptor.from_dict(first))
        setup_ms = (time.perf_counter() - t0) * 1e3
        sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
        rng = random.Random(0)
        seq = 0
        for k in sizes:
            nbytes = k * args.layers * args.block_bytes
            write_s, copy_s, landed_s = [], [], []
            for it in range(args.iters + 3):
                ids = rng.sample(range(1, args.num_blocks), k)
                idx = torch.tensor(ids, device=args.device)
                sync()
                t = time.perf_counter()
                for src, dst in zip(kv, local):
                    dst.index_copy_(0, idx, src.index_select(0, idx))
                sync()
                c = time.perf_counter() - t
                if kind == "staged":
                    from_primary.put(("ids", seq, ids))
                t = time.perf_counter()
                h = transport.write(ids, seq)
                while not transport.poll(h):
                    pass
                d = time.perf_counter() - t
                if kind == "staged":  # in the standby's KV cache once acknowledged
                    while seq not in transport.poll_acks():
                        pass
                w = time.perf_counter() - t
                seq += 1
                if it >= 3:  # warm-up
                    write_s.append(w)
                    copy_s.append(c)
                    landed_s.append(d)
            row = {
                "transport": kind, "blocks_per_step": k, "bytes": nbytes,
                "write_p50_ms": statistics.median(write_s) * 1e3,
                "write_done_p50_ms": statistics.median(landed_s) * 1e3,
                "write_p99_ms": _pct(write_s, 99) * 1e3,
                "write_GBps": nbytes / statistics.median(write_s) / 1e9,
                "copy_p50_ms": statistics.median(copy_s) * 1e3,
                "copy_GBps": nbytes / statistics.median(copy_s) / 1e9,
            }
            row["write_over_copy"] = row["write_p50_ms"] / row["copy_p50_ms"]
            rows.append(row)
        # The last step's blocks must be byte-identical on the standby.
        from_primary.put(ids)
        verified = to_primary.get(timeout=120) == _digest(kv, ids)
        transport.close()
    finally:
        from_primary.put("done")
        proc.join(timeout=60)
    return rows, verified, setup_ms


def _has(dist: str) -> bool:
    import importlib.metadata as md
    try:
        md.version(dist)
        return True
    except md.PackageNotFoundError:
        return False


if __name__ == "__main__":
    main()
