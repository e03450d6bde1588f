"""Choosing the upstream wheel and deriving the distribution's metadata from it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

from habuild import BuildError, ha_version
from habuild.assemble import REPO
from habuild.metadata import dist_metadata
from habuild.upstream import ENV_TARGET, Target, detect_target
from tests.utils import ON_CUDA

pytestmark = pytest.mark.skipif(ON_CUDA, reason="needs the upstream wheel (CPU/CI host)")


def test_target_env_overrides_detection():
    assert detect_target({ENV_TARGET: "cuda"}) is Target.CUDA
    assert detect_target({ENV_TARGET: " CPU "}) is Target.CPU
    with pytest.raises(BuildError, match="'rocm' is not a known target"):
        detect_target({ENV_TARGET: "rocm"})


def test_detection_picks_cpu_without_an_nvidia_driver():
    if os.path.exists("/proc/driver/nvidia/version") or shutil.which("nvidia-smi"):
        pytest.skip("this machine has an NVIDIA driver")
    assert detect_target({}) is Target.CPU


def test_versions_per_target():
    assert ha_version("cuda") == "0.26.0+ha1"
    assert ha_version("cpu") == "0.26.0+ha1.cpu"


def test_cpu_metadata_keeps_upstream_requirements_with_installable_torch(upstream_wheel):
    meta = dist_metadata(upstream_wheel, Target.CPU)
    names = [r.split(";")[0] for r in meta.install_requires]
    assert "torch==2.11.0" in names and not any("+cpu" in r for r in meta.install_requires)
    assert not any(n.startswith(("torchvision", "torchaudio", "torchcodec")) for n in names)
    assert "fastapi[standard]<0.137.0,>=0.133.0" in names and "pyzmq>=25.0.0" in names
    assert meta.extras_require["nixl"] == ["nixl==1.5.1"]
    assert meta.extras_require["nvcomp"] == ["nvidia-nvcomp-cu13==6.0.0.12"]
    assert meta.extras_require["bench"][0] == "pandas"
    assert meta.entry_points["console_scripts"] == ["vllm = vllm.entrypoints.cli.main:main"]
    assert meta.python_requires == "<3.15,>=3.10"


def test_offline_wheel_build_from_a_local_upstream_wheel(upstream_wheel, tmp_path):
    local = shutil.copy(upstream_wheel.path, tmp_path / upstream_wheel.path.name)
    out = tmp_path / "dist"
    env = {**os.environ, "VLLM_HA_TARGET": "cpu", "VLLM_HA_UPSTREAM_WHEEL": str(local),
           "VLLM_HA_CACHE": str(tmp_path / "empty-cache"), "PIP_NO_INDEX": "1",
           "PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps",
                           "--no-build-isolation", "-w", str(out), str(REPO)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wheel = out / "vllm-0.26.0+ha1.cpu-cp38-abi3-manylinux_2_28_x86_64.whl"
    assert wheel.is_file(), list(out.iterdir())
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        info = zf.read("vllm/ha/_build_info.py").decode()
        meta = zf.read("vllm-0.26.0+ha1.cpu.dist-info/METADATA").decode()
    assert {"vllm/_C.abi3.so", "vllm/ha/preflight.py", "vllm/entrypoints/cli/ha_check.py"} <= names
    assert f"UPSTREAM_WHEEL = '{upstream_wheel.path.name}'" in info
    assert "Name: vllm\n" in meta and "Requires-Dist: torch==2.11.0" in meta
