#!/usr/bin/env bash
# Create .venv in the repo (once) and install the project into it, with the extras given.
#   bash jobs/setup_env.sh            # what the job needs
#   bash jobs/setup_env.sh test       # plus what the tests need
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if ! "$PY" -m venv .venv 2>/dev/null; then
    rm -rf .venv
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
      echo "setup: installing Debian's python3-venv (needed to create .venv)"
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      "$PY" -m venv .venv
    else
      echo "setup: '$PY -m venv' failed; install your distribution's venv package (Debian: sudo apt-get install python3-venv) and rerun" >&2
      exit 1
    fi
  fi
fi
extras=${1:+[$1]}
# Reinstall only when pyproject.toml changed or new extras are asked for (quiet, fast reruns).
hash=$(sha256sum pyproject.toml | cut -c1-16)
if .venv/bin/python -c "import pipeline" 2>/dev/null && { [ -e ".venv/.installed-$hash-${1:-}" ] || { [ -z "${1:-}" ] && compgen -G ".venv/.installed-$hash-*" >/dev/null; }; }; then
  exit 0
fi
if .venv/bin/python -c "import torch, torchvision" 2>/dev/null; then
  echo "setup: updating the project${extras} in .venv"
else
  echo "setup: installing the project${extras} into .venv (downloads torch, a few GB, this once)"
fi
# pip's own notices (setuptools' editable-install advice for package authors) only when it fails
if ! { .venv/bin/python -m pip install -q --upgrade pip && .venv/bin/python -m pip install -q -e ".${extras}"; } 2>.venv/pip-install.log; then
  cat .venv/pip-install.log >&2
  echo "setup: pip failed (above); fix what it says and rerun" >&2
  exit 1
fi
rm -f .venv/.installed-*
touch ".venv/.installed-$hash-${1:-}"
