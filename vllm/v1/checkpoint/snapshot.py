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

import contextlib
import datetime
import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

FORMAT = "vllm-ha-snapshot"
FORMAT_VERSION = 2  # 2: KV in segments (kv/blocks.json 'segments')
MANIFEST = "manifest.json"
CURRENT = "CURRENT"
# Files are checksummed in pieces: a reader verifies them in parallel (sha256 runs at
# ~1-2 GB/s per core; one 16 GB stream would take longer than the restore itself).
PIECE_BYTES = 64 << 20
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

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta") or {}

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


class PieceHasher:
    """sha256 of every PIECE_BYTES piece of a stream written in any chunk sizes."""

    def __init__(self) -> None:
        self.size = 0
        self._pieces: list[str] = []
        self._h = hashlib.sha256()
        self._in_piece = 0

    def update(self, data: bytes | memoryview) -> None:
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), PIECE_BYTES - self._in_piece)
            self._h.update(view[:take])
            self._in_piece += take
            self.size += take
            view = view[take:]
            if self._in_piece == PIECE_BYTES:
                self._pieces.append(self._h.hexdigest())
                self._h, self._in_piece = hashlib.sha256(), 0

    def entry(self) -> dict[str, Any]:
        pieces = list(self._pieces)
        if self._in_piece or not pieces:
            pieces.append(self._h.hexdigest())
        return {"size": self.size, "sha256": pieces}


def file_chunks(f: BinaryIO) -> Iterator[bytes]:
    """An open file's bytes, 8 MiB at a time (what write_file takes as content)."""
    return iter(lambda: f.read(8 << 20), b"")


def file_entry(path: Path) -> dict[str, Any]:
    """The manifest entry (size, piece checksums) of a file already on disk."""
    hasher = PieceHasher()
    with open(path, "rb") as f:
        for chunk in file_chunks(f):
            hasher.update(chunk)
    return hasher.entry()


def write_file(path: Path, content: bytes | Iterable[bytes]) -> dict[str, Any]:
    """Write, fsync and checksum one file; its manifest entry."""
    hasher = PieceHasher()
    with open(path, "wb") as f:
        for chunk in [content] if isinstance(content, (bytes, memoryview)) else content:
            f.write(chunk)
            hasher.update(chunk)
        f.flush()
        os.fsync(f.fileno())
    return hasher.entry()


def _piece_ok(path: Path, index: int, want: str) -> bool:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        f.seek(index * PIECE_BYTES)
        left = PIECE_BYTES
        while left:
            data = f.read(min(left, 8 << 20))
            if not data:
                break
            h.update(data)
            left -= len(data)
    return h.hexdigest() == want


def check_name(rel: str) -> None:
    p = Path(rel)
    if rel == MANIFEST or not rel or p.is_absolute() or ".." in p.parts:
        raise SnapshotError(f"snapshot file name {rel!r} is not allowed")


class SnapshotWriter:
    """One generation being written: nothing is visible before :meth:`commit`.

    Files come from this process (:meth:`write_file`), from another process that wrote
    and fsynced them into :attr:`path` and reports their entries (:meth:`add`: the
    engine's workers), or unchanged from the current generation (:meth:`link`: a hard
    link, so a periodic snapshot copies only what changed).
    """

    def __init__(self, store: SnapshotStore, name: str, base: Path, path: Path,
                 previous: Snapshot | None) -> None:
        self.store, self.name, self.base, self.path = store, name, base, path
        self.previous = previous
        self.files: dict[str, dict[str, Any]] = {}
        self.linked_bytes = 0

    def target(self, rel: str) -> Path:
        check_name(rel)
        path = self.path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def write_file(self, rel: str, content: bytes | Iterable[bytes]) -> dict[str, Any]:
        entry = self.files[rel] = write_file(self.target(rel), content)
        return entry

    def add(self, rel: str, entry: dict[str, Any]) -> None:
        check_name(rel)
        self.files[rel] = entry

    def can_link(self, rel: str) -> bool:
        return self.previous is not None and rel in self.previous.manifest["files"]

    def link(self, rel: str) -> dict[str, Any]:
        assert self.previous is not None
        os.link(self.previous.path / rel, self.target(rel))
        entry = self.files[rel] = dict(self.previous.manifest["files"][rel])
        self.linked_bytes += entry["size"]
        return entry

    def commit(self, identity: dict[str, Any], ha_version: str,
               meta: dict[str, Any] | None = None) -> Snapshot:
        """Manifest last, then swap ``CURRENT``: the snapshot is whole or absent."""
        with self.undo_on_failure():
            for rel, entry in self.files.items():
                if not (self.path / rel).is_file():
                    raise SnapshotError(f"{rel} was announced but not written")
            manifest = {
                "format": FORMAT, "format_version": FORMAT_VERSION, "ha_version": ha_version,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(
                    timespec="seconds"),
                "identity": identity, "meta": meta or {}, "files": self.files,
                "piece_bytes": PIECE_BYTES,
            }
            for d in sorted({(self.path / rel).parent for rel in self.files}, reverse=True):
                _fsync_dir(d)
            tmp = self.path / (MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump(manifest, f, indent=1, sort_keys=True)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path / MANIFEST)
            _fsync_dir(self.path)
            link = self.base / (CURRENT + ".tmp")
            link.unlink(missing_ok=True)
            os.symlink(self.path.name, link)
            os.replace(link, self.base / CURRENT)
            _fsync_dir(self.base)
        self.store._collect(self.base, keep=self.path.name)
        return Snapshot(self.path, manifest)

    def abort(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)

    @contextlib.contextmanager
    def undo_on_failure(self):
        """Any failure removes this generation; an OSError (a full disk, a lost
        mount) becomes a SnapshotError saying the previous snapshot is unchanged."""
        try:
            yield
        except OSError as e:
            self.abort()
            raise SnapshotError(f"writing snapshot {self.name!r} failed ({e}); the previous "
                                "snapshot is unchanged") from None
        except BaseException:
            self.abort()
            raise


