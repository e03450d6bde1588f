"""Run in a subprocess by test_failover.py: one real engine (CPU, tiny model) generates
a greedy reference per kind of request, then continues the same request from several
points as the failover would (the original request + the tokens generated so far,
adopted as its output by the engine). Prints JSON."""

from __future__ import annotations

import json
import os
import sys

import msgspec
from vllm.inputs import TokensPrompt
from vllm.sampling_params import StructuredOutputsParams

from vllm import LLM, SamplingParams
from vllm.v1.engine.failover import resume_request

BLOCK = 16
MAX_TOKENS = 40

# Each kind counts output tokens in its own way: if the resumed request lost its
# output, these would diverge from the reference.
KINDS = {
    # The tiny model emits 718 as its 28th token: min_tokens holds it back until the
    # 34th, counted over the output before and after the switch.
    "greedy": dict(min_tokens=30, stop_token_ids=[718]),
    "penalties": dict(presence_penalty=2.0, frequency_penalty=2.0, ignore_eos=True),
    "structured": dict(structured_outputs=StructuredOutputsParams(
        regex="(ab){5}(bba){5}(ab){10}")),
}


def run_to_end(engine, request, request_id: str) -> tuple[list[int], int | None]:
    # A copy: the engine renames what it is given (external_req_id).
    request = msgspec.structs.replace(request, request_id=request_id)
    engine.add_request(request_id, request, request.sampling_params)
    tokens, cached = [], None
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens = list(out.outputs[0].token_ids)
            cached = out.num_cached_tokens
    return tokens, cached


def main(model: str) -> None:
    os.environ["VLLM_HA_RESUME_KEY"] = "test"  # what --mirror-peer sets for its engines
    llm = LLM(model, enforce_eager=True, dtype="float32", max_model_len=512,
              block_size=BLOCK, enable_prefix_caching=True, seed=0)
    engine = llm.llm_engine
    prompt = [(i * 37 + 11) % 1500 + 10 for i in range(70)]
    result = {}
    for kind, extra in KINDS.items():
        params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, **extra)
        original = engine.input_processor.process_inputs(
            f"orig-{kind}", TokensPrompt(prompt_token_ids=prompt), params,
            supported_tasks=engine.get_supported_tasks())
        ref, _ = run_to_end(engine, original, f"ref-{kind}")
        runs = {}
        for k in (0, len(ref) // 2, len(ref) - 1):
            resumed = resume_request(original, ref[:k], prompt_logprobs_sent=k > 0)
            tokens, cached = run_to_end(engine, resumed, f"resume-{kind}-{k}")
            runs[k] = {"tokens": tokens, "cached": cached, "tokens_before": len(prompt) + k,
                       "max_tokens": resumed.sampling_params.max_tokens,
                       "prompt_len": len(resumed.prompt_token_ids)}
        result[kind] = {"ref": ref, "runs": runs,
                        "done": resume_request(original, ref + [0] * (MAX_TOKENS - len(ref)),
                                               prompt_logprobs_sent=True) is None}
    # A client's extra_args without the server's key: an ordinary request.
    forged = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True, extra_args={
        "vllm_ha_resumed_output": {"key": "guess", "tokens": [10**9, -5]}})
    req = engine.input_processor.process_inputs(
        "forged", TokensPrompt(prompt_token_ids=prompt), forged,
        supported_tasks=engine.get_supported_tasks())
    result["forged"] = run_to_end(engine, req, "forged")[0]
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main(sys.argv[1])
