# SPDX-License-Identifier: Apache-2.0
"""NVIDIA's driver checkpoint API (``cuCheckpointProcess*``, driver >= 570).

``checkpoint(pid)`` locks a process's CUDA calls and moves everything it still holds on
the GPU (context, CUDA-graph pools, workspaces: what the sleep-mode allocator does not
own) to host memory; the GPU then shows 0 MiB for it. ``restore(pid)`` puts it back and
unlocks. The API must be driven from a process other than the target: the API server
does it for its engine's workers. Only the driver is initialised here (``cuInit``),
never a context, so the API server holds no GPU memory.
"""

from __future__ import annotations

import time
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

LOCK_TIMEOUT_MS = 20_000


class DriverCheckpointUnavailable(RuntimeError):
    """This host cannot checkpoint a process (no driver, too old, no bindings)."""


class DriverCheckpointError(RuntimeError):
    pass


class DriverCheckpoint:
    def __init__(self) -> None:
        try:
            from cuda.bindings import driver
        except ImportError as e:
            raise DriverCheckpointUnavailable(
                f"cuda-bindings is not importable ({e}); the driver checkpoint needs it "
                "(pip install cuda-bindings)") from None
        self.d = driver
        if not hasattr(driver, "cuCheckpointProcessLock"):
            raise DriverCheckpointUnavailable(
                "cuda-bindings has no cuCheckpointProcess* API: update cuda-bindings")
        err, = driver.cuInit(0)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise DriverCheckpointUnavailable(f"cuInit failed: {err.name}")
        err, version = driver.cuDriverGetVersion()
        if err != driver.CUresult.CUDA_SUCCESS or version < 12080:
            raise DriverCheckpointUnavailable(
                f"the NVIDIA driver (CUDA {version // 1000}.{version % 1000 // 10}) has no "
                "checkpoint API: driver 570 or newer is needed")
        self.driver_version = version

    def _check(self, what: str, result: Any) -> Any:
        err = result[0] if isinstance(result, tuple) else result
        if err != self.d.CUresult.CUDA_SUCCESS:
            raise DriverCheckpointError(f"{what}: {getattr(err, 'name', err)}")
        return result

    def state(self, pid: int) -> str:
        err, st = self.d.cuCheckpointProcessGetState(pid)
        if err != self.d.CUresult.CUDA_SUCCESS:
            return f"error {err.name}"
        return st.name.removeprefix("CU_PROCESS_STATE_").lower()

    def checkpoint(self, pid: int, lock_timeout_ms: int = LOCK_TIMEOUT_MS) -> dict[str, float]:
        """Lock, then checkpoint; undoes the lock if the checkpoint fails."""
        args = self.d.CUcheckpointLockArgs()
        args.timeoutMs = lock_timeout_ms
        t0 = time.perf_counter()
        self._check(f"lock pid {pid}", self.d.cuCheckpointProcessLock(pid, args))
        t1 = time.perf_counter()
        try:
            self._check(f"checkpoint pid {pid}",
                        self.d.cuCheckpointProcessCheckpoint(pid, None))
        except DriverCheckpointError:
            self.d.cuCheckpointProcessUnlock(pid, None)
            raise
        return {"lock": t1 - t0, "checkpoint": time.perf_counter() - t1}

    def restore(self, pid: int) -> dict[str, float]:
        """Restore (if checkpointed) and unlock (if locked): undoes whatever
        :meth:`checkpoint` got to."""
        out = {"restore": 0.0, "unlock": 0.0}
        t0 = time.perf_counter()
        if self.state(pid) == "checkpointed":
            self._check(f"restore pid {pid}", self.d.cuCheckpointProcessRestore(pid, None))
        t1 = time.perf_counter()
        if self.state(pid) == "locked":
            self._check(f"unlock pid {pid}", self.d.cuCheckpointProcessUnlock(pid, None))
        out.update(restore=t1 - t0, unlock=time.perf_counter() - t1)
        return out


_NVML_MISSING = False


def _nvml():
    """pynvml, initialised; None where NVML is missing (remembered: a failed load
    scans the library path, far too slow for a status route)."""
    global _NVML_MISSING
    if _NVML_MISSING:
        return None
    try:
        from vllm.third_party import pynvml
        pynvml.nvmlInit()
        return pynvml
    except Exception:
        _NVML_MISSING = True
        return None


def device_used_mib() -> int | None:
    """Memory in use on every GPU together (NVML): what nvidia-smi's total shows,
    independent of process ids (which a container's pid namespace may not match)."""
    pynvml = _nvml()
    if pynvml is None:
        return None
    try:
        return sum(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used
                   for i in range(pynvml.nvmlDeviceGetCount())) >> 20
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()


def gpu_memory_mib(pids: list[int]) -> int | None:
    """GPU memory the given processes hold (NVML), None where NVML is not available."""
    pynvml = _nvml()
    if pynvml is None:
        return None
    try:
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if p.pid in pids and p.usedGpuMemory:
                    total += p.usedGpuMemory
        return total >> 20
    except Exception:
        return None
    finally:
        pynvml.nvmlShutdown()
