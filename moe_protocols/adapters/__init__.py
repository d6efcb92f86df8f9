"""Adapters: find the MoE model inside any served object and present it as ``MixtureOfExperts``.

``MoEView.resolve(model)`` walks from the served object through unwrapping
steps (``DEFAULT_UNWRAP_STEPS``, or your own ``UnwrapStep``\\ s) and returns a
view that delegates every protocol member to the MoE model it found, with the
``ResolutionTrace`` of how it got there.
"""

from __future__ import annotations

from moe_protocols.adapters._defaults import DEFAULT_UNWRAP_STEPS
from moe_protocols.adapters._step import StepKind, UnwrapStep
from moe_protocols.adapters._trace import ResolutionTrace, TraceEntry, TraceOutcome
from moe_protocols.adapters._view import MoEView
from moe_protocols.adapters.hf import (
    HF_EXPERTS_STEP,
    HF_GET_DECODER_STEP,
    HFDiscovery,
    HFExpertWeights,
    HFMoEAdapter,
    HFMoELayer,
    discover_hf_moe,
)

__all__ = [
    "DEFAULT_UNWRAP_STEPS",
    "HF_EXPERTS_STEP",
    "HF_GET_DECODER_STEP",
    "HFDiscovery",
    "HFExpertWeights",
    "HFMoEAdapter",
    "HFMoELayer",
    "discover_hf_moe",
    "MoEView",
    "ResolutionTrace",
    "StepKind",
    "TraceEntry",
    "TraceOutcome",
    "UnwrapStep",
]