class SnapshotStore:
    """Writes and reads snapshots under one root; names never escape it."""

    def __init__(self, root: str | os.PathLike) -> None:
        self.root = Path(root).resolve()

    @classmethod
    def at(cls, directory: str | os.PathLike) -> tuple[SnapshotStore, str]:
        """The store and name of a snapshot directory (``ROOT/NAME``)."""
        path = Path(directory).resolve()
        return cls(path.parent), path.name

    def check_name(self, name: str) -> None:
        self._dir(name)

    def _dir(self, name: str) -> Path:
        if not _NAME_RE.match(name) or name in (".", ".."):
            raise SnapshotError(
                f"snapshot name {name!r} is outside the snapshot root {self.root}: use one "
                "path component of letters, digits, '.', '_' or '-'")
        return self.root / name

    def begin(self, name: str) -> SnapshotWriter:
        """A fresh generation of ``name`` to fill (the current one stays current)."""
        base = self._dir(name)
        try:
            base.mkdir(parents=True, exist_ok=True)
            previous = None
            if (base / CURRENT).is_symlink():
                try:
                    previous = self._manifest(base)
                except SnapshotError:
                    previous = None  # a damaged current generation is never linked from
            gen = base / f"g{self._next_generation(base):06d}"
            gen.mkdir()
        except OSError as e:
            raise SnapshotError(f"cannot write snapshot {name!r} under {self.root}: {e}"
                                ) from None
        return SnapshotWriter(self, name, base, gen, previous)

    def write(self, name: str, files: Iterable[tuple[str, bytes | Iterable[bytes]]],
              identity: dict[str, Any], ha_version: str,
              meta: dict[str, Any] | None = None) -> Snapshot:
        """Write a new generation of ``name`` and make it current, or leave all as was."""
        writer = self.begin(name)
        with writer.undo_on_failure():
            for rel, content in files:
                writer.write_file(rel, content)
        return writer.commit(identity, ha_version, meta)

    def _manifest(self, base: Path) -> Snapshot:
        gen = base / os.readlink(base / CURRENT)
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
        return Snapshot(gen, manifest)

    def read(self, name: str, expect: dict[str, Any] | None = None,
             ha_version: str | None = None, verify: bool = True) -> Snapshot:
        """The current generation of ``name``, verified; SnapshotError says what is wrong."""
        base = self._dir(name)
        if not (base / CURRENT).is_symlink():
            raise SnapshotError(f"no snapshot {name!r} under {self.root}")
        snap = self._manifest(base)
        gen, manifest = snap.path, snap.manifest
        if ha_version is not None and manifest.get("ha_version") != ha_version:
            raise SnapshotError(
                f"{gen} was written by vLLM-HA {manifest.get('ha_version')}, this is "
                f"{ha_version}: take a new snapshot with this version")
        for key, want in (expect or {}).items():
            have = manifest["identity"].get(key)
            if have != want:
                raise SnapshotError(
                    f"{gen} is for {key}={have!r}, this server has {key}={want!r}")
        if verify:
            self.verify(snap)
        return snap

    @staticmethod
    def verify(snap: Snapshot, workers: int | None = None,
               only: Iterable[str] | None = None) -> None:
        """Every file's size and every piece's sha256 (``only``: of these files),
        pieces hashed in parallel (hashlib releases the GIL)."""
        piece = snap.manifest.get("piece_bytes", PIECE_BYTES)
        if piece != PIECE_BYTES:
            raise SnapshotError(f"{snap.path}: pieces of {piece} bytes, this build "
                                f"reads {PIECE_BYTES}")
        jobs = []
        files = snap.manifest["files"]
        for rel in (files if only is None else only):
            entry = files[rel]
            path = snap.path / rel
            if not path.is_file():
                raise SnapshotError(f"{path} is missing")
            size = path.stat().st_size
            if size != entry["size"]:
                raise SnapshotError(f"{path} is truncated or padded: {size} bytes, manifest "
                                    f"says {entry['size']}")
            jobs += [(path, i, h) for i, h in enumerate(entry["sha256"])]
        workers = workers or min(16, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            for (path, _, _), ok in zip(jobs, pool.map(lambda j: _piece_ok(*j), jobs)):
                if not ok:
                    raise SnapshotError(
                        f"{path} is corrupt: sha256 differs from the manifest")

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
