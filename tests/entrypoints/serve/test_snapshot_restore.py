"""Snapshots on disk end to end: a real `vllm serve` writes them, a new one starts from
them (`--restore-from`), real HTTP.

The restored server is started without the model: its configuration and tokenizer
come from the snapshot, which holds no checkpoint files, so its weights can only be
the snapshot's. Identical greedy output proves every weight byte came back; prefix
cache hits on the first request prove the KV blocks and their hashes did.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import threading
import time
from pathlib import Path

import psutil
import pytest

from tests.entrypoints.serve.test_checkpoint import (
    ADMIN_KEY,
    ARGS,
    AUTH,
    PROMPT,
    cached,
    checkpoint,
    complete,
    restore,
    status,
    tokens,
)
from tests.utils import ON_CUDA, RemoteServer, child_env, vllm_cli
from vllm.v1.checkpoint.snapshot import CURRENT, SnapshotStore

pytestmark = pytest.mark.slow

# On CUDA this module's server has written nvCOMP snapshots, after which a driver
# release is refused (409): checkpoints here stop at the offload.
KEEP_GPU = {"release_gpu": False} if ON_CUDA else {}
OTHER = "A second prompt the snapshot also keeps: " + "five six seven eight " * 10
THIRD = "A third prompt, cached only after the first snapshot: " + "nine ten eleven " * 12


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("snapshots")


@pytest.fixture(scope="module")
def server(tiny_model, root, tmp_path_factory):
    log = tmp_path_factory.mktemp("snapshot") / "serve.log"
    env = child_env(VLLM_HA_ADMIN_KEY=ADMIN_KEY)
    with RemoteServer(str(tiny_model), [*ARGS, "--snapshot-root", str(root)], log,
                      env=env) as s:
        yield s


def snapshot(server: RemoteServer, name: str, expect: int = 200) -> dict:
    r = server.post("/snapshot", {"name": name}, headers=AUTH, timeout=600)
    assert r.status_code == expect, r.text
    return r.json()


def current(root: Path, name: str) -> str:
    return os.readlink(root / name / CURRENT)


def test_snapshot_restores_into_a_new_server_without_the_model(server, root, tmp_path):
    refs = {p: tokens(complete(server, p)) for p in (PROMPT, OTHER)}
    first = snapshot(server, "s1")
    assert first["kv_blocks"] >= 2 * ((len(PROMPT.split()) // 16) or 1)
    # The serving engine paused for the copies only; the files were written after.
    assert first["written_in_background"]
    assert status(server)["snapshot"]["writing"] is None  # done: nothing in progress
    assert "writing the files while it serves" in server.log_path.read_text()
    assert first["bytes_linked"] == 0 and first["codec"] == status(server)["snapshot"][
        "last"]["codec"]
    snap = SnapshotStore(root).read("s1")  # verifies every checksum
    files = snap.manifest["files"]
    assert "model/config.json" in files and "model/tokenizer.json" in files
    assert not any(f.endswith(".safetensors") for f in files)
    # A second snapshot writes only what changed: the weights and the KV are linked.
    second = snapshot(server, "s1")
    assert second["bytes_linked"] > 0.9 * second["bytes"] and second["bytes_written"] < (
        first["bytes_written"] / 4)
    assert second["kv_blocks_written"] == 0 and second["kv_blocks"] == first["kv_blocks"]
    assert current(root, "s1") == "g000002" and not (root / "s1" / "g000001").exists()
    # New blocks only go into the third generation's own KV segment.
    refs[THIRD] = tokens(complete(server, THIRD))
    third = snapshot(server, "s1")
    assert 0 < third["kv_blocks_written"] < third["kv_blocks"], third
    files = SnapshotStore(root).read("s1").manifest["files"]
    assert "kv/g000001.rank0.bin" in files and "kv/g000003.rank0.bin" in files
    # The lost node: a new server from the snapshot alone (no model, no weights files);
    # its prefix cache comes from both segments.
    with RemoteServer("", ["--restore-from", str(root / "s1")],
                      tmp_path / "restored.log", env=child_env()) as restored:
        for p, ref in refs.items():
            out = complete(restored, p)
            assert tokens(out) == ref
            assert cached(out) >= 16, f"no prefix-cache hit after restore: {out['usage']}"
        log = restored.log_path.read_text()
        assert "verified" in log and "KV blocks restored into the prefix cache" in log


@pytest.fixture(scope="module")
def spare(tiny_model, root, tmp_path_factory):
    """A warm spare: the same engine configuration with random weights."""
    log = tmp_path_factory.mktemp("spare") / "serve.log"
    env = child_env(VLLM_HA_ADMIN_KEY=ADMIN_KEY)
    with RemoteServer(str(tiny_model), [*ARGS, "--snapshot-root", str(root),
                                        "--load-format", "dummy"], log, env=env) as s:
        yield s


def load(server: RemoteServer, name: str, expect: int = 200, **body) -> dict:
    r = server.post("/snapshot/load", {"name": name, **body}, headers=AUTH, timeout=600)
    assert r.status_code == expect, r.text
    return r.json()


def test_a_warm_spare_becomes_the_snapshotted_server(server, spare, root):
    """POST /snapshot/load: identical greedy output and prefix-cache hits in a process
    that started with random weights; bad loads change nothing, a load that fails
    mid-way serves nothing until a load succeeds."""
    refs = {p: tokens(complete(server, p)) for p in (PROMPT, OTHER)}
    snapshot(server, "lost")
    before = tokens(complete(spare, PROMPT))
    assert before != refs[PROMPT]  # random weights: the load has something to prove
    snapshot(spare, "spare-own")  # of its random weights (never to be linked after)

    # Refused before anything changes: auth, unknown name, corrupt file, requests in flight.
    assert spare.post("/snapshot/load", {"name": "lost"}).status_code == 401
    assert "no snapshot" in load(spare, "nothing-here", 400)["error"]
    shutil.copytree(root / "lost", root / "corrupt", symlinks=True)
    kv_bin = next((root / "corrupt" / current(root, "corrupt") / "kv").glob("*.bin"))
    with open(kv_bin, "r+b") as f:
        f.seek(10)
        byte = f.read(1)
        f.seek(10)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert "sha256 differs" in load(spare, "corrupt", 400)["error"]
    # Eight long requests (the tiny model decodes ~1 ms a token): in flight for seconds.
    outs: list[dict] = []
    decoding = [threading.Thread(target=lambda i=i: outs.append(complete(
        spare, f"go {i}", max_tokens=900)), daemon=True) for i in range(8)]
    for t in decoding:
        t.start()
    # Load while the first is in flight (waiting for all eight failed once on a loaded
    # 2-core CI box: the first had finished before the last arrived).
    deadline = time.monotonic() + 60
    while not status(spare)["requests_in_flight"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "in flight" in load(spare, "lost", 409)["error"]
    for t in decoding:
        t.join(300)
    assert [len(tokens(o)) for o in outs] == [900] * 8  # what it refused for went on
    assert status(spare)["state"] == "serving"
    assert tokens(complete(spare, PROMPT)) == before

    # Fails mid-way (unverified, a truncated KV file): the weights are written, the
    # prefix cache is not, so the server answers 503 instead of serving, until a load
    # succeeds (which must find every block the failed one took free again).
    os.truncate(kv_bin, kv_bin.stat().st_size // 2)
    load(spare, "corrupt", 500, verify=False)
    assert status(spare)["state"] == "load_failed"
    r = spare.post("/v1/completions", {"model": "tiny", "prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 503 and "failed POST /snapshot/load" in r.text, r.text

    got = load(spare, "lost")
    assert got["weights"] == "loaded" and got["kv_blocks"] >= 4, got
    assert set(got["phases_s"]) == {"verify", "weights", "kv", "total"}
    st = status(spare)
    assert st["state"] == "serving" and st["snapshot"]["loaded"]["name"] == "lost"
    for p, ref in refs.items():
        out = complete(spare, p)
        assert tokens(out) == ref
        assert cached(out) >= 16, f"no prefix-cache hit after the load: {out['usage']}"
    # The same weights again (the CLI): kept, only the prefix cache is replaced.
    r = subprocess.run([*vllm_cli(), "snapshot-load", spare.url, "lost", "--json"],
                       capture_output=True, text=True, timeout=600,
                       env=child_env(VLLM_HA_ADMIN_KEY=ADMIN_KEY))
    assert r.returncode == 0, r.stderr
    again = json.loads(r.stdout)
    assert again["weights"] == "kept" and again["weights_bytes"] == 0, again
    out = complete(spare, OTHER)
    assert tokens(out) == refs[OTHER] and cached(out) >= 16
    # The spare's next snapshot holds the loaded weights: its random ones, which it
    # wrote before the load, are not linked.
    own = snapshot(spare, "spare-own")
    assert own["bytes_linked"] < own["bytes"] / 4, own
    if not ON_CUDA:  # zlib encodes the same bytes the same way
        def weights_sha(name: str) -> list[str]:
            return SnapshotStore(root).read(name).manifest["files"]["weights/rank0.bin"][
                "sha256"]
        assert weights_sha("spare-own") == weights_sha("lost")


def test_weights_are_linked_after_a_snapshot_of_another_name(server, root):
    """Another snapshot (here in another codec) in between: the next generation of the
    first still links the weights this process wrote for it."""
    def take(name: str, codec: str) -> dict:
        r = server.post("/snapshot", {"name": name, "codec": codec}, headers=AUTH, timeout=600)
        assert r.status_code == 200, r.text
        return r.json()

    take("alt-a", "none")
    take("alt-b", "zlib")
    again = take("alt-a", "none")
    assert again["bytes_linked"] > 0.9 * again["bytes"], again


def test_checkpoint_also_writes_a_snapshot(server, root):
    ref = tokens(complete(server))
    if ON_CUDA:
        r = server.post("/checkpoint", {"snapshot": "c1"}, headers=AUTH)
        assert r.status_code == 409 and "nvCOMP" in r.text, r.text
        assert status(server)["state"] == "serving"
    st = checkpoint(server, snapshot="c1", **KEEP_GPU)
    assert st["state"] == "checkpointed" and "snapshot" in st["phases_s"]
    assert st["snapshot"]["last"]["name"] == "c1"
    assert not st["snapshot"]["last"]["written_in_background"]  # paused anyway
    SnapshotStore(root).read("c1")
    restore(server)
    assert tokens(complete(server)) == ref


def test_bad_calls_are_refused_and_change_nothing(server, root):
    snapshot(server, "keep")
    before = current(root, "keep")
    for name in ("../escape", "a/b", ".."):
        r = server.post("/snapshot", {"name": name}, headers=AUTH)
        assert r.status_code == 400 and "outside the snapshot root" in r.text, r.text
        r = server.post("/checkpoint", {"snapshot": name}, headers=AUTH)
        assert r.status_code == 400 and "outside the snapshot root" in r.text, r.text
    assert status(server)["state"] == "serving"
    assert server.post("/snapshot", {"name": "x"}).status_code == 401
    checkpoint(server, **KEEP_GPU)
    r = server.post("/snapshot", {"name": "keep"}, headers=AUTH)
    assert r.status_code == 409 and "checkpointed" in r.text
    restore(server)
    assert current(root, "keep") == before
    SnapshotStore(root).read("keep")


def test_full_disk_fails_the_write_keeps_the_old_snapshot_and_serving(server, root):
    ref = tokens(complete(server))
    snapshot(server, "full")
    before = current(root, "full")
    # New blocks, so that the next snapshot has KV to write (the rest is linked).
    complete(server, "Blocks the previous snapshot does not hold: " + "twelve " * 60)
    # The engine's processes may not grow a file past 4 KiB: a full disk to them
    # (Python ignores SIGXFSZ, so the write fails with EFBIG).
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    limits = {p.pid: resource.prlimit(p.pid, resource.RLIMIT_FSIZE) for p in procs}
    try:
        for p in procs:
            # The soft limit only: a process may raise it back, not the hard one.
            resource.prlimit(p.pid, resource.RLIMIT_FSIZE, (4 << 10, limits[p.pid][1]))
        r = server.post("/snapshot", {"name": "full"}, headers=AUTH, timeout=600)
        assert r.status_code == 507 and "previous snapshot is unchanged" in r.text, r.text
    finally:
        for pid, lim in limits.items():
            resource.prlimit(pid, resource.RLIMIT_FSIZE, lim)
    assert current(root, "full") == before
    assert sorted(p.name for p in (root / "full").iterdir()) == [CURRENT, before]
    SnapshotStore(root).read("full")
    assert tokens(complete(server)) == ref
    assert "vllm:snapshot_failures_total 1.0" in server.get("/metrics").text


def test_server_without_a_root_refuses_snapshots(tiny_model, tmp_path):
    with RemoteServer(str(tiny_model), ARGS, tmp_path / "noroot.log") as s:
        r = s.post("/snapshot", {"name": "s"})
        assert r.status_code == 400 and "--snapshot-root" in r.text
        r = s.post("/checkpoint", {"snapshot": "s"})
        assert r.status_code == 400 and "--snapshot-root" in r.text
        assert s.get("/checkpoint").json()["state"] == "serving"


def test_periodic_snapshots(tiny_model, tmp_path):
    root = tmp_path / "periodic-root"
    args = [*ARGS, "--snapshot-root", str(root), "--snapshot-interval", "1"]
    with RemoteServer(str(tiny_model), args, tmp_path / "periodic.log") as s:
        complete(s)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if (root / "periodic" / CURRENT).is_symlink() and int(
                    current(root, "periodic")[1:]) >= 2:
                break
            time.sleep(0.5)
        snap = SnapshotStore(root).read("periodic")
        assert snap.meta["kv_blocks"] >= 1
        metrics = s.get("/metrics").text
        assert "vllm:snapshot_last_success_timestamp_seconds" in metrics
        # Later generations link the weights: each writes a small fraction.
        last = s.get("/checkpoint").json()["snapshot"]["last"]
        assert last["bytes_linked"] > 0.9 * last["bytes"]


def test_restore_on_a_fresh_node_uses_the_snapshots_compile_cache(tiny_model, tmp_path):
    """Compiled (no --enforce-eager): the snapshot carries the compile cache, and a
    server restored where the cache root is empty looks its model up under the
    original's key (vLLM's key hashes the model path, which the restore changes)."""
    root, aot = tmp_path / "cc-root", ("torch_compile_cache", "torch_aot_compile")
    env = child_env(VLLM_HA_ADMIN_KEY=ADMIN_KEY, VLLM_CACHE_ROOT=str(tmp_path / "node-a"))
    env.pop("TORCHDYNAMO_DISABLE", None)
    args = [a for a in ARGS if a != "--enforce-eager"]
    with RemoteServer(str(tiny_model), [*args, "--snapshot-root", str(root)],
                      tmp_path / "compiled.log", env=env) as s:
        ref = tokens(complete(s))
        snap = snapshot(s, "cc")
    keys = [p.name for p in tmp_path.joinpath("node-a", *aot).iterdir()]
    assert len(keys) == 1 and snap["compile_cache"]["files"] > 0, (keys, snap)
    files = SnapshotStore(root).read("cc").manifest["files"]
    assert any(f.startswith(f"compile/torch_aot_compile/{keys[0]}/") for f in files)
    # vLLM's model-info cache too (which architecture the model class is: on a fresh
    # node found by importing it in a subprocess).
    assert any(f.startswith("modelinfo/") and f.endswith(".json") for f in files), files
    cache_files = [f for f in files if f.startswith(("compile/", "plan/", "modelinfo/"))]

    node_b = tmp_path / "node-b"
    with RemoteServer("", ["--restore-from", str(root / "cc")], tmp_path / "restored.log",
                      env={**env, "VLLM_CACHE_ROOT": str(node_b)}) as restored:
        assert tokens(complete(restored)) == ref
        log = restored.log_path.read_text()
    assert "compile cache in place" in log
    assert f"({len(cache_files)} files installed, 0 already there)" in log
    # Same key: nothing compiled under another one. (The GPU build loads the artifact;
    # the CPU build's AOT loader recompiles into it, as on any restart of that build.)
    assert [p.name for p in node_b.joinpath(*aot).iterdir()] == keys
    assert f"torch_aot_compile/{keys[0]}/rank_0_0/model" in log


def _serve_fails(args: list[str], timeout: int = 120) -> str:
    r = subprocess.run([*vllm_cli(), "serve", *args], capture_output=True, text=True,
                       env=child_env(), timeout=timeout)
    assert r.returncode != 0
    return r.stderr + r.stdout


def test_restore_from_refuses_bad_snapshots(server, root, tmp_path):
    snapshot(server, "bad")
    gen = root / "bad" / current(root, "bad")
    # A block size the snapshot was not taken with.
    out = _serve_fails(["--restore-from", str(root / "bad"), "--block-size", "32"])
    assert "--block-size" in out and "does not match the snapshot" in out
    # No snapshot there.
    out = _serve_fails(["--restore-from", str(tmp_path / "nothing")])
    assert "--restore-from" in out and "no snapshot" in out
    # A different distribution version.
    manifest = json.loads((gen / "manifest.json").read_text())
    (gen / "manifest.json").write_text(json.dumps({**manifest, "ha_version": "0.0.1+ha9"}))
    out = _serve_fails(["--restore-from", str(root / "bad")])
    assert "written by vLLM-HA 0.0.1+ha9" in out
    (gen / "manifest.json").write_text(json.dumps(manifest))
    # A flipped byte in the weights.
    weights = gen / "weights" / "rank0.bin"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    out = _serve_fails(["--restore-from", str(root / "bad")])
    assert "is corrupt" in out
    # The manifest gone: not a snapshot any more.
    (gen / "manifest.json").unlink()
    out = _serve_fails(["--restore-from", str(root / "bad")])
    assert "not a complete snapshot" in out
