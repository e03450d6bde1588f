# SPDX-License-Identifier: Apache-2.0
"""Failover of in-flight requests to the promoted standby (issue 4).

:class:`FailoverEngineCoreClient` wraps ``AsyncLLM.engine_core`` when a mirror is
configured (patch 0009). Upstream detects the primary's death within milliseconds
(the engine monitor's process sentinel, or the engine's dead signal) and
``get_output_async`` raises ``EngineDeadError``; the wrapper catches it there, before
``AsyncLLM``'s output handler would fail every request, and:

1. takes the standby's engine client from the supervisor (only a standby that is
   connected and mirroring: it holds the primary's KV up to the steps in flight);
2. promotes it (``mirror_promote``: unconfirmed steps dropped, their blocks held back);
3. resubmits every in-flight request with the tokens its client has been given as
   its output (:func:`~vllm.v1.engine.failover.resume_request`), under the same id:
   the API server's per-request state (detokenizer, logprobs, ``n > 1`` parent)
   continues as is, and the mirrored blocks are prefix-cache hits, so only the tail
   is recomputed;
4. reads outputs from the new engine. The output handler, which captured this
   wrapper, never notices.

Invariant that makes the stream exact: the handler processes outputs sequentially,
so when ``get_output_async`` raises, every token a client has seen is in its request's
detokenizer, and nothing after that exists anywhere but in the dead engine. Tokens
the dead engine produced but nobody read are regenerated.

Requests that cannot continue exactly (multimodal, prompt embeddings, ...) get an
error naming the reason; everything else keeps streaming. Requests that arrive
during the switch wait for it. With no standby to fail over to, the error propagates
as upstream's (engine death stays fatal).
"""

from __future__ import annotations

import asyncio
import inspect
import threading
import time
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

from vllm.logger import init_logger
from vllm.v1.engine.exceptions import EngineDeadError

from vllm.ha.envs import engine_exit_poll_s, failover_discard_kv
from vllm.v1.engine.exit_watch import EngineExitWatch
from vllm.v1.engine.failover import RequestLostInFailover, ResumeRefused, resume_request

if TYPE_CHECKING:
    from vllm.v1.engine import EngineCoreOutputs, EngineCoreRequest
    from vllm.v1.engine.mirror_supervisor import MirrorSupervisor

logger = init_logger(__name__)

PROMOTE_TIMEOUT_S = 30.0
# A primary seen exiting while no standby can take over is looked at again every
# EXIT_RECHECK_S for EXIT_RECHECK_FOR_S (a standby may be connecting right then).
EXIT_RECHECK_S = 0.01
EXIT_RECHECK_FOR_S = 5.0
# What AsyncLLM.errored sees between the primary's death and the end of the switch:
# new requests are accepted (and wait) instead of failing with EngineDeadError.
_ALIVE = SimpleNamespace(engine_dead=False)


