"""Which requests can fail over and how they continue (vllm/v1/engine/failover.py):
real SamplingParams and EngineCoreRequests, and a real engine continuing requests."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vllm.sampling_params import StructuredOutputsParams

from tests.utils import child_env
from vllm import SamplingParams
from vllm.v1.engine import EngineCoreRequest
from vllm.v1.engine.failover import ResumeRefused, resume_request

BLOCK = 16


def _request(params: SamplingParams | None = None, **kw) -> EngineCoreRequest:
    fields = dict(request_id="r", prompt_token_ids=[1, 2, 3], mm_features=None,
                  sampling_params=params or SamplingParams(max_tokens=10),
                  pooling_params=None, arrival_time=123.0, lora_request=None,
                  cache_salt=None, data_parallel_rank=None)
    fields.update(kw)
    return EngineCoreRequest(**fields)


def test_the_budget_left_and_a_new_prompt_list():
    original = _request(SamplingParams(max_tokens=10, min_tokens=4, prompt_logprobs=2))
    resumed = resume_request(original, [7, 8, 9], prompt_logprobs_sent=True)
    assert resumed.prompt_token_ids == [1, 2, 3, 7, 8, 9]
    assert original.prompt_token_ids == [1, 2, 3]  # shared with the API server's state
    assert (resumed.request_id, resumed.arrival_time) == ("r", 123.0)
    sp = resumed.sampling_params
    assert (sp.max_tokens, sp.min_tokens, sp.prompt_logprobs) == (7, 1, None)
    assert original.sampling_params.max_tokens == 10  # cloned, not edited
    # Before the first output, prompt logprobs are still owed.
    assert resume_request(original, [], prompt_logprobs_sent=False) \
        .sampling_params.prompt_logprobs == 2
    assert resume_request(original, list(range(10)), prompt_logprobs_sent=True) is None


@pytest.mark.parametrize("kw,reason", [
    ({"sampling_params": SamplingParams(
        max_tokens=5, structured_outputs=StructuredOutputsParams(regex="[a-z]+"))},
     "structured output"),
    ({"resumable": True}, "streaming-input session"),
    ({"sampling_params": SamplingParams(max_tokens=5, presence_penalty=0.5)}, "penalties"),
    ({"sampling_params": SamplingParams(max_tokens=5, frequency_penalty=0.5)}, "penalties"),
    ({"sampling_params": SamplingParams(
        max_tokens=5, extra_args={"kv_transfer_params": {"remote": "x"}})},
     "KV transfer peer"),
])
def test_requests_that_cannot_continue_exactly_are_refused_with_the_reason(kw, reason):
    with pytest.raises(ResumeRefused, match=reason):
        resume_request(_request(**kw), [5], prompt_logprobs_sent=True)


@pytest.mark.slow
def test_a_real_engine_continues_greedy_requests_exactly_from_the_cache(tiny_model):
    script = Path(__file__).with_name("failover_resume_run.py")
    out = subprocess.run([sys.executable, str(script), str(tiny_model)], capture_output=True,
                         text=True, timeout=600,
                         env=child_env(VLLM_ENABLE_V1_MULTIPROCESSING="0"))
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT "):])
    ref = result["ref"]
    assert len(ref) == 40 and result["done"]
    for k, run in result["runs"].items():
        k = int(k)
        # Exactly the tokens the uninterrupted run produced after the k already sent.
        assert run["tokens"] == ref[k:], k
        assert run["max_tokens"] == 40 - k and run["min_tokens"] == max(0, 30 - k)
        # Every full block of prompt + generated was cached by the reference run:
        # only the tail is recomputed.
        assert run["cached"] == (run["prompt_len"] - 1) // BLOCK * BLOCK, run
