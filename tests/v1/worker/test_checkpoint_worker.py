"""The worker side of /checkpoint on real tensors: every byte comes back, chunked or
not, compressed or raw, and only the KV blocks named are kept.

The worker here is a container of what WorkerCheckpoint reads (a real torch model, real
KV tensors, the config field); the engine-level path runs end to end in
tests/entrypoints/serve/test_checkpoint.py."""

from __future__ import annotations

import gc
import weakref
from types import SimpleNamespace

import pytest
import torch

from tests.utils import ON_CUDA
from tests.v1.core.test_kv_mirror import make_manager, make_request, prefill
from vllm.ha import envs as ha_envs
from vllm.v1.engine.checkpoint import blocks_in_use
from vllm.v1.worker import checkpoint_worker as cw

DEVICE = torch.device("cuda" if ON_CUDA else "cpu")
CODECS = ["none", "zlib"] + (["ans", "gdeflate"] if ON_CUDA else [])
NUM_BLOCKS = 12


def bf16_weights(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g) * 0.02).to(torch.bfloat16).to(DEVICE)


@pytest.mark.parametrize("codec", CODECS)
@pytest.mark.parametrize("nbytes", [2, 7, 40000, 3 * 16384 + 1])
def test_chunk_round_trip_is_byte_exact(codec, nbytes, monkeypatch):
    region = torch.randint(0, 256, (nbytes,), dtype=torch.uint8, device=DEVICE)
    region[: nbytes // 2] = bf16_weights(nbytes // 4 + 1).view(torch.uint8)[: nbytes // 2]
    monkeypatch.setattr(cw, "CHUNK_BYTES", 16384)  # several chunks, an odd last one
    c = cw.make_codec(codec, DEVICE)
    chunks = [cw._encode(c, chunk, off, pin=False) for off, chunk in cw._chunks(region)]
    assert [ch.offset for ch in chunks] == list(range(0, nbytes, 16384))
    assert all(ch.planes is None for ch in chunks) == (codec == "none")
    out = torch.zeros_like(region)
    for ch in chunks:
        cw._decode_into(c, ch, out[ch.offset:ch.offset + ch.nbytes])
    assert torch.equal(out, region)


def test_bf16_weights_shrink_and_random_bytes_are_stored_raw():
    c = cw.make_codec("auto", DEVICE)
    weights = bf16_weights(1 << 16).view(torch.uint8)
    ch = cw._encode(c, weights, 0, pin=False)
    exponent, mantissa = ch.planes.planes
    assert exponent.compressed and exponent.data.numel() < exponent.nbytes * 0.6
    assert not mantissa.compressed  # close to uniform: compressing it would not pay
    noise = torch.randint(0, 256, (1 << 16,), dtype=torch.uint8, device=DEVICE)
    assert not any(p.compressed for p in cw._encode(c, noise, 0, pin=False).planes.planes)


def test_unknown_codec_and_nvcomp_without_cuda_are_refused():
    with pytest.raises(cw.CheckpointWorkerError, match="unknown codec"):
        cw.make_codec("lz4", DEVICE)
    with pytest.raises(cw.CheckpointWorkerError, match="needs a CUDA device"):
        cw.make_codec("ans", torch.device("cpu"))


class TinyModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(64, 16)
        self.proj = torch.nn.Linear(16, 16)
        self.tied = self.proj  # a shared module counts once
        self.register_buffer("scale", torch.arange(5, dtype=torch.float32))


def cpu_worker() -> SimpleNamespace:
    torch.manual_seed(0)
    model = TinyModel().to(torch.bfloat16)
    # Two layers sharing one allocation, like vLLM's KV layout per attention group.
    kv = torch.randn(NUM_BLOCKS, 2, 4, 8).to(torch.bfloat16)
    return SimpleNamespace(
        device="cpu", model_runner=SimpleNamespace(model=model, kv_caches=[kv, kv[:]]),
        vllm_config=SimpleNamespace(cache_config=SimpleNamespace(num_gpu_blocks=NUM_BLOCKS)))


@pytest.mark.parametrize("codec", ["none", "zlib"])
def test_cpu_offload_zeroes_and_restore_brings_every_kept_byte_back(codec):
    worker = cpu_worker()
    model, kv = worker.model_runner.model, worker.model_runner.kv_caches[0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    kv_before = kv.clone()
    keep = [1, 4, 5, 11]
    ckpt = cw.WorkerCheckpoint(worker)
    assert ckpt.plan(keep)["kv_raw"] == len(keep) * kv[0].numel() * 2
    out = ckpt.offload(keep, codec)
    assert out["kv_blocks"] == len(keep) and not out["releases_memory"]
    # Every parameter and buffer once (the tied module is not counted twice).
    assert out["weights_raw"] == (64 * 16 + 16 * 16 + 16 + 5) * 2
    # Nothing of the weights or the KV is left where the engine reads it.
    assert all(not v.any() for v in model.state_dict().values())
    assert not kv.any()
    with pytest.raises(cw.CheckpointWorkerError, match="already checkpointed"):
        ckpt.offload(keep, codec)
    ckpt.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    for b in range(NUM_BLOCKS):
        assert torch.equal(kv[b], kv_before[b] if b in keep else torch.zeros_like(kv[b])), b
    with pytest.raises(cw.CheckpointWorkerError, match="not checkpointed"):
        ckpt.restore()


def encoded_chunks(codec: str, monkeypatch):
    """A bf16 region in six 8 KiB chunks (an odd last one), encoded with ``codec``."""
    monkeypatch.setattr(cw, "CHUNK_BYTES", 8192)
    region = bf16_weights(5 * 4096 + 3).view(torch.uint8)[:-1]
    c = cw.make_codec(codec, DEVICE)
    chunks = [cw._encode(c, chunk, off, pin=ON_CUDA) for off, chunk in cw._chunks(region)]
    return region, c, chunks


@pytest.mark.parametrize("codec", CODECS)
def test_write_back_decodes_each_chunk_into_its_target_then_runs_its_follow_up(
        codec, monkeypatch):
    # The CUDA path uploads chunks ahead while one decodes; the CPU path one by one.
    region, c, chunks = encoded_chunks(codec, monkeypatch)
    out = torch.zeros_like(region)
    followed: list[tuple[int, torch.Tensor]] = []
    jobs = (cw.WriteBack(ch, lambda ch=ch: out[ch.offset:ch.offset + ch.nbytes],
                         lambda t, ch=ch: followed.append((ch.offset, t.clone())))
            for ch in chunks)
    assert cw.write_back(c, jobs, DEVICE) == region.numel()
    assert torch.equal(out, region)
    # Each follow-up saw its own chunk's decoded bytes, in order.
    assert [off for off, _ in followed] == [ch.offset for ch in chunks]
    for (off, t), ch in zip(followed, chunks):
        assert torch.equal(t, region[off:off + ch.nbytes])
    assert cw.write_back(c, iter(()), DEVICE) == 0


def test_restore_reports_the_bytes_it_wrote():
    worker = cpu_worker()
    ckpt = cw.WorkerCheckpoint(worker)
    out = ckpt.offload([0, 3], "zlib")
    back = ckpt.restore()
    assert back["raw_bytes"] == out["weights_raw"] + out["kv_raw"]
    # gbps is rounded: a tiny model on a fast host can show 0.0 (it did on the H100).
    assert back["gbps"] is not None and set(back["seconds"]) == {"codec", "map", "weights", "kv"}
    assert set(out["seconds"]) == {"weights", "kv", "release"}
    # No codec outlives the restore: a driver checkpoint of the serving process (an
    # operator's, or upstream's sleep + driver) restores only without a live nvCOMP one.
    assert not cw._CODECS
    assert out["graph_pool_released"] == 0 and out["host_pinned"] == 0  # CPU: no arena


def test_host_arena_packs_planes_into_segments_and_reuses_them(monkeypatch):
    monkeypatch.setattr(cw.HostArena, "SEGMENT_BYTES", 64 << 10)
    arena = cw.HostArena(pin=ON_CUDA)
    views = [arena.take(n) for n in (20000, 20000, 20000, 5000, 30000)]
    # 4 KiB aligned: three 20000-byte planes fill 60 KiB of the first 64 KiB segment,
    # the 5000 (8 KiB aligned) starts the second, the 30000 follows it.
    assert arena.capacity == 2 * (64 << 10) and len(arena.segments) == 2
    bases = [seg.data_ptr() for seg in arena.segments]
    for v, n in zip(views, (20000, 20000, 20000, 5000, 30000)):
        base = max(b for b in bases if b <= v.data_ptr())
        assert v.numel() == n and (v.data_ptr() - base) % arena.ALIGN == 0
        assert v.is_pinned() == ON_CUDA  # CUDA: registered with the driver
    # Registered huge-page mappings, not the cudaHostAlloc fallback (it also pins; run
    # alone in a fresh process this test once got the fallback).
    assert len(arena.unregister_on_collect) == (len(arena.segments) if ON_CUDA else 0)
    ends = sorted((v.data_ptr(), v.data_ptr() + v.numel()) for v in views)
    assert all(a[1] <= b[0] for a, b in zip(ends, ends[1:]))  # no two overlap
    big = arena.take(100 << 10)  # larger than a segment: a segment of its own
    assert big.numel() == 100 << 10 and len(arena.segments) == 3
    arena.reset()
    assert arena.take(20000).data_ptr() == views[0].data_ptr()  # reused, not re-pinned
    assert len(arena.segments) == 3
    arena.reserve(arena.capacity + 1)
    assert len(arena.segments) == 4


@pytest.mark.skipif(not ON_CUDA, reason="registers host memory with the CUDA driver")
def test_host_arena_segments_are_registered_mappings_unregistered_when_they_go(
        monkeypatch):
    monkeypatch.setattr(cw.HostArena, "SEGMENT_BYTES", 4 << 20)
    arena = cw.HostArena(pin=True)
    view = arena.take(1 << 20)
    seg = arena.segments[0]
    assert seg.data_ptr() % 4096 == 0 and view.is_pinned()
    view.fill_(7)
    up = view.to(DEVICE, non_blocking=True)
    torch.cuda.synchronize()
    assert torch.equal(up.cpu(), torch.full_like(view, 7))
    unregister = arena.unregister_on_collect[0]
    del arena, seg, up
    gc.collect()
    assert unregister.alive  # the view still holds its segment: still registered
    del view
    gc.collect()
    assert not unregister.alive  # unregistered once nothing held it


def test_drop_codecs_destroys_them_or_refuses():
    c = cw.make_codec("zlib", DEVICE)
    assert cw.make_codec("zlib", DEVICE) is c  # cached while nothing drops it
    with pytest.raises(cw.CheckpointWorkerError, match="still referenced"):
        cw.drop_codecs()  # ``c`` holds it: a driver restore of this process would fail
    del c
    weak = weakref.ref(cw.make_codec("zlib", DEVICE))
    cw.drop_codecs()
    assert weak() is None
    # A lenient drop (after a restore) forgets a held codec from the cache, but the
    # next strict one still finds it alive.
    held = cw.make_codec("zlib", DEVICE)
    cw.drop_codecs(strict=False)
    with pytest.raises(cw.CheckpointWorkerError, match="still referenced"):
        cw.drop_codecs()
    del held
    cw.drop_codecs()


def test_a_failed_restore_releases_again_and_a_retry_restores_every_byte(monkeypatch):
    worker = cpu_worker()
    model, kv = worker.model_runner.model, worker.model_runner.kv_caches[0]
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    kv_before = kv.clone()
    ckpt = cw.WorkerCheckpoint(worker)
    ckpt.offload(list(range(NUM_BLOCKS)), "zlib")
    real = cw.write_back
    calls = []

    def fail_on_kv(codec, jobs, device):
        calls.append(1)
        if len(calls) == 2:  # weights written, then the KV write fails
            raise RuntimeError("out of memory for the KV staging")
        return real(codec, jobs, device)

    monkeypatch.setattr(cw, "write_back", fail_on_kv)
    with pytest.raises(RuntimeError, match="KV staging"):
        ckpt.restore()
    # Released again (the CPU build zeroes), still checkpointed: the retry starts over.
    assert ckpt.image is not None
    assert all(not v.any() for v in model.state_dict().values()) and not kv.any()
    ckpt.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert torch.equal(kv, kv_before)


def test_abort_restores_a_worker_that_offloaded_and_leaves_one_that_did_not():
    worker = cpu_worker()
    model = worker.model_runner.model
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt = cw.WorkerCheckpoint(worker)
    assert ckpt.abort()["restored"] is False  # nothing offloaded: nothing to undo
    ckpt.offload([0], "zlib")
    assert all(not v.any() for v in model.state_dict().values())
    assert ckpt.abort()["restored"] is True
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert ckpt.image is None


def test_checkpoint_chunk_size_follows_the_environment(monkeypatch):
    worker = cpu_worker()
    kv = worker.model_runner.kv_caches[0]
    before = kv.clone()
    monkeypatch.setattr(cw, "CHUNK_BYTES", 256)  # the default: 2 blocks per chunk
    monkeypatch.setenv("VLLM_HA_CHECKPOINT_CHUNK_MIB", "1")
    ckpt = cw.WorkerCheckpoint(worker)
    ckpt.offload(list(range(NUM_BLOCKS)), "zlib")
    assert cw._checkpoint_chunk_bytes() == 1 << 20
    assert len(ckpt.image.kv[0]) == 1  # one 1 MiB chunk instead of NUM_BLOCKS // 2
    ckpt.restore()
    assert torch.equal(kv, before)
    monkeypatch.setenv("VLLM_HA_CHECKPOINT_CHUNK_MIB", "0")
    with pytest.raises(ValueError, match="VLLM_HA_CHECKPOINT_CHUNK_MIB"):
        cw._checkpoint_chunk_bytes()


def test_prepin_pins_what_it_is_asked_for(monkeypatch):
    """``--checkpoint-prepin GIB``: that many bytes, in whole segments (CUDA); the CPU
    build's image is plain memory, nothing to pin."""
    monkeypatch.setattr(cw.HostArena, "SEGMENT_BYTES", 64 << 10)
    worker = cpu_worker()
    worker.device = str(DEVICE)  # only the arena is used: no model on the device
    ckpt = cw.WorkerCheckpoint(worker)
    got = ckpt.prepin(0.7, nbytes=200 << 10)
    assert got["host_pinned"] == (256 << 10 if ON_CUDA else 0)
    got = ckpt.prepin(0.7, nbytes=100 << 10)  # already there: nothing more
    assert got["host_pinned"] == (256 << 10 if ON_CUDA else 0)


@pytest.mark.parametrize("depth", ["1", "2", "8"])
def test_write_back_is_exact_however_far_it_uploads_ahead(depth, monkeypatch):
    """CUDA: chunks upload 1, 2 or 8 (more than there are) ahead of the decode, and
    retire a chunk late; every byte lands in its target."""
    monkeypatch.setenv("VLLM_HA_CHECKPOINT_UPLOAD_AHEAD", depth)
    region, c, chunks = encoded_chunks(CODECS[-1], monkeypatch)  # nvCOMP on CUDA
    out = torch.zeros_like(region)
    jobs = (cw.WriteBack(ch, lambda ch=ch: out[ch.offset:ch.offset + ch.nbytes])
            for ch in chunks)
    assert cw.write_back(c, jobs, DEVICE) == region.numel()
    assert torch.equal(out, region)


def test_upload_ahead_refuses_what_is_not_a_count_before_anything_is_released(monkeypatch):
    monkeypatch.setenv("VLLM_HA_CHECKPOINT_UPLOAD_AHEAD", "x")
    with pytest.raises(ValueError, match="VLLM_HA_CHECKPOINT_UPLOAD_AHEAD"):
        ha_envs.checkpoint_upload_ahead()
    # Read at the checkpoint, not at the restore that would need it: the engine keeps
    # its memory and serves on.
    worker = cpu_worker()
    kv = worker.model_runner.kv_caches[0]
    before = kv.clone()
    ckpt = cw.WorkerCheckpoint(worker)
    with pytest.raises(ValueError, match="VLLM_HA_CHECKPOINT_UPLOAD_AHEAD"):
        ckpt.offload(list(range(NUM_BLOCKS)), "zlib")
    assert ckpt.image is None and torch.equal(kv, before)


def test_offload_is_chunked(monkeypatch):
    monkeypatch.setattr(cw, "CHUNK_BYTES", 256)
    worker = cpu_worker()
    kv = worker.model_runner.kv_caches[0]
    before = kv.clone()
    ckpt = cw.WorkerCheckpoint(worker)
    ckpt.offload(list(range(NUM_BLOCKS)), "zlib")
    # 256 bytes = 2 blocks of 128: the KV went in several chunks.
    assert len(ckpt.image.kv[0]) == NUM_BLOCKS // 2
    assert max(c.nbytes for _, chunks in ckpt.image.weights for c in chunks) <= 256
    ckpt.restore()
    assert torch.equal(kv, before)


def test_blocks_in_use_are_the_held_and_the_cached():
    manager = make_manager()
    pool = manager.block_pool
    assert blocks_in_use(pool) == []
    running = make_request(list(range(10)))  # 2 full blocks + a partial one
    held = prefill(manager, running)
    finished = make_request(list(range(100, 108)))  # 2 full blocks, then freed: cached
    cached = prefill(manager, finished)
    manager.free(finished)
    assert sorted(blocks_in_use(pool)) == sorted(held + cached)
    assert pool.null_block.block_id not in blocks_in_use(pool)
