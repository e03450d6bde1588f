#!/usr/bin/env bash
# Run the GPU-host part of the test suite. On the GPU host, after ../shared/gpu's staged
# install (". /tmp/stage/install.sh" puts upstream vLLM 0.26.0 in /tmp/site):
#   bash tests/gpu/run_on_gpu_host.sh [apply|check|test|all]   (logs under $OUT or ./gpu-out)
#   [INTERLEAVE=10] [PROFILE=128] bash tests/gpu/run_on_gpu_host.sh bench-mirror 1b|8b
#                                     (benchmarks/mirror_serve.py; PROFILE: py-spy at that concurrency)
#   MODES=mirrored bash tests/gpu/run_on_gpu_host.sh bench-failover   (benchmarks/failover_serve.py)
#   [PYTEST_K=...] bash tests/gpu/run_on_gpu_host.sh mirror    (the mirror e2e test on CUDA)
#   [PYTEST_K=...] bash tests/gpu/run_on_gpu_host.sh failover  (the failover e2e test on CUDA)
#   bash tests/gpu/run_on_gpu_host.sh checkpoint               (the /checkpoint e2e test on CUDA)
#   [PROBE_CASES="pinned:12 ..."] bash tests/gpu/run_on_gpu_host.sh driver-probe
#                                     (driver checkpoint of a process: nvCOMP, host memory)
#   MODES="..." VARIANTS="ha upstream-graph-pool" bash tests/gpu/run_on_gpu_host.sh bench-checkpoint 1b|8b
#                                                             (benchmarks/checkpoint_restore.py)
#   [PYTEST_K=...] bash tests/gpu/run_on_gpu_host.sh snapshot  (the snapshot e2e test on CUDA)
#   bash tests/gpu/run_on_gpu_host.sh bench-snapshot 1b|8b     (benchmarks/snapshot_restore.py)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOG=${OUT:-$ROOT/gpu-out}
SITE=${SITE:-/tmp/site}
mkdir -p "$LOG"
cd "$ROOT"
export VLLM_HA_TEST_DEVICE=cuda PYTHONUNBUFFERED=1 VLLM_HA_TEST_LOG_DIR=$LOG
what=${1:-all}
rc=0
bench_model() {
  # A ~1B or ~8B Llama shape without weights (served with --load-format dummy): sets
  # shape, model and the --gpu-memory-utilization it is benchmarked with.
  shape=$1
  model=/tmp/models/llama-$shape
  if [ "$shape" = 8b ]; then
    dims="--hidden 4096 --layers 32 --heads 32 --kv-heads 8 --intermediate 14336"; util=0.5
  else
    dims="--hidden 2048 --layers 16 --heads 32 --kv-heads 8 --intermediate 8192"; util=0.3
  fi
  [ -d "$model" ] || python3 "$ROOT/scripts/make_tiny_model.py" "$model" $dims --vocab 32000 \
    --max-pos 16384 --dtype bfloat16 --config-only > "$LOG/make-model-$shape.json"
}
case "$what" in bench-*)
  # Servers run in their own sessions: one left by a call cut at its time limit keeps
  # its GPU memory and starves the next run's engines.
  pkill -9 -f "entrypoints.cli.main serve" 2>/dev/null && sleep 3 ;;
esac
if [ "$what" = apply ] || [ "$what" = all ]; then
  python3 -m habuild apply --site "$SITE" 2>&1 | tee "$LOG/apply.log" || rc=1
fi
if [ "$what" = check ] || [ "$what" = all ]; then
  { date -u +%FT%TZ; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv; } \
    > "$LOG/device.txt" 2>&1
  python3 -m vllm.entrypoints.cli.main ha-check 2>&1 | tee "$LOG/ha-check.txt"
  python3 -m vllm.entrypoints.cli.main ha-check --json > "$LOG/ha-check.json" 2>"$LOG/ha-check.err"
  python3 -m vllm.entrypoints.cli.main ha-check --require mirror,checkpoint,compression \
    > /dev/null 2>&1; echo "ha-check --require mirror,checkpoint,compression: exit $?" \
    | tee -a "$LOG/ha-check.txt"
