#!/usr/bin/env python3
"""KV mirroring cost on a served model: the same `vllm serve` without and with
``--mirror-peer``, in the same run, on the same prompts.

    python benchmarks/mirror_serve.py MODEL --peer cuda:0 --serve-args "--load-format dummy ..."
    python benchmarks/mirror_serve.py MODEL --peer cpu --concurrency 1 4 --output-len 32

For each concurrency: decode tokens/s (output tokens / wall time of the batch, every
request ``ignore_eos`` with the same output length) off and on, and the ratio; TTFT of
long prompts (streamed, first token) off and on; with the mirror on, lag in steps
p50/p99 (``vllm:mirror_lag_steps``) and bytes/s mirrored. Writes JSON to --out.

Between-server drift (5-20 % on the H100) is larger than the effect, so
``--interleave N`` measures inside one mirrored server's lifetime instead: N rounds,
each with the mirror paused (``POST /mirror/pause``) and on (resumed and back in sync),
in alternating order; the ratio is the median of the N paired on/off ratios, printed
with their spread and the off-vs-off ratio of neighbouring rounds (the noise floor).
"Off" there is the paused mirror (hooks present, tracker detached, an idle standby on
the peer); the plain server run first says whether that differs from no mirror at all.

``--profile C --py-spy PATH`` samples the primary engine process with py-spy while
concurrency C decodes, on both sides of every round: once every thread that is not
idle, once only the thread holding the GIL (``--gil``); both sides alike run under
the two samplers. The summary gives each
thread's share of the samples and the share spent in the mirror's own code, on vs
paused; the raw stacks stay in --log-dir.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime
import json
import os
import platform
import shlex
import signal
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

import requests

WORDS = ("cache block mirror standby engine primary worker scheduler token stream "
         "prefix hash layer tensor copy write").split()


def prompt(seed: int, n_words: int) -> str:
    return " ".join(WORDS[(seed * 13 + i * 7 + i // 5) % len(WORDS)] for i in range(n_words))


class Server:
    def __init__(self, model: str, args: list[str], log: str, env: dict[str, str],
                 timeout: float) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", model,
               "--host", "127.0.0.1", "--port", str(self.port), "--served-model-name", "m",
               *args]
        self.log = open(log, "w")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}; see {log}")
            try:
                if requests.get(self.url + "/health", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            time.sleep(1)
        else:
            self.close()
            raise TimeoutError(f"server not healthy in {timeout} s; see {log}")
        self.startup_s = time.monotonic() - t0

    def wait_mirror(self, timeout: float) -> float:
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            st = requests.get(self.url + "/mirror?refresh=true", timeout=30).json()
            # Settled: caught up and every copy issued confirmed.
            if st["state"] == "in_sync" and st["lag_blocks"] == 0 and not st["backlog_blocks"]:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise TimeoutError(f"mirror not in sync in {timeout} s")

    def set_mirror(self, on: bool, timeout: float) -> None:
        """Pause or resume the mirror; on: wait until the standby is back in sync."""
        r = requests.post(self.url + ("/mirror/resume" if on else "/mirror/pause"), timeout=120)
        r.raise_for_status()
        if on:
            self.wait_mirror(timeout)

    def metrics(self) -> dict[str, float]:
        out = {}
        for line in requests.get(self.url + "/metrics", timeout=30).text.splitlines():
            if line.startswith("vllm:mirror_"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def verify(self) -> dict:
        """Every cached block of the primary byte-identical on the standby (dev-mode route)."""
        r = requests.post(self.url + "/mirror/verify", timeout=600)
        if r.status_code == 404:
            return {"skipped": "VLLM_SERVER_DEV_MODE is not set"}
        r.raise_for_status()
        v = r.json()
        return {"checked": v["checked"], "missing": len(v["missing"]),
                "mismatched": len(v["mismatched"])}

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.log.close()


def complete(url: str, text: str, max_tokens: int) -> int:
    r = requests.post(url + "/v1/completions", json={
        "model": "m", "prompt": text, "max_tokens": max_tokens, "temperature": 0,
        "ignore_eos": True}, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["completion_tokens"]


def prompt_tokens(url: str, text: str) -> int:
    r = requests.post(url + "/v1/completions", json={
        "model": "m", "prompt": text, "max_tokens": 1, "temperature": 0}, timeout=600)
    r.raise_for_status()
    return r.json()["usage"]["prompt_tokens"]


def gpu_processes() -> list[str]:
    """What `nvidia-smi` shows an operator: the standby must be told from the primary."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()]


