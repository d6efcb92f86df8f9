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
