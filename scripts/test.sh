#!/usr/bin/env bash
# The README's test command: set up a fresh machine, then lint, type-check, run the test suite,
# run the core and families tests on the engines' pinned releases, and build the docs site strictly
# (every page, link and API reference entry).
# It leaves out the cases marked slow (7.5-9 minutes on 2 idle cores); scripts/test_slow.sh runs
# those after it (CI runs both: .ci/run). Arguments go to the main pytest run (`-n 0`: one process).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU wheel on local disk; first, so nothing pulls a CUDA build
python3 -m pip install -q -e ".[test]"
python3 -m ruff check states lifecycle adapters tests bench
python3 -m mypy --strict states lifecycle adapters
# One worker per core (at most 8), a group of tests that shares a build on one worker.
python3 -m pytest -q -p no:cacheprovider -n auto --maxprocesses 8 --dist loadgroup --durations=25 \
    -m "not slow" "$@"
# The engines' pinned cache-dit/diffusers (noxfile.py): the core and families tests, same selection.
python3 -m nox -r -s sglang-0.5.23 vllm-omni-0.30.0 -- -m "not slow"
NO_MKDOCS_2_WARNING=1 python3 -m mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
