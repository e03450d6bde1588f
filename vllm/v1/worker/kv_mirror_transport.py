# SPDX-License-Identifier: Apache-2.0
"""Worker side of KV mirroring: one batched NIXL WRITE (push) per step.

vLLM 0.26 stores every attention layer's KV cache block-major: block ``i`` owns bytes
``[i * page, (i + 1) * page)`` of the layer's tensor (``vllm/v1/worker/utils.py``).
So one block of one layer is one contiguous descriptor, and the primary and the
standby, with the same layout and block count, address a block by the same index.
Descriptor lists for every (layer, block) are prepared once at connect time; a step
only computes indices, which is what keeps the per-step cost flat (upstream's NIXL
connector builds descriptors per request, ~3 ms). Push, never pull: a NIXL READ over
UCX on one host falls back to TCP (DESIGN.md section 2).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from typing import Any

import numpy as np
import torch
from vllm.logger import init_logger

logger = init_logger(__name__)

DEFAULT_BACKEND = "UCX"


def step_notification(seq: int) -> bytes:
    """What the standby receives once step ``seq``'s bytes have landed."""
    return b"mirror:%d" % seq


def parse_step_notification(msg: bytes) -> int | None:
    if msg.startswith(b"mirror:"):
        return int(msg[len(b"mirror:"):])
    return None


class MirrorTransportError(RuntimeError):
    """The standby cannot receive this primary's blocks (layout, backend, link)."""


class MirrorBackpressure(MirrorTransportError):
    """No room for this write now (staging ring in use); it fits once earlier
    writes are acknowledged, so the caller retries it later, in order."""


@dataclass(frozen=True)
class KVRegion:
    """One KV cache tensor as contiguous block-major bytes."""

    base: int
    num_blocks: int
    block_bytes: int
    device_id: int

    def descs(self) -> list[tuple[int, int, int]]:
        return [(self.base + i * self.block_bytes, self.block_bytes, self.device_id)
                for i in range(self.num_blocks)]


