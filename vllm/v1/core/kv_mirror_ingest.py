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
    """Applies the primary's :class:`MirrorStepOps` to the standby's BlockPool."""

    def __init__(self, block_pool: BlockPool) -> None:
        if not block_pool.enable_caching:
            raise ValueError("the standby needs prefix caching enabled")
        self.block_pool = block_pool
        self._reserved: dict[int, list[KVCacheBlock]] = {}
        self.num_blocks_published = 0

    def invalidate(self, ops: MirrorStepOps) -> None:
        """Forget hashes the primary evicted, before new bytes reach those blocks."""
        pool = self.block_pool
        for key in ops.invalidate:
            block = pool.cached_block_hash_to_block.get_one_block(key)
            if block is not None:
                pool.evict_blocks({block.block_id})

    def reserve(self, ops: MirrorStepOps) -> list[int]:
        """Take the step's target blocks out of circulation; returns their ids."""
        self.invalidate(ops)
        pool = self.block_pool
        blocks = []
        for mb in ops.write:
            block = pool.blocks[mb.block_id]
            if block.ref_cnt != 0 or block.is_null:
                raise RuntimeError(
                    f"standby block {mb.block_id} is in use (ref_cnt={block.ref_cnt}): "
                    "the standby must not serve traffic while it mirrors")
            pool.evict_blocks({block.block_id})  # stale content from a lost invalidation
            pool.free_block_queue.remove(block)
            block.ref_cnt = 1
            blocks.append(block)
        self._reserved[ops.seq] = blocks
        return [b.block_id for b in blocks]

    def publish(self, ops: MirrorStepOps, landed: bool = True) -> None:
        """The bytes of step ``ops.seq`` landed (or not): cache them, or drop them."""
        blocks = self._reserved.pop(ops.seq, [])
        if landed:
            for mb, block in zip(ops.write, blocks):
                self.block_pool._insert_block_hash(mb.block_hash, block, mb.num_tokens)
            self.num_blocks_published += len(blocks)
        self.block_pool.free_blocks(blocks)

    def apply(self, ops: MirrorStepOps, copy=None) -> None:
        """reserve -> ``copy(block_ids)`` (the data plane) -> publish, in one call."""
        ids = self.reserve(ops)
        landed = True
        if copy is not None and ids:
            landed = bool(copy(ids))
        self.publish(ops, landed)

    def reset(self) -> None:
        """The primary's prefix cache was reset: so is the standby's."""
        self.block_pool.reset_prefix_cache()
