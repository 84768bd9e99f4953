#!/usr/bin/env bash
# Set-up and entry points. Creates .venv on first use (torch 2.13.0 first, then this project).
#   bash dev.sh demo [hydra overrides]   the main job
#   bash dev.sh test [pytest args]       the test suite
#   bash dev.sh gpu-check [args]         the GPU checks, one table (eval/gpu_check.py; needs CUDA)
#   bash dev.sh setup                    only create / update .venv
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=.venv

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  # Re-install only when pyproject.toml changed since the last install.
  stamp="$VENV/.installed-$(sha1sum pyproject.toml | cut -c1-12)"
  if [ ! -f "$stamp" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1 || true
    # torch first, pinned: a plain `torch` would pull the CUDA build.
    "$VENV/bin/python" -m pip install -q torch==2.13.0
    "$VENV/bin/python" -m pip install -q -e ".[dev,fla-cpu,harness,dashboard]"
    rm -f "$VENV"/.installed-*
    touch "$stamp"
  fi
}

cmd=${1:-test}
shift || true
case "$cmd" in
  setup) setup ;;
  test)
    setup
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  demo)
    setup
    exec "$VENV/bin/python" -m rwkv_diffusion_rnn.demo "$@" ;;
  gpu-check)
    setup
    exec "$VENV/bin/python" eval/gpu_check.py "$@" ;;
  *) echo "usage: bash dev.sh {demo|test|gpu-check|setup} [args]" >&2; exit 2 ;;
esac
