"""``DEFAULT_UNWRAP_STEPS``: the generic steps followed by the ecosystem steps.

The only module that sees both the generic walk's steps and an ecosystem
package: the walk knows no ecosystem, and ``adapters/hf`` knows no walk.
"""

from __future__ import annotations

from typing import Final

from moe_protocols.adapters._generic import GENERIC_UNWRAP_STEPS
from moe_protocols.adapters._step import UnwrapStep
from moe_protocols.adapters.hf._steps import HF_EXPERTS_STEP, HF_GET_DECODER_STEP

__all__ = ["DEFAULT_UNWRAP_STEPS"]

DEFAULT_UNWRAP_STEPS: Final[tuple[UnwrapStep, ...]] = (
    *GENERIC_UNWRAP_STEPS,
    HF_GET_DECODER_STEP,
    HF_EXPERTS_STEP,
)
"""The built-in steps, in the order they are tried at each level.

To add one, pass ``steps=(*DEFAULT_UNWRAP_STEPS, UnwrapStep(".decoder", ...))``
to ``MoEView.resolve`` / ``require``: the extension is local to that call.
"""
