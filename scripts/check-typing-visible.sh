#!/usr/bin/env bash
# What a user of the installed package sees: a script outside the repository
# type-checks moe_protocols as typed (not missing, not Any) under mypy and
# pyright, and `pyright --verifytypes` finds the whole public API typed (100 %).
# Needs the environment scripts/setup.sh makes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="$(cd "${MOE_PROTOCOLS_VENV:-.venv}" && pwd)"

outside="$(mktemp -d)"
trap 'rm -rf "$outside"' EXIT
# Empty configs of its own: the checkers would otherwise take one from a parent folder.
echo '[mypy]' > "$outside/mypy.ini"
echo '{}' > "$outside/pyrightconfig.json"
cat > "$outside/user_script.py" <<'PY'
import moe_protocols

reveal_type(moe_protocols.MoEView)
PY

fail=0
mypy_out="$(cd "$outside" && "$VENV/bin/mypy" --strict --no-incremental user_script.py 2>&1 || true)"
if ! grep -qE 'Revealed type is "def .*-> moe_protocols\.adapters\._view\.MoEView(\[.*\])?"' <<<"$mypy_out"; then
    echo "check-typing-visible: mypy outside the repo does not see moe_protocols.MoEView:"
    echo "$mypy_out"
    fail=1
fi
# The pyright wrapper finds the interpreter through the activated environment.
pyright_env=(env "PATH=$VENV/bin:$PATH" "VIRTUAL_ENV=$VENV")
pyright_out="$(cd "$outside" && "${pyright_env[@]}" pyright user_script.py 2>&1 || true)"
if ! grep -qE 'Type of "moe_protocols.MoEView" is "type\[MoEView(\[.*\])?\]"' <<<"$pyright_out"; then
    echo "check-typing-visible: pyright outside the repo does not see moe_protocols.MoEView:"
    echo "$pyright_out"
    fail=1
fi
verify_out="$(cd "$outside" && "${pyright_env[@]}" pyright --verifytypes moe_protocols \
    --ignoreexternal 2>&1 || true)"
if ! grep -q '^Type completeness score: 100%$' <<<"$verify_out"; then
    echo "check-typing-visible: pyright --verifytypes moe_protocols is below 100 %:"
    grep -E 'error:|^moe_protocols|score' <<<"$verify_out" || echo "$verify_out"
    fail=1
fi
if [ "$fail" = 0 ]; then
    echo "check-typing-visible: mypy and pyright see moe_protocols from outside the repo;" \
        "verifytypes 100 %"
fi
exit "$fail"
