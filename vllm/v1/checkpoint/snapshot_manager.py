# SPDX-License-Identifier: Apache-2.0
"""Snapshots on disk from the API server: ``POST /checkpoint {"snapshot": NAME}``,
``POST /snapshot`` and ``--snapshot-interval``.

The engine copies what it writes (weights by name, the prefix cache's blocks and
hashes) to host memory between two steps and writes the files into a fresh generation
directory while it goes on serving, so a snapshot pauses it for the copy and nothing
else (inside a checkpoint, and when the copies would not fit in host memory, the files
are written in the pause); weights this process already wrote are hard-linked from the
previous generation, not written again. This side adds the
model's configuration and tokenizer files and the settings to start from it, then
commits the generation (manifest last, ``CURRENT`` swapped): a failure at any point
leaves the previous snapshot current and valid.
"""

from __future__ import annotations

import asyncio
import errno
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

from vllm.ha.metrics import ProcessMetrics
from vllm.v1.checkpoint.compile_cache import CacheFiles, original_model, write_cache_files
from vllm.v1.checkpoint.snapshot import SnapshotError, SnapshotStore
from vllm.v1.engine.snapshot import copy_model_files, ha_version

logger = init_logger(__name__)

PERIODIC_NAME = "periodic"
# How often a background snapshot write is asked whether its files are on disk.
BACKGROUND_POLL_S = 0.1
# Settings that shape the engine, recorded so `--restore-from` starts the same one.
RECORDED_ARGS = (
    "served_model_name", "max_model_len", "block_size", "enable_prefix_caching",
    "prefix_caching_hash_algo", "kv_cache_dtype", "quantization", "enable_sleep_mode",
    "enforce_eager", "max_num_seqs", "max_num_batched_tokens", "tensor_parallel_size",
    "trust_remote_code", "gpu_memory_utilization", "num_gpu_blocks_override", "seed",
    "enable_prompt_tokens_details",
)


# The engine's workers report an OSError as text: both forms mean a full disk.
_DISK_FULL = ("No space left", "File too large", "Disk quota exceeded")
_DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def on_cuda() -> bool:
    """This server's engines run on CUDA (nvCOMP and the driver checkpoint apply)."""
    from vllm.platforms import current_platform

    return current_platform.is_cuda()


