# SPDX-License-Identifier: Apache-2.0
"""``POST /checkpoint`` and ``POST /restore`` in the API server.

Checkpoint: new requests are held (never rejected) → the engine pauses, in-flight
requests finishing first (``in_flight="wait"``) or frozen with it (``"keep"``) → every
worker moves its weights, and the KV blocks in use if ``keep_kv``, to host memory,
compressed on the GPU, and gives its device memory up (sleep-mode allocator) → the
driver checkpoints each worker process, so the GPU holds nothing of it.
Restore runs the same steps backwards and lets the held requests through.

Every step that fails undoes the ones before it: a failed checkpoint leaves the server
serving as before, a failed restore leaves it checkpointed (retry the restore).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import asdict
from typing import Any, Literal

from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass
from vllm.logger import init_logger

from vllm.ha import envs as ha_envs
from vllm.ha.metrics import ProcessMetrics
from vllm.v1.checkpoint.driver import (
    DriverCheckpoint,
    DriverCheckpointUnavailable,
    device_used_mib,
    gpu_memory_mib,
)
from vllm.v1.checkpoint.snapshot_manager import SnapshotConfig, SnapshotManager, on_cuda
from vllm.v1.checkpoint.state import CheckpointLifecycle, CheckpointState, CheckpointStateError
from vllm.v1.worker.checkpoint_worker import CODECS

logger = init_logger(__name__)



# --checkpoint-prepin pins this fraction of the weights' raw bytes: what byte-plane ANS
# leaves of bf16 weights (0.67x on the H100); a larger image (the KV blocks kept, other
# codecs) pins the rest during the checkpoint.
PREPIN_FRACTION = 0.7

# Measured on the H100 (driver 580.159.04): once a process had written a snapshot
# compressed with nvCOMP, the driver's restore of that process failed
# (CUDA_ERROR_UNKNOWN). The cause found since (tenth session): any nvCOMP codec alive
# in the process at the driver checkpoint, which the snapshot's cached codec was; the
# checkpoint now destroys every codec first (checkpoint_worker.drop_codecs), and since
# the eleventh session snapshots drop theirs after each write and load. Until a GPU run
# shows snapshot + release working, the two stay apart: nothing may leave a server
# stuck checkpointed.
_NVCOMP_DRIVER = (
    "this process wrote an nvCOMP-compressed snapshot, after which the driver restore "
    "fails (CUDA_ERROR_UNKNOWN on driver 580): use release_gpu=false, or write "
    "snapshots with codec none or zlib (a checkpoint's own snapshot is written "
    "uncompressed for this reason)")


class CheckpointCallError(RuntimeError):
    """A call refused before anything changed, with its HTTP status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


_MIRROR_DRIVER = (
    "with --mirror-peer on CUDA the GPU cannot be released: the driver does not restore "
    "a process that has mapped another's memory (the mirror's NIXL transport); use "
    "release_gpu=false (weights and KV offloaded, the CUDA context kept)")


# A pydantic dataclass: the /checkpoint route takes it as its JSON body (unknown
# fields refused), so the options and their defaults are written once.
@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class CheckpointOptions:
    keep_kv: bool = True
    """Keep the KV blocks in use (and so the prefix cache); False drops them."""
    in_flight: Literal["wait", "keep"] = "wait"
    """``wait``: running requests finish first; ``keep``: they are checkpointed with
    the engine and continue after restore."""
    codec: str = "auto"
    """auto (nvCOMP ANS on CUDA, zlib on CPU), ans, gdeflate, zlib or none."""
    release_gpu: bool = True
    """Driver checkpoint after the offload (CUDA): the GPU holds 0 bytes of the
    engine. False stops at the offload (the process keeps its CUDA context)."""
    wait_timeout_s: float = 300.0
    """With ``in_flight="wait"``: give up (and keep serving) after this long."""
    snapshot: str | None = None
    """Also write the snapshot ``NAME`` under the server's ``--snapshot-root`` (what
    ``vllm serve --restore-from ROOT/NAME`` starts from)."""
    standby: Literal["keep", "stop"] = "keep"
    """With ``--mirror-peer``: mirroring is paused for the checkpoint and resumed after
    restore (the standby catches up from the prefix cache). ``keep``: the standby
    stays up on its peer; ``stop``: it is stopped too (its memory freed: a standby on
    the same GPU) and a new one starts after restore."""

    def validate(self) -> None:
        if self.standby not in ("keep", "stop"):
            raise CheckpointCallError(400, "standby must be 'keep' or 'stop'")
        if self.in_flight not in ("wait", "keep"):
            raise CheckpointCallError(400, "in_flight must be 'wait' or 'keep'")
        if self.codec not in CODECS:
            raise CheckpointCallError(400, f"codec must be one of {', '.join(CODECS)}")
        if not self.wait_timeout_s > 0:
            raise CheckpointCallError(400, "wait_timeout_s must be > 0")
        if self.codec in ("ans", "gdeflate") and not CheckpointManager._on_cuda():
            raise CheckpointCallError(
                400, f"codec {self.codec!r} is nvCOMP, which needs a CUDA device; "
                "use auto, zlib or none")


