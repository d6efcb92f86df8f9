"""Building blocks for model authors: make your own MoE model or MoE VLM EPLB-ready.

* :class:`SwiGLUExperts` / :class:`StackedExperts`: routed experts in physical
  slots (``[local_physical, ...]`` weights, redundant slots filled with
  replicas), implementing ``MoELayer``; ``from_module_list`` converts an
  ``nn.ModuleList`` of per-expert modules and keeps its checkpoint keys.
* :func:`route_to_physical`: logical top-k ids -> physical slots through the
  replica maps, recording the load in the same vectorised step (no host
  syncs, fixed shapes: CUDA-graph friendly).
* :func:`swiglu_experts`: the grouped SwiGLU expert computation.
* :class:`MoEModelMixin`: the model side of ``MixtureOfExperts``, every count
  derived from the layers, ``update_physical_experts_metadata`` included.

The guide is ``docs/authoring.md``; ``examples/own_moe_vlm.py`` is a worked example.
"""

from __future__ import annotations

from moe_protocols.building._experts import StackedExperts, SwiGLUExperts
from moe_protocols.building._model import ElasticMoELayer, MoEModelMixin
from moe_protocols.building._routing import GROUP_ROWS, route_to_physical, swiglu_experts

__all__ = [
    "GROUP_ROWS",
    "ElasticMoELayer",
    "MoEModelMixin",
    "StackedExperts",
    "SwiGLUExperts",
    "route_to_physical",
    "swiglu_experts",
]
