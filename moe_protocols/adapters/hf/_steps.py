"""The HF steps: ``HF_GET_DECODER_STEP`` (descend) and ``HF_EXPERTS_STEP`` (adapt)."""

from __future__ import annotations

from typing import Final

from moe_protocols.adapters._step import UnwrapStep
from moe_protocols.adapters.hf._adapter import HFMoEAdapter
from moe_protocols.adapters.hf._discovery import discover_hf_moe
from moe_protocols.adapters.hf._probe import is_module

__all__ = ["HF_EXPERTS_STEP", "HF_GET_DECODER_STEP"]


def _hf_experts_probe(obj: object) -> object | None:
    found = discover_hf_moe(obj)
    if not found.ok or not is_module(obj):
        return None
    return HFMoEAdapter(obj, found.layers)


def _get_decoder_probe(obj: object) -> object | None:
    get_decoder = getattr(obj, "get_decoder", None)
    if not callable(get_decoder):
        return None
    decoder = get_decoder()
    return decoder if decoder is not obj and is_module(decoder) else None


HF_EXPERTS_STEP: Final = UnwrapStep(
    name="hf-experts adapter",
    probe=_hf_experts_probe,
    description=(
        "build an HFMoEAdapter when the object holds transformers-style experts modules "
        "(an 'experts' child or the expert-parallel plan's paths) of one language model; "
        "as an adapt step, the walk does not offer it a wrapper that an unwrap step goes "
        "past to a model it also adapts, so the adapter is built on the wrapped model"
    ),
    kind="adapt",
)
"""Adapter step: wrap a transformers MoE model that does not implement ``MixtureOfExperts``."""

HF_GET_DECODER_STEP: Final = UnwrapStep(
    name="get_decoder()",
    probe=_get_decoder_probe,
    description="the decoder a transformers model returns from get_decoder(), when not itself",
    # A part of the model (its decoder without the head), not a wrapper around it:
    # the hf-experts adapter is still built over the whole model.
    kind="descend",
)
"""Unwrapping step: transformers' ``get_decoder()`` (VLM -> text model, CausalLM -> base model)."""
