"""MirrorTracker and StandbyIngest on real vLLM KVCacheManagers (patched BlockPool)."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
from vllm.sampling_params import SamplingParams
from vllm.utils.hashing import get_hash_fn_by_name
from vllm.v1.core.kv_cache_manager import KVCacheManager
from vllm.v1.core.kv_cache_utils import get_request_block_hasher, init_none_hash
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from vllm.v1.core.kv_mirror import MirroredBlock, MirrorStepOps, MirrorTracker
from vllm.v1.core.kv_mirror_ingest import StandbyIngest

BLOCK = 4
NUM_BLOCKS = 24
HASH_FN = get_hash_fn_by_name("sha256")
# Primary and standby agree on block hashes only with a shared seed (upstream draws
# a random chain seed otherwise); the cross-process tests rely on this too.
os.environ.setdefault("PYTHONHASHSEED", "0")
init_none_hash(HASH_FN)
_ids = itertools.count()


def make_manager(num_blocks: int = NUM_BLOCKS) -> KVCacheManager:
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8,
                             dtype=torch.float32)
    config = KVCacheConfig(num_blocks=num_blocks, kv_cache_tensors=[],
                           kv_cache_groups=[KVCacheGroupSpec(["layer.0"], spec)])
    return KVCacheManager(config, max_model_len=512, scheduler_block_size=BLOCK,
                          hash_block_size=BLOCK, enable_caching=True)


def make_request(tokens: list[int]) -> Request:
    return Request(f"req-{next(_ids)}", list(tokens), SamplingParams(max_tokens=64), None,
                   block_hasher=get_request_block_hasher(BLOCK, HASH_FN))


def prefill(manager: KVCacheManager, req: Request) -> list[int]:
    """Schedule the whole prompt as one step; returns the request's block ids."""
    blocks = manager.allocate_slots(req, req.num_tokens)
    assert blocks is not None
    req.num_computed_tokens = req.num_tokens
    return list(manager.get_block_ids(req.request_id)[0])


def prefilled_ops(manager: KVCacheManager, tracker: MirrorTracker,
                  tokens: list[int]) -> tuple[Request, MirrorStepOps]:
    """A request prefilled in one step, and that step's mirror ops."""
    req = make_request(tokens)
    prefill(manager, req)
    return req, tracker.take_step_ops()


def decode(manager: KVCacheManager, req: Request, token: int) -> None:
    """One decode step: the token computed last step joins the sequence."""
    req.append_output_token_ids(token)
    assert manager.allocate_slots(req, 1) is not None
    req.num_computed_tokens += 1


@pytest.fixture
def primary():
    manager = make_manager()
    return manager, MirrorTracker(manager.block_pool)


@pytest.fixture
def standby_pool():
    """A standby's KVCacheManager (same block count) and its ingest."""
    manager = make_manager()
    return manager, StandbyIngest(manager.block_pool)


def test_tracker_emits_exactly_the_full_blocks_in_order(primary):
    manager, tracker = primary
    req = make_request(list(range(10)))  # 2 full blocks + 2 tokens
    ids = prefill(manager, req)
    ops = tracker.take_step_ops()
    assert [b.block_id for b in ops.write] == ids[:2]
    assert [b.num_tokens for b in ops.write] == [4, 8]
    pool = manager.block_pool
    assert [b.block_hash for b in ops.write] == [pool.blocks[i].block_hash for i in ids[:2]]
    # Decode 2 tokens: the third block fills on the second; nothing before that.
    decode(manager, req, 100)
    assert not tracker.take_step_ops().write
    decode(manager, req, 101)
    assert [b.block_id for b in tracker.take_step_ops().write] == [ids[2]]


def test_a_cache_hit_does_not_mirror_again(primary):
    manager, tracker = primary
    prefill(manager, make_request(list(range(8))))
    assert len(tracker.take_step_ops().write) == 2
    other = make_request(list(range(8)) + [50, 51, 52, 53])
    hit, n, _ = manager.get_computed_blocks(other)
    assert n == 8
    manager.allocate_slots(other, 4, n, hit)
    assert len(tracker.take_step_ops().write) == 1  # only the new block


