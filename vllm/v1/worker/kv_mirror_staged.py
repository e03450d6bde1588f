# SPDX-License-Identifier: Apache-2.0
"""Staged mirror data plane: gather a step's blocks into one contiguous range, WRITE it
as a single descriptor, scatter it into the standby's KV cache there.

Why: NIXL/UCX costs about 8.5 us per descriptor on an H100 (cuda_ipc), whatever its
size (``benchmarks/RESULTS.md``), and vLLM keeps each layer in its own tensor, so the
direct transport needs one descriptor per (layer, block): 8 blocks of an 8B model are
256 descriptors, ~2.9 ms, about a whole decode step. A gather is one kernel per layer
at device bandwidth, and the WRITE is one descriptor.

Both sides own a staging ring of the same size; a step takes a contiguous range at the
same offset on both. Inside a range the layout is layer-major (``k`` blocks of layer 0,
then of layer 1, ...), so every gather and scatter is one ``index_select`` /
``index_copy_`` of whole rows. A range is reused only after the standby has scattered it
and said so (a NIXL notification back), so the primary never overwrites bytes the
standby has not consumed; a ring still in use holds later steps back (the pusher retries
them in order).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from vllm.logger import init_logger

from vllm.v1.worker.kv_mirror_transport import (
    DEFAULT_BACKEND,
    DescriptorDict,
    KVRegion,
    MirrorBackpressure,
    MirrorTransportError,
    _agent,
    _mem_type,
    check_layout,
    kv_regions,
    poll_xfer,
    start_xfer,
    unique_tensors,
)

logger = init_logger(__name__)

_LANDED = b"mirror-staged:"
_ACK = b"mirror-scattered:"


class StagingRing:
    """FIFO allocator of contiguous byte ranges, released in (about) the order taken."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._live: deque[tuple[int, int, int]] = deque()  # (seq, offset, size)
        self._head = 0

    def alloc(self, seq: int, size: int) -> int | None:
        if size <= 0 or size > self.capacity:
            return None
        if not self._live:
            self._head = 0
            off = 0
        else:
            tail = self._live[0][1]
            if self._head > tail:  # not wrapped: free are [head, cap) and [0, tail)
                if self.capacity - self._head >= size:
                    off = self._head
                elif tail >= size:
                    off = 0
                else:
                    return None
            elif tail - self._head >= size:  # wrapped: free is [head, tail)
                off = self._head
            else:
                return None
        self._head = off + size
        self._live.append((seq, off, size))
        return off

    def release(self, seq: int) -> None:
        for i, (s, _, _) in enumerate(self._live):
            if s == seq:
                del self._live[i]
                return

    @property
    def used(self) -> int:
        return sum(size for _, _, size in self._live)


def _block_views(kv_caches: Sequence[torch.Tensor], regions: list[KVRegion]
                 ) -> list[torch.Tensor]:
    """uint8 [num_blocks, block_bytes] views, one per region."""
    return [t.view(r.num_blocks, r.block_bytes)
            for t, r in zip(unique_tensors(kv_caches), regions)]


@dataclass(frozen=True)
class StagedStandbyDescriptor(DescriptorDict):
    """The standby's NIXL metadata, KV layout and staging ring."""

    agent_name: str
    agent_metadata: bytes
    mem_type: str
    device_id: int
    stage_base: int
    stage_bytes: int
    regions: tuple[KVRegion, ...]


@dataclass
class _StagedWrite:
    """One step's write: its ring range, then the gather's event, then NIXL's handle."""

    seq: int
    off: int
    k: int
    idx: torch.Tensor | None = None  # kept alive until the gather has run
    gathered: torch.cuda.Event | None = None
    handle: Any = None


