"""Developer patch queue (quilt-style) over a git work dir.

    python -m habuild.patchq unpack [--wheel W] [--force]
        upstream sources -> .patchq/ as a git repo tagged v0.26.0, then one commit per
        patch in patches/series (message = the patch header)
    # edit and commit in .patchq/ (git commit --amend, rebase -i, new commits...)
    python -m habuild.patchq refresh
        every commit after the tag -> patches/NNNN-<subject>.patch + patches/series
    python -m habuild.patchq export [--out DIR]
        git format-patch against v0.26.0 for upstream contribution; each patch carries
        the overlay files its ``Overlay:`` header names, the rest go in a last commit

Only text sources enter the work dir (no .so), so it stays small and fast.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from habuild import UPSTREAM_VERSION, BuildError
from habuild.assemble import REPO, overlay_files
from habuild.patching import apply_series, parse_patch, read_series
from habuild.upstream import UpstreamWheel, detect_target, resolve_wheel

WORK = REPO / ".patchq"
TAG = f"v{UPSTREAM_VERSION}"
HEADER_KEYS = ("Subject", "Why", "Upstream-Status", "Overlay")
_TEXT_SUFFIXES = {".py", ".pyi", ".json", ".txt", ".md", ".jinja", ".yaml", ".yml", ".toml",
                  ".cfg", ".typed", ".jinja2", ".ini", ".sh"}
_GIT_ENV = {"GIT_AUTHOR_NAME": "vllm-ha", "GIT_AUTHOR_EMAIL": "vllm-ha@localhost",
            "GIT_COMMITTER_NAME": "vllm-ha", "GIT_COMMITTER_EMAIL": "vllm-ha@localhost",
            "GIT_AUTHOR_DATE": "2026-01-01T00:00:00Z",
            "GIT_COMMITTER_DATE": "2026-01-01T00:00:00Z"}


def _git_env() -> dict[str, str]:
    return {**os.environ, **_GIT_ENV}


def git(*args: str, cwd: Path = WORK, check: bool = True) -> str:
    proc = subprocess.run(["git", *args], cwd=cwd, env=_git_env(), capture_output=True,
                          text=True)
    if check and proc.returncode != 0:
        raise BuildError(f"git {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _message(header: dict[str, str]) -> str:
    if "Subject" not in header:
        raise BuildError("a patch header needs a 'Subject:' line")
    body = [f"{k}: {header[k]}" for k in HEADER_KEYS[1:] if header.get(k)]
    return header["Subject"] + "\n\n" + "\n".join(body) + "\n"


def _header_from_commit(sha: str, work: Path) -> dict[str, str]:
    subject = git("log", "-1", "--format=%s", sha, cwd=work).strip()
    body = git("log", "-1", "--format=%b", sha, cwd=work)
    header = {"Subject": subject}
    for line in body.splitlines():
        m = re.match(r"^([A-Za-z-]+):\s?(.*)$", line)
        if m and m.group(1) in HEADER_KEYS:
            header[m.group(1)] = m.group(2).strip()
    return header


def slug(subject: str) -> str:
    s = re.sub(r"[^a-z0-9]+", "-", subject.lower()).strip("-")
    return s[:50].rstrip("-")


def unpack(wheel: UpstreamWheel, work: Path = WORK, repo: Path = REPO,
           force: bool = False) -> None:
    if work.exists():
        if not force:
            raise BuildError(f"{work} exists: refresh your edits first, or pass --force")
        shutil.rmtree(work)
    wheel.check_version()
    work.mkdir(parents=True)
    with wheel.open() as zf:
        for info in zf.infolist():
            name = info.filename
            if name.startswith("vllm/") and Path(name).suffix in _TEXT_SUFFIXES:
                zf.extract(info, work)
    git("init", "-q", "-b", "upstream", cwd=work)
    git("add", "-A", cwd=work)
    git("commit", "-q", "-m", f"vLLM {UPSTREAM_VERSION} ({wheel.path.name})", cwd=work)
    git("tag", TAG, cwd=work)
    git("checkout", "-q", "-b", "series", cwd=work)

    def read(rel: str) -> str | None:
        path = work / rel
        return path.read_text() if path.is_file() else None

    for patch_path in read_series(repo / "patches"):
        result = apply_series([patch_path], read)
        for rel, content in result.files.items():
            target = work / rel
            if content is None:
                target.unlink(missing_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_text(content)
        header = parse_patch(patch_path.read_text(), patch_path.name).header
        git("add", "-A", cwd=work)
        git("commit", "-q", "-m", _message(header), cwd=work)
    print(f"patchq: {work} on branch 'series', {TAG} + "
          f"{len(read_series(repo / 'patches'))} patch commit(s)")


def _series_commits(work: Path) -> list[str]:
    out = git("rev-list", "--reverse", f"{TAG}..HEAD", cwd=work)
    return out.split()


def _diff(sha: str, work: Path) -> str:
    diff = git("diff", "--no-color", "--no-ext-diff", "--no-renames", "-U3",
               f"{sha}^", sha, cwd=work)
    # index lines change on every rebase and carry nothing patch(1) needs
    return "".join(ln for ln in diff.splitlines(keepends=True) if not ln.startswith("index "))


def render_patch(header: dict[str, str], diff: str) -> str:
    lines = [f"{k}: {header[k]}" for k in HEADER_KEYS if header.get(k)]
    return "\n".join(lines) + "\n---\n" + diff


def refresh(work: Path = WORK, repo: Path = REPO) -> list[str]:
    if not work.is_dir():
        raise BuildError(f"no work dir at {work}: run 'python -m habuild.patchq unpack'")
    patches_dir = repo / "patches"
    series = patches_dir / "series"
    old = series.read_text().split() if series.exists() else []
    names = []
    for n, sha in enumerate(_series_commits(work), start=1):
        header = _header_from_commit(sha, work)
        name = f"{n:04d}-{slug(header['Subject'])}.patch"
        (patches_dir / name).write_text(render_patch(header, _diff(sha, work)))
        names.append(name)
    for stale in set(old) - set(names):
        (patches_dir / stale).unlink(missing_ok=True)
    (patches_dir / "series").write_text("".join(n + "\n" for n in names))
    print(f"patchq: wrote {len(names)} patch(es) to {patches_dir}")
    return names


def export(out: Path, work: Path = WORK, repo: Path = REPO) -> list[Path]:
    """format-patch series, each commit carrying the overlay files it names."""
    if not work.is_dir():
        raise BuildError(f"no work dir at {work}: run 'python -m habuild.patchq unpack'")
    if git("status", "--porcelain", cwd=work).strip():
        raise BuildError(f"{work} has uncommitted changes: commit them first")
    overlay = overlay_files(repo)
    remaining = dict(overlay)
    branch = git("rev-parse", "--abbrev-ref", "HEAD", cwd=work).strip()
    commits = _series_commits(work)
    git("checkout", "-q", "-B", "ha-export", TAG, cwd=work)
    try:
        for sha in commits:
            git("cherry-pick", sha, cwd=work)
            header = _header_from_commit(sha, work)
            files = header.get("Overlay", "").split()
            for rel in files:
                if rel not in remaining:
                    raise BuildError(f"patch '{header['Subject']}' names overlay file "
                                     f"{rel}, which is not in vllm/ (or named twice)")
                _copy(remaining.pop(rel), work / rel)
            if files:
                git("add", "-A", cwd=work)
                git("commit", "-q", "--amend", "--no-edit", cwd=work)
        if remaining:
            for rel, src in remaining.items():
                _copy(src, work / rel)
            git("add", "-A", cwd=work)
            git("commit", "-q", "-m", "vllm-ha: add the remaining HA modules\n\n"
                "Why: modules the hooks above call into", cwd=work)
        out.mkdir(parents=True, exist_ok=True)
        names = git("format-patch", "-o", str(out.resolve()), TAG, cwd=work).split()
    finally:
        git("checkout", "-q", branch, cwd=work)
    print(f"patchq: exported {len(names)} patch(es) to {out}")
    return [Path(n) for n in names]


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m habuild.patchq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_unpack = sub.add_parser("unpack")
    p_unpack.add_argument("--wheel")
    p_unpack.add_argument("--force", action="store_true")
    sub.add_parser("refresh")
    p_export = sub.add_parser("export")
    p_export.add_argument("--out", default=str(REPO / "build" / "upstream-patches"))
    args = parser.parse_args(argv)
    try:
        if args.cmd == "unpack":
            wheel = Path(args.wheel) if args.wheel else resolve_wheel(detect_target())
            unpack(UpstreamWheel(wheel), force=args.force)
        elif args.cmd == "refresh":
            refresh()
        else:
            export(Path(args.out))
    except BuildError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