fi
if [ "$what" = test ] || [ "$what" = all ]; then
  python3 -m pytest -v -p no:cacheprovider tests/test_distribution.py tests/entrypoints tests/v1 \
    2>&1 | tee "$LOG/pytest.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = failover ]; then
  python3 -m pytest -v -p no:cacheprovider tests/v1/engine/test_mirror_failover.py \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$LOG/pytest-failover.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = driver-probe ]; then
  python3 tests/gpu/driver_nvcomp_probe.py ${PROBE_CASES:-} 2>&1 | tee "$LOG/driver-probe.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = checkpoint ]; then
  python3 -m pytest -v -p no:cacheprovider tests/entrypoints/serve/test_checkpoint.py \
    tests/entrypoints/serve/test_checkpoint_mirror.py \
    tests/v1/worker/test_checkpoint_worker.py tests/v1/checkpoint/test_graph_pool.py \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$LOG/pytest-checkpoint.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = mirror ]; then
  # PYTEST_K="direct and pause": a subset (the whole file takes ~6 min on the H100).
  python3 -m pytest -v -p no:cacheprovider tests/v1/engine/test_mirror_supervisor.py \
    ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 | tee "$LOG/pytest-mirror.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = bench-mirror ]; then
  # INTERLEAVE=N: on/paused rounds inside each mirrored server (the ratio that resolves).
  bench_model "${2:-1b}"
  util=$([ "$shape" = 8b ] && echo 0.4 || echo 0.3)  # two engines share the GPU
  python3 "$ROOT/benchmarks/mirror_serve.py" "$model" --peer cuda:0 --log-dir "$LOG" \
    --serve-args "--load-format dummy --dtype bfloat16 --gpu-memory-utilization $util --max-model-len 10240" \
    --concurrency 1 32 128 --repeats ${REPEATS:-5} --output-len ${OUTPUT_LEN:-256} \
    --transports ${TRANSPORTS:-staged} ${BASELINE_AGAIN:+--baseline-again} \
    ${INTERLEAVE:+--interleave $INTERLEAVE} ${NO_BASELINE:+--no-baseline} \
    ${PROFILE:+--profile $PROFILE --py-spy ${PY_SPY:-py-spy}} \
    --out "$LOG/mirror_serve_$shape.json" \
    2>&1 | tee "$LOG/bench-mirror-$shape.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
  # The stacks as one file (the device tool brings back a few files per call).
  compgen -G "$LOG/pyspy-*.log" > /dev/null && tar czf "$LOG/pyspy-$shape.tgz" -C "$LOG" \
    $(cd "$LOG" && ls pyspy-*.txt pyspy-*.log 2>/dev/null) \
    && rm -f "$LOG"/pyspy-*.txt "$LOG"/pyspy-*.log
fi
if [ "$what" = bench-failover ]; then
  # ~1B shape; MODES="mirrored" or "baseline" to split the run over calls, STREAMS="1 16 64".
  bench_model 1b
  python3 "$ROOT/benchmarks/failover_serve.py" "$model" --peer cuda:0 --log-dir "$LOG" \
    --serve-args "--load-format dummy --dtype bfloat16 --gpu-memory-utilization $util --max-model-len 4096" \
    --mirror-args=--mirror-allow-same-device --streams ${STREAMS:-64} \
    --modes ${MODES:-mirrored baseline} --out "$LOG/failover_serve_1b.json" \
    2>&1 | tee "$LOG/bench-failover.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = bench-checkpoint ]; then
  bench_model "${2:-1b}"
  python3 "$ROOT/benchmarks/checkpoint_restore.py" "$model" --log-dir "$LOG" \
    --serve-args "--load-format dummy --dtype bfloat16 --gpu-memory-utilization $util --max-model-len 4096" \
    ${MODES:+--modes $MODES} ${VARIANTS:+--variants $VARIANTS} \
    --out "$LOG/checkpoint_restore_$shape.json" \
    2>&1 | tee "$LOG/bench-checkpoint-$shape.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = snapshot ]; then
  python3 -m pytest -v -p no:cacheprovider tests/entrypoints/serve/test_snapshot_restore.py \
    ${PYTEST_K:+-k "$PYTEST_K"} \
    2>&1 | tee "$LOG/pytest-snapshot.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
if [ "$what" = bench-snapshot ]; then
  bench_model "${2:-1b}"
  python3 "$ROOT/benchmarks/snapshot_restore.py" "$model" --log-dir "$LOG" \
    --serve-args "--load-format dummy --dtype bfloat16 --gpu-memory-utilization $util --max-model-len 4096 --enable-sleep-mode" \
    ${SNAPSHOT_ARGS:-} --out "$LOG/snapshot_restore_$shape.json" 2>&1 | tee "$LOG/bench-snapshot-$shape.log"
  [ "${PIPESTATUS[0]}" = 0 ] || rc=1
fi
exit $rc
