# SPDX-License-Identifier: Apache-2.0
"""Worker side of ``POST /checkpoint``: device bytes to compressed host memory and back.

A checkpoint keeps, in host memory, what the engine needs to serve again exactly as
before: every byte of the weights and of the other device state the release loses
(the V2 runner's block tables live in the KV pool) and, if asked, the KV blocks in use
(the caller names them; free blocks are not copied). Bytes are compressed where they live, on the
GPU with nvCOMP, before they cross PCIe (:mod:`vllm.v1.checkpoint.byteplane`). Then the
device memory is released:

- CUDA: the sleep-mode allocator (``--enable-sleep-mode``) unmaps every allocation of
  its pool but keeps the virtual addresses, so CUDA graphs and compiled kernels stay
  valid; restore maps them again and writes the bytes back. What remains on the GPU
  (context, workspaces; CUDA graphs' memory too when it is not in the pool,
  :mod:`vllm.v1.checkpoint.graph_pool`) is what the driver checkpoint then copies.
- CPU: nothing to release; the tensors are zeroed instead, so a restore that failed to
  write a byte back could not go unnoticed (the CPU build tests this path).
"""

from __future__ import annotations

import gc
import mmap
import os
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from vllm.logger import init_logger

from vllm.v1.checkpoint.byteplane import (
    ByteplaneCodec,
    EncodedTensor,
    NvcompPlaneCodec,
    ZlibPlaneCodec,
)
from vllm.v1.worker.kv_mirror_transport import unique_tensors
from vllm.v1.worker.kv_mirror_worker import unwrap_worker

logger = init_logger(__name__)

# Regions are encoded in chunks: bounded temporary device memory, and nvCOMP is as
# fast on 128 MiB as on more.
CHUNK_BYTES = 128 << 20

CODECS = ("auto", "ans", "gdeflate", "zlib", "none")


class CheckpointWorkerError(RuntimeError):
    pass


_CODECS: dict[tuple[str, str], ByteplaneCodec] = {}
# Every codec made and not yet collected, cached or not: what a strict drop checks, so
# one that outlived a lenient drop still stops the next release.
_LIVE: weakref.WeakSet[ByteplaneCodec] = weakref.WeakSet()


def make_codec(name: str, device: torch.device) -> ByteplaneCodec | None:
    """``auto``: nvCOMP ANS on CUDA (the fastest decode at the best ratio measured on
    the H100, benchmarks/RESULTS.md "byte-plane compression"), zlib on CPU. ``none``:
    bytes are stored raw. One codec per kind and device at a time (a snapshot's and a
    checkpoint's share it), and none across a driver checkpoint: see drop_codecs."""
    key = (name, str(device))
    if key not in _CODECS:
        codec = _make_codec(name, device)
        if codec is None:
            return None
        _CODECS[key] = codec
        _LIVE.add(codec)
    return _CODECS[key]


def drop_codecs(strict: bool = True) -> None:
    """Destroy every codec of the process (nvCOMP's with them). Found on the H100
    (driver 580): a process that holds a live nvCOMP codec when the driver checkpoints
    it fails the driver's restore (CUDA_ERROR_UNKNOWN, and the process is lost); the
    same process with its codecs destroyed first restores
    (tests/gpu/driver_nvcomp_probe.py, benchmarks/RESULTS.md "tenth session"). A
    checkpoint drops them before the release and makes a new one after the restore.
    Raises if one outlives the drop (something still holds it), so the checkpoint
    stops before the release instead of losing the process at the restore;
    ``strict=False`` (after a restore, so that a serving engine holds no codec from
    it) only logs that."""
    _CODECS.clear()
    if len(_LIVE):  # held, or in a reference cycle: a full collection tells which
        gc.collect()
    held = list(_LIVE)
    if not strict:
        # Only nvCOMP's matter to the driver (a CPU snapshot's background write may
        # still hold its zlib codec).
        nvcomp = [c for c in held if isinstance(c.codec, NvcompPlaneCodec)]
        if nvcomp:
            logger.warning("A codec (%s) outlived its use; a driver checkpoint of this "
                           "process before it goes would not restore",
                           nvcomp[0].codec.name)
    elif held:
        raise CheckpointWorkerError(
            f"a codec ({held[0].codec.name}) is still referenced; the driver could not "
            "restore this process, so the GPU is not released")


