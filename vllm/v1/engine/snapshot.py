# SPDX-License-Identifier: Apache-2.0
"""Engine side of snapshots on disk: what identifies one, the prefix cache's blocks
and hashes, and putting them back into a new engine's BlockPool.

A snapshot's KV is only worth restoring as prefix cache: every block that holds a
hash (full blocks of finished and running requests) is written with all its hashes;
a new engine takes free blocks, its workers write the bytes into them, then the hashes
are published and the blocks go back to the free queue as cached blocks (like the
blocks a finished request leaves, and like the standby's ingest of mirrored blocks).
Block hashes chain from ``NONE_HASH``, a per-process random seed unless
``PYTHONHASHSEED`` is set: the snapshot carries it and the new engine adopts it, or
no prompt could ever hit a restored block.

KV is written in segments, so that a periodic snapshot costs what changed: a block's
bytes are fixed by its hash (the KV of that token prefix under these weights), so a
block that a segment of the previous generation holds is referenced there and that
segment's files are hard-linked; only new blocks go into the generation's own segment.
A previous segment with less than half of its blocks still cached is not kept: its
live blocks are written again (compaction), so dead bytes do not pile up. Segments are
reused only when the weights are too (same process, same weights).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger

from vllm.v1.checkpoint.snapshot import SnapshotError, SnapshotStore, file_chunks, write_file

if TYPE_CHECKING:
    from vllm.v1.core.block_pool import BlockPool

    from vllm.config import VllmConfig

logger = init_logger(__name__)

LOAD_FORMAT = "ha_snapshot"
BLOCKS_FILE = "kv/blocks.json"
# A previous KV segment is kept (linked) while at least this share of it is cached.
SEGMENT_MIN_LIVE = 0.5
# Weights files never go into model/: the snapshot holds the weights itself.
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5",
                    ".ckpt", ".npz")
_MAX_MODEL_FILE = 256 << 20


def ha_version() -> str:
    from vllm.ha.version import build_info

    info = build_info()
    if info is not None:
        return info.ha_version
    import vllm

    return f"{vllm.__version__}+dev"


def model_digest(vllm_config: VllmConfig) -> str:
    """The model's configuration (architecture, shapes), not where it was read from."""
    cfg = vllm_config.model_config.hf_config.to_dict()
    for volatile in ("_name_or_path", "transformers_version", "_commit_hash"):
        cfg.pop(volatile, None)
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()
                          ).hexdigest()[:16]


def identity(vllm_config: VllmConfig) -> dict[str, Any]:
    """What must match for a snapshot to load into an engine: refused otherwise."""
    mc, cc, pc = (vllm_config.model_config, vllm_config.cache_config,
                  vllm_config.parallel_config)
    return {
        "architectures": list(getattr(mc.hf_config, "architectures", None) or []),
        "model_config": model_digest(vllm_config),
        "dtype": str(mc.dtype).removeprefix("torch."),
        "quantization": mc.quantization,
        "block_size": cc.block_size,
        "kv_cache_dtype": cc.cache_dtype,
        "prefix_caching_hash_algo": cc.prefix_caching_hash_algo,
        "tensor_parallel_size": pc.tensor_parallel_size,
        "pipeline_parallel_size": pc.pipeline_parallel_size,
        "device": vllm_config.device_config.device_type,
    }


def snapshot_dir(vllm_config: VllmConfig) -> str | None:
    """The snapshot generation this engine loads from (``--restore-from``), if any."""
    lc = vllm_config.load_config
    return snapshot_path(lc) if lc.load_format == LOAD_FORMAT else None


def snapshot_path(load_config: Any) -> str:
    """``--model-loader-extra-config``'s snapshot, which the load format needs."""
    path = (load_config.model_loader_extra_config or {}).get("snapshot")
    if not path:
        raise SnapshotError(f"--load-format {LOAD_FORMAT} needs "
                            "--model-loader-extra-config '{\"snapshot\": DIR}'")
    return path


def check_identity(gen: Path, vllm_config: VllmConfig) -> dict[str, Any]:
    """The generation's manifest, if it fits this engine; SnapshotError otherwise."""
    store, name = SnapshotStore.at(gen.parent)
    snap = store.read(name, expect=identity(vllm_config), ha_version=ha_version(),
                      verify=False)
    if snap.path.resolve() != gen.resolve():
        raise SnapshotError(f"{gen} is no longer the current snapshot of {gen.parent}")
    return snap.manifest


def copy_model_files(writer: Any, model: str) -> list[str]:
    """Configuration and tokenizer files of a local model directory into ``model/``,
    so a snapshot restores on a node that has no copy of the model."""
    src = Path(model)
    if not src.is_dir():
        try:
            from huggingface_hub import snapshot_download

            src = Path(snapshot_download(model, local_files_only=True))
        except Exception:
            logger.warning("Snapshot: %s is not a local directory; the snapshot holds no "
                           "model files (--restore-from will need the model)", model)
            return []
    copied = []
    for f in sorted(src.iterdir()):
        if (f.is_file() and not f.name.endswith(_WEIGHT_SUFFIXES)
                and not f.name.endswith(".index.json")
                and f.stat().st_size <= _MAX_MODEL_FILE):
            rel = f"model/{f.name}"
            with open(f, "rb") as fh:
                writer.write_file(rel, file_chunks(fh))
            copied.append(f.name)
    return copied


