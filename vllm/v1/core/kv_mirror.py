# SPDX-License-Identifier: Apache-2.0
"""Scheduler-side bookkeeping of KV mirroring (primary engine).

The :class:`MirrorTracker` watches the primary's :class:`BlockPool` through three
hooks (a block gets a prefix-cache hash, a block loses its hashes, the prefix cache
is reset) and turns them into per-step :class:`MirrorStepOps`: hashes the standby must
forget, then blocks to copy to the same block ids and publish under their hashes.

Why these hooks: vLLM hashes a block when it is *scheduled*, and the step that
carries it in its ``SchedulerOutput`` writes its last slot; so a block hashed while
step N is scheduled is copied by the worker after step N's forward, and a block hashed
after outputs arrive (async scheduling) is copied after the next forward, when its
bytes are certainly in place. A block is pinned (one extra reference) from the moment
it is hashed until its copy is reported complete, so it is never reused under an
in-flight copy; the primary never waits for the standby, a failed copy just unpins.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from vllm.logger import init_logger

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool
    from vllm.v1.core.kv_cache_utils import BlockHashWithGroupId, KVCacheBlock

logger = init_logger(__name__)


@dataclass(frozen=True)
class MirroredBlock:
    """One block to copy: the standby stores it at the same id, under the same key."""

    block_id: int
    block_hash: BlockHashWithGroupId
    num_tokens: int | None

    def __reduce__(self):
        # Every step's ops are pickled to the standby on the scheduler's thread: a
        # plain tuple pickles ~40 % faster than a frozen dataclass's default state.
        return (MirroredBlock, (self.block_id, self.block_hash, self.num_tokens))


@dataclass
class MirrorStepOps:
    """One step's mirror work, applied by the standby in this order: forget the
    hashes of the ``invalidate`` block ids, land the bytes of ``write``, then publish
    their hashes.

    Invalidations name block ids, not hashes: the same hash can sit on two blocks
    (two requests that computed one prefix at once), and only the block the primary
    evicted may lose it on the standby."""

    seq: int
    invalidate: list[int] = field(default_factory=list)
    write: list[MirroredBlock] = field(default_factory=list)


def cached_blocks(block_pool: BlockPool) -> list[KVCacheBlock]:
    """Every block of the pool's prefix cache (what a new standby catches up on, what
    verify compares)."""
    return [b for b in block_pool.blocks if b.block_hash is not None and not b.is_null]


class MirrorTracker:
    """Records, pins and hands out the primary's blocks to mirror, step by step."""

    def __init__(self, block_pool: BlockPool, first_seq: int = 0) -> None:
        if block_pool.mirror is not None:
            raise ValueError("the block pool already has a mirror tracker")
        self.block_pool = block_pool
        # Seqs never repeat across trackers of one pool (a reconnected standby gets
        # a new tracker): a late completion of an old step must not unpin a new one.
        self._next_seq = first_seq
        self._pending: dict[int, MirroredBlock] = {}  # block_id -> not yet handed out
        self._invalidate: list[int] = []
        self._in_flight: dict[int, list[KVCacheBlock]] = {}  # seq -> pinned blocks
        self.num_blocks_mirrored = 0
        self.num_blocks_failed = 0
        self._reset = False
        block_pool.mirror = self

    # -- BlockPool hooks -------------------------------------------------------------

    def on_block_cached(self, block: KVCacheBlock, block_hash: BlockHashWithGroupId,
                        num_tokens: int | None) -> None:
        # Secondary keys of an already cached block carry no new bytes.
        if block.is_null or block.block_hash != block_hash:
            return
        if block.block_id not in self._pending:
            self.block_pool.touch([block])  # pin until the copy completes
        self._pending[block.block_id] = MirroredBlock(block.block_id, block_hash,
                                                      num_tokens)

    def on_hashes_removed(self, block: KVCacheBlock,
                          removed: list[BlockHashWithGroupId]) -> None:
        self._invalidate.append(block.block_id)
        if self._pending.pop(block.block_id, None) is not None:
            # Lost its hash before its copy was handed out: nothing to copy.
            self.block_pool.free_blocks([block])

    def on_prefix_cache_reset(self) -> None:
        # reset_prefix_cache only succeeds with every block free, so nothing is
        # pinned here; the standby must drop everything it holds.
        self._pending.clear()
        self._invalidate.clear()
        self._reset = True

    # -- per step --------------------------------------------------------------------

    def take_step_ops(self, max_blocks: int | None = None) -> MirrorStepOps:
        """The ops for the step being scheduled; its blocks stay pinned until
        :meth:`complete` is called with the returned ``seq``.

        With ``max_blocks`` the oldest pending blocks go now and the rest wait
        (pinned) for later steps: a transport with a bounded staging area then never
        sees a step larger than it can hold. Oldest first keeps a chain's parents
        ahead of its children."""
        if max_blocks is None or len(self._pending) <= max_blocks:
            write, self._pending = list(self._pending.values()), {}
        else:
            ids = list(self._pending)[:max_blocks]
            write = [self._pending.pop(block_id) for block_id in ids]
        ops = MirrorStepOps(self._next_seq, self._invalidate, write)
        self._next_seq += 1
        self._invalidate = []
        if ops.write:
            blocks = self.block_pool.blocks
            self._in_flight[ops.seq] = [blocks[b.block_id] for b in ops.write]
        return ops

    def spill(self, n: int) -> list[int]:
        """Give up the newest ``n`` blocks not yet handed out: unpin them and return
        their ids (the caller queues them to be copied later, when they are still
        cached). Bounds what a slow standby can keep pinned on the primary."""
        ids = list(self._pending)[-n:] if n > 0 else []
        for block_id in ids:
            del self._pending[block_id]
        if ids:
            self.block_pool.free_blocks([self.block_pool.blocks[b] for b in ids])
        return ids

    @property
    def pending_blocks(self) -> int:
        return len(self._pending)

    @property
    def in_flight_blocks(self) -> int:
        return sum(len(b) for b in self._in_flight.values())

    def take_reset(self) -> bool:
        """True once after the primary's prefix cache was reset."""
        reset, self._reset = self._reset, False
        return reset

    def complete(self, seq: int, ok: bool = True) -> list[int]:
        """The copy of step ``seq`` finished (or failed): unpin its blocks; returns
        their ids (a failed step's blocks may be queued again with :meth:`resync`)."""
        blocks = self._in_flight.pop(seq, None)
        if blocks is None:
            return []
        if ok:
            self.num_blocks_mirrored += len(blocks)
        else:
            self.num_blocks_failed += len(blocks)
        self.block_pool.free_blocks(blocks)
        return [b.block_id for b in blocks]

    def fail_all(self) -> None:
        """The standby is gone: release every pin; nothing in flight will land."""
        for seq in list(self._in_flight):
            self.complete(seq, ok=False)

    def detach(self) -> None:
        """Stop observing the pool, releasing every pin (standby gone or replaced)."""
        self.fail_all()
        if self._pending:
            self.block_pool.free_blocks([self.block_pool.blocks[b] for b in self._pending])
            self._pending.clear()
        self._invalidate.clear()
        self.block_pool.mirror = None

    def resync(self, block_ids: list[int]) -> int:
        """Queue already cached blocks for copying (a new or restarted standby
        catches up from the primary's prefix cache); returns how many were queued."""
        queued = 0
        for block_id in block_ids:
            block = self.block_pool.blocks[block_id]
            if block.block_hash is not None and block_id not in self._pending:
                self.on_block_cached(block, block.block_hash,
                                     block._block_hash_num_tokens)
                queued += 1
        return queued

    @property
    def next_seq(self) -> int:
        return self._next_seq

    @property
    def in_flight_steps(self) -> int:
        return len(self._in_flight)

    @property
    def lag_blocks(self) -> int:
        """Blocks whose copy is not yet on the standby (pending + in flight)."""
        return len(self._pending) + sum(len(b) for b in self._in_flight.values())
