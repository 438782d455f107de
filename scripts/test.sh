#!/usr/bin/env bash
# The README's test command: set up a fresh machine, then lint, type-check, run the whole test suite,
# run the core and families tests on the engines' pinned releases, and build the docs site strictly
# (every page, link and API reference entry).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU wheel on local disk; first, so nothing pulls a CUDA build
python3 -m pip install -q -e ".[test]"
python3 -m ruff check states lifecycle adapters tests bench
python3 -m mypy --strict states lifecycle adapters
# One worker per core (at most 8), a group of tests that shares a build on one worker; "$@" comes
# last, so `-n 0` runs in one process.
python3 -m pytest -q -p no:cacheprovider -n auto --maxprocesses 8 --dist loadgroup "$@"
python3 -m nox -r -s sglang-0.5.23 vllm-omni-0.30.0  # the engines' pinned cache-dit/diffusers (noxfile.py)
NO_MKDOCS_2_WARNING=1 python3 -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
