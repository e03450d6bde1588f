"""Copies of the upstream wheel with one thing changed, for the build's failure paths."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from pathlib import Path


def rewrite_wheel(src: Path, dst: Path, edits: dict[str, Callable[[str], str]]) -> Path:
    """``dst`` = ``src`` with ``edits[name](text)`` applied; stored, not deflated (fast)."""
    if dst.suffix != ".whl":
        dst = dst / src.name
    dst.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            data = zin.read(info)
            for suffix, edit in edits.items():
                if info.filename.endswith(suffix):
                    data = edit(data.decode()).encode()
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
    return dst
