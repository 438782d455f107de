#!/usr/bin/env bash
# The README's demo command: set up a fresh machine, then run the lifecycle demo on a real model.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q torch==2.13.0          # the CPU wheel on local disk; first, so nothing pulls a CUDA build
python3 -m pip install -q -e .
python3 -m lifecycle demo "$@"
