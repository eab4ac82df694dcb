#!/usr/bin/env bash
# Creates .venv with torch and magseg-hpc (+ test extras). Idempotent; about 2-3 minutes fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch first, pinned: pip takes these wheels from the machine's local disk.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "== installing torch and torchvision"
  .venv/bin/python -m pip install -q torch==2.14.1 torchvision==0.29.1
fi
echo "== installing magseg-hpc[test]"
.venv/bin/python -m pip install -q -e '.[test]'
.venv/bin/python -c "import magseg_hpc, torch; print('magseg-hpc ready, torch', torch.__version__)"
