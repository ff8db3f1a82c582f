#!/usr/bin/env bash
# Install what the tests need into .venv and run the suite (CPU only; `gpu` and `slow` tests are
# deselected by default: pass -m gpu on a GPU machine).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash jobs/setup_env.sh test
# The run report's test renders it in headless Chromium (Debian's package); installed when we may.
if ! command -v chromium >/dev/null && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "setup: installing Debian's chromium (for the run report's screenshot test)"
  apt-get update -qq && apt-get install -y -qq chromium >/dev/null || echo "setup: chromium not installed; its test will skip"
fi
export HF_HUB_OFFLINE=1
# Lint first (rules in pyproject.toml): unused names, import order, line length.
.venv/bin/python -m ruff check --quiet . || { echo "lint failed (above): fix it, or run .venv/bin/python -m ruff check --fix ." >&2; exit 1; }
exec .venv/bin/python -m pytest "$@"
