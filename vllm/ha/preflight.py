# SPDX-License-Identifier: Apache-2.0
"""Preflight checks behind ``vllm ha-check``: can the HA features work here?

Each check returns a :class:`CheckResult` (``ok`` / ``missing`` with the reason, or
``info``). A feature (``mirror``, ``checkpoint``, ...) needs a set of checks to be
``ok``; :func:`run_preflight` evaluates the features a caller requires. Probes that
load native code (NIXL plugins) run in a child process with a deadline, so a
plugin that hangs or prints to stdout cannot take the report down with it.
"""

from __future__ import annotations

import ctypes
import enum
import functools
import importlib.metadata
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from vllm.ha import version as ha_version

SCHEMA_VERSION = 1

# cuCheckpointProcess* arrived with driver 570 (CUDA 12.8).
MIN_CHECKPOINT_DRIVER = 570
CHECKPOINT_SYMBOLS = (
    "cuCheckpointProcessGetState",
    "cuCheckpointProcessLock",
    "cuCheckpointProcessCheckpoint",
    "cuCheckpointProcessRestore",
    "cuCheckpointProcessUnlock",
)
# The mirror's data plane; CPU peers use UCX shared memory / loopback too.
MIRROR_NIXL_BACKEND = "UCX"
NIXL_PROBE_TIMEOUT_S = 60.0
_PROBE_MARK = "HA_CHECK_NIXL:"


class Status(str, enum.Enum):
    OK = "ok"
    MISSING = "missing"
    INFO = "info"


@dataclass
class CheckResult:
    name: str
    status: Status
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.status is not Status.MISSING

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["status"] = self.status.value
        return d


# feature -> the checks it needs
FEATURES: dict[str, tuple[str, ...]] = {
    "mirror": ("nixl",),
    "mirror-p2p": ("devices", "nixl", "peer_access"),
    "checkpoint": ("devices", "driver", "checkpoint_api"),
    "compression": ("devices", "nvcomp"),
}


def check_distribution() -> CheckResult:
    dist = importlib.metadata.version("vllm")
    info = ha_version.build_info()
    if info is None:
        return CheckResult(
            "distribution", Status.MISSING,
            f"vllm {dist} is not a vLLM-HA build (vllm/ha/_build_info.py missing)",
            {"dist_version": dist})
    data = {
        "dist_version": dist,
        "ha_version": info.ha_version,
        "upstream_version": info.upstream_version,
        "upstream_dist": info.upstream_dist,
        "target": info.target,
        "install_mode": info.install_mode,
        "patches": list(info.patches),
    }
    return CheckResult(
        "distribution", Status.OK,
        f"vLLM-HA {info.ha_version} on upstream {info.upstream_dist} "
        f"{info.upstream_version} ({info.target}, {info.install_mode}, "
        f"{len(info.patches)} patches)", data)


def _torch_cuda() -> Any | None:
    try:
        import torch
    except ImportError:
        return None
    return torch.cuda if torch.cuda.is_available() else None


def check_devices() -> CheckResult:
    cuda = _torch_cuda()
    if cuda is None:
        return CheckResult("devices", Status.MISSING,
                           "no CUDA device (torch.cuda.is_available() is False)",
                           {"count": 0, "devices": [], "cpu_count": os.cpu_count()})
    devices = []
    for i in range(cuda.device_count()):
        props = cuda.get_device_properties(i)
        devices.append({"index": i, "name": props.name,
                        "memory_bytes": int(props.total_memory),
                        "capability": f"{props.major}.{props.minor}"})
    names = ", ".join(f"cuda:{d['index']} {d['name']}" for d in devices)
    return CheckResult("devices", Status.OK, f"{len(devices)} CUDA device(s): {names}",
                       {"count": len(devices), "devices": devices,
                        "cpu_count": os.cpu_count()})


# Both driver checks need these; they do not change while the process runs.
@functools.cache
def _load_libcuda() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None


