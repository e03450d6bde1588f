"""Failover end to end: `vllm serve --mirror-peer cpu` on the tiny model, the primary
engine killed with SIGKILL while clients stream, real HTTP.

The reference is computed in the same test on the same server (greedy, one request
at a time), then the prefix cache is reset so the streams start cold: what the
promoted standby finds in its prefix cache afterwards came through the mirror."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import pytest

from tests.utils import ON_CUDA, RemoteServer, child_env
from tests.v1.engine.test_mirror_supervisor import (
    ARGS,
    BLOCK,
    NUM_BLOCKS,
    metric,
    text,
    wait_mirror,
)

pytestmark = pytest.mark.slow

STREAMS = 8
MAX_TOKENS = 600  # long enough that a kill lands mid-decode on a fast box
# Room for every stream at once (no preemption: recomputation is the failover's alone).
FO_ARGS = [("1024" if a == str(NUM_BLOCKS) else a) for a in ARGS]
# The hung-engine test's streams run to the tiny model's 2,048 positions.
FO_ARGS[FO_ARGS.index("--max-model-len") + 1] = "2048"
HUNG_MAX_TOKENS = 1800
STEP_TIMEOUT = 5
FO_ARGS += ["--mirror-step-timeout", str(STEP_TIMEOUT),
            # Tokens reach clients 4 at a time: less work for the API server, which
            # shares 2 cores with three engines here (and the switch must keep the
            # interval's offsets right).
            "--stream-interval", "4"]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("failover") / "serve.log"
    env = child_env(VLLM_SERVER_DEV_MODE="1")
    with RemoteServer(str(tiny_model), FO_ARGS, log, env=env) as s:
        wait_mirror(s)
        yield s


def greedy(server: RemoteServer, prompt: str, max_tokens: int = MAX_TOKENS,
           **params) -> list[int]:
    r = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "temperature": 0,
                                        "max_tokens": max_tokens, "ignore_eos": True,
                                        "return_token_ids": True, **params}, timeout=300)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["token_ids"]


class Stream(threading.Thread):
    """One streamed greedy completion: its tokens as they arrive, its HTTP status and
    any error event."""

    def __init__(self, server: RemoteServer, prompt: str, max_tokens: int = MAX_TOKENS,
                 **params):
        super().__init__(daemon=True)
        self.server, self.prompt, self.max_tokens = server, prompt, max_tokens
        self.params = params  # extra request fields (n, stop, logprobs, seed, ...)
        self.tokens: list[int] = []
        self.by_index: dict[int, list[int]] = {}
        self.text: dict[int, str] = {}
        self.logprob_tokens: dict[int, int] = {}
        self.status: int | None = None
        self.errors: list[str] = []
        self.finish_reason: str | None = None
        self.ids: set[str] = set()  # the completion id of every chunk

    def run(self) -> None:
        body = {"model": "tiny", "prompt": self.prompt, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "return_token_ids": True, **self.params}
        try:
            with self.server.post("/v1/completions", body, stream=True, timeout=300) as r:
                self.status = r.status_code
                for line in r.iter_lines(decode_unicode=True):
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if "error" in event:
                        self.errors.append(json.dumps(event["error"]))
                        continue
                    self.ids.add(event["id"])
                    for c in event["choices"]:
                        ids = c.get("token_ids") or []
                        self.tokens.extend(ids)
                        self.by_index.setdefault(c["index"], []).extend(ids)
                        self.text[c["index"]] = self.text.get(c["index"], "") + c["text"]
                        if c.get("logprobs"):
                            self.logprob_tokens[c["index"]] = (
                                self.logprob_tokens.get(c["index"], 0)
                                + len(c["logprobs"]["tokens"]))
                        self.finish_reason = c.get("finish_reason") or self.finish_reason
        except Exception as e:  # a broken connection is a failure the test reports
            self.errors.append(f"{type(e).__name__}: {e}")


def prompts(base: int) -> list[str]:
    # Different lengths (partial last blocks of every size), no shared prefixes.
    return [f"{i} " + text(base + i, 10 + 6 * i) for i in range(STREAMS)]


def reset_prefix_cache(server: RemoteServer, ps: list[str]) -> None:
    """A cold cache on the primary (the mirror forwards the reset to the standby
    with the next step's ops, before any new block). Upstream refuses a reset while
    blocks are in use, mirror copies in flight included: retry."""
    ids = [server.post("/tokenize", {"model": "tiny", "prompt": p}).json()["tokens"]
           for p in ps]
    deadline = time.monotonic() + 60
    while True:
        wait_mirror(server)
        assert server.post("/reset_prefix_cache", {}).status_code == 200
        hits = server.post("/mirror/lookup", {"prompts": ids}).json()
        if not any(hits["primary"]):
            return
        assert time.monotonic() < deadline, hits
        time.sleep(0.2)


def reference(server: RemoteServer, ps: list[str], max_tokens: int = MAX_TOKENS
              ) -> list[list[int]]:
    refs = [greedy(server, p, max_tokens) for p in ps]
    # Start the streams cold: the standby can only have their blocks by mirroring.
    reset_prefix_cache(server, ps)
    return refs


def kill_primary_during(server: RemoteServer, streams: list[Stream], join: bool = True) -> int:
    """SIGKILL the primary while every stream decodes on it. The engine is paused
    until the server holds all of them (on the busy 2-core box the API server admits
    requests slowly, and the tiny model would finish the first before the last
    arrives), then resumed; the kill follows a client's first token."""
    before = server.get("/mirror").json()
    pid = before["primary"]["pid"]
    assert server.post("/pause?mode=keep&clear_cache=false", {}).status_code == 200
    for s in streams:
        s.start()
    deadline = time.monotonic() + 120
    while server.get("/mirror").json()["requests_in_flight"] < len(streams):
        assert time.monotonic() < deadline
        assert all(s.is_alive() for s in streams), [s.errors for s in streams]
        time.sleep(0.02)
    assert server.post("/resume", {}).status_code == 200
    while max(len(s.tokens) for s in streams) < 1:
        assert time.monotonic() < deadline, [len(s.tokens) for s in streams]
        assert all(s.status in (None, 200) for s in streams), [s.status for s in streams]
        time.sleep(0.01)
    os.kill(pid, signal.SIGKILL)
    for s in streams:
        if join:
            s.join(300)
    return pid


def assert_exact(streams: list[Stream], refs: list[list[int]]) -> None:
    for i, (s, ref) in enumerate(zip(streams, refs)):
        assert s.status == 200 and not s.errors, (i, s.status, s.errors)
        assert s.finish_reason == "length", (i, s.finish_reason)
        assert len(s.ids) == 1, s.ids  # one request id across the switch
        assert s.tokens == ref, (i, len(s.tokens), len(ref),
                                 next((k for k, (a, b) in enumerate(zip(s.tokens, ref))
                                       if a != b), None))


def test_kill_primary_during_decode_streams_continue_exactly(server):
    ps = prompts(100)
    refs = reference(server, ps)
    streams = [Stream(server, p) for p in ps]
    old_pid = kill_primary_during(server, streams)
    assert_exact(streams, refs)

    st = server.get("/mirror").json()
    assert st["failovers"] == 1, st
    last = st["last_failover"]
    assert last["requests_resumed"] == STREAMS and last["requests_refused"] == 0, last
    assert last["seconds"] < 5, last
    # Only the unmirrored tail is recomputed: per request at most one block (the
    # partly filled last one, or the last full one: vLLM always computes the last
    # token), plus any block whose copy was in flight when the primary died (held
    # back at promotion, never published).
    held = last["blocks_held_back"]
    assert last["recomputed_tokens_max"] <= BLOCK * (1 + held), last
    assert last["recomputed_tokens"] <= BLOCK * (STREAMS + held), last
    assert st["primary"]["pid"] != old_pid
    # Seen as the kernel began the exit (the exit watch), not once it had torn the
    # process down (upstream's sentinel).
    assert f"the primary engine process (pid {old_pid}) is exiting" in \
        server.log_path.read_text(errors="replace")
    assert metric(server, "vllm:mirror_failovers_total") == 1
    assert metric(server, "vllm:mirror_failover_resumed_requests_total") == \
        last["requests_resumed"]
    # The server was never unhealthy for clients, and says it is unprotected until a
    # new standby is in sync.
    assert server.get("/health").status_code == 200


def test_reprotected_after_failover_and_a_second_failover_works(server):
    st = wait_mirror(server, timeout=300)  # a new standby, caught up from the new primary
    assert st["failovers"] == 1 and st["standby"]["pid"] != st["primary"]["pid"]
    verify = server.post("/mirror/verify", {}).json()
    assert verify["checked"] > 0 and not verify["missing"] and not verify["mismatched"]

    ps = prompts(200)
    refs = reference(server, ps)
    streams = [Stream(server, p) for p in ps]
    kill_primary_during(server, streams)
    assert_exact(streams, refs)
    st = server.get("/mirror").json()
    assert st["failovers"] == 2 and st["last_failover"]["requests_resumed"] == STREAMS, st


def test_a_request_lives_through_two_failovers(server):
    """Resubmitted twice: always rebuilt from the request as sent plus every token
    its client has, never from the first resubmission."""
    wait_mirror(server, timeout=300)
    p = prompts(700)[5]
    ref = reference(server, [p])[0]
    failovers = server.get("/mirror").json()["failovers"]
    s = Stream(server, p)
    kill_primary_during(server, [s], join=False)
    # Hold it on the promoted engine until a new standby protects it, then kill that.
    assert server.post("/pause?mode=keep&clear_cache=false", {}).status_code == 200
    deadline = time.monotonic() + 300
    while not server.get("/mirror").json()["protected"]:
        assert time.monotonic() < deadline and s.is_alive()
        time.sleep(0.2)
    pid = server.get("/mirror").json()["primary"]["pid"]
    n = len(s.tokens)
    assert n < MAX_TOKENS
    assert server.post("/resume", {}).status_code == 200
    while len(s.tokens) <= n:
        assert time.monotonic() < deadline and s.is_alive()
        time.sleep(0.01)
    # Held again for the kill: the tiny model could otherwise finish the request
    # before the signal lands, and the second failover would resume nothing.
    assert server.post("/pause?mode=keep&clear_cache=false", {}).status_code == 200
    time.sleep(0.5)  # tokens already out of the engine reach the client
    assert s.is_alive() and len(s.tokens) < MAX_TOKENS, len(s.tokens)
    os.kill(pid, signal.SIGKILL)  # the promoted standby is not paused: it resumes
    s.join(300)
    assert_exact([s], [ref])
    st = server.get("/mirror").json()
    assert st["failovers"] == failovers + 2, st
    assert st["last_failover"]["requests_resumed"] == 1, st


def test_kill_during_prefill_and_right_after_a_request_finished(server):
    wait_mirror(server, timeout=300)
    long_prompt = text(300, 400)  # ~800 tokens: a long prefill
    short = text(301, 30)
    ref_long, ref_short = reference(server, [long_prompt, short], 32)
    failovers = server.get("/mirror").json()["failovers"]

    # Killed before its first token: the request is queued or in prefill.
    pid = server.get("/mirror").json()["primary"]["pid"]
    s = Stream(server, long_prompt, 32)
    s.start()
    time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    s.join(300)
    assert s.status == 200 and not s.errors and s.tokens == ref_long, (s.errors, s.tokens)

    # Killed right after a request finished: nothing in flight, the next is served.
    wait_mirror(server, timeout=300)
    assert greedy(server, short, 32) == ref_short
    pid = server.get("/mirror").json()["primary"]["pid"]
    os.kill(pid, signal.SIGKILL)
    assert greedy(server, short, 32) == ref_short
    st = server.get("/mirror").json()
    assert st["failovers"] == failovers + 2, st


def test_a_hung_primary_is_killed_after_the_step_timeout_and_fails_over(server):
    ps = prompts(400)[:4]
    # Three times the other tests' streams: a client reading streams lags the engine
    # by seconds on a loaded box, and 600 tokens were once all decoded before the
    # SIGSTOP below (a hung engine with nothing to do is never noticed).
    refs = reference(server, ps, max_tokens=HUNG_MAX_TOKENS)
    failovers = server.get("/mirror").json()["failovers"]
    pid = server.get("/mirror").json()["primary"]["pid"]
    streams = [Stream(server, p, max_tokens=HUNG_MAX_TOKENS) for p in ps]
    for s in streams:
        s.start()
    deadline = time.monotonic() + 120
    # Every stream has begun: stop now (waiting for more tokens let the engine finish
    # first).
    while min(len(s.tokens) for s in streams) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.005)
    t_stop = time.time()
    os.kill(pid, signal.SIGSTOP)  # alive, silent: no exit for the monitor to see
    for s in streams:
        s.join(300)
    assert_exact(streams, refs)
    st = server.get("/mirror").json()
    assert st["failovers"] == failovers + 1, st
    # Killed once the timeout passed (not before), failed over promptly after.
    waited = st["last_failover"]["at"] - t_stop
    assert STEP_TIMEOUT - 0.5 <= waited < STEP_TIMEOUT + 10, waited


