#!/usr/bin/env bash
# The main job on a CPU-only machine: set up vLLM-HA (CPU build), make a tiny model offline,
# run the preflight, serve it with a KV mirror to a standby engine (`--mirror-peer cpu`), stream a
# request, check that every cached block is on the standby, kill the standby and watch it come back,
# then kill the primary mid-stream and watch the stream continue on the promoted standby.
# Usage: scripts/demo.sh      env: VENV (default .venv), PORT (default 8000), WORK (default .work)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
WORK=${WORK:-$ROOT/.work}
PORT=${PORT:-8000}
bash "$ROOT/scripts/setup-cpu.sh" "$VENV"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_HOST_IP=127.0.0.1 UCX_NET_DEVICES=lo VLLM_CPU_KVCACHE_SPACE=1 TORCHDYNAMO_DISABLE=1
export VLLM_SERVER_DEV_MODE=1  # the mirror's debug routes (/mirror/verify)
mkdir -p "$WORK"
MODEL="$WORK/tiny-llama"
if [ ! -f "$MODEL/config.json" ]; then
  printf '\n== making a tiny Llama offline in %s\n' "$MODEL"
  "$VENV/bin/python" "$ROOT/scripts/make_tiny_model.py" "$MODEL" | tail -1
fi

printf '\n== vllm ha-check (what the HA features need on this machine)\n'
"$VENV/bin/vllm" ha-check || true

printf '\n== vllm serve %s --mirror-peer cpu on 127.0.0.1:%s (log: %s/serve.log)\n' "$MODEL" "$PORT" "$WORK"
"$VENV/bin/vllm" serve "$MODEL" --served-model-name tiny --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --max-model-len 1024 --enforce-eager --enable-prefix-caching \
  --block-size 16 --mirror-peer cpu > "$WORK/serve.log" 2>&1 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null' EXIT
for i in $(seq 1 600); do
  curl -sf -m 2 "http://127.0.0.1:$PORT/health" >/dev/null && break
  kill -0 $SERVER 2>/dev/null || { tail -30 "$WORK/serve.log"; echo "error: vllm serve exited"; exit 1; }
  [ $((i % 20)) = 0 ] && echo "   ... starting ($((i / 2)) s): $(tail -1 "$WORK/serve.log" | cut -c1-100)"
  sleep 0.5
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || { echo "error: server not healthy"; exit 1; }
echo "   up: $(curl -s "http://127.0.0.1:$PORT/version")"

printf '\n== streaming a chat completion\n'
"$VENV/bin/python" - "$PORT" <<'PY'
import json, sys, time, requests
url = f"http://127.0.0.1:{sys.argv[1]}/v1/chat/completions"
body = {"model": "tiny", "messages": [{"role": "user", "content": "tell me about the cache"}],
        "max_tokens": 96, "temperature": 0, "stream": True}
t0, n = time.perf_counter(), 0
with requests.post(url, json=body, stream=True, timeout=120) as r:
    r.raise_for_status()
    for line in r.iter_lines(decode_unicode=True):
        if line.startswith("data: {"):
            for ch in json.loads(line[6:])["choices"]:
                piece = ch["delta"].get("content") or ""
                n += bool(piece)
                print(piece, end="", flush=True)
print(f"\n   {n} chunks in {time.perf_counter() - t0:.2f} s")
PY
mirror() {  # GET /mirror once its state is $1 (and nothing is in flight)
  "$VENV/bin/python" - "$PORT" "$1" <<'PY'
import json, sys, time, requests
url, want = f"http://127.0.0.1:{sys.argv[1]}/mirror?refresh=true", sys.argv[2]
for _ in range(240):
    st = requests.get(url, timeout=30).json()
    if st["state"] == want and (want == "down" or st["lag_blocks"] == 0):
        break
    time.sleep(0.5)
print("   " + json.dumps({k: st[k] for k in ("state", "peer", "transport", "primary", "standby",
                                              "blocks_mirrored", "lag_blocks", "standby_restarts")}))
PY
}
printf '\n== the mirror (GET /mirror): every full KV block of the request is on the standby\n'
mirror in_sync
printf '   POST /mirror/verify: %s\n' "$(curl -s -X POST "http://127.0.0.1:$PORT/mirror/verify")"

printf '\n== kill -9 the standby engine: the primary keeps serving, a new standby catches up\n'
STANDBY=$(curl -s "http://127.0.0.1:$PORT/mirror" | "$VENV/bin/python" -c 'import json,sys; print(json.load(sys.stdin)["standby"]["pid"])')
kill -9 "$STANDBY"
mirror down
curl -sf "http://127.0.0.1:$PORT/v1/completions" -H 'content-type: application/json' \
  -d '{"model": "tiny", "prompt": "served while the standby is down", "max_tokens": 8}' >/dev/null \
  && echo "   a request served while unprotected"
mirror in_sync
printf '   POST /mirror/verify: %s\n' "$(curl -s -X POST "http://127.0.0.1:$PORT/mirror/verify")"
printf '\n== kill -9 the PRIMARY engine mid-stream: the stream goes on from the standby\n'
"$VENV/bin/python" - "$PORT" <<'PY'
import json, os, signal, sys, threading, time, requests
base = f"http://127.0.0.1:{sys.argv[1]}"
pid = requests.get(base + "/mirror", timeout=30).json()["primary"]["pid"]
body = {"model": "tiny", "prompt": "the standby keeps the stream going", "max_tokens": 900,
        "temperature": 0, "ignore_eos": True, "stream": True}
tokens, killed_at = [], []
def kill():
    while len(tokens) < 40:
        time.sleep(0.01)
    killed_at.append(len(tokens))
    os.kill(pid, signal.SIGKILL)
    print(f"\n   [kill -9 {pid} after {len(tokens)} tokens]", flush=True)
threading.Thread(target=kill, daemon=True).start()
with requests.post(base + "/v1/completions", json=body, stream=True, timeout=300) as r:
    r.raise_for_status()
    for line in r.iter_lines(chunk_size=1, decode_unicode=True):
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            if "error" in event:
                sys.exit(f"   stream failed: {event['error']}")
            piece = event["choices"][0]["text"]
            tokens.append(piece)
            print(piece, end="", flush=True)
print(f"\n   {len(tokens)} tokens, no error; the primary died after {killed_at[0]}")
st = requests.get(base + "/mirror", timeout=30).json()
print("   " + json.dumps({"failovers": st["failovers"], "last_failover": st["last_failover"],
                         "primary": st["primary"]}))
PY
printf '\n== re-protection: a new standby catches up from the new primary\n'
mirror in_sync
printf '\n== done: the server stops now\n'
