"""Planning one model's move: the new placement, its maps, its transfer and the figures behind it.

A plan reads the model's tensors and the window's load but changes nothing;
:mod:`._commit` moves the weights and commits the maps, and only then is the
:class:`ModelRearrangement` summary built, once, from the plan and what the
move did (:func:`summarise`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeAlias

import attrs
import torch
from torch import Tensor

from moe_protocols.errors import ExpertLoadError, MappingError

from ._maps import compute_logical_maps, validate_placement
from ._metrics import expected_rank_loads, rank_loads_from_physical, slots_changed
from ._results import ModelEplbState, ModelRearrangement, mean_with_data, per_layer_with_data
from ._transfer import TransferPlan, TransferStats, plan_transfer

if TYPE_CHECKING:
    from moe_protocols.parallel import ExpertParallelContext

    from ._agreement import RankGroup
    from ._mapping_io import Placement
    from ._transfer import StagedTransfer

__all__ = [
    "AskPolicy",
    "ModelPlanner",
    "ModelPlan",
    "PlanFigures",
    "check_load",
    "mapping_plan",
    "plan_model",
    "summarise",
    "summarise_all",
    "window_load",
]

AskPolicy: TypeAlias = Callable[[ModelEplbState, Tensor, Tensor, int, int], Tensor]
"""``ask(state, logical_load, old_map, num_nodes, num_ranks)``: the policy's checked ``[L, P]``."""


@attrs.frozen(eq=False)
class PlanFigures:
    """What a rearrangement measured and planned for one model, before any weight moved."""

    balancedness_before: Tensor
    """``[L]``: planned balancedness of the window's load under the old placement."""
    balancedness_after: Tensor
    """``[L]``: planned balancedness of the same load under the new placement."""
    slots_changed: int
    """Positions that hold a different expert in the new placement."""
    policy_seconds: float
    """Wall time of the policy call (0 when it was not called)."""
    total_load: int
    """Token-expert assignments in the window (all ranks)."""
    realised_balancedness: float
    """Balancedness the window's load had, per slot as measured."""
    previous_planned_balancedness: float | None
    """What the previous rearrangement planned for the window just measured."""
    skipped: str | None
    """Why the policy was not asked (``None``: it was)."""
    layers_without_load: tuple[int, ...]
    """Layers that recorded nothing and keep their placement."""


@attrs.frozen(eq=False)
class ModelPlan:
    """One model's planned move, checked and ready to stage."""

    state: ModelEplbState
    old_map: Tensor
    new_map: Tensor
    logical_maps: tuple[Tensor, Tensor]
    """``(logical_to_physical_map, logical_replica_count)`` of ``new_map``, on the maps' device."""
    transfer: TransferPlan  # planned before staging, so a rank that cannot plan tells the others
    planning_seconds: float
    figures: PlanFigures | None = None
    """The rearrangement's figures; ``None`` for a placement restored by ``update_mapping``."""


def window_load(state: ModelEplbState, group: RankGroup) -> Tensor:
    """``[L, P]`` int64 on CPU: the window's load per physical slot, summed over ranks.

    Physical, not logical, so that the realised balancedness can be measured
    per slot and a bad row can be traced to its slot; every rank gets the
    same tensor, so every rank takes the same decisions from it.
    """
    physical = state.expert_load_window.sum(dim=0, dtype=torch.int64)
    return group.collective(
        "load reduce",
        f"all-reducing the expert load of model {state.model_name!r}",
        lambda wait: group.ep.all_reduce_(physical, wait=wait),
    ).cpu()


def check_load(state: ModelEplbState, physical: Tensor) -> None:
    """Refuse a window that no real layer could have recorded (negative counts)."""
    negative = physical < 0
    if not bool(negative.any()):
        return
    layers = sorted({int(i) for i in negative.nonzero()[:, 0]})
    layer, slot = (int(i) for i in negative.nonzero()[0])
    raise ExpertLoadError(
        f"model {state.model_name!r}: MoE layer(s) {layers} recorded negative load in "
        f"this window (layer {layer}, slot {slot}: {int(physical[layer, slot])} summed "
        "over the window and the EP ranks). A layer must add the number of tokens routed "
        "to each physical slot into its row of the expert_load_view handed to "
        "set_eplb_state; nothing was moved",
        layers=layers,
    )


