#!/usr/bin/env bash
# The main job on a CPU-only machine: set up vLLM-HA (CPU build), make a tiny model offline,
# run the preflight, serve it with the patched `vllm serve`, and stream a request.
# Usage: scripts/demo.sh      env: VENV (default .venv), PORT (default 8000), WORK (default .work)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
WORK=${WORK:-$ROOT/.work}
PORT=${PORT:-8000}
bash "$ROOT/scripts/setup-cpu.sh" "$VENV"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
export VLLM_HOST_IP=127.0.0.1 UCX_NET_DEVICES=lo VLLM_CPU_KVCACHE_SPACE=1 TORCHDYNAMO_DISABLE=1
mkdir -p "$WORK"
MODEL="$WORK/tiny-llama"
if [ ! -f "$MODEL/config.json" ]; then
  printf '\n== making a tiny Llama offline in %s\n' "$MODEL"
  "$VENV/bin/python" "$ROOT/scripts/make_tiny_model.py" "$MODEL" | tail -1
fi

printf '\n== vllm ha-check (what the HA features need on this machine)\n'
"$VENV/bin/vllm" ha-check || true

printf '\n== vllm serve %s on 127.0.0.1:%s (log: %s/serve.log)\n' "$MODEL" "$PORT" "$WORK"
"$VENV/bin/vllm" serve "$MODEL" --served-model-name tiny --host 127.0.0.1 --port "$PORT" \
  --dtype float32 --max-model-len 1024 --enforce-eager --enable-prefix-caching \
  > "$WORK/serve.log" 2>&1 &
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
        "max_tokens": 48, "temperature": 0, "stream": True}
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
printf '\n== done: the server stops now (the demo grows mirroring and failover in later releases)\n'
