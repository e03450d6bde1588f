# SPDX-License-Identifier: Apache-2.0
"""Worker side of snapshots on disk: weights by name and KV blocks, compressed.

A snapshot must load into a *new* process, so unlike the in-memory checkpoint (which
keeps raw allocations at their virtual addresses) weights are stored per tensor name
and KV per block. Both go through the same chunk codec as ``POST /checkpoint``
(byte planes + nvCOMP on the GPU, zlib on CPU, :mod:`vllm.v1.worker.checkpoint_worker`):
bytes are compressed on the device before they cross PCIe, and decompressed on the
device after (a restore reads compressed bytes from disk into pinned memory, copies
them up and decodes them in place).

Files of one rank ``r``: ``weights/rank{r}.bin`` + ``weights/rank{r}.json`` (index:
per tensor its chunks and planes at file offsets) and, per KV segment ``S``,
``kv/S.rank{r}.bin`` + ``kv/S.rank{r}.json`` (per KV tensor, chunks of the segment's
blocks in order). A snapshot writes one new segment, with the blocks that no segment
of the previous generation holds; the engine links the rest
(:mod:`vllm.v1.engine.snapshot`). Each file is fsynced and checksummed in pieces as it
is written; the engine adds the entries to the manifest
(:class:`vllm.v1.checkpoint.snapshot.SnapshotWriter`).
"""

from __future__ import annotations

import gc
import json
import os
import time
from pathlib import Path
from typing import Any

import torch
from vllm.logger import init_logger

from vllm.v1.checkpoint.byteplane import ByteplaneCodec, EncodedPlane, EncodedTensor
from vllm.v1.checkpoint.compile_cache import worker_cache_info
from vllm.v1.checkpoint.snapshot import PieceHasher, SnapshotError, write_file
from vllm.v1.worker.checkpoint_worker import (
    CHUNK_BYTES,
    HostChunk,
    WorkerPart,
    _decode_into,
    _encode,
    make_codec,
)
from vllm.v1.worker.kv_mirror_transport import unique_tensors

logger = init_logger(__name__)


def codec_for(stored_name: str, device: torch.device) -> ByteplaneCodec | None:
    """The codec that reads what ``stored_name`` (a codec's ``name``) wrote."""
    if stored_name == "none":
        return None
    if stored_name.startswith("zlib"):
        return make_codec("zlib", device)
    if stored_name.startswith("nvcomp-"):
        if device.type != "cuda":
            raise SnapshotError(f"this snapshot is compressed with {stored_name}, which "
                                "needs nvCOMP on a CUDA device")
        return make_codec(stored_name.removeprefix("nvcomp-"), device)
    raise SnapshotError(f"unknown codec {stored_name!r} in the snapshot")


