"""Which engines capture their CUDA graphs into the sleep-mode pool, and which tags a
wake-up maps. The capture itself needs CUDA: on the GPU host the /checkpoint e2e test
(tests/entrypoints/serve/test_checkpoint.py, graphs on) checks that a checkpoint
releases the graph pool and that greedy output and frozen streams survive it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from vllm.device_allocator import AllocationData
from vllm.platforms import current_platform

from tests.utils import ON_CUDA
from vllm.config import CUDAGraphMode
from vllm.v1.checkpoint import graph_pool
from vllm.v1.checkpoint.graph_pool import GRAPH_TAG


def config(sleep: bool = True, graphs: bool = True, world_size: int = 1
           ) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(enable_sleep_mode=sleep),
        compilation_config=SimpleNamespace(
            cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE if graphs
            else CUDAGraphMode.NONE),
        parallel_config=SimpleNamespace(world_size=world_size))


def allocations(*tags_asleep: tuple[str, bool]) -> dict[int, AllocationData]:
    out = {}
    for i, (tag, asleep) in enumerate(tags_asleep):
        d = AllocationData((0, 2 << 20, 0x1000 * (i + 1), 0), tag)
        d.is_asleep = asleep
        out[d.handle[2]] = d
    return out


def test_the_first_wake_up_after_a_sleep_maps_the_graph_pool_once():
    asleep = allocations(("weights", True), ("kv_cache", True), (GRAPH_TAG, True))
    assert graph_pool.tags_to_wake(None, asleep) is None  # everything
    assert graph_pool.tags_to_wake(["weights"], asleep) == ["weights", GRAPH_TAG]
    assert graph_pool.tags_to_wake(["kv_cache", GRAPH_TAG], asleep) == [
        "kv_cache", GRAPH_TAG]
    # Woken with the weights: the kv_cache wake that follows must not map it again
    # (the allocator maps every allocation of a tag it is given, asleep or not).
    woken = allocations(("weights", False), ("kv_cache", True), (GRAPH_TAG, False))
    assert graph_pool.tags_to_wake(["kv_cache"], woken) == ["kv_cache"]
    # No graph pool in the allocator (upstream's pool, or no graphs): tags unchanged.
    assert graph_pool.tags_to_wake(["weights"], allocations(("weights", True))) == [
        "weights"]


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("VLLM_HA_SLEEP_GRAPH_POOL", "0")
    assert graph_pool.graph_pool_skip_reason(config()) == "VLLM_HA_SLEEP_GRAPH_POOL=0"
    assert not graph_pool.capture_graphs_into_sleep_pool(config())


@pytest.mark.skipif(ON_CUDA, reason="the CPU build's answer")
def test_cpu_keeps_upstream_pool():
    assert graph_pool.graph_pool_skip_reason(config()) == "not a CUDA device"
    assert not graph_pool.capture_graphs_into_sleep_pool(config())


@pytest.mark.parametrize("kw, env, reason", [
    ({"sleep": False}, "", "no sleep mode"),
    ({"graphs": False}, "", "no CUDA graphs"),
    ({"world_size": 2}, "", "more than one worker"),
    ({}, "expandable_segments:True", "expandable segments"),
    ({}, "", None),
])
def test_which_cuda_engines_move_their_graph_pool(kw, env, reason, monkeypatch):
    # The decision after "is this CUDA" (on the CPU build, asked as if it were).
    monkeypatch.setattr(current_platform, "is_cuda", lambda: True)
    monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", env)
    got = graph_pool.graph_pool_skip_reason(config(**kw))
    assert got == reason if reason is None else reason in got