class SnapshotCallError(RuntimeError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


@dataclass(frozen=True)
class SnapshotConfig:
    root: Path | None = None
    interval_s: float | None = None

    @classmethod
    def from_args(cls, args: Any) -> SnapshotConfig:
        root = getattr(args, "snapshot_root", None)
        return cls(Path(root).resolve() if root else None,
                   getattr(args, "snapshot_interval", None))


class SnapshotMetrics(ProcessMetrics):

    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge

        self.seconds = Gauge("vllm:snapshot_seconds",
                             "Duration of the last snapshot, total and the engine's "
                             "pause", ["part"])
        self.bytes = Gauge("vllm:snapshot_bytes", "Bytes of the last snapshot",
                           ["form"])
        self.last_success = Gauge("vllm:snapshot_last_success_timestamp_seconds",
                                  "When the last snapshot was committed")
        self.failures = Counter("vllm:snapshot_failures",
                                "Snapshots that failed (the previous one stays valid)")



class SnapshotManager:
    """Writes snapshots of one server's engine under the configured root."""

    def __init__(self, engine_client: Any, config: SnapshotConfig, args: Any) -> None:
        self.client = engine_client
        self.config = config
        self.args = args
        self.metrics = SnapshotMetrics.get()
        self.last: dict[str, Any] | None = None
        self.last_error: str | None = None
        # The last snapshot this engine loaded (POST /snapshot/load).
        self.last_load: dict[str, Any] | None = None
        # The snapshot being written: name, phase (engine | files | commit), since when.
        self.writing: dict[str, Any] | None = None
        # See manager._NVCOMP_DRIVER: such a process is not driver-checkpointed.
        self.nvcomp_written = False
        self._lock = asyncio.Lock()
        self._task: asyncio.Task | None = None

    def store(self) -> SnapshotStore:
        if self.config.root is None:
            raise SnapshotCallError(
                400, "this server has no snapshot root: start it with --snapshot-root DIR")
        return SnapshotStore(self.config.root)

    def _recorded_args(self) -> dict[str, Any]:
        return {k: getattr(self.args, k) for k in RECORDED_ARGS
                if self.args is not None and hasattr(self.args, k)}

    async def write(self, name: str, codec: str = "auto",
                    background: bool = True) -> dict[str, Any]:
        """One snapshot ``ROOT/name``; the previous one of that name stays current
        until this one is whole. ``background``: the engine pauses only while the
        bytes are copied to host memory; the files are written while it serves (a
        checkpoint, whose engine is paused anyway, writes them in the pause)."""
        store = self.store()
        async with self._lock:
            t0 = time.perf_counter()
            try:
                writer = await asyncio.to_thread(store.begin, name)
            except SnapshotError as e:
                raise SnapshotCallError(400, str(e)) from None
            res: dict[str, Any] | None = None
            try:
                self._phase(name, "engine")
                prev = writer.previous.manifest["files"] if writer.previous else {}
                linkable = {rel: e["sha256"] for rel, e in prev.items()}
                res = await self.client.engine_core.call_utility_async(
                    "snapshot_write", str(writer.path), codec, linkable,
                    str(writer.previous.path) if writer.previous else None, background)
                # Now, not at commit: the encoding is done whatever happens to the files
                # (see manager._NVCOMP_DRIVER).
                self.nvcomp_written |= str(res["codec"]).startswith("nvcomp")
                if res["pending"]:
                    logger.info("Snapshot %s: engine paused %.2f s for the copy; writing the "
                                "files while it serves", name, res["seconds"])
                    self._phase(name, "files", engine_pause_seconds=round(res["seconds"], 3))
                    done = await self._background_files(str(writer.path))
                    missing = set(res["pending"]) - set(done)
                    if missing:
                        raise SnapshotError(f"the engine's background write of {writer.path} "
                                            f"did not report {sorted(missing)}")
                    res["files"].update(done)
                self._phase(name, "commit")
                t_engine = time.perf_counter()
                for rel, entry in res["files"].items():
                    writer.add(rel, entry)
                for rel in res["link"]:
                    await asyncio.to_thread(writer.link, rel)
                model = self.client.vllm_config.model_config.model
                model_files = await asyncio.to_thread(copy_model_files, writer, model)
                # Keyed by vLLM's config hash: a restore on a fresh node finds it there.
                units, plans = res["compile_units"], res["startup_plans"]
                cache = await asyncio.to_thread(
                    lambda: write_cache_files(writer, CacheFiles.of(units, plans)))
                meta = {"engine_args": self._recorded_args(), "model_files": model_files,
                        "kv_blocks": res["kv_blocks"], "codec": res["codec"],
                        "model": original_model(model), "compile_cache": cache}
                snap = await asyncio.to_thread(writer.commit, res["identity"],
                                               ha_version(), meta)
            except BaseException as e:
                self.writing = None
                if res is None and codec not in ("none", "zlib"):
                    # The engine may have encoded with nvCOMP before it failed.
                    self.nvcomp_written |= on_cuda()
                writer.abort()
                self.metrics.failures.inc()
                self.last_error = f"{type(e).__name__}: {e}"
                if isinstance(e, asyncio.CancelledError):
                    raise
                if any(m in str(e) for m in _DISK_FULL) or (
                        isinstance(e, OSError) and e.errno in _DISK_FULL_ERRNOS):
                    raise SnapshotCallError(
                        507, f"the disk is full writing snapshot {name!r} ({e}); the "
                        "previous snapshot is unchanged") from None
                if isinstance(e, SnapshotError):
                    raise SnapshotCallError(500, str(e)) from None
                raise SnapshotCallError(
                    500, f"snapshot {name!r} failed ({type(e).__name__}: {e}); the "
                    "previous snapshot is unchanged") from None
            total = time.perf_counter() - t0
            self.writing = None
            files = snap.manifest["files"]
            size = sum(e["size"] for e in files.values())
            self.last = {
                "name": name, "path": str(snap.path), "bytes": size,
                "bytes_written": size - writer.linked_bytes,
                "bytes_linked": writer.linked_bytes, "kv_blocks": res["kv_blocks"],
                "kv_blocks_written": res["kv_blocks_written"],
                "codec": res["codec"], "seconds": round(total, 3),
                "engine_pause_seconds": round(res["seconds"], 3),
                "written_in_background": bool(res["pending"]),
                "compile_cache": {k: cache[k] for k in ("files", "bytes", "startup_plans")},
                "commit_seconds": round(time.perf_counter() - t_engine, 3),
            }
            self.last_error = None
            self.metrics.seconds.labels(part="total").set(total)
            self.metrics.seconds.labels(part="engine_pause").set(res["seconds"])
            self.metrics.bytes.labels(form="total").set(size)
            self.metrics.bytes.labels(form="written").set(size - writer.linked_bytes)
            self.metrics.last_success.set(time.time())
            logger.info("Snapshot %s: %.2f GiB (%.2f GiB written, the rest linked), %d KV "
                        "blocks (%d written), %.2f s (engine paused %.2f s) -> %s", name,
                        size / 2**30, (size - writer.linked_bytes) / 2**30,
                        res["kv_blocks"], res["kv_blocks_written"], total, res["seconds"],
                        snap.path)
            return dict(self.last)

    def loaded(self, name: str, snap: Any, result: dict[str, Any]) -> None:
        """This engine now is the one ``snap`` was taken of (``POST /snapshot/load``)."""
        self.last_load = {"name": name, "path": str(snap.path),
                          "created": snap.manifest.get("created"),
                          "weights_kept": result["weights_kept"],
                          "kv_blocks": result["kv"]["blocks"],
                          "seconds": round(result["seconds"], 3),
                          "at": time.time()}

    def _phase(self, name: str, phase: str, **extra: Any) -> None:
        """``GET /checkpoint`` shows a snapshot being written and where it is."""
        w = self.writing or {"name": name, "started": time.time()}
        self.writing = {**w, "phase": phase, **extra}

    def exclusive(self) -> asyncio.Lock:
        """Held: no snapshot is being written or starts (``async with``)."""
        return self._lock

    async def wait_idle(self) -> None:
        """Until no snapshot is being written (a checkpoint must not start under one:
        its offload frees what a background write may read, and the write's host
        copies count against the checkpoint's host memory)."""
        async with self._lock:
            pass

    async def _background_files(self, gen_dir: str) -> dict[str, Any]:
        """The engine's files of a background write, once on disk (it serves meanwhile)."""
        while True:
            done = await self.client.engine_core.call_utility_async(
                "snapshot_write_finish", gen_dir)
            if done is not None:
                return done["files"]
            await asyncio.sleep(BACKGROUND_POLL_S)

    # -- periodic -------------------------------------------------------------------

    def start_periodic(self, serving) -> None:
        """``--snapshot-interval``: ``ROOT/periodic`` every interval while
        ``serving()`` (a checkpointed engine has nothing new to write)."""
        if self.config.interval_s and self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._periodic(serving))

    async def _periodic(self, serving) -> None:
        interval = float(self.config.interval_s or 0)
        logger.info("Snapshots of the serving engine every %.0f s into %s", interval,
                    self.config.root / PERIODIC_NAME if self.config.root else None)
        while True:
            await asyncio.sleep(interval)
            if not serving():
                continue
            try:
                await self.write(PERIODIC_NAME)
            except Exception as e:
                logger.error("Periodic snapshot failed (the previous one is kept): %s", e)

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None

    def status(self) -> dict[str, Any]:
        return {"root": str(self.config.root) if self.config.root else None,
                "interval_s": self.config.interval_s, "last": self.last,
                "last_error": self.last_error, "loaded": self.last_load,
                "writing": (dict(self.writing, seconds=round(time.time() -
                                                             self.writing["started"], 1))
                            if self.writing else None)}