class FailoverEngineCoreClient:
    """``AsyncLLM.engine_core`` with failover; everything not overridden goes to the
    current engine's client."""

    def __init__(self, client: Any, output_processor: Any, renderer: Any = None, *,
                 reasoning_gates_grammar: bool = False) -> None:
        self._client = client
        self.output_processor = output_processor
        self.renderer = renderer
        self.reasoning_gates_grammar = reasoning_gates_grammar
        self.supervisor: MirrorSupervisor | None = None
        # Every request sent and not finished, as the client sent it: what failover
        # resubmits (always rebuilt from the original, however many switches).
        self._retained: dict[str, EngineCoreRequest] = {}
        # Resubmitted request -> its token count then (recomputation is counted on
        # its first output from the new engine).
        self._resumed_tokens: dict[str, int] = {}
        self._switching = False
        self._gave_up = False  # no standby when the primary died: upstream behaviour
        self._last_output_at = time.monotonic()
        self._exit_watch: EngineExitWatch | None = None
        self._exit_seen: dict[int, float] = {}  # pid -> first seen exiting

    def start_exit_watch(self, loop: asyncio.AbstractEventLoop) -> None:
        """Fail over as soon as the primary's process begins to exit (exit_watch.py),
        not once the kernel has torn it down (upstream's sentinel, ~0.1 s later)."""
        poll_s = engine_exit_poll_s()
        if poll_s <= 0:
            return
        try:
            self._exit_watch = EngineExitWatch(loop, self._primary_exiting, poll_s)
        except (OSError, RuntimeError) as e:
            logger.warning("mirror: engine exit watch unavailable (%s): the primary's "
                           "death is seen by upstream's process sentinel", e)
            return
        self._exit_watch.watch(_engine_pids(self._client))

    def _primary_exiting(self, pid: int) -> None:
        client = self._client
        res = client.resources
        manager = res.engine_manager
        if (pid not in _engine_pids(client) or res.engine_dead or self._gave_up
                or getattr(manager, "manager_stopped", None) is None
                or manager.manager_stopped.is_set()):
            return  # shutting down, or already handled
        if not self._can_fail_over():
            # Nothing to fail over to at this instant (a standby still connecting):
            # look again shortly, for a while; upstream's sentinel decides meanwhile.
            watch = self._exit_watch
            if watch is not None and time.monotonic() - self._exit_seen.setdefault(
                    pid, time.monotonic()) < EXIT_RECHECK_FOR_S:
                asyncio.get_running_loop().call_later(EXIT_RECHECK_S, watch.watch, [pid])
            return
        logger.warning("mirror: the primary engine process (pid %d) is exiting", pid)
        res.engine_dead = True
        # Behind the outputs already received: the output handler processes those,
        # then get_output_async raises and fails over (the only path that switches).
        client.outputs_queue.put_nowait(EngineDeadError())

    # -- attributes AsyncLLM reads ----------------------------------------------------

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def on_current(*args: Any, **kwargs: Any) -> Any:
            return await self._on_current(name, *args, **kwargs)

        return on_current

    async def _on_current(self, method: str, *args: Any, **kwargs: Any) -> Any:
        """``method`` of the engine that serves once no switch runs (utilities: pause,
        sleep, LoRA, ... never reach a standby being promoted); one sent to a dying
        engine is redone on the new one."""
        await self._wait_switch(self._client)
        client = self._client
        try:
            return await getattr(client, method)(*args, **kwargs)
        except EngineDeadError:
            if not await self._wait_switch(client):
                raise
            return await getattr(self._client, method)(*args, **kwargs)

    @property
    def resources(self) -> Any:
        res = self._client.resources
        if res.engine_dead and not self._gave_up and (
                self._switching or self._can_fail_over()):
            return _ALIVE
        return res

    @property
    def requests_in_flight(self) -> int:
        return len(self._retained)

    def seconds_since_output(self) -> float:
        """Since the engine last produced anything while requests were in flight (0
        when none are): a step-timeout watchdog's measure of progress."""
        return time.monotonic() - self._last_output_at if self._retained else 0.0

    def _can_fail_over(self) -> bool:
        sup = self.supervisor
        return sup is not None and sup.can_fail_over()

    def shutdown(self, timeout: float | None = None) -> None:
        if self._exit_watch is not None:
            self._exit_watch.stop()
        self._client.shutdown(timeout=timeout)

    # -- requests ---------------------------------------------------------------------

    async def add_request_async(self, request: EngineCoreRequest) -> None:
        await self._wait_switch(self._client)
        client = self._client
        if not self._retained:
            self._last_output_at = time.monotonic()
        self._retained[request.request_id] = request
        try:
            await client.add_request_async(request)
        except EngineDeadError:
            if not await self._wait_switch(client):
                raise
            # The switch resubmitted it: it was retained before the switch began.

    async def abort_requests_async(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            self._retained.pop(rid, None)
            self._resumed_tokens.pop(rid, None)
        if self._switching:
            # Never hold the output handler here (it may be between the chunks of a
            # batch): the switch resubmits nothing popped above; tell the new engine
            # about the rest once it serves.
            asyncio.get_running_loop().create_task(self._abort_after_switch(request_ids))
            return
        await self._client.abort_requests_async(request_ids)

    async def _abort_after_switch(self, request_ids: list[str]) -> None:
        if await self._wait_switch(self._client):
            await self._client.abort_requests_async(request_ids)

    async def call_utility_async(self, method: str, *args: Any) -> Any:
        return await self._on_current("call_utility_async", method, *args)

    async def get_output_async(self) -> EngineCoreOutputs:
        while True:
            if self._gave_up:
                raise EngineDeadError()
            client = self._client
            try:
                outputs = await client.get_output_async()
            except EngineDeadError:
                # Only this path switches: the output handler calls it once every
                # output it received is processed, so the clients' tokens are exactly
                # the detokenizers' (a switch started elsewhere could snapshot them
                # between the chunks of a batch and duplicate a token).
                if not await self._fail_over(client):
                    raise
                continue
            self._last_output_at = time.monotonic()
            self._account(outputs)
            return outputs

    def _account(self, outputs: EngineCoreOutputs) -> None:
        for out in outputs.outputs:
            rid = out.request_id
            if rid in self._resumed_tokens and out.prefill_stats is not None:
                total = self._resumed_tokens.pop(rid)
                cached = out.prefill_stats.num_cached_tokens
                if self.supervisor is not None:
                    self.supervisor.on_resumed_request(total - cached, total)
            if out.finished:
                self._retained.pop(rid, None)
                self._resumed_tokens.pop(rid, None)

    # -- the switch -------------------------------------------------------------------

    async def _wait_switch(self, dead: Any) -> bool:
        """Until requests no longer depend on ``dead`` (the current client: until no
        switch runs). True if a live engine serves them now."""
        deadline = time.monotonic() + PROMOTE_TIMEOUT_S + 30
        while (self._switching or (self._client is dead and dead.resources.engine_dead)) \
                and not self._gave_up:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(0.002)
        return not self._gave_up and self._client is not dead or \
            not dead.resources.engine_dead

    async def _fail_over(self, dead: Any) -> bool:
        sup = self.supervisor
        standby = sup.claim_standby() if sup is not None else None
        if standby is None:
            self._give_up(sup, f"no standby holds its KV (state: "
                               f"{sup.state.state if sup is not None else 'no mirror'})")
            # Upstream's monitor skips an engine already marked dead (the exit watch).
            threading.Thread(target=dead.shutdown, daemon=True).start()
            return False
        t0 = time.monotonic()
        self._switching = True
        try:
            _fail_pending_utility_calls(dead)
            self._client = standby
            logger.warning("mirror: the primary engine died; failing over to the standby "
                           "(%d request(s) in flight)", len(self._retained))
            promoted = await asyncio.wait_for(
                standby.call_utility_async("mirror_promote", failover_discard_kv()),
                PROMOTE_TIMEOUT_S)
            if self.renderer is not None:
                # The sender-side multimodal cache believes the dead engine holds its
                # items; the new engine's receiver cache is empty.
                await self.renderer.clear_mm_cache_async()
            resumed, refused = await self._resubmit()
        except BaseException as e:  # cancelled too: never leave requests half-moved
            logger.exception("mirror: failover failed")
            self._client = dead
            self._give_up(sup, f"failover failed: {type(e).__name__}: {e}")
            threading.Thread(target=dead.shutdown, daemon=True).start()
            threading.Thread(target=standby.shutdown, daemon=True).start()
            if not isinstance(e, Exception):
                raise
            return False
        finally:
            self._switching = False
        seconds = time.monotonic() - t0
        self._last_output_at = time.monotonic()
        logger.warning("mirror: failover done in %.0f ms: %d request(s) resumed, %d "
                       "refused; serving unprotected until a new standby is in sync",
                       seconds * 1e3, resumed, refused)
        if self._exit_watch is not None:
            self._exit_watch.watch(_engine_pids(standby))
        # The dead client's monitor may not have cleaned up (an engine that sent its
        # dead signal, or one seen exiting here): do it off the loop.
        threading.Thread(target=dead.shutdown, daemon=True).start()
        if sup is not None:
            sup.on_promoted(promoted, seconds=seconds, resumed=resumed, refused=refused)
        return True

    def _give_up(self, sup: Any, reason: str) -> None:
        self._gave_up = True
        logger.error("mirror: the primary engine died and its requests cannot fail over "
                     "(%s); failing them", reason)
        if sup is not None:
            sup.on_primary_lost(reason)

    async def _resubmit(self) -> tuple[int, int]:
        states = self.output_processor.request_states
        resumed = refused = 0
        for rid, request in list(self._retained.items()):
            state = states.get(rid)
            if state is None:  # finished or aborted meanwhile
                self._retained.pop(rid, None)
                continue
            # Every token the client has, since the request began (over any number of
            # switches: the original request is what is retained).
            generated = (list(state.detokenizer.output_token_ids)
                         if state.detokenizer is not None else [])
            try:
                new = resume_request(request, generated,
                                     prompt_logprobs_sent=not state.is_prefilling,
                                     reasoning_gates_grammar=self.reasoning_gates_grammar)
            except ResumeRefused as e:
                refused += 1
                self._retained.pop(rid, None)
                logger.warning("mirror: %s", e)
                self._fail_request(rid, e.reason)
                continue
            if new is None:
                # Its whole budget reached the client; only the finish was lost.
                self._retained.pop(rid, None)
                self._finish_as_length(rid)
                continue
            if generated:
                self._resumed_tokens[rid] = len(new.prompt_token_ids or ()) + len(generated)
            await self._client.add_request_async(new)
            resumed += 1
        return resumed, refused

    def _fail_request(self, rid: str, reason: str) -> None:
        # generate() raises it (as an EngineDeadError it does not abort the request
        # itself, so its state is dropped here; the abort output behind the error is
        # never read).
        state = self.output_processor.request_states.get(rid)
        if state is not None and state.queue is not None:
            state.queue.put(RequestLostInFailover(reason))
        self.output_processor.abort_requests([rid], internal=True)

    def _finish_as_length(self, rid: str) -> None:
        from vllm.v1.engine import EngineCoreOutput, FinishReason

        self.output_processor.process_outputs(
            [EngineCoreOutput(request_id=rid, new_token_ids=[],
                              finish_reason=FinishReason.LENGTH)], time.monotonic(), None)


def _engine_pids(client: Any) -> list[int]:
    manager = getattr(client.resources, "engine_manager", None)
    return [p.pid for p in getattr(manager, "processes", ()) if p.pid is not None]


def _fail_pending_utility_calls(client: Any) -> None:
    """A dead engine never answers: its callers get EngineDeadError now."""
    for fut in list(getattr(client, "utility_results", {}).values()):
        if not fut.done():
            fut.set_exception(EngineDeadError())
