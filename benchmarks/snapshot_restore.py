#!/usr/bin/env python3
"""Disaster recovery: a server killed with -9 comes back from its snapshot on disk
(``vllm serve --restore-from``), against the same server started again without one,
in the same run.

    python benchmarks/snapshot_restore.py MODEL --serve-args "--load-format dummy ..."

1. cold: a server starts (fresh compile cache), caches --prompts prompts, writes the
   snapshot (``POST /snapshot``: seconds, engine pause, bytes raw and stored, write
   GB/s), the same snapshot under another name written inside the pause
   (``"background": false``, the baseline of the pause), then a second snapshot (what a
   periodic one costs: weights linked) and is killed (-9).
2. restore: ``vllm serve --restore-from ROOT/NAME`` (no MODEL; an empty compile cache
   root, as on a new node; page cache dropped first where allowed): process start →
   healthy → first token of a prompt served before the kill (cached tokens show the
   prefix cache came back), output compared.
3. restart: the same command as 1 with the compile cache 1 left (what a restart
   without a snapshot costs), process start → first token of the same prompt.
4. spare: a server with the same flags and random weights, started beforehand (not
   timed), takes the snapshot with ``POST /snapshot/load``: call → first token of the
   same prompt, with the snapshot in the page cache, again with the weights kept, and
   from disk with the page cache dropped.

Ratios: restart / restore, cold / restore and cold / spare (time to first token), and the first
snapshot's engine pause inside / outside the write. Writes --out.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import requests

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from mirror_serve import prompt  # noqa: E402


class Serve:
    """`vllm serve`, timed from process start; ``first_token`` of one request."""

    def __init__(self, args: list[str], log: str, env: dict[str, str]) -> None:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.t0 = time.monotonic()
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", *args,
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def wait_healthy(self, timeout: float) -> float:
        while time.monotonic() - self.t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {self.log}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    return time.monotonic() - self.t0
            except requests.RequestException:
                pass
            time.sleep(0.05)
        raise TimeoutError(f"not healthy in {timeout} s; see {self.log}")

    def complete(self, text: str, max_tokens: int) -> dict:
        r = requests.post(self.url + "/v1/completions", json={
            "model": "m", "prompt": text, "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "return_token_ids": True}, timeout=600)
        r.raise_for_status()
        return r.json()

    def kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


def cached(out: dict) -> int:
    return ((out.get("usage") or {}).get("prompt_tokens_details") or {}).get(
        "cached_tokens") or 0


def drop_page_cache() -> bool:
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--serve-args", default="")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--prompt-words", type=int, default=800)
    p.add_argument("--output-len", type=int, default=16)
    p.add_argument("--timeout", type=float, default=900)
    p.add_argument("--root", default=None, help="snapshot root (default: a temp dir)")
    p.add_argument("--log-dir", default=".")
    p.add_argument("--out", default="snapshot_restore.json")
    p.add_argument("--no-restart", dest="restart", action="store_false",
                   help="skip 2. and 3. (--restore-from and the restart)")
    p.add_argument("--no-spare", dest="spare", action="store_false",
                   help="skip 4. (the warm spare's POST /snapshot/load)")
    a = p.parse_args()

    root = a.root or tempfile.mkdtemp(prefix="ha-snapshots-")
    cache = tempfile.mkdtemp(prefix="ha-vllm-cache-")
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "VLLM_CACHE_ROOT": cache}
    base = [*shlex.split(a.serve_args), "--served-model-name", "m",
            "--enable-prefix-caching", "--enable-prompt-tokens-details"]
    texts = [prompt(i, a.prompt_words) for i in range(a.prompts)]
    result: dict = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    "host": platform.node(), "model": a.model, "serve_args": base}

    # 1. cold start, snapshot, kill -9
    cold = Serve([a.model, *base, "--snapshot-root", root], f"{a.log_dir}/snap-cold.log", env)
    try:
        result["cold_healthy_s"] = round(cold.wait_healthy(a.timeout), 2)
        out = cold.complete(texts[0], a.output_len)
        result["cold_first_token_s"] = round(time.monotonic() - cold.t0, 2)
        ref = out["choices"][0]["token_ids"]
        for t in texts[1:]:
            cold.complete(t, 1)
        for key, name, background in (("first", "bench", True),
                                       ("first_inline", "bench-inline", False),
                                       ("second", "bench", True)):
            t = time.monotonic()
            r = requests.post(cold.url + "/snapshot", timeout=900,
                              json={"name": name, "background": background})
            r.raise_for_status()
            snap = r.json()
            snap["wall_s"] = round(time.monotonic() - t, 2)
            snap["write_gb_s"] = round(snap["bytes_written"] / snap["seconds"] / 1e9, 2)
            result[f"snapshot_{key}"] = snap
            print(f"snapshot ({key}): {json.dumps(snap)}", flush=True)
    finally:
        cold.kill()
    first, inline = result["snapshot_first"], result["snapshot_first_inline"]
    result["pause_ratio_inline_vs_background"] = round(
        inline["engine_pause_seconds"] / max(first["engine_pause_seconds"], 1e-6), 2)
    manifest = json.load(open(os.path.join(snap["path"], "manifest.json")))
    weights_idx = json.load(open(os.path.join(snap["path"], "weights", "rank0.json")))
    raw = sum(c["nbytes"] for t in weights_idx["tensors"] for c in t["chunks"])
    stored = sum(e["size"] for k, e in manifest["files"].items()
                 if k.startswith("weights/") and k.endswith(".bin"))
    result["weights_raw_bytes"], result["weights_stored_bytes"] = raw, stored
    result["weights_ratio"] = round(raw / max(stored, 1), 3)

    node = tempfile.mkdtemp(prefix="ha-vllm-cache-new-node-")
    if a.restart:
        restore_and_restart(a, result, base, root, env, node, texts[0], ref)
    # 4. a warm spare (started beforehand: not on the clock) loads the snapshot
    if a.spare:
        spare_loads(a, result, base, root, env, texts[0], ref)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(node, ignore_errors=True)
    if not a.root:
        shutil.rmtree(root, ignore_errors=True)
    report(result, raw, stored, first, inline)
    with open(a.out, "w") as f:
        json.dump(result, f, indent=2)


def restore_and_restart(a, result: dict, base: list[str], root: str, env: dict, node: str,
                        text: str, ref: list[int]) -> None:
    texts = [text]
    # 2. restore from the snapshot (no model given)
    result["page_cache_dropped"] = drop_page_cache()
    restored = Serve(["--restore-from", os.path.join(root, "bench")],
                     f"{a.log_dir}/snap-restore.log", {**env, "VLLM_CACHE_ROOT": node})
    try:
        result["restore_healthy_s"] = round(restored.wait_healthy(a.timeout), 2)
        out = restored.complete(texts[0], a.output_len)
        result["restore_first_token_s"] = round(time.monotonic() - restored.t0, 2)
        result["restore_cached_tokens"] = cached(out)
        result["restore_output_equal"] = out["choices"][0]["token_ids"] == ref
    finally:
        restored.kill()
    for line in open(f"{a.log_dir}/snap-restore.log"):
        if any(m in line for m in ("of weights loaded from", "verified in",
                                   "restored into the prefix cache", "compile cache",
                                   "load AOT", "load failure", "saved AOT",
                                   "startup plan")):
            result.setdefault("restore_log", []).append(line.strip()[-160:])

    # 3. restart without a snapshot (compile cache warm)
    drop_page_cache()
    restart = Serve([a.model, *base], f"{a.log_dir}/snap-restart.log", env)
    try:
        result["restart_healthy_s"] = round(restart.wait_healthy(a.timeout), 2)
        out = restart.complete(texts[0], a.output_len)
        result["restart_first_token_s"] = round(time.monotonic() - restart.t0, 2)
        result["restart_cached_tokens"] = cached(out)
    finally:
        restart.kill()


def report(r: dict, raw: int, stored: int, first: dict, inline: dict) -> None:
    print(f"{'':<10}{'healthy s':>10}{'1st token s':>12}{'cached':>8}")
    print(f"{'cold':<10}{r['cold_healthy_s']:>10}{r['cold_first_token_s']:>12}{'-':>8}")
    if "restore_first_token_s" in r:
        r["ratio_restart_vs_restore"] = round(
            r["restart_first_token_s"] / r["restore_first_token_s"], 2)
        r["ratio_cold_vs_restore"] = round(
            r["cold_first_token_s"] / r["restore_first_token_s"], 2)
        print(f"{'restart':<10}{r['restart_healthy_s']:>10}{r['restart_first_token_s']:>12}"
              f"{r['restart_cached_tokens']:>8}")
        print(f"{'restore':<10}{r['restore_healthy_s']:>10}{r['restore_first_token_s']:>12}"
              f"{r['restore_cached_tokens']:>8}   output equal: {r['restore_output_equal']}")
        print(f"ratio restart/restore {r['ratio_restart_vs_restore']}x, cold/restore "
              f"{r['ratio_cold_vs_restore']}x", flush=True)
    print(f"weights {raw / 2**30:.2f} GiB raw -> {stored / 2**30:.2f} GiB stored "
          f"({r['weights_ratio']}x)", flush=True)
    print(f"first snapshot: engine paused {first['engine_pause_seconds']} s of "
          f"{first['seconds']} s (files written in the background); written in the "
          f"pause: {inline['engine_pause_seconds']} s; ratio "
          f"{r['pause_ratio_inline_vs_background']}x", flush=True)
    for key in ("warm", "kept", "kept_cold", "cold"):
        sp = r.get(f"spare_{key}")
        if sp:
            print(f"spare load ({key}): "
                  f"{sp['first_token_s']} s to first token (load {sp['load']['phases_s']}, "
                  f"weights {sp['load']['weights']}), cached {sp['cached_tokens']}, output "
                  f"equal: {sp['output_equal']}; cold start / this "
                  f"{r['ratio_cold_vs_spare_' + key]}x", flush=True)


def read_through(path: str) -> int:
    """Reads every file under ``path`` (the page cache then holds it, as on the node
    that just wrote the snapshot)."""
    n = 0
    for d, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(d, name), "rb") as f:
                while chunk := f.read(64 << 20):
                    n += len(chunk)
    return n


def spare_loads(a, result: dict, base: list[str], root: str, env: dict, text: str,
                ref: list[int]) -> None:
    """``POST /snapshot/load`` into a spare (same engine flags, random weights), timed
    from the call to the first token of a prompt cached before the kill: ``warm`` with
    the snapshot in the page cache (a lost process), ``kept`` again (the spare holds
    these weights now: only the prefix cache is read), ``kept_cold`` the same with the
    page cache dropped (a spare provisioned with the deployment's weights, a lost node),
    ``cold`` everything from disk (page cache dropped, weights read again)."""
    spare = Serve([a.model, *base, "--snapshot-root", root], f"{a.log_dir}/snap-spare.log",
                  env)
    try:
        result["spare_healthy_s"] = round(spare.wait_healthy(a.timeout), 2)
        spare.complete(text, a.output_len)  # warm, as a spare in service would be
        gen = os.path.realpath(os.path.join(root, "bench", "CURRENT"))
        for key, body, prepare in (
                ("warm", {}, lambda: read_through(gen)),
                ("kept", {}, lambda: None),
                ("kept_cold", {}, drop_page_cache),
                ("cold", {"reload_weights": True}, drop_page_cache)):
            prepared = prepare()
            t = time.monotonic()
            r = requests.post(spare.url + "/snapshot/load", json={"name": "bench", **body},
                              timeout=900)
            r.raise_for_status()
            load = r.json()
            out = spare.complete(text, a.output_len)
            first = round(time.monotonic() - t, 3)
            result[f"spare_{key}"] = {
                "first_token_s": first, "load": load, "prepared": prepared,
                "cached_tokens": cached(out),
                "output_equal": out["choices"][0]["token_ids"] == ref}
            result[f"ratio_cold_vs_spare_{key}"] = round(result["cold_first_token_s"] / first, 1)
            print(f"spare ({key}): {json.dumps(result[f'spare_{key}'])}", flush=True)
    finally:
        spare.kill()


if __name__ == "__main__":
    main()
