#!/usr/bin/env python3
"""Failover time and recomputation: the primary engine killed (SIGKILL) under N
streaming requests, with the mirrored KV on the promoted standby and, as the
baseline in the same run, the same standby without it (its prefix cache dropped at
promotion: every resumed request is prefilled again).

    python benchmarks/failover_serve.py MODEL --peer cuda:0 --serve-args "--load-format dummy ..."
    python benchmarks/failover_serve.py MODEL --peer cpu --streams 1 4 8

For each N: the time from the kill to each stream's next token (p50/p99 over the
streams), the server's own failover time (death seen -> requests resubmitted), and
the tokens the new engine recomputed (total and per request), mirrored vs baseline,
and their ratio. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import signal
import sys
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mirror_serve import Server, prompt  # noqa: E402


class Stream(threading.Thread):
    def __init__(self, url: str, text: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.text, self.max_tokens = url, text, max_tokens
        self.times: list[float] = []  # arrival of each chunk with tokens
        self.tokens = 0
        self.error: str | None = None

    def run(self) -> None:
        body = {"model": "m", "prompt": self.text, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True, "return_token_ids": True}
        try:
            with requests.post(self.url + "/v1/completions", json=body, stream=True,
                               timeout=900) as r:
                r.raise_for_status()
                for line in r.iter_lines(decode_unicode=True):
                    if line.startswith("data: {"):
                        event = json.loads(line[6:])
                        if "error" in event:
                            self.error = json.dumps(event["error"])
                            return
                        # Token ids, not text: dummy weights emit undecodable tokens.
                        n = len(event["choices"][0].get("token_ids") or [])
                        if n:
                            self.times.append(time.monotonic())
                            self.tokens += n
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def failover_once(server: Server, n: int, a: argparse.Namespace, seed: int) -> dict:
    server.wait_mirror(a.timeout)
    st = requests.get(server.url + "/mirror", timeout=30).json()
    pid, failovers = st["primary"]["pid"], st["failovers"]
    # A distinct first block per stream: prompt() has 16 variants, so 64 streams would
    # share prefixes and the baseline's re-prefill would hit its own fresh cache.
    streams = [Stream(server.url, f"request {seed + i}: " + prompt(seed + i, a.prompt_words),
                      a.output_len) for i in range(n)]
    # All N in flight at the kill: the engine is held until the server has admitted
    # every stream (a busy API server admits them over seconds), then resumed.
    requests.post(server.url + "/pause?mode=keep&clear_cache=false", timeout=60).raise_for_status()
    for s in streams:
        s.start()
    deadline = time.monotonic() + a.timeout
    while requests.get(server.url + "/mirror", timeout=30).json()["requests_in_flight"] < n:
        if time.monotonic() > deadline:
            raise TimeoutError("the server did not admit every stream")
        time.sleep(0.02)
    requests.post(server.url + "/resume", timeout=60).raise_for_status()
    while max(s.tokens for s in streams) < a.kill_after or min(s.tokens for s in streams) < 1:
        if time.monotonic() > deadline or not any(s.is_alive() for s in streams):
            raise TimeoutError("streams did not reach --kill-after tokens: "
                               f"{sorted(s.tokens for s in streams)} {[s.error for s in streams][:2]}")
        time.sleep(0.002)
    t_kill = time.monotonic()
    wall_offset = time.time() - t_kill
    os.kill(pid, signal.SIGKILL)
    for s in streams:
        s.join(a.timeout)
    errors = [s.error for s in streams if s.error]
    for _ in range(100):
        st = requests.get(server.url + "/mirror", timeout=30).json()
        if st["failovers"] > failovers:
            break
        time.sleep(0.1)
    last = st["last_failover"] or {}

    def after(t0: float) -> list[float]:
        return [next(t for t in s.times if t > t0) - t_kill for s in streams
                if any(t > t0 for t in s.times)]

    # Chunks the dead primary produced still reach the client after the kill (the API
    # server streams what it had): the next token is the first chunk after the switch
    # (death seen + resubmitted, the server's clock), i.e. from the promoted engine.
    switched = (last["at"] + last["seconds"] - wall_offset if last.get("at") is not None
                else t_kill)
    gaps, raw = after(max(t_kill, switched)), after(t_kill)
    return {
        "streams": n, "errors": errors[:3], "num_errors": len(errors),
        "next_token_s_p50": round(pct(gaps, 0.5), 4) if gaps else None,
        "next_token_s_p99": round(pct(gaps, 0.99), 4) if gaps else None,
        "next_token_s_all": sorted(round(g, 4) for g in gaps),
        "first_chunk_after_kill_s_p50": round(pct(raw, 0.5), 4) if raw else None,
        "first_chunk_after_kill_s_p99": round(pct(raw, 0.99), 4) if raw else None,
        # kill -> the API server sees the death (its clock); the switch follows.
        "death_seen_s": (round(last["at"] - wall_offset - t_kill, 4)
                         if last.get("at") is not None else None),
        "server_failover_s": last.get("seconds"),
        "requests_resumed": last.get("requests_resumed"),
        "recomputed_tokens": last.get("recomputed_tokens"),
        "recomputed_tokens_max": last.get("recomputed_tokens_max"),
        "resumed_tokens": last.get("resumed_tokens"),
    }


def run(label: str, a: argparse.Namespace, env: dict[str, str]) -> dict:
    args = [*shlex.split(a.serve_args), "--mirror-peer", a.peer, *shlex.split(a.mirror_args)]
    server = Server(a.model, args, os.path.join(a.log_dir, f"failover-{label}.log"), env,
                    a.timeout)
    try:
        requests.post(server.url + "/v1/completions", json={
            "model": "m", "prompt": prompt(0, 16), "max_tokens": 4}, timeout=600)
        res = {"startup_s": round(server.startup_s, 1), "runs": []}
        for k, n in enumerate(a.streams):
            r = failover_once(server, n, a, 1000 * (k + 1))
            print(f"{label:9s} streams={n:3d} next token p50/p99 {r['next_token_s_p50']}/"
                  f"{r['next_token_s_p99']} s, death seen {r['death_seen_s']} s, "
                  f"server {r['server_failover_s']} s, "
                  f"recomputed {r['recomputed_tokens']} (max {r['recomputed_tokens_max']}) "
                  f"of {r['resumed_tokens']} tokens, errors {r['num_errors']}", flush=True)
            res["runs"].append(r)
        return res
    finally:
        server.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--peer", default="cpu")
    ap.add_argument("--serve-args", default="", help="extra `vllm serve` args for both runs")
    ap.add_argument("--mirror-args", default="", help="extra --mirror-* args")
    ap.add_argument("--streams", type=int, nargs="+", default=[1, 16, 64])
    ap.add_argument("--prompt-words", type=int, default=200)
    ap.add_argument("--output-len", type=int, default=256)
    ap.add_argument("--kill-after", type=int, default=32,
                    help="kill once every stream is in flight and one has this many tokens")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--modes", nargs="+", default=["mirrored", "baseline"],
                    choices=["mirrored", "baseline", "sentinel"],
                    help="sentinel: mirrored, the death seen by upstream's process "
                         "sentinel only (VLLM_HA_ENGINE_EXIT_POLL_MS=0) instead of the "
                         "exit watch; run one mode per call where a call's time is limited")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1"}
    result = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": platform.node(), "python": platform.python_version(),
        "command": " ".join(shlex.quote(x) for x in sys.argv),
    }
    modes = {"mirrored": env, "baseline": {**env, "VLLM_HA_FAILOVER_DISCARD_KV": "1"},
             "sentinel": {**env, "VLLM_HA_ENGINE_EXIT_POLL_MS": "0"}}
    for mode in a.modes:
        result[mode] = run(mode, a, modes[mode])
        if a.out:  # kept if a later mode does not finish
            with open(a.out + ".partial", "w") as f:
                json.dump(result, f, indent=1)
    if {"mirrored", "sentinel"} <= result.keys():
        print("\nstreams | death seen exit watch / sentinel | next token p99 exit watch / "
              "sentinel")
        for m, b in zip(result["mirrored"]["runs"], result["sentinel"]["runs"]):
            print(f"{m['streams']:7d} | {m['death_seen_s']} / {b['death_seen_s']} s | "
                  f"{m['next_token_s_p99']} / {b['next_token_s_p99']} s")
    if not {"mirrored", "baseline"} <= result.keys():  # no ratio
        if a.out:
            with open(a.out, "w") as f:
                json.dump(result, f, indent=1)
        return
    print("\nstreams | next token p99 mirrored / baseline | recomputed mirrored / baseline "
          "| less recomputation")
    for m, b in zip(result["mirrored"]["runs"], result["baseline"]["runs"]):
        ratio = (b["recomputed_tokens"] / m["recomputed_tokens"]
                 if m["recomputed_tokens"] else float("inf"))
        print(f"{m['streams']:7d} | {m['next_token_s_p99']} / {b['next_token_s_p99']} s | "
              f"{m['recomputed_tokens']} / {b['recomputed_tokens']} | {ratio:.1f}x")
        m["recompute_reduction"] = ratio if ratio != float("inf") else None
    if a.out:
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
