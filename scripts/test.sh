#!/usr/bin/env bash
# The README's test command: set up a fresh machine, then lint, type-check and run the whole test suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU wheel on local disk; first, so nothing pulls a CUDA build
python3 -m pip install -q -e ".[test]"
python3 -m ruff check states lifecycle adapters tests bench
python3 -m mypy --strict states lifecycle adapters
python3 -m pytest -q -p no:cacheprovider "$@"