def test_in_flight_blocks_are_pinned_and_never_reused(primary):
    manager, tracker = primary
    pool = manager.block_pool
    req = make_request(list(range(8)))
    ids = prefill(manager, req)
    ops = tracker.take_step_ops()
    manager.free(req)  # request finished while its copy is in flight
    for i in ids[:2]:
        assert pool.blocks[i].ref_cnt == 1, "the in-flight copy holds one reference"
    # Exhaust the pool: pinned blocks must not be handed out.
    taken = pool.get_new_blocks(pool.get_num_free_blocks())
    assert not {b.block_id for b in taken} & set(ids[:2])
    with pytest.raises(ValueError):
        pool.get_new_blocks(1)
    pool.free_blocks(taken)
    tracker.complete(ops.seq)
    assert all(pool.blocks[i].ref_cnt == 0 for i in ids[:2])
    assert tracker.lag_blocks == 0 and tracker.num_blocks_mirrored == 2


def test_eviction_is_reported_before_the_reused_block_is_written(primary):
    manager, tracker = primary
    pool = manager.block_pool
    first = make_request(list(range(1000, 1000 + 4 * (NUM_BLOCKS - 1))))
    ids = prefill(manager, first)
    old = tracker.take_step_ops()
    tracker.complete(old.seq)
    manager.free(first)
    # A new prompt reuses the LRU blocks: their old hashes must be invalidated in
    # the same step that writes their new content.
    second = make_request(list(range(5000, 5008)))
    new_ids = prefill(manager, second)
    ops = tracker.take_step_ops()
    reused = {b.block_id for b in ops.write}
    assert reused == set(new_ids[:2]) and reused <= set(ids)
    # Invalidated by id: the reused blocks lost their old hashes this step.
    assert reused <= set(ops.invalidate)
    assert all(pool.blocks[i].block_hash != old.write[0].block_hash for i in reused)


def test_failed_copy_unpins_and_is_counted(primary):
    manager, tracker = primary
    req, ops = prefilled_ops(manager, tracker, list(range(12)))
    tracker.fail_all()
    assert tracker.num_blocks_failed == 3 and tracker.lag_blocks == 0
    manager.free(req)
    assert manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1
    assert ops.seq == 0


def test_pending_block_losing_its_hash_is_dropped_and_unpinned(primary):
    manager, tracker = primary
    req = make_request(list(range(8)))
    ids = prefill(manager, req)
    manager.block_pool.evict_blocks({ids[0]})
    ops = tracker.take_step_ops()
    assert [b.block_id for b in ops.write] == [ids[1]]
    assert manager.block_pool.blocks[ids[0]].ref_cnt == 1  # only the request's own


def _assert_standby_invariants(manager: KVCacheManager) -> None:
    pool = manager.block_pool
    free_ids = [b.block_id for b in pool.free_block_queue.get_all_free_blocks()]
    assert sorted(free_ids) == list(range(1, pool.num_gpu_blocks)), "every block free once"
    assert all(pool.blocks[i].ref_cnt == 0 for i in range(1, pool.num_gpu_blocks))
    for key, entry in pool.cached_block_hash_to_block._cache.items():
        blocks = entry.values() if isinstance(entry, dict) else [entry]
        for block in blocks:
            assert block.block_hash == key or key in pool.cached_block_hashes_by_block.get(
                block.block_id, ())


def mirror_step(tracker: MirrorTracker, ingest: StandbyIngest,
                landed: bool = True) -> MirrorStepOps:
    ops = tracker.take_step_ops()
    ingest.apply(ops, copy=lambda ids: landed)
    tracker.complete(ops.seq, ok=landed)
    return ops


