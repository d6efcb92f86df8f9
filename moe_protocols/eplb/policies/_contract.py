"""The rebalancing-policy contract: the protocol, its argument and result checks, one checked call.

A policy turns the recent load per logical expert into a new placement. It is
a pure function of its arguments (tensors in, tensor out); the EPLB state owns
everything that changes over time. Every caller runs a policy through
:func:`checked_rebalance`, which checks the arguments and the result once
each. This module imports no policy (the registry does).
"""

from __future__ import annotations

import abc
from typing import Protocol, runtime_checkable

import torch

from moe_protocols._torch_typed import float_list
from moe_protocols._validate import require_int
from moe_protocols.eplb import _limits
from moe_protocols.eplb._maps import validate_placement
from moe_protocols.errors import MappingError, PolicyError

__all__ = [
    "CheckedPolicy",
    "PlansCheckedArguments",
    "RebalancePolicy",
    "check_policy_inputs",
    "check_policy_output",
    "checked_rebalance",
]


@runtime_checkable
class RebalancePolicy(Protocol):
    """Computes a placement of physical expert replicas from the load per logical expert.

    Terms: ``L`` MoE layers, ``E`` logical experts, ``P`` physical slots
    (``num_replicas``), ``R`` EP ranks, ``N`` nodes, ``G`` expert groups.
    Slots are rank-major (slot ``p`` lives on rank ``p // (P / R)``), ranks
    are node-major (rank ``r`` on node ``r // (R / N)``), and group ``g`` holds
    the experts ``g * E/G .. (g + 1) * E/G - 1``.
    """

    @property
    def name(self) -> str:
        """The name the policy is registered and configured under (e.g. ``"deepseek"``)."""
        ...

    def rebalance_experts(
        self,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Return the new ``physical_to_logical_map [L, num_replicas]`` (int64, CPU).

        Args:
            weight: ``[L, E]`` load per logical expert (tokens routed to it over
                the load window, summed over EP ranks); any real numeric dtype,
                non-negative and finite.
            num_replicas: physical slots per layer ``P``; ``P >= E`` and a
                multiple of ``num_ranks``.
            num_groups: expert groups ``G`` (1 when the model has none).
            num_nodes: nodes ``N``; ``num_ranks`` is a multiple of it.
            num_ranks: EP ranks ``R``.
            old_physical_to_logical_map: ``[L, P_old]`` placement currently in
                use (``-1`` = empty slot), or ``None``. A policy may use it to
                limit weight movement; it is never modified.

        Contract: every logical expert has at least one replica in every layer
        of the result, every id lies in ``[0, E)``, and the inputs are not
        modified. Callers run a policy through :func:`checked_rebalance`,
        which checks both sides; :class:`CheckedPolicy` is a base class for
        policies that want the same checks when called directly.

        Raises:
            PolicyError: the arguments violate the constraints above.
        """
        ...


def _count(arg: str, value: object) -> int:
    return require_int(value, minimum=1, error=PolicyError, label=arg)


def check_policy_inputs(
    weight: object,
    num_replicas: object,
    num_groups: object,
    num_nodes: object,
    num_ranks: object,
    old_physical_to_logical_map: object,
) -> torch.Tensor:
    """Validate a policy's arguments and return ``weight`` as a float64 CPU copy ``[L, E]``.

    Raises:
        PolicyError: naming the argument at fault, for a weight that is not a
            2-D real tensor with at least one layer and one expert, a negative
            or non-finite load, a layer whose total load exceeds
            ``MAX_LAYER_LOAD``, counts that are not positive ints or exceed their
            limit (``moe_protocols.eplb.limits``),
            ``num_replicas < E``, ``num_replicas % num_ranks != 0``,
            ``num_ranks % num_nodes != 0``, or an old map that is not an
            integer ``[L, *]`` tensor with ids in ``[-1, E)``.
    """
    tensor = _check_weight_tensor(weight)
    replicas = _count("num_replicas", num_replicas)
    groups = _count("num_groups", num_groups)
    nodes = _count("num_nodes", num_nodes)
    ranks = _count("num_ranks", num_ranks)
    # Sizes first: nothing is allocated for a problem over the limits.
    _check_sizes(tensor, replicas, groups, nodes, ranks)
    load = _checked_load(tensor)
    num_layers, num_logical = load.shape
    _check_divisibility(num_logical, replicas, nodes, ranks)
    if old_physical_to_logical_map is not None:
        _check_old_map(old_physical_to_logical_map, num_layers, num_logical)
    return load


def _check_weight_tensor(weight: object) -> torch.Tensor:
    """``weight`` itself, once it is a non-empty 2-D tensor of real numbers with data."""
    if not isinstance(weight, torch.Tensor):
        raise PolicyError(
            f"weight must be a torch.Tensor [layers, logical], got {type(weight).__name__}"
        )
    if weight.dim() != 2 or weight.shape[0] < 1 or weight.shape[1] < 1:
        raise PolicyError(
            "weight must be a non-empty 2-D tensor [layers, logical], "
            f"got shape {tuple(weight.shape)}"
        )
    if weight.dtype == torch.bool or weight.is_complex() or weight.device.type == "meta":
        raise PolicyError(
            f"weight must hold real loads, got dtype {weight.dtype} on {weight.device}"
        )
    return weight


def _check_sizes(weight: torch.Tensor, replicas: int, groups: int, nodes: int, ranks: int) -> None:
    """Refuse sizes over the limits of ``moe_protocols.eplb.limits``."""
    for arg, value, limit in (
        ("weight.shape[0] (layers)", int(weight.shape[0]), "MAX_LAYERS"),
        ("weight.shape[1] (logical experts)", int(weight.shape[1]), "MAX_LOGICAL_EXPERTS"),
        ("num_replicas", replicas, "MAX_PHYSICAL_SLOTS"),
        ("num_groups", groups, "MAX_EXPERT_GROUPS"),
        ("num_nodes", nodes, "MAX_NODES"),
        ("num_ranks", ranks, "MAX_RANKS"),
    ):
        _limits.check_count(arg, value, limit, PolicyError)
    _limits.check_product(
        "the placement", (int(weight.shape[0]), replicas), "MAX_MAP_ENTRIES", PolicyError
    )


def _checked_load(weight: torch.Tensor) -> torch.Tensor:
    """A float64 CPU copy of ``weight`` once every load is finite, non-negative and in range."""
    load = weight.detach().to(device="cpu", dtype=torch.float64, copy=True)
    finite = torch.isfinite(load)
    if not bool(finite.all()):
        layer, expert = (int(i) for i in (~finite).nonzero()[0])
        raise PolicyError(
            f"weight: layer {layer}, logical expert {expert} has non-finite load "
            f"{float(load[layer, expert])}"
        )
    negative = load < 0
    if bool(negative.any()):
        layer, expert = (int(i) for i in negative.nonzero()[0])
        raise PolicyError(
            f"weight: layer {layer}, logical expert {expert} has negative load "
            f"{float(load[layer, expert])}"
        )
    _limits.check_finite_loads("weight", float_list(load.sum(dim=1).double()), PolicyError)
    return load


def _check_divisibility(num_logical: int, replicas: int, nodes: int, ranks: int) -> None:
    """Refuse slot and rank counts that do not split evenly, or too few slots."""
    if replicas < num_logical:
        raise PolicyError(
            f"num_replicas={replicas} is smaller than the {num_logical} logical experts: "
            "every expert needs at least one replica"
        )
    if replicas % ranks != 0:
        raise PolicyError(
            f"num_replicas={replicas} must be a multiple of num_ranks={ranks} "
            "(every EP rank holds the same number of slots)"
        )
    if ranks % nodes != 0:
        raise PolicyError(
            f"num_ranks={ranks} must be a multiple of num_nodes={nodes} "
            "(every node holds the same number of EP ranks)"
        )


def _check_old_map(old_map: object, num_layers: int, num_logical: int) -> None:
    if not isinstance(old_map, torch.Tensor):
        raise PolicyError(
            "old_physical_to_logical_map must be a torch.Tensor [layers, physical] or None, "
            f"got {type(old_map).__name__}"
        )
    if old_map.dim() != 2 or old_map.shape[0] != num_layers:
        raise PolicyError(
            f"old_physical_to_logical_map must be [{num_layers}, physical] like weight's layers, "
            f"got shape {tuple(old_map.shape)}"
        )
    if old_map.dtype == torch.bool or old_map.is_floating_point() or old_map.is_complex():
        raise PolicyError(
            f"old_physical_to_logical_map must hold integer expert ids, got dtype {old_map.dtype}"
        )
    if old_map.device.type == "meta":
        raise PolicyError("old_physical_to_logical_map is on the meta device and holds no ids")
    bad = (old_map < -1) | (old_map >= num_logical)
    if bool(bad.any()):
        layer, slot = (int(i) for i in bad.nonzero()[0])
        raise PolicyError(
            f"old_physical_to_logical_map: layer {layer}, slot {slot} holds "
            f"{int(old_map[layer, slot])}, outside [-1, {num_logical})"
        )


def check_policy_output(
    policy_name: str,
    new_map: object,
    weight: torch.Tensor,
    num_replicas: int,
    num_ranks: int,
) -> torch.Tensor:
    """Check a policy's result against the contract and return it as int64 CPU ``[L, P]``.

    Args:
        policy_name: the policy's name, for the message.
        new_map: what the policy computed.
        weight: the ``[L, E]`` load it was given (fixes ``L`` and ``E``).
        num_replicas: the requested ``P``.
        num_ranks: EP ranks.

    Raises:
        PolicyError: the result is not an integer ``[L, P]`` tensor, holds ids
            outside ``[0, E)``, or leaves an expert without replica.
    """
    num_layers, num_logical = weight.shape
    try:
        return validate_placement(
            new_map,
            num_layers=num_layers,
            num_logical=num_logical,
            num_physical=num_replicas,
            num_ranks=num_ranks,
            what=f"placement returned by policy {policy_name!r}",
        )
    except MappingError as exc:
        raise PolicyError(str(exc)) from exc


@runtime_checkable
class PlansCheckedArguments(Protocol):
    """A policy that plans on arguments :func:`checked_rebalance` has already checked.

    :class:`CheckedPolicy` implements it; :func:`checked_rebalance` calls
    ``plan_checked`` instead of ``rebalance_experts`` on such a policy, so that
    nothing is checked twice. The method name is distinctive on purpose: the
    check is structural, and a policy must not match it by accident.
    """

    def plan_checked(
        self,
        load: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None,
    ) -> torch.Tensor:
        """The new ``[L, num_replicas]`` map; ``load`` is the checked float64 CPU copy."""
        ...


def checked_rebalance(
    policy: RebalancePolicy,
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old_physical_to_logical_map: torch.Tensor | None = None,
) -> torch.Tensor:
    """Run ``policy`` with its arguments and its result checked, once each.

    The arguments go through :func:`check_policy_inputs` and the result
    through :func:`check_policy_output`. A :class:`CheckedPolicy` gets the
    checked float64 copy of ``weight`` (its ``plan_checked``, see
    :class:`PlansCheckedArguments`); any other policy gets the arguments as given.

    Returns:
        The new ``physical_to_logical_map [L, num_replicas]``, int64 on CPU.

    Raises:
        PolicyError: the arguments violate the contract of
            :class:`RebalancePolicy`, or the policy's result does.
    """
    load = check_policy_inputs(
        weight, num_replicas, num_groups, num_nodes, num_ranks, old_physical_to_logical_map
    )
    if isinstance(policy, PlansCheckedArguments):
        new_map: object = policy.plan_checked(
            load, num_replicas, num_groups, num_nodes, num_ranks, old_physical_to_logical_map
        )
    else:
        new_map = policy.rebalance_experts(
            weight, num_replicas, num_groups, num_nodes, num_ranks, old_physical_to_logical_map
        )
    return check_policy_output(policy.name, new_map, load, num_replicas, num_ranks)


class CheckedPolicy(abc.ABC):
    """Base for policies whose algorithm runs on checked arguments.

    A subclass implements :meth:`plan_checked`; :meth:`rebalance_experts` runs it
    through :func:`checked_rebalance`, so a direct call is checked exactly
    like a call from the EPLB state, and no route checks twice.
    """

    __slots__ = ()

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """The name the policy is registered and configured under."""

    @abc.abstractmethod
    def plan_checked(
        self,
        load: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None,
    ) -> torch.Tensor:
        """The new ``[L, num_replicas]`` map for checked arguments.

        ``load`` is the float64 CPU copy :func:`check_policy_inputs` returns;
        the other arguments passed its checks. The result is checked by the
        caller.
        """

    def rebalance_experts(
        self,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Compute a new ``physical_to_logical_map [L, num_replicas]`` (int64, CPU).

        See :class:`RebalancePolicy` for the contract.
        """
        return checked_rebalance(
            self,
            weight,
            num_replicas,
            num_groups,
            num_nodes,
            num_ranks,
            old_physical_to_logical_map,
        )
