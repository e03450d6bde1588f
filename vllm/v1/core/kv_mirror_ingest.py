# SPDX-License-Identifier: Apache-2.0
"""Standby side of KV mirroring: blocks land at the primary's block ids, then their
hashes enter the standby's prefix cache (never before the bytes have landed).

The standby serves no traffic, so every non-null block of its pool is free (ref 0)
between steps. :meth:`StandbyIngest.reserve` takes the step's target blocks out of the
free queue (evicting whatever they held) so nothing can allocate them while bytes land;
:meth:`StandbyIngest.publish` stamps their hashes and returns them to the LRU tail
as cached blocks, like any block a finished request leaves behind.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger

from vllm.v1.core.kv_mirror import MirrorStepOps

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import KVCacheBlock

logger = init_logger(__name__)


class StandbyIngest:
    """Applies the primary's :class:`MirrorStepOps` to the standby's BlockPool.

    Two channels feed it and may arrive in either order: the step's ops (sent by the
    primary's scheduler before the step runs) and the notification that the step's
    bytes landed (sent by NIXL after the WRITE). Ops are applied on arrival
    (invalidate, reserve); hashes are published only once both are in. On promotion,
    :meth:`drain` drops every step whose bytes were not confirmed.
    """

    def __init__(self, block_pool: BlockPool) -> None:
        if not block_pool.enable_caching:
            raise ValueError("the standby needs prefix caching enabled")
        self.block_pool = block_pool
        self._pending: dict[int, tuple[MirrorStepOps, list[KVCacheBlock]]] = {}
        self._landed_early: set[int] = set()
        self._reserved_ids: dict[int, int] = {}  # block_id -> reservations held
        self._superseded: dict[int, set[int]] = {}  # seq -> block ids not to publish
        self.num_blocks_published = 0
        self.num_blocks_dropped = 0

    def invalidate(self, ops: MirrorStepOps) -> None:
        """Forget hashes the primary evicted, before new bytes reach those blocks."""
        pool = self.block_pool
        for block_id in ops.invalidate:
            if pool.blocks[block_id].block_hash is not None:
                pool.evict_blocks({block_id})
            if block_id in self._reserved_ids:
                # An earlier step's copy of this block has not been published yet
                # (the primary may learn its WRITE finished before we do): its hash
                # must never be published, the block's bytes will be the new ones.
                for seq, (pending, _) in self._pending.items():
                    if any(mb.block_id == block_id for mb in pending.write):
                        self._superseded.setdefault(seq, set()).add(block_id)

    def _reserve(self, ops: MirrorStepOps) -> list[KVCacheBlock]:
        pool = self.block_pool
        blocks = []
        for mb in ops.write:
            block = pool.blocks[mb.block_id]
            if block.is_null or (block.ref_cnt != 0 and mb.block_id not in self._reserved_ids):
                raise RuntimeError(
                    f"standby block {mb.block_id} is in use (ref_cnt={block.ref_cnt}): "
                    "the standby must not serve traffic while it mirrors")
            if block.ref_cnt == 0:
                pool.evict_blocks({block.block_id})  # stale content (a lost invalidation)
                pool.free_block_queue.remove(block)
            # A block re-sent while its earlier copy is pending (partial -> full
            # promotion) holds one reservation per step.
            block.ref_cnt += 1
            self._reserved_ids[mb.block_id] = self._reserved_ids.get(mb.block_id, 0) + 1
            blocks.append(block)
        return blocks

    def receive_ops(self, ops: MirrorStepOps) -> None:
        """Step ``ops.seq`` announced: invalidate and reserve now, publish on landing."""
        self.invalidate(ops)
        blocks = self._reserve(ops)
        self._pending[ops.seq] = (ops, blocks)
        if ops.seq in self._landed_early:
            self._landed_early.discard(ops.seq)
            self._finish(ops.seq, landed=True)
        elif not ops.write:
            self._finish(ops.seq, landed=True)

    def on_landed(self, seq: int, landed: bool = True) -> None:
        """The bytes of step ``seq`` are in place (or the WRITE failed)."""
        if seq in self._pending:
            self._finish(seq, landed)
        elif landed:
            self._landed_early.add(seq)

    def _finish(self, seq: int, landed: bool) -> None:
        ops, blocks = self._pending.pop(seq)
        superseded = self._superseded.pop(seq, set())
        if landed:
            for mb, block in zip(ops.write, blocks):
                if mb.block_id in superseded:
                    self.num_blocks_dropped += 1
                    continue
                self.block_pool._insert_block_hash(mb.block_hash, block, mb.num_tokens)
                self.num_blocks_published += 1
        else:
            self.num_blocks_dropped += len(blocks)
        for block in blocks:
            left = self._reserved_ids[block.block_id] - 1
            if left:
                self._reserved_ids[block.block_id] = left
            else:
                del self._reserved_ids[block.block_id]
        self.block_pool.free_blocks(blocks)

    def drain(self) -> int:
        """Before serving: drop every step whose bytes were not confirmed."""
        dropped = 0
        for seq in sorted(self._pending):
            dropped += len(self._pending[seq][0].write)
            self._finish(seq, landed=False)
        self._landed_early.clear()
        return dropped

    def quarantine(self) -> list[KVCacheBlock]:
        """On promotion: drop every unconfirmed step like :meth:`drain`, but keep its
        blocks reserved and return them (one entry per reservation): a late WRITE
        of the dead primary may still reach them, so the caller frees them later."""
        held: list[KVCacheBlock] = []
        for seq in sorted(self._pending):
            ops, blocks = self._pending.pop(seq)
            self._superseded.pop(seq, None)
            self.num_blocks_dropped += len(blocks)
            held.extend(blocks)
        self._reserved_ids.clear()
        self._landed_early.clear()
        return held

    def pending_block_ids(self, seq: int) -> list[int] | None:
        """Target block ids of an announced step not yet landed (None if unknown)."""
        entry = self._pending.get(seq)
        return None if entry is None else [b.block_id for b in entry[0].write]

    def pending_steps(self) -> dict[int, list[int]]:
        """Target block ids of every announced step not yet landed."""
        return {seq: [b.block_id for b in ops.write]
                for seq, (ops, _) in self._pending.items()}

    @property
    def lag_steps(self) -> int:
        return len(self._pending)

    def apply(self, ops: MirrorStepOps, copy=None) -> None:
        """Ops, then ``copy(block_ids)`` (the data plane), then landing, in one call."""
        self.receive_ops(ops)
        landed = True
        if copy is not None and ops.write:
            landed = bool(copy([b.block_id for b in ops.write]))
        if ops.seq in self._pending:
            self.on_landed(ops.seq, landed)

    def reset(self) -> None:
        """The primary's prefix cache was reset: so is the standby's."""
        self.block_pool.reset_prefix_cache()
