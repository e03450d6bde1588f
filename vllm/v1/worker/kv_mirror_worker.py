# SPDX-License-Identifier: Apache-2.0
"""Per-worker driver of the mirror's data plane: push each step's blocks once their KV
writes are complete, without blocking the step that wrote them.

A step's ops come with an optional ``ready`` event recorded on the compute stream after
the forward (CUDA). There a :class:`PushThread` waits for the event and drives the
transport, so the WRITE starts as soon as the forward has finished on the GPU (not at
the worker's next call) and its completion is seen while the next forward runs; the
forward never waits on it. On CPU the forward is done when ``push`` is called, and the
WRITE starts at once on the worker's thread. A standby that fails never fails the
primary: its steps are reported failed and the tracker unpins their blocks.

Lag is counted in forwards: a step's lag is the number of forwards (with tokens) the
worker had launched after the step's own when its bytes were confirmed on the standby
(0: before the next one was launched). It is what a failover at that moment would recompute, in
steps; the scheduler learns of the completion one or two steps later (async
scheduling), which only delays unpinning.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Protocol

import torch
from vllm.logger import init_logger
from vllm.v1.outputs import AsyncModelRunnerOutput, ModelRunnerOutput

from vllm.v1.core.kv_mirror import MirrorStepOps
from vllm.v1.worker.kv_mirror_staged import (
    StagedMirrorTransport,
    StagedStandbyDescriptor,
    StagedStandbyEndpoint,
)
from vllm.v1.worker.kv_mirror_transport import (
    MirrorBackpressure,
    MirrorTransport,
    MirrorTransportError,
    StandbyDescriptor,
    StandbyEndpoint,
    kv_regions,
    parse_step_notification,
    unique_tensors,
)

if TYPE_CHECKING:
    from vllm.v1.worker.worker_base import WorkerBase

logger = init_logger(__name__)


class Transport(Protocol):
    """MirrorTransport (direct) or StagedMirrorTransport (gather + ack)."""

    requires_ack: bool
    bytes_per_block: int

    def write(self, block_ids: list[int], seq: int) -> Any: ...

    def poll(self, handle: Any) -> bool | None: ...

    def poll_acks(self) -> list[int]: ...

    def abandon(self, seq: int) -> None: ...

    def close(self) -> None: ...


class ReadyEvent(Protocol):
    def query(self) -> bool: ...

    def synchronize(self) -> None: ...


# How often the push thread polls a WRITE in flight (it sleeps while none is): first
# after PUSH_POLL_MIN_S, then twice as long after each poll that finds nothing new, up to
# PUSH_POLL_MAX_S. NIXL's binding releases the GIL inside a post (measured on CPU: a
# 24 ms post left another thread's longest wait at 0.2 ms), but every call and the
# Python around it holds it, and the engine's own loop needs it: on a small model a
# 0.1 ms poll loop cost more than the copies.
PUSH_POLL_MIN_S = 0.0002
PUSH_POLL_MAX_S = 0.002


@dataclass
class MirrorCompletions:
    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    # seq -> forwards launched after the step's own when it was confirmed (done only).
    lag_steps: dict[int, int] = field(default_factory=dict)
    # Seconds spent posting and polling WRITEs (the GIL held) since the last report.
    push_seconds: float = 0.0

    def extend(self, other: MirrorCompletions) -> None:
        self.done.extend(other.done)
        self.failed.extend(other.failed)
        self.lag_steps.update(other.lag_steps)
        self.push_seconds += other.push_seconds

    def __bool__(self) -> bool:
        return bool(self.done or self.failed)


class MirrorPusher:
    """Starts one WRITE per step and reports which steps completed or failed.

    ``clock`` counts the worker's forwards; each step's lag is measured with it."""

    def __init__(self, transport: Transport, clock: Callable[[], int] = lambda: 0) -> None:
        self.transport = transport
        self._clock = clock
        self._pushed_at: dict[int, int] = {}
        self._waiting: deque[tuple[MirrorStepOps, ReadyEvent | None]] = deque()
        self._in_flight: dict[int, Any] = {}
        self._awaiting_ack: set[int] = set()
        self._completions = MirrorCompletions()
        self.bytes_pushed = 0

    def push(self, ops: MirrorStepOps, ready: ReadyEvent | None = None,
             forward: int | None = None) -> None:
        """``forward``: the clock's value at the step's forward (default: now)."""
        if not ops.write:
            self._completions.done.append(ops.seq)
            return
        self._pushed_at[ops.seq] = self._clock() if forward is None else forward
        self._waiting.append((ops, ready))
        self._start_ready()

    def _start_ready(self) -> None:
        t0 = time.perf_counter()
        try:
            self._start_ready_steps()
        finally:
            self._completions.push_seconds += time.perf_counter() - t0

    def _start_ready_steps(self) -> None:
        # Steps complete in order on one stream: stop at the first not-ready one.
        while self._waiting and (self._waiting[0][1] is None or self._waiting[0][1].query()):
            ops, ready = self._waiting.popleft()
            ids = [b.block_id for b in ops.write]
            try:
                self._in_flight[ops.seq] = self.transport.write(ids, ops.seq)
                self.bytes_pushed += len(ids) * self.transport.bytes_per_block
            except MirrorBackpressure:
                # Retried on a later poll, still in order; the primary does not wait.
                self._waiting.appendleft((ops, ready))
                break
            except Exception as e:  # never the primary's problem: the step is failed
                logger.warning("mirror: step %d not pushed: %s", ops.seq, e)
                self._fail(ops.seq)
                self.transport.abandon(ops.seq)  # whatever it had reserved

    def _done(self, seq: int) -> None:
        self._completions.done.append(seq)
        self._completions.lag_steps[seq] = self._clock() - self._pushed_at.pop(seq, 0)

    def _fail(self, seq: int) -> None:
        self._completions.failed.append(seq)
        self._pushed_at.pop(seq, None)

    def poll(self) -> MirrorCompletions:
        """Start what became ready, collect what finished; returns and clears them."""
        self._start_ready()
        t0 = time.perf_counter()
        for seq, handle in list(self._in_flight.items()):
            try:
                if self.transport.poll(handle):
                    del self._in_flight[seq]
                    if self.transport.requires_ack:
                        self._awaiting_ack.add(seq)
                    else:
                        self._done(seq)
            except Exception as e:
                logger.warning("mirror: step %d failed: %s", seq, e)
                self._fail(seq)
                del self._in_flight[seq]
                self.transport.abandon(seq)
        if self.transport.requires_ack:
            try:
                acks = self.transport.poll_acks()
            except Exception as e:
                # Unacknowledged steps stay pending; the scheduler's reconnect clears them.
                logger.warning("mirror: standby acknowledgements lost: %s", e)
                acks = []
            for seq in acks:
                if seq in self._awaiting_ack:
                    self._awaiting_ack.discard(seq)
                    self._done(seq)
        self._completions.push_seconds += time.perf_counter() - t0
        out, self._completions = self._completions, MirrorCompletions()
        return out

    @property
    def in_flight_steps(self) -> int:
        return len(self._waiting) + len(self._in_flight) + len(self._awaiting_ack)

    def fail_all(self, also: list[int] = ()) -> None:
        """Every step not confirmed is failed, and the steps ``also`` never pushed (the
        push thread cannot go on)."""
        for seq in also:
            self._fail(seq)
        for ops, _ in self._waiting:
            self._fail(ops.seq)
        for seq in [*self._in_flight, *self._awaiting_ack]:
            self._fail(seq)
            self.transport.abandon(seq)
        self._waiting.clear()
        self._in_flight.clear()
        self._awaiting_ack.clear()


class PushThread:
    """Drives a :class:`MirrorPusher` off the worker's thread (CUDA): waits for each
    step's ready event (the wait releases the GIL), starts its WRITE, polls the WRITEs
    in flight. The pusher and its transport are used by this thread only, until
    :meth:`close`."""

    def __init__(self, pusher: MirrorPusher, device: torch.device) -> None:
        self.pusher = pusher
        self._cond = threading.Condition()
        self._queue: deque[tuple[MirrorStepOps, ReadyEvent | None, int]] = deque()
        self._out = MirrorCompletions()
        self._stop = False
        self._thread = threading.Thread(target=self._run, args=(device,),
                                        name="MirrorPush", daemon=True)
        self._thread.start()

    def push(self, ops: MirrorStepOps, ready: ReadyEvent | None, forward: int) -> None:
        with self._cond:
            self._queue.append((ops, ready, forward))
            self._cond.notify()

    def take(self) -> MirrorCompletions:
        with self._cond:
            out, self._out = self._out, MirrorCompletions()
        return out

    def close(self) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify()
        self._thread.join(timeout=10)

    def _run(self, device: torch.device) -> None:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        pusher = self.pusher
        poll_s = PUSH_POLL_MIN_S
        while True:
            with self._cond:
                while not (self._queue or self._stop or pusher.in_flight_steps):
                    self._cond.wait()
                if self._stop:
                    return
                if not self._queue:
                    self._cond.wait(poll_s)
                if self._queue:
                    poll_s = PUSH_POLL_MIN_S
                items = list(self._queue)
                self._queue.clear()
            try:
                while items:
                    ops, ready, forward = items[0]
                    if ready is not None:
                        ready.synchronize()  # the forward's KV writes are complete
                    pusher.push(ops, None, forward)
                    items.pop(0)
                done = pusher.poll()
            except Exception as e:  # a CUDA error: the primary is failing anyway
                logger.warning("mirror: push thread: %s; failing the steps in flight", e)
                pusher.fail_all(also=[ops.seq for ops, _, _ in items])
                done = pusher.poll()
            # Nothing new: wait longer before the next poll (a big WRITE takes a while).
            poll_s = PUSH_POLL_MIN_S if done else min(poll_s * 2, PUSH_POLL_MAX_S)
            if done or done.push_seconds:
                with self._cond:
                    self._out.extend(done)


# -- engine wiring ----------------------------------------------------------------------
# The engine reaches these through ``collective_rpc(fn, args=...)`` (each runs on every
# worker with the worker as first argument), so no RPC method is added to Worker; only
# the per-step hooks (patch 0005) call into :class:`WorkerMirror`.


def unwrap_worker(worker: Any) -> WorkerBase:
    """collective_rpc hands callables the WorkerWrapperBase; state goes on the Worker
    (the per-step hooks read ``self.kv_mirror`` there)."""
    return getattr(worker, "worker", None) or worker


def worker_kv_caches(worker: WorkerBase) -> list[torch.Tensor]:
    """The worker's KV cache tensors (both model runners keep ``kv_caches``)."""
    kv = getattr(worker.model_runner, "kv_caches", None)
    if not kv:
        raise MirrorTransportError("the worker has no KV cache to mirror")
    return list(kv.values()) if isinstance(kv, dict) else list(kv)


