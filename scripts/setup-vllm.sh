#!/usr/bin/env bash
# Create (or refresh) the real-vLLM tier: a second virtual environment with
# vLLM 0.33.0 itself, so the tests marked `vllm` (and the typing proofs against
# vLLM's own source) run against the host, not against our stubs.
#
# vLLM is installed with --no-deps: its declared requirements pull torch 2.14
# and the CUDA stack (~8 GB). requirements-vllm.txt pins the ~50 packages its
# MoE interfaces, EPLB state and policy, config, plugin loader and V1 runner
# module need to import on CPU, each with the reason. Torch is the CPU build
# pinned by constraints.txt, as in the main venv. Idempotent: a stamp records
# what was installed, so a second run with nothing changed takes a second.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MOE_PROTOCOLS_VLLM_VENV:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup-vllm: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.moe-protocols-setup-vllm"
want="$(cat pyproject.toml constraints.txt requirements-vllm.txt scripts/setup-vllm.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] \
    && "$VENV/bin/python" -c "import importlib.util as u, sys; sys.exit(not (u.find_spec('vllm') and u.find_spec('moe_protocols')))"; then
    exit 0
fi

pip=("$VENV/bin/python" -m pip --disable-pip-version-check)
start=$SECONDS
echo "setup-vllm: installing vLLM 0.33 (no deps) and its CPU import set into $VENV"
"${pip[@]}" install --quiet --upgrade pip
# 1. torch first, from constraints.txt, so nothing below can pull another build.
"${pip[@]}" install --quiet -c constraints.txt torch
# 2. vLLM and the pinned import set, exactly as listed: --no-deps keeps pip from
#    resolving vLLM's own requirements (torch 2.14, CUDA wheels).
"${pip[@]}" install --quiet --no-deps -r requirements-vllm.txt
# 3. moe-protocols and its dev tools, held to the versions already installed.
"${pip[@]}" install --quiet -c constraints.txt -c requirements-vllm.txt -e ".[dev]"
echo "$want" > "$stamp"
echo "setup-vllm: done in $((SECONDS - start)) s ($(du -sh "$VENV" | cut -f1) on disk)"
