"""The installed `vllm` is this distribution: upstream 0.26.0 + our series + our modules."""

from __future__ import annotations

import importlib.metadata
import subprocess
from pathlib import Path

import pytest

import vllm
from habuild.assemble import overlay_files
from habuild.patching import read_series
from tests.utils import REPO, child_env, vllm_cli
from vllm.ha.version import build_info

INSTALLED = Path(vllm.__file__).resolve().parent.parent
INFO = build_info()


def test_build_info_names_upstream_and_the_series():
    assert INFO is not None, "vllm/ha/_build_info.py missing: not a vLLM-HA build"
    assert INFO.upstream_version == vllm.__version__ == "0.26.0"
    assert list(INFO.patches) == [p.name for p in read_series(REPO / "patches")]
    assert INFO.ha_version.startswith("0.26.0+ha1")


@pytest.mark.skipif(INFO is None or INFO.install_mode != "wheel", reason="built as a wheel")
def test_distribution_metadata_is_the_ha_wheel():
    dist = importlib.metadata.distribution("vllm")
    assert dist.version == INFO.ha_version
    assert dist.version == "0.26.0+ha1" + (".cpu" if INFO.target == "cpu" else "")
    requires = dist.requires or []
    assert any(r.startswith("torch==2.11.0") and "+cpu" not in r for r in requires)
    extras = dist.metadata.get_all("Provides-Extra") or []
    assert {"nixl", "nvcomp"} <= set(extras)
    assert dist.entry_points.select(group="console_scripts", name="vllm")


def test_overlay_is_installed_byte_for_byte():
    for rel, src in overlay_files().items():
        assert (INSTALLED / rel).read_bytes() == src.read_bytes(), rel


def test_series_hooks_are_in_the_installed_tree():
    main = (INSTALLED / "vllm/entrypoints/cli/main.py").read_text()
    assert "vllm.entrypoints.cli.ha_check," in main


def test_vllm_version_prints_the_distribution_version():
    proc = subprocess.run([*vllm_cli(), "--version"], capture_output=True, text=True,
                          env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().splitlines()[-1] == importlib.metadata.version("vllm")


def test_vllm_serve_help_keeps_upstream_flags():
    proc = subprocess.run([*vllm_cli(), "serve", "--help=all"], capture_output=True,
                          text=True, env=child_env(), timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for flag in ("--enable-prefix-caching", "--kv-transfer-config", "--block-size",
                 "--max-model-len", "--enforce-eager"):
        assert flag in proc.stdout, flag


def test_vllm_help_lists_ha_check():
    proc = subprocess.run([*vllm_cli(), "--help"], capture_output=True, text=True,
                          env=child_env(), timeout=300)
    assert proc.returncode == 0 and "ha-check" in proc.stdout
