#!/usr/bin/env bash
# Developer loop: refresh an installed vLLM-HA venv from the working tree (patched
# upstream sources + overlay) without rebuilding the wheel. CI and users use setup-cpu.sh.
#   bash scripts/dev-sync.sh [VENV]   (default: .venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${1:-.venv}"
SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
STAGE="$(mktemp -d)"
trap 'rm -rf "$STAGE"' EXIT
"$VENV/bin/python" -m habuild stage "$STAGE" >/dev/null
n=0
while IFS= read -r f; do
  if ! cmp -s "$STAGE/$f" "$SITE/$f"; then
    mkdir -p "$(dirname "$SITE/$f")" && cp "$STAGE/$f" "$SITE/$f" && n=$((n + 1))
  fi
done < <(cd "$STAGE" && find vllm -name '*.py' -o -name '*.json')
echo "dev-sync: $n file(s) updated in $SITE/vllm"
