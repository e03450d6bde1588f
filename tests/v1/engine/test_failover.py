"""Which requests can fail over and how they continue (vllm/v1/engine/failover.py):
real SamplingParams and EngineCoreRequests, and a real engine continuing requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.sampling_params import RepetitionDetectionParams, StructuredOutputsParams

from tests.utils import child_env
from vllm import SamplingParams
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.engine.failover import (
    RESUMED_OUTPUT,
    ResumeRefused,
    resume_request,
    resumed_output_tokens,
)

BLOCK = 16


def _request(params: SamplingParams | None = None, **kw) -> EngineCoreRequest:
    fields = dict(request_id="r", prompt_token_ids=[1, 2, 3], mm_features=None,
                  sampling_params=params or SamplingParams(max_tokens=10),
                  pooling_params=None, arrival_time=123.0, lora_request=None,
                  cache_salt=None, data_parallel_rank=None)
    fields.update(kw)
    return EngineCoreRequest(**fields)


@pytest.fixture(autouse=True)
def resume_key(monkeypatch):
    monkeypatch.setenv("VLLM_HA_RESUME_KEY", "k1")  # what --mirror-peer sets


def test_the_generated_tokens_travel_beside_the_original_request(monkeypatch):
    original = _request(SamplingParams(max_tokens=10, min_tokens=4, prompt_logprobs=2,
                                       extra_args={"mine": 1}))
    resumed = resume_request(original, [7, 8, 9], prompt_logprobs_sent=True)
    # The prompt, the budget and min_tokens are the original's: the new engine makes
    # the generated tokens the request's output (adopt_resumed_output).
    assert resumed.prompt_token_ids == [1, 2, 3]
    assert (resumed.request_id, resumed.arrival_time) == ("r", 123.0)
    sp = resumed.sampling_params
    assert (sp.max_tokens, sp.min_tokens, sp.prompt_logprobs) == (10, 4, None)
    assert sp.extra_args == {"mine": 1, RESUMED_OUTPUT: {"key": "k1", "tokens": [7, 8, 9]}}
    assert resumed_output_tokens(sp) == [7, 8, 9]
    # Prompt logprobs went out: the new engine may read the prefix cache again.
    assert original.sampling_params.skip_reading_prefix_cache
    assert not sp.skip_reading_prefix_cache
    # Only with this server's key (a client can set extra_args too).
    for forged in ([7, 8, 9], {"key": "guess", "tokens": [7]}, {"tokens": [7]}):
        assert resumed_output_tokens(SamplingParams(
            max_tokens=5, extra_args={RESUMED_OUTPUT: forged})) == []
    monkeypatch.delenv("VLLM_HA_RESUME_KEY")
    assert resumed_output_tokens(sp) == []
    # Cloned, not edited: the API server's RequestState shares the original.
    assert original.sampling_params.extra_args == {"mine": 1}
    assert original.sampling_params.prompt_logprobs == 2
    assert resumed_output_tokens(original.sampling_params) == []
    # Nothing reached the client yet: the request as it was sent (prompt logprobs owed).
    assert resume_request(original, [], prompt_logprobs_sent=False) is original
    assert resume_request(original, list(range(10)), prompt_logprobs_sent=True) is None


@pytest.mark.parametrize("kw,reason", [
    ({"resumable": True}, "streaming-input session"),
    ({"sampling_params": SamplingParams(
        max_tokens=5, extra_args={"kv_transfer_params": {"remote": "x"}})},
     "KV transfer peer"),
    ({"sampling_params": SamplingParams(max_tokens=5, thinking_token_budget=8)},
     "thinking-token budget"),
])
def test_requests_that_cannot_continue_exactly_are_refused_with_the_reason(kw, reason):
    with pytest.raises(ResumeRefused, match=reason):
        resume_request(_request(**kw), [5], prompt_logprobs_sent=True)


def test_structured_output_is_refused_only_where_reasoning_gates_its_grammar():
    structured = SamplingParams(max_tokens=5,
                                structured_outputs=StructuredOutputsParams(regex="[a-z]+"))
    assert resume_request(_request(structured), [5], prompt_logprobs_sent=True) is not None
    with pytest.raises(ResumeRefused, match="reasoning parser"):
        resume_request(_request(structured), [5], prompt_logprobs_sent=True,
                       reasoning_gates_grammar=True)
    # Reasoning over before the request began: the grammar saw every output token.
    assert resume_request(_request(structured, reasoning_ended=True), [5],
                          prompt_logprobs_sent=True, reasoning_gates_grammar=True)


@pytest.mark.parametrize("params", [
    SamplingParams(max_tokens=5, presence_penalty=0.5, frequency_penalty=0.5),
    SamplingParams(max_tokens=5, repetition_detection=RepetitionDetectionParams(
        max_pattern_size=4, min_count=3)),
    SamplingParams(max_tokens=5, bad_words=["two words"]),
])
def test_what_counts_output_tokens_now_continues(params):
    # These restarted when the output was sent as prompt; now it stays output.
    assert resume_request(_request(params), [5], prompt_logprobs_sent=True) is not None


@pytest.mark.slow
def test_a_real_engine_continues_requests_exactly_from_the_cache(tiny_model):
    """Greedy with min_tokens, presence/frequency penalties and a structured-output
    regex, continued from the start, the middle and the last token: the tokens of the
    uninterrupted run, every full block of prompt + generated a cache hit. (Resent as
    prompt + generated, the penalties and the regex diverge here.)"""
    script = Path(__file__).with_name("failover_resume_run.py")
    out = subprocess.run([sys.executable, str(script), str(tiny_model)], capture_output=True,
                         text=True, timeout=600,
                         env=child_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    # A forged resumed output (a client's vllm_xargs) is ignored: 8 tokens generated.
    assert len(result.pop("forged")) == 8
    assert sorted(result) == ["greedy", "penalties", "structured"]
    for kind, r in result.items():
        ref = r["ref"]
        # Greedy stops at its stop token once min_tokens (30) allow it.
        assert (30 < len(ref) < 40 if kind == "greedy" else len(ref) == 40) and r["done"], kind
        assert len(r["runs"]) == 3, kind
        for k, run in r["runs"].items():
            k = int(k)
            # Exactly the tokens the uninterrupted run produced after the k already sent.
            assert run["tokens"] == ref[k:], (kind, k)
            assert run["max_tokens"] == 40 and run["prompt_len"] == 70, (kind, run)
            # Every full block of prompt + generated was cached by the reference run:
            # only the tail is recomputed.
            assert run["cached"] == (run["tokens_before"] - 1) // BLOCK * BLOCK, (kind, run)
