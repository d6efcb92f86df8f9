# Both checkers must reject each marked line: `# type: ignore[code]` pins mypy's
# error code (mypy --warn-unused-ignores fails when there is none, and reports
# an error of any other code), and the pyright-ignore comment pins pyright's rule
# (reportUnnecessaryTypeIgnoreComment fails when there is none; pyright's
# enableTypeIgnoreComments is off, so `type: ignore` does not hide its errors).
# A line with only one of the two is accepted by the other checker, on purpose.
# Every unmarked line must be accepted by both. See tests/test_typing.py.
from __future__ import annotations

from collections.abc import MutableSequence, Sequence

from torch import Tensor

from moe_protocols import MixtureOfExperts, MoELayer


class _Methods:
    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None: ...

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None: ...


class Complete(_Methods):
    """Every member right: the baseline each class below breaks in one way."""

    expert_weights: MutableSequence[Sequence[Tensor]]
    num_moe_layers: int
    num_expert_groups: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    num_routed_experts: int
    num_shared_experts: int
    num_redundant_experts: int
    moe_layers: Sequence[MoELayer]


class NoRedundantExperts(_Methods):
    """Everything but num_redundant_experts."""

    expert_weights: MutableSequence[Sequence[Tensor]]
    num_moe_layers: int
    num_expert_groups: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    num_routed_experts: int
    num_shared_experts: int
    moe_layers: Sequence[MoELayer]


class ReadOnlyCount(_Methods):
    """A count as a read-only property: elastic EP rewrites counts, they must be settable."""

    expert_weights: MutableSequence[Sequence[Tensor]]
    num_moe_layers: int
    num_expert_groups: int
    num_logical_experts: int
    num_local_physical_experts: int
    num_routed_experts: int
    num_shared_experts: int
    num_redundant_experts: int
    moe_layers: Sequence[MoELayer]

    @property
    def num_physical_experts(self) -> int:
        return 8


class FloatCount(_Methods):
    """A count of the wrong type in the implementing class."""

    expert_weights: MutableSequence[Sequence[Tensor]]
    num_moe_layers: int
    num_expert_groups: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    num_routed_experts: int
    num_shared_experts: int
    moe_layers: Sequence[MoELayer]
    num_redundant_experts: float


class ListOfLists(_Methods):
    """``list[list[Tensor]]``, the natural spelling: the member is mutable, so invariant."""

    num_moe_layers: int
    num_expert_groups: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    num_routed_experts: int
    num_shared_experts: int
    num_redundant_experts: int
    moe_layers: Sequence[MoELayer]
    expert_weights: list[list[Tensor]]


class MissingParameter(Complete):
    """set_eplb_state drops the replica counts a runner passes."""

    def set_eplb_state(  # type: ignore[override]  # pyright: ignore[reportIncompatibleMethodOverride]
        self, expert_load_view: Tensor, logical_to_physical_map: Tensor
    ) -> None: ...


class RenamedParameter:
    """set_eplb_state with a renamed parameter: runners pass it by keyword, so it breaks them.
    mypy ignores parameter names when matching protocol members; pyright does not."""

    expert_weights: MutableSequence[Sequence[Tensor]]
    num_moe_layers: int
    num_expert_groups: int
    num_logical_experts: int
    num_physical_experts: int
    num_local_physical_experts: int
    num_routed_experts: int
    num_shared_experts: int
    num_redundant_experts: int
    moe_layers: Sequence[MoELayer]

    def set_eplb_state(
        self,
        load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None: ...

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None: ...


def the_baseline_is_accepted(model: Complete) -> MixtureOfExperts:
    return model


def each_broken_class_is_rejected(
    a: NoRedundantExperts,
    b: ReadOnlyCount,
    c: FloatCount,
    d: ListOfLists,
    e: MissingParameter,
    f: RenamedParameter,
) -> None:
    no_redundant: MixtureOfExperts = a  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    read_only_count: MixtureOfExperts = b  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    float_count: MixtureOfExperts = c  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    list_of_lists: MixtureOfExperts = d  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    missing_parameter: MixtureOfExperts = e  # type: ignore[assignment]  # pyright: ignore[reportAssignmentType]
    renamed_parameter: MixtureOfExperts = f  # pyright: ignore[reportAssignmentType]
    print(no_redundant, read_only_count, float_count, list_of_lists, missing_parameter, renamed_parameter)
