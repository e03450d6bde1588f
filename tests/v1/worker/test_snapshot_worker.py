"""Snapshot chunk files: written on the caller's thread or deferred to a background
thread, the same bytes, index and checksums; a failed background write is reported."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.utils import ON_CUDA
from vllm.v1.worker import checkpoint_worker as cw
from vllm.v1.worker.snapshot_worker import BackgroundFiles, ChunkFileWriter, ChunkReadAhead

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")


def tensors() -> list[torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    weights = (torch.randn(300_000, generator=g) * 0.02).to(torch.bfloat16)
    noise = torch.randint(0, 256, (123_457,), dtype=torch.uint8, generator=g)
    return [weights.view(torch.uint8).to(DEVICE), noise.to(DEVICE)]


def write(path, deferred: bool) -> tuple[list[dict], ChunkFileWriter]:
    codec = cw.make_codec("auto" if ON_CUDA else "zlib", DEVICE)
    w = ChunkFileWriter(path, deferred)
    index = []
    for t in tensors():
        for off in range(0, t.numel(), 65536):
            index.append(w.chunk(cw._encode(codec, t[off:off + 65536], off, ON_CUDA)))
    return index, w


def test_a_deferred_file_is_the_same_file(tmp_path):
    direct_index, direct = write(tmp_path / "direct.bin", deferred=False)
    direct_entry = direct.close()
    index, deferred = write(tmp_path / "deferred.bin", deferred=True)
    assert not (tmp_path / "deferred.bin").exists()  # nothing on disk in the pause
    assert index == direct_index  # the index is complete before the bytes are written
    bg = BackgroundFiles.flushing(str(tmp_path), [("deferred.bin", deferred)])
    entries = bg.result()
    assert bg.done and entries == {"deferred.bin": direct_entry}
    assert (tmp_path / "deferred.bin").read_bytes() == (tmp_path / "direct.bin").read_bytes()
    # And it reads back into the original bytes.
    codec = cw.make_codec("auto" if ON_CUDA else "zlib", DEVICE)
    flat = torch.cat([t.reshape(-1) for t in tensors()])
    assert torch.equal(torch.cat(read_back(tmp_path / "deferred.bin", index, codec)), flat)


def read_back(path, index: list[dict], codec) -> list[torch.Tensor]:
    got = []
    with ChunkReadAhead(path, index, ON_CUDA) as reader:
        for entry, chunk in zip(index, reader):
            out = torch.empty(entry["nbytes"], dtype=torch.uint8, device=DEVICE)
            cw._decode_into(codec, chunk, out)
            got.append(out)
    return got


def test_read_ahead_reuses_its_buffers_in_any_order(tmp_path):
    """More chunks than buffers, asked for out of file order: each comes back exactly
    (a buffer reused before its bytes were consumed would corrupt an earlier chunk)."""
    index, w = write(tmp_path / "f.bin", deferred=False)
    w.close()
    assert len(index) > 2 * ChunkReadAhead.DEPTH
    codec = cw.make_codec("auto" if ON_CUDA else "zlib", DEVICE)
    flat = torch.cat([t.reshape(-1) for t in tensors()])
    starts = [0]
    for e in index[:-1]:
        starts.append(starts[-1] + e["nbytes"])
    want = [flat[s:s + e["nbytes"]] for s, e in zip(starts, index)]
    got = read_back(tmp_path / "f.bin", index[::-1], codec)[::-1]
    assert len(got) == len(want) and all(torch.equal(a, b) for a, b in zip(got, want))


def test_read_ahead_of_raw_chunks(tmp_path):
    """Chunks stored raw are copied up without the codec's synchronisation: a buffer
    must still not be refilled before its copy has read it."""
    w = ChunkFileWriter(tmp_path / "r.bin")
    flat = torch.cat([t.reshape(-1) for t in tensors()])
    index = [w.chunk(cw._encode(None, flat[off:off + 32768], off, ON_CUDA))
             for off in range(0, flat.numel(), 32768)]
    w.close()
    got = read_back(tmp_path / "r.bin", index, None)
    assert torch.equal(torch.cat(got), flat)


def test_read_ahead_reports_a_truncated_file_and_stops_when_closed(tmp_path):
    index, w = write(tmp_path / "f.bin", deferred=False)
    w.close()
    data = (tmp_path / "f.bin").read_bytes()
    (tmp_path / "f.bin").write_bytes(data[:len(data) // 2])
    from vllm.v1.checkpoint.snapshot import SnapshotError

    with pytest.raises(SnapshotError, match="truncated"):
        with ChunkReadAhead(tmp_path / "f.bin", index, ON_CUDA) as reader:
            for _ in reader:
                pass
    # Closed after one chunk: the reading thread ends without being drained.
    (tmp_path / "f.bin").write_bytes(data)
    reader = ChunkReadAhead(tmp_path / "f.bin", index, ON_CUDA)
    next(iter(reader))
    closing = threading.Thread(target=reader.close, daemon=True)
    closing.start()
    closing.join(10)
    assert not closing.is_alive() and not reader._thread.is_alive()


def test_a_failed_background_write_raises_its_error(tmp_path):
    _, w = write(tmp_path / "gone" / "f.bin", deferred=True)  # its directory is missing
    ok = ChunkFileWriter(tmp_path / "ok.bin", deferred=True)
    bg = BackgroundFiles.flushing(str(tmp_path), [("ok.bin", ok), ("gone/f.bin", w)])
    with pytest.raises(FileNotFoundError):
        bg.result()
    assert bg.done


def test_a_snapshot_write_keeps_no_codec(tmp_path):
    # A serving engine holds no codec after a snapshot: a driver checkpoint of a process
    # holding a live nvCOMP codec cannot be restored (checkpoint_worker.drop_codecs).
    from types import SimpleNamespace

    from tests.v1.worker.test_checkpoint_worker import cpu_worker
    from vllm.v1.worker.snapshot_worker import rpc_snapshot_write

    (tmp_path / "weights").mkdir()
    (tmp_path / "kv").mkdir()
    worker = cpu_worker()
    worker.vllm_config.compilation_config = SimpleNamespace(cache_dir="", local_cache_dir="")
    out = rpc_snapshot_write(worker, str(tmp_path), [1, 2], "zlib", {}, "seg")
    assert out["codec"] == "zlib-1" and any((tmp_path / "weights").iterdir())
    assert not cw._CODECS and not len(cw._LIVE)
