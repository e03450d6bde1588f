#!/usr/bin/env bash
# Turn an installed upstream vLLM 0.26.0 (the vllm/vllm-openai:v0.26.0 image) into vLLM-HA.
# Run by docker/Dockerfile; CI runs the same script outside Docker (tests/docker/).
#   PIP_TARGET=DIR  install the extra wheels into DIR instead of site-packages
set -euo pipefail
HA_ROOT=$(cd "$(dirname "$0")/.." && pwd)
PY=${PYTHON:-python3}
SITE=$("$PY" -c 'import importlib.util, os; s = importlib.util.find_spec("vllm"); print(os.path.dirname(list(s.submodule_search_locations)[0]) if s else "")')
if [ -z "$SITE" ]; then
  echo "error: no vllm package is importable with $PY: build FROM vllm/vllm-openai:v0.26.0" >&2
  exit 1
fi
echo "== vLLM-HA: extra wheels (NIXL, nvCOMP)"
"$PY" -m pip install -q --no-deps --no-cache-dir --disable-pip-version-check \
  ${PIP_TARGET:+--target "$PIP_TARGET"} -r "$HA_ROOT/docker/requirements-ha.txt"
echo "== vLLM-HA: patch series + modules onto $SITE/vllm"
(cd "$HA_ROOT" && "$PY" -m habuild apply --site "$SITE")
echo "== vLLM-HA: preflight (informational: no GPU while the image builds)"
"$PY" -m vllm.entrypoints.cli.main ha-check
