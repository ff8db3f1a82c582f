#!/usr/bin/env bash
# Install what the tests need into .venv and run the suite (CPU only; `gpu` and `slow` tests are
# deselected by default: pass -m gpu on a GPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash jobs/setup_env.sh test
export HF_HUB_OFFLINE=1
exec .venv/bin/python -m pytest "$@"
