"""Probe: does the driver checkpoint restore a torch process that used nvCOMP?

    python3 tests/gpu/driver_nvcomp_probe.py plain pinned nvcomp_dropped [nvcomp]
    python3 tests/gpu/driver_nvcomp_probe.py pinned:12 pageable:12 reregister:12

Each case starts a child that holds 1 GiB of device memory (``pinned``: and 1 GiB of
pinned host memory; ``nvcomp_dropped``: and encoded/decoded 128 MiB with an nvCOMP ANS
codec, then destroyed it; ``nvcomp``: and still holds the live codec), checkpoints it
with the driver API from this process, restores it and checks its tensor. Found with
it on the H100 (driver 580.159.04, nvCOMP 6.0, benchmarks/RESULTS.md "tenth
session"): every case restores except ``nvcomp`` (CUDA_ERROR_UNKNOWN; the process is
lost and later driver restores on the host fail too, so run it last, if at all), which
is why a checkpoint destroys its codecs before the release (``drop_codecs``).

``KIND:N`` cases ask what host memory costs the driver: N GiB pinned (``pinned``), N GiB
of plain touched memory (``pageable``), or N GiB registered with ``cudaHostRegister``,
unregistered before the checkpoint and registered again after the restore
(``reregister``, mmap'd memory; ``reregister_thp``: with transparent huge pages; the
child reports both registrations and a 1 GiB upload from it), or registered and left so
(``registered``, ``registered_thp``).
"""

import os
import subprocess
import sys
import time

from vllm.v1.checkpoint.driver import DriverCheckpoint

# The child's device memory (PROBE_DEVICE_GIB, default 1): ~40 is an awake ~8B engine.
DEVICE_GIB = int(os.environ.get("PROBE_DEVICE_GIB", "1"))
CHILD = r'''
import sys, time, torch
x = torch.ones(DEVICE_GIB * (256 << 20), device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
AFTER
print("sum", float(x.sum()), flush=True)
'''
PINNED = "p = torch.empty(1 << 30, dtype=torch.uint8, pin_memory=True)\n"
NVCOMP = """
from nvidia import nvcomp
codec = nvcomp.Codec(algorithm="ANS")
y = (torch.randn(64 << 20, device="cuda") * 0.02).to(torch.bfloat16).view(torch.uint8)
enc = codec.encode(nvcomp.as_array(y))
dec = torch.as_tensor(codec.decode(enc), device="cuda")
torch.cuda.synchronize()
"""
DROP = "del codec, enc, dec\nimport gc; gc.collect(); torch.cuda.synchronize()\n"
CASES = {"plain": "", "pinned": PINNED, "nvcomp_dropped": NVCOMP + DROP, "nvcomp": NVCOMP}
# The sized cases' pieces (N: GiB). An anonymous mapping, touched, as HostArena makes
# its segments (THP: in transparent huge pages), registered with the runtime.
_MAP = """
import mmap
rt = torch.cuda.cudart()
ok = lambda r: int(getattr(r, "value", r)) == 0
m = mmap.mmap(-1, N << 30, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
THP
p = torch.frombuffer(m, dtype=torch.uint8)
p.fill_(1)
t = time.perf_counter(); assert ok(rt.cudaHostRegister(p.data_ptr(), p.numel(), 0))
print("note register", round(time.perf_counter() - t, 3), file=sys.stderr, flush=True)
"""
_UNREGISTER = """t = time.perf_counter(); assert ok(rt.cudaHostUnregister(p.data_ptr()))
print("note unregister", round(time.perf_counter() - t, 3), file=sys.stderr, flush=True)
"""
_REREGISTER = """
t = time.perf_counter(); assert ok(rt.cudaHostRegister(p.data_ptr(), p.numel(), 0))
print("note register after restore", round(time.perf_counter() - t, 3), file=sys.stderr, flush=True)
"""
_UPLOAD = """d = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
t = time.perf_counter(); d.copy_(p[:1 << 30], non_blocking=True); torch.cuda.synchronize()
CHECK
print("note upload GB/s", round((1 << 30) / (time.perf_counter() - t) / 1e9, 1),
      file=sys.stderr, flush=True)
"""
# After the restore of a registration left in place: it still holds (an asynchronous
# upload, bytes intact).
_CHECKED_UPLOAD = "\n" + _UPLOAD.replace(
    "CHECK", "assert p.is_pinned() and int(d.min()) == 1 == int(d.max())")
_THP = "m.madvise(mmap.MADV_HUGEPAGE)\n"
SIZED = {
    # 1 GiB segments, as the checkpoint's HostArena pins them
    "pinned": ("p = [torch.ones(1 << 30, dtype=torch.uint8).pin_memory() for _ in range(N)]\n",
               ""),
    "pageable": ("p = torch.ones(N << 30, dtype=torch.uint8)\n", ""),
}
for _suffix, _thp in (("", ""), ("_thp", _THP)):
    _mapped = _MAP.replace("THP\n", _thp)
    # Unregistered before the checkpoint, registered again after the restore.
    SIZED["reregister" + _suffix] = (_mapped + _UNREGISTER,
                                     _REREGISTER + _UPLOAD.replace("CHECK\n", ""))
    # Registered and left registered across the checkpoint (what HostArena does).
    SIZED["registered" + _suffix] = (_mapped, _CHECKED_UPLOAD)


def child_code(case: str) -> str:
    if ":" in case:
        kind, gib = case.split(":")
        setup, after = (c.replace("N << 30", f"{int(gib)} << 30")
                        .replace("range(N)", f"range({int(gib)})") for c in SIZED[kind])
    else:
        setup, after = CASES[case], ""
    return (CHILD.replace("DEVICE_GIB", str(DEVICE_GIB)).replace('print("ready"', setup + 'print("ready"')
            .replace("AFTER\n", after))


def probe(case: str) -> bool:
    p = subprocess.Popen([sys.executable, "-c", child_code(case)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().strip() == "ready"
        driver = DriverCheckpoint()
        t = time.perf_counter()
        driver.checkpoint(p.pid)
        print(f"{case}: checkpoint ok {time.perf_counter() - t:.2f} s", flush=True)
        t = time.perf_counter()
        driver.restore(p.pid)
        print(f"{case}: restore ok {time.perf_counter() - t:.2f} s", flush=True)
        p.stdin.write("\n")
        p.stdin.flush()
        ok = p.stdout.readline().strip() == f"sum {float(DEVICE_GIB * (256 << 20))}"
        print(f"{case}: tensor {'intact' if ok else 'WRONG'}", flush=True)
        return ok
    except Exception as e:
        print(f"{case}: FAILED: {e}", flush=True)
        return False
    finally:
        p.kill()


if __name__ == "__main__":
    results = [probe(case) for case in sys.argv[1:] or ["plain", "pinned", "nvcomp_dropped"]]
    sys.exit(0 if all(results) else 1)
