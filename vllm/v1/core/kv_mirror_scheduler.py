# SPDX-License-Identifier: Apache-2.0
"""The primary scheduler's end of KV mirroring (patch 0004 hooks it into ``Scheduler``).

Per step, :meth:`SchedulerMirror.take_step_ops` hands the tracker's ops to the worker
(in ``SchedulerOutput.mirror_ops``) and sends the same ops to the standby engine over a
ZMQ socket, so the standby knows where the step's bytes go and under which hashes to
publish them; ``update_from_output`` unpins the blocks of the steps the worker reports
done. Nothing here blocks the step: the socket is non-blocking with no high-water
mark, and a standby that is gone only makes the supervisor call :meth:`disconnect`.
"""

from __future__ import annotations

import pickle
import time
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from vllm.v1.core.kv_mirror import MirrorStepOps, MirrorTracker, cached_blocks

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool

    from vllm.config import VllmConfig

logger = init_logger(__name__)

# Blocks of the prefix cache queued per step while a new standby catches up: bounds
# both the extra pins (blocks out of the free queue) and one step's transfer.
RESYNC_BLOCKS_PER_STEP = 64
MAX_FAILURES_IN_A_ROW = 16
MIN_PIN_BUDGET = 256


def encode_ops(msg: tuple[str, Any]) -> bytes:
    return pickle.dumps(msg, protocol=pickle.HIGHEST_PROTOCOL)


def decode_ops(data: bytes) -> tuple[str, Any]:
    return pickle.loads(data)