def _make_codec(name: str, device: torch.device) -> ByteplaneCodec | None:
    if name not in CODECS:
        raise CheckpointWorkerError(f"unknown codec {name!r}; one of {', '.join(CODECS)}")
    if name == "none":
        return None
    if name == "auto":
        name = "ans" if device.type == "cuda" else "zlib"
    if name == "zlib":
        return ByteplaneCodec(ZlibPlaneCodec(level=1))
    if device.type != "cuda":
        raise CheckpointWorkerError(f"codec {name!r} is nvCOMP, which needs a CUDA device")
    return ByteplaneCodec(NvcompPlaneCodec("ANS" if name == "ans" else "GDeflate"))


@dataclass
class HostChunk:
    """One chunk of a region, in host memory."""

    offset: int
    nbytes: int
    planes: EncodedTensor | None = None  # None: raw bytes in ``raw``
    raw: torch.Tensor | None = None

    @property
    def stored_bytes(self) -> int:
        return self.planes.stored_bytes if self.planes is not None else self.nbytes

    def host_tensors(self) -> list[torch.Tensor]:
        """The stored bytes: one raw tensor or one per plane."""
        if self.planes is None:
            return [self.raw]
        return [p.data for p in self.planes.planes]


@dataclass
class HostImage:
    """Everything one worker keeps in host memory while checkpointed."""

    codec: str
    weights: list[tuple[int, list[HostChunk]]] = field(default_factory=list)
    kv_block_ids: list[int] = field(default_factory=list)
    kv: list[list[HostChunk]] = field(default_factory=list)  # per KV allocation

    def sizes(self) -> dict[str, int]:
        def raw(chunks):
            return sum(c.nbytes for c in chunks)

        def stored(chunks):
            return sum(c.stored_bytes for c in chunks)

        w = [c for _, chunks in self.weights for c in chunks]
        k = [c for chunks in self.kv for c in chunks]
        return {"weights_raw": raw(w), "weights_stored": stored(w),
                "kv_raw": raw(k), "kv_stored": stored(k)}


