# SPDX-License-Identifier: Apache-2.0
"""``/checkpoint`` and ``/restore`` (patch 0011 attaches the router).

- ``GET /checkpoint``: state (serving, checkpointing, checkpointed, restoring), sizes
  raw and stored, codec and ratio, each phase's seconds, GPU memory the engine holds.
- ``POST /checkpoint`` (JSON body optional, fields of
  :class:`~vllm.v1.checkpoint.manager.CheckpointOptions`) and ``POST /restore``.
- ``POST /snapshot {"name": NAME}``: a snapshot of the serving engine under
  ``--snapshot-root`` (docs/snapshots.md); ``--snapshot-interval`` runs it periodically.
- ``POST /snapshot/load {"name": NAME}``: an idle server (a warm spare) becomes the one
  the snapshot was taken of: weights in place, prefix cache replaced.

Not a dev route: the API is stable and mounted on every server. Both POSTs (and the
GET) need the admin key (:mod:`vllm.entrypoints.serve.admin_auth`). A call the state does not allow answers 409
and changes nothing; generation requests that arrive while the server is not serving
wait and are served after restore.
"""

from __future__ import annotations

import contextlib
from typing import Any

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import ConfigDict
from pydantic.dataclasses import dataclass as pydantic_dataclass

from vllm.entrypoints.serve.admin_auth import authorized
from vllm.entrypoints.serve.checkpoint.snapshot_args import PREPIN_AUTO
from vllm.entrypoints.serve.mirror.api_router import _generation
from vllm.v1.checkpoint.manager import (
    CheckpointCallError,
    CheckpointManager,
    CheckpointOptions,
)
from vllm.v1.checkpoint.snapshot import SnapshotError
from vllm.v1.checkpoint.snapshot_manager import SnapshotCallError
from vllm.v1.checkpoint.state import CheckpointState, CheckpointStateError
from vllm.v1.worker.checkpoint_worker import CODECS

router = APIRouter()


def _manager(app: Any) -> CheckpointManager | None:
    manager = getattr(app.state, "ha_checkpoint", None)
    client = getattr(app.state, "engine_client", None)
    if manager is None and client is not None:
        manager = app.state.ha_checkpoint = CheckpointManager(
            client, getattr(app.state, "args", None))
    return manager


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(status_code=status, content={"error": message})


async def _call(request: Request, fn) -> JSONResponse:
    if not authorized(request):
        return _error(401, "Unauthorized: /checkpoint and /restore need the admin key "
                           "(VLLM_HA_ADMIN_KEY) or the server's API key as a Bearer token")
    manager = _manager(request.app)
    if manager is None:
        return _error(503, "the engine is not up yet")
    try:
        return JSONResponse(await fn(manager))
    except CheckpointStateError as e:
        return _error(409, str(e))
    except (CheckpointCallError, SnapshotCallError) as e:
        return _error(e.http_status, str(e))
    except SnapshotError as e:
        return _error(400, str(e))
    except Exception as e:  # the phase was undone; say what failed
        return _error(500, f"{type(e).__name__}: {e}")


@router.get("/checkpoint")
async def checkpoint_status(raw_request: Request) -> JSONResponse:
    async def status(m: CheckpointManager) -> dict:
        return m.status()
    return await _call(raw_request, status)


@router.post("/checkpoint")
async def checkpoint(raw_request: Request, body: CheckpointOptions | None = None
                     ) -> JSONResponse:
    opts = body or CheckpointOptions()
    return await _call(raw_request, lambda m: m.checkpoint(opts))


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class SnapshotRequest:
    name: str
    """The snapshot ``ROOT/NAME`` to write (one path component)."""
    codec: str = "auto"
    background: bool = True
    """Pause the engine only for the copy to host memory and write the files while it
    serves; false writes them in the pause (host memory is then not needed)."""


@router.post("/snapshot")
async def snapshot(raw_request: Request, body: SnapshotRequest) -> JSONResponse:
    if body.codec not in CODECS:
        return _error(400, f"codec must be one of {', '.join(CODECS)}")
    return await _call(raw_request,
                       lambda m: m.snapshot(body.name, body.codec, body.background))


@pydantic_dataclass(config=ConfigDict(extra="forbid"))
class SnapshotLoadRequest:
    name: str
    """The snapshot ``ROOT/NAME`` this server becomes (one path component)."""
    verify: bool = True
    """Check every checksum of the files the load reads before anything changes."""
    reload_weights: bool = False
    """Read the weights even if this server loaded that weights file already (by
    default only the prefix cache is replaced then)."""


@router.post("/snapshot/load")
async def snapshot_load(raw_request: Request, body: SnapshotLoadRequest) -> JSONResponse:
    return await _call(raw_request, lambda m: m.load_snapshot(body.name, body.verify,
                                                               body.reload_weights))


@router.post("/restore")
async def restore(raw_request: Request) -> JSONResponse:
    return await _call(raw_request, lambda m: m.restore())


class CheckpointHoldMiddleware:
    """Pure ASGI: while the server is not serving (checkpointing, checkpointed,
    restoring), a generation request waits here, then goes on as if nothing happened.
    Everything else (health, metrics, /checkpoint itself) passes."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if (scope["type"] == "http" and "app" in scope and scope["method"] == "POST"
                and _generation(scope["path"])):
            manager = getattr(scope["app"].state, "ha_checkpoint", None)
            if manager is not None:
                await manager.hold()
                if manager.lifecycle.state is CheckpointState.LOAD_FAILED:
                    response = _error(
                        503, "this server's weights are incomplete after a failed POST "
                        "/snapshot/load; it serves again once a load succeeds")
                    return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
    app.add_middleware(CheckpointHoldMiddleware)
    _start_with_server(app)


def _start_with_server(app: FastAPI) -> None:
    """``--snapshot-interval``: the periodic snapshots run while the server does;
    ``--checkpoint-prepin`` pins before the server takes requests (wrapped around
    upstream's lifespan, which starts after the engine is up)."""
    upstream = app.router.lifespan_context

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        async with upstream(app) as state:
            manager = _manager(app)
            if manager is not None:
                prepin = getattr(getattr(app.state, "args", None), "checkpoint_prepin", None)
                if prepin:
                    await manager.prepin(None if prepin == PREPIN_AUTO else prepin)
                manager.snapshots.start_periodic(lambda: manager.lifecycle.accepting)
            try:
                yield state
            finally:
                if manager is not None:
                    manager.snapshots.stop()

    app.router.lifespan_context = lifespan