# Penalties and a grammar count the output before the switch: resent as prompt, both
# diverge (tests/v1/engine/test_failover.py shows it on a real engine).
PENALTIES = {"presence_penalty": 2.0, "frequency_penalty": 2.0}
# No end before MAX_TOKENS, and which group comes next depends on the whole output.
STRUCTURED = {"structured_outputs": {"regex": "((ab){5}(bba){5}){200}"}}


def test_each_kind_of_request_in_flight_at_failover(server):
    """n > 1, stop strings, logprobs, seeded sampling, usage of a non-streamed request,
    presence/frequency penalties, structured output, and a request that cannot
    continue exactly (bound to a KV transfer peer): docs/kv-mirroring.md says what
    each does; here it is held to that."""
    p_n, p_stop, p_lp, p_seed, p_usage, p_pen, p_so, p_kv = (
        f"{k} " + text(600 + k, 12 + 3 * k) for k in range(8))
    r = server.post("/v1/completions", {"model": "tiny", "prompt": p_stop, "temperature": 0,
                                        "max_tokens": MAX_TOKENS, "ignore_eos": True})
    ref_stop_text = r.json()["choices"][0]["text"]
    # A stop string first seen well after the switch (the kill comes at ~24 tokens).
    tail = ref_stop_text[len(ref_stop_text) // 2:]
    stop = next(tail[i:i + 6] for i in range(len(tail)) if tail[i:i + 6].strip() == tail[i:i + 6]
                and ref_stop_text.find(tail[i:i + 6]) >= len(ref_stop_text) // 2)
    expected_stop_text = ref_stop_text[:ref_stop_text.find(stop)]
    ref_lp = greedy(server, p_lp)
    ref_usage = greedy(server, p_usage)
    ref_pen = greedy(server, p_pen, **PENALTIES)
    ref_so = greedy(server, p_so, **STRUCTURED)
    assert len(ref_so) == MAX_TOKENS and len(set(ref_pen)) > len(ref_pen) // 2
    reset_prefix_cache(server, [p_n, p_stop, p_lp, p_seed, p_usage, p_pen, p_so, p_kv])
    failovers = server.get("/mirror").json()["failovers"]

    streams = [Stream(server, p_n, n=2, temperature=0.8, seed=7), Stream(server, p_stop, stop=[stop]),
               Stream(server, p_lp, logprobs=2), Stream(server, p_seed, temperature=1.0,
                                                        seed=1234),
               Stream(server, p_pen, **PENALTIES), Stream(server, p_so, **STRUCTURED),
               Stream(server, p_kv, kv_transfer_params={"remote_engine_id": "gone"})]
    usage: dict = {}

    def non_streamed() -> None:
        usage.update(server.post("/v1/completions", {
            "model": "tiny", "prompt": p_usage, "temperature": 0, "max_tokens": MAX_TOKENS,
            "ignore_eos": True, "return_token_ids": True}, timeout=300).json())

    t = threading.Thread(target=non_streamed, daemon=True)
    t.start()
    kill_primary_during(server, streams)
    t.join(300)
    n, stop_s, lp, seed, pen, so, kv = streams
    st = server.get("/mirror").json()
    assert st["failovers"] == failovers + 1, st

    # n = 2 (sampling: vLLM refuses n > 1 with greedy): each sequence resumes on its
    # own and completes its budget.
    assert n.status == 200 and not n.errors, n.errors
    assert sorted(n.by_index) == [0, 1] and all(len(v) == MAX_TOKENS for v in n.by_index.values())
    # The stop string spans the switch: matched, not emitted, same text as a single run.
    assert not stop_s.errors and stop_s.finish_reason == "stop", (stop_s.errors, stop_s.text)
    assert stop_s.text[0] == expected_stop_text
    # Logprobs: one entry per token, none repeated or missing across the switch.
    assert not lp.errors and lp.by_index[0] == ref_lp and lp.logprob_tokens[0] == len(ref_lp)
    # Seeded sampling completes (on the V1 runner the seed's sequence restarts).
    assert not seed.errors and len(seed.tokens) == MAX_TOKENS
    # Usage stays truthful for the request as the client sent it.
    choice = usage["choices"][0]
    assert choice["token_ids"] == ref_usage
    assert usage["usage"]["completion_tokens"] == MAX_TOKENS
    prompt_len = len(server.post("/tokenize", {"model": "tiny", "prompt": p_usage})
                     .json()["tokens"])
    assert usage["usage"]["prompt_tokens"] == prompt_len, usage["usage"]
    # Penalties and the grammar carry on from the whole output: exact.
    assert_exact([pen, so], [ref_pen, ref_so])
    # Bound to a KV transfer peer of the dead engine: refused with the reason.
    assert kv.errors and "cannot continue on the standby: the request is bound to a KV " \
        "transfer peer" in kv.errors[0], kv.errors
    assert st["last_failover"]["requests_refused"] == 1, st["last_failover"]


@pytest.mark.skipif(ON_CUDA, reason="CPU tier")
def test_without_a_standby_engine_death_stays_fatal(tiny_model, tmp_path):
    """No mirror configured: upstream's behaviour (the stream fails, the server stops)."""
    args, it = [], iter(FO_ARGS)
    for a in it:
        if a in ("--mirror-peer", "--mirror-step-timeout"):
            next(it)
        elif a != "--mirror-allow-same-device":
            args.append(a)
    with RemoteServer(str(tiny_model), args, tmp_path / "serve.log") as s:
        import psutil

        engine = next(p for p in psutil.Process(s.proc.pid).children(recursive=True)
                      if "EngineCore" in " ".join(p.cmdline()))
        stream = Stream(s, text(1, 20), 800)
        stream.start()
        deadline = time.monotonic() + 60
        while len(stream.tokens) < 5:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        engine.kill()
        stream.join(60)
        assert not stream.is_alive()
        assert stream.errors or len(stream.tokens) < 800
        s.proc.wait(60)  # upstream's watchdog stops the server


def test_primary_death_while_unprotected_fails_requests_clearly(server):
    """Last: it ends the shared server. No standby to take over (killed just before):
    the in-flight request ends with an error instead of hanging, and the server
    reports the loss and stops like upstream."""
    wait_mirror(server, timeout=300)
    st = server.get("/mirror").json()
    os.kill(st["standby"]["pid"], signal.SIGKILL)
    deadline = time.monotonic() + 30
    while server.get("/mirror").json()["protected"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    stream = Stream(server, text(500, 20), MAX_TOKENS)
    stream.start()
    deadline = time.monotonic() + 60
    while not stream.tokens:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    os.kill(st["primary"]["pid"], signal.SIGKILL)
    stream.join(30)
    assert not stream.is_alive(), "the request hung"
    assert stream.errors and len(stream.tokens) < MAX_TOKENS, (stream.errors, len(stream.tokens))
    server.proc.wait(60)  # upstream's watchdog stops the server: nothing left to serve
