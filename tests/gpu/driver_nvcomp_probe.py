"""Probe: does the driver checkpoint restore a torch process that used nvCOMP?

    python3 tests/gpu/driver_nvcomp_probe.py plain pinned nvcomp_dropped [nvcomp]

Each case starts a child that holds 1 GiB of device memory (``pinned``: and 1 GiB of
pinned host memory; ``nvcomp_dropped``: and encoded/decoded 128 MiB with an nvCOMP ANS
codec, then destroyed it; ``nvcomp``: and still holds the live codec), checkpoints it
with the driver API from this process, restores it and checks its tensor. Found with
it on the H100 (driver 580.159.04, nvCOMP 6.0, benchmarks/RESULTS.md "tenth
session"): every case restores except ``nvcomp`` (CUDA_ERROR_UNKNOWN; the process is
lost and later driver restores on the host fail too, so run it last, if at all), which
is why a checkpoint destroys its codecs before the release (``drop_codecs``).
"""

import subprocess
import sys
import time

from vllm.v1.checkpoint.driver import DriverCheckpoint

CHILD = r'''
import sys, time, torch
x = torch.ones(256 << 20, device="cuda")
torch.cuda.synchronize()
print("ready", flush=True)
sys.stdin.readline()
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


def probe(case: str) -> bool:
    child = CHILD.replace('print("ready"', CASES[case] + 'print("ready"')
    p = subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE,
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
        ok = p.stdout.readline().strip() == f"sum {float(256 << 20)}"
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
