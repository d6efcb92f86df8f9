"""Typing is tested, not assumed: mypy --strict must accept tests/typing/accept
and reject every marked line of tests/typing/reject with the expected error code.

Marker syntax in reject files: a trailing ``# E: <error-code>`` on a line says
mypy must report an error with that code on that line; a comment line
``# N: <text>`` says some note or error of that file must contain ``<text>``
(mypy names the missing or incompatible protocol member in notes). Any error
on an unmarked line fails the test, so a reject file cannot pass by accident.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TYPING = ROOT / "tests" / "typing"
ACCEPT = sorted((TYPING / "accept").glob("*.py"))
REJECT = sorted((TYPING / "reject").glob("*.py"))
_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): (?P<severity>error|note): (?P<text>.*)$")


def _run_mypy(paths: list[Path]) -> list[tuple[str, int, str, str]]:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(ROOT / "mypy.ini"),
            "--show-error-codes",
            "--no-error-summary",
            "--no-pretty",
            *map(str, paths),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode not in (0, 1):
        pytest.fail(f"mypy crashed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    rows = []
    for raw in proc.stdout.splitlines():
        match = _LINE.match(raw)
        if match:
            path = str(Path(match["path"]).resolve())
            rows.append((path, int(match["line"]), match["severity"], match["text"]))
    return rows


@pytest.fixture(scope="module")
def mypy_output() -> list[tuple[str, int, str, str]]:
    return _run_mypy(ACCEPT + REJECT)


def test_typing_files_exist() -> None:
    assert ACCEPT, "no accept files"
    assert REJECT, "no reject files"


@pytest.mark.parametrize("path", ACCEPT, ids=lambda p: p.name)
def test_mypy_accepts(path: Path, mypy_output: list[tuple[str, int, str, str]]) -> None:
    errors = [row for row in mypy_output if row[0] == str(path) and row[2] == "error"]
    assert errors == [], f"mypy rejected {path.name}: {errors}"


def _expectations(path: Path) -> tuple[dict[int, str], list[str]]:
    errors: dict[int, str] = {}
    notes: list[str] = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.lstrip().startswith("# N:"):
            notes.append(line.split("# N:", 1)[1].strip())
        elif "# E:" in line:
            errors[number] = line.split("# E:", 1)[1].strip()
    return errors, notes


@pytest.mark.parametrize("path", REJECT, ids=lambda p: p.name)
def test_mypy_rejects_marked_lines(
    path: Path, mypy_output: list[tuple[str, int, str, str]]
) -> None:
    expected, expected_notes = _expectations(path)
    assert expected, f"{path.name} marks no line with '# E:'"
    rows = [row for row in mypy_output if row[0] == str(path)]
    reported: dict[int, list[str]] = {}
    for _, line, severity, text in rows:
        if severity == "error":
            reported.setdefault(line, []).append(text)
    for line, code in expected.items():
        texts = reported.get(line, [])
        assert any(text.endswith(f"[{code}]") for text in texts), (
            f"{path.name}:{line}: expected a [{code}] error, mypy said {texts or 'nothing'}"
        )
    unexpected = {line: texts for line, texts in reported.items() if line not in expected}
    assert unexpected == {}, f"{path.name}: errors on unmarked lines: {unexpected}"
    messages = " | ".join(text for _, _, _, text in rows)
    for note in expected_notes:
        assert note in messages, f"{path.name}: expected mypy to mention {note!r}: {messages}"
