"""Startup checks of the mirror on real configs: refused before any engine starts,
naming the flag."""

from __future__ import annotations

import os

import pytest

from vllm.config import ParallelConfig, VllmConfig
from vllm.config.mirror import MirrorConfig
from vllm.v1.engine.mirror_supervisor import MirrorStartupError, MirrorSupervisor


def _config(**parallel) -> VllmConfig:
    api_servers = parallel.pop("api_servers", 1)
    p = ParallelConfig(**parallel)
    p._api_process_count = api_servers
    return VllmConfig(parallel_config=p, mirror_config=MirrorConfig(peer="cpu"))


def test_a_plain_single_engine_passes_and_fixes_the_hash_seed(monkeypatch):
    monkeypatch.setenv("PYTHONHASHSEED", "")  # unset; restored after the test
    MirrorSupervisor.prepare(_config())
    assert os.environ["PYTHONHASHSEED"].isdigit()  # children hash blocks alike


@pytest.mark.parametrize("parallel,message", [
    ({"api_servers": 2}, "single API server (drop --api-server-count 2)"),
    ({"tensor_parallel_size": 2}, "tensor, pipeline and data parallel size 1"),
])
def test_unsupported_layouts_are_refused_naming_the_flag(parallel, message):
    with pytest.raises(MirrorStartupError, match=message.replace("(", r"\(").replace(")", r"\)")):
        MirrorSupervisor.prepare(_config(**parallel))


def test_no_mirror_no_checks():
    MirrorSupervisor.prepare(VllmConfig(parallel_config=ParallelConfig(tensor_parallel_size=2)))
