"""Our rebalancing policies in the shape vLLM 0.33's ``EplbState`` calls.

vLLM selects a policy *class* (``EPLB_POLICIES[eplb_config.policy]``) and
calls its classmethod ``rebalance_experts(weight, num_replicas, num_groups,
num_nodes, num_ranks, old_global_expert_indices=None) -> Tensor``. The
classes built here subclass vLLM's ``AbstractEplbPolicy`` and forward that
call to one of our :class:`~moe_protocols.eplb.RebalancePolicy` instances.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any, Final

from moe_protocols.eplb import DEFAULT_POLICIES, checked_rebalance

if TYPE_CHECKING:
    import torch

    from moe_protocols.eplb import RebalancePolicy

__all__ = ["VLLM_DEFAULT_POLICY", "vllm_policy_class"]

VLLM_DEFAULT_POLICY: Final = "default"
"""The name that means vLLM's own policy, left in place."""

_ABSTRACT_POLICY: Final = ("vllm.distributed.eplb.policy.abstract", "AbstractEplbPolicy")
_CLASSES: dict[str, type[Any]] = {}


def _camel(name: str) -> str:
    return "".join(part.capitalize() for part in name.split("_"))


def vllm_policy_class(name: str) -> type[Any]:
    """The vLLM policy class (an ``AbstractEplbPolicy`` subclass) running our policy ``name``.

    One class per name and process, so identity checks on the selected
    policy are stable. Imports vLLM.

    Raises:
        PolicyError: ``name`` is not one of ``DEFAULT_POLICIES.names``; the
            message lists them.
    """
    cached = _CLASSES.get(name)
    if cached is not None:
        return cached
    policy = DEFAULT_POLICIES.get(name)
    module_name, class_name = _ABSTRACT_POLICY
    abstract: type[Any] = getattr(importlib.import_module(module_name), class_name)

    def rebalance_experts(
        cls: type[Any],
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_global_expert_indices: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return _run(
            policy,
            weight,
            num_replicas,
            num_groups,
            num_nodes,
            num_ranks,
            old_global_expert_indices,
        )

    cls = type(
        f"MoEProtocols{_camel(name)}EplbPolicy",
        (abstract,),
        {
            "__doc__": f"moe-protocols' {name!r} policy behind vLLM's policy interface.",
            "__module__": __name__,
            "moe_protocols_policy": policy,
            "rebalance_experts": classmethod(rebalance_experts),
        },
    )
    _CLASSES[name] = cls
    return cls


def _run(
    policy: RebalancePolicy,
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_map: torch.Tensor | None,
) -> torch.Tensor:
    # vLLM hands the summed window (int64) on CPU and copies the result to the
    # device itself; our policies take and return the same shapes.
    return checked_rebalance(
        policy, weight, num_replicas, num_groups, num_nodes, num_ranks, old_map
    )
