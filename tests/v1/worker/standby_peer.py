"""A standby worker in its own process: registers a KV cache and reports its bytes."""

from __future__ import annotations

import time


def standby_main(to_primary, from_primary, layers: int, num_blocks: int, block_elems: int,
                 shared_layout: bool = True) -> None:
    import torch

    from vllm.v1.worker.kv_mirror_transport import StandbyEndpoint

    elems = block_elems if shared_layout else block_elems * 2
    kv = [torch.zeros(num_blocks, elems, dtype=torch.float32) for _ in range(layers)]
    endpoint = StandbyEndpoint("standby", kv, num_blocks)
    to_primary.put(endpoint.descriptor().to_dict())
    notes: list[bytes] = []
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        notes += endpoint.poll_notifications()
        if not from_primary.empty():
            if from_primary.get() == "report":
                to_primary.put({"notifs": notes, "kv": [t.clone() for t in kv]})
                notes = []
            else:
                break
        time.sleep(0.001)
    endpoint.close()
