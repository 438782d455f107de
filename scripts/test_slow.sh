#!/usr/bin/env bash
# The cases scripts/test.sh leaves out (marked slow: replicas in many processes, every docs page's
# examples, ahead-of-time builds, the slowest families), in the environment it set up. CI runs
# scripts/test.sh, then this (.ci/run).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pytest -q -p no:cacheprovider -n auto --maxprocesses 8 --dist loadgroup --durations=25 -m slow "$@"
python3 -m nox -r -s sglang-0.5.23 vllm-omni-0.30.0 -- -m slow
