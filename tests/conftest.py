"""Shared fixtures. The fakes themselves live in ``tests/fakes.py`` (importable by any test)."""

from __future__ import annotations

import pytest
from fakes import FakeMoELM, OneLevelVLM, dense_lm


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
