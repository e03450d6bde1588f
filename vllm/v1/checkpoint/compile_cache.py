# SPDX-License-Identifier: Apache-2.0
"""The compile cache and the startup plan in a snapshot.

vLLM keys its torch.compile cache (``VLLM_CACHE_ROOT/torch_compile_cache``) and its
startup plan (``VLLM_ENABLE_STARTUP_PLAN``) by a hash of the engine's configuration,
which includes the model's path. A server restored from a snapshot reads its model's
configuration from the snapshot's ``model/`` directory: another path, another key, a
full compile on every restore. So:

- a snapshot stores the serving engine's compile cache (``compile/...``: the backend's
  ``<hash>`` unit and, with AOT compile, ``torch_aot_compile/<hash>`` with its
  inductor and Triton kernels), startup plan (``plan/...``) and vLLM's model-info
  cache (``modelinfo/...``: which architecture a model class is, found otherwise by
  importing it in a subprocess, ~18 s on the H100 host) files;
- the restored model hashes as the model the snapshot was taken of (patch 0017 calls
  :func:`hash_factors_as_original`; the snapshot's identity check has already made
  sure it is the same architecture, dtype and shapes);
- at restore the stored files go back under ``VLLM_CACHE_ROOT`` (never over a file
  that is there), where vLLM looks them up by its own key.

vLLM's key still decides: restored into another vLLM, torch, environment or engine
configuration, the files are not found under the new key and the engine compiles.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

from vllm.ha import envs as ha_envs

logger = init_logger(__name__)

COMPILE_DIR = "compile"
PLAN_DIR = "plan"
MODELINFO_DIR = "modelinfo"  # of VLLM_CACHE_ROOT/modelinfos (keyed by class, checked by
# vLLM against the hash of the module's source, so valid on any node with this vLLM)
CACHE_DIRS = (COMPILE_DIR, PLAN_DIR, MODELINFO_DIR)
_AOT = "torch_aot_compile"


def hash_factors_as_original(factors: dict[str, Any]) -> dict[str, Any]:
    """``ModelConfig``'s hash factors, with a model restored from a snapshot named as
    the model the snapshot was taken of (``VLLM_HA_RESTORED_MODEL``, set by
    ``--restore-from``)."""
    alias = ha_envs.restored_model()
    if alias is not None and factors.get("model") == alias[0]:
        return {**factors, "model": alias[1]}
    return factors


def original_model(model: str) -> str:
    """The model a snapshot records as its own: a restored server's snapshot names the
    model the first one was taken of, so every later restore keeps its cache key."""
    alias = ha_envs.restored_model()
    return alias[1] if alias is not None and model == alias[0] else model


def _cache_root() -> Path:
    import vllm.envs as envs

    return Path(envs.VLLM_CACHE_ROOT)


def compile_units(paths: Iterable[str | None]) -> list[str]:
    """The cache directories (relative to ``torch_compile_cache``) that hold the
    engine's compiled artifacts, from its compilation config's ``cache_dir`` and
    ``local_cache_dir``: ``<hash>`` for the backend's cache,
    ``torch_aot_compile/<hash>`` for an AOT-compiled model. Directories a user chose
    outside the cache root are not vLLM-keyed: they are left out."""
    root = (_cache_root() / "torch_compile_cache").resolve()
    units: list[str] = []
    for p in paths:
        if not p:
            continue
        try:
            parts = Path(p).resolve().relative_to(root).parts
        except ValueError:
            continue
        unit = "/".join(parts[:2] if parts and parts[0] == _AOT else parts[:1])
        if unit and unit not in units and (root / unit).is_dir():
            units.append(unit)
    return units


def startup_plan_path(worker: Any) -> str | None:
    """This worker's persisted startup plan, if vLLM wrote one."""
    try:
        from vllm.v1.worker.startup_plan import compute_plan_fingerprint

        fp = compute_plan_fingerprint(worker.vllm_config, worker.rank,
                                      worker.parallel_config.world_size)
    except Exception as e:  # a platform without the device queries it needs
        logger.debug("Snapshot: no startup plan fingerprint: %s", e)
        return None
    path = _cache_root() / "startup_plan" / f"startup_plan_{fp}.json"
    return str(path) if path.is_file() else None


