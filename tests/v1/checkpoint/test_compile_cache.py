"""The compile cache in a snapshot: a restored model hashes as the original, the cache
files go into a generation (linked when unchanged) and back under a fresh cache root."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from vllm.v1.checkpoint.compile_cache import (
    CacheFiles,
    compile_units,
    install_cache_files,
    original_model,
    worker_cache_info,
    write_cache_files,
)
from vllm.v1.checkpoint.snapshot import SnapshotError, SnapshotStore

IDENTITY = {"model": "tiny-llama"}
HA = "0.26.0+ha1"


def model_hash(path: Path) -> str:
    from vllm.config import ModelConfig

    return ModelConfig(model=str(path), dtype="float32", max_model_len=256).compute_hash()


def test_a_restored_model_hashes_as_the_original(tiny_model, tmp_path, monkeypatch):
    restored = tmp_path / "snap" / "model"
    shutil.copytree(tiny_model, restored)
    monkeypatch.delenv("VLLM_HA_RESTORED_MODEL", raising=False)
    original = model_hash(tiny_model)
    assert model_hash(restored) != original  # vLLM's key includes the path
    monkeypatch.setenv("VLLM_HA_RESTORED_MODEL", json.dumps([str(restored), str(tiny_model)]))
    assert model_hash(restored) == original
    assert original_model(str(restored)) == str(tiny_model)
    # Only that path is renamed: any other model keeps its own key.
    other = tmp_path / "other"
    shutil.copytree(tiny_model, other)
    assert model_hash(other) != original and original_model(str(other)) == str(other)


@pytest.fixture
def cache_root(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(root))
    return root


def fake_compile_cache(root: Path) -> tuple[Path, Path]:
    """The layout vLLM 0.26 writes: an AOT unit and a backend unit, with lock files."""
    aot = root / "torch_compile_cache" / "torch_aot_compile" / ("ab" * 32)
    (aot / "rank_0_0").mkdir(parents=True)
    (aot / "rank_0_0" / "model").write_bytes(b"aot artifact" * 100)
    (aot / "inductor_cache" / "fxgraph" / "x").mkdir(parents=True)
    (aot / "inductor_cache" / "fxgraph" / "x" / "graph").write_bytes(b"graph")
    (aot / "inductor_cache" / "locks").mkdir()
    (aot / "inductor_cache" / "locks" / "a.lock").write_bytes(b"")
    backend = root / "torch_compile_cache" / "0123456789"
    (backend / "rank_0_0" / "backbone").mkdir(parents=True)
    (backend / "rank_0_0" / "backbone" / "vllm_compile_cache.py").write_text("{}")
    infos = root / "modelinfos"
    infos.mkdir()
    (infos / "vllm-model_executor-models-llama-LlamaForCausalLM.json").write_text('{"x": 1}')
    return aot, backend


def test_units_are_the_vllm_keyed_directories_only(cache_root, tmp_path):
    aot, backend = fake_compile_cache(cache_root)
    units = compile_units([str(backend), str(aot), str(backend / "rank_0_0" / "backbone"),
                           str(tmp_path / "elsewhere"), "", None])
    assert units == ["0123456789", f"torch_aot_compile/{aot.name}"]


def test_a_cuda_worker_reports_its_aot_unit(cache_root, monkeypatch):
    """On CUDA the compilation config names only the backend's directory once the
    graph is compiled; the AOT unit is where vLLM pointed inductor's cache."""
    from vllm.config import CompilationConfig

    aot, backend = fake_compile_cache(cache_root)
    cc = CompilationConfig()
    cc.cache_dir = cc.local_cache_dir = str(backend / "rank_0_0" / "backbone")
    worker = SimpleNamespace(vllm_config=SimpleNamespace(compilation_config=cc))
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(aot / "inductor_cache"))
    assert worker_cache_info(worker)["compile_units"] == [
        "0123456789", f"torch_aot_compile/{aot.name}"]
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert worker_cache_info(worker)["compile_units"] == ["0123456789"]


def test_cache_files_round_trip_through_a_snapshot(cache_root, tmp_path, monkeypatch):
    aot, backend = fake_compile_cache(cache_root)
    plan = cache_root / "startup_plan" / "startup_plan_0f.json"
    plan.parent.mkdir(parents=True)
    plan.write_text('{"schema": 1}')
    cache = CacheFiles.of(compile_units([str(aot), str(backend)]), [str(plan), None])
    assert not any("locks" in rel for rel in cache.files), cache.files
    assert cache.plans == 1 and len(cache.files) == 5
    assert "modelinfo/vllm-model_executor-models-llama-LlamaForCausalLM.json" in cache.files

    store = SnapshotStore(tmp_path / "snaps")
    w = store.begin("s")
    first = write_cache_files(w, cache)
    w.commit(IDENTITY, HA)
    assert first["written"] == 5 and first["linked"] == 0 and first["model_infos"] == 1
    # Unchanged files are linked by the next generation; a changed one is written.
    (backend / "rank_0_0" / "backbone" / "vllm_compile_cache.py").write_text("{1: 2}")
    w = store.begin("s")
    second = write_cache_files(w, CacheFiles.of(cache.units, [str(plan)]))
    snap = w.commit(IDENTITY, HA)
    assert second["linked"] == 4 and second["written"] == 1
    snap = store.read("s")  # every checksum

    # A fresh node: an empty cache root gets every file, byte-identical.
    monkeypatch.setenv("VLLM_CACHE_ROOT", str(tmp_path / "fresh"))
    names = list(snap.manifest["files"])
    assert install_cache_files(snap.path, names) == {"installed": 5, "kept": 0}
    fresh = tmp_path / "fresh"
    got = fresh / "torch_compile_cache" / "torch_aot_compile" / aot.name / "rank_0_0" / "model"
    assert got.read_bytes() == (aot / "rank_0_0" / "model").read_bytes()
    assert (fresh / "startup_plan" / plan.name).read_text() == plan.read_text()
    assert (fresh / "modelinfos" / "vllm-model_executor-models-llama-LlamaForCausalLM.json"
            ).read_text() == '{"x": 1}'
    assert (fresh / "torch_compile_cache" / "0123456789" / "rank_0_0" / "backbone" /
            "vllm_compile_cache.py").read_text() == "{1: 2}"
    # A file already there is never overwritten.
    got.write_bytes(b"local")
    assert install_cache_files(snap.path, names) == {"installed": 0, "kept": 5}
    assert got.read_bytes() == b"local"


@pytest.mark.parametrize("rel", ["compile/../../outside", "/etc/x", "plan/sub/startup_plan_1.json",
                                 "plan/bashrc", "modelinfo/sub/x.json", "modelinfo/bashrc"])
def test_install_refuses_names_outside_the_cache(cache_root, tmp_path, rel):
    (tmp_path / "snap").mkdir()
    with pytest.raises(SnapshotError):
        install_cache_files(tmp_path / "snap", [rel])
    assert not cache_root.exists() or not any(cache_root.rglob("*"))
