# SPDX-License-Identifier: Apache-2.0
"""Failover: an in-flight request continues on the promoted standby (issue 4).

Phase 1 of the design (``docs/design/failover.md`` §3): the request goes to the new
engine as prompt + the tokens generated so far, under the same id and arrival time,
with the budget that is left. Its block hashes then equal the primary's, so every
mirrored block is a prefix-cache hit and only the unmirrored tail is recomputed.
The API server's per-request state (detokenizer, logprobs, parent of ``n > 1``) is
kept as is: the new engine emits only tokens sampled after the switch.

What this file decides is which requests can continue exactly and how; promotion
and the swap of engine clients are built on top of it. Seeded sampling continues the
seed's sequence on the V2 model runner (noise keyed on the absolute position) but
restarts it on the V1 runner (CPU); greedy is exact on both.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from vllm.v1.engine.exceptions import EngineDeadError

from vllm.v1.engine import EngineCoreRequest


class RequestLostInFailover(EngineDeadError):
    """What a refused request's client gets: the engine that served it died and it
    cannot continue exactly elsewhere. An ``EngineDeadError`` (upstream's generate()
    passes those through with their message), but the server keeps serving."""

    def __init__(self, reason: str) -> None:
        super().__init__()
        self.reason = reason

    def __str__(self) -> str:
        return ("the engine serving this request died and the request cannot continue "
                f"on the standby: {self.reason}")


class ResumeRefused(Exception):
    """This request cannot continue on another engine; the message says why and
    goes to the client instead of a silent divergence."""

    reason: str = ""


def refusal_reason(request: EngineCoreRequest) -> str | None:
    """Why ``request`` cannot be continued from prompt + generated tokens, or None."""
    if request.mm_features:
        return "multimodal inputs live only in the dead engine's cache"
    if request.prompt_embeds is not None or request.prompt_is_token_ids is not None:
        return "prompt embeddings cannot be extended with generated token ids"
    if request.resumable:
        return "a streaming-input session lives in the dead engine's scheduler"
    sp = request.sampling_params
    if sp is None:
        return None  # pooling: resent unchanged
    if sp.structured_outputs is not None:
        return "structured output would restart its grammar mid-document"
    if sp.extra_args and sp.extra_args.get("kv_transfer_params"):
        return "the request is bound to a KV transfer peer of the dead engine"
    # State kept over the output tokens only: moved into the prompt, it would reset.
    if sp.presence_penalty or sp.frequency_penalty:
        return "presence/frequency penalties count output tokens only"
    if sp.repetition_detection is not None:
        return "repetition detection would lose the output before the switch"
    if sp.thinking_token_budget is not None:
        return "the thinking-token budget would restart"
    if any(len(ids) > 1 for ids in getattr(sp, "_bad_words_token_ids", None) or []):
        return "a multi-token bad word could span the switch"
    return None


def resume_request(request: EngineCoreRequest, generated: Sequence[int], *,
                   prompt_logprobs_sent: bool) -> EngineCoreRequest | None:
    """The request to send to the new engine, or None when nothing is left to do
    (its whole budget was generated; the caller finishes it as ``length``).

    ``generated`` are the output token ids the client has been given (the API
    server's detokenizer holds them); ``prompt_logprobs_sent`` whether the first
    output, which carries prompt logprobs, already went out.
    Raises :class:`ResumeRefused` for requests that cannot continue exactly."""
    reason = refusal_reason(request)
    if reason is not None:
        err = ResumeRefused(f"request {request.request_id} cannot fail over: {reason}")
        err.reason = reason
        raise err
    sp = request.sampling_params
    if sp is None:
        return request
    n = len(generated)
    params = sp.clone()
    if params.max_tokens is not None:
        if params.max_tokens <= n:
            return None
        params.max_tokens -= n
    params.min_tokens = max(0, params.min_tokens - n)
    if prompt_logprobs_sent:
        params.prompt_logprobs = None
    assert request.prompt_token_ids is not None
    # A new list: the API server's RequestState shares the original one.
    return msgspec.structs.replace(
        request, prompt_token_ids=[*request.prompt_token_ids, *generated],
        sampling_params=params)
