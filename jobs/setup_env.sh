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
echo "setup: installing the project${extras} into .venv (the first time downloads torch, a few GB)"
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".${extras}"
