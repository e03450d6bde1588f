#!/usr/bin/env bash
# Run the GPU-host part of the test suite. On the GPU host, after ../shared/gpu's staged
# install (". /tmp/stage/install.sh" puts upstream vLLM 0.26.0 in /tmp/site):
#   bash tests/gpu/run_on_gpu_host.sh [apply|check|test|all]   (logs under $OUT or ./gpu-out)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
LOG=${OUT:-$ROOT/gpu-out}
SITE=${SITE:-/tmp/site}
mkdir -p "$LOG"
cd "$ROOT"
export VLLM_HA_TEST_DEVICE=cuda PYTHONUNBUFFERED=1
what=${1:-all}
rc=0
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
exit $rc
