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
