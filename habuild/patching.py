"""Strict unified-diff application: exact context, no fuzz, no external tools.

The series is applied in memory first and written only when every hunk of every
patch has matched, so a failed build or apply leaves nothing half-patched. A hunk
that matches only at another line (an offset) still applies, but is reported:
patch hygiene wants offset 0, and ``python -m habuild check`` fails on offsets.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from habuild import BuildError

_HUNK_RE = re.compile(r"^@@ -(\d+)(?:,(\d+))? \+(\d+)(?:,(\d+))? @@")
DEV_NULL = "/dev/null"


class PatchError(BuildError):
    """A patch that does not apply; names the patch, the file and the hunk."""


@dataclass
class Hunk:
    header: str
    old_start: int
    old_lines: list[str] = field(default_factory=list)
    new_lines: list[str] = field(default_factory=list)


@dataclass
class FilePatch:
    old_path: str | None  # None: the patch creates the file
    new_path: str | None  # None: the patch deletes the file
    hunks: list[Hunk] = field(default_factory=list)

    @property
    def path(self) -> str:
        path = self.new_path or self.old_path
        assert path is not None
        return path


@dataclass
class Patch:
    name: str
    header: dict[str, str]
    files: list[FilePatch]


@dataclass
class AppliedHunk:
    patch: str
    path: str
    header: str
    offset: int


def _strip_prefix(path: str) -> str | None:
    path = path.split("\t", 1)[0].strip()
    if path == DEV_NULL:
        return None
    if path.startswith(("a/", "b/")):
        return path[2:]
    return path


def _parse_header(lines: list[str]) -> dict[str, str]:
    """DEP-3 style ``Key: value`` fields before the first diff line."""
    header: dict[str, str] = {}
    key = None
    for line in lines:
        m = re.match(r"^([A-Za-z][A-Za-z-]*):\s?(.*)$", line)
        if m:
            key = m.group(1)
            header[key] = m.group(2).rstrip()
        elif key and line.startswith((" ", "\t")) and line.strip():
            header[key] += " " + line.strip()
    return header


def parse_patch(text: str, name: str) -> Patch:
    lines = text.splitlines(keepends=True)
    files: list[FilePatch] = []
    header_lines: list[str] = []
    i = 0
    current: FilePatch | None = None
    while i < len(lines):
        line = lines[i]
        if line.startswith("--- ") and i + 1 < len(lines) and lines[i + 1].startswith("+++ "):
            current = FilePatch(_strip_prefix(line[4:]), _strip_prefix(lines[i + 1][4:]))
            files.append(current)
            i += 2
            continue
        m = _HUNK_RE.match(line)
        if m and current is not None:
            old_count = int(m.group(2)) if m.group(2) is not None else 1
            new_count = int(m.group(4)) if m.group(4) is not None else 1
            hunk = Hunk(line.rstrip("\n"), int(m.group(1)))
            i += 1
            seen_old = seen_new = 0
            while i < len(lines) and (seen_old < old_count or seen_new < new_count):
                body = lines[i]
                tag, content = body[:1], body[1:]
                if body.startswith("\\"):  # "\ No newline at end of file"
                    i += 1
                    continue
                if tag not in (" ", "-", "+"):
                    if body in ("\n", "\r\n"):  # an empty context line stripped by an editor
                        tag, content = " ", body
                    else:
                        raise PatchError(
                            f"{name}: malformed hunk {hunk.header} in {current.path}: "
                            f"unexpected line {body.rstrip()!r}"
                        )
                no_eol = i + 1 < len(lines) and lines[i + 1].startswith("\\")
                if no_eol:
                    content = content.rstrip("\n")
                if tag in (" ", "-"):
                    hunk.old_lines.append(content)
                    seen_old += 1
                if tag in (" ", "+"):
                    hunk.new_lines.append(content)
                    seen_new += 1
                i += 1
            if seen_old != old_count or seen_new != new_count:
                raise PatchError(f"{name}: truncated hunk {hunk.header} in {current.path}")
            current.hunks.append(hunk)
            continue
        if not files:
            header_lines.append(line)
        i += 1
    if not files:
        raise PatchError(f"{name}: no file changes found (is it a unified diff?)")
    return Patch(name, _parse_header(header_lines), files)


def _find(lines: list[str], needle: list[str], expected: int) -> int | None:
    """Position of ``needle`` in ``lines``, preferring ``expected``, then the nearest."""
    if not needle:
        return min(max(expected, 0), len(lines))
    limit = len(lines) - len(needle)
    for delta in range(0, max(limit, 0) + abs(expected) + 1):
        for pos in (expected - delta, expected + delta) if delta else (expected,):
            if 0 <= pos <= limit and lines[pos : pos + len(needle)] == needle:
                return pos
    return None


def apply_file_patch(
    patch_name: str, fp: FilePatch, original: str | None
) -> tuple[str | None, list[AppliedHunk]]:
    """New content of one file (None: deleted), or PatchError."""
    if fp.old_path is None:
        if original is not None:
            raise PatchError(f"{patch_name}: creates {fp.path}, which already exists")
        lines: list[str] = []
    else:
        if original is None:
            raise PatchError(f"{patch_name}: {fp.path} not found in the upstream tree")
        lines = original.splitlines(keepends=True)
    applied: list[AppliedHunk] = []
    shift = 0  # lines added minus removed by earlier hunks of this file
    for hunk in fp.hunks:
        expected = max(hunk.old_start - 1, 0) + shift
        if not hunk.old_lines:
            expected = hunk.old_start + shift  # pure insertion after line old_start
        pos = _find(lines, hunk.old_lines, expected)
        if pos is None:
            raise PatchError(
                f"{patch_name}: hunk {hunk.header} does not apply to {fp.path}: "
                f"{_first_mismatch(lines, hunk, expected, shift)}"
            )
        lines[pos : pos + len(hunk.old_lines)] = hunk.new_lines
        shift += len(hunk.new_lines) - len(hunk.old_lines)
        applied.append(AppliedHunk(patch_name, fp.path, hunk.header, pos - expected))
    if fp.new_path is None:
        if lines:
            raise PatchError(f"{patch_name}: deletes {fp.path} but content remains")
        return None, applied
    return "".join(lines), applied


def _first_mismatch(lines: list[str], hunk: Hunk, expected: int, shift: int) -> str:
    """The first differing line, numbered as in the unpatched file (``shift``: lines
    that earlier hunks of this patch added)."""
    for k, want in enumerate(hunk.old_lines):
        have = lines[expected + k] if 0 <= expected + k < len(lines) else "<end of file>"
        if have != want:
            return (f"line {expected + k + 1 - shift} is {have.rstrip()!r}, "
                    f"expected {want.rstrip()!r}")
    return "context not found"


@dataclass
class SeriesResult:
    """Files the series changes (path -> new content, None = deleted) and how."""

    files: dict[str, str | None]
    originals: dict[str, str | None]
    hunks: list[AppliedHunk]
    patches: list[str]

    @property
    def offsets(self) -> list[AppliedHunk]:
        return [h for h in self.hunks if h.offset]


def read_series(patches_dir: Path) -> list[Path]:
    series = patches_dir / "series"
    if not series.is_file():
        raise BuildError(f"{series} is missing: the patch queue needs a series file")
    names = [
        ln.split("#", 1)[0].strip()
        for ln in series.read_text().splitlines()
    ]
    paths = [patches_dir / n for n in names if n]
    for p in paths:
        if not p.is_file():
            raise BuildError(f"{series} names {p.name}, which is not in {patches_dir}")
    return paths


def apply_series(
    patches: Iterable[Path], read: Callable[[str], str | None]
) -> SeriesResult:
    """Apply ``patches`` in order to the tree ``read(path)`` gives, in memory."""
    files: dict[str, str | None] = {}
    originals: dict[str, str | None] = {}
    hunks: list[AppliedHunk] = []
    names: list[str] = []
    for path in patches:
        patch = parse_patch(path.read_text(), path.name)
        names.append(path.name)
        for fp in patch.files:
            key = fp.old_path or fp.path
            if key not in files:
                originals[key] = read(key)
                current = originals[key]
            else:
                current = files[key]
            new, applied = apply_file_patch(path.name, fp, current)
            files[fp.path] = new
            if fp.new_path and fp.old_path and fp.new_path != fp.old_path:
                files[fp.old_path] = None
            hunks.extend(applied)
    return SeriesResult(files, originals, hunks, names)
