"""The ``moe-protocols`` command: inspect and demo, their output and exit codes."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, cast

import pytest

from moe_protocols.cli import main

ROOT = Path(__file__).resolve().parents[2]
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
    # the compiled wrapper's own step was taken too; the trace says what it reached
    assert "not checked (the walk ends at the first MoE model): model._orig_mod (TinyVLM" in text


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


def test_demo_figure_shows_every_step_and_legends_that_match_the_bars() -> None:
    import io
    import re

    import matplotlib.pyplot as plt

    from moe_protocols.cli._demo_plot import demo_figure
    from moe_protocols.cli._demo_run import DemoOptions, run_demo

    report = run_demo(DemoOptions(steps=12, step_interval=5, window_size=4), io.StringIO())
    fig = demo_figure(report)
    try:
        steps_axes, ranks_axes = fig.axes
        line = steps_axes.get_lines()[0]
        # casts: matplotlib types line data as ArrayLike and legend handles as Artist.
        ydata = cast("Sequence[float]", line.get_ydata())
        assert list(ydata) == pytest.approx(list(report.step_balancedness))
        assert len(report.step_balancedness) == 12
        marked = [
            float(cast("Sequence[float]", m.get_xdata())[0]) for m in steps_axes.get_lines()[1:]
        ]
        assert marked == [r.step for r in report.rearrangements] == [5, 10]
        handles, labels = ranks_axes.get_legend_handles_labels()
        bars = [h for h, label in zip(handles, labels, strict=True) if "window" in label]
        assert len(bars) == 2  # both windows are in the legend, the ideal line too
        assert any("ideal" in label for label in labels)
        for container, label in zip(bars, [lb for lb in labels if "window" in lb], strict=True):
            heights = [patch.get_height() for patch in cast("Iterable[Any]", container)]
            shown = float(re.findall(r"balancedness (\d\.\d\d)", label)[0])
            assert shown == pytest.approx(sum(heights) / len(heights) / max(heights), abs=0.005)
    finally:
        plt.close(fig)


def test_demo_rejects_invalid_options_with_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run("demo", "--ranks", "3")  # 20 slots do not split over 3 ranks
    assert code == 2
    assert "3" in capsys.readouterr().err


def test_demo_rejects_an_unknown_policy(capsys: pytest.CaptureFixture[str]) -> None:
    code, _ = _run("demo", "--policy", "nope")
    assert code == 2
    assert "deepseek" in capsys.readouterr().err  # lists the known policies


def test_console_script_help_version_and_python_m() -> None:
    import moe_protocols

    for argv in (["-m", "moe_protocols.cli", "--help"], ["-m", "moe_protocols", "--help"]):
        done = subprocess.run([sys.executable, *argv], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        for command in ("inspect", "verify", "demo", "profile"):
            assert command in done.stdout
    assert "usage: python -m moe_protocols" in done.stdout
    version = subprocess.run(
        [sys.executable, "-m", "moe_protocols", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert version.returncode == 0
    assert version.stdout.split() == ["python", "-m", "moe_protocols", moe_protocols.__version__]


def test_help_does_not_import_torch() -> None:
    # What keeps `moe-protocols --help` fast: neither the parser nor the package imports torch.
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, contextlib, io\n"
            "from moe_protocols.cli import main\n"
            "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
            "    main(['profile', '--help'])\n"
            "print('torch' in sys.modules)",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_every_public_name_is_imported_lazily_from_the_module_that_defines_it() -> None:
    # The package imports its public names on first use (for a fast --help): the lazy table,
    # __all__ and what each name resolves to must agree, or a name would be missing at run time.
    import importlib

    import moe_protocols

    exports = moe_protocols._EXPORTS
    assert sorted(exports) == sorted(n for n in moe_protocols.__all__ if n != "__version__")
    for name, module in exports.items():
        assert getattr(moe_protocols, name) is getattr(importlib.import_module(module), name)
    with pytest.raises(AttributeError, match="no attribute 'Misspelt'"):
        getattr(moe_protocols, "Misspelt")  # noqa: B009  (a name the package does not have)


_BAD_USAGE = [
    # (argv, what the message must name)
    (["demo", "--steps", "x"], "argument --steps: must be an int >= 1, got 'x'"),
    (["demo", "--steps", "0"], "argument --steps: must be an int >= 1"),
    (["demo", "--experts", "1"], "argument --experts: must be an int >= 2"),
    (["demo", "--ranks", "0"], "argument --ranks: must be an int >= 1"),
    (["demo", "--redundant", "-1"], "argument --redundant: must be an int >= 0"),
    (["demo", "--zipf", "-0.5"], "argument --zipf: must be a number >= 0"),
    (["demo", "--zipf", "nan"], "argument --zipf: must be a number >= 0"),
    (["demo", "--threads", "0"], "argument --threads: must be an int >= 1"),
    (["demo", "--plot", "load.txt"], "argument --plot: 'load.txt' must end in .png"),
    (["demo", "--ranks", "3"], "--experts 16 + --redundant 4 = 20 slots do not split"),
    (["demo", "--policy", "nope"], "--policy 'nope' is not a registered policy"),
    (["profile", "--ranks", "0"], "argument --ranks: must be an int >= 1"),
    (["profile", "--save", "plan.pkl"], "argument --save: 'plan.pkl' must end in .json"),
    (["profile", "--tokens", "0"], "argument --tokens: must be an int >= 1"),
    (["profile", "--groups", "0"], "argument --groups: must be an int >= 1"),
    (["profile", "--vocab-size", "-3"], "argument --vocab-size: must be an int >= 1"),
    (["profile", "--ranks", "4", "--nodes", "3"], "--ranks 4 is not a multiple of --nodes 3"),
    (["profile", "--policy", "nope"], "--policy 'nope' is not a registered policy"),
    (["profile", "nomodule"], "expected MODULE:ATTR"),
    (["inspect", "moe_protocols.models:tiny_vlm", "--max-depth", "-1"], "--max-depth"),
]


@pytest.mark.parametrize(("argv", "message"), _BAD_USAGE)
def test_bad_usage_exits_2_naming_the_flag_before_any_model_is_built(
    argv: list[str],
    message: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import moe_protocols.cli._demo_run as demo
    import moe_protocols.cli._profile as cli_profile

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model was built before the options were checked")

    monkeypatch.setattr(demo, "run_demo", must_not_run)
    monkeypatch.setattr(cli_profile, "_build", must_not_run)
    code: str | int | None
    try:
        code = main(argv)
    except SystemExit as exc:  # argparse's own usage errors
        code = exc.code
    assert code == 2
    err = capsys.readouterr().err
    assert message in err
    assert "Traceback" not in err


def test_profile_checks_the_groups_against_the_model_before_recording(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import moe_protocols.profiling as profiling

    def must_not_run(*args: object, **kwargs: object) -> None:
        raise AssertionError("batches were recorded before the options were checked")

    monkeypatch.setattr(profiling, "record_expert_load", must_not_run)
    assert main(["profile", "moe_protocols.models:tiny_vlm", "--groups", "3"]) == 2
    assert "--groups 3 does not divide the model's 8 experts" in capsys.readouterr().err
    assert main(["profile", "moe_protocols.models:tiny_vlm", "--redundant", "1"]) == 2
    assert "8 experts + --redundant 1 = 9 slots" in capsys.readouterr().err


def test_profile_of_the_tiny_vlm_reads_the_vocabulary_of_its_language_model(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["profile", "moe_protocols.models:tiny_vlm", "--tokens", "16"]) == 0
    captured = capsys.readouterr()
    assert "MoE model at: model.get_language_model()" in captured.out
    assert "recording batch 4/4" in captured.err


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
