"""Run in a subprocess by test_failover.py: one real engine (CPU, tiny model) generates
a greedy reference, then continues the same request from several points as the
failover would (prompt + generated so far). Prints JSON."""

from __future__ import annotations

import json
import sys

from vllm.inputs import TokensPrompt

from vllm import LLM, SamplingParams
from vllm.v1.engine.failover import resume_request

BLOCK = 16


def main(model: str) -> None:
    llm = LLM(model, enforce_eager=True, dtype="float32", max_model_len=512,
              block_size=BLOCK, enable_prefix_caching=True, seed=0)
    engine = llm.llm_engine
    prompt = [(i * 37 + 11) % 1500 + 10 for i in range(70)]
    params = SamplingParams(max_tokens=40, min_tokens=30, temperature=0, ignore_eos=True)
    ref = list(llm.generate(TokensPrompt(prompt_token_ids=prompt), params)[0]
               .outputs[0].token_ids)
    original = engine.input_processor.process_inputs(
        "orig", TokensPrompt(prompt_token_ids=prompt), params,
        supported_tasks=engine.get_supported_tasks())
    runs = {}
    for k in (0, 17, 39):
        resumed = resume_request(original, ref[:k], prompt_logprobs_sent=k > 0)
        import msgspec
        resumed = msgspec.structs.replace(resumed, request_id=f"resume-{k}")
        engine.add_request(resumed.request_id, resumed, resumed.sampling_params)
        tokens, cached = [], None
        while engine.has_unfinished_requests():
            for out in engine.step():
                tokens = list(out.outputs[0].token_ids)
                cached = out.num_cached_tokens
        runs[k] = {"tokens": tokens, "cached": cached, "prompt_len": len(prompt) + k,
                   "max_tokens": resumed.sampling_params.max_tokens,
                   "min_tokens": resumed.sampling_params.min_tokens}
    done = resume_request(original, ref, prompt_logprobs_sent=True)
    print("RESULT " + json.dumps({"ref": ref, "runs": runs, "done": done is None,
                                  "original_prompt_len": len(original.prompt_token_ids)}))


if __name__ == "__main__":
    main(sys.argv[1])
