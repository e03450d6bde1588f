# SPDX-License-Identifier: Apache-2.0
"""Settings of KV mirroring to a hot standby (``--mirror-*``).

Patch 0003 adds the flags to ``EngineArgs`` (:func:`add_cli_args`) and the resulting
``MirrorConfig`` to ``VllmConfig.mirror_config`` (:func:`from_engine_args`); validation
lives here so every entry point refuses the same bad input with the same message,
naming the flag.
"""


import argparse
import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import model_validator
from vllm.config.utils import config

_CUDA_RE = re.compile(r"^cuda:(\d+)$")


@dataclass(frozen=True)
class MirrorPeer:
    """Where the standby engine runs: ``cpu`` or ``cuda:N``."""

    kind: Literal["cpu", "cuda"]
    index: int | None = None

    @classmethod
    def parse(cls, value: str) -> "MirrorPeer":
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

    peer: str = "cpu"
    """Where the standby engine runs: ``cpu`` or ``cuda:N``. Every KV block the
    primary fills is copied there and registered in the standby's prefix cache."""

    transport: Literal["staged", "direct"] = "staged"
    """How blocks travel: ``staged`` gathers a step's blocks into one NIXL
    descriptor (fast on GPUs), ``direct`` sends one descriptor per layer and block."""

    staging_mib: int = 256
    """Size of the staging ring of the ``staged`` transport, on each side, in MiB.
    It bounds the bytes in flight to the standby: a step carries at most half of
    it (the rest of its blocks follow in the next steps) and a ring still in use
    holds later steps back; the primary never waits."""

    allow_same_device: bool = False
    """Allow the standby on the primary's own device (testing with one GPU)."""

    required: bool = False
    """Refuse to serve unprotected: while no standby is connected (starting, down,
    restarting) new generation requests get HTTP 503 and ``/health`` answers 503,
    so a load balancer sends traffic to a protected replica. Without it the
    primary serves regardless and ``/health`` only reports the mirror's state."""

    step_timeout: float = 30.0
    """Seconds the primary engine may go without answering the API server (a hung
    step, a stuck GPU) before it is killed and its requests fail over to the
    standby; 0 disables it. Acts only while a standby is connected: an
    unprotected primary is never killed."""

    @model_validator(mode="after")
    def _validate(self) -> "MirrorConfig":
        MirrorPeer.parse(self.peer)
        if self.staging_mib < 1:
            raise ValueError(f"--mirror-staging-mib must be >= 1, got {self.staging_mib}")
        if self.step_timeout < 0:
            raise ValueError(f"--mirror-step-timeout must be >= 0 (0: off), got "
                             f"{self.step_timeout}")
        return self

    @property
    def peer_device(self) -> "MirrorPeer":
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


# EngineArgs field -> MirrorConfig field; the flag is ``--`` + the EngineArgs field
# with dashes (upstream naming: one ``--mirror-*`` group, like ``--kv-*``).
_ENGINE_ARGS = {"mirror_peer": "peer", "mirror_transport": "transport",
                "mirror_staging_mib": "staging_mib",
                "mirror_allow_same_device": "allow_same_device",
                "mirror_required": "required", "mirror_step_timeout": "step_timeout"}


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    """The ``MirrorConfig`` argument group of ``vllm serve`` (help from the docstrings)."""
    from vllm.engine.arg_utils import get_kwargs

    kwargs = get_kwargs(MirrorConfig)
    group = parser.add_argument_group(
        title="MirrorConfig",
        description="KV mirroring to a hot standby engine (vLLM-HA, docs/kv-mirroring.md).")
    for arg, field_name in _ENGINE_ARGS.items():
        kw = dict(kwargs[field_name])
        kw.pop("required", None)
        kw["default"] = None if field_name == "peer" else kw.get("default")
        group.add_argument("--" + arg.replace("_", "-"), **kw)


def from_engine_args(args: Any) -> "MirrorConfig | None":
    """``VllmConfig.mirror_config`` from parsed ``EngineArgs`` (None: no mirroring)."""
    if getattr(args, "mirror_peer", None) is None:
        for arg in list(_ENGINE_ARGS)[1:]:
            if getattr(args, arg, None) not in (None, False, MirrorConfig.__dataclass_fields__[
                    _ENGINE_ARGS[arg]].default):
                raise ValueError(f"--{arg.replace('_', '-')} needs --mirror-peer")
        return None
    if getattr(args, "enable_prefix_caching", None) is False:
        raise ValueError("--mirror-peer needs prefix caching: the mirror copies the blocks "
                         "the prefix cache hashes (drop --no-enable-prefix-caching)")
    return MirrorConfig(**{f: getattr(args, a) for a, f in _ENGINE_ARGS.items()
                           if getattr(args, a, None) is not None})