def block_checksums(kv_caches: list[torch.Tensor], num_blocks: int,
                    block_ids: list[int], batch: int = 256) -> list[str]:
    """sha256 of each block's bytes over every KV tensor (debug and tests). Blocks are
    copied to the host ``batch`` at a time (one copy per tensor, not per block) and
    hashed on a thread pool (hashlib releases the GIL): a whole prefix cache of an
    H100 is checked in seconds, not minutes."""
    from concurrent.futures import ThreadPoolExecutor

    views = [t.view(num_blocks, -1) for t in unique_tensors(kv_caches)]
    out: list[str] = []
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        for start in range(0, len(block_ids), batch):
            ids = block_ids[start:start + batch]
            index = torch.tensor(ids, dtype=torch.long, device=views[0].device)
            rows = [v.index_select(0, index).cpu().numpy() for v in views]

            def digest(i: int, rows=rows) -> str:
                h = hashlib.sha256()
                for r in rows:
                    h.update(r[i].tobytes())
                return h.hexdigest()

            out.extend(pool.map(digest, range(len(ids))))
    return out


class _MirroredAsyncOutput(AsyncModelRunnerOutput):
    """An AsyncModelRunnerOutput whose ModelRunnerOutput carries mirror completions.

    A subclass, not a duck type: the executors recognise async outputs by isinstance
    and would otherwise hand this wrapper to the scheduler unresolved."""

    def __init__(self, inner: AsyncModelRunnerOutput, completions: MirrorCompletions) -> None:
        self.inner = inner
        self.completions = completions

    def get_output(self) -> ModelRunnerOutput:
        return replace(self.inner.get_output(), mirror_completions=self.completions)


