"""The migration-aware rebalancing policy (algorithm: ``docs/policies/migration_aware.md``)."""

from __future__ import annotations

from ._policy import MigrationAwarePolicy

__all__ = ["MigrationAwarePolicy"]