def unique_tensors(kv_caches: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    """The distinct KV cache allocations, each as a flat uint8 tensor over its whole
    storage (layers that share an allocation count once).

    vLLM hands out permuted views (the NHD stride order of FlashAttention on CUDA is
    not the logical order), so a layer's tensor is often not contiguous; its storage
    is, and it is block-major: block ``i`` is bytes ``[i * page, (i + 1) * page)``."""
    out: dict[int, torch.Tensor] = {}
    for t in kv_caches:
        storage = t.untyped_storage()
        if storage.data_ptr() not in out:
            flat = torch.empty(0, dtype=torch.uint8, device=t.device)
            flat.set_(storage, 0, (storage.nbytes(),))
            out[storage.data_ptr()] = flat
    return list(out.values())


def kv_regions(kv_caches: Iterable[torch.Tensor], num_blocks: int) -> list[KVRegion]:
    """Regions of a worker's KV cache allocations, one per distinct allocation."""
    regions: list[KVRegion] = []
    for t in unique_tensors(kv_caches):
        nbytes = t.numel()
        if nbytes % num_blocks:
            raise MirrorTransportError(
                f"KV cache allocation of {nbytes} bytes is not {num_blocks} equal blocks")
        regions.append(KVRegion(t.data_ptr(), num_blocks, nbytes // num_blocks,
                                (t.device.index or 0) if t.is_cuda else 0))
    if not regions:
        raise MirrorTransportError("no KV cache tensors to mirror")
    return regions


def check_layout(mine: Sequence[KVRegion], theirs: Sequence[KVRegion]) -> None:
    """Primary and standby must agree on regions, block count and block size."""
    a = [(r.num_blocks, r.block_bytes) for r in mine]
    b = [(r.num_blocks, r.block_bytes) for r in theirs]
    if a != b:
        raise MirrorTransportError(
            "incompatible standby KV cache: primary has "
            f"{len(a)} region(s) of (blocks, bytes/block) {sorted(set(a))}, "
            f"standby has {len(b)} of {sorted(set(b))}; start the standby "
            "with the same model, dtype, block size and --num-gpu-blocks-override")


def _release_quietly(agent: Any, handle: Any) -> None:
    try:
        agent.release_xfer_handle(handle)
    except Exception:  # the peer is gone; nothing left to release on its side
        pass


def start_xfer(agent: Any, handle: Any) -> Any:
    """Post a prepared transfer; on failure release it and raise MirrorTransportError.

    NIXL reports a vanished peer either as an "ERR" state or by raising (e.g.
    ``nixlRemoteDisconnectError`` over UCX cuda_ipc); both mean the same to us."""
    try:
        started = agent.transfer(handle) != "ERR"
    except Exception as e:
        _release_quietly(agent, handle)
        raise MirrorTransportError(f"NIXL WRITE failed to start: {e!r}") from e
    if not started:
        _release_quietly(agent, handle)
        raise MirrorTransportError("NIXL WRITE failed to start")
    return handle


def poll_xfer(agent: Any, handle: Any) -> bool | None:
    """True when done (handle released), None while in progress; raises on failure."""
    try:
        state = agent.check_xfer_state(handle)
    except Exception as e:
        _release_quietly(agent, handle)
        raise MirrorTransportError(f"NIXL WRITE failed: {e!r}") from e
    if state == "DONE":
        agent.release_xfer_handle(handle)
        return True
    if state == "ERR":
        _release_quietly(agent, handle)
        raise MirrorTransportError("NIXL WRITE failed")
    return None


def _mem_type(kv_caches: Sequence[torch.Tensor]) -> str:
    return "VRAM" if kv_caches[0].is_cuda else "DRAM"


def _agent(name: str, backend: str):
    try:
        from nixl._api import nixl_agent, nixl_agent_config
    except ImportError as e:
        raise MirrorTransportError(
            f"KV mirroring needs NIXL ({e}): pip install 'vllm[nixl]'") from None
    try:
        # No progress thread: it busy-polls UCX, a core per agent (the primary's worker
        # and the standby's), which cost the primary up to 4x decode speed on a small
        # host. Transfers progress when we poll them, once per engine step.
        return nixl_agent(name, nixl_agent_config(enable_prog_thread=False,
                                                  backends=[backend]))
    except Exception as e:
        raise MirrorTransportError(f"NIXL backend {backend} does not load: {e}") from None


class DescriptorDict:
    """Plain-dict round trip for standby descriptors (they cross process queues)."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)  # nested KVRegions become dicts too

    @classmethod
    def from_dict(cls, d: dict[str, Any]):
        return cls(**{**d, "regions": tuple(KVRegion(**r) for r in d["regions"])})


@dataclass(frozen=True)
class StandbyDescriptor(DescriptorDict):
    """What the primary needs to push into a standby: its NIXL metadata and layout."""

    agent_name: str
    agent_metadata: bytes
    mem_type: str
    regions: tuple[KVRegion, ...]


class StandbyEndpoint:
    """The standby worker's side: registers its KV cache so a primary can push."""

    def __init__(self, name: str, kv_caches: Sequence[torch.Tensor], num_blocks: int,
                 backend: str = DEFAULT_BACKEND) -> None:
        self.regions = kv_regions(kv_caches, num_blocks)
        self.mem_type = _mem_type(kv_caches)
        self.agent = _agent(name, backend)
        self.name = name
        self._reg = self.agent.register_memory(
            [(r.base, r.num_blocks * r.block_bytes, r.device_id, "") for r in self.regions],
            self.mem_type)

    def descriptor(self) -> StandbyDescriptor:
        return StandbyDescriptor(self.name, self.agent.get_agent_metadata(),
                                 self.mem_type, tuple(self.regions))

    def poll_notifications(self) -> list[bytes]:
        """Notifications from primaries (one per completed step write)."""
        return [m for msgs in self.agent.get_new_notifs().values() for m in msgs]

    def close(self) -> None:
        self.agent.deregister_memory(self._reg)


class MirrorTransport:
    """The primary worker's side: pushes block ids of every layer in one WRITE."""

    requires_ack = False  # the WRITE's completion means the bytes are in place

    def __init__(self, name: str, kv_caches: Sequence[torch.Tensor], num_blocks: int,
                 backend: str = DEFAULT_BACKEND) -> None:
        self.regions = kv_regions(kv_caches, num_blocks)
        self.num_blocks = num_blocks
        self.mem_type = _mem_type(kv_caches)
        self.agent = _agent(name, backend)
        self._reg = self.agent.register_memory(
            [(r.base, r.num_blocks * r.block_bytes, r.device_id, "") for r in self.regions],
            self.mem_type)
        self._local = self.agent.prep_xfer_dlist(
            "NIXL_INIT_AGENT", [d for r in self.regions for d in r.descs()], self.mem_type)
        self._remote = None
        self._remote_name: str | None = None
        self.bytes_per_block = sum(r.block_bytes for r in self.regions)

    def connect(self, standby: StandbyDescriptor) -> None:
        """Check the standby's layout matches ours, then prepare its descriptors."""
        check_layout(self.regions, standby.regions)
        self.disconnect()
        self._remote_name = self.agent.add_remote_agent(standby.agent_metadata)
        self._remote = self.agent.prep_xfer_dlist(
            self._remote_name, [d for r in standby.regions for d in r.descs()],
            standby.mem_type)

    @property
    def connected(self) -> bool:
        return self._remote is not None

    @cached_property
    def _region_base(self) -> np.ndarray:
        return np.arange(len(self.regions), dtype=np.int32) * self.num_blocks

    def indices(self, block_ids: Sequence[int]) -> np.ndarray:
        """Descriptor indices of ``block_ids`` in every region, region-major. int32:
        NIXL takes the array as is, where a list is converted element by element under
        the GIL that the engine's own thread needs."""
        return (self._region_base[:, None] + np.asarray(block_ids, dtype=np.int32)).ravel()

    def write(self, block_ids: Sequence[int], seq: int) -> Any:
        """Start step ``seq``'s WRITE of ``block_ids`` (all layers); a handle to poll."""
        if self._remote is None:
            raise MirrorTransportError("no standby connected")
        idx = self.indices(block_ids)
        return start_xfer(self.agent, self.agent.make_prepped_xfer(
            "WRITE", self._local, idx, self._remote, idx, notif_msg=step_notification(seq)))

    def poll(self, handle: Any) -> bool | None:
        """True when done, None while in progress; raises if the transfer failed."""
        return poll_xfer(self.agent, handle)

    def poll_acks(self) -> list[int]:
        return []  # requires_ack is False: a done WRITE is a landed step

    def abandon(self, seq: int) -> None:
        pass

    def disconnect(self) -> None:
        if self._remote is not None:
            self.agent.release_dlist_handle(self._remote)
            self.agent.remove_remote_agent(self._remote_name)
            self._remote = self._remote_name = None

    def close(self) -> None:
        self.disconnect()
        self.agent.release_dlist_handle(self._local)
        self.agent.deregister_memory(self._reg)
