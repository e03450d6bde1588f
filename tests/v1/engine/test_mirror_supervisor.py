"""`vllm serve --mirror-peer cpu` end to end on the tiny model: a real primary engine, a
real standby engine, NIXL between their workers, real HTTP.

After a mixed workload (long and short prompts, concurrent streams, shared prefixes,
preemptions forced by a small KV cache), every block in the primary's prefix cache is
on the standby at the same block id, byte-identical (checksums through the debug
route), and the standby's prefix cache answers every sequence as the primary's does.
Killing the standby leaves the primary serving; the restarted standby catches up."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from tests.utils import ON_CUDA, RemoteServer, child_env, vllm_cli

pytestmark = pytest.mark.slow

BLOCK = 16
NUM_BLOCKS = 96  # small: eight long requests at once must preempt
ARGS = ["--max-model-len", "1024", "--max-num-batched-tokens", "1024", "--max-num-seqs", "16",
        "--enforce-eager", "--served-model-name", "tiny", "--block-size", str(BLOCK),
        "--num-gpu-blocks-override", str(NUM_BLOCKS), "--mirror-peer", "cpu"]
ARGS += (["--dtype", "bfloat16", "--gpu-memory-utilization", "0.2"] if ON_CUDA
         else ["--dtype", "float32"])
if ON_CUDA:  # one GPU: the standby shares it
    ARGS[ARGS.index("cpu")] = "cuda:0"
    ARGS.append("--mirror-allow-same-device")

WORDS = ("cache block mirror standby engine primary worker scheduler token stream "
         "prefix hash layer tensor").split()


def text(seed: int, n_words: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


def wait_mirror(server: RemoteServer, state: str = "in_sync", timeout: float = 300,
                settled: bool = True) -> dict:
    """/mirror once it reports ``state`` (and, with ``settled``, nothing in flight)."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = server.get("/mirror", params={"refresh": "true"}).json()
        if last["state"] == state and (not settled or (
                last["lag_blocks"] == 0 and last["backlog_blocks"] == 0
                and last["standby"].get("lag_steps", 1) == 0)):
            return last
        time.sleep(0.5)
    raise AssertionError(f"mirror not {state} after {timeout} s: {last}\n{server.tail()}")


