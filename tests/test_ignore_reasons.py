"""Every type-checker exemption in the project says why, on its own line."""

from __future__ import annotations

import configparser
import re
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# tests/typing holds files whose ignores are the expected errors themselves.
CHECKED = ("moe_protocols", "benchmarks", "examples", "tests")
IGNORE = re.compile(r"#\s*(type|pyright):\s*ignore\b(?P<rest>.*)$")
WITH_RULE_AND_REASON = re.compile(r"^\[[^\]]+\]  # \S")


def _exemptions() -> list[tuple[str, int, str]]:
    """``(file, line, text after 'ignore')`` of every ignore comment, strings left out."""
    found = []
    for top in CHECKED:
        for path in sorted((ROOT / top).rglob("*.py")):
            if "typing" in path.relative_to(ROOT).parts[1:2]:
                continue
            with path.open("rb") as source:
                for token in tokenize.tokenize(source.readline):
                    if token.type != tokenize.COMMENT:
                        continue
                    match = IGNORE.search(token.string)
                    if match:
                        found.append((str(path.relative_to(ROOT)), token.start[0], match["rest"]))
    return found


def test_every_ignore_names_its_rule_and_gives_a_reason() -> None:
    found = _exemptions()
    assert len(found) > 10  # the scan sees the ignores that exist
    bare = [
        f"{path}:{number}" for path, number, rest in found if not WITH_RULE_AND_REASON.match(rest)
    ]
    assert bare == []


def test_mypy_checks_every_test_folder() -> None:
    """mypy.ini names test folders one by one: a new folder left out would go unchecked."""
    config = configparser.ConfigParser()
    config.read(ROOT / "mypy.ini")
    entries = {entry.strip() for entry in config["mypy"]["files"].split(",")}
    tests = ROOT / "tests"
    unchecked = [
        folder.relative_to(ROOT).as_posix()
        for folder in sorted({path.parent for path in tests.rglob("*.py")})
        if folder != tests
        and not any(
            part in ("typing", "vllm_tier", "__pycache__")
            for part in folder.relative_to(tests).parts
        )
        and not any(
            folder.relative_to(ROOT).as_posix().startswith(entry.rstrip("/"))
            for entry in entries
            if entry.startswith("tests/") and not entry.endswith(".py")
        )
    ]
    assert unchecked == [], f"add {unchecked} to files in mypy.ini"