def with_completions(output: Any, completions: MirrorCompletions) -> Any:
    """``output`` (a ModelRunnerOutput or an AsyncModelRunnerOutput) carrying
    ``completions`` to the scheduler."""
    if isinstance(output, AsyncModelRunnerOutput):
        return _MirroredAsyncOutput(output, completions)
    # replace(): EMPTY_MODEL_RUNNER_OUTPUT is a shared instance.
    return replace(output, mirror_completions=completions)


class WorkerMirror:
    """The primary worker's mirror: one transport to the standby's worker of the same
    rank, a pusher, and the completions not yet handed to the scheduler."""

    def __init__(self, worker: WorkerBase, standby: dict[str, Any], transport: str) -> None:
        kv = worker_kv_caches(worker)
        num_blocks = worker.cache_config.num_gpu_blocks
        # A fresh agent name per connection: a replaced standby must not see
        # the previous connection's agent under the same name.
        name = f"vllm-ha-primary-{worker.rank}-{uuid.uuid4().hex[:8]}"
        self.on_cuda = kv[0].is_cuda
        self.transport: Any
        if transport == "staged":
            desc = StagedStandbyDescriptor.from_dict(standby)
            self.transport = StagedMirrorTransport(name, kv, num_blocks, desc.stage_bytes)
        else:
            desc = StandbyDescriptor.from_dict(standby)
            self.transport = MirrorTransport(name, kv, num_blocks)
        try:
            self.transport.connect(desc)
        except Exception:
            self.transport.close()
            raise
        self.forwards = 0  # the lag clock: forwards launched since connecting
        self.pusher = MirrorPusher(self.transport, clock=lambda: self.forwards)
        self._thread = PushThread(self.pusher, kv[0].device) if self.on_cuda else None
        self._completions = MirrorCompletions()

    def local_metadata(self) -> bytes:
        return self.transport.agent.get_agent_metadata()

    def after_forward(self, scheduler_output: Any) -> None:
        if scheduler_output.total_num_scheduled_tokens:
            self.forwards += 1  # idle steps (a catch-up on an idle engine) compute nothing
        ops = scheduler_output.mirror_ops
        if ops is None:
            return
        if self._thread is None:
            self.pusher.push(ops)
            return
        # Blocking: the push thread sleeps in synchronize() instead of spinning a core
        # beside the engine's own thread (py-spy on the H100: a spinning wait was a
        # quarter of the process's samples at ~1B, c=128).
        ready = torch.cuda.Event(blocking=True)
        ready.record()  # after the forward's KV writes on the current stream
        self._thread.push(ops, ready, self.forwards)

    def attach(self, output: Any) -> Any:
        """Collect finished copies; hand them to the scheduler on this output."""
        done = self.pusher.poll() if self._thread is None else self._thread.take()
        self._completions.extend(done)
        if output is None or not self._completions:
            return output
        completions, self._completions = self._completions, MirrorCompletions()
        return with_completions(output, completions)

    def close(self) -> None:
        if self._thread is not None:
            self._thread.close()
        self.transport.close()


