"""The staged data plane's pieces: the staging ring, layout checks, round trip in-process."""

from __future__ import annotations

import time

import pytest
import torch

from vllm.v1.worker.kv_mirror_staged import (
    StagedMirrorTransport,
    StagedStandbyDescriptor,
    StagedStandbyEndpoint,
    StagingRing,
)
from vllm.v1.worker.kv_mirror_transport import KVRegion, MirrorTransportError


def test_ring_allocates_contiguous_ranges_and_wraps_after_release():
    ring = StagingRing(100)
    assert ring.alloc(0, 40) == 0
    assert ring.alloc(1, 40) == 40
    assert ring.alloc(2, 40) is None  # 20 left at the end, the start is taken
    ring.release(0)
    assert ring.alloc(2, 40) == 0      # wraps into the freed start
    assert ring.alloc(3, 10) is None   # [40, 80) live, [0, 40) live: only 20 at the end,
    ring.release(1)                    # but the newest range ends at 40: no reordering
    assert ring.alloc(3, 50) == 40
    assert ring.used == 90
    ring.release(2)
    ring.release(3)
    assert ring.used == 0 and ring.alloc(4, 100) == 0


def test_ring_refuses_what_can_never_fit():
    ring = StagingRing(64)
    assert ring.alloc(0, 65) is None and ring.alloc(1, 0) is None


def test_ring_smaller_than_one_block_is_refused():
    kv = [torch.zeros(8, 64)]
    with pytest.raises(MirrorTransportError, match="cannot hold one block"):
        StagedMirrorTransport("tiny-ring", kv, 8, stage_bytes=100)


def test_incompatible_ring_or_layout_is_refused():
    kv = [torch.zeros(8, 64), torch.zeros(8, 64)]
    primary = StagedMirrorTransport("p-mismatch", kv, 8, stage_bytes=4096)
    other = StagedStandbyDescriptor("s", b"", "DRAM", 0, 0, 8192,
                                    tuple(KVRegion(0, 8, 256, 0) for _ in kv))
    with pytest.raises(MirrorTransportError, match="incompatible standby"):
        primary.connect(other)
    primary.close()


DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", DEVICES)
def test_round_trip_in_one_process_with_ack_and_ring_reuse(device):
    src = [torch.randn(8, 64, device=device) for _ in range(3)]
    dst = [torch.zeros(8, 64, device=device) for _ in range(3)]
    ring = 2 * 3 * 64 * 4  # two blocks of all layers
    standby = StagedStandbyEndpoint(f"s-rt-{device}", dst, 8, ring)
    primary = StagedMirrorTransport(f"p-rt-{device}", src, 8, ring)
    if device == "cuda":
        torch.cuda.synchronize()  # the pusher's ready event, in a server
    primary.connect(standby.descriptor())
    standby.connect_primary(primary.local_metadata())
    for seq, ids in enumerate([[1, 6], [3], [7, 2]]):
        handle = primary.write(ids, seq)
        deadline = time.monotonic() + 10
        landed = []
        # No NIXL progress threads: each side progresses when it polls, as the
        # primary's steps and the standby's loop do in a server.
        done = False
        while not (done and landed):
            done = done or primary.poll(handle) is not None
            landed = landed or standby.poll_landed()
            assert time.monotonic() < deadline
        assert landed == [(seq, landed[0][1], len(ids))]
        standby.scatter(seq, landed[0][1], ids)
        acked = []
        while not acked:
            acked = primary.poll_acks()
            assert time.monotonic() < deadline
        assert acked == [seq] and primary.ring.used == 0
        for s, d in zip(src, dst):
            assert torch.equal(d[ids], s[ids])
    assert not dst[0][[0, 4, 5]].any()
    primary.close()
    standby.close()


def test_a_full_ring_holds_steps_back_in_order_instead_of_failing():
    from vllm.v1.core.kv_mirror import MirroredBlock, MirrorStepOps
    from vllm.v1.worker.kv_mirror_worker import MirrorPusher

    src = [torch.randn(8, 64) for _ in range(2)]
    dst = [torch.zeros(8, 64) for _ in range(2)]
    ring = 2 * 2 * 64 * 4  # two blocks
    standby = StagedStandbyEndpoint("s-bp", dst, 8, ring)
    primary = StagedMirrorTransport("p-bp", src, 8, ring)
    primary.connect(standby.descriptor())
    standby.connect_primary(primary.local_metadata())
    pusher = MirrorPusher(primary)
    steps = {0: [1, 2], 1: [3], 2: [4, 5]}  # three steps, six blocks, a two-block ring
    for seq, ids in steps.items():
        pusher.push(MirrorStepOps(seq, [], [MirroredBlock(i, b"h", BLOCK_TOKENS)
                                            for i in ids]))
    assert pusher.in_flight_steps == 3
    done: list[int] = []
    deadline = time.monotonic() + 10
    while len(done) < 3:
        assert time.monotonic() < deadline
        out = pusher.poll()
        assert out.failed == []
        done += out.done
        for seq, off, k in standby.poll_landed():
            standby.scatter(seq, off, steps[seq])
    assert done == [0, 1, 2]
    for s, d in zip(src, dst):
        assert torch.equal(d[1:6], s[1:6])
    with pytest.raises(MirrorTransportError, match="exceeds the staging ring"):
        primary.write([1, 2, 3], 9)
    primary.close()
    standby.close()


BLOCK_TOKENS = 16
