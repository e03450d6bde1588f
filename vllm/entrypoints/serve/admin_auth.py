# SPDX-License-Identifier: Apache-2.0
"""Who may call vLLM-HA's admin routes (``/checkpoint``, ``/restore``, ``/snapshot``,
``POST /mirror/pause|resume``): ``Authorization: Bearer KEY`` where KEY is
``VLLM_HA_ADMIN_KEY`` if set, else one of the server's ``--api-key``s; a server
without either is open, like upstream's routes without ``--api-key``."""

from __future__ import annotations

from typing import Any

import vllm.envs as envs
from fastapi import Request
from vllm.entrypoints.serve.utils.server_utils import AuthenticationMiddleware

from vllm.ha import envs as ha_envs


def admin_keys(app: Any) -> list[str]:
    if key := ha_envs.admin_key():
        return [key]
    args = getattr(app.state, "args", None)
    return [k for k in (getattr(args, "api_key", None) or [envs.VLLM_API_KEY]) if k]


def authorized(request: Request) -> bool:
    # Upstream's Bearer check (hashed, constant-time), with the admin keys.
    keys = admin_keys(request.app)
    return not keys or AuthenticationMiddleware(request.app, keys).verify_token(
        request.headers)