def cached_block_hashes(block_pool: BlockPool) -> tuple[list[int], list[dict[str, Any]]]:
    """Every block of the prefix cache with all its hashes (hex), in block order."""
    ids, entries = [], []
    extra = block_pool.cached_block_hashes_by_block
    for b in block_pool.blocks:
        if b.is_null or b.block_hash is None:
            continue
        ids.append(b.block_id)
        hashes = [bytes(b.block_hash).hex()]
        hashes += sorted(bytes(h).hex() for h in extra.get(b.block_id, ()))
        entries.append({"hashes": hashes, "num_tokens": b.block_hash_num_tokens})
    return ids, entries


def none_hash() -> str:
    from vllm.v1.core import kv_cache_utils

    return bytes(kv_cache_utils.NONE_HASH).hex()


@dataclass
class KVPlan:
    """Where each cached block's bytes go (or are) in a new generation."""

    segment: str  # the generation's own segment
    write_ids: list[int] = field(default_factory=list)  # its blocks, in row order
    keep: list[str] = field(default_factory=list)  # previous segments linked
    segments: dict[str, int] = field(default_factory=dict)  # name -> rows
    blocks: list[dict[str, Any]] = field(default_factory=list)  # blocks.json entries

    @classmethod
    def make(cls, segment: str, ids: list[int], entries: list[dict[str, Any]],
             previous: dict[str, Any] | None) -> KVPlan:
        """``previous``: the previous generation's blocks.json (None: write all)."""
        plan = cls(segment)
        where: dict[str, tuple[str, int]] = {}
        if previous is not None and previous.get("none_hash") == none_hash():
            for e in previous["blocks"]:
                for h in e["hashes"]:
                    where.setdefault(h, (e["seg"], e["row"]))
        found = [where.get(e["hashes"][0]) for e in entries]
        live: dict[str, set[int]] = {}
        for f in found:
            if f is not None:
                live.setdefault(f[0], set()).add(f[1])
        sizes = previous["segments"] if previous is not None else {}
        plan.keep = sorted(seg for seg, rows in live.items()
                           if len(rows) >= SEGMENT_MIN_LIVE * sizes.get(seg, 0))
        plan.segments = {seg: sizes[seg] for seg in plan.keep}
        for block_id, entry, f in zip(ids, entries, found):
            if f is not None and f[0] in plan.segments:
                seg, row = f
            else:
                seg, row = segment, len(plan.write_ids)
                plan.write_ids.append(block_id)
            plan.blocks.append({**entry, "seg": seg, "row": row})
        if plan.write_ids:
            plan.segments[segment] = len(plan.write_ids)
        return plan


def read_blocks_file(gen: Path) -> dict[str, Any]:
    try:
        data = json.loads((gen / BLOCKS_FILE).read_text())
    except (OSError, ValueError) as e:
        raise SnapshotError(f"{gen / BLOCKS_FILE} cannot be read: {e}") from None
    if "segments" not in data:
        raise SnapshotError(f"{gen / BLOCKS_FILE} has no KV segments (an older format)")
    return data


def write_blocks_file(gen: Path, plan: KVPlan) -> dict[str, Any]:
    (gen / "kv").mkdir(parents=True, exist_ok=True)
    return write_file(gen / BLOCKS_FILE, json.dumps(
        {"none_hash": none_hash(), "segments": plan.segments,
         "blocks": plan.blocks}).encode())


class SnapshotKVRestore:
    """Puts a snapshot's prefix cache into a new engine (before it serves)."""

    def __init__(self, gen: Path, block_pool: BlockPool) -> None:
        self.gen = gen
        self.block_pool = block_pool

    def run(self, write_blocks) -> dict[str, Any]:
        """``write_blocks(gen_dir, placements)`` runs the workers' load (placements:
        per segment, (row, target block id) pairs)."""
        from vllm.v1.core.kv_cache_utils import BlockHash

        from vllm.v1.core import kv_cache_utils

        t0 = time.perf_counter()
        data = read_blocks_file(self.gen)
        kv_cache_utils.NONE_HASH = BlockHash(bytes.fromhex(data["none_hash"]))
        entries = data["blocks"]
        pool = self.block_pool
        if not pool.enable_caching:
            logger.warning("Snapshot: prefix caching is off; %d cached KV blocks of the "
                           "snapshot are not restored", len(entries))
            return {"blocks": 0, "skipped": len(entries), "seconds": 0.0}
        n = min(len(entries), pool.get_num_free_blocks())
        blocks = pool.get_new_blocks(n) if n else []
        placements: dict[str, list[tuple[int, int]]] = {}
        for block, entry in zip(blocks, entries):
            placements.setdefault(entry["seg"], []).append((entry["row"], block.block_id))
        try:
            write_blocks(str(self.gen), placements)
        except BaseException:
            # Back to the free queue unhashed: nothing of them is cached, and a later
            # prefix-cache reset (a retried load) finds no block in use.
            pool.free_blocks(blocks)
            raise
        for block, entry in zip(blocks, entries):
            for h in entry["hashes"]:
                pool._insert_block_hash(bytes.fromhex(h), block,  # type: ignore[arg-type]
                                        entry["num_tokens"])
        # Last restored block first to be evicted, like a finished request's blocks.
        pool.free_blocks(reversed(blocks))
        seconds = time.perf_counter() - t0
        logger.info("Snapshot: %d KV blocks restored into the prefix cache in %.2f s%s",
                    n, seconds, "" if n == len(entries) else
                    f" ({len(entries) - n} did not fit in this engine's KV cache)")
        return {"blocks": n, "skipped": len(entries) - n, "seconds": seconds}
