# SPDX-License-Identifier: Apache-2.0
"""What this vLLM-HA build is: read from ``_build_info.py``, written at build time."""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True)
class BuildInfo:
    ha_version: str
    upstream_version: str
    upstream_dist: str
    target: str
    install_mode: str
    patches: tuple[str, ...]
    upstream_wheel: str | None
    upstream_sha256: str | None


def build_info() -> BuildInfo | None:
    """None when this tree was not assembled by habuild (e.g. a plain checkout)."""
    try:
        mod = importlib.import_module("vllm.ha._build_info")
    except ImportError:
        return None
    return BuildInfo(
        ha_version=mod.HA_VERSION,
        upstream_version=mod.UPSTREAM_VERSION,
        upstream_dist=mod.UPSTREAM_DIST,
        target=mod.TARGET,
        install_mode=mod.INSTALL_MODE,
        patches=tuple(mod.PATCHES),
        upstream_wheel=mod.UPSTREAM_WHEEL,
        upstream_sha256=mod.UPSTREAM_SHA256,
    )
