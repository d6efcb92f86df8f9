#!/usr/bin/env bash
# Set up the environment, then run every check: ruff (lint + format),
# mypy --strict (package, stubs, typing tests, tests, benchmarks, examples),
# pyright strict (what [tool.pyright] includes), the package as a user outside
# the repo sees it (both checkers, verifytypes 100 %) and the pytest suite.
set -euo pipefail
cd "$(dirname "$0")/.."
MOE_PROTOCOLS_EXTRAS="${MOE_PROTOCOLS_EXTRAS:-dev,hf}" ./scripts/setup.sh
VENV="${MOE_PROTOCOLS_VENV:-.venv}"

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy --strict"
"$VENV/bin/mypy"
echo "== pyright strict"
"$VENV/bin/pyright"
echo "== typed from outside the repo"
./scripts/check-typing-visible.sh
echo "== pytest"
"$VENV/bin/pytest" "$@"
