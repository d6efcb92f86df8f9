#!/usr/bin/env bash
# Set up the environment, then run the main job: serve the built-in tiny
# VLM-wrapped MoE model with EPLB on a skewed token stream (see README).
# Extra arguments go to `moe-protocols demo` (e.g. --plot load.png).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${MOE_PROTOCOLS_VENV:-.venv}"
exec "$VENV/bin/moe-protocols" demo "$@"
