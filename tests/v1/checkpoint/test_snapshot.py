"""Snapshots on disk: atomic generations, verification, clear refusals."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from vllm.v1.checkpoint.snapshot import CURRENT, MANIFEST, SnapshotError, SnapshotStore

IDENTITY = {"model": "tiny-llama", "dtype": "bfloat16", "block_size": 16}
HA = "0.26.0+ha1"


def files(tag: bytes, n: int = 3, size: int = 4096):
    return [(f"weights/part{i}.bin", tag * (size // len(tag))) for i in range(n)] + [
        ("kv/hashes.json", b'{"chains": []}')]


@pytest.fixture
def store(tmp_path):
    return SnapshotStore(tmp_path / "snapshots")


def test_round_trip_and_manifest(store):
    snap = store.write("s1", files(b"A"), IDENTITY, HA)
    got = store.read("s1", expect=IDENTITY, ha_version=HA)
    assert got.path == snap.path and got.identity == IDENTITY
    m = got.manifest
    assert m["format"] == "vllm-ha-snapshot" and m["format_version"] == 2
    assert m["ha_version"] == HA and set(m["files"]) == {
        "weights/part0.bin", "weights/part1.bin", "weights/part2.bin", "kv/hashes.json"}
    assert got.file("weights/part1.bin").read_bytes() == b"A" * 4096


def test_a_new_write_replaces_the_old_generation(store):
    first = store.write("s1", files(b"A"), IDENTITY, HA)
    second = store.write("s1", [("data/chunked.bin", iter([b"x" * 10, b"y" * 5]))], IDENTITY, HA)
    assert not first.path.exists() and second.path.name == "g000002"
    assert os.readlink(second.path.parent / CURRENT) == "g000002"
    got = store.read("s1")
    assert got.file("data/chunked.bin").read_bytes() == b"x" * 10 + b"y" * 5


@pytest.mark.parametrize("name", ["../escape", "a/b", "..", "", "/abs"])
def test_names_outside_the_root_are_refused(store, name):
    with pytest.raises(SnapshotError, match="outside the snapshot root"):
        store.write(name, files(b"A"), IDENTITY, HA)
    with pytest.raises(SnapshotError, match="outside the snapshot root"):
        store.read(name)


def test_file_names_cannot_escape_the_snapshot(store):
    with pytest.raises(SnapshotError, match="not allowed"):
        store.write("s1", [("../../etc/x", b"1")], IDENTITY, HA)
    with pytest.raises(SnapshotError, match="no snapshot"):
        store.read("s1")


@pytest.mark.parametrize("damage,message", [
    (lambda p: p.write_bytes(p.read_bytes()[:-1]), "truncated"),
    (lambda p: p.write_bytes(b"B" + p.read_bytes()[1:]), "corrupt"),
    (lambda p: p.unlink(), "missing"),
])
def test_damaged_files_are_rejected(store, damage, message):
    snap = store.write("s1", files(b"A"), IDENTITY, HA)
    damage(snap.path / "weights/part2.bin")
    with pytest.raises(SnapshotError, match=message):
        store.read("s1")


def test_missing_or_garbled_manifest_is_rejected(store):
    snap = store.write("s1", files(b"A"), IDENTITY, HA)
    (snap.path / MANIFEST).write_text("{not json")
    with pytest.raises(SnapshotError, match="not valid JSON"):
        store.read("s1")
    (snap.path / MANIFEST).unlink()
    with pytest.raises(SnapshotError, match="not a complete snapshot"):
        store.read("s1")


def test_identity_and_version_mismatches_name_the_difference(store):
    store.write("s1", files(b"A"), IDENTITY, HA)
    with pytest.raises(SnapshotError, match=r"block_size=16, this server has block_size=32"):
        store.read("s1", expect={**IDENTITY, "block_size": 32})
    with pytest.raises(SnapshotError, match=r"vLLM-HA 0.26.0\+ha1, this is 0.26.0\+ha2"):
        store.read("s1", ha_version="0.26.0+ha2")


_WRITER = textwrap.dedent("""
    import resource, signal, sys, time
    from vllm.v1.checkpoint.snapshot import SnapshotError, SnapshotStore
    root, mode = sys.argv[1], sys.argv[2]
    if mode == "fsize":  # the file system refuses to grow a file past 1 MiB (like a full disk)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    def slow(n):
        for _ in range(n):
            yield b"N" * 65536
            if mode == "slow":
                time.sleep(0.002)
    print("writing", flush=True)
    try:
        SnapshotStore(root).write("s1", [("big.bin", slow(32)), ("b2.bin", slow(32))],
                                  {"model": "tiny-llama"}, "0.26.0+ha1")
    except SnapshotError as e:
        print("ERR", e)
        sys.exit(3)
""")


def _writer(root, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _WRITER, str(root), mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_full_disk_fails_the_write_and_keeps_the_old_snapshot(store):
    old = store.write("s1", files(b"A"), {"model": "tiny-llama"}, HA)
    proc = _writer(store.root, "fsize")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert "the previous snapshot is unchanged" in out
    assert store.read("s1").path == old.path
    assert sorted(p.name for p in old.path.parent.iterdir()) == [CURRENT, old.path.name]


def test_killing_the_writer_at_any_point_never_leaves_an_invalid_snapshot(store):
    store.write("s1", files(b"A"), {"model": "tiny-llama"}, HA)
    base = store.root / "s1"
    outcomes, partial_seen = set(), False
    # The write takes ~0.15 s: kill at its start, in the middle, and after it.
    for delay in (0.0, 0.01, 0.03, 0.06, 0.1, 0.15, 2.0):
        proc = _writer(store.root, "slow")
        assert proc.stdout.readline().strip() == "writing"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        current = os.readlink(base / CURRENT)
        partial_seen |= any(p.name != current and p.name.startswith("g")
                            for p in base.iterdir())
        snap = store.read("s1")  # must verify, whichever generation is current
        outcomes.add("new" if "big.bin" in snap.manifest["files"] else "old")
    assert outcomes == {"old", "new"} and partial_seen
    # The next write sweeps the partial generations the killed writers left.
    final = store.write("s1", files(b"C"), {"model": "tiny-llama"}, HA)
    assert sorted(p.name for p in final.path.parent.iterdir()) == [CURRENT, final.path.name]
