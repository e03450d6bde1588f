"""Which engines capture their CUDA graphs into the sleep-mode pool, and which tags a
wake-up maps. The capture itself needs CUDA: on the GPU host the /checkpoint e2e test
(tests/entrypoints/serve/test_checkpoint.py, graphs on) checks that a checkpoint
releases the graph pool and that greedy output and frozen streams survive it."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from tests.utils import ON_CUDA
from vllm.config import CUDAGraphMode
from vllm.v1.checkpoint import graph_pool


def config(cumem: bool = True, graphs: bool = True, world_size: int = 1,
           custom_all_reduce: bool = True) -> SimpleNamespace:
    return SimpleNamespace(
        model_config=SimpleNamespace(enable_cumem_allocator=cumem),
        compilation_config=SimpleNamespace(
            cudagraph_mode=CUDAGraphMode.FULL_AND_PIECEWISE if graphs
            else CUDAGraphMode.NONE),
        parallel_config=SimpleNamespace(world_size=world_size,
                                        disable_custom_all_reduce=not custom_all_reduce))


def test_any_wake_up_maps_the_graph_pool():
    assert graph_pool.tags_to_wake(None) is None  # everything
    assert graph_pool.tags_to_wake(["weights"]) == ["weights", graph_pool.GRAPH_TAG]
    assert graph_pool.tags_to_wake(["kv_cache", graph_pool.GRAPH_TAG]) == [
        "kv_cache", graph_pool.GRAPH_TAG]


def test_the_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("VLLM_HA_SLEEP_GRAPH_POOL", "0")
    assert graph_pool.graph_pool_skip_reason(config()) == "VLLM_HA_SLEEP_GRAPH_POOL=0"
    assert not graph_pool.capture_graphs_into_sleep_pool(config())


@pytest.mark.skipif(ON_CUDA, reason="the CPU build's answer")
def test_cpu_keeps_upstream_pool():
    assert graph_pool.graph_pool_skip_reason(config()) == "not a CUDA device"
    assert not graph_pool.capture_graphs_into_sleep_pool(config())


@pytest.mark.skipif(not ON_CUDA, reason="the reasons after the device's need CUDA")
@pytest.mark.parametrize("kw, reason", [
    ({"cumem": False}, "no sleep-mode allocator"),
    ({"graphs": False}, "no CUDA graphs"),
    ({"world_size": 2}, "custom all-reduce"),
])
def test_engines_that_keep_upstream_pool(kw, reason):
    assert reason in graph_pool.graph_pool_skip_reason(config(**kw))


@pytest.mark.skipif(not ON_CUDA, reason="needs CUDA")
def test_tensor_parallel_without_custom_all_reduce_moves():
    assert graph_pool.graph_pool_skip_reason(
        config(world_size=2, custom_all_reduce=False)) is None