class ChunkFileWriter:
    """Appends encoded chunks to one file; the index says where each plane is."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._f = open(path, "wb")
        self._hasher = PieceHasher()
        self.raw_bytes = 0

    def _put(self, t: torch.Tensor) -> dict[str, int]:
        data = t.numpy().tobytes() if t.numel() else b""
        at = self._hasher.size
        self._f.write(data)
        self._hasher.update(data)
        return {"at": at, "len": len(data)}

    def chunk(self, c: HostChunk) -> dict[str, Any]:
        self.raw_bytes += c.nbytes
        if c.planes is None:
            if c.raw.is_pinned():  # copied without a sync (the codec path syncs)
                torch.cuda.synchronize()
            return {"offset": c.offset, "nbytes": c.nbytes, "raw": self._put(c.raw)}
        return {"offset": c.offset, "nbytes": c.nbytes, "dtype": str(c.planes.dtype),
                "planes": [{"compressed": p.compressed, "nbytes": p.nbytes,
                            **self._put(p.data)} for p in c.planes.planes]}

    def close(self) -> dict[str, Any]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._hasher.entry()


class ChunkFileReader:
    """Reads chunks an index describes, into (pinned, on CUDA) host tensors."""

    def __init__(self, path: Path, pin: bool) -> None:
        self._f = open(path, "rb", buffering=0)
        self.pin = pin

    def _get(self, ref: dict[str, int]) -> torch.Tensor:
        out = torch.empty(ref["len"], dtype=torch.uint8, pin_memory=self.pin)
        if ref["len"]:
            self._f.seek(ref["at"])
            got = self._f.readinto(memoryview(out.numpy()))
            if got != ref["len"]:
                raise SnapshotError(f"{self._f.name} is truncated")
        return out

    def chunk(self, entry: dict[str, Any]) -> HostChunk:
        if "raw" in entry:
            return HostChunk(entry["offset"], entry["nbytes"], raw=self._get(entry["raw"]))
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        planes = [EncodedPlane(p["compressed"], self._get(p), p["nbytes"])
                  for p in entry["planes"]]
        enc = EncodedTensor(dtype, (entry["nbytes"] // dtype.itemsize,), "", planes)
        return HostChunk(entry["offset"], entry["nbytes"], planes=enc)

    def close(self) -> None:
        self._f.close()


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class WorkerSnapshot(WorkerPart):
    """One worker's part of a snapshot: write, and load into a new process."""

    ATTR = "ha_snapshot"

    def __init__(self, worker: Any) -> None:
        super().__init__(worker)
        self.rank = int(getattr(worker, "rank", 0) or 0)
        # Weights do not change while serving: a later snapshot links the file this
        # process wrote (these are its piece checksums) instead of encoding them again.
        self.weights_written: list[str] | None = None

    def _model(self) -> torch.nn.Module:
        return self.worker.model_runner.model

    def _weights_files(self) -> tuple[str, str]:
        return f"weights/rank{self.rank}.bin", f"weights/rank{self.rank}.json"

    def weights_linkable(self, linkable: dict[str, list[str]]) -> bool:
        """The previous generation holds the weights this process wrote (so they, and
        the KV blocks computed with them, can be linked instead of written)."""
        w_bin, w_idx = self._weights_files()
        return (self.weights_written is not None and w_idx in linkable
                and linkable.get(w_bin) == self.weights_written)

    @torch.inference_mode()
    def write(self, gen_dir: str, block_ids: list[int], codec_name: str,
              linkable: dict[str, list[str]], kv_segment: str) -> dict[str, Any]:
        """Write this rank's files into ``gen_dir``; entries for the manifest.
        ``linkable``: rel -> piece checksums of the previous generation's files; the
        weights file is linked, not written, if it is the one this process wrote.
        ``block_ids``: the blocks of the new KV segment ``kv_segment`` (none: no
        segment is written)."""
        t0 = time.perf_counter()
        gen = Path(gen_dir)
        codec = make_codec(codec_name, self.device)
        pin = self.device.type == "cuda"
        files: dict[str, Any] = {}
        linked: list[str] = []
        w_bin, w_idx = self._weights_files()
        if self.weights_linkable(linkable):
            linked = [w_bin, w_idx]
        else:
            files.update(self._write_weights(gen, w_bin, w_idx, codec, pin))
            self.weights_written = files[w_bin]["sha256"]
        t_weights = time.perf_counter()
        if block_ids:
            files.update(self._write_kv(gen, kv_segment, block_ids, codec, pin))
        if self.device.type == "cuda":
            # Nothing of the write may outlive it on the device (a checkpoint may follow).
            torch.cuda.synchronize(self.device)
            gc.collect()
            torch.cuda.empty_cache()
        t_kv = time.perf_counter()
        return {"files": files, "link": linked, "rank": self.rank,
                "codec": codec.codec.name if codec else "none",
                "cache": worker_cache_info(self.worker),
                "seconds": {"weights": t_weights - t0, "kv": t_kv - t_weights}}

    def _write_weights(self, gen: Path, w_bin: str, w_idx: str,
                       codec: ByteplaneCodec | None, pin: bool) -> dict[str, Any]:
        model = self._model()
        (gen / "weights").mkdir(parents=True, exist_ok=True)
        writer = ChunkFileWriter(gen / w_bin)
        index: dict[str, Any] = {"codec": codec.codec.name if codec else "none",
                                 "tensors": []}
        named = list(model.named_parameters()) + list(model.named_buffers())
        for name, t in named:
            if not t.numel():
                continue
            flat = _bytes_of(t.contiguous())
            chunks = [writer.chunk(_encode(codec, flat[off:off + CHUNK_BYTES], off, pin))
                      for off in range(0, flat.numel(), CHUNK_BYTES)]
            index["tensors"].append({"name": name, "dtype": str(t.dtype),
                                     "shape": list(t.shape), "chunks": chunks})
        entries = {w_bin: writer.close()}
        entries[w_idx] = write_file(gen / w_idx, json.dumps(index).encode())
        return entries

    def _write_kv(self, gen: Path, segment: str, block_ids: list[int],
                  codec: ByteplaneCodec | None, pin: bool) -> dict[str, Any]:
        k_bin, k_idx = kv_segment_files(segment, self.rank)
        (gen / "kv").mkdir(parents=True, exist_ok=True)
        writer = ChunkFileWriter(gen / k_bin)
        index: dict[str, Any] = {"codec": codec.codec.name if codec else "none",
                                 "num_blocks": len(block_ids), "tensors": []}
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        num_blocks = self._num_blocks()
        for t in unique_tensors(self._kv_caches()):
            blocks = t.view(num_blocks, -1)
            row = blocks.shape[1]
            rows = max(1, CHUNK_BYTES // row)
            chunks = []
            for start in range(0, len(block_ids), rows):
                gathered = blocks.index_select(0, ids[start:start + rows])
                chunks.append(writer.chunk(_encode(codec, gathered.view(-1), start, pin)))
            index["tensors"].append({"row_bytes": row, "chunks": chunks})
        return {k_bin: writer.close(),
                k_idx: write_file(gen / k_idx, json.dumps(index).encode())}

    # -- load (a new process) ---------------------------------------------------

    @torch.inference_mode()
    def load_weights(self, model: torch.nn.Module, gen_dir: str) -> dict[str, Any]:
        return load_weights(model, Path(gen_dir), self.rank, self.device)

    @torch.inference_mode()
    def load_kv(self, gen_dir: str, placements: dict[str, list[tuple[int, int]]]
                ) -> dict[str, Any]:
        """``placements``: per segment, (row in the segment, target block id) of every
        block to restore; rows of a segment that no block wants are not decoded."""
        t0 = time.perf_counter()
        gen = Path(gen_dir)
        kv = unique_tensors(self._kv_caches())
        num_blocks = self._num_blocks()
        n = 0
        for segment, wanted in placements.items():
            if not wanted:
                continue
            k_bin, k_idx = kv_segment_files(segment, self.rank)
            index = json.loads((gen / k_idx).read_text())
            if len(index["tensors"]) != len(kv):
                raise SnapshotError(f"the snapshot has {len(index['tensors'])} KV tensors, "
                                    f"this engine {len(kv)}: a different KV layout")
            rows_wanted = sorted(wanted)
            codec = codec_for(index["codec"], self.device)
            reader = ChunkFileReader(gen / k_bin, self.device.type == "cuda")
            try:
                for t, entry in zip(kv, index["tensors"]):
                    self._load_segment_tensor(t.view(num_blocks, -1), entry, rows_wanted,
                                              codec, reader)
            finally:
                reader.close()
            n += len(wanted)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"blocks": n, "seconds": time.perf_counter() - t0}

    def _load_segment_tensor(self, blocks: torch.Tensor, entry: dict[str, Any],
                             rows_wanted: list[tuple[int, int]],
                             codec: ByteplaneCodec | None, reader: ChunkFileReader) -> None:
        row = blocks.shape[1]
        if row != entry["row_bytes"]:
            raise SnapshotError(f"a KV block is {entry['row_bytes']} bytes in the "
                                f"snapshot, {row} here: a different KV layout")
        i = 0
        for c in entry["chunks"]:
            start, rows = c["offset"], c["nbytes"] // row
            if i < len(rows_wanted) and rows_wanted[i][0] < start:
                break  # the chunks skip it: reported below
            j = i
            while j < len(rows_wanted) and rows_wanted[j][0] < start + rows:
                j += 1
            if i == j:
                continue
            staging = torch.empty(c["nbytes"], dtype=torch.uint8, device=self.device)
            _decode_into(codec, reader.chunk(c), staging)
            src = torch.tensor([r - start for r, _ in rows_wanted[i:j]], dtype=torch.long,
                               device=self.device)
            dst = torch.tensor([b for _, b in rows_wanted[i:j]], dtype=torch.long,
                               device=self.device)
            blocks.index_copy_(0, dst, staging.view(rows, -1).index_select(0, src))
            i = j
        if i < len(rows_wanted):
            raise SnapshotError(f"KV row {rows_wanted[i][0]} is not in its segment: the "
                                "snapshot's block list and KV files disagree")


