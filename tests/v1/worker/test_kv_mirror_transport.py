"""MirrorTransport: one batched NIXL WRITE (UCX over shared memory/loopback) of the
chosen blocks of every layer into a standby process, byte for byte."""

from __future__ import annotations

import os
import time

import pytest
import torch

from tests.v1.worker.peer import spawned_peer
from tests.v1.worker.standby_peer import standby_main
from vllm.v1.worker.kv_mirror_transport import (
    KVRegion,
    MirrorTransport,
    MirrorTransportError,
    StandbyDescriptor,
    kv_regions,
    poll_xfer,
    start_xfer,
)

LAYERS, NUM_BLOCKS, BLOCK_ELEMS = 3, 16, 256  # 1 KiB per block per layer

os.environ.setdefault("UCX_NET_DEVICES", "lo")


@pytest.fixture
def standby():
    with spawned_peer(standby_main, LAYERS, NUM_BLOCKS, BLOCK_ELEMS,
                      stop_message="stop") as (first, to_primary, from_primary):
        yield StandbyDescriptor.from_dict(first), to_primary, from_primary


def primary_kv() -> list[torch.Tensor]:
    kv = []
    for layer in range(LAYERS):
        t = torch.empty(NUM_BLOCKS, BLOCK_ELEMS, dtype=torch.float32)
        for b in range(NUM_BLOCKS):
            t[b] = layer * 1000 + b + torch.arange(BLOCK_ELEMS) / BLOCK_ELEMS
        kv.append(t)
    return kv


def wait_done(transport: MirrorTransport, handle, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while transport.poll(handle) is None:
        assert time.monotonic() < deadline, "WRITE did not complete"
        time.sleep(0.0005)


def report(to_primary, from_primary, notifs: int = 1) -> dict:
    deadline = time.monotonic() + 30
    while True:
        from_primary.put("report")
        got = to_primary.get(timeout=30)
        if len(got["notifs"]) >= notifs or time.monotonic() > deadline:
            return got
        time.sleep(0.05)


def test_write_lands_the_chosen_blocks_of_every_layer(standby):
    desc, to_primary, from_primary = standby
    kv = primary_kv()
    transport = MirrorTransport("primary", kv, NUM_BLOCKS)
    transport.connect(desc)
    blocks = [1, 3, 4, 9, 15]
    wait_done(transport, transport.write(blocks, 0))
    got = report(to_primary, from_primary)
    assert got["notifs"] == [b"mirror:0"]
    for layer, (mine, theirs) in enumerate(zip(kv, got["kv"])):
        for b in range(NUM_BLOCKS):
            if b in blocks:
                assert torch.equal(theirs[b], mine[b]), (layer, b)
            else:
                assert not theirs[b].any(), f"block {b} of layer {layer} was written"
    transport.close()


def test_consecutive_steps_overwrite_reused_blocks(standby):
    desc, to_primary, from_primary = standby
    kv = primary_kv()
    transport = MirrorTransport("primary", kv, NUM_BLOCKS)
    transport.connect(desc)
    wait_done(transport, transport.write([2, 5], 0))
    for t in kv:
        t[5] = -7.0  # block 5 reused for new content
    wait_done(transport, transport.write([5], 1))
    got = report(to_primary, from_primary, notifs=2)
    assert sorted(got["notifs"]) == [b"mirror:0", b"mirror:1"]
    for mine, theirs in zip(kv, got["kv"]):
        assert torch.equal(theirs[5], mine[5]) and torch.equal(theirs[2], mine[2])
    transport.close()


def test_indices_address_every_layer_of_a_block():
    regions = [KVRegion(0, 10, 64, 0), KVRegion(10_000, 10, 64, 0)]
    transport = MirrorTransport.__new__(MirrorTransport)
    transport.regions, transport.num_blocks = regions, 10
    assert transport.indices([0, 7]).tolist() == [0, 7, 10, 17]


def test_layout_mismatch_is_refused_before_any_transfer():
    kv = primary_kv()
    transport = MirrorTransport("primary-mismatch", kv, NUM_BLOCKS)
    other = StandbyDescriptor("x", b"", "DRAM",
                              tuple(KVRegion(0, NUM_BLOCKS * 2, 1024, 0) for _ in kv))
    with pytest.raises(MirrorTransportError, match="incompatible standby KV cache"):
        transport.connect(other)
    assert not transport.connected
    with pytest.raises(MirrorTransportError, match="no standby connected"):
        transport.write([1], 0)
    transport.close()


def test_regions_dedupe_shared_tensors_and_need_equal_blocks():
    t = torch.zeros(8, 16)
    assert len(kv_regions([t, t], 8)) == 1
    assert kv_regions([t], 8)[0].block_bytes == 16 * 4
    with pytest.raises(MirrorTransportError, match="not 3 equal blocks"):
        kv_regions([t], 3)


def test_permuted_kv_views_map_to_their_block_major_storage():
    # vLLM's CUDA KV caches are permuted views (NHD stride order): logical
    # (blocks, heads, block_size, 2*head) over a physical (blocks, block_size, heads, 2*head).
    blocks, bs, heads, dim = 6, 4, 2, 8
    physical = torch.arange(blocks * bs * heads * dim, dtype=torch.float32).view(
        blocks, bs, heads, dim)
    logical = physical.permute(0, 2, 1, 3)
    assert not logical.is_contiguous()
    (region,) = kv_regions([logical, physical[1:]], blocks)  # one allocation, once
    assert (region.base, region.block_bytes) == (physical.data_ptr(), bs * heads * dim * 4)
    import hashlib

    from vllm.v1.worker.kv_mirror_worker import block_checksums
    assert block_checksums([logical], blocks, [3]) == [
        hashlib.sha256(physical[3].numpy().tobytes()).hexdigest()]


class _DisconnectedAgent:
    """NIXL over UCX cuda_ipc raises (nixlRemoteDisconnectError) once the standby process
    is gone, where the CPU backends answer "ERR"; seen on the H100 when a test killed
    the standby mid-stream."""

    def __init__(self) -> None:
        self.released: list[object] = []

    def transfer(self, handle):
        raise RuntimeError("NIXL_ERR_REMOTE_DISCONNECT")

    def check_xfer_state(self, handle):
        raise RuntimeError("NIXL_ERR_REMOTE_DISCONNECT")

    def release_xfer_handle(self, handle):
        self.released.append(handle)


def test_a_raising_nixl_agent_is_a_transport_error_and_releases_the_handle():
    agent = _DisconnectedAgent()
    with pytest.raises(MirrorTransportError, match="REMOTE_DISCONNECT"):
        start_xfer(agent, "h1")
    with pytest.raises(MirrorTransportError, match="REMOTE_DISCONNECT"):
        poll_xfer(agent, "h2")
    assert agent.released == ["h1", "h2"]