class _StagedSide:
    def __init__(self, name: str, kv_caches: Sequence[torch.Tensor], num_blocks: int,
                 stage_bytes: int, backend: str) -> None:
        self.name = name
        self.regions = kv_regions(kv_caches, num_blocks)
        self.views = _block_views(kv_caches, self.regions)
        self.row_bytes = sum(r.block_bytes for r in self.regions)
        if stage_bytes < self.row_bytes:
            raise MirrorTransportError(
                f"staging ring of {stage_bytes} bytes cannot hold one block "
                f"({self.row_bytes} bytes over all layers)")
        self.device = kv_caches[0].device
        self.device_id = (self.device.index or 0) if self.device.type == "cuda" else 0
        self.mem_type = _mem_type(kv_caches)
        self.stage = torch.empty(stage_bytes, dtype=torch.uint8, device=self.device)
        self.agent = _agent(name, backend)
        self._reg = self.agent.register_memory(
            [(self.stage.data_ptr(), stage_bytes, self.device_id, "")], self.mem_type)

    def _chunks(self, off: int, k: int) -> list[torch.Tensor]:
        out, pos = [], off
        for r in self.regions:
            out.append(self.stage[pos:pos + k * r.block_bytes].view(k, r.block_bytes))
            pos += k * r.block_bytes
        return out

    def close(self) -> None:
        self.agent.deregister_memory(self._reg)


class StagedStandbyEndpoint(_StagedSide):
    """Standby side: receives ranges, scatters them into its KV cache, acknowledges."""

    def __init__(self, name: str, kv_caches: Sequence[torch.Tensor], num_blocks: int,
                 stage_bytes: int, backend: str = DEFAULT_BACKEND) -> None:
        super().__init__(name, kv_caches, num_blocks, stage_bytes, backend)
        self._primary: str | None = None

    def descriptor(self) -> StagedStandbyDescriptor:
        return StagedStandbyDescriptor(self.name, self.agent.get_agent_metadata(),
                                       self.mem_type, self.device_id,
                                       self.stage.data_ptr(), self.stage.numel(),
                                       tuple(self.regions))

    def connect_primary(self, primary_metadata: bytes) -> None:
        old, self._primary = self._primary, self.agent.add_remote_agent(primary_metadata)
        if old is not None and old != self._primary:  # a resumed or replaced primary
            try:
                self.agent.remove_remote_agent(old)
            except Exception as e:
                logger.debug("mirror: forgetting the previous primary failed: %s", e)

    def poll_landed(self) -> list[tuple[int, int, int]]:
        """(seq, offset, num_blocks) of every range that landed since the last call."""
        out = []
        for msgs in self.agent.get_new_notifs().values():
            for m in msgs:
                if m.startswith(_LANDED):
                    seq, off, k = (int(x) for x in m[len(_LANDED):].split(b":"))
                    out.append((seq, off, k))
        return out

    def scatter(self, seq: int, off: int, block_ids: Sequence[int]) -> None:
        """Copy a landed range into the KV cache at ``block_ids``, then acknowledge."""
        idx = torch.tensor(list(block_ids), device=self.device)
        for view, chunk in zip(self.views, self._chunks(off, len(block_ids))):
            view.index_copy_(0, idx, chunk)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()
        if self._primary is not None:
            self.agent.send_notif(self._primary, _ACK + b"%d" % seq)


