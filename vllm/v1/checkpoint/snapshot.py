# SPDX-License-Identifier: Apache-2.0
"""Snapshots on disk: a versioned, checksummed directory that is either whole or absent.

Layout under the configured snapshot root::

    ROOT/NAME/CURRENT -> g000007          (symlink, replaced atomically)
    ROOT/NAME/g000007/manifest.json       (written last: format, identity, files)
    ROOT/NAME/g000007/<files...>

A writer fills a fresh generation directory, fsyncs every file, writes the manifest
last, fsyncs the directory, then swaps ``CURRENT`` with a rename. A crash at any point
leaves ``CURRENT`` on the previous generation, which stays valid; the partial one has
no manifest (or is not ``CURRENT``) and is never read, and the next write removes it.
Readers verify every file's size and sha256 and the snapshot's identity (model, dtype,
block size, distribution version) before anything is loaded.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT = "vllm-ha-snapshot"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
_GEN_RE = re.compile(r"^g(\d{6})$")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


class SnapshotError(RuntimeError):
    """A snapshot that cannot be written or must not be loaded; says why."""


@dataclass(frozen=True)
class Snapshot:
    path: Path
    manifest: dict[str, Any]

    @property
    def identity(self) -> dict[str, Any]:
        return self.manifest["identity"]

    def file(self, rel: str) -> Path:
        if rel not in self.manifest["files"]:
            raise SnapshotError(f"{self.path} has no file {rel!r}")
        return self.path / rel


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SnapshotStore:
    """Writes and reads snapshots under one root; names never escape it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    def _dir(self, name: str) -> Path:
        if not _NAME_RE.match(name) or name in (".", ".."):
            raise SnapshotError(
                f"snapshot name {name!r} is outside the snapshot root {self.root}: use one "
                "path component of letters, digits, '.', '_' or '-'")
        return self.root / name

    def write(self, name: str, files: Iterable[tuple[str, bytes | Iterable[bytes]]],
              identity: dict[str, Any], ha_version: str) -> Snapshot:
        """Write a new generation of ``name`` and make it current, or leave all as was."""
        base = self._dir(name)
        base.mkdir(parents=True, exist_ok=True)
        gen = base / f"g{self._next_generation(base):06d}"
        try:
            gen.mkdir()
            entries: dict[str, dict[str, Any]] = {}
            for rel, content in files:
                if rel == MANIFEST or Path(rel).is_absolute() or ".." in Path(rel).parts:
                    raise SnapshotError(f"snapshot file name {rel!r} is not allowed")
                path = gen / rel
                path.parent.mkdir(parents=True, exist_ok=True)
                h, size = hashlib.sha256(), 0
                with open(path, "wb") as f:
                    for chunk in [content] if isinstance(content, bytes) else content:
                        f.write(chunk)
                        h.update(chunk)
                        size += len(chunk)
                    f.flush()
                    os.fsync(f.fileno())
                entries[rel] = {"size": size, "sha256": h.hexdigest()}
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "ha_version": ha_version,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "identity": identity, "files": entries,
            }
            tmp = gen / (MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, gen / MANIFEST)
            _fsync_dir(gen)
            link = base / (CURRENT + ".tmp")
            link.unlink(missing_ok=True)
            os.symlink(gen.name, link)
            os.replace(link, base / CURRENT)
            _fsync_dir(base)
        except OSError as e:
            shutil.rmtree(gen, ignore_errors=True)
            raise SnapshotError(f"writing snapshot {name!r} failed ({e}); the previous "
                                "snapshot is unchanged") from None
        except BaseException:
            shutil.rmtree(gen, ignore_errors=True)
            raise
        self._collect(base, keep=gen.name)
        return Snapshot(gen, manifest)

    def read(self, name: str, expect: dict[str, Any] | None = None,
             ha_version: str | None = None) -> Snapshot:
        """The current generation of ``name``, verified; SnapshotError says what is wrong."""
        base = self._dir(name)
        current = base / CURRENT
        if not current.is_symlink():
            raise SnapshotError(f"no snapshot {name!r} under {self.root}")
        gen = base / os.readlink(current)
        manifest_path = gen / MANIFEST
        if not manifest_path.is_file():
            raise SnapshotError(f"{gen} has no {MANIFEST}: not a complete snapshot")
        try:
            manifest = json.loads(manifest_path.read_text())
        except json.JSONDecodeError as e:
            raise SnapshotError(f"{manifest_path} is not valid JSON ({e})") from None
        if manifest.get("format") != FORMAT or manifest.get("format_version") != FORMAT_VERSION:
            raise SnapshotError(
                f"{gen} is format {manifest.get('format')!r} v{manifest.get('format_version')}; "
                f"this build reads {FORMAT} v{FORMAT_VERSION}")
        if ha_version is not None and manifest.get("ha_version") != ha_version:
            raise SnapshotError(
                f"{gen} was written by vLLM-HA {manifest.get('ha_version')}, this is "
                f"{ha_version}: take a new snapshot with this version")
        for key, want in (expect or {}).items():
            have = manifest["identity"].get(key)
            if have != want:
                raise SnapshotError(
                    f"{gen} is for {key}={have!r}, this server has {key}={want!r}")
        for rel, entry in manifest["files"].items():
            path = gen / rel
            if not path.is_file():
                raise SnapshotError(f"{path} is missing")
            size = path.stat().st_size
            if size != entry["size"]:
                raise SnapshotError(f"{path} is truncated or padded: {size} bytes, manifest "
                                    f"says {entry['size']}")
            if _sha256(path) != entry["sha256"]:
                raise SnapshotError(f"{path} is corrupt: sha256 differs from the manifest")
        return Snapshot(gen, manifest)

    @staticmethod
    def _generations(base: Path) -> list[str]:
        return sorted(p.name for p in base.iterdir() if _GEN_RE.match(p.name))

    def _next_generation(self, base: Path) -> int:
        gens = self._generations(base)
        return int(gens[-1][1:]) + 1 if gens else 1

    def _collect(self, base: Path, keep: str) -> None:
        """Remove every generation but ``keep`` (older ones and crashed partial ones)."""
        for g in self._generations(base):
            if g != keep:
                shutil.rmtree(base / g, ignore_errors=True)
