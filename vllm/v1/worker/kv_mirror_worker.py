# SPDX-License-Identifier: Apache-2.0
"""Per-worker driver of the mirror's data plane: push each step's blocks once their KV
writes are complete, without blocking the step that wrote them.

A step's ops come with an optional ``ready`` event recorded on the compute stream after
the forward (CUDA); the WRITE is started from :meth:`MirrorPusher.poll` as soon as the
event has completed, so the forward never waits on it. On CPU the forward is done when
``push`` is called, and the WRITE starts at once. A standby that fails never fails the
primary: its steps are reported failed and the tracker unpins their blocks.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm.logger import init_logger

from vllm.v1.core.kv_mirror import MirrorStepOps
from vllm.v1.worker.kv_mirror_transport import MirrorTransportError


class Transport(Protocol):
    """MirrorTransport (direct) or StagedMirrorTransport (gather + ack)."""

    requires_ack: bool
    bytes_per_block: int

    def write(self, block_ids: list[int], seq: int) -> Any: ...

    def poll(self, handle: Any) -> bool | None: ...

logger = init_logger(__name__)


class ReadyEvent(Protocol):
    def query(self) -> bool: ...


@dataclass
class MirrorCompletions:
    done: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)


class MirrorPusher:
    """Starts one WRITE per step and reports which steps completed or failed."""

    def __init__(self, transport: Transport) -> None:
        self.transport = transport
        self._waiting: deque[tuple[MirrorStepOps, ReadyEvent | None]] = deque()
        self._in_flight: dict[int, Any] = {}
        self._awaiting_ack: set[int] = set()
        self._completions = MirrorCompletions()
        self.bytes_pushed = 0

    def push(self, ops: MirrorStepOps, ready: ReadyEvent | None = None) -> None:
        if not ops.write:
            self._completions.done.append(ops.seq)
            return
        self._waiting.append((ops, ready))
        self._start_ready()

    def _start_ready(self) -> None:
        # Steps complete in order on one stream: stop at the first not-ready one.
        while self._waiting and (self._waiting[0][1] is None or self._waiting[0][1].query()):
            ops, _ = self._waiting.popleft()
            ids = [b.block_id for b in ops.write]
            try:
                self._in_flight[ops.seq] = self.transport.write(ids, ops.seq)
                self.bytes_pushed += len(ids) * self.transport.bytes_per_block
            except MirrorTransportError as e:
                logger.warning("mirror: step %d not pushed: %s", ops.seq, e)
                self._completions.failed.append(ops.seq)

    def poll(self) -> MirrorCompletions:
        """Start what became ready, collect what finished; returns and clears them."""
        self._start_ready()
        for seq, handle in list(self._in_flight.items()):
            try:
                if self.transport.poll(handle):
                    del self._in_flight[seq]
                    if self.transport.requires_ack:
                        self._awaiting_ack.add(seq)
                    else:
                        self._completions.done.append(seq)
            except MirrorTransportError as e:
                logger.warning("mirror: step %d failed: %s", seq, e)
                self._completions.failed.append(seq)
                del self._in_flight[seq]
                if self.transport.requires_ack:
                    self.transport.abandon(seq)
        if self.transport.requires_ack:
            for seq in self.transport.poll_acks():
                if seq in self._awaiting_ack:
                    self._awaiting_ack.discard(seq)
                    self._completions.done.append(seq)
        out, self._completions = self._completions, MirrorCompletions()
        return out

    @property
    def in_flight_steps(self) -> int:
        return len(self._waiting) + len(self._in_flight) + len(self._awaiting_ack)
