#!/usr/bin/env bash
# Build the separate virtual environment that holds nanotron.
#
# nanotron cannot live in the main environment: its pins conflict with lighteval's. The
# training image installs it on its own; here it only serves the test that loads the
# configs cosmoforge renders with nanotron's own config loader. `import nanotron.models`
# needs flash-attn (CUDA), but the config classes do not, so a CPU build of torch is enough.
#
# Usage: scripts/nanotron-venv.sh [VENV_DIR]   (default: .venv-nanotron at the repo root)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${1:-$root/.venv-nanotron}"
python="${PYTHON:-python3.11}"
command -v "$python" >/dev/null 2>&1 || python=python3

if [[ -x "$venv/bin/python" ]] && "$venv/bin/python" -c "import nanotron.config" 2>/dev/null; then
  echo "nanotron environment ready: $venv"
  exit 0
fi

"$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --upgrade pip
# torch pinned to the version the main environment uses: an unpinned torch would pull a
# multi-gigabyte CUDA build. nanotron 0.4 on PyPI fails to import (circular import); 0.2 works.
"$venv/bin/pip" install --quiet "torch==2.13.0" "nanotron==0.2"
"$venv/bin/python" -c "import nanotron.config; print('nanotron environment ready:', '$venv')"
