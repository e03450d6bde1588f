# SPDX-License-Identifier: Apache-2.0
"""EngineCore utility methods of KV mirroring (patch 0006 makes them EngineCore's).

The API server's :class:`~vllm.v1.engine.mirror_supervisor.MirrorSupervisor` calls
them through ``call_utility_async``; they run on the engine's busy-loop thread between
steps, the only thread that may touch the scheduler's BlockPool.
"""

from __future__ import annotations

import os
from typing import Any

from vllm.logger import init_logger

from vllm.v1.engine.mirror_standby import EngineCoreStandbyMixin
from vllm.v1.worker.kv_mirror_worker import (
    rpc_block_checksums,
    rpc_primary_connect,
    rpc_primary_disconnect,
)

logger = init_logger(__name__)


def prefix_hits(engine: Any, prompts: list[list[int]]) -> list[int]:
    """Tokens of each token sequence the engine's prefix cache would serve (read-only:
    nothing is touched or allocated)."""
    from vllm.sampling_params import SamplingParams
    from vllm.v1.request import Request

    manager = engine.scheduler.kv_cache_manager
    hits = []
    for i, tokens in enumerate(prompts):
        req = Request(f"mirror-lookup-{i}", list(tokens), SamplingParams(max_tokens=1), None,
                      block_hasher=engine.request_block_hasher)
        hits.append(manager.get_computed_blocks(req)[1])
    return hits


class EngineCoreMirrorMixin(EngineCoreStandbyMixin):
    """``mirror_*`` utilities of the primary engine (and, inherited, the standby's)."""

    def _scheduler_mirror(self):
        mirror = getattr(self.scheduler, "mirror", None)  # type: ignore[attr-defined]
        if mirror is None:
            raise RuntimeError("this engine was not started with --mirror-peer")
        return mirror

    def mirror_prepare(self, standby_workers: list[dict[str, Any]], transport: str
                       ) -> list[bytes]:
        """Phase 1: every worker connects to its standby worker (layouts checked);
        returns their NIXL metadata for the standby's acknowledgements."""
        self.mirror_stop()
        return self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_primary_connect, args=(standby_workers, transport))

    def mirror_start(self, ops_address: str, bytes_per_block: int) -> int:
        """Phase 2: the scheduler starts producing ops (and queues its prefix cache
        for catch-up); returns the number of cached blocks queued."""
        return self._scheduler_mirror().connect(ops_address, bytes_per_block)

    def mirror_stop(self) -> None:
        """The standby is gone: unpin everything, close the workers' transports."""
        self._scheduler_mirror().disconnect()
        self.model_executor.collective_rpc(rpc_primary_disconnect)  # type: ignore

    def mirror_status(self) -> dict[str, Any]:
        status = self._scheduler_mirror().status()
        status["pid"] = os.getpid()
        return status

    def mirror_lookup(self, prompts: list[list[int]]) -> list[int]:
        self._scheduler_mirror()
        return prefix_hits(self, prompts)

    def mirror_checksums(self) -> list[tuple[int, str, str]]:
        """(block id, hash hex, sha256 of its bytes) of every cached block; debug."""
        cached = self._scheduler_mirror().cached_blocks()
        sums = self.model_executor.collective_rpc(  # type: ignore[attr-defined]
            rpc_block_checksums, args=([b for b, _ in cached],))[0]
        return [(b, h.hex(), s) for (b, h), s in zip(cached, sums)]
