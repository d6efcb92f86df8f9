"""The worked example ``examples/own_moe_vlm.py``: a plain-torch VLM made EPLB-ready.

It must pass ``moe-protocols verify``, serve under ``ReferenceRunner`` with
EPLB on, and load a checkpoint saved from its plain version. Its 2-rank gloo
run is in ``test_distributed.py`` (the distributed example's ``--model own``).
"""

from __future__ import annotations

import importlib.util
import io
import re
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch
from torch import Tensor

from moe_protocols import (
    EplbConfig,
    MoEView,
    NotMixtureOfExpertsError,
    ReferenceRunner,
    RunnerConfig,
    verify_eplb_integration,
)
from moe_protocols.cli import main

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "own_moe_vlm.py"


def _load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_moe_vlm", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["own_moe_vlm"] = module
    spec.loader.exec_module(module)
    return module


example = _load_example()


def batch(step: int) -> dict[str, Tensor]:
    """Text skewed towards few tokens, plus one 8x8 image (4 patches) per sequence."""
    generator = torch.Generator().manual_seed(step)
    probs = torch.arange(1, example.VOCAB + 1, dtype=torch.float64).pow(-1.2)
    ids = torch.multinomial(probs, 2 * 12, replacement=True, generator=generator).view(2, 12)
    return {"input_ids": ids, "pixel_values": torch.randn(2, 3, 8, 8, generator=generator)}


def test_the_example_passes_moe_protocols_verify() -> None:
    out = io.StringIO()
    assert main(["verify", f"{EXAMPLE}:build"], out=out) == 0, out.getvalue()
    assert "FAIL" not in out.getvalue()
    assert "move-replicas:outputs: outputs unchanged" in out.getvalue()


def test_the_example_serves_under_the_reference_runner_with_eplb_on() -> None:
    model = example.build()
    runner = ReferenceRunner(
        RunnerConfig(
            enable_eplb=True,
            eplb=EplbConfig(window_size=4, step_interval=4, num_redundant_experts=2),
        )
    )
    runner.load_model(model)
    state, view = runner.eplb_state, runner.moe_view
    assert state is not None
    assert view is not None
    assert view.trace.resolved_path == "model.language_model"
    with torch.no_grad():
        before = model(**batch(-1))
    for step in range(8):
        runner.execute_model(**batch(step))
    assert state.num_rearrangements == 2
    placement = state.model_state().physical_to_logical_map
    assert not torch.equal(placement, torch.tensor([[*range(8), 0, 1]] * 2))
    with torch.no_grad():
        after = model(**batch(-1))
    assert torch.equal(before, after)


def test_a_checkpoint_of_the_plain_model_loads_into_the_eplb_ready_one(tmp_path: Path) -> None:
    plain = example.build(num_redundant_experts=None, seed=7)
    path = tmp_path / "plain.pt"
    torch.save(plain.state_dict(), path)
    ready = example.build(num_redundant_experts=2, seed=0)
    assert list(ready.state_dict()) == list(plain.state_dict())
    checkpoint = torch.load(path, weights_only=True)
    assert ready.load_state_dict(checkpoint).missing_keys == []
    with torch.no_grad():
        torch.testing.assert_close(ready(**batch(0)), plain(**batch(0)))
    # Redundant slots hold their expert's checkpoint weights, so verify still passes.
    assert verify_eplb_integration(ready).ok


def test_after_eplb_moved_experts_the_checkpoint_saved_is_the_plain_models() -> None:
    plain = example.build(num_redundant_experts=None, seed=3)
    ready = example.build(num_redundant_experts=2, seed=3)
    runner = ReferenceRunner(
        RunnerConfig(
            enable_eplb=True,
            eplb=EplbConfig(window_size=2, step_interval=2, num_redundant_experts=2),
        )
    )
    runner.load_model(ready)
    for step in range(4):
        runner.execute_model(**batch(step))
    assert runner.eplb_state is not None
    assert runner.eplb_state.num_rearrangements == 2
    saved, want = ready.state_dict(), plain.state_dict()
    assert list(saved) == list(want)
    assert all(torch.equal(saved[k], want[k]) for k in want)
    safetensors = pytest.importorskip("safetensors.torch")
    safetensors.save(saved)  # no shared storage: saveable as safetensors


def test_the_plain_model_is_pointed_at_the_building_blocks() -> None:
    plain = example.build(num_redundant_experts=None)
    with pytest.raises(NotMixtureOfExpertsError) as raised:
        MoEView.require(plain)
    lines = str(raised.value).splitlines()
    assert "MoE-looking modules (language_model.layers.0.moe.experts)" in lines[1]
    assert "docs/authoring.md" in lines[1]
    report = verify_eplb_integration(plain)
    assert not report.ok
    assert "moe_protocols.building" in (report.checks[0].fix or "")


def test_the_guide_counts_the_example_s_eplb_lines() -> None:
    marked = [line for line in EXAMPLE.read_text().splitlines() if re.search(r"#\s*EPLB\b", line)]
    guide = (ROOT / "docs" / "authoring.md").read_text()
    stated = re.search(r"(\d+) lines marked `# EPLB`", guide)
    assert stated is not None
    assert int(stated[1]) == len(marked) <= 15
    assert f"({len(marked)} of them)" in EXAMPLE.read_text()