def ttft(url: str, text: str) -> float:
    t0 = time.perf_counter()
    with requests.post(url + "/v1/completions", json={
            "model": "m", "prompt": text, "max_tokens": 2, "temperature": 0,
            "ignore_eos": True, "stream": True}, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines(decode_unicode=True):
            if line.startswith("data: {"):
                return time.perf_counter() - t0
    raise RuntimeError("no token streamed")


def decode_tps(url: str, conc: int, prompt_words: int, output_len: int, seed: int) -> float:
    texts = [prompt(seed + i, prompt_words) for i in range(conc)]
    t0 = time.perf_counter()
    with cf.ThreadPoolExecutor(conc) as ex:
        tokens = sum(ex.map(lambda t: complete(url, t, output_len), texts))
    return tokens / (time.perf_counter() - t0)


class Profile:
    """py-spy attached to one process while a block of work runs (--nonblocking: the
    process is never paused, so the sampling does not slow what it measures)."""

    def __init__(self, py_spy: str, pid: int, out: str, gil: bool) -> None:
        self.out = out
        cmd = [py_spy, "record", "--pid", str(pid), "--nonblocking", "--threads",
               "--rate", "250", "--format", "raw", "--output", out, "--duration", "3600"]
        with open(out[:-len(".txt")] + ".log", "w") as log:  # an attach failure says why
            self.proc = subprocess.Popen(cmd + (["--gil"] if gil else []),
                                         stdout=log, stderr=subprocess.STDOUT)
        time.sleep(1.0)  # attached before the work starts

    def stop(self) -> dict:
        self.proc.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return {"error": "py-spy did not stop"}
        return summarize_profile(self.out)


# The engine process's mirror modules (the supervisor runs in the API server).
MIRROR_FRAMES = ("kv_mirror", "v1/engine/mirror")
# Mirror frames that only wrap upstream work (the model runner's output, collected
# through the wrapper that attaches the mirror's completions to it).
MIRROR_WRAPPERS = ("_MirroredAsyncOutput.get_output",)


def _is_mirror_frame(frame: str) -> bool:
    return any(m in frame for m in MIRROR_FRAMES) and not frame.startswith(MIRROR_WRAPPERS)


def summarize_profile(path: str) -> dict:
    """Shares of the samples per thread, and of the samples with the mirror's code on
    the stack (the NIXL and torch calls it makes included)."""
    threads: dict[str, int] = {}
    mirror = total = 0
    try:
        lines = open(path).read().splitlines()
    except OSError as e:
        return {"error": str(e)}
    for line in lines:
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        frames = stack.split(";")
        thread = frames[0].split(": ", 1)[-1]  # --threads: "thread (TID): NAME" first
        threads[thread] = threads.get(thread, 0) + count
        total += count
        if any(_is_mirror_frame(f) for f in frames):
            mirror += count
    if not total:
        return {"samples": 0}
    top = sorted(threads.items(), key=lambda kv: -kv[1])[:6]
    return {"samples": total, "mirror_share": round(mirror / total, 4),
            "threads": {k: round(v / total, 4) for k, v in top}}


def histogram_quantile(metrics: dict[str, float], name: str, q: float) -> float | None:
    buckets = sorted((float(k.split('le="')[1].split('"')[0]), v) for k, v in metrics.items()
                     if k.startswith(name + "_bucket"))
    if not buckets or buckets[-1][1] == 0:
        return None
    total = buckets[-1][1]
    for le, count in buckets:
        if count >= q * total:
            return le
    return buckets[-1][0]


def steady_figures(window: dict[str, float], seconds: float) -> dict:
    """Lag and push time over the timed on-sides only (metric deltas summed from the
    moment the standby was in sync): the resume's catch-up is left out."""
    return {
        "lag_steps_p50": histogram_quantile(window, "vllm:mirror_lag_steps", 0.5),
        "lag_steps_p99": histogram_quantile(window, "vllm:mirror_lag_steps", 0.99),
        "confirm_steps_p50": histogram_quantile(window, "vllm:mirror_confirm_steps", 0.5),
        "confirm_steps_p99": histogram_quantile(window, "vllm:mirror_confirm_steps", 0.99),
        "steps": window.get("vllm:mirror_lag_steps_count", 0),
        # Share of wall time the primary's worker spent posting/polling WRITEs.
        "push_busy": (round(window.get("vllm:mirror_push_seconds_total", 0) / seconds, 4)
                      if seconds else None),
    }


def run(server: Server, a: argparse.Namespace, mirrored: bool) -> dict:
    url = server.url
    complete(url, prompt(0, 32), 8)  # warm up
    res: dict = {"startup_s": round(server.startup_s, 1), "decode_tps": {}, "ttft_s": []}
    if mirrored:
        res["mirror_ready_s"] = round(server.wait_mirror(a.timeout), 1)
        before = server.metrics()
    t0 = time.monotonic()
    for conc in a.concurrency:
        runs = [decode_tps(url, conc, a.prompt_words, a.output_len, 1000 * conc + k)
                for k in range(a.repeats)]
        res["decode_tps"][conc] = round(statistics.median(runs), 1)
    res["ttft_s"] = [round(ttft(url, prompt(7000 + k, a.long_prompt_words)), 4)
                     for k in range(a.repeats)]
    res["long_prompt_tokens"] = prompt_tokens(url, prompt(7000, a.long_prompt_words))
    if mirrored:
        server.wait_mirror(a.timeout)
        res["mirror"] = mirror_figures(server, before, server.metrics(),
                                       time.monotonic() - t0)
        res["gpu_processes"] = gpu_processes()
    return res


def mirror_figures(server: Server, before: dict[str, float], after: dict[str, float],
                   seconds: float) -> dict:
    def delta(name: str) -> float:
        return after.get(name, 0) - before.get(name, 0)

    return {
        "lag_steps_p50": histogram_quantile(after, "vllm:mirror_lag_steps", 0.5),
        "lag_steps_p99": histogram_quantile(after, "vllm:mirror_lag_steps", 0.99),
        "confirm_steps_p50": histogram_quantile(after, "vllm:mirror_confirm_steps", 0.5),
        "confirm_steps_p99": histogram_quantile(after, "vllm:mirror_confirm_steps", 0.99),
        "transfer_s_p50": histogram_quantile(after, "vllm:mirror_transfer_seconds", 0.5),
        "transfer_s_p99": histogram_quantile(after, "vllm:mirror_transfer_seconds", 0.99),
        "blocks": delta("vllm:mirror_blocks_total"),
        "bytes_per_s": delta("vllm:mirror_bytes_total") / seconds,
        "blocks_failed": after.get("vllm:mirror_blocks_failed_total", 0),
        "verify": server.verify(),
    }


def profiled_decode_tps(server: Server, a: argparse.Namespace, c: int, seed: int,
                        name: str, side: dict) -> tuple[float, float]:
    """decode_tps at concurrency ``c``, under py-spy when ``c`` is --profile's; also the
    seconds the profilers themselves took (attach, write), which the mirror's rates
    must not count as serving time."""
    if a.profile != c:
        return decode_tps(server.url, c, a.prompt_words, a.output_len, seed), 0.0
    t0 = time.monotonic()
    pid = requests.get(server.url + "/mirror", timeout=30).json()["primary"]["pid"]
    base = os.path.join(a.log_dir, f"pyspy-{name}-c{c}")
    profiles: dict[str, Profile] = {}
    overhead = 0.0
    try:
        profiles["all"] = Profile(a.py_spy, pid, base + "-all.txt", gil=False)
        profiles["gil"] = Profile(a.py_spy, pid, base + "-gil.txt", gil=True)
        overhead += time.monotonic() - t0
        tps = decode_tps(server.url, c, a.prompt_words, a.output_len, seed)
    finally:
        t1 = time.monotonic()
        side["profile"] = {k: p.stop() for k, p in profiles.items()}
        overhead += time.monotonic() - t1
    return tps, overhead


def run_interleaved(server: Server, a: argparse.Namespace, label: str) -> dict:
    """N rounds of (paused, on) or (on, paused) in one server; paired ratios."""
    url = server.url
    res: dict = {"startup_s": round(server.startup_s, 1),
                 "mirror_ready_s": round(server.wait_mirror(a.timeout), 1), "rounds": []}
    complete(url, prompt(0, 32), 8)  # warm up
    before = server.metrics()
    on_seconds = 0.0
    window: dict[str, float] = {}  # metric deltas summed over the timed on-sides
    for r in range(a.interleave):
        order = (False, True) if r % 2 == 0 else (True, False)
        rnd: dict = {}
        for on in order:
            server.set_mirror(on, a.timeout)
            t0 = time.monotonic()
            m0 = server.metrics() if on else {}
            # Prompts of their own per side: the second side of a round must not hit
            # the prefix cache the first one filled.
            seed = 100000 * r + (50000 if on else 0)
            side: dict = {"decode_tps": {}}
            profiler_s = 0.0
            for c in a.concurrency:
                tps, spent = profiled_decode_tps(server, a, c, seed + 1000 * c,
                                                 f"{label}-r{r}-{'on' if on else 'paused'}",
                                                 side)
                side["decode_tps"][c] = round(tps, 1)
                profiler_s += spent
            side["ttft_s"] = round(ttft(url, prompt(7000 + 2 * r + on, a.long_prompt_words)), 4)
            if on:
                server.wait_mirror(a.timeout)  # what the timed part queued, confirmed
                on_seconds += time.monotonic() - t0 - profiler_s
                for k, v in server.metrics().items():
                    if k.startswith(("vllm:mirror_lag_steps", "vllm:mirror_confirm_steps",
                                     "vllm:mirror_push_seconds")):
                        window[k] = window.get(k, 0) + v - m0.get(k, 0)
            rnd["on" if on else "off"] = side
        res["rounds"].append(rnd)
        print(f"round {r}: {json.dumps(rnd)}", flush=True)
    server.set_mirror(True, a.timeout)
    res["mirror"] = mirror_figures(server, before, server.metrics(), on_seconds)
    res["mirror"]["steady"] = steady_figures(window, on_seconds)
    res["long_prompt_tokens"] = prompt_tokens(url, prompt(7000, a.long_prompt_words))
    res["gpu_processes"] = gpu_processes()
    rounds = res["rounds"]
    res["decode_ratio"], res["decode_ratio_range"], res["noise_floor"] = {}, {}, {}
    for c in a.concurrency:
        pairs = [x["on"]["decode_tps"][c] / x["off"]["decode_tps"][c] for x in rounds]
        offs = [x["off"]["decode_tps"][c] for x in rounds]
        res["decode_ratio"][c] = round(statistics.median(pairs), 4)
        res["decode_ratio_range"][c] = [round(min(pairs), 4), round(max(pairs), 4)]
        if len(offs) > 1:  # paused vs paused of neighbouring rounds
            res["noise_floor"][c] = round(statistics.median(
                abs(b / a_ - 1) for a_, b in zip(offs, offs[1:])), 4)
    res["decode_tps"] = {c: round(statistics.median(x["on"]["decode_tps"][c] for x in rounds), 1)
                         for c in a.concurrency}
    res["decode_tps_paused"] = {
        c: round(statistics.median(x["off"]["decode_tps"][c] for x in rounds), 1)
        for c in a.concurrency}
    res["ttft_s"] = [x["on"]["ttft_s"] for x in rounds]
    res["ttft_ratio"] = round(statistics.median(x["on"]["ttft_s"] / x["off"]["ttft_s"]
                                                for x in rounds), 4)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model")
    ap.add_argument("--peer", default="cpu")
    ap.add_argument("--serve-args", default="", help="extra `vllm serve` args for both runs")
    ap.add_argument("--transports", nargs="+", default=["staged"],
                    choices=["staged", "direct"], help="one mirrored run per transport")
    ap.add_argument("--baseline-again", action="store_true",
                    help="serve without the mirror once more at the end: the ratio of the two "
                         "baselines is the noise floor of the on/off ratios")
    ap.add_argument("--mirror-args", default="",
                    help="extra args for the mirrored run (e.g. --mirror-transport direct)")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 32, 128])
    ap.add_argument("--prompt-words", type=int, default=64)
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--long-prompt-words", type=int, default=3900,
                    help="TTFT prompt (about 8k tokens with the scripts/make_tiny_model.py tokenizer)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--interleave", type=int, default=0, metavar="ROUNDS",
                    help="measure off (paused) and on inside each mirrored server, ROUNDS "
                         "alternating rounds (see above); the plain server still runs first "
                         "unless --no-baseline")
    ap.add_argument("--profile", type=int, default=None, metavar="C",
                    help="with --interleave: py-spy the primary engine while concurrency C "
                         "decodes, on both sides of every round (see above)")
    ap.add_argument("--py-spy", default="py-spy", help="the py-spy binary for --profile")
    ap.add_argument("--no-baseline", action="store_true",
                    help="with --interleave: skip the plain server")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--log-dir", default=".")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    if a.profile is not None and (not a.interleave or a.profile not in a.concurrency):
        ap.error("--profile C needs --interleave and C among --concurrency")

    # Dev mode only adds the /mirror/verify route, read once after the timed part.
    env = {**os.environ, "VLLM_NO_USAGE_STATS": "1", "HF_HUB_OFFLINE": "1",
           "VLLM_SERVER_DEV_MODE": "1"}
    base = shlex.split(a.serve_args)
    mirror = ["--mirror-peer", a.peer, *shlex.split(a.mirror_args)]
    if a.peer.startswith("cuda:"):
        mirror.append("--mirror-allow-same-device")
    runs = [] if (a.interleave and a.no_baseline) else [("off", base)]
    for t in a.transports:
        runs.append((f"on-{t}", base + mirror + ["--mirror-transport", t]))
    if a.baseline_again:
        runs.append(("off-again", base))  # server-to-server drift, the noise floor
    results = {}
    for label, args in runs:
        server = Server(a.model, args, os.path.join(a.log_dir, f"serve-mirror-{label}.log"),
                        env, a.timeout)
        try:
            if a.interleave and label.startswith("on"):
                results[label] = run_interleaved(server, a, label)
            else:
                results[label] = run(server, a, mirrored=label.startswith("on"))
        finally:
            server.close()
        print(f"{label}: {json.dumps(results[label])}", flush=True)
        if a.out:  # what finished survives a run cut short
            with open(a.out + ".partial", "w") as f:
                json.dump(results, f, indent=2)

    ratios: dict[str, dict] = {}
    ttft_ratios: dict[str, float] = {}
    if a.interleave:
        for label, on in results.items():
            if label.startswith("off"):
                continue
            print(f"--- {label}: {a.interleave} interleaved rounds in one server "
                  "(on vs paused, median of paired ratios)")
            print(f"{'concurrency':>12} {'paused':>10} {'on':>10} {'ratio':>7} "
                  f"{'range':>15} {'noise':>7}" + (f" {'plain':>10}" if "off" in results else ""))
            for c in a.concurrency:
                lo, hi = on["decode_ratio_range"][c]
                plain = (f" {results['off']['decode_tps'][c]:>10.1f}" if "off" in results else "")
                print(f"{c:>12} {on['decode_tps_paused'][c]:>10.1f} {on['decode_tps'][c]:>10.1f} "
                      f"{on['decode_ratio'][c]:>7.3f} {lo:>7.3f}-{hi:<7.3f} "
                      f"{on['noise_floor'].get(c, 0):>7.3f}" + plain)
            ratios[label], ttft_ratios[label] = on["decode_ratio"], on["ttft_ratio"]
            print(f"TTFT {on['long_prompt_tokens']}-token prompt ratio {on['ttft_ratio']:.3f}")
            print(f"mirror: {json.dumps(on['mirror'])}")
        return write_report(a, results, ratios, ttft_ratios, mode="interleaved")
    off = results["off"]
    if "off-again" in results:
        drift = {c: round(results["off-again"]["decode_tps"][c] / off["decode_tps"][c], 4)
                 for c in a.concurrency}
        print(f"baseline drift (second off server / first): {drift}")
    for label, on in results.items():
        if label.startswith("off"):
            continue
        print(f"--- {label} (vs off)")
        print(f"{'concurrency':>12} {'off tok/s':>10} {'on tok/s':>10} {'ratio':>7}")
        ratios[label] = {}
        for conc in a.concurrency:
            ratios[label][conc] = round(on["decode_tps"][conc] / off["decode_tps"][conc], 4)
            print(f"{conc:>12} {off['decode_tps'][conc]:>10.1f} "
                  f"{on['decode_tps'][conc]:>10.1f} {ratios[label][conc]:>7.3f}")
        ttft_ratios[label] = round(statistics.median(on["ttft_s"])
                                   / statistics.median(off["ttft_s"]), 4)
        print(f"TTFT {on['long_prompt_tokens']}-token prompt: off "
              f"{statistics.median(off['ttft_s']) * 1e3:.1f} ms, on "
              f"{statistics.median(on['ttft_s']) * 1e3:.1f} ms, "
              f"ratio {ttft_ratios[label]:.3f}")
        print(f"mirror: {json.dumps(on['mirror'])}")
    write_report(a, results, ratios, ttft_ratios,
                 baseline_drift=drift if "off-again" in results else None)


def write_report(a: argparse.Namespace, results: dict, ratios: dict, ttft_ratios: dict,
                 **extra: Any) -> None:
    report = {"benchmark": "mirror_serve", **extra,
              "date": datetime.datetime.now().isoformat(), "host": platform.node(),
              "command": " ".join(sys.argv), "peer": a.peer, "results": results,
              "decode_ratio": ratios, "ttft_ratio": ttft_ratios}
    try:
        import torch
        report["device"] = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
                            else platform.processor() or "cpu")
        import vllm
        report["vllm"] = vllm.__version__
    except Exception:
        pass
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)


if __name__ == "__main__":
    main()
