"""The checkpoint lifecycle: allowed calls, 409s that change nothing, rollback, waiting."""

from __future__ import annotations

import asyncio

import pytest

from vllm.v1.checkpoint.state import CheckpointLifecycle, CheckpointState, CheckpointStateError


def test_checkpoint_then_restore_cycle_twice():
    life = CheckpointLifecycle()
    for _ in range(2):
        life.begin("checkpoint")
        assert life.state is CheckpointState.CHECKPOINTING and not life.accepting
        life.finish("checkpoint")
        assert life.state is CheckpointState.CHECKPOINTED
        life.begin("restore")
        life.finish("restore")
        assert life.state is CheckpointState.SERVING and life.accepting
    assert set(life.to_json()["timings_s"]) == {"checkpoint", "restore"}


@pytest.mark.parametrize("setup,call,message", [
    ([], "restore", "cannot restore while serving: restore needs the server checkpointed"),
    ([("begin", "checkpoint"), ("finish", "checkpoint")], "checkpoint",
     "cannot checkpoint while checkpointed"),
    ([("begin", "checkpoint")], "checkpoint", "cannot checkpoint while checkpointing"),
])
def test_disallowed_call_is_409_and_changes_nothing(setup, call, message):
    life = CheckpointLifecycle()
    for method, phase in setup:
        getattr(life, method)(phase)
    before = life.state
    with pytest.raises(CheckpointStateError, match=message) as e:
        life.begin(call)
    assert e.value.http_status == 409 and life.state is before


def test_failed_checkpoint_keeps_serving_and_failed_restore_keeps_the_snapshot():
    life = CheckpointLifecycle()
    life.begin("checkpoint")
    life.finish("checkpoint", ok=False, error="not enough host memory")
    assert life.state is CheckpointState.SERVING
    assert life.to_json()["last_error"] == "not enough host memory"
    life.begin("checkpoint")
    life.finish("checkpoint")
    life.begin("restore")
    life.finish("restore", ok=False)
    assert life.state is CheckpointState.CHECKPOINTED and life.last_error == "restore failed"


def test_finish_without_begin_is_refused():
    with pytest.raises(CheckpointStateError, match="no restore in progress"):
        CheckpointLifecycle().finish("restore")


def test_requests_wait_while_checkpointed_and_go_after_restore():
    async def scenario() -> list[str]:
        life = CheckpointLifecycle()
        order: list[str] = []
        life.begin("checkpoint")
        life.finish("checkpoint")

        async def request(name: str) -> None:
            await life.wait_serving()
            order.append(name)

        waiters = [asyncio.create_task(request(f"r{i}")) for i in range(3)]
        await asyncio.sleep(0.01)
        assert order == []  # queued, not rejected
        life.begin("restore")
        await asyncio.sleep(0.01)
        assert order == []
        life.finish("restore")
        order.append("restored")
        await asyncio.wait_for(asyncio.gather(*waiters), timeout=5)
        await life.wait_serving()  # serving: returns at once
        return order

    assert asyncio.run(scenario()) == ["restored", "r0", "r1", "r2"]


def test_load_from_serving_refused_while_checkpointed_and_a_failure_returns_as_was():
    life = CheckpointLifecycle()
    life.begin("load")
    assert life.state is CheckpointState.LOADING and not life.accepting
    life.finish("load", ok=False, error="a checksum differs")  # refused before writing
    assert life.state is CheckpointState.SERVING and life.last_error == "a checksum differs"
    life.begin("checkpoint")
    life.finish("checkpoint")
    with pytest.raises(CheckpointStateError,
                       match="cannot load while checkpointed: load needs the server serving "
                             "or load_failed"):
        life.begin("load")
    assert life.state is CheckpointState.CHECKPOINTED


def test_a_load_failed_mid_way_stays_failed_until_a_load_succeeds():
    async def scenario() -> list[str]:
        life = CheckpointLifecycle()
        seen: list[str] = []

        async def request() -> None:
            await life.wait_serving()
            seen.append(life.state.value)

        life.begin("load")
        held = asyncio.create_task(request())
        await asyncio.sleep(0.01)
        assert seen == []  # held while loading
        life.finish("load", ok=False, failed_to=CheckpointState.LOAD_FAILED)
        await asyncio.wait_for(held, timeout=5)  # woken to be told, not left waiting
        for phase in ("checkpoint", "restore"):
            with pytest.raises(CheckpointStateError):
                life.begin(phase)
        await life.wait_serving()  # returns at once: waiting would never end
        seen.append("again")
        life.begin("load")
        life.finish("load")
        seen.append(life.state.value)
        return seen

    assert asyncio.run(scenario()) == ["load_failed", "again", "serving"]
