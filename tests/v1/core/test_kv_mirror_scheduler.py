"""SchedulerMirror on a real KVCacheManager, its ops read by a real ZMQ socket: what a
slow standby may keep pinned on the primary, and how deferred blocks come back."""

from __future__ import annotations

import pytest
import zmq

from tests.v1.core.test_kv_mirror import BLOCK, NUM_BLOCKS, make_manager, make_request, prefill
from vllm.v1.core.kv_mirror_scheduler import SchedulerMirror, decode_ops
from vllm.v1.worker.kv_mirror_worker import MirrorCompletions as Completions


@pytest.fixture
def mirrored(tmp_path):
    manager = make_manager()
    mirror = SchedulerMirror(manager.block_pool, pin_budget=4)
    ctx = zmq.Context()
    standby = ctx.socket(zmq.PULL)
    address = f"ipc://{tmp_path}/ops"
    standby.bind(address)
    mirror.connect(address, bytes_per_block=1024)
    yield manager, mirror, standby
    mirror.disconnect()
    standby.close(linger=0)
    ctx.term()


def _free(manager) -> int:
    return manager.block_pool.get_num_free_blocks()


def test_a_slow_standby_pins_at_most_the_budget_and_gets_the_rest_later(mirrored):
    manager, mirror, standby = mirrored
    req = make_request(list(range(8 * BLOCK)))
    ids = prefill(manager, req)
    manager.free(req)  # finished: only the mirror's pins keep its blocks
    first = mirror.take_step_ops()
    assert [b.block_id for b in first.write] == ids[:4]  # oldest first, up to the budget
    assert _free(manager) == NUM_BLOCKS - 1 - 4  # the other four were not kept pinned
    assert mirror.status()["backlog_blocks"] == 4
    # Nothing new while the budget is used up by the step in flight.
    assert mirror.take_step_ops() is None
    mirror.update_from_output(Completions(done=[first.seq]))
    assert _free(manager) == NUM_BLOCKS - 1
    # Then the deferred blocks come back from the backlog, still cached, same hashes.
    second = mirror.take_step_ops()
    assert [b.block_id for b in second.write] == ids[4:]
    mirror.update_from_output(Completions(done=[second.seq], lag_steps={second.seq: 1}))
    assert _free(manager) == NUM_BLOCKS - 1
    # Lag as the worker measured it (forwards); confirmation as the scheduler saw it.
    status = mirror.status()
    assert status["lag_steps"][-1] == 1 and status["confirm_steps"] == [1, 0]
    kinds = [decode_ops(standby.recv())[0] for _ in range(3)]
    assert kinds == ["reset", "ops", "ops"]


def test_a_failed_step_is_dropped_on_the_standby_and_copied_again(mirrored):
    manager, mirror, standby = mirrored
    req = make_request(list(range(2 * BLOCK)))
    ids = prefill(manager, req)
    ops = mirror.take_step_ops()
    mirror.update_from_output(Completions(failed=[ops.seq]))
    again = mirror.take_step_ops()
    assert [b.block_id for b in again.write] == ids
    msgs = [decode_ops(standby.recv()) for _ in range(4)]
    assert [m[0] for m in msgs] == ["reset", "ops", "failed", "ops"]
    assert msgs[2][1] == ops.seq
    mirror.update_from_output(Completions(done=[again.seq]))
    manager.free(req)
    assert _free(manager) == NUM_BLOCKS - 1


def test_steps_failing_again_and_again_drop_the_standby(mirrored):
    from vllm.v1.core.kv_mirror_scheduler import MAX_FAILURES_IN_A_ROW

    manager, mirror, _ = mirrored
    req = make_request(list(range(2 * BLOCK)))
    prefill(manager, req)
    for _ in range(MAX_FAILURES_IN_A_ROW):
        assert mirror.connected
        ops = mirror.take_step_ops()  # the failed blocks come back each time
        assert len(ops.write) == 2
        mirror.update_from_output(Completions(failed=[ops.seq]))
    status = mirror.status()
    assert not status["connected"] and "failed in a row" in status["dropped"]
    manager.free(req)
    assert _free(manager) == NUM_BLOCKS - 1  # nothing left pinned
