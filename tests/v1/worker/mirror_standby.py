"""A standby in its own process: BlockPool + StandbyIngest + a registered KV cache,
fed by the direct transport (bytes land in the KV cache) or the staged one (bytes land
in a staging ring and are scattered here once the step's ops are known)."""

from __future__ import annotations

import hashlib
import time


def standby_engine_main(to_primary, from_primary, layers: int, num_blocks: int,
                        block_elems: int, staged_ring_bytes: int = 0) -> None:
    import torch

    from tests.v1.core.test_kv_mirror import make_manager, make_request
    from vllm.v1.core.kv_mirror_ingest import StandbyIngest
    from vllm.v1.worker.kv_mirror_staged import StagedStandbyEndpoint
    from vllm.v1.worker.kv_mirror_transport import StandbyEndpoint, parse_step_notification

    kv = [torch.zeros(num_blocks, block_elems) for _ in range(layers)]
    if staged_ring_bytes:
        endpoint = StagedStandbyEndpoint("standby-engine", kv, num_blocks, staged_ring_bytes)
    else:
        endpoint = StandbyEndpoint("standby-engine", kv, num_blocks)
    manager = make_manager(num_blocks)
    ingest = StandbyIngest(manager.block_pool)
    to_primary.put(endpoint.descriptor().to_dict())
    landed_early: dict[int, tuple[int, int]] = {}  # staged: seq -> (offset, k)

    def scatter_ready() -> None:
        for seq, (off, k) in list(landed_early.items()):
            ids = ingest.pending_block_ids(seq)
            if ids is not None:
                assert len(ids) == k
                endpoint.scatter(seq, off, ids)
                ingest.on_landed(seq)
                del landed_early[seq]

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if staged_ring_bytes:
            for seq, off, k in endpoint.poll_landed():
                landed_early[seq] = (off, k)
            scatter_ready()
        else:
            for msg in endpoint.poll_notifications():
                seq = parse_step_notification(msg)
                if seq is not None:
                    ingest.on_landed(seq)
        while not from_primary.empty():
            kind, payload = from_primary.get()
            if kind == "primary":
                endpoint.connect_primary(payload)
            elif kind == "ops":
                ingest.receive_ops(payload)
                scatter_ready()
            elif kind == "lookup":
                out = []
                for tokens in payload:
                    hit, n, _ = manager.get_computed_blocks(make_request(tokens))
                    ids = [b.block_id for b in hit.blocks[0]]
                    sums = [hashlib.sha256(b"".join(t[i].numpy().tobytes() for t in kv))
                            .hexdigest() for i in ids]
                    out.append({"num_tokens": n, "block_ids": ids, "checksums": sums})
                to_primary.put({"lookups": out, "lag_steps": ingest.lag_steps})
            elif kind == "stop":
                endpoint.close()
                return
        time.sleep(0.0005)
