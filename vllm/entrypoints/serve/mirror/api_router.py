# SPDX-License-Identifier: Apache-2.0
"""``/mirror``: the KV mirror's state as JSON (patch 0007 attaches the router).

``GET /mirror`` answers 404 when the server runs without ``--mirror-peer``. The debug
routes (``POST /mirror/verify``, ``POST /mirror/lookup``) compare every cached block
of the primary with the standby and query the standby's prefix cache; they read every
block, so they exist only with ``VLLM_SERVER_DEV_MODE=1``, like upstream's dev routes.
"""

from __future__ import annotations

import asyncio

import vllm.envs as envs
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

REFRESH_TIMEOUT_S = 5.0

router = APIRouter()
debug_router = APIRouter()


def _supervisor(request: Request):
    client = request.app.state.engine_client
    return getattr(client, "mirror", None) if client is not None else None


def _not_mirrored() -> JSONResponse:
    return JSONResponse(status_code=404, content={
        "error": "KV mirroring is off: start the server with --mirror-peer cpu|cuda:N"})


@router.get("/mirror")
async def mirror_status(raw_request: Request, refresh: bool = False) -> JSONResponse:
    """State (starting, syncing, in_sync, down), lag, peer, transport, both engines'
    process ids and devices, counters."""
    sup = _supervisor(raw_request)
    if sup is None:
        return _not_mirrored()
    if refresh:
        try:
            # Bounded: a wedged engine must not hang the status route.
            return JSONResponse(await asyncio.wait_for(sup.refresh(), REFRESH_TIMEOUT_S))
        except Exception:
            pass  # the last known state is still worth returning
    return JSONResponse(sup.status())


class LookupRequest(BaseModel):
    prompts: list[list[int]]


@debug_router.post("/mirror/verify")
async def mirror_verify(raw_request: Request) -> JSONResponse:
    sup = _supervisor(raw_request)
    if sup is None:
        return _not_mirrored()
    try:
        return JSONResponse(await sup.verify())
    except RuntimeError as e:
        return JSONResponse(status_code=409, content={"error": str(e)})


@debug_router.post("/mirror/lookup")
async def mirror_lookup(body: LookupRequest, raw_request: Request) -> JSONResponse:
    sup = _supervisor(raw_request)
    if sup is None:
        return _not_mirrored()
    try:
        return JSONResponse(await sup.lookup(body.prompts))
    except RuntimeError as e:
        return JSONResponse(status_code=409, content={"error": str(e)})


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
    if envs.VLLM_SERVER_DEV_MODE:
        app.include_router(debug_router)
