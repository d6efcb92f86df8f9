"""Every type-checker exemption in the project says why, on its own line."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# tests/typing holds files whose ignores are the expected errors themselves.
CHECKED = ("moe_protocols", "benchmarks", "examples", "tests")
IGNORE = re.compile(r"#\s*(type|pyright):\s*ignore\b(?P<rest>.*)$")
WITH_RULE_AND_REASON = re.compile(r"^\[[^\]]+\]  # \S")


def _exemptions() -> list[tuple[str, int, str]]:
    found = []
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "typing" in path.relative_to(ROOT).parts[1:2]:
                continue
            for number, line in enumerate(path.read_text().splitlines(), start=1):
                match = IGNORE.search(line)
                if match and not line.lstrip().startswith(("IGNORE", "#")):
                    found.append((str(path.relative_to(ROOT)), number, match.group("rest")))
    return found


def test_every_ignore_names_its_rule_and_gives_a_reason() -> None:
    found = _exemptions()
    assert len(found) > 10  # the scan sees the ignores that exist
    bare = [
        f"{path}:{number}" for path, number, rest in found if not WITH_RULE_AND_REASON.match(rest)
    ]
    assert bare == []
