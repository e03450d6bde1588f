"""Snapshot chunk files: written on the caller's thread or deferred to a background
thread, the same bytes, index and checksums; a failed background write is reported."""

from __future__ import annotations

import pytest
import torch

from tests.utils import ON_CUDA
from vllm.v1.worker import checkpoint_worker as cw
from vllm.v1.worker.snapshot_worker import BackgroundFiles, ChunkFileReader, ChunkFileWriter

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
    reader = ChunkFileReader(tmp_path / "deferred.bin", ON_CUDA)
    flat = torch.cat([t.reshape(-1) for t in tensors()])
    got = []
    for entry in index:
        out = torch.empty(entry["nbytes"], dtype=torch.uint8, device=DEVICE)
        cw._decode_into(codec, reader.chunk(entry), out)
        got.append(out)
    reader.close()
    assert torch.equal(torch.cat(got), flat)


def test_a_failed_background_write_raises_its_error(tmp_path):
    _, w = write(tmp_path / "gone" / "f.bin", deferred=True)  # its directory is missing
    ok = ChunkFileWriter(tmp_path / "ok.bin", deferred=True)
    bg = BackgroundFiles.flushing(str(tmp_path), [("ok.bin", ok), ("gone/f.bin", w)])
    with pytest.raises(FileNotFoundError):
        bg.result()
    assert bg.done
