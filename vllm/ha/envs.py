# SPDX-License-Identifier: Apache-2.0
"""Environment variables of vLLM-HA, read in one place (like ``vllm.envs``).

Settings an operator chooses are flags (``--mirror-*``); these are for benchmarks and
tests, where a flag would be a knob nobody should turn in production.
"""

import os


def failover_discard_kv() -> bool:
    """``VLLM_HA_FAILOVER_DISCARD_KV=1``: at failover the promoted standby drops its
    prefix cache, so resumed requests recompute everything (the baseline of
    ``benchmarks/failover_serve.py``: the same standby without mirrored KV)."""
    return os.environ.get("VLLM_HA_FAILOVER_DISCARD_KV", "0") == "1"


def admin_key() -> str | None:
    """``VLLM_HA_ADMIN_KEY``: the Bearer token ``/checkpoint`` and ``/restore`` require
    (else the server's ``--api-key``). An environment variable rather than a flag so
    the secret does not show in ``ps``."""
    return os.environ.get("VLLM_HA_ADMIN_KEY") or None


def checkpoint_host_reserve() -> int:
    """``VLLM_HA_CHECKPOINT_HOST_RESERVE_GIB`` (default 2): host memory a checkpoint
    leaves to everything else; a checkpoint that could need more is refused (507)."""
    return int(float(os.environ.get("VLLM_HA_CHECKPOINT_HOST_RESERVE_GIB", "2")) * 2**30)


def snapshot_keeps_weights() -> bool:
    """``VLLM_HA_SNAPSHOT_WEIGHTS=1`` (set by ``--snapshot-root``): the CPU build keeps
    its linear weights unpacked so a snapshot can store them (patch 0016)."""
    return os.environ.get("VLLM_HA_SNAPSHOT_WEIGHTS", "0") == "1"


def restored_model() -> tuple[str, str] | None:
    """``VLLM_HA_RESTORED_MODEL`` (set by ``--restore-from``): ``[path, original]``, the
    model path this server reads and the one the snapshot was taken of, which it
    hashes as (the compile cache and startup plan are keyed by it)."""
    import json

    raw = os.environ.get("VLLM_HA_RESTORED_MODEL")
    if not raw:
        return None
    path, original = json.loads(raw)
    return str(path), str(original)


def engine_exit_poll_s() -> float:
    """``VLLM_HA_ENGINE_EXIT_POLL_MS`` (default 1): how often failover looks at the
    primary engine process for the start of its exit (``vllm/v1/engine/exit_watch.py``);
    0 leaves detection to upstream's process sentinel, which fires only once the kernel
    has torn the process down (~0.1 s for an engine's memory)."""
    raw = os.environ.get("VLLM_HA_ENGINE_EXIT_POLL_MS", "1")
    try:
        return max(0.0, float(raw)) / 1e3
    except ValueError:
        raise ValueError(f"VLLM_HA_ENGINE_EXIT_POLL_MS={raw!r}: expected milliseconds "
                         "(0 turns the exit watch off)") from None


def resume_key() -> str | None:
    """``VLLM_HA_RESUME_KEY`` (set by ``--mirror-peer`` for the API server and the
    engines it starts): what proves that a request's resumed output was sent by
    failover, not by a client (``extra_args`` reach the engine from any request)."""
    return os.environ.get("VLLM_HA_RESUME_KEY") or None


def sleep_graph_pool() -> bool:
    """``VLLM_HA_SLEEP_GRAPH_POOL=0``: CUDA graphs keep upstream's graph pool instead
    of a pool of the sleep-mode allocator (``vllm/v1/checkpoint/graph_pool.py``), so
    a sleep or a ``/checkpoint`` leaves their memory on the GPU (the benchmarks'
    baseline; a way back if a graph misbehaves after a wake)."""
    return os.environ.get("VLLM_HA_SLEEP_GRAPH_POOL", "1") != "0"


def checkpoint_chunk_bytes() -> int | None:
    """``VLLM_HA_CHECKPOINT_CHUNK_MIB``: the size of the chunks a ``/checkpoint`` image
    is compressed and restored in (default 128 MiB: nvCOMP is as fast on it as on
    more; a restore pays a fixed cost per chunk, so benchmarks try larger ones).
    Snapshots keep their own chunk size."""
    mib = _positive_int("VLLM_HA_CHECKPOINT_CHUNK_MIB", "number of MiB")
    return None if mib is None else mib << 20


def checkpoint_upload_ahead() -> int | None:
    """``VLLM_HA_CHECKPOINT_UPLOAD_AHEAD``: how many chunks a ``/restore`` uploads
    ahead of the one it decodes (default 3; 1 is the previous pipeline, for
    benchmarks). Each holds up to a chunk of device memory while it waits."""
    return _positive_int("VLLM_HA_CHECKPOINT_UPLOAD_AHEAD", "integer")


def _positive_int(name: str, what: str) -> int | None:
    """``name`` as a positive integer, None when unset; anything else is an error
    naming the variable."""
    raw = os.environ.get(name)
    if not raw:
        return None
    try:
        n = int(raw)
    except ValueError:
        n = 0
    if n <= 0:
        raise ValueError(f"{name}={raw!r}: expected a positive {what}")
    return n
