# SPDX-License-Identifier: Apache-2.0
"""The standby engine process of KV mirroring.

A full :class:`EngineCore` (same model, same KV layout, the primary's block count,
prefix caching on) that serves no traffic: its workers expose their KV cache (direct
transport) or a staging ring (staged) to the primary's workers, and its loop applies
the primary's per-step ops to its BlockPool through :class:`StandbyIngest`, publishing
each block's hash only once its bytes are in place. The API server talks to it over a
control socket (``hello``, ``connect_primary``, ``status``, ``verify``, ``lookup``,
``stop``); the primary's scheduler pushes ops on a second socket.
"""

from __future__ import annotations

import os
import pickle
import signal
import time
from typing import Any

from vllm.logger import init_logger

logger = init_logger(__name__)

# Process-title prefix of the standby and its workers: ``ps`` and ``nvidia-smi`` show
# VLLM_STANDBY::EngineCore / VLLM_STANDBY::Worker... next to the primary's VLLM::...
STANDBY_TITLE_PREFIX = "VLLM_STANDBY"

_BUSY_POLL_MS = 1  # while steps are pending landing
_IDLE_POLL_MS = 50


class StandbyEngine:
    """Ingest loop of a standby EngineCore."""

    def __init__(self, engine: Any, transport: str, staging_bytes: int) -> None:
        from vllm.v1.core.kv_mirror_ingest import StandbyIngest
        from vllm.v1.worker.kv_mirror_worker import rpc_standby_open

        self.engine = engine
        self.manager = engine.scheduler.kv_cache_manager
        self.ingest = StandbyIngest(self.manager.block_pool)
        self.workers = engine.model_executor.collective_rpc(
            rpc_standby_open, args=(transport, staging_bytes))
        self._landed_ranks: dict[int, int] = {}  # seq -> ranks that reported it
        self.steps_applied = 0

    # -- ops from the primary's scheduler ---------------------------------------------

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

    # -- control requests from the API server -----------------------------------------

    def status(self) -> dict[str, Any]:
        from vllm.v1.core.kv_mirror import cached_blocks

        pool = self.ingest.block_pool
        return {
            "pid": os.getpid(),
            "lag_steps": self.ingest.lag_steps,
            "steps_applied": self.steps_applied,
            "blocks_published": self.ingest.num_blocks_published,
            "blocks_dropped": self.ingest.num_blocks_dropped,
            "cached_blocks": len(cached_blocks(pool)),
        }

    def verify(self, primary: list[tuple[int, str, str]]) -> dict[str, Any]:
        """Compare the primary's cached blocks (id, hash hex, checksum) with ours:
        same hash published at the same block id, byte-identical."""
        from vllm.v1.worker.kv_mirror_worker import rpc_block_checksums

        pool = self.ingest.block_pool
        ids = [b for b, _, _ in primary]
        sums = self.engine.model_executor.collective_rpc(rpc_block_checksums,
                                                         args=(ids,))[0]
        missing, mismatched = [], []
        for (block_id, key_hex, checksum), mine in zip(primary, sums):
            key = bytes.fromhex(key_hex)
            if (pool.blocks[block_id].block_hash != key
                    or pool.cached_block_hash_to_block.get_one_block(key) is None):
                missing.append(block_id)
            elif mine != checksum:
                mismatched.append(block_id)
        return {"checked": len(primary), "missing": missing, "mismatched": mismatched}

    def lookup(self, prompts: list[list[int]]) -> list[int]:
        from vllm.v1.engine.mirror import prefix_hits

        return prefix_hits(self.engine, prompts)

    def handle(self, request: tuple) -> Any:
        kind, *args = request
        if kind == "hello":
            return {"workers": self.workers, "pid": os.getpid(),
                    "num_blocks": self.ingest.block_pool.num_gpu_blocks}
        if kind == "connect_primary":
            from vllm.v1.worker.kv_mirror_worker import rpc_standby_connect_primary

            self.engine.model_executor.collective_rpc(rpc_standby_connect_primary,
                                                      args=(args[0],))
            return True
        if kind == "status":
            return self.status()
        if kind == "verify":
            return self.verify(args[0])
        if kind == "lookup":
            return self.lookup(args[0])
        raise ValueError(f"unknown standby request {kind!r}")

    # -- the loop ---------------------------------------------------------------------

    def serve(self, control_address: str, ops_address: str, parent_pid: int) -> None:
        import zmq

        from vllm.v1.core.kv_mirror_scheduler import decode_ops

        ctx = zmq.Context()
        control = ctx.socket(zmq.REP)
        control.bind(control_address)
        ops = ctx.socket(zmq.PULL)
        ops.setsockopt(zmq.RCVHWM, 0)
        ops.bind(ops_address)
        poller = zmq.Poller()
        poller.register(control, zmq.POLLIN)
        poller.register(ops, zmq.POLLIN)
        logger.info("mirror standby: ready (pid %d, %d blocks)", os.getpid(),
                    self.ingest.block_pool.num_gpu_blocks)
        try:
            while os.getppid() == parent_pid:
                timeout = _BUSY_POLL_MS if self.ingest.lag_steps else _IDLE_POLL_MS
                events = dict(poller.poll(timeout))
                if ops in events:
                    while True:
                        try:
                            self.on_ops(*decode_ops(ops.recv(zmq.NOBLOCK)))
                        except zmq.Again:
                            break
                if self.ingest.lag_steps:
                    self.poll_workers()
                if control in events:
                    request = pickle.loads(control.recv())
                    if request[0] == "stop":
                        control.send(pickle.dumps(True))
                        return
                    try:
                        reply = ("ok", self.handle(request))
                    except Exception as e:  # a bad request never kills the standby
                        logger.exception("mirror standby: %s failed", request[0])
                        reply = ("error", f"{type(e).__name__}: {e}")
                    control.send(pickle.dumps(reply))
            logger.warning("mirror standby: the API server is gone; exiting")
        finally:
            control.close(linger=0)
            ops.close(linger=0)
            ctx.term()


def run_standby(vllm_config: Any, control_address: str, ops_address: str,
                transport: str, staging_bytes: int, parent_pid: int) -> None:
    """Entry point of the standby process (spawned by the API server)."""
    from vllm.utils.system_utils import set_process_title
    from vllm.v1.engine.core import EngineCore
    from vllm.v1.executor import Executor

    set_process_title("EngineCore")
    # The API server stops us with SIGTERM; exit cleanly so workers are reaped.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(SystemExit(0)))
    engine = None
    try:
        t0 = time.monotonic()
        engine = EngineCore(vllm_config, Executor.get_class(vllm_config), log_stats=False)
        standby = StandbyEngine(engine, transport, staging_bytes)
        logger.info("mirror standby: engine up in %.1f s", time.monotonic() - t0)
        standby.serve(control_address, ops_address, parent_pid)
    finally:
        if engine is not None:
            engine.shutdown()
