#!/usr/bin/env python3
"""Byte-plane compression of bf16 weights vs compressing the same bytes whole, same run.

    python benchmarks/byteplane_codec.py --device cuda --mib 1024 --codecs ANS,GDeflate
    python benchmarks/byteplane_codec.py --device cpu --mib 64          # zlib stand-in

For each codec: whole-tensor (baseline) and byte-plane (feature) compression ratio and
encode/decode GB/s (of raw bytes), the ratio of ratios; JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import statistics
import sys
import time


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--mib", type=int, default=256, help="size of the bf16 tensor")
    ap.add_argument("--std", type=float, default=0.02, help="weights ~ N(0, std)")
    ap.add_argument("--codecs", default="ANS,GDeflate")
    ap.add_argument("--iters", type=int, default=5)
    ap.add_argument("--out", default="byteplane_codec.json")
    args = ap.parse_args()

    import torch

    from vllm.v1.checkpoint.byteplane import ByteplaneCodec, NvcompPlaneCodec, ZlibPlaneCodec

    n = args.mib * 2**20 // 2
    g = torch.Generator(device="cpu").manual_seed(0)
    t = (torch.randn(n, generator=g) * args.std).to(torch.bfloat16).to(args.device)
    sync = torch.cuda.synchronize if args.device == "cuda" else (lambda: None)
    names = args.codecs.split(",") if args.device == "cuda" else ["zlib-1"]

    def timed(fn):
        out, times = None, []
        for _ in range(args.iters):
            sync()
            t0 = time.perf_counter()
            out = fn()
            sync()
            times.append(time.perf_counter() - t0)
        return out, statistics.median(times)

    raw = t.numel() * 2
    rows = []
    for name in names:
        plane_codec = ZlibPlaneCodec() if name == "zlib-1" else NvcompPlaneCodec(name)
        whole = t.view(-1).view(torch.uint8)
        packed, enc_s = timed(lambda: plane_codec.encode(whole))
        back, dec_s = timed(lambda: plane_codec.decode(packed, raw))
        assert torch.equal(back, whole)
        rows.append({"codec": plane_codec.name, "mode": "whole", "ratio": raw / packed.numel(),
                     "encode_GBps": raw / enc_s / 1e9, "decode_GBps": raw / dec_s / 1e9})
        bp = ByteplaneCodec(plane_codec)
        enc, enc_s = timed(lambda: bp.encode(t))
        out, dec_s = timed(lambda: bp.decode(enc))
        assert torch.equal(out.view(torch.uint8), t.view(torch.uint8))
        rows.append({"codec": plane_codec.name, "mode": "byteplane", "ratio": enc.ratio,
                     "planes": [{"compressed": p.compressed, "ratio": p.nbytes / p.data.numel()}
                                for p in enc.planes],
                     "encode_GBps": raw / enc_s / 1e9, "decode_GBps": raw / dec_s / 1e9})

    dev = torch.cuda.get_device_name(0) if args.device == "cuda" else "cpu"
    print(f"device {dev}; {args.mib} MiB bf16 ~ N(0, {args.std})")
    print(f"{'codec':>14} {'mode':>9} {'ratio':>6} {'enc GB/s':>9} {'dec GB/s':>9}  planes")
    for r in rows:
        planes = " ".join(f"{'c' if p['compressed'] else 'raw'}:{p['ratio']:.2f}"
                          for p in r.get("planes", []))
        print(f"{r['codec']:>14} {r['mode']:>9} {r['ratio']:>6.3f} {r['encode_GBps']:>9.1f} "
              f"{r['decode_GBps']:>9.1f}  {planes}")
    for name in {r["codec"] for r in rows}:
        w, b = (next(r for r in rows if r["codec"] == name and r["mode"] == m)
                for m in ("whole", "byteplane"))
        print(f"{name}: byteplane / whole ratio = {b['ratio'] / w['ratio']:.3f}")
    with open(args.out, "w") as f:
        json.dump({"benchmark": "byteplane_codec", "device": dev,
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(
                       timespec="seconds"),
                   "torch": torch.__version__, "command": " ".join([sys.executable, *sys.argv]),
                   "args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
