from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # habuild, tests.utils

from habuild.upstream import Target, UpstreamWheel, resolve_wheel  # noqa: E402
from tests.utils import ON_CUDA, make_tiny_model  # noqa: E402


@pytest.fixture(scope="session")
def upstream_wheel() -> UpstreamWheel:
    """The upstream wheel the CPU build is made from (cache or index)."""
    return UpstreamWheel(resolve_wheel(Target.CUDA if ON_CUDA else Target.CPU))


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    """A 2.7M-parameter Llama with a trained tokenizer, made offline once per session."""
    return make_tiny_model(tmp_path_factory.mktemp("models") / "tiny-llama")