@functools.cache
def _driver_version() -> str | None:
    try:
        with open("/proc/driver/nvidia/version") as f:
            for token in f.readline().split():
                if token[:1].isdigit() and "." in token:
                    return token
    except OSError:
        pass
    try:
        from vllm.third_party import pynvml
        pynvml.nvmlInit()
        try:
            v = pynvml.nvmlSystemGetDriverVersion()
            return v.decode() if isinstance(v, bytes) else v
        finally:
            pynvml.nvmlShutdown()
    except Exception:
        return None


def check_driver() -> CheckResult:
    version = _driver_version()
    lib = _load_libcuda()
    if version is None or lib is None:
        why = "libcuda.so.1 not loadable" if lib is None else "driver version unreadable"
        return CheckResult("driver", Status.MISSING, f"no NVIDIA driver ({why})",
                           {"version": version})
    cuda_version = ctypes.c_int(0)
    lib.cuDriverGetVersion(ctypes.byref(cuda_version))
    v = cuda_version.value
    return CheckResult("driver", Status.OK,
                       f"NVIDIA driver {version} (CUDA {v // 1000}.{v % 1000 // 10})",
                       {"version": version, "cuda_driver_api": v})


def check_checkpoint_api() -> CheckResult:
    version = _driver_version()
    lib = _load_libcuda()
    if lib is None or version is None:
        return CheckResult("checkpoint_api", Status.MISSING,
                           "needs an NVIDIA driver >= 570 (none found)", {})
    major = int(version.split(".", 1)[0])
    missing = [s for s in CHECKPOINT_SYMBOLS if not hasattr(lib, s)]
    data = {"driver_major": major, "missing_symbols": missing}
    if major < MIN_CHECKPOINT_DRIVER:
        return CheckResult("checkpoint_api", Status.MISSING,
                           f"driver {version} < {MIN_CHECKPOINT_DRIVER}: upgrade the "
                           "NVIDIA driver for cuCheckpointProcess*", data)
    if missing:
        return CheckResult("checkpoint_api", Status.MISSING,
                           f"libcuda lacks {', '.join(missing)}", data)
    return CheckResult("checkpoint_api", Status.OK,
                       f"cuCheckpointProcess* resolve (driver {version})", data)


def _nixl_probe() -> dict[str, Any]:
    """Runs in a child: which NIXL plugins exist and which backends instantiate."""
    from nixl._api import nixl_agent, nixl_agent_config

    agent = nixl_agent(f"ha-check-{os.getpid()}", nixl_agent_config(backends=[]))
    backends: dict[str, str] = {}
    for name in agent.get_plugin_list():
        try:
            agent.create_backend(name)
            backends[name] = "ok"
        except Exception as e:  # a plugin that needs hardware or config it lacks
            backends[name] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
    return {"backends": backends}


def check_nixl(timeout_s: float = NIXL_PROBE_TIMEOUT_S) -> CheckResult:
    if importlib.util.find_spec("nixl") is None:
        return CheckResult("nixl", Status.MISSING,
                           "nixl is not installed (pip install 'vllm[nixl]')", {})
    try:
        version = importlib.metadata.version("nixl")
    except importlib.metadata.PackageNotFoundError:
        version = "?"
    code = ("import json, sys; from vllm.ha.preflight import _nixl_probe, _PROBE_MARK; "
            "r = _nixl_probe(); sys.stdout.flush(); "
            "print(_PROBE_MARK + json.dumps(r), flush=True)")
    try:
        # In a scratch dir: NIXL's GDS plugin leaves a cufile.log where it runs.
        with tempfile.TemporaryDirectory(prefix="vllm-ha-check-") as scratch:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True,
                                  text=True, timeout=timeout_s, cwd=scratch)
    except subprocess.TimeoutExpired:
        return CheckResult("nixl", Status.MISSING,
                           f"NIXL {version}: the backend probe hung for {timeout_s:.0f} s",
                           {"version": version})
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(_PROBE_MARK)]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return CheckResult("nixl", Status.MISSING, f"NIXL {version} does not load: {err}",
                           {"version": version})
    backends = json.loads(lines[-1][len(_PROBE_MARK):])["backends"]
    loaded = sorted(b for b, s in backends.items() if s == "ok")
    data = {"version": version, "backends": backends, "loaded": loaded}
    if MIRROR_NIXL_BACKEND not in loaded:
        why = backends.get(MIRROR_NIXL_BACKEND, "plugin not found")
        return CheckResult("nixl", Status.MISSING,
                           f"NIXL {version}: backend {MIRROR_NIXL_BACKEND} does not load "
                           f"({why})", data)
    return CheckResult("nixl", Status.OK,
                       f"NIXL {version}, backends loaded: {', '.join(loaded)}", data)


