"""Rebalancing policies: the contract, the registry, and the built-in policies.

A policy turns the recent load per logical expert into a new placement
(:class:`RebalancePolicy`). Callers run one through :func:`checked_rebalance`,
which checks its arguments and its result once each; :class:`CheckedPolicy`
is the base of policies that get the same checks when called directly.
:data:`DEFAULT_POLICIES` holds ``"deepseek"`` (alias ``"default"``) and
``"migration_aware"``.
"""

from __future__ import annotations

from ._apportion import replica_counts
from ._contract import (
    CheckedPolicy,
    RebalancePolicy,
    check_policy_inputs,
    check_policy_output,
    checked_rebalance,
)
from ._registry import DEFAULT_POLICIES, PolicyRegistry
from ._slots import preserve_intra_rank_slots
from .deepseek import DeepSeekPolicy
from .migration import MigrationAwarePolicy

__all__ = [
    "DEFAULT_POLICIES",
    "CheckedPolicy",
    "DeepSeekPolicy",
    "MigrationAwarePolicy",
    "PolicyRegistry",
    "RebalancePolicy",
    "check_policy_inputs",
    "check_policy_output",
    "checked_rebalance",
    "preserve_intra_rank_slots",
    "replica_counts",
]