def _planned(
    state: ModelEplbState, old_map: Tensor, new_map: Tensor, ep: ExpertParallelContext
) -> tuple[tuple[Tensor, Tensor], TransferPlan, float]:
    """The maps of ``new_map`` and this rank's plan of the move, with the seconds planning took."""
    started = time.perf_counter()
    transfer = plan_transfer(
        old_map, new_map, state.num_local_physical_experts, ep.rank, num_nodes=ep.num_nodes
    )
    planning_seconds = time.perf_counter() - started
    l2p, count = compute_logical_maps(new_map, state.num_logical_experts, state.max_replicas)
    device = state.logical_to_physical_map.device
    return (l2p.to(device), count.to(device)), transfer, planning_seconds


def plan_model(
    state: ModelEplbState,
    physical: Tensor,
    ask: AskPolicy,
    *,
    ep: ExpertParallelContext,
    num_ranks: int,
    num_nodes: int,
    window_size: int,
    previous: float | None,
) -> ModelPlan:
    """Ask the policy for a new placement of one model; check it, derive maps and figures.

    ``physical`` is the window's ``[L, P]`` load summed over ranks. With no
    load at all, the policy is not called and nothing moves; a layer
    without load keeps its placement (a plan on zeros is a guess).
    """
    check_load(state, physical)
    old_map = state.physical_to_logical_map.to("cpu", copy=True)
    load = torch.zeros(state.num_layers, state.num_logical_experts, dtype=torch.int64)
    # Empty slots (-1) carry no expert.
    load.scatter_add_(1, old_map.clamp(min=0), torch.where(old_map >= 0, physical, 0))
    has_load = physical.sum(dim=1) > 0
    total = int(physical.sum())
    skipped: str | None = None
    started = time.perf_counter()
    if total == 0:
        skipped = (
            f"no load was recorded in the window ({window_size} steps); "
            "are its MoE layers adding their routed tokens to the expert_load_view "
            "handed to set_eplb_state?"
        )
        new_map = old_map.clone()
    else:
        new_map = ask(state, load, old_map, num_nodes, num_ranks)
        # A layer that recorded nothing keeps its placement.
        new_map[~has_load] = old_map[~has_load]
    policy_seconds = time.perf_counter() - started
    realised = rank_loads_from_physical(physical, num_ranks)
    figures = PlanFigures(
        balancedness_before=per_layer_with_data(
            expected_rank_loads(old_map, load, num_ranks), has_load
        ),
        balancedness_after=per_layer_with_data(
            expected_rank_loads(new_map, load, num_ranks), has_load
        ),
        slots_changed=slots_changed(old_map, new_map),
        policy_seconds=policy_seconds if skipped is None else 0.0,
        total_load=total,
        realised_balancedness=mean_with_data(per_layer_with_data(realised, has_load)),
        previous_planned_balancedness=previous,
        skipped=skipped,
        layers_without_load=(
            () if skipped is not None else tuple(int(i) for i in (~has_load).nonzero()[:, 0])
        ),
    )
    logical_maps, transfer, planning_seconds = _planned(state, old_map, new_map, ep)
    return ModelPlan(
        state, old_map, new_map, logical_maps, transfer, planning_seconds, figures=figures
    )


