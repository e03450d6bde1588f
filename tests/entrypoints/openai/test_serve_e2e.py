"""The patched `vllm serve` end to end on a tiny offline model: real engine, real HTTP."""

from __future__ import annotations

import json
import re

import pytest

from tests.utils import ON_CUDA, RemoteServer

BLOCK = 16 if ON_CUDA else 128  # tokens per KV block: CUDA default vs CPU default
ARGS = ["--max-model-len", "1024", "--max-num-batched-tokens", "1024", "--max-num-seqs", "16",
        "--enforce-eager", "--enable-prefix-caching", "--enable-prompt-tokens-details",
        "--served-model-name", "tiny"]
ARGS += (["--dtype", "bfloat16", "--gpu-memory-utilization", "0.2"] if ON_CUDA
         else ["--dtype", "float32"])


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with RemoteServer(str(tiny_model), ARGS, tmp_path_factory.mktemp("serve") / "serve.log") as s:
        yield s


def complete(server: RemoteServer, prompt: str, max_tokens: int = 16) -> dict:
    r = server.post("/v1/completions", {"model": "tiny", "prompt": prompt,
                                        "max_tokens": max_tokens, "temperature": 0})
    assert r.status_code == 200, r.text
    return r.json()


def test_completion(server):
    out = complete(server, "Hello world, the cache block")
    assert out["usage"]["completion_tokens"] == 16
    assert out["choices"][0]["text"]


def test_mirror_route_without_mirroring_is_404(server):
    r = server.get("/mirror")
    assert r.status_code == 404 and "--mirror-peer" in r.json()["error"]


def test_greedy_is_deterministic_across_requests(server):
    a = complete(server, "the scheduler and the worker", 24)
    b = complete(server, "the scheduler and the worker", 24)
    assert a["choices"][0]["text"] == b["choices"][0]["text"]


def test_streaming_chat(server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    r = server.post("/v1/chat/completions", body, stream=True)
    assert r.status_code == 200
    chunks, usage, done = [], None, False
    for line in r.iter_lines(decode_unicode=True):
        if line == "data: [DONE]":
            done = True
        elif line.startswith("data: "):
            event = json.loads(line[6:])
            if event.get("usage"):
                usage = event["usage"]
            for choice in event["choices"]:
                chunks.append(choice["delta"].get("content") or "")
    assert done and "".join(chunks)
    assert usage and usage["completion_tokens"] == 8


def test_repeated_long_prompt_hits_the_prefix_cache(server):
    prompt = " ".join(f"the quick brown fox {i}" for i in range(120))
    first = complete(server, prompt, 2)
    assert first["usage"]["prompt_tokens"] > 2 * BLOCK
    second = complete(server, prompt, 2)
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached >= BLOCK and cached % BLOCK == 0, second["usage"]
    metrics = server.get("/metrics").text
    hits = re.search(r"^vllm:prefix_cache_hits_total\{[^}]*\} (\S+)", metrics, re.M)
    assert hits and float(hits.group(1)) >= cached
