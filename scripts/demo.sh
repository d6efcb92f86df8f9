#!/usr/bin/env bash
# Set up the environment, then run the main job: inspect the example
# VLM-wrapped MoE model (resolution trace + conformance report).
set -euo pipefail
cd "$(dirname "$0")/.."
./scripts/setup.sh
VENV="${MOE_PROTOCOLS_VENV:-.venv}"
exec "$VENV/bin/moe-protocols" inspect examples/wrapped_model.py:build "$@"
