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
want="$(cat pyproject.toml constraints.txt | sha256sum | cut -d' ' -f1) extras=$EXTRAS editable=$EDITABLE_MODE"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && "$VENV/bin/python" -c "import moe_protocols" 2>/dev/null; then
    exit 0
fi

echo "setup: installing moe-protocols[$EXTRAS] into $VENV (torch pinned by constraints.txt)"
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade pip
"$VENV/bin/python" -m pip install --quiet --disable-pip-version-check \
    -c constraints.txt --config-settings editable_mode="$EDITABLE_MODE" -e ".[$EXTRAS]"
echo "$want" > "$stamp"
