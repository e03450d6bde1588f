# SPDX-License-Identifier: Apache-2.0
"""CUDA graphs capture into the sleep-mode allocator's pool, so a sleep releases them.

What a sleeping engine still holds on the GPU (context, CUDA-graph pools, workspaces)
is what the driver checkpoint copies to host memory at ``/checkpoint`` and back at
``/restore``: the residual that bounds both (1.9 GiB, 1.07 s to restore for the ~8B
shape on the H100, benchmarks/RESULTS.md). Of that residual the graph pool is the part
that grows with the model and the number of captured sizes.

The assumption this rests on: a graph pool's bytes need not survive a sleep. A capture
records kernels and runs none, and vLLM warms every shape up eagerly before capturing
it, so buffers a kernel sets up once (and later replays read) are made outside the
pool; every byte in it is written by the replay that reads it. Checked end to end on
the H100 with the default attention backend (FlashAttention) of the Llama shapes:
greedy output identical after a checkpoint cycle. The pool is therefore a
``torch.cuda.MemPool`` of the sleep-mode allocator (``CuMemAllocator``) under its own
tag, discarded like the KV cache when the engine sleeps, and mapped again, at the same
virtual addresses, when it wakes: the captured graphs stay valid and nothing is
re-captured. Upstream's ``/sleep`` gains the same release. Should a backend keep
capture-time state in the pool, ``VLLM_HA_SLEEP_GRAPH_POOL=0`` keeps upstream's pool.

Only for one worker (TP = PP = 1): custom all-reduce registers the graphs' buffers for
CUDA IPC, which the allocator's ``cuMemCreate`` memory does not support, and NCCL's
own graph registration is untested with it. Not with expandable segments either
(upstream's sleep-mode pools turn them off around their allocations; a capture cannot).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

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
    if not vllm_config.model_config.enable_sleep_mode:
        return "no sleep mode (--enable-sleep-mode)"
    if vllm_config.compilation_config.cudagraph_mode == CUDAGraphMode.NONE:
        return "no CUDA graphs"
    if vllm_config.parallel_config.world_size > 1:
        return "more than one worker (custom all-reduce and NCCL register graph buffers)"
    if "expandable_segments:True" in os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""):
        return "expandable segments (PYTORCH_CUDA_ALLOC_CONF)"
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


def tags_to_wake(tags: list[str] | None,
                 allocations: Mapping[int, Any]) -> list[str] | None:
    """The tags a wake-up maps: the first wake-up after a sleep, whatever its tags,
    maps the graph pool too, so a wake of ``weights`` then ``kv_cache`` (upstream's
    RLHF flow) never leaves the graphs without memory, and never maps it twice (the
    allocator maps every allocation of a tag it is given, asleep or not)."""
    if tags is None or GRAPH_TAG in tags:
        return tags
    if any(d.tag == GRAPH_TAG and d.is_asleep for d in allocations.values()):
        return [*tags, GRAPH_TAG]
    return tags
