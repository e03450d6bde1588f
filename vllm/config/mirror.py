# SPDX-License-Identifier: Apache-2.0
"""Settings of KV mirroring to a hot standby (``--mirror-*``).

Not yet reachable from ``vllm serve``: the flags are added with the engine wiring
(docs/kv-mirroring.md). Validation lives here so every entry point refuses the same
bad input with the same message, naming the flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from pydantic import model_validator
from vllm.config.utils import config

_CUDA_RE = re.compile(r"^cuda:(\d+)$")


@dataclass(frozen=True)
class MirrorPeer:
    """Where the standby engine runs: ``cpu`` or ``cuda:N``."""

    kind: Literal["cpu", "cuda"]
    index: int | None = None

    @classmethod
    def parse(cls, value: str) -> MirrorPeer:
        value = value.strip()
        if value == "cpu":
            return cls("cpu")
        m = _CUDA_RE.match(value)
        if m:
            return cls("cuda", int(m.group(1)))
        raise ValueError(
            f"--mirror-peer {value!r} is not a peer: use 'cpu' (standby on the host) or "
            "'cuda:N' (standby on GPU N)")

    def __str__(self) -> str:
        return "cpu" if self.kind == "cpu" else f"cuda:{self.index}"


@config
class MirrorConfig:
    """Configuration for KV mirroring to a hot standby engine."""

    peer: str
    """Where the standby engine runs: ``cpu`` or ``cuda:N``. Every KV block the
    primary fills is copied there and registered in the standby's prefix cache."""

    transport: Literal["staged", "direct"] = "staged"
    """How blocks travel: ``staged`` gathers a step's blocks into one NIXL
    descriptor (fast on GPUs), ``direct`` sends one descriptor per layer and block."""

    tail_sync_interval: int = 0
    """Also mirror each request's partly filled last block every N steps
    (0: only full blocks are mirrored; the tail is recomputed on failover)."""

    required: bool = False
    """Refuse to serve while the standby is not in sync (instead of serving
    unprotected and reporting it)."""

    allow_same_device: bool = False
    """Allow the standby on the primary's own device (testing with one GPU)."""

    @model_validator(mode="after")
    def _validate(self) -> MirrorConfig:
        MirrorPeer.parse(self.peer)
        if self.tail_sync_interval < 0:
            raise ValueError(
                f"--mirror-tail-sync-interval must be >= 0, got {self.tail_sync_interval}")
        return self

    @property
    def peer_device(self) -> MirrorPeer:
        return MirrorPeer.parse(self.peer)

    def check_devices(self, primary_device: str, num_cuda_devices: int) -> None:
        """Startup check against what this host has; ValueError names the flag."""
        peer = self.peer_device
        if peer.kind != "cuda":
            return
        if peer.index >= num_cuda_devices:
            raise ValueError(
                f"--mirror-peer {peer}: no such device (this host has "
                f"{num_cuda_devices} CUDA device(s))")
        if str(peer) == primary_device and not self.allow_same_device:
            raise ValueError(
                f"--mirror-peer {peer} is the primary's own device: a standby there "
                "does not survive a GPU fault; pass --mirror-allow-same-device to do "
                "it anyway (testing)")