def mapping_plan(
    state: ModelEplbState,
    physical_to_logical_map: Tensor | Placement,
    *,
    ep: ExpertParallelContext,
    num_ranks: int,
    num_nodes: int,
) -> ModelPlan:
    """Check a placement to restore against the model and plan the move to it."""
    what = f"placement for model {state.model_name!r}"
    if isinstance(physical_to_logical_map, Tensor):
        table = physical_to_logical_map
    else:
        placement = physical_to_logical_map
        # Placement is a concrete class; accept it by its fields, not its type.
        if not hasattr(placement, "num_logical_experts"):
            raise MappingError(
                f"{what}: expected a torch.Tensor [layers, physical] or a Placement, got "
                f"{type(placement).__name__}"
            )
        if placement.num_logical_experts != state.num_logical_experts:
            raise MappingError(
                f"{what}: made for {placement.num_logical_experts} logical experts, the "
                f"model has {state.num_logical_experts}"
            )
        if placement.num_ranks != num_ranks:
            raise MappingError(
                f"{what}: made for {placement.num_ranks} EP ranks, this EPLB state plans "
                f"for {num_ranks}"
            )
        table = placement.physical_to_logical_map
    new_map = validate_placement(
        table,
        num_layers=state.num_layers,
        num_logical=state.num_logical_experts,
        num_physical=state.num_physical_experts,
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        what=what,
    )
    old_map = state.physical_to_logical_map.to("cpu", copy=True)
    logical_maps, transfer, planning_seconds = _planned(state, old_map, new_map, ep)
    return ModelPlan(state, old_map, new_map, logical_maps, transfer, planning_seconds)


@attrs.frozen
class ModelPlanner:
    """Plans moves for the models of one EPLB state: its policy, EP group and placement topology."""

    ask: AskPolicy
    ep: ExpertParallelContext
    num_ranks: int
    num_nodes: int
    window_size: int

    def rearrangement(
        self, state: ModelEplbState, physical: Tensor, previous: float | None
    ) -> ModelPlan:
        """A rearrangement's plan for ``state`` from its window's load (see :func:`plan_model`)."""
        return plan_model(
            state,
            physical,
            self.ask,
            ep=self.ep,
            num_ranks=self.num_ranks,
            num_nodes=self.num_nodes,
            window_size=self.window_size,
            previous=previous,
        )

    def restoring(
        self, state: ModelEplbState, physical_to_logical_map: Tensor | Placement
    ) -> ModelPlan:
        """The plan of the move to a given placement (see :func:`mapping_plan`)."""
        return mapping_plan(
            state,
            physical_to_logical_map,
            ep=self.ep,
            num_ranks=self.num_ranks,
            num_nodes=self.num_nodes,
        )


def summarise(
    plan: ModelPlan, staged: StagedTransfer, stats: TransferStats, commit_seconds: float
) -> ModelRearrangement:
    """What a committed rearrangement did to the model: the plan's figures and the move's."""
    figures = plan.figures
    assert figures is not None, "a rearrangement's plans carry figures"
    return ModelRearrangement(
        model_name=plan.state.model_name,
        balancedness_before=figures.balancedness_before,
        balancedness_after=figures.balancedness_after,
        overall_balancedness_before=mean_with_data(figures.balancedness_before),
        overall_balancedness_after=mean_with_data(figures.balancedness_after),
        slots_changed=figures.slots_changed,
        bytes_moved=stats.bytes_moved,
        layers_changed=stats.layers_changed,
        policy_seconds=figures.policy_seconds,
        transfer_seconds=plan.planning_seconds + staged.seconds + commit_seconds,
        old_physical_to_logical_map=plan.old_map,
        new_physical_to_logical_map=plan.new_map,
        bytes_sent=stats.bytes_sent,
        bytes_received=stats.bytes_received,
        total_load=figures.total_load,
        realised_balancedness=figures.realised_balancedness,
        previous_planned_balancedness=figures.previous_planned_balancedness,
        skipped=figures.skipped,
        layers_without_load=figures.layers_without_load,
    )


def summarise_all(
    plans: Sequence[ModelPlan],
    staged: Sequence[StagedTransfer],
    committed: Sequence[tuple[TransferStats, float]],
) -> dict[str, ModelRearrangement]:
    """:func:`summarise` of every committed plan, keyed by model name, in the plans' order."""
    return {
        plan.state.model_name: summarise(plan, transfer, stats, commit_seconds)
        for plan, transfer, (stats, commit_seconds) in zip(plans, staged, committed, strict=True)
    }
