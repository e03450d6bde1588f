# SPDX-License-Identifier: Apache-2.0
"""The standby engine of KV mirroring, and its promotion to serve.

The standby is an unmodified ``EngineCoreProc`` (same model, same KV layout, the
primary's block count, prefix caching on) started by the API server behind a second
engine client. Until promoted it serves no traffic: its workers expose their KV cache
(direct transport) or a staging ring (staged) to the primary's workers, and the
primary's per-step ops reach its BlockPool through :class:`StandbyIngest`, which
publishes a block's hash only once its bytes are in place.

Everything that touches the BlockPool runs on the engine's busy-loop thread: the
control plane is EngineCore utility methods (``mirror_standby_*``, called by the API
server's supervisor), and :class:`StandbyOpsReader`, a thread reading the primary's
ops socket, hands its work to the loop as WAKEUP callables (patch 0008).

:meth:`EngineCoreStandbyMixin.mirror_promote` ends the standby role: the ops reader
stops, what landed is published, the blocks of steps whose bytes never confirmed are
held back for a while (a dead primary's worker may still be writing them), and the
engine serves like any primary (and can mirror to a new standby of its own).
"""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

# Process-title prefix of the standby and its workers: ``ps`` and ``nvidia-smi`` show
# VLLM_STANDBY::EngineCore / VLLM_STANDBY::Worker... next to the primary's VLLM::...
STANDBY_TITLE_PREFIX = "VLLM_STANDBY"

_BUSY_POLL_S = 0.001  # while steps are pending landing
_IDLE_POLL_S = 0.05
# Blocks of steps that never confirmed stay out of use this long after promotion: the
# dead primary's worker process (the mp executor's) may outlive its engine by a moment
# and finish a WRITE into them.
QUARANTINE_S = 5.0


class StandbyState:
    """The standby's ingest state: BlockPool side and its workers' endpoints."""

    def __init__(self, engine: Any, transport: str, staging_bytes: int) -> None:
        from vllm.v1.core.kv_mirror_ingest import StandbyIngest
        from vllm.v1.worker.kv_mirror_worker import rpc_standby_open

        self.engine = engine
        self.ingest = StandbyIngest(engine.scheduler.kv_cache_manager.block_pool)
        self.workers = engine.model_executor.collective_rpc(
            rpc_standby_open, args=(transport, staging_bytes))
        self._landed_ranks: dict[int, int] = {}  # seq -> ranks that reported it
        self.steps_applied = 0
        self.active = True  # False once promoted: late callables do nothing

    def on_ops(self, kind: str, payload: Any) -> None:
        if kind == "reset":
            # The primary's cache was reset (or a new primary connection starts):
            # drop what is pending, then every cached block.
            self.ingest.drain()
            self._landed_ranks.clear()
            if not self.ingest.block_pool.reset_prefix_cache():
                logger.warning("mirror standby: prefix cache reset refused")
        elif kind == "ops":
            self.ingest.receive_ops(payload)
            self.steps_applied += 1
        elif kind == "failed":
            # The primary could not push this step; its bytes will not come.
            self._landed_ranks.pop(payload, None)
            self.ingest.on_landed(payload, landed=False)

    def poll_workers(self) -> None:
        from vllm.v1.worker.kv_mirror_worker import rpc_standby_poll

        pending = self.ingest.pending_steps()
        results = self.engine.model_executor.collective_rpc(rpc_standby_poll,
                                                            args=(pending,))
        world = len(results)
        for seqs in results:
            for seq in seqs:
                n = self._landed_ranks.get(seq, 0) + 1
                if n < world:
                    self._landed_ranks[seq] = n
                else:
                    self._landed_ranks.pop(seq, None)
                    self.ingest.on_landed(seq)

    def close_workers(self) -> None:
        from vllm.v1.worker.kv_mirror_worker import rpc_standby_close

        self.engine.model_executor.collective_rpc(rpc_standby_close)


