"""An example of the seed case: a MoE language model that a runner only sees through wrappers.

``build()`` returns ``torch.compile(TinyVLMForConditionalGeneration(...))``:
the served object is a compiled module (``._orig_mod``) around a
vision-language wrapper (``get_language_model()``) around the MoE language
model. Nothing on the outside implements ``MixtureOfExperts``; ``MoEView``
finds the model inside::

    moe-protocols inspect examples/wrapped_model.py:build

Run this file (``python examples/wrapped_model.py``, or ``moe-protocols verify
examples/wrapped_model.py:build``) to self-test the wrapped model's EPLB
integration: load recording, redundant replicas and forced expert moves
through the compiled wrapper (compilation takes a few seconds on a CPU).
"""

from __future__ import annotations

import torch

from moe_protocols import verify_eplb_integration
from moe_protocols.models import tiny_vlm


def build() -> torch.nn.Module:
    """Build the wrapped model (compilation is lazy: nothing is compiled until a forward)."""
    compiled: torch.nn.Module = torch.compile(tiny_vlm(num_redundant_experts=2))  # type: ignore[assignment]  # torch.compile is typed as returning a callable
    return compiled


if __name__ == "__main__":
    report = verify_eplb_integration(build())
    print(report)
    raise SystemExit(0 if report.ok else 1)
