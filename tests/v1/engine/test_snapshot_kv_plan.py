"""Which KV blocks a snapshot writes and which it links from the previous generation
(:class:`vllm.v1.engine.snapshot.KVPlan`): the planning alone, on block lists as the
engine produces them; the bytes are covered end to end in
tests/entrypoints/serve/test_snapshot_restore.py."""

from __future__ import annotations

import pytest
from vllm.utils.hashing import sha256
from vllm.v1.core.kv_cache_utils import init_none_hash

from vllm.v1.engine.snapshot import KVPlan, none_hash


@pytest.fixture(autouse=True, scope="module")
def chain_seed():
    init_none_hash(sha256)  # what an engine does at startup


def entries(*hashes: str) -> list[dict]:
    return [{"hashes": [h], "num_tokens": 16} for h in hashes]


def blocks_file(plan: KVPlan) -> dict:
    return {"none_hash": none_hash(), "segments": plan.segments, "blocks": plan.blocks}


def test_first_snapshot_writes_every_block_in_order():
    plan = KVPlan.make("g1", [5, 3, 9], entries("a", "b", "c"), None)
    assert plan.write_ids == [5, 3, 9] and plan.keep == []
    assert plan.segments == {"g1": 3}
    assert [(b["seg"], b["row"]) for b in plan.blocks] == [("g1", 0), ("g1", 1), ("g1", 2)]


def test_unchanged_blocks_are_linked_and_new_ones_written():
    g1 = KVPlan.make("g1", [5, 3, 9], entries("a", "b", "c"), None)
    # Block ids move (evicted and recomputed elsewhere): the hash is what counts.
    g2 = KVPlan.make("g2", [7, 5, 3, 2], entries("d", "a", "b", "c"), blocks_file(g1))
    assert g2.write_ids == [7] and g2.keep == ["g1"]
    assert g2.segments == {"g1": 3, "g2": 1}
    assert [(b["seg"], b["row"]) for b in g2.blocks] == [
        ("g2", 0), ("g1", 0), ("g1", 1), ("g1", 2)]
    # Nothing new: nothing written, the segment list carries over.
    g3 = KVPlan.make("g3", [7, 5, 3, 2], entries("d", "a", "b", "c"), blocks_file(g2))
    assert g3.write_ids == [] and g3.keep == ["g1", "g2"] and "g3" not in g3.segments


def test_a_mostly_evicted_segment_is_compacted():
    g1 = KVPlan.make("g1", [1, 2, 3, 4], entries("a", "b", "c", "d"), None)
    # One of four blocks left: rewritten into the new segment, g1 dropped.
    g2 = KVPlan.make("g2", [2, 8], entries("b", "e"), blocks_file(g1))
    assert g2.keep == [] and g2.write_ids == [2, 8] and g2.segments == {"g2": 2}
    # Half left: kept.
    g2 = KVPlan.make("g2", [2, 3, 8], entries("b", "c", "e"), blocks_file(g1))
    assert g2.keep == ["g1"] and g2.write_ids == [8]


def test_another_chain_seed_links_nothing():
    g1 = KVPlan.make("g1", [1, 2], entries("a", "b"), None)
    other = blocks_file(g1) | {"none_hash": "00" * 32}
    g2 = KVPlan.make("g2", [1, 2], entries("a", "b"), other)
    assert g2.keep == [] and g2.write_ids == [1, 2]


def test_a_block_found_under_an_extra_hash_is_linked():
    g1 = KVPlan.make("g1", [1], [{"hashes": ["a", "x"], "num_tokens": 16}], None)
    g2 = KVPlan.make("g2", [4], entries("x"), blocks_file(g1))
    assert g2.write_ids == [] and [(b["seg"], b["row"]) for b in g2.blocks] == [("g1", 0)]
