# SPDX-License-Identifier: Apache-2.0
"""The checkpoint lifecycle of one server: which calls each state allows.

``POST /checkpoint`` and ``POST /restore`` move through it; a call the state does
not allow is refused with HTTP 409 and changes nothing; a phase that fails returns
to the state before it, so a failed checkpoint leaves the server serving and a
failed restore leaves the snapshot in place to retry. Requests that arrive while
not serving wait on :meth:`CheckpointLifecycle.wait_serving` and are served after
restore, never rejected.
"""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any


class CheckpointState(str, enum.Enum):
    SERVING = "serving"
    CHECKPOINTING = "checkpointing"
    CHECKPOINTED = "checkpointed"
    RESTORING = "restoring"


class CheckpointStateError(RuntimeError):
    """A call the current state does not allow (HTTP 409)."""

    http_status = 409


# phase -> (state it starts from, state while running, state on success)
_PHASES: dict[str, tuple[CheckpointState, CheckpointState, CheckpointState]] = {
    "checkpoint": (CheckpointState.SERVING, CheckpointState.CHECKPOINTING,
                   CheckpointState.CHECKPOINTED),
    "restore": (CheckpointState.CHECKPOINTED, CheckpointState.RESTORING,
                CheckpointState.SERVING),
}


@dataclass
class CheckpointLifecycle:
    state: CheckpointState = CheckpointState.SERVING
    timings_s: dict[str, float] = field(default_factory=dict)
    last_error: str | None = None
    _phase_start: float = 0.0
    _serving: asyncio.Event | None = None

    def begin(self, phase: str) -> None:
        start, running, _ = _PHASES[phase]
        if self.state is not start:
            raise CheckpointStateError(
                f"cannot {phase} while {self.state.value}: {phase} needs the server "
                f"{start.value}")
        self.state = running
        self._phase_start = time.monotonic()
        self._set_serving(False)

    def finish(self, phase: str, ok: bool = True, error: str | None = None) -> None:
        start, running, done = _PHASES[phase]
        if self.state is not running:
            raise CheckpointStateError(f"no {phase} in progress (state {self.state.value})")
        self.timings_s[phase] = time.monotonic() - self._phase_start
        self.state = done if ok else start
        self.last_error = None if ok else (error or f"{phase} failed")
        self._set_serving(self.state is CheckpointState.SERVING)

    @property
    def accepting(self) -> bool:
        return self.state is CheckpointState.SERVING

    async def wait_serving(self) -> None:
        """Return once the server serves (at once if it does)."""
        if self.accepting:
            return
        if self._serving is None:
            self._serving = asyncio.Event()
        await self._serving.wait()

    def _set_serving(self, serving: bool) -> None:
        if self._serving is None:
            return
        if serving:
            self._serving.set()
            self._serving = None
        else:
            self._serving.clear()

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state.value, "timings_s": dict(self.timings_s),
                "last_error": self.last_error}