class StandbyOpsReader(threading.Thread):
    """Reads the primary's ops socket; the busy loop applies them.

    ``submit`` queues a callable for the engine's busy-loop thread. While steps are
    announced but not landed, a worker poll is queued every millisecond (one at a time:
    a slow loop is not flooded)."""

    def __init__(self, address: str, state: StandbyState, submit: Any) -> None:
        super().__init__(name="MirrorStandbyOps", daemon=True)
        import zmq

        self.state = state
        self.submit = submit
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.setsockopt(zmq.RCVHWM, 0)
        self._sock.bind(address)
        self._halt = threading.Event()
        self._poll_queued = threading.Event()
        # Batches handed to the loop and not applied yet: promotion applies them
        # itself (they may invalidate blocks a late WRITE overwrites).
        self._unapplied: dict[int, list[tuple[str, Any]]] = {}
        self._next_batch = 0

    def run(self) -> None:
        while not self._halt.is_set():
            busy = self.state.ingest.lag_steps > 0
            batch = []
            if self._sock.poll(int((_BUSY_POLL_S if busy else _IDLE_POLL_S) * 1000)):
                batch = self._read_available()
            if batch:
                key = self._next_batch
                self._next_batch += 1
                self._unapplied[key] = batch
                self.submit(lambda k=key: self._apply(k))
            if (batch or busy) and not self._poll_queued.is_set():
                self._poll_queued.set()
                self.submit(self._poll)

    def _read_available(self) -> list[tuple[str, Any]]:
        import zmq

        from vllm.v1.core.kv_mirror_scheduler import decode_ops

        batch = []
        while True:
            try:
                batch.append(decode_ops(self._sock.recv(zmq.NOBLOCK)))
            except zmq.Again:
                return batch

    def _apply(self, key: int) -> None:
        for kind, payload in self._unapplied.pop(key, ()):
            self.state.on_ops(kind, payload)

    def _poll(self) -> None:
        self._poll_queued.clear()
        if self.state.ingest.lag_steps:
            self.state.poll_workers()

    def stop(self) -> list[tuple[str, Any]]:
        """Stop reading; returns the ops still unread (on the busy-loop thread, the
        caller applies them: they may invalidate blocks a late WRITE overwrites)."""
        self._halt.set()
        self.join(timeout=5)
        try:
            pending = [op for key in sorted(self._unapplied) for op in self._unapplied[key]]
            self._unapplied.clear()
            return pending + self._read_available()
        finally:
            self._sock.close(linger=0)
            self._ctx.term()


