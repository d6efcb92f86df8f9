#!/usr/bin/env bash
# Create (or refresh) the project's virtual environment. Idempotent: a stamp
# records what was installed, so a second run with nothing changed takes a
# second. The CPU build of torch is pinned by constraints.txt, not by the
# package metadata (which keeps a range).
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${MOE_PROTOCOLS_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"
EXTRAS="${MOE_PROTOCOLS_EXTRAS:-dev}"

if [ ! -x "$VENV/bin/python" ]; then
    echo "setup: creating $VENV with $("$PYTHON" --version)"
    "$PYTHON" -m venv "$VENV"
fi

stamp="$VENV/.moe-protocols-setup"
# editable_mode=compat installs a plain .pth path entry instead of setuptools'
# default import hook: mypy and pyright cannot follow the hook, so without it a
# script outside the repo would type-check moe_protocols as missing (Any).
EDITABLE_MODE=compat
hash="$({ cat pyproject.toml constraints.txt; echo "editable_mode=$EDITABLE_MODE"; } | sha256sum | cut -d' ' -f1)"
# Extras accumulate: a venv set up for the checks (dev,hf) also serves the demo (dev), so
# alternating demo.sh and check.sh installs once. The stamp is "<hash> <extra,extra,...>".
installed=""
if [ -f "$stamp" ]; then
    read -r stamp_hash installed < "$stamp" || true
    installed="${installed#extras=}"  # the stamp format before extras accumulated
    [ "$stamp_hash" = "$hash" ] || installed=""
fi
union="$(printf '%s\n' ${installed//,/ } ${EXTRAS//,/ } | sort -u | paste -sd, -)"
# find_spec, not import: the no-op check must not pay for importing torch.
if [ "$union" = "$installed" ] && "$VENV/bin/python" -c \
    "import importlib.util, sys; sys.exit(importlib.util.find_spec('moe_protocols') is None)" \
    2>/dev/null; then
    exit 0
fi

echo "setup: installing moe-protocols[$union] into $VENV (torch pinned by constraints.txt)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt --config-settings editable_mode="$EDITABLE_MODE" -e ".[$union]"
echo "$hash $union" > "$stamp"
