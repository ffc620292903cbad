#!/usr/bin/env bash
# Installs nxdt with its test tools and runs the test suite (what CI runs).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh --test
export NXDT_DEVICE=cpu
python -m ruff check core plugins tests bench
python -m mypy
python -m pytest -q -p no:cacheprovider tests plugins "$@"
