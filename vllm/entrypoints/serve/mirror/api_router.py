# SPDX-License-Identifier: Apache-2.0
"""``/mirror``: the KV mirror's state as JSON (patch 0007 attaches the router).

``GET /mirror`` answers 404 when the server runs without ``--mirror-peer``.
``POST /mirror/pause`` stops mirroring and keeps the standby running (the server is
unprotected meanwhile: an engine death is fatal, as without a mirror;
``{"stop_standby": true}`` stops the standby too);
``POST /mirror/resume`` reconnects it, and it catches up from the prefix cache. Both
need the admin key (:mod:`vllm.entrypoints.serve.admin_auth`) and answer the status. With the
mirror on, ``GET /health`` carries the mirror's state in its body, and with
``--mirror-required`` it answers 503 and generation requests are refused with 503
while no standby is connected. The debug
routes (``POST /mirror/verify``, ``POST /mirror/lookup``) compare every cached block
of the primary with the standby and query the standby's prefix cache; they read every
block, so they exist only with ``VLLM_SERVER_DEV_MODE=1``, like upstream's dev routes.
"""

from __future__ import annotations

import asyncio
from typing import Any

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


async def _set_paused(raw_request: Request, paused: bool,
                      release_standby: bool = False) -> JSONResponse:
    from vllm.entrypoints.serve.admin_auth import authorized
    from vllm.v1.engine.mirror_supervisor import MirrorCallError

    if not authorized(raw_request):
        return JSONResponse(status_code=401, content={
            "error": "Unauthorized: /mirror/pause and /mirror/resume need the admin key "
                     "(VLLM_HA_ADMIN_KEY) or the server's API key as a Bearer token"})
    sup = _supervisor(raw_request)
    if sup is None:
        return _not_mirrored()
    try:
        return JSONResponse(await sup.set_paused(paused, release_standby))
    except MirrorCallError as e:
        return JSONResponse(status_code=e.status, content={"error": str(e)})


class PauseRequest(BaseModel):
    stop_standby: bool = False
    """Also stop the standby (its memory is freed; a new one starts on resume)."""


@router.post("/mirror/pause")
async def mirror_pause(raw_request: Request, body: PauseRequest | None = None
                       ) -> JSONResponse:
    return await _set_paused(raw_request, True, body is not None and body.stop_standby)


@router.post("/mirror/resume")
async def mirror_resume(raw_request: Request) -> JSONResponse:
    return await _set_paused(raw_request, False)


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


# Routes that start generation (or pooling) work: refused while unprotected when the
# mirror is required. Admin, metrics, tokenizer and model-list routes stay open.
GENERATION_PREFIXES = (
    "/v1/completions", "/v1/chat/completions", "/v1/responses", "/v1/messages",
    "/v1/embeddings", "/v1/audio", "/v1/score", "/v1/rerank", "/v2/rerank", "/pooling",
    "/classify", "/score", "/rerank", "/inference", "/generate", "/invocations",
)
# Under those prefixes, but computing nothing on the engine.
NON_GENERATION_SUFFIXES = ("/render", "/derender", "/count_tokens")
HEALTH_PATHS = ("/health", "/ping")


def _generation(path: str) -> bool:
    return path.startswith(GENERATION_PREFIXES) and not path.endswith(NON_GENERATION_SUFFIXES)


def _unprotected_error(sup) -> JSONResponse:
    return JSONResponse(status_code=503, headers={"Retry-After": "5"}, content={
        "error": {"message": f"unprotected: the standby engine is {sup.state.state} and "
                             "this server runs with --mirror-required",
                  "type": "ServiceUnavailable", "code": 503}})


def _health(sup) -> JSONResponse:
    return JSONResponse(status_code=503 if sup.refusing else 200, content={
        "status": "unprotected" if sup.refusing else "ok",
        "mirror": {"state": sup.state.state, "protected": sup.protected,
                   "required": sup.config.required, "last_error": sup.state.last_error}})


class MirrorPolicyMiddleware:
    """Pure ASGI (no response wrapping, so streams pass untouched): a pass-through
    unless the mirror is on; then ``/health`` reports it and, with
    ``--mirror-required``, generation is refused while unprotected."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] not in ("http", "websocket") or "app" not in scope:
            return await self.app(scope, receive, send)
        client = getattr(scope["app"].state, "engine_client", None)
        sup = getattr(client, "mirror", None)
        if sup is None:
            return await self.app(scope, receive, send)
        path = scope["path"]
        if scope["type"] == "websocket":  # realtime sessions generate too
            if sup.refusing and path.startswith("/v1/realtime"):
                sup.metrics.refused.inc()
                # Closing before accepting answers the upgrade with 403.
                return await send({"type": "websocket.close", "code": 1013,
                                   "reason": "unprotected (--mirror-required)"})
            return await self.app(scope, receive, send)
        method = scope["method"]
        if method == "POST" and sup.refusing and _generation(path):
            sup.metrics.refused.inc()
            return await _unprotected_error(sup)(scope, receive, send)
        if path in HEALTH_PATHS and method in ("GET", "POST"):
            # Upstream's answer first: a dead engine stays upstream's 503.
            sent: list[dict] = []

            async def keep(message: dict) -> None:
                sent.append(message)

            await self.app(scope, receive, keep)
            if sent and sent[0].get("status") == 200:
                return await _health(sup)(scope, receive, send)
            for message in sent:
                await send(message)
            return
        return await self.app(scope, receive, send)


def attach_router(app: FastAPI) -> None:
    app.include_router(router)
    if envs.VLLM_SERVER_DEV_MODE:
        app.include_router(debug_router)
    app.add_middleware(MirrorPolicyMiddleware)
