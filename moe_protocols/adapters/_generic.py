"""The generic unwrapping steps: conventions that wrappers of any ecosystem follow.

Each step is structural (an attribute or method is present), never an
``isinstance`` against a wrapper class, so a new wrapper that follows a known
convention works without changes here. Ecosystem steps (``adapters/hf``) are
added to these in ``_defaults.py``.
"""

from __future__ import annotations

from typing import Final

from moe_protocols.adapters._step import UnwrapStep, attribute_probe, method_probe

__all__ = ["GENERIC_UNWRAP_STEPS"]

GENERIC_UNWRAP_STEPS: Final[tuple[UnwrapStep, ...]] = (
    UnwrapStep(
        "get_language_model()",
        method_probe("get_language_model"),
        "the multimodal convention (vLLM SupportsMultiModal): the wrapped language model; "
        "NotImplementedError is recorded and the walk goes on",
    ),
    UnwrapStep("._orig_mod", attribute_probe("_orig_mod"), "torch.compile's OptimizedModule"),
    UnwrapStep(
        ".module", attribute_probe("module"), "DistributedDataParallel, DataParallel, FSDP1"
    ),
    UnwrapStep("get_base_model()", method_probe("get_base_model"), "PEFT's PeftModel"),
    UnwrapStep(".language_model", attribute_probe("language_model"), "VLM wrappers' attribute"),
    UnwrapStep(
        ".model.language_model",
        attribute_probe("model", "language_model"),
        "wrappers that keep the VLM core under .model (transformers-style)",
    ),
    UnwrapStep(".thinker", attribute_probe("thinker"), "omni-style models (thinker/talker)"),
)
"""The ecosystem-free steps, in the order they are tried at each level (all ``"unwrap"``)."""
