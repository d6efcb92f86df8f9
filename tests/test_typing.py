"""Typing is tested, not assumed, under two checkers: mypy --strict and pyright strict.

- ``tests/typing/accept/*.py`` must type-check cleanly, ``assert_type`` pinning
  what the public API returns.
- ``tests/typing/reject/*.py`` hold the misuse both checkers must reject, one
  case per line, marked with ``# type: ignore[code]`` (mypy's error code) and
  ``# pyright: ignore[rule]`` (pyright's rule). Both checkers run with unused
  ignores as errors (mypy ``--warn-unused-ignores``, part of ``strict``;
  pyright ``reportUnnecessaryTypeIgnoreComment``, with
  ``enableTypeIgnoreComments`` off so mypy's comments do not hide pyright's
  errors): a marked line that stops being an error fails the run, an error of
  another code is reported, and an unmarked error fails too. A line with only
  one of the two comments is accepted by the other checker on purpose (a
  renamed parameter: pyright rejects it, mypy does not).
- Both directories are checked against ``stubs/vllm`` here, and against vLLM
  0.33's own source, with no project stubs on any path, in the vllm tier
  (``-m vllm``), together with ``tests/typing/accept_vllm`` (vLLM's model
  classes, which the stubs do not describe).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
TYPING = ROOT / "tests" / "typing"
ACCEPT = sorted((TYPING / "accept").glob("*.py"))
ACCEPT_VLLM = sorted((TYPING / "accept_vllm").glob("*.py"))
REJECT = sorted((TYPING / "reject").glob("*.py"))
_MYPY_LINE = re.compile(r"^(?P<path>[^:]+):(?P<line>\d+): error: (?P<text>.*)$")
_MYPY_IGNORE = re.compile(r"# type: ignore(?P<codes>\[[^\]]*\])?")
_PYRIGHT_IGNORE = re.compile(r"# pyright: ignore(?P<rules>\[[^\]]*\])?")

# Unneeded ignores and an unmarked error: what each checker must report here,
# or the harness could pass whatever the typing files said.
_SELF_TEST = """\
x: int = 1  # type: ignore[assignment]
y: int = 2  # pyright: ignore[reportAssignmentType]
z: int = "three"
"""


class Diagnostic(NamedTuple):
    path: str
    line: int
    text: str

    def __str__(self) -> str:
        return f"{Path(self.path).name}:{self.line}: {self.text}"


def _mypy(paths: list[Path], *, real_vllm: bool, tmp: Path) -> list[Diagnostic]:
    if real_vllm:
        config = tmp / "mypy.ini"  # no mypy_path: vLLM is read from its own source
        config.write_text("[mypy]\nstrict = True\npython_version = 3.11\nwarn_unreachable = True\n")
    else:
        config = ROOT / "mypy.ini"  # mypy_path = stubs
    cache = ROOT / ".mypy_cache" / ("typing-vllm" if real_vllm else "typing-stubs")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(config),
            "--cache-dir",
            str(cache),
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
    out = []
    for raw in proc.stdout.splitlines():
        match = _MYPY_LINE.match(raw)
        if match:
            path = str((ROOT / match["path"]).resolve())
            out.append(Diagnostic(path, int(match["line"]), match["text"]))
    return out


def _pyright(paths: list[Path], *, real_vllm: bool, tmp: Path) -> list[Diagnostic]:
    pyright = Path(sys.executable).parent / "pyright"
    if not pyright.exists():
        pytest.fail(f"pyright is not installed in {sys.prefix} (it is in the dev extra)")
    empty = tmp / "no-stubs"
    empty.mkdir(exist_ok=True)
    config = tmp / "pyrightconfig.json"
    settings = {
        "typeCheckingMode": "strict",
        "pythonVersion": "3.11",
        "extraPaths": [str(ROOT)],
        "stubPath": str(empty if real_vllm else ROOT / "stubs"),
        "enableTypeIgnoreComments": False,
        "reportUnnecessaryTypeIgnoreComment": "error",
        # With the stubs only, vLLM has no source; that is the point of the stubs.
        "reportMissingModuleSource": "error" if real_vllm else "none",
    }
    config.write_text(json.dumps(settings))
    proc = subprocess.run(
        [
            str(pyright),
            "-p",
            str(config),
            "--pythonpath",
            sys.executable,
            "--outputjson",
            *map(str, paths),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright crashed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return [
        Diagnostic(
            str(Path(d["file"]).resolve()),
            d["range"]["start"]["line"] + 1,
            f"{d['message']} ({d.get('rule', 'no rule')})",
        )
        for d in report["generalDiagnostics"]
        if d["severity"] == "error"
    ]


def _check_both(paths: list[Path], *, real_vllm: bool, tmp: Path) -> None:
    self_test = tmp / "harness_self_test.py"
    self_test.write_text(_SELF_TEST)
    for name, run in (("mypy", _mypy), ("pyright", _pyright)):
        found = run([*paths, self_test], real_vllm=real_vllm, tmp=tmp)
        # By name: mypy's cache may report a file it has seen before (same module,
        # same content) under the path of an earlier temporary directory.
        own = sorted(d.line for d in found if Path(d.path).name == self_test.name)
        # mypy honours only its own comment, pyright only its own: each must
        # flag one unneeded ignore and the unmarked error on line 3.
        assert own == [1, 3] if name == "mypy" else own == [2, 3], (
            f"{name} does not report unneeded ignores and unmarked errors: {found}"
        )
        rest = [str(d) for d in found if Path(d.path).name != self_test.name]
        assert rest == [], f"{name} ({'vLLM source' if real_vllm else 'stubs'}):\n" + "\n".join(
            rest
        )


def test_typing_files_exist_and_every_reject_line_pins_a_code() -> None:
    assert ACCEPT, "no accept files"
    assert ACCEPT_VLLM, "no accept files for the real vLLM"
    assert REJECT, "no reject files"
    for path in REJECT:
        marked = 0
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            for match in _MYPY_IGNORE.finditer(line):
                assert match["codes"], f"{path.name}:{number}: a bare type: ignore pins no code"
                marked += 1
            for match in _PYRIGHT_IGNORE.finditer(line):
                assert match["rules"], f"{path.name}:{number}: a bare pyright ignore pins no rule"
                marked += 1
        assert marked, f"{path.name} marks no line"


def test_mypy_and_pyright_agree_with_the_typing_files_against_the_stubs(tmp_path: Path) -> None:
    _check_both(ACCEPT + REJECT, real_vllm=False, tmp=tmp_path)


@pytest.mark.vllm
def test_mypy_and_pyright_agree_with_the_typing_files_against_the_real_vllm(
    tmp_path: Path,
) -> None:
    _check_both(ACCEPT + ACCEPT_VLLM + REJECT, real_vllm=True, tmp=tmp_path)
