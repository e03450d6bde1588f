#!/usr/bin/env bash
# Quick look at a mirrored server on the GPU host: start, a few requests, /mirror, full log.
#   bash tests/gpu/mirror_smoke.sh TRANSPORT [extra serve args...]   (log under $OUT)
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOG=${OUT:-$ROOT/gpu-out}; mkdir -p "$LOG"
transport=$1; shift
model=/tmp/models/tiny
[ -d $model ] || python3 "$ROOT/scripts/make_tiny_model.py" $model > /dev/null 2>&1
export VLLM_SERVER_DEV_MODE=1 HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 VLLM_HOST_IP=127.0.0.1
port=8123
python3 -m vllm.entrypoints.cli.main serve $model --port $port --served-model-name tiny \
  --max-model-len 1024 --block-size 16 --num-gpu-blocks-override 96 --dtype bfloat16 \
  --gpu-memory-utilization 0.2 --mirror-peer cuda:0 --mirror-allow-same-device \
  --mirror-transport "$transport" "$@" > "$LOG/smoke-$transport.log" 2>&1 &
pid=$!
for i in $(seq 240); do curl -sf localhost:$port/health > /dev/null && break; sleep 0.5; done
for i in $(seq 60); do curl -s "localhost:$port/mirror?refresh=true" | grep -q '"in_sync"' && break; sleep 1; done
echo "--- /mirror at start"; curl -s -m 20 "localhost:$port/mirror?refresh=true"; echo
for n in 1 2 3; do
  curl -s -m 60 localhost:$port/v1/completions -H 'content-type: application/json' \
    -d "{\"model\":\"tiny\",\"prompt\":\"cache block mirror standby $n engine primary worker scheduler token stream prefix hash layer tensor copy write cache block mirror\",\"max_tokens\":64,\"ignore_eos\":true,\"temperature\":0}" | head -c 300; echo
done
sleep 2
echo "--- /mirror after"; curl -s -m 20 "localhost:$port/mirror?refresh=true"; echo
echo "--- verify"; curl -s -m 60 -X POST localhost:$port/mirror/verify | head -c 400; echo
nvidia-smi --query-compute-apps=pid,process_name,used_memory --format=csv,noheader
kill $pid; sleep 5; pkill -9 -f "vllm.entrypoints" ; pkill -9 -f VLLM; sleep 1