def kv_segment_files(segment: str, rank: int) -> tuple[str, str]:
    """The KV files of one rank's part of a segment (bytes, index)."""
    return f"kv/{segment}.rank{rank}.bin", f"kv/{segment}.rank{rank}.json"


def load_weights(model: torch.nn.Module, gen: Path, rank: int, device: torch.device
                 ) -> dict[str, Any]:
    """Every tensor of ``model`` from the snapshot, by name; refuses a mismatch."""
    t0 = time.perf_counter()
    index = json.loads((gen / f"weights/rank{rank}.json").read_text())
    codec = codec_for(index["codec"], device)
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    stored = {e["name"]: e for e in index["tensors"]}
    missing = [n for n, t in tensors.items() if t.numel() and n not in stored]
    extra = [n for n in stored if n not in tensors]
    if missing or extra:
        raise SnapshotError(
            f"the snapshot's weights do not fit this model: {len(missing)} tensors "
            f"missing (e.g. {missing[:3]}), {len(extra)} unknown (e.g. {extra[:3]})")
    reader = ChunkFileReader(gen / f"weights/rank{rank}.bin", device.type == "cuda")
    nbytes = 0
    try:
        for name, entry in stored.items():
            t = tensors[name]
            if list(t.shape) != entry["shape"] or str(t.dtype) != entry["dtype"]:
                raise SnapshotError(
                    f"{name}: {entry['dtype']} {entry['shape']} in the snapshot, "
                    f"{t.dtype} {list(t.shape)} in this model")
            if not t.is_contiguous():
                raise SnapshotError(f"{name} is not contiguous in this model")
            flat = _bytes_of(t.data)
            for c in entry["chunks"]:
                _decode_into(codec, reader.chunk(c),
                             flat[c["offset"]:c["offset"] + c["nbytes"]])
                nbytes += c["nbytes"]
    finally:
        reader.close()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - t0
    logger.info("Snapshot: %.2f GiB of weights loaded from %s in %.2f s (%.1f GB/s, %s)",
                nbytes / 2**30, gen, seconds, nbytes / max(seconds, 1e-9) / 1e9,
                index["codec"])
    return {"bytes": nbytes, "seconds": seconds}


# -- engine wiring: collective_rpc(fn, args=...) runs these on every worker ----------


def rpc_snapshot_weights_linkable(worker: Any, linkable: dict[str, list[str]]) -> bool:
    return WorkerSnapshot.of(worker).weights_linkable(linkable)


def rpc_snapshot_write(worker: Any, gen_dir: str, block_ids: list[int], codec: str,
                       linkable: dict[str, list[str]], kv_segment: str) -> dict[str, Any]:
    return WorkerSnapshot.of(worker).write(gen_dir, block_ids, codec, linkable, kv_segment)


def rpc_snapshot_load_kv(worker: Any, gen_dir: str,
                         placements: dict[str, list[tuple[int, int]]]) -> dict[str, Any]:
    return WorkerSnapshot.of(worker).load_kv(gen_dir, placements)