@pytest.fixture(scope="module", params=["staged", "direct"])
def server(request, tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp(f"mirror-{request.param}") / "serve.log"
    env = child_env(VLLM_SERVER_DEV_MODE="1")
    args = ARGS + ["--mirror-transport", request.param]
    with RemoteServer(str(tiny_model), args, log, env=env) as s:
        s.transport = request.param
        wait_mirror(s)
        yield s


def complete(server: RemoteServer, prompt: str, max_tokens: int) -> dict:
    r = server.post("/v1/completions", {"model": "tiny", "prompt": prompt, "temperature": 0,
                                        "max_tokens": max_tokens, "ignore_eos": True,
                                        "return_token_ids": True}, timeout=300)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    return {"tokens": choice["prompt_token_ids"] + choice["token_ids"]}


def stream(server: RemoteServer, prompt: str, max_tokens: int, out: list) -> None:
    body = {"model": "tiny", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "return_token_ids": True}
    n = 0
    with server.post("/v1/completions", body, stream=True, timeout=300) as r:
        assert r.status_code == 200, r.text
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: {"):
                # Tokens, not chunks: the detokenizer may hold a token back a chunk.
                n += sum(len(c["token_ids"] or []) for c in json.loads(line[6:])["choices"])
    out.append(n)


def assert_standby_holds_everything(server: RemoteServer, sequences: list[list[int]]):
    wait_mirror(server)
    verify = server.post("/mirror/verify", {}).json()
    assert verify["checked"] > 0, verify
    assert verify["missing"] == [] and verify["mismatched"] == [], verify
    hits = server.post("/mirror/lookup", {"prompts": sequences}).json()
    assert hits["standby"] == hits["primary"], hits
    return verify, hits


def metric(server: RemoteServer, name: str) -> float:
    for line in server.get("/metrics").text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not on /metrics")


def test_status_reports_both_engines(server):
    st = server.get("/mirror").json()
    assert st["peer"] == ("cuda:0" if ON_CUDA else "cpu") and st["transport"] == server.transport
    assert st["primary"]["pid"] != st["standby"]["pid"]
    assert st["standby"]["num_blocks"] == NUM_BLOCKS
    # Operators tell the engines apart by process title.
    with open(f"/proc/{st['standby']['pid']}/cmdline", "rb") as f:
        assert f.read().startswith(b"VLLM_STANDBY::EngineCore")
    with open(f"/proc/{st['primary']['pid']}/cmdline", "rb") as f:
        assert f.read().startswith(b"VLLM::EngineCore")
    # /health carries the mirror's state; without --mirror-required it never fails on it.
    health = server.get("/health")
    assert health.status_code == 200
    assert health.json()["mirror"] == {"state": st["state"], "protected": True,
                                       "required": False, "last_error": None}


def test_mixed_workload_is_mirrored_byte_identical(server):
    shared = text(1, 150)  # a shared prefix of several blocks
    prompts = [(shared + " " + text(s, 40), 64) for s in range(4)]  # prefix sharing
    prompts += [(text(s, 300), 96) for s in range(10, 14)]  # long: preemption with 96 blocks
    prompts += [(text(s, 3), 40) for s in range(20, 24)]  # short, tail only
    preempted_before = metric(server, "vllm:num_preemptions_total")
    results: list[dict] = [None] * len(prompts)
    streamed: list[int] = []

    def run(i):
        results[i] = complete(server, *prompts[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    threads += [threading.Thread(target=stream, args=(server, text(30 + s, 80), 64, streamed))
                for s in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert all(results) and streamed == [64, 64]
    assert metric(server, "vllm:num_preemptions_total") > preempted_before, \
        "the workload was meant to preempt"

    verify, hits = assert_standby_holds_everything(server, [r["tokens"] for r in results])
    # Which sequences survive eviction in 96 blocks depends on timing; those that do are
    # served by the standby as by the primary (asserted above), and some always do.
    assert any(hits["standby"]), hits
    st = server.get("/mirror").json()
    assert st["blocks_mirrored"] >= verify["checked"] and st["blocks_failed"] == 0
    assert metric(server, "vllm:mirror_blocks_total") == st["blocks_mirrored"]
    assert metric(server, "vllm:mirror_bytes_total") == st["bytes_mirrored"] > 0
    assert metric(server, "vllm:mirror_transfer_seconds_count") > 0
    # The worker's CPU time on WRITEs: reported, and a small part of the run's time.
    assert st["push_seconds"] > 0
    assert metric(server, "vllm:mirror_push_seconds_total") == pytest.approx(st["push_seconds"])
    assert metric(server, "vllm:mirror_standby_up") == 1


def test_pause_stops_mirroring_and_resume_catches_up_on_the_same_standby(server):
    before = wait_mirror(server)
    r = server.post("/mirror/pause", {})
    assert r.status_code == 200, r.text
    paused = r.json()
    assert paused["state"] == "paused" and paused["protected"] is False and paused["paused"]
    assert server.post("/mirror/pause", {}).json()["state"] == "paused"  # idempotent
    assert metric(server, "vllm:mirror_paused") == 1
    assert metric(server, "vllm:mirror_standby_up") == 0
    assert server.get("/health").json()["mirror"]["state"] == "paused"
    # Serving goes on; nothing is copied meanwhile.
    during = complete(server, text(45, 120), 24)
    st = server.get("/mirror", params={"refresh": "true"}).json()
    assert st["state"] == "paused" and st["blocks_mirrored"] == before["blocks_mirrored"]

    r = server.post("/mirror/resume", {})
    assert r.status_code == 200, r.text
    assert r.json()["state"] in ("syncing", "in_sync") and not r.json()["paused"]
    after = wait_mirror(server)
    # The same standby, reset and caught up (what it held was not trusted).
    assert after["standby"]["pid"] == before["standby"]["pid"]
    assert after["standby_restarts"] == before["standby_restarts"]
    assert after["blocks_mirrored"] > before["blocks_mirrored"]
    assert metric(server, "vllm:mirror_paused") == 0
    assert_standby_holds_everything(server, [during["tokens"]])


def test_standby_death_leaves_primary_serving_and_restarted_standby_catches_up(server):
    before = server.get("/mirror").json()
    streamed: list[int] = []
    t = threading.Thread(target=stream, args=(server, text(40, 120), 200, streamed))
    t.start()
    time.sleep(0.5)
    os.kill(before["standby"]["pid"], signal.SIGKILL)
    down = wait_mirror(server, "down", timeout=30, settled=False)
    assert "exited" in down["last_error"]
    # The primary keeps serving while unprotected.
    fresh = complete(server, text(50, 200), 32)
    t.join(300)
    assert streamed == [200]

    after = wait_mirror(server)  # a new standby, caught up from the prefix cache
    assert after["standby"]["pid"] != before["standby"]["pid"]
    assert after["standby_restarts"] == before["standby_restarts"] + 1
    verify, _ = assert_standby_holds_everything(server, [fresh["tokens"]])
    assert verify["checked"] > 0


def test_bad_peer_is_a_startup_error_naming_the_flag(tiny_model):
    import subprocess

    bad = "cuda:7" if ON_CUDA else "cuda:0"
    out = subprocess.run([*vllm_cli(), "serve", str(tiny_model), "--mirror-peer", bad,
                          "--max-model-len", "256"], capture_output=True, text=True,
                         env=child_env(), timeout=300)
    assert out.returncode != 0
    assert f"--mirror-peer {bad}: no such device" in out.stderr + out.stdout
    assert "(EngineCore" not in out.stderr + out.stdout  # refused before any engine started


def test_mirror_runs_beside_a_user_kv_connector(tiny_model, tmp_path):
    """The user's own connector (upstream's ExampleConnector: KV saved to and loaded
    from disk) keeps working on the primary, and blocks it loads are mirrored like
    computed ones."""
    store = tmp_path / "kv-store"
    connector = json.dumps({"kv_connector": "ExampleConnector", "kv_role": "kv_both",
                            "kv_connector_extra_config": {"shared_storage_path": str(store)}})
    env = child_env(VLLM_SERVER_DEV_MODE="1")
    with RemoteServer(str(tiny_model), ARGS + ["--kv-transfer-config", connector],
                      tmp_path / "serve.log", env=env) as server:
        wait_mirror(server)
        prompt = text(70, 90)
        first = complete(server, prompt, 8)
        assert any(store.iterdir()), "the connector saved nothing"
        # Empty both prefix caches: the next run's prefix comes from the connector.
        # (Upstream refuses the reset while blocks are in use, mirror copies in flight
        # included: settle, reset, check.)
        deadline = time.monotonic() + 60
        while True:
            wait_mirror(server)
            assert server.post("/reset_prefix_cache", {}).status_code == 200
            if not any(server.post("/mirror/lookup",
                                   {"prompts": [first["tokens"]]}).json()["primary"]):
                break
            assert time.monotonic() < deadline, "the prefix cache was never reset"
        hits_before = metric(server, "vllm:external_prefix_cache_hits_total")
        again = complete(server, prompt, 8)
        assert again["tokens"] == first["tokens"]
        assert metric(server, "vllm:external_prefix_cache_hits_total") > hits_before
        assert_standby_holds_everything(server, [again["tokens"]])


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(scope="module")
def required_server(tiny_model, tmp_path_factory):
    log = tmp_path_factory.mktemp("mirror-required") / "serve.log"
    env = child_env(VLLM_SERVER_DEV_MODE="1")
    with RemoteServer(str(tiny_model), ARGS + ["--mirror-required"], log, env=env) as s:
        wait_mirror(s)
        yield s


def test_mirror_required_refuses_generation_while_unprotected(required_server):
    server = required_server
    health = server.get("/health")
    assert health.status_code == 200 and health.json()["mirror"]["protected"] is True
    assert complete(server, text(60, 20), 4)
    before = server.get("/mirror").json()
    os.kill(before["standby"]["pid"], signal.SIGKILL)
    wait_mirror(server, "down", timeout=30, settled=False)
    # Unprotected: a load balancer sees 503 and generation is refused, naming the flag;
    # the rest of the API stays up.
    health = server.get("/health")
    assert health.status_code == 503, health.text
    assert health.json()["status"] == "unprotected"
    assert server.get("/ping").status_code == 503  # SageMaker's probe, likewise
    r = server.post("/v1/completions", {"model": "tiny", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 503 and "--mirror-required" in r.json()["error"]["message"]
    assert r.headers["Retry-After"] == "5"
    assert server.get("/v1/models").status_code == 200
    assert metric(server, "vllm:mirror_requests_refused_total") >= 1
    # Pausing would refuse everything: not allowed with --mirror-required.
    r = server.post("/mirror/pause", {})
    assert r.status_code == 409 and "--mirror-required" in r.json()["error"]
    wait_mirror(server)  # protected again once the replacement is connected
    assert server.get("/health").status_code == 200
    assert complete(server, text(61, 20), 4)


def test_a_stuck_standby_is_replaced_while_the_primary_serves(required_server):
    """Alive but not answering (SIGSTOP): lost within the status timeout, then replaced."""
    server = required_server
    before = wait_mirror(server)
    stuck = before["standby"]["pid"]
    os.kill(stuck, signal.SIGSTOP)
    try:
        down = wait_mirror(server, "down", timeout=40, settled=False)
        assert "did not answer" in down["last_error"], down
        after = wait_mirror(server, timeout=300)
    finally:
        if _running(stuck):
            os.kill(stuck, signal.SIGKILL)
    assert after["standby"]["pid"] != stuck and not _running(stuck)
    assert complete(server, text(62, 20), 4)


def test_sigterm_to_the_api_server_stops_both_engines(required_server):
    """What Kubernetes does: SIGTERM to the API server only. Upstream's shutdown may run
    twice, beside the supervisor's own; the standby and the primary must both exit."""
    server = required_server
    st = wait_mirror(server)
    pids = {"api server": server.proc.pid, "primary": st["primary"]["pid"],
            "standby": st["standby"]["pid"]}
    # Every other process the server started too (the failover's exit watcher, ...).
    pids.update({f"{p.name()} {p.pid}": p.pid
                 for p in psutil.Process(server.proc.pid).children(recursive=True)
                 if p.pid not in pids.values()})
    os.kill(server.proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(map(_running, pids.values())):
        time.sleep(0.5)
    left = {name: pid for name, pid in pids.items() if _running(pid)}
    assert not left, f"still running 60 s after SIGTERM: {left}\n{server.tail()}"
    # The engines exiting on shutdown are not a death to fail over from.
    log = server.log_path.read_text(errors="replace")
    assert "failing over to the standby" not in log and "is exiting" not in log