def test_standby_holds_every_full_block_and_answers_lookups(primary, standby_pool):
    manager, tracker = primary
    standby, ingest = standby_pool
    prompts = [list(range(0, 17)), list(range(0, 8)) + list(range(300, 311)),
               list(range(700, 709))]
    reqs = []
    for tokens in prompts:
        req = make_request(tokens)
        hit, n, _ = manager.get_computed_blocks(req)
        manager.allocate_slots(req, req.num_tokens - n, n, hit)
        req.num_computed_tokens = req.num_tokens
        reqs.append(req)
        mirror_step(tracker, ingest)
    for step in range(6):
        for req in reqs:
            decode(manager, req, 900 + step)
        mirror_step(tracker, ingest)
    _assert_standby_invariants(standby)
    for req in reqs:
        probe = make_request(req.all_token_ids)
        hit, n, _ = standby.get_computed_blocks(probe)
        full = (req.num_tokens // BLOCK) * BLOCK
        assert n == min(full, probe.num_tokens - 1) // BLOCK * BLOCK
        primary_ids = manager.get_block_ids(req.request_id)[0][: n // BLOCK]
        assert [b.block_id for b in hit.blocks[0]] == list(primary_ids), "same block ids"
    assert tracker.lag_blocks == 0


def test_standby_drops_blocks_whose_copy_did_not_land(primary, standby_pool):
    manager, tracker = primary
    standby, ingest = standby_pool
    req = make_request(list(range(12)))
    prefill(manager, req)
    mirror_step(tracker, ingest, landed=False)
    _assert_standby_invariants(standby)
    assert standby.get_computed_blocks(make_request(list(range(13))))[1] == 0


def test_standby_follows_evictions_and_reuse(primary, standby_pool):
    manager, tracker = primary
    standby, ingest = standby_pool
    for round_ in range(4):  # each round overwrites most of the pool
        req = make_request(list(range(round_ * 10_000, round_ * 10_000 + 4 * 20)))
        prefill(manager, req)
        mirror_step(tracker, ingest)
        manager.free(req)
        _assert_standby_invariants(standby)
    last = make_request(list(range(30_000, 30_000 + 4 * 20 + 1)))
    assert standby.get_computed_blocks(last)[1] == 4 * 20
    stale = make_request(list(range(0, 4 * 20 + 1)))
    assert standby.get_computed_blocks(stale)[1] == manager.get_computed_blocks(stale)[1]


def test_prefix_cache_reset_reaches_the_standby(primary, standby_pool):
    manager, tracker = primary
    standby, ingest = standby_pool
    req = make_request(list(range(9)))
    prefill(manager, req)
    mirror_step(tracker, ingest)
    manager.free(req)
    assert manager.reset_prefix_cache()
    assert tracker.take_reset()
    ingest.reset()
    assert standby.get_computed_blocks(make_request(list(range(9))))[1] == 0


def test_one_tracker_per_pool_and_standby_needs_caching(primary):
    manager, _ = primary
    with pytest.raises(ValueError, match="already has a mirror tracker"):
        MirrorTracker(manager.block_pool)
    spec = FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8,
                             dtype=torch.float32)
    no_cache = KVCacheManager(
        KVCacheConfig(num_blocks=8, kv_cache_tensors=[],
                      kv_cache_groups=[KVCacheGroupSpec(["l"], spec)]),
        max_model_len=64, scheduler_block_size=BLOCK, hash_block_size=BLOCK,
        enable_caching=False)
    with pytest.raises(ValueError, match="prefix caching"):
        StandbyIngest(no_cache.block_pool)


def test_landing_before_the_ops_arrive_still_publishes(primary, standby_pool):
    manager, tracker = primary
    standby, ingest = standby_pool
    req, ops = prefilled_ops(manager, tracker, list(range(13)))
    ingest.on_landed(ops.seq)  # the NIXL notification overtook the ops message
    assert standby.get_computed_blocks(make_request(list(range(13))))[1] == 0
    ingest.receive_ops(ops)
    assert standby.get_computed_blocks(make_request(list(range(13))))[1] == 12
    _assert_standby_invariants(standby)


def test_hashes_are_never_published_before_the_bytes_land(primary, standby_pool):
    manager, tracker = primary
    standby, ingest = standby_pool
    req, ops = prefilled_ops(manager, tracker, list(range(9)))
    ingest.receive_ops(ops)
    probe = make_request(list(range(9)))
    assert standby.get_computed_blocks(probe)[1] == 0
    assert all(standby.block_pool.blocks[b.block_id].ref_cnt == 1 for b in ops.write)
    assert ingest.lag_steps == 1
    ingest.on_landed(ops.seq)
    assert standby.get_computed_blocks(probe)[1] == 8 and ingest.lag_steps == 0


def one_landed_one_pending(primary, standby_pool) -> MirrorStepOps:
    """Two steps announced to the standby; the first (tokens 0..7) landed, the
    second (100..111) did not: returns the second's ops."""
    manager, tracker = primary
    _, ingest = standby_pool
    _, a = prefilled_ops(manager, tracker, list(range(8)))
    _, b = prefilled_ops(manager, tracker, list(range(100, 112)))
    ingest.receive_ops(a)
    ingest.receive_ops(b)
    ingest.on_landed(a.seq)
    return b


def test_drain_drops_unconfirmed_steps_before_promotion(primary, standby_pool):
    standby, ingest = standby_pool
    b = one_landed_one_pending(primary, standby_pool)
    assert ingest.drain() == len(b.write) == 3
    _assert_standby_invariants(standby)
    assert standby.get_computed_blocks(make_request(list(range(9))))[1] == 8
    assert standby.get_computed_blocks(make_request(list(range(100, 113))))[1] == 0


def test_promotion_holds_back_unconfirmed_blocks_until_released(primary, standby_pool):
    """A dead primary's worker may still be writing an unconfirmed step's blocks: at
    promotion they are neither published nor handed out until freed later."""
    standby, ingest = standby_pool
    b = one_landed_one_pending(primary, standby_pool)
    pool = standby.block_pool
    free_before = pool.get_num_free_blocks()
    held = ingest.quarantine()
    assert sorted(blk.block_id for blk in held) == sorted(mb.block_id for mb in b.write)
    assert ingest.lag_steps == 0
    assert all(blk.ref_cnt == 1 and blk.block_hash is None for blk in held)
    assert pool.get_num_free_blocks() == free_before  # not handed out
    assert standby.get_computed_blocks(make_request(list(range(100, 113))))[1] == 0
    assert standby.get_computed_blocks(make_request(list(range(9))))[1] == 8
    pool.free_blocks(held)
    assert pool.get_num_free_blocks() == free_before + len(held)
    _assert_standby_invariants(standby)


def test_block_resent_while_pending_holds_two_reservations(primary, standby_pool):
    manager, tracker = primary
    standby, ingest = standby_pool
    req, ops = prefilled_ops(manager, tracker, list(range(8)))
    again = MirrorStepOps(ops.seq + 100, [], list(ops.write))
    ingest.receive_ops(ops)
    ingest.receive_ops(again)
    assert standby.block_pool.blocks[ops.write[0].block_id].ref_cnt == 2
    ingest.on_landed(ops.seq)
    ingest.on_landed(again.seq)
    _assert_standby_invariants(standby)


def test_a_capped_step_sends_the_oldest_blocks_and_keeps_the_rest_pinned(primary):
    manager, tracker = primary
    req = make_request(list(range(5 * BLOCK)))
    ids = prefill(manager, req)
    first = tracker.take_step_ops(max_blocks=2)
    assert [b.block_id for b in first.write] == ids[:2]  # parents before children
    manager.free(req)
    # Blocks not yet handed out stay pinned like those in flight.
    assert manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1 - 5
    second = tracker.take_step_ops(max_blocks=2)
    third = tracker.take_step_ops(max_blocks=2)
    assert [b.block_id for b in second.write + third.write] == ids[2:]
    assert tracker.take_step_ops(max_blocks=2).write == []
    for ops in (first, second, third):
        tracker.complete(ops.seq)
    assert manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1


def test_a_failed_step_returns_its_blocks_for_another_copy(primary):
    manager, tracker = primary
    req, ops = prefilled_ops(manager, tracker, list(range(3 * BLOCK)))
    ids = tracker.complete(ops.seq, ok=False)
    assert ids == [b.block_id for b in ops.write] and tracker.num_blocks_failed == 3
    assert tracker.resync(ids) == 3  # still cached: queued again
    again = tracker.take_step_ops()
    assert [b.block_id for b in again.write] == ids
    assert [b.block_hash for b in again.write] == [b.block_hash for b in ops.write]
    tracker.complete(again.seq)
    manager.free(req)


def test_an_invalidation_overtaking_an_unpublished_copy_keeps_its_hash_out(primary,
                                                                          standby_pool):
    """direct transport: the primary counts a WRITE done before the standby has read its
    notification, so it may evict and reuse the block while the standby still holds the
    earlier step pending. The old hash must never point at the new bytes."""
    manager, tracker = primary
    standby, ingest = standby_pool
    _, a = prefilled_ops(manager, tracker, list(range(BLOCK)))
    _, b = prefilled_ops(manager, tracker, list(range(500, 500 + BLOCK)))
    target = a.write[0].block_id
    old = MirrorStepOps(100, [], [a.write[0]])
    new = MirrorStepOps(101, [target], [MirroredBlock(target, b.write[0].block_hash,
                                                      b.write[0].num_tokens)])
    ingest.receive_ops(old)
    ingest.receive_ops(new)  # its invalidation arrives while `old` is still pending
    ingest.on_landed(old.seq)
    ingest.on_landed(new.seq)
    pool = standby.block_pool
    assert pool.blocks[target].block_hash == b.write[0].block_hash
    assert standby.get_computed_blocks(make_request(list(range(BLOCK + 1))))[1] == 0
    assert standby.get_computed_blocks(
        make_request(list(range(500, 501 + BLOCK))))[1] == BLOCK
    assert ingest.num_blocks_dropped == 1
    _assert_standby_invariants(standby)
