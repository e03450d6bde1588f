# SPDX-License-Identifier: Apache-2.0
"""``--load-format ha_snapshot``: weights from a vLLM-HA snapshot instead of the model's
checkpoint files (``vllm serve --restore-from DIR`` selects it; patch 0014 registers it).

The snapshot holds every parameter and buffer by name, compressed; they are read into
pinned memory, copied up and decompressed on the device (nvCOMP), straight into the
tensors of the freshly initialised model. Upstream's ``load_model`` then runs the
model's post-loading processing as after any load.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from vllm.model_executor.model_loader.base_loader import BaseModelLoader

from vllm.config import ModelConfig, VllmConfig
from vllm.v1.engine.snapshot import check_identity, snapshot_path
from vllm.v1.worker.checkpoint_worker import drop_codecs
from vllm.v1.worker.snapshot_worker import load_weights


class SnapshotModelLoader(BaseModelLoader):
    """Loads weights from ``model_loader_extra_config["snapshot"]``."""

    def _gen(self) -> Path:
        return Path(snapshot_path(self.load_config))

    def load_model(self, vllm_config: VllmConfig, model_config: ModelConfig,
                   prefix: str = "") -> nn.Module:
        check_identity(self._gen(), vllm_config)
        return super().load_model(vllm_config, model_config, prefix)

    def download_model(self, model_config: ModelConfig) -> None:
        pass  # everything is in the snapshot

    def load_weights(self, model: nn.Module, model_config: ModelConfig) -> None:
        from vllm.distributed import get_world_group

        device = next(iter(model.parameters())).device
        with torch.inference_mode():
            load_weights(model, self._gen(), get_world_group().rank, device)
        drop_codecs(strict=False)  # the server then holds none (driver checkpoints)