def check_nvcomp() -> CheckResult:
    if importlib.util.find_spec("nvidia") is None or \
            importlib.util.find_spec("nvidia.nvcomp") is None:
        return CheckResult("nvcomp", Status.MISSING,
                           "nvCOMP Python bindings not installed "
                           "(pip install 'vllm[nvcomp]')", {})
    try:
        from nvidia import nvcomp
    except Exception as e:  # the bindings are there but their libraries are not
        return CheckResult("nvcomp", Status.MISSING,
                           f"nvidia.nvcomp does not import: {e}", {})
    version = getattr(nvcomp, "__version__", "?")
    return CheckResult("nvcomp", Status.OK, f"nvCOMP {version} importable",
                       {"version": version})


def check_peer_access() -> CheckResult:
    cuda = _torch_cuda()
    count = cuda.device_count() if cuda is not None else 0
    if count < 2:
        return CheckResult("peer_access", Status.MISSING,
                           f"needs 2+ CUDA devices, found {count}", {"pairs": []})
    pairs = [{"src": i, "dst": j, "ok": bool(cuda.can_device_access_peer(i, j))}
             for i in range(count) for j in range(count) if i != j]
    bad = [f"{p['src']}->{p['dst']}" for p in pairs if not p["ok"]]
    if bad:
        return CheckResult("peer_access", Status.MISSING,
                           f"no peer access for {', '.join(bad)}", {"pairs": pairs})
    return CheckResult("peer_access", Status.OK,
                       f"peer access between all {count} devices", {"pairs": pairs})


def check_host_memory() -> CheckResult:
    import psutil

    vm = psutil.virtual_memory()
    return CheckResult("host_memory", Status.INFO,
                       f"{vm.available / 2**30:.1f} GiB free of {vm.total / 2**30:.1f} GiB",
                       {"available_bytes": int(vm.available), "total_bytes": int(vm.total)})


CHECKS: dict[str, Callable[[], CheckResult]] = {
    "distribution": check_distribution,
    "devices": check_devices,
    "driver": check_driver,
    "checkpoint_api": check_checkpoint_api,
    "nixl": check_nixl,
    "nvcomp": check_nvcomp,
    "peer_access": check_peer_access,
    "host_memory": check_host_memory,
}


@dataclass
class PreflightReport:
    checks: list[CheckResult]
    required: list[str]

    def features(self) -> dict[str, dict[str, Any]]:
        by_name = {c.name: c for c in self.checks}
        out = {}
        for feature, needs in FEATURES.items():
            missing = [n for n in needs if not by_name[n].ok]
            out[feature] = {"ok": not missing, "missing": missing}
        return out

    @property
    def ok(self) -> bool:
        features = self.features()
        return all(features[f]["ok"] for f in self.required)

    def to_json(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "checks": [c.to_json() for c in self.checks],
            "features": self.features(),
            "required": self.required,
            "ok": self.ok,
        }


def parse_features(value: str) -> list[str]:
    """``--require a,b`` -> ["a", "b"]; ValueError names what is unknown."""
    names = [v.strip() for v in value.split(",") if v.strip()]
    names = list(dict.fromkeys(names))
    unknown = [n for n in names if n not in FEATURES]
    if unknown:
        raise ValueError(f"unknown feature(s) {', '.join(unknown)}; "
                         f"choose from {', '.join(FEATURES)}")
    return names


def run_preflight(required: list[str] | None = None) -> PreflightReport:
    return PreflightReport([check() for check in CHECKS.values()], list(required or []))