def rpc_primary_connect(worker: WorkerBase, standbys: list[dict[str, Any]],
                        transport: str) -> bytes:
    """Connect this worker to the standby worker of its rank; returns our NIXL
    metadata (the staged standby acknowledges scatters to it)."""
    worker = unwrap_worker(worker)
    rpc_primary_disconnect(worker)
    mirror = WorkerMirror(worker, standbys[worker.rank], transport)
    worker.kv_mirror = mirror
    return mirror.local_metadata()


def rpc_primary_disconnect(worker: WorkerBase) -> None:
    worker = unwrap_worker(worker)
    mirror = getattr(worker, "kv_mirror", None)
    worker.kv_mirror = None
    if mirror is not None:
        mirror.close()


def rpc_block_checksums(worker: WorkerBase, block_ids: list[int]) -> list[str]:
    worker = unwrap_worker(worker)
    return block_checksums(worker_kv_caches(worker), worker.cache_config.num_gpu_blocks,
                           block_ids)


class StandbyWorkerMirror:
    """The standby worker's mirror: its registered KV cache (direct) or staging ring
    (staged), and the staged ranges that landed before their step's ops were known."""

    def __init__(self, worker: WorkerBase, transport: str, staging_bytes: int) -> None:
        kv = worker_kv_caches(worker)
        num_blocks = worker.cache_config.num_gpu_blocks
        name = f"vllm-ha-standby-{worker.rank}"
        self.staged = transport == "staged"
        self.endpoint: Any
        if self.staged:
            row = sum(r.block_bytes for r in kv_regions(kv, num_blocks))
            ring = max(row, staging_bytes // row * row)
            self.endpoint = StagedStandbyEndpoint(name, kv, num_blocks, ring)
        else:
            self.endpoint = StandbyEndpoint(name, kv, num_blocks)
        self._landed: dict[int, tuple[int, int]] = {}  # staged: seq -> (offset, k)

    def poll(self, pending: dict[int, list[int]]) -> list[int]:
        """Steps whose bytes are now in the KV cache. ``pending``: the block ids of
        every announced step not yet landed (staged ranges scatter there)."""
        if not self.staged:
            seqs = [parse_step_notification(m) for m in self.endpoint.poll_notifications()]
            return [s for s in seqs if s is not None]
        for seq, off, k in self.endpoint.poll_landed():
            self._landed[seq] = (off, k)
        landed = []
        for seq, (off, k) in list(self._landed.items()):
            ids = pending.get(seq)
            if ids is not None and len(ids) == k:
                self.endpoint.scatter(seq, off, ids)
                del self._landed[seq]
                landed.append(seq)
        return landed

    def forget(self) -> None:
        """A new primary connection: ranges of the old one will never scatter."""
        self._landed.clear()


def rpc_standby_open(worker: WorkerBase, transport: str, staging_bytes: int
                     ) -> dict[str, Any]:
    worker = unwrap_worker(worker)
    mirror = StandbyWorkerMirror(worker, transport, staging_bytes)
    worker.kv_mirror_standby = mirror
    return mirror.endpoint.descriptor().to_dict()


def rpc_standby_connect_primary(worker: WorkerBase, metadata: list[bytes]) -> None:
    worker = unwrap_worker(worker)
    mirror: StandbyWorkerMirror = worker.kv_mirror_standby
    mirror.forget()
    if mirror.staged:
        mirror.endpoint.connect_primary(metadata[worker.rank])


def rpc_standby_poll(worker: WorkerBase, pending: dict[int, list[int]]) -> list[int]:
    worker = unwrap_worker(worker)
    return worker.kv_mirror_standby.poll(pending)


def rpc_standby_close(worker: WorkerBase) -> None:
    """Promoted: the KV cache (or staging ring) is no longer exposed to a primary."""
    worker = unwrap_worker(worker)
    mirror: StandbyWorkerMirror | None = getattr(worker, "kv_mirror_standby", None)
    worker.kv_mirror_standby = None
    if mirror is not None:
        mirror.endpoint.close()
