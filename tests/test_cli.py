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
    ["no/such/file.py:build", "moe_protocols.models:no_such_factory", "json:loads"],
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
    assert "Self-test (verify_eplb_integration): OK: every check holds" in text
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


# ---------------------------------------------------------------- verify


def test_verify_of_the_tiny_vlm_exits_0_and_prints_every_check() -> None:
    code, text = _run("verify", "moe_protocols.models:tiny_vlm")
    assert code == 0, text
    assert "EPLB integration check of TinyVLMForConditionalGeneration" in text
    assert "outputs compared: bit-exact" in text
    assert "PASS  move-permute:outputs" in text
    assert "SKIP  move-replicas: no redundant slots" in text
    assert text.rstrip().endswith("OK: every check holds (2 skipped)")


def _factory(tmp_path: Path, body: str) -> str:
    path = tmp_path / "factory.py"
    path.write_text("import torch\nfrom test_verify import VocabLM\n" + body)
    return str(path)


def test_verify_of_a_buggy_model_exits_1_and_names_the_layer(tmp_path: Path) -> None:
    path = _factory(tmp_path, "def build():\n    return VocabLM(silent_layers=(0,))\n")
    code, text = _run("verify", f"{path}:build")
    assert code == 1
    assert "FAIL  load-counts: MoE layer 0 (layers.0): recorded no load" in text
    assert "fix: keep row moe_layer_idx" in text
    assert "FAILED: 1 of" in text


def test_verify_of_a_dense_model_exits_1_with_the_trace(tmp_path: Path) -> None:
    path = _factory(tmp_path, "def build():\n    return torch.nn.Linear(2, 2)\n")
    code, text = _run("verify", f"{path}:build")
    assert code == 1
    assert "FAIL  resolve" in text
    assert "get_language_model()" in text


def test_verify_feeds_the_inputs_factory(tmp_path: Path) -> None:
    path = _factory(tmp_path, "def ids():\n    return torch.zeros(1, 4, dtype=torch.long)\n")
    code, text = _run("verify", "moe_protocols.models:tiny_moe", "--inputs", f"{path}:ids")
    assert code == 0, text
    assert "inputs: input_ids [1, 4] (given)" in text
    assert "4 tokens x top_k 2 = 8" in text


@pytest.mark.parametrize("target", ["no_colon", ":build", "moe_protocols.models:"])
def test_verify_of_a_malformed_target_is_a_usage_error(
    target: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run("verify", target)
    assert exit_info.value.code == 2
    assert "expected MODULE:ATTR" in capsys.readouterr().err


def test_verify_with_a_malformed_inputs_target_is_a_usage_error() -> None:
    with pytest.raises(SystemExit) as exit_info:
        _run("verify", "moe_protocols.models:tiny_moe", "--inputs", "ids")
    assert exit_info.value.code == 2


@pytest.mark.parametrize(
    "argv",
    [
        ["no_such_module:build"],
        ["no/such/file.py:build"],
        ["moe_protocols.models:no_such_factory"],
        ["moe_protocols.models:tiny_moe", "--inputs", "no_such_module:ids"],
    ],
)
def test_verify_of_an_unimportable_model_or_inputs_exits_3(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _run("verify", *argv)
    assert code == 3
    assert "moe-protocols verify:" in capsys.readouterr().err


@pytest.mark.parametrize("option", [["--seed", str(2**64)]])
def test_verify_with_out_of_range_options_exits_2(
    option: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    code, _ = _run("verify", "moe_protocols.models:tiny_vlm", *option)
    assert code == 2
    assert "must be an int in [0," in capsys.readouterr().err


def test_verify_with_inputs_of_the_wrong_kind_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run("verify", "moe_protocols.models:tiny_moe", "--inputs", "math:pi")
    assert code == 2
    assert "gave a float" in capsys.readouterr().err


def test_verify_of_a_model_without_vocabulary_asks_for_inputs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    body = "from author_models import AuthorMoELM\ndef build():\n    return AuthorMoELM()\n"
    code, _ = _run("verify", f"{_factory(tmp_path, body)}:build")
    assert code == 2
    assert "--inputs MODULE:ATTR" in capsys.readouterr().err


@pytest.mark.parametrize("argv", [["inspect", "no_colon"], ["inspect", ":build"]])
def test_inspect_of_a_malformed_target_is_a_usage_error(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "MODULE:ATTR" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["inspect", "verify"])
def test_a_negative_max_depth_is_a_usage_error_not_a_traceback(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main([command, "moe_protocols.models:tiny_vlm", "--max-depth", "-1"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "must be an int >= 0, got '-1'" in err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("source", "expected"),
    [
        ("def build():\n    raise SystemExit(0)\n", "it called sys.exit(0)"),
        ("import sys\nsys.exit(0)\n", "it called sys.exit(0)"),
        (
            "def __getattr__(name):\n    raise RuntimeError('lazy import broke')\n",
            "RuntimeError: lazy import broke",
        ),
    ],
)
def test_user_code_that_exits_or_raises_exits_3_with_one_line(
    tmp_path: Path, source: str, expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    factory = tmp_path / "user_code.py"
    factory.write_text(source)
    code, _ = _run("inspect", f"{factory}:build")
    assert code == 3
    err = capsys.readouterr().err
    assert expected in err
    assert "Traceback" not in err
    code, _ = _run("--traceback", "inspect", f"{factory}:build")
    assert code == 3
    assert "Traceback" in capsys.readouterr().err


def test_a_bug_in_a_command_exits_3_and_shows_the_traceback_only_when_asked(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from moe_protocols.adapters import MoEView

    def broken(*args: object, **kwargs: object) -> None:
        raise ZeroDivisionError("a bug")

    monkeypatch.setattr(MoEView, "resolve", broken)
    code, _ = _run("inspect", "moe_protocols.models:tiny_vlm")
    assert code == 3
    err = capsys.readouterr().err
    assert "unexpected error: ZeroDivisionError: a bug (rerun with --traceback" in err
    assert "Traceback" not in err
    code, _ = _run("--traceback", "inspect", "moe_protocols.models:tiny_vlm")
    assert code == 3
    assert "Traceback" in capsys.readouterr().err


def test_demo_plot_into_a_missing_folder_is_refused_before_the_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as info:
        main(["demo", "--plot", str(tmp_path / "missing" / "load.png")])
    assert info.value.code == 2
    assert "no folder" in capsys.readouterr().err