class CheckpointMetrics(ProcessMetrics):
    def __init__(self) -> None:
        from prometheus_client import Gauge, Histogram

        self.state = Gauge("vllm:checkpoint_state",
                           "1 for the server's checkpoint state", ["state"])
        self.phase = Histogram("vllm:checkpoint_phase_seconds",
                               "Duration of each checkpoint/restore phase", ["phase"],
                               buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300))
        self.host_bytes = Gauge("vllm:checkpoint_host_bytes",
                                "Bytes a checkpointed engine keeps in host memory",
                                ["part", "form"])
        self.held = Gauge("vllm:checkpoint_requests_held",
                          "Requests waiting for the server to serve again")


    def set_state(self, state: CheckpointState) -> None:
        for s in CheckpointState:
            self.state.labels(state=s.value).set(1 if s is state else 0)


def _max_per_phase(prefix: str, workers: list[dict[str, Any]]) -> dict[str, float]:
    """``{prefix_phase: seconds}``, each phase's maximum over the workers (they run in
    parallel; the values may come from different workers)."""
    out: dict[str, float] = {}
    for w in workers:
        for k, v in (w.get("seconds") or {}).items():
            key = f"{prefix}_{k}"
            out[key] = max(out.get(key, 0.0), v)
    return out


def _free_host_bytes() -> int:
    """Host memory a checkpoint may pin: what is available, less the reserve left to
    everything else (VLLM_HA_CHECKPOINT_HOST_RESERVE_GIB)."""
    import psutil

    return psutil.virtual_memory().available - ha_envs.checkpoint_host_reserve()