class EngineCoreStandbyMixin:
    """``mirror_standby_*`` and ``mirror_promote`` utilities of a standby engine
    (part of :class:`~vllm.v1.engine.mirror.EngineCoreMirrorMixin`)."""

    _mirror_standby: StandbyState | None = None
    _mirror_ops_reader: StandbyOpsReader | None = None

    def _standby_state(self) -> StandbyState:
        state = self._mirror_standby
        if state is None or not state.active:
            raise RuntimeError("this engine is not a mirror standby")
        return state

    def _run_on_loop(self, fn: Any) -> None:
        """Queue ``fn`` for the busy-loop thread (from any thread of this process)."""
        from vllm.v1.engine import EngineCoreRequestType

        def guarded() -> None:
            state = self._mirror_standby
            if state is None or not state.active:
                return  # promoted (or closed) meanwhile
            try:
                fn()
            except Exception:  # never take the engine down over ingest
                logger.exception("mirror standby: ingest failed")

        self.input_queue.put_nowait(  # type: ignore[attr-defined]
            (EngineCoreRequestType.WAKEUP, guarded))

    def mirror_standby_open(self, transport: str, staging_bytes: int, ops_address: str
                            ) -> dict[str, Any]:
        """Become a standby: expose the workers' KV memory, listen for ops; returns
        what the primary's workers need to reach ours."""
        if self._mirror_standby is not None:
            raise RuntimeError("the mirror standby is already open")
        if not hasattr(self, "input_queue"):
            raise RuntimeError("a mirror standby must run as an EngineCoreProc")
        state = StandbyState(self, transport, staging_bytes)
        self._mirror_standby = state
        self._mirror_ops_reader = StandbyOpsReader(ops_address, state, self._run_on_loop)
        self._mirror_ops_reader.start()
        pool = state.ingest.block_pool
        logger.info("mirror standby: ready (pid %d, %d blocks)", os.getpid(),
                    pool.num_gpu_blocks)
        return {"workers": state.workers, "pid": os.getpid(),
                "num_blocks": pool.num_gpu_blocks}

    def mirror_standby_connect(self, metadata: list[bytes]) -> None:
        from vllm.v1.worker.kv_mirror_worker import rpc_standby_connect_primary

        self._standby_state()
        self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_standby_connect_primary, args=(metadata,))

    def mirror_standby_status(self) -> dict[str, Any]:
        from vllm.v1.core.kv_mirror import cached_blocks

        state = self._standby_state()
        return {
            "pid": os.getpid(),
            "lag_steps": state.ingest.lag_steps,
            "steps_applied": state.steps_applied,
            "blocks_published": state.ingest.num_blocks_published,
            "blocks_dropped": state.ingest.num_blocks_dropped,
            "cached_blocks": len(cached_blocks(state.ingest.block_pool)),
        }

    def mirror_standby_verify(self, primary: list[tuple[int, str, str]]
                              ) -> dict[str, Any]:
        """Compare the primary's cached blocks (id, hash hex, checksum) with ours:
        same hash published at the same block id, byte-identical."""
        from vllm.v1.worker.kv_mirror_worker import rpc_block_checksums

        pool = self._standby_state().ingest.block_pool
        ids = [b for b, _, _ in primary]
        sums = self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_block_checksums, args=(ids,))[0]
        missing, mismatched = [], []
        for (block_id, key_hex, checksum), mine in zip(primary, sums):
            key = bytes.fromhex(key_hex)
            if (pool.blocks[block_id].block_hash != key
                    or pool.cached_block_hash_to_block.get_one_block(key) is None):
                missing.append(block_id)
            elif mine != checksum:
                mismatched.append(block_id)
        return {"checked": len(primary), "missing": missing, "mismatched": mismatched}

    def mirror_standby_lookup(self, prompts: list[list[int]]) -> list[int]:
        from vllm.v1.engine.mirror import prefix_hits

        self._standby_state()
        return prefix_hits(self, prompts)

    def mirror_promote(self, discard_kv: bool = False) -> dict[str, Any]:
        """Stop being a standby and serve: publish what landed, hold back the blocks
        of unconfirmed steps for :data:`QUARANTINE_S`, then free them.
        ``discard_kv`` drops the mirrored prefix cache (a benchmark's baseline)."""
        from vllm.v1.core.kv_mirror import cached_blocks
        from vllm.v1.engine import EngineCoreRequestType

        t0 = time.monotonic()
        state = self._standby_state()
        reader = self._mirror_ops_reader
        if reader is not None:
            for kind, payload in reader.stop():
                state.on_ops(kind, payload)
            self._mirror_ops_reader = None
        try:
            state.poll_workers()
        except Exception:  # e.g. acknowledging a scatter to the dead primary
            logger.exception("mirror: last landing poll failed; unconfirmed steps held back")
        held = state.ingest.quarantine()
        state.active = False
        published = state.ingest.num_blocks_published
        if discard_kv:
            # Not reset_prefix_cache(): it refuses while the held blocks are in use.
            pool = state.ingest.block_pool
            pool.evict_blocks({b.block_id for b in cached_blocks(pool)})

        def release() -> None:
            try:
                state.ingest.block_pool.free_blocks(held)
                state.close_workers()
                logger.info("mirror: released %d quarantined block(s)", len(held))
            except Exception:  # runs on the busy loop: never take the engine down
                logger.exception("mirror: releasing the old standby's resources failed")
            self._mirror_standby = None

        timer = threading.Timer(
            QUARANTINE_S, lambda: self.input_queue.put_nowait(  # type: ignore[attr-defined]
                (EngineCoreRequestType.WAKEUP, release)))
        timer.daemon = True
        timer.start()
        logger.warning("mirror: standby promoted to primary in %.1f ms (%d block(s) "
                       "published, %d held back from unconfirmed steps)",
                       (time.monotonic() - t0) * 1e3, published, len(held))
        return {"pid": os.getpid(), "blocks_published": published,
                "blocks_held": len(held),
                "cached_blocks": len(cached_blocks(state.ingest.block_pool))}
