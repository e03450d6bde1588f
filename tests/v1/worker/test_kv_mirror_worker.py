"""Tracker -> pusher -> NIXL -> standby ingest, with a standby in another process: after
prefill and decode steps, every full block is on the standby, byte-identical, at the
primary's block ids, and the standby's prefix cache answers for it."""

from __future__ import annotations

import hashlib
import os
import time

import pytest
import torch
from vllm.v1.outputs import EMPTY_MODEL_RUNNER_OUTPUT, AsyncModelRunnerOutput, ModelRunnerOutput

from tests.v1.core.test_kv_mirror import BLOCK, decode, make_manager, make_request, prefill
from tests.v1.worker.mirror_standby import standby_engine_main
from tests.v1.worker.peer import spawned_peer
from vllm.v1.core.kv_mirror import MirrorStepOps, MirrorTracker
from vllm.v1.worker.kv_mirror_staged import StagedMirrorTransport, StagedStandbyDescriptor
from vllm.v1.worker.kv_mirror_transport import (
    MirrorTransport,
    MirrorTransportError,
    StandbyDescriptor,
)
from vllm.v1.worker.kv_mirror_worker import (
    MirrorCompletions,
    MirrorPusher,
    PushThread,
    with_completions,
)

LAYERS, NUM_BLOCKS, BLOCK_ELEMS = 2, 48, 64
os.environ.setdefault("UCX_NET_DEVICES", "lo")


RING_BYTES = 16 * LAYERS * BLOCK_ELEMS * 4  # 16 blocks of all layers in flight


@pytest.fixture(params=["direct", "staged"])
def standby(request):
    staged = request.param == "staged"
    with spawned_peer(standby_engine_main, LAYERS, NUM_BLOCKS, BLOCK_ELEMS,
                      RING_BYTES if staged else 0,
                      stop_message=("stop", None)) as (first, to_primary, from_primary):
        desc = (StagedStandbyDescriptor if staged else StandbyDescriptor).from_dict(first)
        yield desc, to_primary, from_primary


