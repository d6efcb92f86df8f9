"""The ``moe-protocols`` command: inspect and demo, their output and exit codes."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from moe_protocols.cli import main

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = str(ROOT / "examples" / "wrapped_model.py") + ":build"


def _run(*argv: str) -> tuple[int, str]:
    out = io.StringIO()
    code = main(list(argv), out=out)
    return code, out.getvalue()


def test_inspect_prints_the_trace_through_compile_and_vlm_wrappers() -> None:
    code, text = _run("inspect", EXAMPLE)
    assert code == 0
    assert "model (OptimizedModule): not MixtureOfExperts" in text
    assert "-> model.get_language_model() (TinyMoEForCausalLM): MixtureOfExperts" in text
    assert "satisfies MixtureOfExperts (3 MoE layers)" in text


def test_inspect_of_a_dense_model_exits_1_and_explains(tmp_path: Path) -> None:
    factory = tmp_path / "dense.py"
    factory.write_text("import torch\ndef build():\n    return torch.nn.Linear(2, 2)\n")
    code, text = _run("inspect", f"{factory}:build")
    assert code == 1
    assert "Linear" in text
    assert "get_language_model()" in text  # names the steps it tried


@pytest.mark.parametrize(
    "target",
    ["no_colon", "no/such/file.py:build", "moe_protocols.models:no_such_factory", "json:loads"],
)
def test_inspect_of_an_unloadable_target_exits_3(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _run("inspect", target)
    assert code == 3
    assert "moe-protocols inspect:" in capsys.readouterr().err


def test_demo_rebalances_and_keeps_outputs_identical(tmp_path: Path) -> None:
    plot = tmp_path / "load.png"
    code, text = _run("demo", "--steps", "24", "--plot", str(plot))
    assert code == 0
    assert "-> model.get_language_model() (TinyMoEForCausalLM)" in text
    assert text.count("rearranged: balancedness") == 2
    assert "bit-identical before and after" in text
    assert "24/24 steps" in text
    assert plot.read_bytes().startswith(b"\x89PNG")


def test_demo_rejects_invalid_options_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run("demo", "--ranks", "3")  # 20 slots do not split over 3 ranks
    assert code == 2
    assert "3" in capsys.readouterr().err


def test_demo_rejects_an_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run("demo", "--policy", "nope")
    assert code == 2
    assert "deepseek" in capsys.readouterr().err  # lists the known policies


def test_console_script_help_and_usage_errors() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "moe_protocols.cli", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0
    for command in ("inspect", "demo", "profile"):
        assert command in done.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "moe_protocols.cli", "demo", "--steps", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert bad.returncode == 2
    assert "invalid int value" in bad.stderr
