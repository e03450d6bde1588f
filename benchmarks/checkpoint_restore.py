#!/usr/bin/env python3
"""Fast restart: time to release the GPU and time from restore to the first token,
for ``POST /checkpoint`` / ``POST /restore`` (KV kept and dropped) and, in the same
run on the same server, the baselines: upstream sleep/wake, upstream sleep + driver
checkpoint of the sleeping engine, driver checkpoint of the awake engine, and the
server's cold start.

    python benchmarks/checkpoint_restore.py MODEL --serve-args "--load-format dummy ..."

Each mode: release (call → GPU free), the engine's GPU memory while released (NVML),
restore → first token of a request queued while released (its prompt was served
before, so a kept prefix cache shows as cached tokens), whether the greedy output
equals the reference, host memory the engine process holds while released, and for
/checkpoint the sizes, codec and compression ratio, the residual the driver copied
(the engine's GPU memory once the sleep-mode pool is released) and the reload's GB/s.
``--variants ha upstream-graph-pool`` runs the modes on a second server whose CUDA graphs
keep upstream's pool (and which pins at its first checkpoint): the residual's and the
first checkpoint's baseline. Writes JSON to --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import sys
import threading
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mirror_serve import Server, prompt  # noqa: E402

MODES = ("checkpoint-keep-kv", "checkpoint-keep-kv-warm", "checkpoint-drop-kv",
         "sleep", "sleep+driver", "driver-awake")


# Server variants: (extra environment, extra serve flags, what it is).
VARIANTS = {
    "ha": ({}, ["--checkpoint-prepin"],
           "this distribution: CUDA graphs in the sleep-mode pool, --checkpoint-prepin"),
    "upstream-graph-pool": ({"VLLM_HA_SLEEP_GRAPH_POOL": "0"}, [],
                            "upstream's CUDA graph pool, no prepin"),
    # A restore pays a fixed cost per chunk.
    "chunk-512": ({"VLLM_HA_CHECKPOINT_CHUNK_MIB": "512"}, ["--checkpoint-prepin"],
                  "ha with the image in 512 MiB chunks"),
    "prepin-13": ({}, ["--checkpoint-prepin", "13"],
                  "ha pinning 13 GiB at start: ~8B's compressed weights and KV kept"),
    "prepin-12": ({}, ["--checkpoint-prepin", "12"],
                  "ha pinning 12 GiB at start: what the ~8B image (1,845 blocks) packs into"),
    "ahead-1": ({"VLLM_HA_CHECKPOINT_UPLOAD_AHEAD": "1"}, ["--checkpoint-prepin"],
                "ha uploading one chunk ahead of the decode (the tenth session's pipeline)"),
}


class FirstToken(threading.Thread):
    """A streamed greedy request; when its first token arrived and all its tokens."""

    def __init__(self, url: str, text: str, max_tokens: int) -> None:
        super().__init__(daemon=True)
        self.url, self.text, self.max_tokens = url, text, max_tokens
        self.first: float | None = None
        self.tokens: list[int] = []
        self.cached: int | None = None
        self.error: str | None = None

    def run(self) -> None:
        body = {"model": "m", "prompt": self.text, "max_tokens": self.max_tokens,
                "temperature": 0, "ignore_eos": True, "stream": True,
                "return_token_ids": True, "stream_options": {"include_usage": True}}
        try:
            with requests.post(self.url + "/v1/completions", json=body, stream=True,
                               timeout=900) as r:
                r.raise_for_status()
                for line in r.iter_lines(decode_unicode=True):
                    if not line.startswith("data: {"):
                        continue
                    event = json.loads(line[6:])
                    if event.get("usage"):
                        details = event["usage"].get("prompt_tokens_details") or {}
                        self.cached = details.get("cached_tokens") or 0
                    for c in event.get("choices") or []:
                        ids = c.get("token_ids") or []
                        if ids and self.first is None:
                            self.first = time.monotonic()
                        self.tokens += ids
        except Exception as e:
            self.error = f"{type(e).__name__}: {e}"


def engine_pids(server: Server) -> list[int]:
    import psutil
    procs = psutil.Process(server.proc.pid).children(recursive=True)
    return [p.pid for p in procs if "EngineCore" in " ".join(p.cmdline()) + p.name()]


def gpu_mib(pids: list[int]) -> int | None:
    from vllm.v1.checkpoint.driver import gpu_memory_mib
    return gpu_memory_mib(pids)


def device_mib() -> int | None:
    from vllm.v1.checkpoint.driver import device_used_mib
    return device_used_mib()


def rss_gib(pids: list[int]) -> float:
    import psutil
    return round(sum(psutil.Process(p).memory_info().rss for p in pids) / 2**30, 3)


def thp_gib(pids: list[int]) -> float | None:
    """The engine processes' anonymous memory in transparent huge pages, all of it
    (the checkpoint arena asks for them: the driver restores a huge-page registration
    faster; with THP "always" other memory counts too)."""
    total = 0
    try:
        for p in pids:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("AnonHugePages:"):
                        total += int(line.split()[1]) << 10
    except OSError:
        return None
    return round(total / 2**30, 3)


def post(url: str, path: str, body: dict | None = None) -> dict:
    r = requests.post(url + path, json=body, timeout=900)
    if r.status_code != 200:
        raise RuntimeError(f"{path}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json() if r.text.strip().startswith("{") else {}


def run_mode(mode: str, server: Server, a: argparse.Namespace, ref: list[int],
             text: str) -> dict:
    from vllm.v1.checkpoint.driver import DriverCheckpoint

    url, pids = server.url, engine_pids(server)
    driver = DriverCheckpoint() if mode in ("sleep+driver", "driver-awake") else None
    out: dict = {"mode": mode}
    rss_before = rss_gib(pids)
    t0 = time.monotonic()
    if mode.startswith("checkpoint"):
        st = post(url, "/checkpoint", {"keep_kv": "drop" not in mode})
        out.update(codec=st["codec"], ratio=st["ratio"], sizes=st["sizes"],
                   server_phases_s=st["phases_s"], residual=st.get("residual"),
                   host_pinned_mib=st.get("host_pinned_mib"))
    elif mode.startswith("sleep"):
        post(url, "/sleep?level=1")
        if driver:
            for pid in pids:
                driver.checkpoint(pid)
    elif mode == "driver-awake":
        for pid in pids:
            driver.checkpoint(pid)
    out["release_s"] = round(time.monotonic() - t0, 3)
    out["gpu_mib_released"] = gpu_mib(pids)
    out["device_used_mib_released"] = device_mib()
    out["host_rss_gib_released"] = rss_gib(pids)
    out["host_thp_gib_released"] = thp_gib(pids)
    out["host_rss_gib_serving"] = rss_before
    # The request waits while released: the measured figure is restore → its first token.
    req = FirstToken(url, text, len(ref))
    req.start()
    time.sleep(1.0)
    t0 = time.monotonic()
    if mode.startswith("checkpoint"):
        st = post(url, "/restore")
        out["server_restore_phases_s"] = {k: v for k, v in st["phases_s"].items()
                                          if k in ("driver_restore", "reload", "resume",
                                                   "restore_total")}
        out["reload_gbps"] = st.get("reload_gbps")
        out["worker_phases_s"] = st.get("worker_phases_s")
    else:
        if driver:
            for pid in pids:
                driver.restore(pid)
        if mode.startswith("sleep"):
            post(url, "/wake_up")
    out["restore_call_s"] = round(time.monotonic() - t0, 3)
    req.join(600)
    if req.error or req.first is None:
        out["error"] = req.error or "no token"
        return out
    out["restore_to_first_token_s"] = round(req.first - t0, 3)
    out["cached_tokens"] = req.cached
    out["output_equal"] = req.tokens == ref
    out["gpu_mib_serving"] = gpu_mib(pids)
    return out


def run_variant(variant: str, args: list[str], a: argparse.Namespace) -> dict:
    extra_env, extra_args, _ = VARIANTS[variant]
    env = {**os.environ, "VLLM_SERVER_DEV_MODE": "1", "VLLM_NO_USAGE_STATS": "1",
           **extra_env}
    server = Server(a.model, [*args, *extra_args],
                    os.path.join(a.log_dir, f"checkpoint-serve-{variant}.log"), env,
                    a.timeout)
    out: dict = {"env": extra_env, "args": extra_args,
                 "cold_start_s": round(server.startup_s, 1), "modes": []}
    print(f"[{variant}] cold start (process start -> /health): {server.startup_s:.1f} s",
          flush=True)
    try:
        texts = [prompt(i, a.prompt_words) for i in range(a.prompts)]
        probe = texts[0]
        r = requests.post(server.url + "/v1/completions", json={
            "model": "m", "prompt": probe, "max_tokens": a.output_len, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}, timeout=600)
        r.raise_for_status()
        ref = r.json()["choices"][0]["token_ids"]
        out["gpu_mib_awake"] = gpu_mib(engine_pids(server))
        out["device_used_mib_awake"] = device_mib()
        for mode in a.modes:
            for t in texts:  # the prefix cache holds every prompt before each mode
                requests.post(server.url + "/v1/completions", json={
                    "model": "m", "prompt": t, "max_tokens": 1}, timeout=600)
            try:
                row = run_mode(mode, server, a, ref, probe)
            except Exception as e:
                row = {"mode": mode, "error": f"{type(e).__name__}: {e}"}
            print(f"[{variant}]", json.dumps(row), flush=True)
            out["modes"].append(row)
    finally:
        server.close()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--serve-args", default="")
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--prompts", type=int, default=32, help="prompts cached before each mode")
    p.add_argument("--prompt-words", type=int, default=800)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--variants", nargs="+", default=["ha"], choices=list(VARIANTS),
                   help="servers to run the modes on, one after the other: " + "; ".join(
                       f"{name} ({v[2]})" for name, v in VARIANTS.items()))
    p.add_argument("--log-dir", default=".")
    p.add_argument("--out", default="checkpoint_restore.json")
    a = p.parse_args()

    args = [*shlex.split(a.serve_args), "--enable-sleep-mode", "--enable-prefix-caching",
            "--enable-prompt-tokens-details"]
    result: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "host": platform.node(), "model": a.model, "serve_args": args,
                    "variants": {}}
    for variant in a.variants:
        result["variants"][variant] = run_variant(variant, args, a)
    first = result["variants"][a.variants[0]]
    result.update(cold_start_s=first["cold_start_s"], modes=first["modes"])
    rows = {r["mode"]: r for r in result["modes"]}
    best = rows.get("checkpoint-keep-kv-warm") or rows.get("checkpoint-keep-kv") or {}
    base = rows.get("sleep+driver") or {}
    if best.get("restore_to_first_token_s") and base.get("restore_to_first_token_s"):
        result["ratio_first_token_vs_sleep_driver"] = round(
            base["restore_to_first_token_s"] / best["restore_to_first_token_s"], 2)
    if best.get("restore_to_first_token_s"):
        result["ratio_first_token_vs_cold_start"] = round(
            result["cold_start_s"] / best["restore_to_first_token_s"], 1)
    print(f"{'variant':<20}{'mode':<26}{'release s':>10}{'residual MiB':>13}"
          f"{'driver restore s':>17}{'reload s':>9}{'reload GB/s':>12}"
          f"{'restore->1st tok s':>20}{'cached':>8}{'equal':>7}{'host GiB':>10}")
    for variant, v in result["variants"].items():
        for r in v["modes"]:
            phases = r.get("server_restore_phases_s") or {}
            print(f"{variant:<20}{r['mode']:<26}{r.get('release_s', '-')!s:>10}"
                  f"{(r.get('residual') or {}).get('gpu_mib', '-')!s:>13}"
                  f"{phases.get('driver_restore', '-')!s:>17}"
                  f"{phases.get('reload', '-')!s:>9}{r.get('reload_gbps', '-')!s:>12}"
                  f"{r.get('restore_to_first_token_s', r.get('error', '-'))!s:>20}"
                  f"{r.get('cached_tokens', '-')!s:>8}{r.get('output_equal', '-')!s:>7}"
                  f"{r.get('host_rss_gib_released', '-')!s:>10}")
    for k in ("ratio_first_token_vs_sleep_driver", "ratio_first_token_vs_cold_start"):
        if k in result:
            print(f"{k}: {result[k]}")
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
