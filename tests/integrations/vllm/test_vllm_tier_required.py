"""The real-vLLM tier never passes by skipping where it is required (CI)."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]


def _run_tier_tests(*, require: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "MOE_PROTOCOLS_REQUIRE_VLLM"}
    if require:
        env["MOE_PROTOCOLS_REQUIRE_VLLM"] = "1"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            "vllm",
            "tests/integrations/vllm/test_vllm_host.py::test_the_tier_has_the_vllm_release_we_claim",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )


@pytest.mark.skipif(
    importlib.util.find_spec("vllm") is not None, reason="this environment is the vLLM tier"
)
def test_without_vllm_a_marked_test_fails_when_required_and_skips_otherwise() -> None:
    required = _run_tier_tests(require=True)
    assert required.returncode == 1, required.stdout
    assert "1 error" in required.stdout
    assert "MOE_PROTOCOLS_REQUIRE_VLLM=1 but vLLM is not importable" in required.stdout
    local = _run_tier_tests(require=False)
    assert local.returncode == 0, local.stdout
    assert "1 skipped" in local.stdout
    assert "scripts/setup-vllm.sh" in local.stdout
