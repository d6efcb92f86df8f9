"""The README's Python examples run, in order, in one namespace (as a reader pastes them)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
NOT_RUN = "<!-- not run by tests/test_readme.py"
BLOCK = re.compile(r"(?P<before>[^\n]*)\n```python\n(?P<code>.*?)\n```", re.DOTALL)


def python_blocks() -> list[tuple[int, str, bool]]:
    """``(line, code, run)`` for every fenced Python block of the README."""
    text = README.read_text()
    blocks = []
    for match in BLOCK.finditer(text):
        line = text.count("\n", 0, match.start("code")) + 1
        preceding = text[: match.start("code")].rstrip().rsplit("\n\n", 1)[-1]
        blocks.append((line, match["code"], NOT_RUN not in preceding))
    return blocks


def test_every_readme_example_runs(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    from hf_models import qwen3_moe

    blocks = python_blocks()
    assert len(blocks) >= 5
    skipped = [line for line, _, run in blocks if not run]
    assert len(skipped) <= 1, f"README blocks at lines {skipped} are not run"
    # The names the prose says the reader already has.
    namespace: dict[str, object] = {
        "__name__": "readme",
        "hf_model": qwen3_moe(),
        "batches": [
            torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(s))
            for s in range(3)
        ],
    }
    for line, code, run in blocks:
        if run:
            exec(compile(code, f"README.md:{line}", "exec"), namespace)
    out = capsys.readouterr().out
    assert "get_language_model()" in out  # the trace printed by the first example
    assert "placement for 8 EP rank(s)" in out  # the plan printed by the last one


# ---------------------------------------------------------------- shell commands

SHELL_BLOCK = re.compile(r"```bash\n(?P<code>.*?)\n```", re.DOTALL)
ITSELF = "./scripts/check.sh"  # the command that runs this test suite


def quick_start_commands() -> list[str]:
    """The shell commands of "Quick start" and "After the quick start", comments stripped."""
    text = README.read_text()
    start = text.index("## Quick start")
    section = text[start : text.index("\n## ", start + 1)]
    commands = []
    for block in SHELL_BLOCK.finditer(section):
        for line in block["code"].splitlines():
            command = line.split("  #", 1)[0].strip()
            if command and not command.startswith("#"):
                commands.append(command)
    return commands


def test_the_quick_start_lists_the_two_commands_and_the_venv_commands() -> None:
    commands = quick_start_commands()
    assert commands[:2] == ["./scripts/demo.sh", ITSELF]
    assert ".venv/bin/moe-protocols --version" in commands
    assert ".venv/bin/python -m moe_protocols --help" in commands
    assert all(c.startswith((".venv/bin/", "./scripts/")) for c in commands)


@pytest.mark.parametrize("command", [c for c in quick_start_commands() if c != ITSELF])
def test_every_quick_start_command_runs(command: str, tmp_path: Path) -> None:
    import os
    import shlex
    import subprocess
    import sys

    # A checkout as a reader has it: the repository's top-level entries, with this
    # environment as its .venv (so setup.sh finds it set up and the demo does not reinstall).
    root = README.parent
    for entry in root.iterdir():
        if entry.name not in {".venv", ".git"} and not entry.name.startswith("."):
            (tmp_path / entry.name).symlink_to(entry)
    (tmp_path / ".venv").symlink_to(Path(sys.executable).parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MOE_PROTOCOLS_VENV": ".venv"}
    done = subprocess.run(
        shlex.split(command),
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
    assert "setup: installing" not in done.stdout, "the quick start reinstalled"
    assert "Traceback" not in done.stderr


# ---------------------------------------------------------------- where things live

PACKAGE = README.parent / "moe_protocols"


def _where_things_live() -> str:
    text = README.read_text()
    start = text.index("## Where things live")
    end = text.index("\n## ", start + 1)
    return text[start:end]


def test_where_things_live_names_every_module_and_package() -> None:
    """A module added or renamed without its line in the map fails here."""
    section = _where_things_live()
    missing = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if path.name == "__init__.py":
            if relative.parent != Path("."):
                name = f"{relative.parent.name}/"
                if f"`{name}" not in section and f"`{relative.parent.as_posix()}/" not in section:
                    missing.append(relative.parent.as_posix() + "/")
            continue
        if f"`{path.name}`" not in section and f"`{relative.as_posix()}`" not in section:
            missing.append(relative.as_posix())
    assert missing == [], f"README 'Where things live' does not list {missing}"
    assert len(section.splitlines()) < 80  # a map, not a second reference
