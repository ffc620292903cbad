#!/usr/bin/env bash
# Installs nxdt, its four in-tree plugins and (with --test) the test tools into the active Python.
# torch is installed first, pinned, so that no dependency pulls a different (CUDA) build.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q --upgrade pip
python -m pip install -q "torch==2.13.0"
extras=""
[ "${1:-}" = "--test" ] && extras="[test]"
python -m pip install -q -e ".${extras}" -e plugins/llama -e plugins/gpt -e plugins/mixtral -e plugins/bert "torch==2.13.0"
