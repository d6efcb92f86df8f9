"""stubs/vllm agree with vLLM 0.33: stubtest for names and signatures, and a comparison
of every annotation (the part stubtest skips). The comparisons run in the vllm tier."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from stub_compare import Difference, compare

ROOT = Path(__file__).resolve().parents[3]
STUBS = ROOT / "stubs"
STUB_FILES = sorted(p for p in (STUBS / "vllm").rglob("*.pyi") if p.read_text().strip())

# Differences that are deliberate, each with its reason. Anything else fails.
KNOWN: dict[str, str] = {
    "EplbState.__init__": "vLLM leaves the return unannotated; a constructor returns None",
    "EplbState.add_model": "vLLM leaves the return unannotated; it returns nothing",
}


def _module(stub: Path) -> str:
    parts = stub.relative_to(STUBS).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_every_stub_file_maps_to_a_module_name() -> None:
    assert "vllm.model_executor.models.interfaces" in map(_module, STUB_FILES)
    assert "vllm.config" in map(_module, STUB_FILES)


@pytest.mark.vllm
def test_stubtest_finds_nothing_outside_the_allowlist(tmp_path: Path) -> None:
    config = tmp_path / "stubtest.ini"
    config.write_text(f"[mypy]\nmypy_path = {STUBS}\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "--mypy-config-file",
            str(config),
            "--ignore-missing-stub",  # the stubs describe a slice of vLLM on purpose
            "--concise",
            "--allowlist",
            str(STUBS / "stubtest-allowlist.txt"),
            *sorted({_module(p) for p in STUB_FILES}),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.vllm
@pytest.mark.parametrize("stub", STUB_FILES, ids=lambda p: _module(p))
def test_stub_annotations_are_vllms(stub: Path) -> None:
    differences = compare(stub, _module(stub))
    unexpected = [str(d) for d in differences if d.member not in KNOWN]
    assert unexpected == [], "\n".join(unexpected)
    for difference in differences:  # a known difference may only be vLLM's missing return
        assert difference.real.endswith("-> <unannotated>"), str(difference)


def test_the_comparison_sees_through_spelling_and_catches_a_real_difference(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fake_host.py").write_text(
        "from typing import Literal\n"
        "import torch\n"
        "Option = Literal['default']\n"
        "class Layer:\n"
        "    policy: Option = 'default'\n"
        "    def weights(self) -> 'list[torch.Tensor]': ...\n"
        "def build(n: int) -> list[int]: ...\n"
    )
    stub = tmp_path / "fake_host.pyi"
    stub.write_text(
        "from typing import Literal\n"
        "from torch import Tensor\n"
        "class Layer:\n"
        "    policy: Literal['default']\n"
        "    def weights(self) -> list[Tensor]: ...\n"
        "def build(n: int) -> list[str]: ...\n"
        "def gone() -> None: ...\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    assert compare(stub, "fake_host") == [
        Difference("build", "(n: int) -> list[str]", "(n: int) -> list[int]"),
        Difference("gone", "() -> None", "no such annotated member"),
    ]
