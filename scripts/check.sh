#!/usr/bin/env bash
# Set up the environments, then run every check: ruff (lint + format),
# mypy --strict (package, stubs, typing tests, tests, benchmarks, examples),
# pyright strict (what [tool.pyright] includes), the package as a user outside
# the repo sees it (both checkers, verifytypes 100 %), the pytest suite, and the
# real-vLLM tier (tests marked `vllm`, run with .venv-vllm's interpreter; a
# missing tier fails here instead of skipping).
set -euo pipefail
cd "$(dirname "$0")/.."
MOE_PROTOCOLS_EXTRAS="${MOE_PROTOCOLS_EXTRAS:-dev,hf}" ./scripts/setup.sh
./scripts/setup-vllm.sh
VENV="${MOE_PROTOCOLS_VENV:-.venv}"
VLLM_VENV="${MOE_PROTOCOLS_VLLM_VENV:-.venv-vllm}"

echo "== ruff"
"$VENV/bin/ruff" check .
"$VENV/bin/ruff" format --check .
echo "== mypy --strict"
"$VENV/bin/mypy"
echo "== pyright strict"
"$VENV/bin/pyright" -p pyproject.toml  # this project's config, not one a parent folder holds
echo "== typed from outside the repo"
./scripts/check-typing-visible.sh
echo "== pytest"
"$VENV/bin/pytest" -m "not vllm" "$@"
echo "== pytest: real-vLLM tier ($VLLM_VENV)"
MOE_PROTOCOLS_REQUIRE_VLLM=1 "$VLLM_VENV/bin/pytest" -m vllm -p no:cacheprovider