class CheckpointManager:
    """Drives one server's checkpoint lifecycle (one per API server process)."""

    def __init__(self, engine_client: Any, args: Any = None) -> None:
        self.client = engine_client
        self.snapshots = SnapshotManager(engine_client, SnapshotConfig.from_args(args),
                                         args)
        self.lifecycle = CheckpointLifecycle()
        self.metrics = CheckpointMetrics.get()
        self.metrics.set_state(self.lifecycle.state)
        self.options: CheckpointOptions | None = None
        self.sizes: dict[str, int] = {}
        self.residual: dict[str, int | None] = {}
        self.host_pinned = 0  # bytes the workers keep pinned for checkpoint images
        self.reload_gbps: float | None = None
        # The workers' own phases of the last offload and reload, each the maximum
        # over the workers (they run in parallel).
        self.worker_phases: dict[str, float] = {}
        self.codec: str | None = None
        self.phases: dict[str, float] = {}
        self.pids: list[int] = []
        self.released: list[int] = []  # pids the driver checkpointed
        self.cycles = 0
        self.held = 0
        self._driver: DriverCheckpoint | None = None
        # The checkpoint paused the mirror (not an operator): the restore resumes it.
        self._mirror_paused_by_us = False

    # -- helpers --------------------------------------------------------------------

    async def _utility(self, method: str, *args: Any) -> Any:
        return await self.client.engine_core.call_utility_async(method, *args)

    def _driver_or_raise(self) -> DriverCheckpoint:
        if self._driver is None:
            try:
                self._driver = DriverCheckpoint()
            except DriverCheckpointUnavailable as e:
                raise CheckpointCallError(
                    501, f"the driver checkpoint API is not available: {e}; "
                    "use release_gpu=false to offload without releasing the GPU") from None
        return self._driver

    _on_cuda = staticmethod(on_cuda)

    def _phase(self, name: str, start: float) -> float:
        now = time.perf_counter()
        self.phases[name] = now - start
        self.metrics.phase.labels(phase=name).observe(now - start)
        return now

    def _begin(self, phase: str) -> None:
        self.lifecycle.begin(phase)  # 409 unless the state allows it
        self.metrics.set_state(self.lifecycle.state)

    def _transition(self, phase: str, ok: bool, error: str | None = None,
                    failed_to: CheckpointState | None = None) -> None:
        self.lifecycle.finish(phase, ok=ok, error=error, failed_to=failed_to)
        self.metrics.set_state(self.lifecycle.state)

    # -- requests held while not serving ------------------------------------------------

    async def snapshot(self, name: str, codec: str = "auto",
                       background: bool = True) -> dict[str, Any]:
        """A snapshot of the serving engine (it pauses between two steps for the
        write; requests are not held)."""
        if not self.lifecycle.accepting:
            raise CheckpointCallError(
                409, f"cannot snapshot while {self.lifecycle.state.value}: POST "
                "/checkpoint with a snapshot name writes one while checkpointing")
        return await self.snapshots.write(name, codec, background)

    async def hold(self) -> None:
        """Wait (a generation request) until the server serves."""
        if self.lifecycle.accepting:
            return
        self.held += 1
        self.metrics.held.set(self.held)
        try:
            await self.lifecycle.wait_serving()
        finally:
            self.held -= 1
            self.metrics.held.set(self.held)

    # -- the two calls --------------------------------------------------------------------

    async def checkpoint(self, opts: CheckpointOptions) -> dict[str, Any]:
        opts.validate()
        self._refuse_unsupported()
        # A snapshot being written (in the background, while serving) ends first.
        await self.snapshots.wait_idle()
        driver_release = self._releases_gpu(opts)
        if opts.snapshot is not None:
            self.snapshots.store().check_name(opts.snapshot)  # 400 before any pause
            if driver_release and opts.codec in ("ans", "gdeflate"):
                raise CheckpointCallError(400, _NVCOMP_DRIVER)
        if driver_release and self.snapshots.nvcomp_written:
            raise CheckpointCallError(409, _NVCOMP_DRIVER)
        mirror = self._mirror()
        if mirror is not None and driver_release:
            # Found on the H100: the driver's restore of an engine whose workers have
            # mapped the standby's memory (NIXL over CUDA IPC) fails, and the server
            # would stay checkpointed.
            raise CheckpointCallError(409, _MIRROR_DRIVER)
        if mirror is not None and mirror.config.required:
            raise CheckpointCallError(
                409, "/checkpoint pauses the mirror, which --mirror-required forbids "
                "(every request would be refused until it is back in sync)")
        self._begin("checkpoint")
        self.phases = {}
        self.worker_phases = {}
        try:
            await self._pause_mirror(opts)
            await self._checkpoint(opts)
        except BaseException as e:
            self._transition("checkpoint", ok=False, error=str(e))
            logger.error("Checkpoint failed, serving again: %s", e)
            await self._resume_mirror()
            raise
        self._transition("checkpoint", ok=True)
        self.cycles += 1
        return self.status()

    def _mirror(self) -> Any:
        return getattr(self.client, "mirror", None)

    @classmethod
    def _releases_gpu(cls, opts: CheckpointOptions) -> bool:
        """The checkpoint ends with the driver releasing the GPU."""
        return opts.release_gpu and cls._on_cuda()

    async def _pause_mirror(self, opts: CheckpointOptions) -> None:
        """The standby must not watch (or fail over from) a frozen primary: mirroring
        pauses for the checkpoint, unless an operator had paused it already."""
        mirror = self._mirror()
        self._mirror_paused_by_us = mirror is not None and not mirror.paused
        if self._mirror_paused_by_us:
            t = time.perf_counter()
            await mirror.set_paused(True, release_standby=opts.standby == "stop")
            self._phase("mirror_pause", t)

    async def _resume_mirror(self) -> None:
        mirror = self._mirror()
        if mirror is not None and self._mirror_paused_by_us:
            self._mirror_paused_by_us = False
            try:
                await mirror.set_paused(False)
            except Exception as e:  # serving matters more; the operator can resume
                logger.error("Could not resume the mirror (POST /mirror/resume): %s", e)

    def _refuse_unsupported(self) -> None:
        if getattr(self.client, "errored", False):
            raise CheckpointCallError(503, "the engine is dead; nothing to checkpoint")

    async def _checkpoint(self, opts: CheckpointOptions) -> None:
        t0 = time.perf_counter()
        driver = self._driver_or_raise() if self._releases_gpu(opts) else None
        plan = await self._utility("checkpoint_plan", opts.keep_kv)
        self._check_host_memory(plan)
        t = time.perf_counter()
        try:
            await asyncio.wait_for(
                self.client.pause_generation(mode=opts.in_flight, clear_cache=False),
                opts.wait_timeout_s)
        except asyncio.TimeoutError:
            await self.client.resume_generation()
            raise CheckpointCallError(
                504, f"in-flight requests did not finish within {opts.wait_timeout_s} s; "
                "still serving (retry, or use in_flight=keep)") from None
        t = self._phase("pause", t)
        if opts.snapshot is not None:
            # An nvCOMP-compressed snapshot would make the driver restore fail.
            codec = "none" if self._releases_gpu(opts) else opts.codec
            try:
                await self.snapshots.write(opts.snapshot, codec, background=False)
            except BaseException:
                await self.client.resume_generation()
                raise
            t = self._phase("snapshot", t)
        try:
            result = await self._utility("checkpoint_offload", opts.keep_kv, opts.codec)
        except BaseException:
            try:  # with TP > 1 the workers that did offload restore
                await self._utility("checkpoint_abort")
            except Exception:
                logger.exception("Checkpoint failed and could not be undone on every "
                                 "worker")
            await self.client.resume_generation()
            raise
        t = self._phase("offload", t)
        workers = result["workers"]
        self.pids = sorted({w["pid"] for w in workers})
        self.codec = workers[0]["codec"] if workers else None
        self.sizes = {k: sum(w[k] for w in workers)
                      for k in ("weights_raw", "weights_stored", "kv_raw", "kv_stored")}
        self.sizes["kv_blocks"] = result["kv_blocks"]
        self.host_pinned = sum(w.get("host_pinned", 0) for w in workers)
        self.worker_phases = _max_per_phase("offload", workers)
        # What the driver checkpoint is about to copy: the processes' GPU memory once
        # the sleep-mode pool (weights, KV, CUDA graphs) is released.
        self.residual = {
            "gpu_mib": gpu_memory_mib(self.pids),
            "graph_pool_released_mib": sum(w.get("graph_pool_released", 0)
                                           for w in workers) >> 20}
        for part in ("weights", "kv"):
            for form in ("raw", "stored"):
                self.metrics.host_bytes.labels(part=part, form=form).set(
                    self.sizes[f"{part}_{form}"])
        self.released = []
        if driver is not None:
            try:
                for pid in self.pids:
                    await asyncio.to_thread(driver.checkpoint, pid)
                    self.released.append(pid)
            except BaseException:
                await self._undo_release(driver)
                raise
            t = self._phase("release", t)
        self.options = opts
        self.phases["total"] = time.perf_counter() - t0
        logger.info("Checkpointed in %.2f s (%s); GPU %s", self.phases["total"],
                    ", ".join(f"{k} {v:.2f} s" for k, v in self.phases.items()),
                    "released" if self.released else "not released")

    async def prepin(self, gib: float | None = None) -> None:
        """``--checkpoint-prepin [GIB]``: pin the host memory of a checkpoint image at
        server start (``gib`` per worker, else PREPIN_FRACTION of its weights), so even
        the first ``/checkpoint`` releases the GPU in seconds."""
        t0 = time.perf_counter()
        nbytes = None if gib is None else int(gib * 2**30)
        if nbytes is not None:
            free = _free_host_bytes()
            if nbytes > free:
                logger.error("--checkpoint-prepin %s: nothing pinned (%.1f GiB available "
                             "after VLLM_HA_CHECKPOINT_HOST_RESERVE_GIB); the first checkpoint "
                             "pins while the engine is paused", gib, max(free, 0) / 2**30)
                return
        try:
            result = await self._utility("checkpoint_prepin", PREPIN_FRACTION, nbytes)
        except Exception as e:
            # Serving matters more than a faster first checkpoint.
            logger.error("--checkpoint-prepin: nothing pinned (%s); the first "
                         "checkpoint pins while the engine is paused", e)
            return
        pinned = sum(w["host_pinned"] for w in result["workers"])
        self.host_pinned = pinned
        logger.info("Pinned %.1f GiB of host memory for checkpoints in %.1f s "
                    "(--checkpoint-prepin)", pinned / 2**30, time.perf_counter() - t0)

    async def _undo_release(self, driver: DriverCheckpoint) -> None:
        for pid in self.released:
            await asyncio.to_thread(driver.restore, pid)
        self.released = []
        await self._utility("checkpoint_restore")
        await self.client.resume_generation()

    def _check_host_memory(self, plan: dict[str, Any]) -> None:
        # Worst case: nothing compresses; memory pinned by an earlier checkpoint (or
        # --checkpoint-prepin) is reused, and counts as used already.
        need = max(0, plan["weights_raw"] + plan["kv_raw"] - plan.get("host_pinned", 0))
        free = _free_host_bytes()
        if need > free:
            raise CheckpointCallError(
                507, f"not enough host memory: the checkpoint needs up to "
                f"{need / 2**30:.2f} GiB, {max(free, 0) / 2**30:.2f} GiB is available "
                "(keep_kv=false needs less); still serving")

    async def restore(self) -> dict[str, Any]:
        self._begin("restore")
        self.phases = {k: v for k, v in self.phases.items()
                       if k in ("mirror_pause", "pause", "offload", "release", "total")}
        t0 = t = time.perf_counter()
        try:
            if self.released:
                driver = self._driver_or_raise()
                for pid in list(self.released):
                    await asyncio.to_thread(driver.restore, pid)
                    self.released.remove(pid)
                t = self._phase("driver_restore", t)
            reload = await self._utility("checkpoint_restore")
            t = self._phase("reload", t)
            rates = [w.get("gbps") for w in reload.get("workers", [])]
            self.reload_gbps = min(rates) if rates and None not in rates else None
            self.worker_phases.update(_max_per_phase("reload", reload.get("workers", [])))
            await self.client.resume_generation()
            t = self._phase("resume", t)
        except BaseException as e:
            self._transition("restore", ok=False, error=str(e))
            logger.error("Restore failed, still checkpointed (retry POST /restore): %s", e)
            raise
        self.phases["restore_total"] = t - t0
        self._transition("restore", ok=True)
        logger.info("Restored in %.2f s", self.phases["restore_total"])
        await self._resume_mirror()  # serving already; the standby catches up
        return self.status()

    # -- a spare takes a snapshot ---------------------------------------------------------

    async def load_snapshot(self, name: str, verify: bool = True,
                            reload_weights: bool = False) -> dict[str, Any]:
        """``POST /snapshot/load``: this idle server becomes the one the snapshot
        ``ROOT/name`` was taken of (weights in place, prefix cache replaced), without
        a process start, compile or CUDA-graph capture: a warm spare stands in for a
        lost server in the time it takes to read the snapshot.

        Everything that can be checked is checked first (identity, version, every
        checksum of the files it will read): a refused load changes nothing. A load
        that fails once the weights are being written leaves the server
        ``load_failed`` (its weights half replaced: generation answers 503) until a
        load succeeds."""
        self._refuse_unsupported()
        if self._mirror() is not None:
            raise CheckpointCallError(
                409, "this server mirrors its KV to a standby, which would keep the old "
                "prefix cache: load snapshots into a server without --mirror-peer")
        store = self.snapshots.store()
        from vllm.v1.engine.snapshot import ha_version, identity

        # No snapshot is written while the weights change (one begun before ends
        # first): it would record, or later link, weights this process no longer has.
        async with self.snapshots.exclusive():
            return await self._load_snapshot(store, name, verify, reload_weights,
                                             identity(self.client.vllm_config),
                                             ha_version())

    async def _load_snapshot(self, store: Any, name: str, verify: bool,
                             reload_weights: bool, ident: dict[str, Any],
                             version: str) -> dict[str, Any]:
        t0 = time.perf_counter()
        snap = await asyncio.to_thread(store.read, name, ident, version, False)
        weights = {rel: e["sha256"] for rel, e in snap.manifest["files"].items()
                   if rel.startswith("weights/")}
        self._begin("load")  # generation requests wait from here on
        phases: dict[str, float] = {}
        try:
            in_flight = self._in_flight()
            if in_flight:
                raise CheckpointCallError(
                    409, f"{in_flight} request(s) in flight: a snapshot loads into an idle "
                    "server (a spare); retry once they finish")
            held = not reload_weights and await self._utility("snapshot_weights_held",
                                                              weights)
            if verify:
                # The files this load reads; weights it keeps are not read.
                rels = [rel for rel in snap.manifest["files"]
                        if not (held and rel in weights)]
                await asyncio.to_thread(store.verify, snap, None, rels)
            phases["verify"] = time.perf_counter() - t0
            self.metrics.phase.labels(phase="load_verify").observe(phases["verify"])
        except BaseException as e:
            self._transition("load", ok=False, error=str(e))  # back as it was
            if isinstance(e, CheckpointStateError):
                raise CheckpointCallError(409, str(e)) from None
            raise
        try:
            res = await self._utility("snapshot_load", str(snap.path), weights,
                                      reload_weights, verify)
        except BaseException as e:
            self._transition("load", ok=False, error=str(e),
                             failed_to=CheckpointState.LOAD_FAILED)
            logger.error("Loading snapshot %s failed; this server's weights are incomplete "
                         "and it serves nothing until a load succeeds: %s", name, e)
            raise
        if "refused" in res:  # checked by the engine and every worker: nothing changed
            self._transition("load", ok=False, error=res["refused"])
            raise CheckpointCallError(res["status"], res["refused"])
        phases["weights"], phases["kv"] = res["weights_seconds"], res["kv_seconds"]
        self.metrics.phase.labels(phase="load_weights").observe(res["weights_seconds"])
        self.metrics.phase.labels(phase="load_kv").observe(res["kv_seconds"])
        phases["total"] = time.perf_counter() - t0
        self.snapshots.loaded(name, snap, res)
        self._transition("load", ok=True)
        self.snapshots.nvcomp_written |= str(snap.meta.get("codec", "")).startswith("nvcomp")
        out = {"name": name, "path": str(snap.path), "verified": verify,
               "weights": "kept" if res["weights_kept"] else "loaded",
               "weights_bytes": res["weights_bytes"], "kv_blocks": res["kv"]["blocks"],
               "kv_blocks_skipped": res["kv"]["skipped"],
               "phases_s": {k: round(v, 4) for k, v in phases.items()}}
        logger.info("Snapshot %s loaded in %.2f s (verify %.2f s, weights %s %.2f s, %d KV "
                    "blocks %.2f s); serving", name, phases["total"], phases["verify"],
                    out["weights"], phases["weights"], out["kv_blocks"], phases["kv"])
        return out

    # -- status -----------------------------------------------------------------------------

    def _in_flight(self) -> int | None:
        """Requests the engine has and has not finished (what a checkpoint waits for,
        or freezes with ``in_flight="keep"``)."""
        processor = getattr(self.client, "output_processor", None)
        return processor.get_num_unfinished_requests() if processor is not None else None

    def status(self) -> dict[str, Any]:
        sizes = dict(self.sizes)
        raw = sizes.get("weights_raw", 0) + sizes.get("kv_raw", 0)
        stored = sizes.get("weights_stored", 0) + sizes.get("kv_stored", 0)
        return {
            **self.lifecycle.to_json(),
            "options": asdict(self.options) if self.options else None,
            "codec": self.codec,
            "sizes": sizes,
            "ratio": round(raw / stored, 3) if stored else None,
            "phases_s": {k: round(v, 4) for k, v in self.phases.items()},
            "residual": self.residual,
            "reload_gbps": self.reload_gbps,
            "worker_phases_s": {k: round(v, 4) for k, v in self.worker_phases.items()},
            "host_pinned_mib": self.host_pinned >> 20,
            "pids": self.pids,
            "gpu_released": bool(self.released),
            "gpu_memory_mib": gpu_memory_mib(self.pids) if self.pids else None,
            "gpu_device_used_mib": device_used_mib(),
            "requests_held": self.held,
            "requests_in_flight": self._in_flight(),
            "cycles": self.cycles,
            "snapshot": self.snapshots.status(),
            "mirror": (self._mirror().state.state if self._mirror() is not None else None),
        }