def worker_cache_info(worker: Any) -> dict[str, Any]:
    """What a worker reports for the snapshot: its compile cache units and plan.
    With AOT compile the backend's directories are all the config names once the
    graph is compiled; the AOT unit (the compiled model, its inductor and Triton
    kernels) is where vLLM pointed inductor's cache for this process."""
    cc = worker.vllm_config.compilation_config
    paths = [cc.cache_dir, cc.local_cache_dir, os.environ.get("TORCHINDUCTOR_CACHE_DIR")]
    return {"compile_units": compile_units(paths),
            "startup_plan": startup_plan_path(worker)}


@dataclass
class CacheFiles:
    """Files of the compile cache and startup plans, by their name in the snapshot."""

    files: dict[str, Path] = field(default_factory=dict)
    units: list[str] = field(default_factory=list)

    @property
    def plans(self) -> int:
        return sum(rel.startswith(f"{PLAN_DIR}/") for rel in self.files)

    @classmethod
    def of(cls, units: Iterable[str], plans: Iterable[str | None]) -> CacheFiles:
        out = cls(units=sorted(set(units)))
        base = _cache_root() / "torch_compile_cache"
        for unit in out.units:
            for f in sorted((base / unit).rglob("*")):
                # Lock files and torch's temporary files are not artifacts.
                if f.is_file() and not f.name.endswith((".lock", ".tmp")) \
                        and "locks" not in f.relative_to(base / unit).parts:
                    out.files[f"{COMPILE_DIR}/{f.relative_to(base).as_posix()}"] = f
        for plan in plans:
            if plan:
                out.files[f"{PLAN_DIR}/{Path(plan).name}"] = Path(plan)
        infos = _cache_root() / "modelinfos"
        for f in sorted(infos.glob("*.json")) if infos.is_dir() else ():
            out.files[f"{MODELINFO_DIR}/{f.name}"] = f
        return out

def write_cache_files(writer: Any, cache: CacheFiles) -> dict[str, Any]:
    """Into the generation ``writer`` builds: a file the previous generation holds
    with the same bytes is linked, the others written."""
    from vllm.v1.checkpoint.snapshot import file_chunks, file_entry

    prev = writer.previous.manifest["files"] if writer.previous else {}
    written = linked = size = 0
    for rel, src in cache.files.items():
        try:
            if rel in prev and prev[rel]["size"] == src.stat().st_size \
                    and file_entry(src)["sha256"] == prev[rel]["sha256"]:
                size += writer.link(rel)["size"]
                linked += 1
                continue
            with open(src, "rb") as f:
                size += writer.write_file(rel, file_chunks(f))["size"]
            written += 1
        except FileNotFoundError:
            # vLLM replaced or removed it meanwhile (its own temp files): not an artifact
            # this snapshot needs; a half-written one is dropped by the writer's abort.
            writer.files.pop(rel, None)
    return {"files": written + linked, "written": written, "linked": linked,
            "bytes": size, "units": cache.units, "startup_plans": cache.plans,
            "model_infos": sum(rel.startswith(f"{MODELINFO_DIR}/") for rel in cache.files)}


def install_cache_files(snapshot: Path, names: Iterable[str]) -> dict[str, int]:
    """Put a snapshot's compile cache and startup plans where vLLM looks for them.
    A file already there is kept (it is either the same or another engine's)."""
    from vllm.v1.checkpoint.snapshot import SnapshotError, check_name

    root = _cache_root()
    installed = kept = 0
    for rel in names:
        check_name(rel)  # no absolute paths, no '..'
        if rel.startswith(f"{COMPILE_DIR}/"):
            base = root / "torch_compile_cache"
            dest = base / rel[len(COMPILE_DIR) + 1:]
        elif rel.startswith(f"{PLAN_DIR}/"):
            base, name = root / "startup_plan", rel[len(PLAN_DIR) + 1:]
            if "/" in name or not name.startswith("startup_plan_"):
                raise SnapshotError(f"{rel!r} is not a startup plan file")
            dest = base / name
        elif rel.startswith(f"{MODELINFO_DIR}/"):
            base, name = root / "modelinfos", rel[len(MODELINFO_DIR) + 1:]
            if "/" in name or not name.endswith(".json"):
                raise SnapshotError(f"{rel!r} is not a model-info file")
            dest = base / name
        else:
            continue
        if not dest.resolve().is_relative_to(base.resolve()):
            raise SnapshotError(f"{rel!r} would be installed outside {base}")
        if dest.exists():
            kept += 1
            continue
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
        try:
            shutil.copyfile(snapshot / rel, tmp)
            os.replace(tmp, dest)  # a reader never sees half a file
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        installed += 1
    return {"installed": installed, "kept": kept}
