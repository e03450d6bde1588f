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

import functools
import gc
import json
import os
import queue
import threading
import time
from collections.abc import Callable
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
    drop_codecs,
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


# Weight files (snapshot names, codecs) a process remembers it wrote, for linking.
WEIGHTS_REMEMBERED = 8


class ChunkFileWriter:
    """Appends encoded chunks to one file; the index says where each plane is.

    ``deferred``: the chunks' host copies are kept and written by :meth:`flush` later,
    off the engine's step (a snapshot of a serving engine pauses it for the copies
    only); the index is complete as soon as the chunks are in."""

    def __init__(self, path: Path, deferred: bool = False) -> None:
        self.path = path
        self._parts: list[torch.Tensor] | None = [] if deferred else None
        self._f = None if deferred else open(path, "wb")
        self._hasher = PieceHasher()
        self._size = 0
        self.raw_bytes = 0

    def _put(self, t: torch.Tensor) -> dict[str, int]:
        at, n = self._size, t.numel()
        self._size += n
        if self._parts is not None:
            self._parts.append(t)
        else:
            self._write(t)
        return {"at": at, "len": n}

    def _write(self, t: torch.Tensor) -> None:
        if not t.numel():
            return
        # A view, not a copy: the write and the hash release the GIL the engine's
        # loop needs while a background write runs beside it.
        data = memoryview(t.numpy())
        self._f.write(data)
        self._hasher.update(data)

    def chunk(self, c: HostChunk) -> dict[str, Any]:
        self.raw_bytes += c.nbytes
        if c.planes is None:
            if c.raw.is_pinned():  # copied without a sync (the codec path syncs)
                torch.cuda.synchronize()
            return {"offset": c.offset, "nbytes": c.nbytes, "raw": self._put(c.raw)}
        return {"offset": c.offset, "nbytes": c.nbytes, "dtype": str(c.planes.dtype),
                "planes": [{"compressed": p.compressed, "nbytes": p.nbytes,
                            **self._put(p.data)} for p in c.planes.planes]}

    @property
    def deferred(self) -> bool:
        return self._parts is not None

    def close(self) -> dict[str, Any]:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        return self._hasher.entry()

    def flush(self) -> dict[str, Any]:
        """A deferred file: write the kept chunks (freeing each), fsync; its entry."""
        self._f = open(self.path, "wb")
        parts, self._parts = self._parts or [], None
        parts.reverse()
        while parts:
            self._write(parts.pop())  # each part freed once on disk
        return self.close()


