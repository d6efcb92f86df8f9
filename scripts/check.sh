#!/usr/bin/env bash
# Set up the environment, then run every check: ruff (lint + format),
# mypy --strict (package, stubs, typing tests, benchmarks) and the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
MOE_PROTOCOLS_EXTRAS="${MOE_PROTOCOLS_EXTRAS:-dev,hf}" ./scripts/setup.sh
VENV="${MOE_PROTOCOLS_VENV:-.venv}"

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy --strict"
"$VENV/bin/mypy"
echo "== pytest"
"$VENV/bin/pytest" "$@"
