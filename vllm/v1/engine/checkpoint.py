# SPDX-License-Identifier: Apache-2.0
"""EngineCore utility methods of ``POST /checkpoint`` / ``POST /restore``.

The API server's :class:`~vllm.v1.checkpoint.manager.CheckpointManager` pauses the
scheduler first (upstream's ``pause_generation``, cache kept), then calls these
through ``call_utility_async``. The scheduler's state (requests, BlockPool, prefix
cache hash map) lives in this process's host memory and is untouched by a checkpoint;
only device bytes leave and come back, so the prefix cache is valid after restore
exactly when the KV blocks were kept.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from vllm.logger import init_logger

from vllm.v1.checkpoint.snapshot import SnapshotError
from vllm.v1.engine.snapshot import (
    BLOCKS_FILE,
    KVPlan,
    SnapshotKVRestore,
    cached_block_hashes,
    check_identity,
    identity,
    read_blocks_file,
    snapshot_dir,
    write_blocks_file,
)
from vllm.v1.worker.checkpoint_worker import (
    rpc_checkpoint_abort,
    rpc_checkpoint_offload,
    rpc_checkpoint_plan,
    rpc_checkpoint_prepin,
    rpc_checkpoint_restore,
)
from vllm.v1.worker.snapshot_worker import (
    kv_segment_files,
    rpc_snapshot_done,
    rpc_snapshot_finish,
    rpc_snapshot_load_check,
    rpc_snapshot_load_in_place,
    rpc_snapshot_load_kv,
    rpc_snapshot_wait,
    rpc_snapshot_weights_held,
    rpc_snapshot_weights_linkable,
    rpc_snapshot_write,
)

logger = init_logger(__name__)


def blocks_in_use(block_pool: Any) -> list[int]:
    """Blocks a running request holds or the prefix cache can serve (the null block
    and free, never-hashed blocks carry nothing)."""
    null = getattr(block_pool, "null_block", None)
    return [b.block_id for b in block_pool.blocks
            if b is not null and (b.ref_cnt > 0 or b.block_hash is not None)]


class EngineCoreCheckpointMixin:
    """``checkpoint_*`` utilities (patch 0006 makes them EngineCore's)."""

    def _checkpoint_blocks(self, keep_kv: bool) -> list[int]:
        if not keep_kv:
            return []
        return blocks_in_use(self.scheduler.kv_cache_manager.block_pool)  # type: ignore

    def checkpoint_plan(self, keep_kv: bool) -> dict[str, Any]:
        """Bytes a checkpoint would keep in host memory (before compression)."""
        blocks = self._checkpoint_blocks(keep_kv)
        plans = self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_checkpoint_plan, args=(blocks,))
        return {"kv_blocks": len(blocks),
                "weights_raw": sum(p["weights_raw"] for p in plans),
                "kv_raw": sum(p["kv_raw"] for p in plans),
                "host_pinned": sum(p.get("host_pinned", 0) for p in plans)}

    def checkpoint_prepin(self, fraction: float, nbytes: int | None = None
                          ) -> dict[str, Any]:
        """Every worker pins host memory for its next checkpoint image now: ``nbytes``,
        else ``fraction`` of its weights' bytes."""
        workers = self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_checkpoint_prepin, args=(fraction, nbytes))
        return {"workers": workers}

    def checkpoint_offload(self, keep_kv: bool, codec: str) -> dict[str, Any]:
        """Every worker moves its weights (and the KV blocks in use) to host memory and
        gives up its device memory. Without ``keep_kv`` the prefix cache is reset and
        running requests are preempted (recomputed after restore)."""
        mirror = getattr(self.scheduler, "mirror", None)  # type: ignore[attr-defined]
        if mirror is not None and mirror.connected:
            # Copies in flight read the KV the offload frees: the API server pauses the
            # mirror (POST /mirror/pause) before it gets here.
            raise RuntimeError("the KV mirror is still connected; pause it first")
        if not keep_kv:
            self.scheduler.reset_prefix_cache(  # type: ignore[attr-defined]
                reset_running_requests=True)
        blocks = self._checkpoint_blocks(keep_kv)
        # A snapshot still being written may read the weights the offload frees (on
        # the CPU build it encodes them on its thread): it finishes first.
        self.model_executor.collective_rpc(rpc_snapshot_wait)  # type: ignore[attr-defined]
        workers = self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_checkpoint_offload, args=(blocks, codec))
        return {"kv_blocks": len(blocks), "workers": workers}

    def checkpoint_abort(self) -> dict[str, Any]:
        """After an offload that failed on some worker: the workers that offloaded
        restore, the others have nothing to undo."""
        workers = self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_checkpoint_abort)
        return {"workers": workers}

    def checkpoint_restore(self) -> dict[str, Any]:
        """Every worker maps its device memory again and writes the bytes back."""
        workers = self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_checkpoint_restore)
        return {"workers": workers}

    # -- snapshots on disk (issue 6) -------------------------------------------------

    def snapshot_write(self, gen_dir: str, codec: str, linkable: dict[str, list[str]],
                       previous_dir: str | None = None,
                       background: bool = False) -> dict[str, Any]:
        """Weights and the prefix cache's blocks (with their hashes) into ``gen_dir``;
        what ``previous_dir`` (the generation it replaces) holds of them is linked.
        Runs between steps: the engine is paused for exactly this long. With
        ``background`` the workers return once the bytes are copied to host memory
        and write the files afterwards (``pending``: collect them with
        :meth:`snapshot_write_finish`), so the pause is the copy, not the disk."""
        t0 = time.perf_counter()
        pool = self.scheduler.kv_cache_manager.block_pool  # type: ignore[attr-defined]
        executor = self.model_executor  # type: ignore[attr-defined]
        ids, entries = cached_block_hashes(pool)
        previous = None
        if previous_dir is not None and all(executor.collective_rpc(
                rpc_snapshot_weights_linkable, args=(linkable,))):
            try:
                previous = read_blocks_file(Path(previous_dir))
            except SnapshotError as e:
                logger.warning("Snapshot: the previous KV is not reused: %s", e)
        gen = Path(gen_dir)
        plan = KVPlan.make(gen.name, ids, entries, previous)
        workers = executor.collective_rpc(
            rpc_snapshot_write,
            args=(gen_dir, plan.write_ids, codec, linkable, plan.segment, background))
        files = {BLOCKS_FILE: write_blocks_file(gen, plan)}
        link: set[str] = set()
        for w in workers:
            files.update(w["files"])
            link.update(w["link"])
            for seg in plan.keep:
                link.update(kv_segment_files(seg, w["rank"]))
        return {"files": files, "link": sorted(link), "kv_blocks": len(ids),
                "compile_units": sorted({u for w in workers for u in w["cache"]["compile_units"]}),
                "startup_plans": [w["cache"]["startup_plan"] for w in workers
                                  if w["cache"]["startup_plan"]],
                "kv_blocks_written": len(plan.write_ids),
                "pending": sorted(rel for w in workers for rel in w["pending"]),
                "codec": workers[0]["codec"],
                "identity": identity(self.vllm_config),  # type: ignore[attr-defined]
                "seconds": time.perf_counter() - t0,
                "workers": [w["seconds"] for w in workers]}

    def snapshot_write_finish(self, gen_dir: str) -> dict[str, Any] | None:
        """The files of the background write of ``gen_dir``, once every worker's are
        on disk (None until then, nothing collected); raises if a worker's write
        failed or a worker has no such write (this engine is not the one that
        started it)."""
        executor = self.model_executor  # type: ignore[attr-defined]
        if not all(executor.collective_rpc(rpc_snapshot_done, args=(gen_dir,))):
            return None
        results = executor.collective_rpc(rpc_snapshot_finish, args=(gen_dir,))
        files: dict[str, Any] = {}
        for r in results:
            files.update(r)
        return {"files": files}

    def restore_snapshot_kv(self) -> None:
        """Startup hook (patch 0013): with ``--restore-from``, the snapshot's prefix
        cache goes into this engine's BlockPool before it serves."""
        gen = snapshot_dir(self.vllm_config)  # type: ignore[attr-defined]
        if gen is None:
            return
        pool = self.scheduler.kv_cache_manager.block_pool  # type: ignore[attr-defined]
        executor = self.model_executor  # type: ignore[attr-defined]
        SnapshotKVRestore(Path(gen), pool).run(
            lambda d, ids: executor.collective_rpc(rpc_snapshot_load_kv, args=(d, ids)))

    # -- a spare takes a snapshot (POST /snapshot/load) -------------------------------

    def snapshot_weights_held(self, weights: dict[str, list[str]]) -> bool:
        """Every worker holds the weights of these files already (a previous load)."""
        return all(self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_snapshot_weights_held, args=(weights,)))

    def snapshot_load(self, gen_dir: str, weights: dict[str, list[str]],
                      reload_weights: bool = False, verified: bool = True
                      ) -> dict[str, Any]:
        """This serving engine, idle, becomes the one the snapshot ``gen_dir`` was taken
        of: its weights are written in place (compiled code and CUDA graphs stay
        valid), unless every worker loaded that weights file already (and not
        ``reload_weights``); its prefix cache is replaced by the snapshot's.
        ``weights``: the manifest's piece checksums of the weights files;
        ``verified``: they were checked (only then is a load remembered).

        Every check runs on every worker before anything is written; a refusal is
        returned as ``{"refused": why, "status": 400|409}`` with nothing changed. An
        exception after that means the load failed part way."""
        t0 = time.perf_counter()
        scheduler = self.scheduler  # type: ignore[attr-defined]
        executor = self.model_executor  # type: ignore[attr-defined]
        if scheduler.has_requests():
            return {"refused": "requests are in flight: a snapshot loads into an idle "
                    "engine", "status": 409}
        if getattr(scheduler, "mirror", None) is not None:
            return {"refused": "this engine mirrors its KV to a standby, which would keep "
                    "the old prefix cache: a snapshot loads into a server without "
                    "--mirror-peer", "status": 409}
        try:
            check_identity(Path(gen_dir), self.vllm_config)  # type: ignore[attr-defined]
        except SnapshotError as e:
            return {"refused": str(e), "status": 400}
        refused = next((r for r in executor.collective_rpc(
            rpc_snapshot_load_check, args=(gen_dir,)) if r), None)
        if refused is not None:
            return {"refused": refused, "status": 400}
        workers = executor.collective_rpc(rpc_snapshot_load_in_place,
                                          args=(gen_dir, weights, reload_weights, verified))
        t_weights = time.perf_counter()
        # Blocks computed with the old weights (and hashed from the old seed) go, from
        # a KV connector's store too.
        if not self.reset_prefix_cache(  # type: ignore[attr-defined]
                reset_connector=getattr(scheduler, "connector", None) is not None):
            raise RuntimeError("the prefix cache could not be reset")
        self.reset_encoder_cache()  # type: ignore[attr-defined]
        pool = scheduler.kv_cache_manager.block_pool
        kv = SnapshotKVRestore(Path(gen_dir), pool).run(
            lambda d, ids: executor.collective_rpc(rpc_snapshot_load_kv, args=(d, ids)))
        t_end = time.perf_counter()
        return {"weights_kept": all(w["kept"] for w in workers),
                "weights_bytes": sum(w["bytes"] for w in workers),
                "weights_seconds": t_weights - t0, "kv": kv,
                "kv_seconds": t_end - t_weights, "seconds": t_end - t0}
