"""docker/Dockerfile cannot be built here: check what it copies exists and run what it
runs, the same commands, against an upstream tree outside Docker."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys

import pytest

from habuild.assemble import REPO
from tests.habuild.test_assemble import extract_site
from tests.utils import ON_CUDA

pytestmark = pytest.mark.skipif(ON_CUDA, reason="needs the upstream wheel (CPU/CI host)")

DOCKERFILE = REPO / "docker" / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    out = []
    for line in DOCKERFILE.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_based_on_upstream_image_with_upstream_entrypoint():
    ops = instructions()
    assert ("ARG", "VLLM_IMAGE=vllm/vllm-openai:v0.26.0") in ops
    assert ("FROM", "${VLLM_IMAGE}") in ops
    entry = [rest for op, rest in ops if op == "ENTRYPOINT"]
    assert entry and json.loads(entry[-1]) == ["vllm", "serve"]


def test_everything_copied_exists():
    copies = [shlex.split(rest) for op, rest in instructions() if op == "COPY"]
    assert copies
    for *sources, _dest in copies:
        for src in sources:
            assert (REPO / src).exists(), f"Dockerfile copies {src}, which is not in the repo"


def test_run_steps_work_on_an_upstream_tree(upstream_wheel, tmp_path):
    # Lay out /opt/vllm-ha as the COPY lines do, under tmp_path.
    root = tmp_path / "root"
    for op, rest in instructions():
        if op != "COPY":
            continue
        *sources, dest = shlex.split(rest)
        target = root / dest.lstrip("/")
        for src in sources:
            s = REPO / src
            if s.is_dir():
                shutil.copytree(s, target, ignore=shutil.ignore_patterns("__pycache__",
                                                                         "_build_info.py"))
            else:
                (target if dest.endswith("/") else target.parent).mkdir(parents=True,
                                                                         exist_ok=True)
                shutil.copy2(s, target / s.name if dest.endswith("/") else target)
    site = extract_site(upstream_wheel.path, tmp_path / "site")
    # The image's python3 is the one vLLM lives in; here that is this venv's.
    env = {**os.environ, "PYTHONPATH": str(site), "PIP_TARGET": str(tmp_path / "extras"),
           "PYTHON": sys.executable}
    runs = [rest for op, rest in instructions() if op == "RUN"]
    assert runs
    for cmd in runs:
        cmd = cmd.replace("/opt/vllm-ha", str(root / "opt" / "vllm-ha"))
        proc = subprocess.run(["bash", "-c", cmd], env=env, capture_output=True, text=True,
                              timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout
    assert "vllm-ha 0.26.0+ha1.cpu applied" in out
    assert "[ok     ] distribution    vLLM-HA 0.26.0+ha1.cpu" in out and "overlay" in out
    assert "vllm.entrypoints.cli.ha_check," in (
        site / "vllm" / "entrypoints" / "cli" / "main.py").read_text()
    assert (tmp_path / "extras" / "nvidia" / "nvcomp").is_dir()