class BackgroundFiles:
    """Writes files on a thread (``job`` returns their manifest entries); :meth:`result`
    is the entries once all are on disk, or raises what went wrong (a full disk, say)."""

    def __init__(self, gen_dir: str, names: list[str],
                 job: Callable[[], dict[str, Any]]) -> None:
        self.gen_dir = gen_dir
        self.names = names  # the files it owes the manifest (the engine checks them)
        self._job: Callable[[], dict[str, Any]] | None = job
        self._entries: dict[str, Any] = {}
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="SnapshotWrite", daemon=True)
        self._thread.start()

    @classmethod
    def flushing(cls, gen_dir: str, writers: list[tuple[str, ChunkFileWriter]]
                 ) -> BackgroundFiles:
        """The deferred files ``writers`` (their chunks already encoded)."""
        return cls(gen_dir, [rel for rel, _ in writers],
                   lambda: {rel: w.flush() for rel, w in writers})

    def _run(self) -> None:
        try:
            self._entries = self._job()
        except BaseException as e:  # reported to the engine by result()
            self._error = e
        self._job = None  # what it held (host copies) goes now

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> dict[str, Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._entries


def _parts(entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Where a chunk's stored bytes are in its file (one part raw, else one per plane)."""
    return [entry["raw"]] if "raw" in entry else entry["planes"]


def _stored_bytes(entry: dict[str, Any]) -> int:
    return sum(p["len"] for p in _parts(entry))


class ChunkReadAhead:
    """Reads chunks an index describes, in the order given, into a few reusable host
    buffers (pinned on CUDA) on a thread: the read of the next chunks overlaps the copy
    up and the decode of this one, and pinned memory is allocated once per file, not
    per chunk (a 128 MiB ``cudaHostAlloc`` takes longer than its copy).

    Iterate to get each chunk; its buffer is reused once the next one is asked for,
    after the device's work on it is done (the current stream is synchronised)."""

    DEPTH = 3

    def __init__(self, path: Path, entries: list[dict[str, Any]], pin: bool) -> None:
        self.path = path
        self.entries = entries
        self.pin = pin
        size = max((_stored_bytes(e) for e in entries), default=0)
        self._free: queue.Queue[torch.Tensor | None] = queue.Queue()
        for _ in range(min(self.DEPTH, len(entries))):
            self._free.put(torch.empty(size, dtype=torch.uint8, pin_memory=pin))
        self._ready: queue.Queue[Any] = queue.Queue()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="SnapshotRead", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            with open(self.path, "rb", buffering=0) as f:
                for entry in self.entries:
                    buf = self._free.get()
                    if buf is None:
                        return
                    self._ready.put((self._read(f, entry, buf), buf))
        except BaseException as e:  # raised where the chunk is asked for
            self._ready.put(e)

    def _read(self, f: Any, entry: dict[str, Any], buf: torch.Tensor) -> HostChunk:
        views, at = [], 0
        for ref in _parts(entry):
            n = ref["len"]
            view = buf[at:at + n]
            at += n
            if n:
                f.seek(ref["at"])
                mem, got = memoryview(view.numpy()), 0
                while got < n:  # a short read is legal (network file systems)
                    k = f.readinto(mem[got:])
                    if not k:
                        raise SnapshotError(f"{self.path} is truncated")
                    got += k
            views.append(view)
        if "raw" in entry:
            return HostChunk(entry["offset"], entry["nbytes"], raw=views[0])
        dtype = getattr(torch, entry["dtype"].removeprefix("torch."))
        planes = [EncodedPlane(p["compressed"], v, p["nbytes"])
                  for p, v in zip(entry["planes"], views)]
        enc = EncodedTensor(dtype, (entry["nbytes"] // dtype.itemsize,), "", planes)
        return HostChunk(entry["offset"], entry["nbytes"], planes=enc)

    def __iter__(self):
        for _ in self.entries:
            item = self._ready.get()
            if isinstance(item, BaseException):
                raise item
            chunk, buf = item
            yield chunk
            if self.pin:
                torch.cuda.current_stream().synchronize()  # the copy up has read it
            self._free.put(buf)

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            for _ in range(self.DEPTH + 1):
                self._free.put(None)
            self._thread.join()

    def __enter__(self) -> ChunkReadAhead:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _bytes_of(t: torch.Tensor) -> torch.Tensor:
    return t.detach().reshape(-1).view(torch.uint8)


class WorkerSnapshot(WorkerPart):
    """One worker's part of a snapshot: write, and load into a new process."""

    ATTR = "ha_snapshot"

    def __init__(self, worker: Any) -> None:
        super().__init__(worker)
        self.rank = int(getattr(worker, "rank", 0) or 0)
        # Weights do not change while serving: a later snapshot links a file this
        # process wrote (these are their piece checksums, newest last; any snapshot
        # name or codec: each holds the same weights) instead of encoding them again.
        self.weights_written: list[list[str]] = []
        # The piece checksums of the weights file loaded in place last (a spare).
        self.weights_loaded: list[str] | None = None
        self._background: BackgroundFiles | None = None

    def _model(self) -> torch.nn.Module:
        return self.worker.model_runner.model

    def _weights_files(self) -> tuple[str, str]:
        return f"weights/rank{self.rank}.bin", f"weights/rank{self.rank}.json"

    def weights_linkable(self, linkable: dict[str, list[str]]) -> bool:
        """The previous generation holds the weights this process wrote (so they, and
        the KV blocks computed with them, can be linked instead of written)."""
        w_bin, w_idx = self._weights_files()
        return w_idx in linkable and linkable.get(w_bin) in self.weights_written

    def _wrote_weights(self, checksums: list[str]) -> None:
        if checksums not in self.weights_written:
            self.weights_written = [*self.weights_written, checksums][-WEIGHTS_REMEMBERED:]

    def _host_room_for(self, write_weights: bool, num_blocks: int) -> bool:
        """Whether the copies of a deferred write fit in host memory (at their raw size:
        the codec may not shrink them) beside the checkpoint reserve."""
        import psutil

        from vllm.ha import envs as ha_envs

        need = 0
        if write_weights:
            model = self._model()
            need += sum(t.numel() * t.element_size() for t in
                        [*model.parameters(), *model.buffers()])
        if num_blocks:
            per_block = sum(t.numel() * t.element_size()
                            for t in unique_tensors(self._kv_caches())) // self._num_blocks()
            need += num_blocks * per_block
        free = psutil.virtual_memory().available - ha_envs.checkpoint_host_reserve()
        # Every rank of the engine makes its copies at once, on this host.
        free //= max(1, int(getattr(self.worker.parallel_config, "world_size", 1) or 1))
        if need > free:
            logger.warning("Snapshot: %.2f GiB of copies do not fit in host memory (%.2f "
                           "GiB free beside the reserve): written inside the engine's "
                           "pause", need / 2**30, max(free, 0) / 2**30)
        return need <= free

    @torch.inference_mode()
    def write(self, gen_dir: str, block_ids: list[int], codec_name: str,
              linkable: dict[str, list[str]], kv_segment: str,
              background: bool = False) -> dict[str, Any]:
        """Write this rank's files into ``gen_dir``; entries for the manifest.
        ``linkable``: rel -> piece checksums of the previous generation's files; the
        weights file is linked, not written, if it is the one this process wrote.
        ``block_ids``: the blocks of the new KV segment ``kv_segment`` (none: no
        segment is written). ``background``: return once the bytes are copied to host
        memory, and write the files on a thread (``pending`` in the result; their
        entries come from :meth:`finish`), if the copies fit in host memory."""
        if self._background is not None:  # a write nobody collected (its call was cut)
            if not self._background.done:
                # Never two at once, and never wait for one inside the engine's pause.
                raise SnapshotError("the files of an earlier snapshot are still being "
                                    "written; retry when it is done")
            try:
                self._background.result()
            except Exception as e:
                logger.warning("Snapshot: an uncollected background write failed: %s", e)
            self._background = None
        t0 = time.perf_counter()
        gen = Path(gen_dir)
        codec = make_codec(codec_name, self.device)
        files: dict[str, Any] = {}
        linked: list[str] = []
        w_bin, w_idx = self._weights_files()
        write_weights = not self.weights_linkable(linkable)
        deferred = background and self._host_room_for(write_weights, len(block_ids))
        # Copies kept until written go to pageable memory: pinning GiBs for a first
        # snapshot costs seconds of the pause (upstream's first sleep: 10.7 s for an
        # 8B), and torch would keep them pinned afterwards.
        pin = self.device.type == "cuda" and not deferred
        if not write_weights:
            linked = [w_bin, w_idx]
        if deferred and self.device.type == "cpu":
            self._background = self._cpu_background(gen, kv_segment, block_ids, codec,
                                                    write_weights)
            return self._write_result(files, linked, codec, self._background.names, t0, t0)
        writers: list[tuple[str, ChunkFileWriter]] = []
        if write_weights:
            files.update(self._write_weights(gen, w_bin, w_idx, codec, pin, deferred, writers))
        t_weights = time.perf_counter()
        if block_ids:
            files.update(self._write_kv(gen, kv_segment, len(block_ids),
                                        self._kv_rows(block_ids, copy=False), codec, pin,
                                        deferred, writers))
        if self.device.type == "cuda":
            # Nothing of the write may outlive it on the device (a checkpoint may follow).
            torch.cuda.synchronize(self.device)
            gc.collect()
            torch.cuda.empty_cache()
        if writers:
            self._background = BackgroundFiles.flushing(gen_dir, writers)
        elif write_weights:
            self._wrote_weights(files[w_bin]["sha256"])
        return self._write_result(files, linked, codec, [rel for rel, _ in writers], t0,
                                  t_weights)

    def _cpu_background(self, gen: Path, kv_segment: str, block_ids: list[int],
                        codec: ByteplaneCodec | None, write_weights: bool
                        ) -> BackgroundFiles:
        """The CPU build's background write: the host is the device, so the pause copies
        the KV rows (they may change once the engine steps again) and the thread does
        the encoding too. Weights do not change while serving (a checkpoint's offload
        waits for this thread) and are read there as they are."""
        rows = self._kv_rows(block_ids, copy=True)
        weights = self._weights_files() if write_weights else ()
        names = [*weights, *(kv_segment_files(kv_segment, self.rank) if block_ids else ())]

        def job() -> dict[str, Any]:
            files: dict[str, Any] = {}
            if weights:
                files.update(self._write_weights(gen, *weights, codec, False))
            if block_ids:
                files.update(self._write_kv(gen, kv_segment, len(block_ids), rows, codec,
                                            False))
            return files

        return BackgroundFiles(str(gen), names, job)

    def _write_result(self, files: dict[str, Any], linked: list[str],
                      codec: ByteplaneCodec | None, pending: list[str], t0: float,
                      t_weights: float) -> dict[str, Any]:
        return {"files": files, "link": linked, "rank": self.rank, "pending": pending,
                "codec": codec.codec.name if codec else "none",
                "cache": worker_cache_info(self.worker),
                "seconds": {"weights": t_weights - t0, "kv": time.perf_counter() - t_weights}}

    def _kv_rows(self, block_ids: list[int], copy: bool
                 ) -> list[tuple[int, Callable[[int, int], torch.Tensor]]]:
        """Per KV tensor: its row (block) size and ``rows(start, end)``, the bytes of
        ``block_ids[start:end]``, gathered when asked (``copy``: gathered now, a copy
        the engine's next steps cannot change)."""
        if not block_ids:
            return []
        ids = torch.tensor(block_ids, dtype=torch.long, device=self.device)
        out = []
        for t in unique_tensors(self._kv_caches()):
            blocks = t.view(self._num_blocks(), -1)
            if copy:
                taken = blocks.index_select(0, ids)
                out.append((blocks.shape[1], lambda s, e, taken=taken: taken[s:e]))
            else:
                out.append((blocks.shape[1], lambda s, e, blocks=blocks:
                            blocks.index_select(0, ids[s:e])))
        return out

    def wait(self) -> None:
        """Until a background write is done (its result stays for :meth:`finish`)."""
        if self._background is not None:
            self._background.wait()

    def _background_of(self, gen_dir: str) -> BackgroundFiles:
        bg = self._background
        if bg is None or bg.gen_dir != gen_dir:
            # Another process (a promoted standby) or a write already collected: the
            # caller must not take "nothing" for "everything written".
            raise SnapshotError(f"rank {self.rank} has no background write of {gen_dir}")
        return bg

    def done(self, gen_dir: str) -> bool:
        """Whether the background write of ``gen_dir`` is over (nothing collected)."""
        return self._background_of(gen_dir).done

    def finish(self, gen_dir: str) -> dict[str, Any]:
        """The entries of the files the background write of ``gen_dir`` put on disk
        (waits for it). Raises what failed it (the generation is then abandoned)."""
        bg = self._background_of(gen_dir)
        self._background = None
        files = bg.result()
        w_bin, _ = self._weights_files()
        if w_bin in files:
            # Linkable by the next snapshot only once it is whole on disk.
            self._wrote_weights(files[w_bin]["sha256"])
        return files

    def _write_weights(self, gen: Path, w_bin: str, w_idx: str,
                       codec: ByteplaneCodec | None, pin: bool, deferred: bool = False,
                       writers: list[tuple[str, ChunkFileWriter]] | None = None
                       ) -> dict[str, Any]:
        model = self._model()
        (gen / "weights").mkdir(parents=True, exist_ok=True)
        writer = ChunkFileWriter(gen / w_bin, deferred)
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
        return self._finish_file(gen, w_bin, w_idx, writer, index, writers)

    @staticmethod
    def _finish_file(gen: Path, rel: str, idx: str, writer: ChunkFileWriter,
                     index: dict[str, Any], writers: list[tuple[str, ChunkFileWriter]] | None
                     ) -> dict[str, Any]:
        entries = {idx: write_file(gen / idx, json.dumps(index).encode())}
        if writer.deferred:
            assert writers is not None
            writers.append((rel, writer))
        else:
            entries[rel] = writer.close()
        return entries

    def _write_kv(self, gen: Path, segment: str, n: int,
                  sources: list[tuple[int, Callable[[int, int], torch.Tensor]]],
                  codec: ByteplaneCodec | None, pin: bool, deferred: bool = False,
                  writers: list[tuple[str, ChunkFileWriter]] | None = None
                  ) -> dict[str, Any]:
        """The ``n`` blocks of a KV segment; ``sources`` from :meth:`_kv_rows`."""
        k_bin, k_idx = kv_segment_files(segment, self.rank)
        (gen / "kv").mkdir(parents=True, exist_ok=True)
        writer = ChunkFileWriter(gen / k_bin, deferred)
        index: dict[str, Any] = {"codec": codec.codec.name if codec else "none",
                                 "num_blocks": n, "tensors": []}
        for row, rows_of in sources:
            rows = max(1, CHUNK_BYTES // row)
            chunks = []
            for start in range(0, n, rows):
                gathered = rows_of(start, min(start + rows, n)).contiguous()
                chunks.append(writer.chunk(_encode(codec, gathered.view(-1), start, pin)))
            index["tensors"].append({"row_bytes": row, "chunks": chunks})
        return self._finish_file(gen, k_bin, k_idx, writer, index, writers)

    # -- load (a new process) ---------------------------------------------------

    def weights_held(self, checksums: list[str]) -> bool:
        """This process's weights are the ones a weights file with these piece
        checksums holds (it loaded that file in place, :meth:`load_in_place`)."""
        return self.weights_loaded is not None and self.weights_loaded == checksums

    def weights_key(self, checksums: dict[str, list[str]]) -> list[str] | None:
        """This rank's weights files (bytes and index) as their piece checksums."""
        w_bin, w_idx = self._weights_files()
        if w_bin not in checksums or w_idx not in checksums:
            return None
        return [*checksums[w_bin], *checksums[w_idx]]

    def check_load(self, gen_dir: str) -> None:
        """Raises SnapshotError if the snapshot's weights or KV do not fit this worker;
        writes nothing (a load is refused before any byte changes)."""
        load_weights(self._model(), Path(gen_dir), self.rank, self.device, check_only=True)
        kv = unique_tensors(self._kv_caches())
        for idx in sorted(Path(gen_dir).glob(f"kv/*.rank{self.rank}.json")):
            _check_kv_layout(json.loads(idx.read_text()), kv, self._num_blocks())

    @torch.inference_mode()
    def load_in_place(self, gen_dir: str, checksums: list[str] | None,
                      force: bool = False, verified: bool = True) -> dict[str, Any]:
        """A serving process takes a snapshot's weights (``POST /snapshot/load``): each
        tensor is overwritten where it is, so CUDA graphs and compiled code captured
        with the old weights stay valid. ``checksums``: the weights file's piece
        checksums from the manifest; a process that loaded that file already keeps
        what it has (weights do not change while a server serves), unless ``force``.
        Only a load whose files were verified is remembered as holding them."""
        if not force and checksums is not None and self.weights_held(checksums):
            return {"bytes": 0, "seconds": 0.0, "kept": True}
        # From the first byte written the old weights are gone: whatever this process
        # wrote before must never be linked as its weights again.
        self.weights_written = []
        self.weights_loaded = None
        model = self._model()
        out = load_weights(model, Path(gen_dir), self.rank, self.device)
        if self.device.type == "cpu":
            _repack_cpu_linears(model)
        self.weights_loaded = checksums if verified else None
        return {**out, "kept": False}

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
            _check_kv_layout(index, kv, num_blocks)
            rows_wanted = sorted(wanted)
            codec = codec_for(index["codec"], self.device)
            # Every tensor's chunks are planned (and the layout checked) before a byte
            # is read; then read in file order, ahead of the decode.
            work = [(t.view(num_blocks, -1), c, rows)
                    for t, entry in zip(kv, index["tensors"])
                    for c, rows in _segment_chunks(t.view(num_blocks, -1).shape[1], entry,
                                                   rows_wanted)]
            with ChunkReadAhead(gen / k_bin, [c for _, c, _ in work],
                                self.device.type == "cuda") as reader:
                for (blocks, c, rows), chunk in zip(work, reader):
                    row = blocks.shape[1]
                    staging = torch.empty(c["nbytes"], dtype=torch.uint8, device=self.device)
                    _decode_into(codec, chunk, staging)
                    src = torch.tensor([r - c["offset"] for r, _ in rows],
                                       dtype=torch.long, device=self.device)
                    dst = torch.tensor([b for _, b in rows], dtype=torch.long,
                                       device=self.device)
                    blocks.index_copy_(0, dst, staging.view(-1, row).index_select(0, src))
            n += len(wanted)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return {"blocks": n, "seconds": time.perf_counter() - t0}


def _check_kv_layout(index: dict[str, Any], kv: list[torch.Tensor], num_blocks: int
                     ) -> None:
    """A KV segment's index fits this engine's KV tensors (count and block size)."""
    if len(index["tensors"]) != len(kv):
        raise SnapshotError(f"the snapshot has {len(index['tensors'])} KV tensors, "
                            f"this engine {len(kv)}: a different KV layout")
    for t, entry in zip(kv, index["tensors"]):
        if t.numel() // num_blocks != entry["row_bytes"]:
            raise SnapshotError(f"a KV block is {entry['row_bytes']} bytes in the "
                                f"snapshot, {t.numel() // num_blocks} here: a different "
                                "KV layout")


def _segment_chunks(row: int, entry: dict[str, Any], rows_wanted: list[tuple[int, int]]
                    ) -> list[tuple[dict[str, Any], list[tuple[int, int]]]]:
    """The chunks of one KV tensor of a segment (rows of ``row`` bytes, checked by
    :func:`_check_kv_layout`) that hold wanted rows, each with its (row, target block)
    pairs; refuses a block list that does not fit."""
    out = []
    i = 0
    for c in entry["chunks"]:
        start, rows = c["offset"], c["nbytes"] // row  # KV chunks: offset in rows
        if i < len(rows_wanted) and rows_wanted[i][0] < start:
            break  # the chunks skip it: reported below
        j = i
        while j < len(rows_wanted) and rows_wanted[j][0] < start + rows:
            j += 1
        if i < j:
            out.append((c, rows_wanted[i:j]))
        i = j
    if i < len(rows_wanted):
        raise SnapshotError(f"KV row {rows_wanted[i][0]} is not in its segment: the "
                            "snapshot's block list and KV files disagree")
    return out


def _repack_cpu_linears(model: torch.nn.Module) -> int:
    """The CPU build's linear layers multiply with a packed copy of their weight
    (oneDNN or sgl-kernel) made when the model was loaded; after the weights were
    overwritten in place they are packed again (patch 0016 kept the weights, so the
    packing reads the new ones). Returns how many layers were packed."""
    from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

    n = 0
    for module in model.modules():
        weight = getattr(module, "weight", None)
        # Linear layers only: a conv weight is packed into the weight itself.
        if (hasattr(module, "cpu_linear") and isinstance(weight, torch.Tensor)
                and weight.ndim == 2 and weight.numel()):
            dispatch_cpu_unquantized_gemm(module, remove_weight=False)
            n += 1
    return n


def kv_segment_files(segment: str, rank: int) -> tuple[str, str]:
    """The KV files of one rank's part of a segment (bytes, index)."""
    return f"kv/{segment}.rank{rank}.bin", f"kv/{segment}.rank{rank}.json"


def load_weights(model: torch.nn.Module, gen: Path, rank: int, device: torch.device,
                 check_only: bool = False) -> dict[str, Any]:
    """Every tensor of ``model`` from the snapshot, by name, written in place; a
    mismatch (names, shapes, dtypes, codec) is refused before any tensor is written
    (``check_only``: only that)."""
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
    work: list[tuple[torch.Tensor, dict[str, Any]]] = []
    for name, entry in stored.items():
        t = tensors[name]
        if list(t.shape) != entry["shape"] or str(t.dtype) != entry["dtype"]:
            raise SnapshotError(
                f"{name}: {entry['dtype']} {entry['shape']} in the snapshot, "
                f"{t.dtype} {list(t.shape)} in this model")
        if not t.is_contiguous():
            raise SnapshotError(f"{name} is not contiguous in this model")
        flat = _bytes_of(t.data)
        work += [(flat[c["offset"]:c["offset"] + c["nbytes"]], c) for c in entry["chunks"]]
    if check_only:
        return {"bytes": 0, "seconds": time.perf_counter() - t0}
    nbytes = 0
    with ChunkReadAhead(gen / f"weights/rank{rank}.bin", [c for _, c in work],
                        device.type == "cuda") as reader:
        for (out, c), chunk in zip(work, reader):
            _decode_into(codec, chunk, out)
            nbytes += c["nbytes"]
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


def _drops_codecs(rpc: Callable[..., Any]) -> Callable[..., Any]:
    """The RPC's codecs go when it returns: a serving engine keeps no nvCOMP codec, as
    a driver checkpoint of a process holding one cannot be restored
    (checkpoint_worker.drop_codecs)."""
    @functools.wraps(rpc)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return rpc(*args, **kwargs)
        finally:
            drop_codecs(strict=False)
    return call


@_drops_codecs
def rpc_snapshot_write(worker: Any, gen_dir: str, block_ids: list[int], codec: str,
                       linkable: dict[str, list[str]], kv_segment: str,
                       background: bool = False) -> dict[str, Any]:
    return WorkerSnapshot.of(worker).write(gen_dir, block_ids, codec, linkable, kv_segment,
                                           background)


def rpc_snapshot_done(worker: Any, gen_dir: str) -> bool:
    return WorkerSnapshot.of(worker).done(gen_dir)


def rpc_snapshot_finish(worker: Any, gen_dir: str) -> dict[str, Any]:
    return WorkerSnapshot.of(worker).finish(gen_dir)


def rpc_snapshot_wait(worker: Any) -> None:
    WorkerSnapshot.of(worker).wait()


@_drops_codecs
def rpc_snapshot_load_kv(worker: Any, gen_dir: str,
                         placements: dict[str, list[tuple[int, int]]]) -> dict[str, Any]:
    return WorkerSnapshot.of(worker).load_kv(gen_dir, placements)


def rpc_snapshot_weights_held(worker: Any, checksums: dict[str, list[str]]) -> bool:
    """``checksums``: rel path -> piece checksums of every rank's weights files."""
    part = WorkerSnapshot.of(worker)
    key = part.weights_key(checksums)
    return key is not None and part.weights_held(key)


def rpc_snapshot_load_check(worker: Any, gen_dir: str) -> str | None:
    """Why this worker cannot load the snapshot (None: it can); nothing is written."""
    try:
        WorkerSnapshot.of(worker).check_load(gen_dir)
    except (SnapshotError, OSError, ValueError, KeyError) as e:
        return f"{type(e).__name__}: {e}" if not isinstance(e, SnapshotError) else str(e)
    return None


@_drops_codecs
def rpc_snapshot_load_in_place(worker: Any, gen_dir: str, checksums: dict[str, list[str]],
                               force: bool = False, verified: bool = True) -> dict[str, Any]:
    part = WorkerSnapshot.of(worker)
    return {"rank": part.rank, **part.load_in_place(gen_dir, part.weights_key(checksums),
                                                    force, verified)}
