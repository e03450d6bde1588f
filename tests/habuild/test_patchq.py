"""The developer patch queue: unpack -> refresh round-trips; export is upstream-ready."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from habuild import patchq
from habuild.assemble import REPO
from tests.utils import ON_CUDA, have

pytestmark = [pytest.mark.skipif(ON_CUDA, reason="needs the upstream wheel (CPU/CI host)"),
              pytest.mark.skipif(not have("git"), reason="needs git")]


@pytest.fixture
def repo(tmp_path) -> Path:
    """A copy of the parts of this repo the queue reads and writes."""
    dst = tmp_path / "repo"
    for part in ("patches", "vllm"):
        shutil.copytree(REPO / part, dst / part,
                        ignore=shutil.ignore_patterns("__pycache__", "_build_info.py"))
    return dst


def _patches(repo: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((repo / "patches").iterdir())}


def test_unpack_then_refresh_reproduces_the_series(upstream_wheel, repo):
    work = repo / ".patchq"
    patchq.unpack(upstream_wheel, work=work, repo=repo)
    before = _patches(repo)
    patchq.refresh(work=work, repo=repo)
    assert _patches(repo) == before


def test_a_commit_in_the_work_dir_becomes_a_new_patch(upstream_wheel, repo):
    work = repo / ".patchq"
    patchq.unpack(upstream_wheel, work=work, repo=repo)
    target = work / "vllm" / "entrypoints" / "cli" / "types.py"
    target.write_text(target.read_text() + "\n# ha: example hook\n")
    patchq.git("commit", "-qam", "cli: example hook\n\nWhy: test\nUpstream-Status: not yet "
               "proposed", cwd=work)
    names = patchq.refresh(work=work, repo=repo)
    assert names[-1] == f"{len(names):04d}-cli-example-hook.patch"
    text = (repo / "patches" / names[-1]).read_text()
    assert text.startswith("Subject: cli: example hook\nWhy: test\n")
    assert "+# ha: example hook" in text
    assert (repo / "patches" / "series").read_text().splitlines() == names


def test_export_is_format_patch_with_overlay_files(upstream_wheel, repo, tmp_path):
    work = repo / ".patchq"
    patchq.unpack(upstream_wheel, work=work, repo=repo)
    files = patchq.export(tmp_path / "out", work=work, repo=repo)
    assert files and all(f.suffix == ".patch" for f in files)
    first = files[0].read_text()
    assert first.startswith("From ") and "Subject: [PATCH" in first
    assert "new file mode" in first and "b/vllm/ha/preflight.py" in first
    # The export applies to pristine upstream with git itself.
    clean = tmp_path / "clean"
    patchq.unpack(upstream_wheel, work=clean, repo=_empty_series_repo(tmp_path))
    proc = subprocess.run(["git", "am", "-q", *map(str, files)], cwd=clean,
                          capture_output=True, text=True, env=patchq._git_env())
    assert proc.returncode == 0, proc.stderr
    assert (clean / "vllm" / "ha" / "preflight.py").is_file()


def _empty_series_repo(tmp_path: Path) -> Path:
    r = tmp_path / "empty-repo"
    (r / "patches").mkdir(parents=True)
    (r / "patches" / "series").write_text("")
    (r / "vllm").mkdir()
    return r


def test_unpack_refuses_to_clobber_a_work_dir(upstream_wheel, repo):
    work = repo / ".patchq"
    work.mkdir()
    with pytest.raises(Exception, match="exists: refresh your edits first"):
        patchq.unpack(upstream_wheel, work=work, repo=repo)