class DeviceMemory(Protocol):
    """Where the weights live and how their memory is given up and taken back."""

    releases_memory: bool

    def regions(self, kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
        """Flat uint8 views of every byte kept whole: the weights, and device state
        the release loses that is not KV blocks (kept per block, only those in use)."""

    def release(self, kv_caches: list[torch.Tensor]) -> None: ...

    def reacquire(self) -> None: ...

    def graph_pool_bytes(self) -> int:
        """Bytes of CUDA-graph pool a release gives up (graph_pool.py)."""


class _DevicePointer:
    """A raw device range as an array torch can view without copying."""

    def __init__(self, ptr: int, nbytes: int) -> None:
        self.__cuda_array_interface__ = {"shape": (nbytes,), "typestr": "|u1",
                                         "data": (ptr, False), "version": 3}


class SleepAllocatorMemory:
    """CUDA: the allocations of upstream's sleep-mode allocator (``CuMemAllocator``)."""

    releases_memory = True

    def __init__(self, device: torch.device) -> None:
        from vllm.device_allocator.cumem import CuMemAllocator

        self.allocator = CuMemAllocator.get_instance()
        self.device = device
        tags = {d.tag for d in self.allocator.pointer_to_data.values()}
        if "weights" not in tags:
            raise CheckpointWorkerError(
                "the weights are not in the sleep-mode allocator's pool: start the server "
                "with --enable-sleep-mode to use /checkpoint on CUDA")

    def regions(self, kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
        # The kv_cache pool holds more than KV blocks (the V2 runner's block tables,
        # for one): an allocation that is not exactly a KV cache tensor is kept whole,
        # or a request frozen with the engine would resume on garbage block tables.
        kv = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
              for t in kv_caches}
        keep = []
        for ptr, d in sorted(self.allocator.pointer_to_data.items()):
            size = d.handle[1]
            only_kv = d.tag == "kv_cache" and ptr in kv and size - kv[ptr] < (2 << 20)
            if d.tag == "weights" or (d.tag == "kv_cache" and not only_kv):
                keep.append(torch.as_tensor(_DevicePointer(ptr, size), device=self.device))
        return keep

    def graph_pool_bytes(self) -> int:
        from vllm.v1.checkpoint.graph_pool import GRAPH_TAG

        return sum(d.handle[1] for d in self.allocator.pointer_to_data.values()
                   if d.tag == GRAPH_TAG)

    def release(self, kv_caches: list[torch.Tensor]) -> None:
        # Nothing is offloaded by the allocator: the bytes worth keeping are already
        # in host memory, compressed.
        self.allocator.sleep(offload_tags=())

    def reacquire(self) -> None:
        self.allocator.wake_up(None)


class TensorMemory:
    """Any device: the model's parameters and buffers, zeroed instead of released."""

    releases_memory = False

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    def regions(self, kv_caches: list[torch.Tensor]) -> list[torch.Tensor]:
        tensors = [t for _, t in self.model.named_parameters(remove_duplicate=False)]
        tensors += [t for _, t in self.model.named_buffers(remove_duplicate=False)]
        return unique_tensors(t for t in tensors if t.numel())

    def graph_pool_bytes(self) -> int:
        return 0

    def release(self, kv_caches: list[torch.Tensor]) -> None:
        for t in self.regions(kv_caches) + unique_tensors(kv_caches):
            t.zero_()

    def reacquire(self) -> None:
        pass


class HostArena:
    """Pinned host memory for checkpoint images, kept for the process's next one
    (``pin=False``: the same packing in plain memory).

    torch's pinned allocator rounds each allocation up to a power of two (a 24 MiB
    exponent plane holds 32 MiB: the ~8B image of 11.5 GiB held 14.7 GiB on the H100
    host) and pins at ~1.3 GiB/s (11 s of a process's first checkpoint). Planes are
    packed into segments instead, pinned once per process, or at server start
    (``--checkpoint-prepin``), so even the first checkpoint only copies.

    Segments are anonymous mappings in transparent huge pages, registered with the
    driver (``cuMemHostRegister``). The driver's restore maps every pinned page of the
    process again: in a probe on the H100 host (``tests/gpu/driver_nvcomp_probe.py``)
    12 GiB pinned by ``cudaHostAlloc`` added 0.4-0.7 s to it, 12 GiB registered in huge
    pages 0.05-0.16 s (the ~8B engine's driver restore: 0.71 -> 0.52-0.70 s).
    Unpinning the segments for the checkpoint and registering them again while the
    reload ran cost the reload as much as it saved (benchmarks/RESULTS.md, eleventh
    session).
    """

    SEGMENT_BYTES = 1 << 30
    ALIGN = 4096

    def __init__(self, pin: bool = True) -> None:
        self.pin = pin
        self.segments: list[torch.Tensor] = []
        self._warned = False
        # Unregister when the segment goes (a test's arena, a worker's shutdown; the
        # views of an image hold it): an unmapped range must not stay pinned.
        self.unregister_on_collect: list[weakref.finalize] = []
        self._seg = 0
        self._off = 0

    @property
    def capacity(self) -> int:
        return sum(s.numel() for s in self.segments)

    def take(self, nbytes: int) -> torch.Tensor:
        """``nbytes`` of pinned memory, valid until :meth:`reset`."""
        need = -(-nbytes // self.ALIGN) * self.ALIGN
        while True:
            if self._seg == len(self.segments):
                self.segments.append(self._pin(max(self.SEGMENT_BYTES, need)))
            seg = self.segments[self._seg]
            if self._off + need <= seg.numel():
                view = seg[self._off:self._off + nbytes]
                self._off += need
                return view
            self._seg, self._off = self._seg + 1, 0

    def reserve(self, nbytes: int) -> None:
        while self.capacity < nbytes:
            self.segments.append(self._pin(self.SEGMENT_BYTES))

    def reset(self) -> None:
        """Every view taken so far is free again (the image that held them is gone)."""
        self._seg = self._off = 0

    def _pin(self, nbytes: int) -> torch.Tensor:
        if not self.pin:
            return torch.empty(nbytes, dtype=torch.uint8)
        buf = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        _advise(buf)
        seg = torch.frombuffer(buf, dtype=torch.uint8)  # holds ``buf`` while it lives
        try:
            _register_host(seg.data_ptr(), seg.numel())
        except Exception as e:
            del seg
            buf.close()
            if not self._warned:
                self._warned = True
                logger.warning("Checkpoint image: registering host memory failed (%s); "
                               "pinning with cudaHostAlloc instead (4 KiB pages: a "
                               "slower driver restore)", e)
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
        self.unregister_on_collect.append(
            weakref.finalize(seg, _unregister_host, seg.data_ptr()))
        return seg


def _advise(buf: mmap.mmap) -> None:
    """Huge pages (the point of the arena), and none of it in a forked child (pinned
    pages are copied eagerly at fork) or in a core dump. Each is best effort: a kernel
    without transparent huge pages answers EINVAL."""
    for name in ("MADV_HUGEPAGE", "MADV_DONTFORK", "MADV_DONTDUMP"):
        advice = getattr(mmap, name, None)
        if advice is not None:
            try:
                buf.madvise(advice)
            except OSError:
                pass


# Through the driver API: the runtime's cudaHostRegister leaves a failure as the
# thread's last error, which the next kernel launch check would raise in unrelated code.
_CU_MEMHOSTREGISTER_PORTABLE = 0x01


def _register_host(ptr: int, nbytes: int) -> None:
    from cuda.bindings import driver

    _make_context_current(driver)
    err, = driver.cuMemHostRegister(ptr, nbytes, _CU_MEMHOSTREGISTER_PORTABLE)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise CheckpointWorkerError(f"cuMemHostRegister: {getattr(err, 'name', err)}")


def _make_context_current(driver) -> None:
    """The device's primary context (torch's) current on this thread. The driver API
    needs one, and torch makes it current only on a thread's first CUDA work: an arena
    pinned before any failed with CUDA_ERROR_NOT_INITIALIZED, or INVALID_CONTEXT, and
    fell back to 4 KiB pages (seen on the H100)."""
    err, ctx = driver.cuCtxGetCurrent()
    if err == driver.CUresult.CUDA_SUCCESS and int(ctx):
        return
    torch.cuda.init()  # cuInit and torch's own device state
    err, dev = driver.cuDeviceGet(torch.cuda.current_device())
    if err == driver.CUresult.CUDA_SUCCESS:
        # Retained for the process's life, as the CUDA runtime retains it for torch.
        err, ctx = driver.cuDevicePrimaryCtxRetain(dev)
    if err == driver.CUresult.CUDA_SUCCESS:
        err, = driver.cuCtxSetCurrent(ctx)
    if err != driver.CUresult.CUDA_SUCCESS:
        raise CheckpointWorkerError(f"no CUDA context: {getattr(err, 'name', err)}")


def _unregister_host(ptr: int) -> None:
    try:
        from cuda.bindings import driver

        # The last reference may go on any thread: the registration's context current.
        _make_context_current(driver)
        driver.cuMemHostUnregister(ptr)
    except Exception:  # the process is going; nothing to hand back to
        pass


def _host(nbytes: int, pin: bool, arena: HostArena | None) -> torch.Tensor:
    if arena is not None:
        return arena.take(nbytes)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=pin)


def _encode(codec: ByteplaneCodec | None, chunk: torch.Tensor, offset: int,
            pin: bool, arena: HostArena | None = None) -> HostChunk:
    n = chunk.numel()
    if codec is None:
        host = _host(n, pin, arena)
        host.copy_(chunk, non_blocking=pin)
        return HostChunk(offset, n, raw=host)
    # Two planes (sign+exponent, mantissa) for the 16-bit data that dominates weights
    # and KV; the split is a permutation, so any bytes round-trip exactly.
    view = chunk.view(torch.int16) if n % 2 == 0 else chunk
    enc = codec.encode(view)
    for p in enc.planes:
        host = _host(p.data.numel(), pin, arena)
        host.copy_(p.data, non_blocking=pin)
        p.data = host
    _settle(chunk)
    return HostChunk(offset, n, planes=enc)


def _settle(t: torch.Tensor) -> None:
    """Wait for the chunk's copies before its device buffers go: nvCOMP's outputs are
    freed outside torch's stream-ordered caching allocator."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _upload(chunk: HostChunk, device: torch.device) -> list[torch.Tensor]:
    """The chunk's stored bytes on ``device`` (asynchronous from pinned memory)."""
    return [t.to(device, non_blocking=True) for t in chunk.host_tensors()]


def _decode(codec: ByteplaneCodec | None, chunk: HostChunk, parts: list[torch.Tensor],
            out: torch.Tensor) -> list[torch.Tensor]:
    """Uploaded stored bytes -> the chunk's original bytes in ``out``. Returns the
    decoded planes: nvCOMP frees them outside torch's stream order, so the caller
    keeps them until the copies out of them have run (``_settle``)."""
    if chunk.planes is None:
        out.copy_(parts[0])
        return []
    planes = chunk.planes.planes
    size = len(planes)
    cols = out.view(-1, size)
    decoded = []
    for i, (p, data) in enumerate(zip(planes, parts)):
        plane = codec.codec.decode(data, p.nbytes) if p.compressed else data
        cols[:, size - 1 - i].copy_(plane)
        decoded.append(plane)
    return decoded


def _decode_into(codec: ByteplaneCodec | None, chunk: HostChunk, out: torch.Tensor) -> None:
    """One chunk, synchronously (snapshots: their chunks arrive one read at a time)."""
    if chunk.planes is None:
        out.copy_(chunk.raw, non_blocking=True)
        _settle(out)
        return
    decoded = _decode(codec, chunk, _upload(chunk, out.device), out)
    _settle(out)
    del decoded


@dataclass
class WriteBack:
    """One chunk to write back: where its bytes go, and what follows their decode."""

    chunk: HostChunk
    target: Callable[[], torch.Tensor]
    then: Callable[[torch.Tensor], None] | None = None


# Chunks uploaded ahead of the one decoding. Device memory at the peak: these, the one
# decoding and the one retiring (each a chunk's stored bytes, plus decoded planes or a
# KV staging buffer for the last two): ~0.6-0.9 GiB with 128 MiB chunks, returned to
# the driver at the end of a restore.
# One ahead left the link idle whenever a chunk's decode calls took the host longer
# than the next chunk's upload, and a device-wide sync per chunk waited for the upload
# in flight as well: ~8B weights reloaded in 0.29 s where PCIe allows ~0.18 s.
WRITE_BACK_AHEAD = 3


def write_back(codec: ByteplaneCodec | None, jobs: Iterable[WriteBack],
               device: torch.device) -> int:
    """Decode every job's chunk into its target; returns the raw bytes written.

    On CUDA the uploads of the next chunks (PCIe, a side stream) run while chunk i
    decodes: the copy of the compressed bytes, not the decode, bounds a restore (the
    decode runs at ~190 GB/s on the H100, PCIe at ~50), so the link should never wait
    for the host.
    """
    written = 0
    if device.type != "cuda":
        for job in jobs:
            out = job.target()
            _decode_into(codec, job.chunk, out)
            if job.then is not None:
                job.then(out)
            written += job.chunk.nbytes
        return written
    side = torch.cuda.Stream(device)
    main = torch.cuda.current_stream(device)

    def upload(job: WriteBack) -> tuple[WriteBack, list[torch.Tensor], torch.cuda.Event]:
        with torch.cuda.stream(side):
            parts = _upload(job.chunk, device)
            done = torch.cuda.Event()
            done.record(side)
        return job, parts, done

    from vllm.ha import envs as ha_envs

    depth = ha_envs.checkpoint_upload_ahead() or WRITE_BACK_AHEAD
    it = iter(jobs)
    ahead: deque[tuple[WriteBack, list[torch.Tensor], torch.cuda.Event]] = deque()

    def refill() -> None:
        while len(ahead) < depth:
            following = next(it, None)
            if following is None:
                return
            ahead.append(upload(following))

    # nvCOMP frees its outputs outside torch's stream-ordered allocator, and the side
    # stream's buffers are freed on this one: a chunk's buffers are kept until an event
    # after its own work has passed (not a device-wide sync, which would wait for the
    # uploads ahead too); the previous chunk's, so its decode on the GPU overlaps the
    # host's calls for this one. ~8B on the H100: the reload 0.36 s at 57-62 GB/s, the
    # weights' part still ~37 GB/s (nvCOMP's per-call host cost, not the link).
    retiring: tuple[torch.cuda.Event, list[Any]] | None = None

    def retire() -> None:
        nonlocal retiring
        if retiring is not None:
            retiring[0].synchronize()
            retiring = None

    try:
        refill()
        while ahead:
            job, parts, done = ahead.popleft()
            # The host waits for this chunk's bytes whatever stream nvCOMP decodes on.
            done.synchronize()
            refill()
            out = job.target()
            # nvCOMP decodes on its own stream, which (like torch's default stream here)
            # synchronizes with the legacy default stream: the copies out of its planes
            # on ``main`` follow the decode, so ``consumed`` covers the decode too.
            decoded = _decode(codec, job.chunk, parts, out)
            if job.then is not None:
                job.then(out)
            consumed = torch.cuda.Event()
            consumed.record(main)
            retire()
            retiring = (consumed, [parts, out, decoded])
            written += job.chunk.nbytes
            del parts, out, decoded
        retire()
    except BaseException:
        # Uploads ahead and copies into the pool may still run: the caller unmaps the
        # pool next (a retried restore maps it afresh), which must not happen under them.
        torch.cuda.synchronize(device)
        raise
    return written


def _checkpoint_chunk_bytes() -> int:
    from vllm.ha import envs as ha_envs

    return ha_envs.checkpoint_chunk_bytes() or CHUNK_BYTES


def _chunks(region: torch.Tensor, size: int | None = None):
    size = size or CHUNK_BYTES
    for off in range(0, region.numel(), size):
        yield off, region[off:off + size]


class WorkerPart:
    """State a feature keeps on one worker (checkpoint, snapshot), found again by the
    next ``collective_rpc`` through the worker attribute ``ATTR``."""

    ATTR: str

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.device = torch.device(getattr(worker, "device", "cpu"))

    @classmethod
    def of(cls, worker: Any) -> Any:
        worker = unwrap_worker(worker)
        part = getattr(worker, cls.ATTR, None)
        if part is None:
            part = cls(worker)
            setattr(worker, cls.ATTR, part)
        return part

    def _kv_caches(self) -> list[torch.Tensor]:
        kv = getattr(self.worker.model_runner, "kv_caches", None) or []
        return list(kv.values()) if isinstance(kv, dict) else list(kv)

    def _num_blocks(self) -> int:
        return int(self.worker.vllm_config.cache_config.num_gpu_blocks or 0)


class WorkerCheckpoint(WorkerPart):
    """One worker's checkpoint: offload + release, then reacquire + restore."""

    ATTR = "ha_checkpoint"

    def __init__(self, worker: Any) -> None:
        super().__init__(worker)
        self.image: HostImage | None = None
        self._memory: DeviceMemory | None = None
        self._codec_name: str | None = None
        # CUDA only: the CPU build's image is plain memory, returned after a restore.
        self.arena = HostArena() if self.device.type == "cuda" else None

    def _make_memory(self) -> DeviceMemory:
        if self.device.type == "cuda":
            return SleepAllocatorMemory(self.device)
        return TensorMemory(self.worker.model_runner.model)

    def plan(self, kv_block_ids: list[int]) -> dict[str, int]:
        """Raw bytes a checkpoint would keep (the host memory it needs at most)."""
        kv_caches = self._kv_caches()
        weights = sum(r.numel() for r in self._make_memory().regions(kv_caches))
        kv = unique_tensors(kv_caches)
        num_blocks = self._num_blocks()
        per_block = sum(t.numel() // num_blocks for t in kv) if num_blocks else 0
        return {"weights_raw": weights, "kv_raw": per_block * len(kv_block_ids),
                "host_pinned": self.arena.capacity if self.arena is not None else 0}

    def prepin(self, fraction: float, nbytes: int | None = None) -> dict[str, Any]:
        """Pin host memory now (server start): ``nbytes``, else ``fraction`` of the
        weights' raw bytes, so the first checkpoint does not pin while the engine is
        paused."""
        if self.arena is None:
            return {"pid": os.getpid(), "host_pinned": 0, "seconds": 0.0}
        t0 = time.perf_counter()
        self.arena.reserve(nbytes if nbytes is not None
                           else int(self.plan([])["weights_raw"] * fraction))
        return {"pid": os.getpid(), "host_pinned": self.arena.capacity,
                "seconds": time.perf_counter() - t0}

    @torch.inference_mode()
    def offload(self, kv_block_ids: list[int], codec_name: str) -> dict[str, Any]:
        if self.image is not None:
            raise CheckpointWorkerError("this worker is already checkpointed")
        t0 = time.perf_counter()
        memory = self._make_memory()
        codec = make_codec(codec_name, self.device)
        pin = self.device.type == "cuda"
        image = HostImage(codec=codec.codec.name if codec else "none",
                          kv_block_ids=list(kv_block_ids))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        kv_caches = self._kv_caches()
        try:
            t_weights = self._encode_image(image, memory, codec, kv_caches, pin)
            t_kv = time.perf_counter()
            del codec
            if memory.releases_memory:
                drop_codecs()
        except BaseException:
            # Nothing released yet: the image is dropped and its arena space free.
            if self.arena is not None:
                self.arena.reset()
            raise
        graph_pool = memory.graph_pool_bytes()
        memory.release(kv_caches)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
        t_release = time.perf_counter()
        self.image, self._memory, self._codec_name = image, memory, codec_name
        sizes = image.sizes()
        logger.info(
            "Checkpoint: %.2f GiB of weights -> %.2f GiB, %d KV blocks %.2f -> %.2f GiB "
            "in host memory (%s); device memory %s in %.2f s",
            sizes["weights_raw"] / 2**30, sizes["weights_stored"] / 2**30,
            len(kv_block_ids), sizes["kv_raw"] / 2**30, sizes["kv_stored"] / 2**30,
            image.codec, "released" if memory.releases_memory else "zeroed (CPU)",
            t_release - t0)
        return {"pid": os.getpid(), "device": str(self.device), "codec": image.codec,
                "releases_memory": memory.releases_memory, **sizes,
                "kv_blocks": len(kv_block_ids), "graph_pool_released": graph_pool,
                "host_pinned": self.arena.capacity if self.arena is not None else 0,
                "seconds": {"weights": t_weights - t0, "kv": t_kv - t_weights,
                            "release": t_release - t_kv}}

    def _encode_image(self, image: HostImage, memory: DeviceMemory,
                      codec: ByteplaneCodec | None, kv_caches: list[torch.Tensor],
                      pin: bool) -> float:
        """Weights (and the KV blocks named) into ``image``; returns when the weights
        were done."""
        arena = self.arena
        from vllm.ha import envs as ha_envs

        chunk_bytes = _checkpoint_chunk_bytes()
        ha_envs.checkpoint_upload_ahead()  # a bad value fails here, not the restore
        for region in memory.regions(kv_caches):
            image.weights.append((region.data_ptr(), [
                _encode(codec, c, off, pin, arena)
                for off, c in _chunks(region, chunk_bytes)]))
        t_weights = time.perf_counter()
        if image.kv_block_ids:
            ids = torch.tensor(image.kv_block_ids, dtype=torch.long, device=self.device)
            num_blocks = self._num_blocks()
            for t in unique_tensors(kv_caches):
                blocks = t.view(num_blocks, -1)
                rows = max(1, chunk_bytes // blocks.shape[1])
                chunks = []
                for start in range(0, len(image.kv_block_ids), rows):
                    gathered = blocks.index_select(0, ids[start:start + rows]).view(-1)
                    chunks.append(_encode(codec, gathered, start, pin, arena))
                image.kv.append(chunks)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return t_weights

    def _write_back_image(self, image: HostImage, memory: DeviceMemory,
                          codec: ByteplaneCodec | None) -> tuple[int, int, float]:
        """Every byte of ``image`` back where it came from; returns the raw bytes of
        weights and KV written and when the weights were done."""
        regions = {r.data_ptr(): r for r in memory.regions(self._kv_caches())}
        for ptr, _ in image.weights:
            if ptr not in regions:
                raise CheckpointWorkerError(f"weights region at {ptr:#x} is gone")

        def region_slice(region: torch.Tensor, c: HostChunk) -> Callable[[], torch.Tensor]:
            return lambda: region[c.offset:c.offset + c.nbytes]

        weights_raw = write_back(codec, (
            WriteBack(c, region_slice(regions[ptr], c))
            for ptr, chunks in image.weights for c in chunks), self.device)
        # Every byte of the pool is back (KV blocks below), so upstream's
        # post_kv_cache_wake_up (which re-zeroes fp8 KV and resets its scales) must not
        # run: it would undo the restore.
        t_weights = time.perf_counter()
        kv_raw = 0
        if image.kv_block_ids:
            num_blocks = self._num_blocks()
            ids = torch.tensor(image.kv_block_ids, dtype=torch.long, device=self.device)

            def kv_jobs():
                for t, chunks in zip(unique_tensors(self._kv_caches()), image.kv):
                    blocks = t.view(num_blocks, -1)
                    for c in chunks:
                        rows = c.nbytes // blocks.shape[1]

                        def scatter(staging: torch.Tensor, blocks=blocks, c=c,
                                    rows=rows) -> None:
                            blocks.index_copy_(0, ids[c.offset:c.offset + rows],
                                               staging.view(rows, -1))

                        yield WriteBack(c, lambda c=c: torch.empty(
                            c.nbytes, dtype=torch.uint8, device=self.device), scatter)

            kv_raw = write_back(codec, kv_jobs(), self.device)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.empty_cache()  # the write-back's transient buffers (~1 GiB)
        return weights_raw, kv_raw, t_weights

    def abort(self) -> dict[str, Any]:
        """After a checkpoint that failed on another worker: this one restores if it
        had offloaded (with TP > 1 the others may have released their memory)."""
        if self.image is None:
            return {"pid": os.getpid(), "restored": False}
        return {**self.restore(), "restored": True}

    @torch.inference_mode()
    def restore(self) -> dict[str, Any]:
        if self.image is None or self._memory is None:
            raise CheckpointWorkerError("this worker is not checkpointed")
        image, memory = self.image, self._memory
        t0 = time.perf_counter()
        # A new codec: the offload's was destroyed before the driver checkpoint.
        codec = make_codec(self._codec_name or "none", self.device)
        t_codec = time.perf_counter()
        memory.reacquire()
        t_map = time.perf_counter()
        try:
            weights_raw, kv_raw, t_weights = self._write_back_image(image, memory, codec)
        except BaseException:
            # Unmapped again, as before this call: a retried /restore maps the pool
            # afresh (mapping an allocation that is mapped fails) and writes it all.
            try:
                memory.release(self._kv_caches())
            except Exception:
                logger.exception("Restore failed and the pool could not be released "
                                 "again; a retry may fail too")
            raise
        t_kv = time.perf_counter()
        self.image = self._memory = self._codec_name = None
        if self.arena is not None:
            self.arena.reset()
        # Found on the H100 (this series' benchmark, eleventh session): after a restore
        # the cached codec made a later driver checkpoint of the serving engine (the
        # benchmark's sleep + driver baseline) fail its restore.
        del codec
        drop_codecs(strict=False)
        seconds = t_kv - t_map
        return {"pid": os.getpid(), "raw_bytes": weights_raw + kv_raw,
                "gbps": round((weights_raw + kv_raw) / seconds / 1e9, 2) if seconds else None,
                "seconds": {"codec": t_codec - t0, "map": t_map - t_codec,
                            "weights": t_weights - t_map, "kv": t_kv - t_weights}}


# -- engine wiring: collective_rpc(fn, args=...) runs these on every worker ----------


def rpc_checkpoint_plan(worker: Any, kv_block_ids: list[int]) -> dict[str, int]:
    return WorkerCheckpoint.of(worker).plan(kv_block_ids)


def rpc_checkpoint_offload(worker: Any, kv_block_ids: list[int], codec: str
                           ) -> dict[str, Any]:
    return WorkerCheckpoint.of(worker).offload(kv_block_ids, codec)


def rpc_checkpoint_restore(worker: Any) -> dict[str, Any]:
    return WorkerCheckpoint.of(worker).restore()


def rpc_checkpoint_abort(worker: Any) -> dict[str, Any]:
    return WorkerCheckpoint.of(worker).abort()


def rpc_checkpoint_prepin(worker: Any, fraction: float, nbytes: int | None = None
                          ) -> dict[str, Any]:
    return WorkerCheckpoint.of(worker).prepin(fraction, nbytes)
