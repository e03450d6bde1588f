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
    # POST /snapshot/load: a serving engine takes a snapshot's weights and prefix cache.
    LOADING = "loading"
    # A load failed after it began writing the weights: the engine's weights are
    # neither its old ones nor the snapshot's; only another load gets it serving.
    LOAD_FAILED = "load_failed"


# States that held requests stop waiting for: served, or (a failed load) refused.
_SETTLED = (CheckpointState.SERVING, CheckpointState.LOAD_FAILED)


class CheckpointStateError(RuntimeError):
    """A call the current state does not allow (HTTP 409)."""

    http_status = 409


# phase -> (states it starts from, state while running, state on success)
_PHASES: dict[str, tuple[tuple[CheckpointState, ...], CheckpointState, CheckpointState]] = {
    "checkpoint": ((CheckpointState.SERVING,), CheckpointState.CHECKPOINTING,
                   CheckpointState.CHECKPOINTED),
    "restore": ((CheckpointState.CHECKPOINTED,), CheckpointState.RESTORING,
                CheckpointState.SERVING),
    "load": ((CheckpointState.SERVING, CheckpointState.LOAD_FAILED),
             CheckpointState.LOADING, CheckpointState.SERVING),
}


@dataclass
class CheckpointLifecycle:
    state: CheckpointState = CheckpointState.SERVING
    timings_s: dict[str, float] = field(default_factory=dict)
    last_error: str | None = None
    _phase_start: float = 0.0
    _serving: asyncio.Event | None = None
    _started_from: CheckpointState = CheckpointState.SERVING

    def begin(self, phase: str) -> None:
        starts, running, _ = _PHASES[phase]
        if self.state not in starts:
            raise CheckpointStateError(
                f"cannot {phase} while {self.state.value}: {phase} needs the server "
                f"{' or '.join(s.value for s in starts)}")
        self._started_from = self.state
        self.state = running
        self._phase_start = time.monotonic()
        self._set_serving(False)

    def finish(self, phase: str, ok: bool = True, error: str | None = None,
               failed_to: CheckpointState | None = None) -> None:
        """``failed_to``: where a failed phase leaves the server (default: the state
        it started from)."""
        _, running, done = _PHASES[phase]
        if self.state is not running:
            raise CheckpointStateError(f"no {phase} in progress (state {self.state.value})")
        self.timings_s[phase] = time.monotonic() - self._phase_start
        self.state = done if ok else (failed_to or self._started_from)
        self.last_error = None if ok else (error or f"{phase} failed")
        self._set_serving(self.state in _SETTLED)

    @property
    def accepting(self) -> bool:
        return self.state is CheckpointState.SERVING

    async def wait_serving(self) -> None:
        """Return once the server serves, or cannot until an operator acts (a failed
        load); at once if either is the case."""
        if self.state in _SETTLED:
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