class Primary:
    """A primary's scheduler state and KV tensors; 'forward' writes token-derived bytes."""

    def __init__(self, descriptor: StandbyDescriptor, send) -> None:
        self.manager = make_manager(NUM_BLOCKS)
        self.tracker = MirrorTracker(self.manager.block_pool)
        self.kv = [torch.zeros(NUM_BLOCKS, BLOCK_ELEMS) for _ in range(LAYERS)]
        if isinstance(descriptor, StagedStandbyDescriptor):
            self.transport = StagedMirrorTransport("primary-engine", self.kv, NUM_BLOCKS,
                                                   RING_BYTES)
            send(("primary", self.transport.local_metadata()))  # for the acks
        else:
            self.transport = MirrorTransport("primary-engine", self.kv, NUM_BLOCKS)
        self.transport.connect(descriptor)
        self.pusher = MirrorPusher(self.transport)
        self.send = send

    def forward(self, req) -> None:
        ids = self.manager.get_block_ids(req.request_id)[0]
        for pos, tok in enumerate(req.all_token_ids[: req.num_computed_tokens]):
            block, slot = ids[pos // BLOCK], pos % BLOCK
            for layer, t in enumerate(self.kv):
                t[block, slot * 16:(slot + 1) * 16] = tok * 10 + layer

    def step(self, reqs) -> MirrorStepOps:
        ops = self.tracker.take_step_ops()  # built with the SchedulerOutput
        self.send(("ops", ops))             # the standby learns first
        for req in reqs:
            self.forward(req)
        self.pusher.push(ops)               # after the forward's KV writes
        self.settle()
        return ops

    def settle(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            done = self.pusher.poll()
            for seq in done.done:
                self.tracker.complete(seq)
            for seq in done.failed:
                self.tracker.complete(seq, ok=False)
            if not self.pusher.in_flight_steps:
                return
            assert time.monotonic() < deadline
            time.sleep(0.0005)

    def checksum(self, block_id: int) -> str:
        return hashlib.sha256(b"".join(t[block_id].numpy().tobytes() for t in self.kv)
                              ).hexdigest()


def lookup(to_primary, from_primary, token_lists, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        from_primary.put(("lookup", token_lists))
        got = to_primary.get(timeout=30)
        if got["lag_steps"] == 0 or time.monotonic() > deadline:
            return got
        time.sleep(0.01)


def test_mirrored_blocks_are_byte_identical_and_cached_on_the_standby(standby):
    descriptor, to_primary, from_primary = standby
    primary = Primary(descriptor, from_primary.put)
    reqs = []
    for tokens in ([1] * 3 + list(range(40, 50)), list(range(200, 219)),
                   [1] * 3 + list(range(40, 45)) + [7, 7, 7]):
        req = make_request(tokens)
        hit, n, _ = primary.manager.get_computed_blocks(req)
        primary.manager.allocate_slots(req, req.num_tokens - n, n, hit)
        req.num_computed_tokens = req.num_tokens
        reqs.append(req)
        primary.step([req])
    for step in range(9):
        for req in reqs:
            decode(primary.manager, req, 300 + step)
        primary.step(reqs)
    assert primary.tracker.lag_blocks == 0 and primary.tracker.num_blocks_mirrored > 10

    got = lookup(to_primary, from_primary, [list(r.all_token_ids) + [0] for r in reqs])
    assert got["lag_steps"] == 0
    for req, res in zip(reqs, got["lookups"]):
        full = req.num_tokens // BLOCK
        ids = list(primary.manager.get_block_ids(req.request_id)[0][:full])
        assert res["num_tokens"] == full * BLOCK
        assert res["block_ids"] == ids
        assert res["checksums"] == [primary.checksum(i) for i in ids]


def test_a_dead_standby_never_blocks_the_primary(standby):
    descriptor, to_primary, from_primary = standby
    primary = Primary(descriptor, from_primary.put)
    primary.transport.disconnect()  # the standby went away
    req = make_request(list(range(500, 512)))
    prefill(primary.manager, req)
    primary.step([req])
    assert primary.tracker.num_blocks_failed == 3 and primary.tracker.lag_blocks == 0
    primary.manager.free(req)
    assert primary.manager.block_pool.get_num_free_blocks() == NUM_BLOCKS - 1


def test_write_waits_for_the_ready_event_without_blocking_push(standby):
    descriptor, _, from_primary = standby

    class Event:
        done = False

        def query(self) -> bool:
            return self.done

    primary = Primary(descriptor, from_primary.put)
    req = make_request(list(range(600, 608)))
    prefill(primary.manager, req)
    ops = primary.tracker.take_step_ops()
    primary.send(("ops", ops))
    event = Event()
    primary.pusher.push(ops, ready=event)
    assert primary.pusher.poll().done == [] and primary.pusher.in_flight_steps == 1
    assert primary.pusher.bytes_pushed == 0
    event.done = True
    primary.settle()
    assert primary.pusher.bytes_pushed == 2 * LAYERS * BLOCK_ELEMS * 4


def test_push_thread_starts_a_write_once_its_forward_is_done_and_counts_the_lag(standby):
    """The push thread (CUDA's path, here with a CPU event stand-in) waits for the
    step's event off the worker's thread, pushes, and reports the step's lag in
    forwards launched meanwhile; the bytes land on the standby."""
    import threading

    descriptor, to_primary, from_primary = standby

    class Event:
        def __init__(self) -> None:
            self.done = threading.Event()

        def query(self) -> bool:
            return self.done.is_set()

        def synchronize(self) -> None:
            self.done.wait()

    primary = Primary(descriptor, from_primary.put)
    forwards = [1]
    primary.pusher = MirrorPusher(primary.transport, clock=lambda: forwards[0])
    thread = PushThread(primary.pusher, torch.device("cpu"))
    try:
        req = make_request(list(range(700, 720)))
        prefill(primary.manager, req)
        ops = primary.tracker.take_step_ops()
        primary.send(("ops", ops))
        primary.forward(req)
        event = Event()
        thread.push(ops, event, forwards[0])
        time.sleep(0.2)
        assert not thread.take() and primary.pusher.bytes_pushed == 0  # waits for it
        forwards[0] = 3  # two more forwards launched before the first one finished
        event.done.set()
        deadline = time.monotonic() + 30
        done = MirrorCompletions()
        while not done:
            assert time.monotonic() < deadline, "the push thread never completed the step"
            time.sleep(0.001)
            done.extend(thread.take())
        assert done.done == [ops.seq] and done.lag_steps == {ops.seq: 2}
        assert done.push_seconds > 0  # posting and polling the WRITE, reported
    finally:
        thread.close()
    primary.tracker.complete(ops.seq)
    got = lookup(to_primary, from_primary, [list(req.all_token_ids) + [0]])
    ids = list(primary.manager.get_block_ids(req.request_id)[0][:req.num_tokens // BLOCK])
    assert ids and got["lookups"][0]["block_ids"] == ids
    assert got["lookups"][0]["checksums"] == [primary.checksum(i) for i in ids]


def test_write_without_a_standby_raises_a_transport_error():
    kv = [torch.zeros(NUM_BLOCKS, BLOCK_ELEMS)]
    transport = MirrorTransport("lonely", kv, NUM_BLOCKS)
    with pytest.raises(MirrorTransportError):
        transport.write([1], 0)
    transport.close()


class _Pending(AsyncModelRunnerOutput):
    def get_output(self) -> ModelRunnerOutput:
        return EMPTY_MODEL_RUNNER_OUTPUT


def test_completions_ride_on_sync_and_async_outputs():
    done = MirrorCompletions(done=[3])
    out = with_completions(EMPTY_MODEL_RUNNER_OUTPUT, done)
    assert out.mirror_completions is done
    assert EMPTY_MODEL_RUNNER_OUTPUT.mirror_completions is None  # shared instance untouched
    # Async scheduling: the executors resolve outputs they recognise by isinstance.
    wrapped = with_completions(_Pending(), done)
    assert isinstance(wrapped, AsyncModelRunnerOutput)
    assert wrapped.get_output().mirror_completions is done
