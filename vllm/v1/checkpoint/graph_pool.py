# SPDX-License-Identifier: Apache-2.0
"""CUDA graphs capture into the sleep-mode allocator's pool, so a sleep releases them.

What a sleeping engine still holds on the GPU (context, CUDA-graph pools, workspaces)
is what the driver checkpoint copies to host memory at ``/checkpoint`` and back at
``/restore``: the residual that bounds both (1.9 GiB, 1.07 s to restore for the ~8B
shape on the H100, benchmarks/RESULTS.md). Of that residual the graph pool is the part
that grows with the model and the number of captured sizes.

A graph pool's bytes never need to survive a sleep: a capture records kernels and
runs none, so every byte of the pool is written by the replay that reads it. The pool
is therefore a ``torch.cuda.MemPool`` of the sleep-mode allocator (``CuMemAllocator``)
under its own tag, discarded like the KV cache when the engine sleeps, and mapped
again, at the same virtual addresses, when it wakes: the captured graphs stay valid
and nothing is re-captured. Upstream's ``/sleep`` gains the same release.

Not done with tensor parallelism and custom all-reduce: that registers the graphs'
buffers for CUDA IPC, which the allocator's ``cuMemCreate`` memory does not support.
``VLLM_HA_SLEEP_GRAPH_POOL=0`` keeps upstream's graph pool.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from vllm.logger import init_logger

from vllm.ha import envs as ha_envs

if TYPE_CHECKING:
    from vllm.config import VllmConfig

logger = init_logger(__name__)

# The allocator's tag for the graph pool's allocations (weights and KV have theirs).
GRAPH_TAG = "cuda_graph"


def graph_pool_skip_reason(vllm_config: VllmConfig) -> str | None:
    """Why the graph pool stays upstream's for this engine, or None if it can move."""
    from vllm.platforms import current_platform

    from vllm.config import CUDAGraphMode

    if not ha_envs.sleep_graph_pool():
        return "VLLM_HA_SLEEP_GRAPH_POOL=0"
    if not current_platform.is_cuda():
        return "not a CUDA device"
    if not vllm_config.model_config.enable_cumem_allocator:
        return "no sleep-mode allocator (--enable-sleep-mode)"
    if vllm_config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE:
        return "no CUDA graphs"
    parallel = vllm_config.parallel_config
    if parallel.world_size > 1 and not parallel.disable_custom_all_reduce:
        return "custom all-reduce registers graph buffers for CUDA IPC"
    return None


def capture_graphs_into_sleep_pool(vllm_config: VllmConfig) -> bool:
    """Make the process's global graph pool a pool of the sleep-mode allocator.

    Called once per worker, after its device is set and before its model runner
    exists (both runners read the global pool when they build their graph wrappers).
    """
    from vllm.platforms import current_platform

    reason = graph_pool_skip_reason(vllm_config)
    if reason is not None:
        logger.debug("CUDA graphs keep upstream's pool: %s", reason)
        return False
    platform = type(current_platform)
    if platform._global_graph_pool is not None:
        logger.warning("CUDA graphs keep upstream's pool: the global graph pool was "
                       "created before the worker's hook; a sleep will not release it")
        return False

    import torch
    from vllm.device_allocator.cumem import CuMemAllocator, get_pluggable_allocator

    allocator = CuMemAllocator.get_instance()
    pluggable = get_pluggable_allocator(allocator.python_malloc_callback,
                                        allocator.python_free_callback)
    pool = torch.cuda.MemPool(pluggable._allocator)
    # Kept where the allocator keeps its other pools, so they are released in the
    # order its shutdown needs (pool before allocator).
    allocator.allocator_and_pools[GRAPH_TAG] = (pool, pluggable)
    # The allocator tags an allocation with the tag of the ``use_memory_pool`` block
    # it is made in; the graph pool allocates outside any (only captures use it).
    allocator.current_tag = GRAPH_TAG
    platform._global_graph_pool = pool.id
    logger.info("CUDA graphs capture into the sleep-mode pool (tag %r): a sleep or a "
                "/checkpoint releases their memory, a wake maps it again", GRAPH_TAG)
    return True


def tags_to_wake(tags: list[str] | None) -> list[str] | None:
    """The tags a wake-up maps: any wake-up maps the graph pool too, so a wake of
    ``weights`` then ``kv_cache`` (upstream's RLHF flow) never leaves the graphs
    without memory."""
    if tags is None or GRAPH_TAG in tags:
        return tags
    return [*tags, GRAPH_TAG]
