"""The policy registry and the built-in policies; the one module that imports the policies."""

from __future__ import annotations

from types import MappingProxyType
from typing import TYPE_CHECKING, Final

import attrs

from moe_protocols.eplb.policies._contract import RebalancePolicy
from moe_protocols.eplb.policies.deepseek import DeepSeekPolicy
from moe_protocols.eplb.policies.migration import MigrationAwarePolicy
from moe_protocols.errors import PolicyError

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = ["DEFAULT_POLICIES", "PolicyRegistry"]


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