class StagedMirrorTransport(_StagedSide):
    """Primary side: gather -> one-descriptor WRITE; a step is done when acknowledged."""

    requires_ack = True

    def __init__(self, name: str, kv_caches: Sequence[torch.Tensor], num_blocks: int,
                 stage_bytes: int, backend: str = DEFAULT_BACKEND) -> None:
        super().__init__(name, kv_caches, num_blocks, stage_bytes, backend)
        self.num_blocks = num_blocks
        self.bytes_per_block = self.row_bytes
        self.ring = StagingRing(stage_bytes)
        self._stream = (torch.cuda.Stream(self.device) if self.device.type == "cuda"
                        else None)
        if self._stream is not None:
            # Block ids reach the gather through pinned memory, one slot per ring row:
            # a row's slot is reused only after its range is acknowledged, so the
            # copy never blocks the caller (a pageable copy would wait for the stream).
            rows = stage_bytes // self.row_bytes
            self._idx_host = torch.empty(rows, dtype=torch.int64).pin_memory()
            self._idx_dev = torch.empty(rows, dtype=torch.int64, device=self.device)
        self._remote: StagedStandbyDescriptor | None = None
        self._remote_name: str | None = None

    def local_metadata(self) -> bytes:
        return self.agent.get_agent_metadata()

    def connect(self, standby: StagedStandbyDescriptor) -> None:
        check_layout(self.regions, standby.regions)
        if standby.stage_bytes != self.ring.capacity:
            raise MirrorTransportError(
                f"incompatible standby staging ring: primary {self.ring.capacity} bytes, "
                f"standby {standby.stage_bytes}; start both with the same ring size")
        self.disconnect()
        self._remote_name = self.agent.add_remote_agent(standby.agent_metadata)
        self._remote = standby

    @property
    def connected(self) -> bool:
        return self._remote is not None

    def write(self, block_ids: Sequence[int], seq: int) -> _StagedWrite:
        """Gather step ``seq``'s blocks into the ring and post their WRITE.

        The blocks' bytes must be complete on the device (the pusher writes a step
        only once its ready event has passed). On CUDA the gather runs on a side
        stream and the WRITE is posted by :meth:`poll` once the gather has finished:
        the caller's thread never waits for the device."""
        if self._remote is None:
            raise MirrorTransportError("no standby connected")
        k = len(block_ids)
        if k * self.row_bytes > self.ring.capacity:
            raise MirrorTransportError(
                f"step of {k} blocks ({k * self.row_bytes} bytes) exceeds the staging "
                f"ring ({self.ring.capacity} bytes): raise --mirror-staging-mib")
        off = self.ring.alloc(seq, k * self.row_bytes)
        if off is None:
            raise MirrorBackpressure(
                f"staging ring in use ({self.ring.used} of {self.ring.capacity} bytes "
                "awaiting the standby)")
        pending = _StagedWrite(seq, off, k)
        if self._stream is not None:
            # No wait on the compute stream: the caller writes only steps whose
            # forward has finished (their ready event), and their blocks stay pinned
            # until acknowledged, so nothing queued since can touch them.
            row = off // self.row_bytes
            host = self._idx_host[row:row + k]
            host.numpy()[:] = block_ids
            with torch.cuda.stream(self._stream):
                pending.idx = self._idx_dev[row:row + k]
                pending.idx.copy_(host, non_blocking=True)
                self._gather(pending)
                pending.gathered = torch.cuda.Event()
                pending.gathered.record(self._stream)
        else:
            pending.idx = torch.tensor(list(block_ids))
            self._gather(pending)
        self._post(pending)
        return pending

    def _gather(self, w: _StagedWrite) -> None:
        for view, chunk in zip(self.views, self._chunks(w.off, w.k)):
            torch.index_select(view, 0, w.idx, out=chunk)

    def _post(self, w: _StagedWrite) -> None:
        if w.gathered is not None and not w.gathered.query():
            return
        size = w.k * self.row_bytes
        local = self.agent.get_xfer_descs([(self.stage.data_ptr() + w.off, size,
                                            self.device_id)], self.mem_type)
        remote = self.agent.get_xfer_descs([(self._remote.stage_base + w.off, size,
                                             self._remote.device_id)], self._remote.mem_type)
        handle = self.agent.initialize_xfer(
            "WRITE", local, remote, self._remote_name,
            notif_msg=_LANDED + b"%d:%d:%d" % (w.seq, w.off, w.k))
        try:
            w.handle, w.idx = start_xfer(self.agent, handle), None
        except MirrorTransportError:
            self.ring.release(w.seq)
            raise

    def poll(self, w: _StagedWrite) -> bool | None:
        """True when the WRITE is done, None while gathering or in flight."""
        if w.handle is None:
            self._post(w)
            if w.handle is None:
                return None
        return poll_xfer(self.agent, w.handle)

    def poll_acks(self) -> list[int]:
        """Steps the standby has scattered; their ring ranges are free again."""
        acked = []
        for msgs in self.agent.get_new_notifs().values():
            for m in msgs:
                if m.startswith(_ACK):
                    seq = int(m[len(_ACK):])
                    self.ring.release(seq)
                    acked.append(seq)
        return acked

    def abandon(self, seq: int) -> None:
        """A step that will never be acknowledged (failed): free its range."""
        self.ring.release(seq)

    def disconnect(self) -> None:
        if self._remote_name is not None:
            self.agent.remove_remote_agent(self._remote_name)
        self._remote = self._remote_name = None

    def close(self) -> None:
        if self._stream is not None:
            # Gathers still queued write into the ring: finish them before its memory
            # is deregistered and can be handed to a new connection.
            self._stream.synchronize()
        self.disconnect()
        super().close()