class SchedulerMirror:
    """Owns the tracker while a standby is connected; counts what was mirrored."""

    def __init__(self, block_pool: BlockPool, staging_bytes: int | None = None,
                 pin_budget: int | None = None) -> None:
        self.block_pool = block_pool
        # Blocks the mirror may keep pinned (handed out or waiting): beyond it a slow
        # standby would take KV space from the primary's requests, so the newest
        # waiting blocks are deferred, unpinned, to the catch-up backlog instead.
        n = block_pool.num_gpu_blocks
        self.pin_budget = pin_budget or max(min(MIN_PIN_BUDGET, n // 4), n // 8)
        self._behind = False
        self._failures_in_a_row = 0
        self.dropped: str | None = None  # why this side gave up on the standby
        # The staged transport's ring: a step may carry at most half of it, so the
        # next step's blocks can be staged while the previous ones are scattered.
        self._staging_bytes = staging_bytes
        self._max_blocks_per_step: int | None = None
        self.tracker: MirrorTracker | None = None
        self._socket = None
        self._ctx = None
        self._next_seq = 0
        self._backlog: list[int] = []
        self._step = 0
        self._issued: dict[int, tuple[int, float, int]] = {}  # seq -> (step, t, blocks)
        self.blocks_mirrored = 0
        self.blocks_failed = 0
        self.bytes_mirrored = 0
        self.steps_mirrored = 0
        self.push_seconds = 0.0  # the worker's, posting and polling WRITEs
        self._bytes_per_block = 0
        # Samples since the last status() call, for the API server's histograms.
        self._transfer_seconds: list[float] = []
        self._lag_steps: list[int] = []  # the worker's: forwards until on the standby
        self._confirm_steps: list[int] = []  # ours: steps until we could unpin

    @classmethod
    def maybe_create(cls, vllm_config: VllmConfig, block_pool: BlockPool
                     ) -> SchedulerMirror | None:
        if getattr(vllm_config, "mirror_config", None) is None:
            return None
        if not block_pool.enable_caching:
            raise ValueError("--mirror-peer needs prefix caching enabled")
        cfg = vllm_config.mirror_config
        return cls(block_pool, cfg.staging_mib << 20 if cfg.transport == "staged" else None)

    # -- connection (EngineCore utility calls, on the busy-loop thread) --------------

    def connect(self, ops_address: str, bytes_per_block: int) -> int:
        """Start mirroring to the standby listening on ``ops_address``; queues the
        whole prefix cache for catch-up. Returns the number of blocks queued."""
        import zmq

        self.disconnect()
        self.dropped = None
        self._failures_in_a_row = 0
        self._ctx = zmq.Context.instance()
        sock = self._ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.SNDHWM, 0)  # never drop ops: they pair with pushed bytes
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(ops_address)
        self._socket = sock
        self._bytes_per_block = bytes_per_block
        if self._staging_bytes is not None and bytes_per_block > 0:
            self._max_blocks_per_step = max(1, self._staging_bytes // bytes_per_block // 2)
        self.tracker = MirrorTracker(self.block_pool, first_seq=self._next_seq)
        # The standby starts empty: forget everything, then copy the prefix cache.
        self._send(("reset", None))
        self._backlog = [b.block_id for b in cached_blocks(self.block_pool)]
        logger.info("mirror: standby connected at %s; %d cached block(s) to catch up",
                    ops_address, len(self._backlog))
        return len(self._backlog)

    def disconnect(self) -> None:
        """The standby is gone (or replaced): unpin everything, stop producing ops."""
        if self.tracker is not None:
            self._next_seq = self.tracker.next_seq
            self.blocks_failed += sum(n for _, _, n in self._issued.values())
            self.tracker.detach()
            self.tracker = None
        self._issued.clear()
        self._backlog = []
        if self._socket is not None:
            self._socket.close(linger=0)
            self._socket = None

    @property
    def connected(self) -> bool:
        return self.tracker is not None

    def _send(self, msg: tuple[str, Any]) -> None:
        import zmq

        try:
            self._socket.send(encode_ops(msg), flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # never fail the primary over its standby
            logger.warning("mirror: could not send to the standby: %s", e)

    # -- per step (Scheduler hooks) --------------------------------------------------

    def take_step_ops(self) -> MirrorStepOps | None:
        """This step's ops (None when there is nothing to mirror)."""
        self._step += 1
        tracker = self.tracker
        if tracker is None:
            return None
        if self._backlog and tracker.lag_blocks < self.pin_budget:
            # No more than fits: what would be spilled again would just churn the LRU.
            n = min(RESYNC_BLOCKS_PER_STEP, self.pin_budget - tracker.lag_blocks)
            chunk = self._backlog[:n]
            del self._backlog[:n]
            tracker.resync(chunk)
        if tracker.take_reset():
            self._send(("reset", None))
        room = max(0, self.pin_budget - tracker.in_flight_blocks)
        cap = room if self._max_blocks_per_step is None else min(room, self._max_blocks_per_step)
        over = tracker.pending_blocks - room
        if over > 0:
            self._backlog.extend(tracker.spill(over))
            if not self._behind:
                logger.warning("mirror: the standby is falling behind (%d blocks awaiting it); "
                               "deferring %d block(s) to catch-up, the primary keeps serving",
                               tracker.in_flight_blocks, over)
        self._behind = over > 0
        ops = tracker.take_step_ops(cap)
        if not ops.write and not ops.invalidate:
            return None
        self._send(("ops", ops))
        if ops.write:
            self._issued[ops.seq] = (self._step, time.monotonic(), len(ops.write))
        return ops

    def update_from_output(self, completions: Any) -> None:
        """Unpin the blocks of steps the worker reports copied (or failed)."""
        if completions is None or self.tracker is None:
            return
        now = time.monotonic()
        self.push_seconds += getattr(completions, "push_seconds", 0.0)
        for seq in completions.done:
            issued = self._issued.pop(seq, None)
            if issued is None:
                continue
            step, t0, n = issued
            self.tracker.complete(seq, ok=True)
            self._failures_in_a_row = 0
            self.blocks_mirrored += n
            self.bytes_mirrored += n * self._bytes_per_block
            self.steps_mirrored += 1
            self._transfer_seconds.append(now - t0)
            self._confirm_steps.append(self._step - step)
            self._lag_steps.append(completions.lag_steps.get(seq, self._step - step))
        for seq in completions.failed:
            issued = self._issued.pop(seq, None)
            if issued is not None:
                # The standby drops the step (its blocks were reserved, never
                # published); those still cached here are copied again.
                self._send(("failed", seq))
                self._backlog.extend(self.tracker.complete(seq, ok=False))
                self.blocks_failed += issued[2]
                self._failures_in_a_row += 1
        if self._failures_in_a_row >= MAX_FAILURES_IN_A_ROW:
            # Re-queueing would fail forever: drop the standby; the supervisor sees it
            # and starts a new one.
            self.dropped = f"{self._failures_in_a_row} mirror steps failed in a row"
            logger.warning("mirror: %s; dropping the standby connection", self.dropped)
            self.disconnect()

    def has_pending_work(self) -> bool:
        """Keep the engine stepping until in-flight copies are confirmed (their
        blocks are pinned) and the catch-up backlog is queued."""
        # lag_blocks counts pending and in-flight blocks (every issued step's).
        return self.tracker is not None and bool(self._backlog or self.tracker.lag_blocks)

    # -- observability ---------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Counters, lag and the samples since the last call (then cleared)."""
        out = {
            "connected": self.connected,
            "dropped": self.dropped,
            "blocks_mirrored": self.blocks_mirrored,
            "bytes_mirrored": self.bytes_mirrored,
            "blocks_failed": self.blocks_failed,
            "steps_mirrored": self.steps_mirrored,
            "push_seconds": self.push_seconds,
            "lag_blocks": (self.tracker.lag_blocks if self.tracker else 0),
            "backlog_blocks": len(self._backlog),
            "in_flight_steps": len(self._issued),
            "oldest_unconfirmed_s": (time.monotonic() - min(t for _, t, _ in self._issued.values())
                                     if self._issued else 0.0),
            "transfer_seconds": self._transfer_seconds,
            "lag_steps": self._lag_steps,
            "confirm_steps": self._confirm_steps,
        }
        self._transfer_seconds, self._lag_steps, self._confirm_steps = [], [], []
        return out

    def cached_blocks(self) -> list[tuple[int, bytes]]:
        """(block id, hash key) of every block in the primary's prefix cache."""
        return [(b.block_id, b.block_hash) for b in cached_blocks(self.block_pool)]
