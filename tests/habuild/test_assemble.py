"""Applying the series + overlay onto an installed vLLM 0.26.0 tree (Docker image, GPU host)."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from habuild.assemble import BUILD_INFO, REPO, SITE_STATE, overlay_files
from habuild.patching import read_series
from tests.utils import ON_CUDA

pytestmark = pytest.mark.skipif(ON_CUDA, reason="needs the upstream wheel (CPU/CI host)")

CLI_MAIN = "vllm/entrypoints/cli/main.py"
_TEXT = (".py", ".json", ".txt", "METADATA", "RECORD", "WHEEL")


def extract_site(wheel: Path, dest: Path) -> Path:
    """An installed-looking upstream tree (sources and dist-info; no .so needed here)."""
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            if name.endswith(_TEXT):
                zf.extract(name, dest)
    return dest


def tree_digest(site: Path) -> dict[str, str]:
    return {p.relative_to(site).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(site.rglob("*")) if p.is_file() and "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def pristine_site(upstream_wheel, tmp_path_factory) -> Path:
    return extract_site(upstream_wheel.path, tmp_path_factory.mktemp("pristine"))


@pytest.fixture
def site(pristine_site, tmp_path) -> Path:
    return Path(shutil.copytree(pristine_site, tmp_path / "site"))


def habuild(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "habuild", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)


def test_apply_patches_and_adds_overlay_then_remove_restores_upstream(site):
    before = tree_digest(site)
    proc = habuild("apply", "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    assert "vllm.entrypoints.cli.ha_check," in (site / CLI_MAIN).read_text()
    for rel, src in overlay_files().items():
        assert (site / rel).read_bytes() == src.read_bytes(), rel
    info = (site / BUILD_INFO).read_text()
    assert "INSTALL_MODE = 'overlay'" in info and "TARGET = 'cpu'" in info
    for patch in read_series(REPO / "patches"):
        assert patch.name in info

    proc = habuild("remove", "--site", str(site))
    assert proc.returncode == 0, proc.stderr
    assert tree_digest(site) == before


def test_reapply_gives_the_same_tree(site):
    assert habuild("apply", "--site", str(site)).returncode == 0
    once = tree_digest(site)
    proc = habuild("apply", "--site", str(site))
    assert proc.returncode == 0 and "re-applying" in proc.stderr
    assert tree_digest(site) == once


def test_other_upstream_version_is_refused_and_nothing_written(site):
    version_py = site / "vllm" / "_version.py"
    version_py.write_text(version_py.read_text().replace("'0.26.0'", "'0.27.0'"))
    before = tree_digest(site)
    proc = habuild("apply", "--site", str(site))
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: {site.resolve() / 'vllm'} is vLLM 0.27.0; vLLM-HA 0.26.0+ha1 applies to "
        "vLLM 0.26.0 only: install vllm==0.26.0 first"]
    assert tree_digest(site) == before and not (site / SITE_STATE).exists()


def test_patch_that_does_not_apply_writes_nothing(site):
    main = site / CLI_MAIN
    main.write_text(main.read_text().replace("    import vllm.entrypoints.cli.launch\n",
                                             "    import vllm.entrypoints.cli.launcher\n"))
    before = tree_digest(site)
    proc = habuild("apply", "--site", str(site))
    assert proc.returncode == 1
    err = proc.stderr.strip()
    assert err.startswith("error: 0001-") and f"does not apply to {CLI_MAIN}" in err
    assert tree_digest(site) == before and not (site / SITE_STATE).exists()


def test_missing_site_names_what_to_pass(tmp_path):
    proc = habuild("apply", "--site", str(tmp_path))
    assert proc.returncode == 1
    assert "no vLLM installation under" in proc.stderr
    assert "pass the site-packages directory that holds vllm/" in proc.stderr
