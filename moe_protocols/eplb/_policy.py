"""The rebalancing-policy contract, its input/output checks, and the policy registry.

A policy turns the recent load per logical expert into a new placement. It is
a pure function of its arguments (tensors in, tensor out); the EPLB state owns
everything that changes over time.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Final, Protocol, runtime_checkable

import attrs
import torch

from moe_protocols._torch_typed import float_list
from moe_protocols.eplb import _limits
from moe_protocols.eplb._deepseek import DeepSeekPolicy
from moe_protocols.eplb._maps import validate_placement
from moe_protocols.eplb._migration import MigrationAwarePolicy
from moe_protocols.errors import MappingError, PolicyError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "DEFAULT_POLICIES",
    "PolicyRegistry",
    "RebalancePolicy",
    "check_policy_inputs",
    "check_policy_output",
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
        modified. Call :func:`check_policy_inputs` first and
        :func:`check_policy_output` last.

        Raises:
            PolicyError: the arguments violate the constraints above.
        """
        ...


def _count(arg: str, value: object) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise PolicyError(f"{arg} must be an int >= 1, got {value!r}")
    return value


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
    replicas = _count("num_replicas", num_replicas)
    groups = _count("num_groups", num_groups)
    nodes = _count("num_nodes", num_nodes)
    ranks = _count("num_ranks", num_ranks)
    # Sizes first: nothing is allocated for a problem over the limits.
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
    num_layers, num_logical = load.shape
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
    if old_physical_to_logical_map is not None:
        _check_old_map(old_physical_to_logical_map, num_layers, num_logical)
    return load


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


def _frozen_policies(policies: Mapping[str, RebalancePolicy]) -> Mapping[str, RebalancePolicy]:
    # A private dict copy behind a read-only proxy: neither the caller nor a
    # user of the registry can change it afterwards.
    return MappingProxyType(dict(policies))


def _check_policies(
    instance: PolicyRegistry,
    attribute: attrs.Attribute[Mapping[str, RebalancePolicy]],
    value: Mapping[str, RebalancePolicy],
) -> None:
    for key, policy in value.items():
        if not isinstance(key, str) or not key:  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            raise PolicyError(f"policy names must be non-empty strings, got {key!r}")
        if not isinstance(policy, RebalancePolicy):  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            raise PolicyError(
                f"policy registered as {key!r} ({type(policy).__name__}) does not implement "
                "RebalancePolicy (needs a 'name' property and 'rebalance_experts')"
            )


@attrs.frozen(eq=False)
class PolicyRegistry:
    """An immutable mapping from names to rebalancing policies.

    Registration is explicit and local: :meth:`with_policy` returns a new
    registry and leaves this one (and :data:`DEFAULT_POLICIES`) unchanged.
    """

    _policies: Mapping[str, RebalancePolicy] = attrs.field(
        factory=dict, converter=_frozen_policies, validator=_check_policies, alias="policies"
    )

    @property
    def names(self) -> tuple[str, ...]:
        """Registered names, sorted."""
        return tuple(sorted(self._policies))

    def get(self, name: str) -> RebalancePolicy:
        """The policy registered as ``name``.

        Raises:
            PolicyError: no policy has that name; the message lists the known ones.
        """
        try:
            return self._policies[name]
        except (KeyError, TypeError):
            raise PolicyError(
                f"unknown EPLB policy {name!r}; known policies: {', '.join(self.names) or '(none)'}"
            ) from None

    def with_policy(
        self, policy: RebalancePolicy, *, name: str | None = None, replace: bool = False
    ) -> PolicyRegistry:
        """A new registry that also holds ``policy`` under ``name`` (default: ``policy.name``).

        Raises:
            PolicyError: the name is taken and ``replace`` is false, or
                ``policy`` does not implement :class:`RebalancePolicy`.
        """
        if not isinstance(policy, RebalancePolicy):  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            raise PolicyError(
                f"{type(policy).__name__} does not implement RebalancePolicy "
                "(needs a 'name' property and 'rebalance_experts')"
            )
        key = policy.name if name is None else name
        if key in self._policies and not replace:
            raise PolicyError(
                f"a policy named {key!r} is already registered "
                f"({self._policies[key]!r}); pass replace=True to override it"
            )
        return PolicyRegistry({**self._policies, key: policy})

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self._policies

    def __len__(self) -> int:
        return len(self._policies)

    def __repr__(self) -> str:
        return f"PolicyRegistry(names={self.names!r})"


def _default_policies() -> PolicyRegistry:
    deepseek = DeepSeekPolicy()
    # "default" is vLLM's name for the same algorithm.
    return (
        PolicyRegistry()
        .with_policy(deepseek)
        .with_policy(deepseek, name="default")
        .with_policy(MigrationAwarePolicy())
    )


DEFAULT_POLICIES: Final[PolicyRegistry] = _default_policies()
"""The built-in policies: ``"deepseek"`` (alias ``"default"``) and ``"migration_aware"``."""
