"""Shared fixtures. The fakes themselves live in ``tests/fakes.py`` (importable by any test)."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator

import pytest
import torch
from fakes import FakeMoELM, OneLevelVLM, dense_lm

from moe_protocols.models import (
    TinyMoEForCausalLM,
    TinyVLMForConditionalGeneration,
    tiny_moe,
    tiny_vlm,
)

REQUIRE_VLLM_ENV = "MOE_PROTOCOLS_REQUIRE_VLLM"
"""Set to 1 (scripts/check.sh does, so CI does) to make a missing vLLM tier a failure."""


def _vllm_is_installed() -> bool:
    try:
        return importlib.util.find_spec("vllm") is not None
    except (ImportError, ValueError):
        return False


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Tests marked ``vllm`` need the real-vLLM tier: fail without it when it is
    required (CI), skip with the way to get it otherwise."""
    if item.get_closest_marker("vllm") is None or _vllm_is_installed():
        return
    how = "create it with scripts/setup-vllm.sh and run .venv-vllm/bin/pytest -m vllm"
    if os.environ.get(REQUIRE_VLLM_ENV) == "1":
        pytest.fail(f"{REQUIRE_VLLM_ENV}=1 but vLLM is not importable here; {how}", pytrace=False)
    pytest.skip(f"the real-vLLM tier is not installed in this environment; {how}")


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Run torch on one thread: tiny models get slower, not faster, with more threads,
    and a second thread fights other processes for this 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def fake_lm() -> FakeMoELM:
    """A native MoE LM: 3 MoE layers, 8 logical experts, no redundancy, one EP rank."""
    return FakeMoELM()


@pytest.fixture
def fake_vlm(fake_lm: FakeMoELM) -> OneLevelVLM:
    """A VLM wrapper (``get_language_model()``) around ``fake_lm``."""
    return OneLevelVLM(fake_lm)


@pytest.fixture
def fake_dense_lm() -> FakeMoELM:
    """A model with every member but ``num_moe_layers == 0``."""
    return dense_lm()


@pytest.fixture
def skewed_vlm() -> TinyVLMForConditionalGeneration:
    """The seed case: a tiny VLM (not MixtureOfExperts) around a MoE LM with 16 experts
    and 4 redundant slots, ready for a 4-rank placement."""
    return tiny_vlm(num_experts=16, num_redundant_experts=4)


@pytest.fixture
def skewed_lm() -> TinyMoEForCausalLM:
    """The same MoE language model, served natively."""
    return tiny_moe(num_experts=16, num_redundant_experts=4)
