#!/usr/bin/env bash
# Set up vLLM-HA on a CPU-only machine (scripts/setup-cpu.sh) and run the test suite.
# Usage: scripts/test.sh [pytest args...]     env: VENV (default .venv)
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${VENV:-$ROOT/.venv}
bash "$ROOT/scripts/setup-cpu.sh" "$VENV"
cd "$ROOT"
printf '\n== running the tests\n'
set +e
"$VENV/bin/python" -m pytest -v -p no:cacheprovider --timeout 1200 -rs "$@"
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "error: pytest collected no tests" >&2
  exit 1
fi
exit "$rc"
