#!/usr/bin/env bash
# Creates .venv with torch and magseg-hpc (+ test extras). Idempotent; about 2-3 minutes fresh.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
# torch 2.14.1 + torchvision is ~5.5 GB in the venv (a CUDA build); the tests write up to a few
# GB more under the temp folder. Say so in one line instead of failing half-way in pip.
need_gb=8
read -r free_gb mount < <(df -P -BG . | awk 'NR==2 {sub("G", "", $4); print $4, $6}')
if ! .venv/bin/python -c "import torch" 2>/dev/null && [ "$free_gb" -lt "$need_gb" ]; then
  echo "error: only ${free_gb} GB free on ${mount}; setting up needs about ${need_gb} GB (torch alone is 5.5 GB): free some space and rerun" >&2
  exit 1
fi
if [ ! -x .venv/bin/python ]; then
  echo "== creating .venv"
  "$PY" -m venv .venv
fi
# --no-cache-dir: where the wheels are not on local disk, pip would also keep a second copy
# of the downloaded torch (GBs) in its cache.
PIP=(.venv/bin/python -m pip install -q --no-cache-dir)
"${PIP[@]}" --upgrade pip
# torch first, pinned: pip takes these wheels from the machine's local disk.
if ! .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "== installing torch and torchvision"
  "${PIP[@]}" torch==2.14.1 torchvision==0.29.1
fi
echo "== installing magseg-hpc[test]"
"${PIP[@]}" -e '.[test]'
.venv/bin/python -c "import magseg_hpc, torch; print('magseg-hpc ready, torch', torch.__version__)"
