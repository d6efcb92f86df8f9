"""The EPLB state: records expert load, rebalances, moves weights and keeps the maps current.

Semantics follow vLLM 0.33's ``EplbState`` (see ``stubs/vllm``): the runner
registers each MoE model once (``add_model``), calls ``step()`` after every
engine step on every EP rank in lockstep, and every ``step_interval`` steps the
state plans a new placement from the recorded load, moves the expert weights
and updates the maps. All EPLB tensors are allocated once and updated in place
(``copy_``), because the MoE layers hold views of them.

Shapes: ``L`` MoE layers, ``E`` logical experts, ``P`` physical slots, ``R`` EP
ranks, ``W`` window steps.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING, Final, final

import torch
from torch import Tensor

from moe_protocols._torch_typed import int_rows
from moe_protocols.errors import EplbConfigError, EplbStateError, MoEProtocolsError, PolicyError
from moe_protocols.parallel import ExpertParallelContext

from ._agreement import RankGroup, describe, digest
from ._commit import FingerprintTables, commit, stage_plans
from ._distributed import TransferOptions, receive_budget
from ._fingerprint import IntegrityMode
from ._mapping_io import Placement, save_placement
from ._model_state import (
    allocate,
    check_expert_weights,
    check_registrable,
    counts,
    wire,
)
from ._ownership import track_owner
from ._planning import ModelPlan, ModelPlanner, summarise_all, window_load
from ._reporting import RearrangementLog, log_pass_balancedness
from ._results import (
    BalancednessStats,
    ModelEplbState,
    ModelRearrangement,
    RearrangementResult,
)
from ._settings import checked_integrity, placement_topology, torch_device
from ._state_view import EplbStateView
from ._transfer_options import layout_digest_under
from ._wiring import WiringSnapshot
from .policies import DEFAULT_POLICIES, PolicyRegistry, RebalancePolicy, checked_rebalance

if TYPE_CHECKING:
    import os

    from moe_protocols.protocols import MixtureOfExperts

    from ._config import EplbConfig

__all__ = [
    "BalancednessStats",
    "EplbState",
    "ModelEplbState",
    "ModelRearrangement",
    "RearrangementResult",
]

_SINGLE_PROCESS: Final = ExpertParallelContext()
_DEFAULT_TRANSFER: Final = TransferOptions()


def _policy_named(config: EplbConfig, policies: PolicyRegistry) -> RebalancePolicy:
    try:
        return policies.get(config.policy)
    except PolicyError as exc:
        raise EplbConfigError(
            f"EplbConfig.policy={config.policy!r} is not a known EPLB policy; "
            f"known policies: {', '.join(policies.names) or '(none)'}"
        ) from exc


def _ask_policy(
    policy: RebalancePolicy,
    state: ModelEplbState,
    load: Tensor,
    old_map: Tensor,
    num_nodes: int,
    num_ranks: int,
) -> Tensor:
    """The policy's placement for one model, checked; a failure is a ``PolicyError``."""
    try:
        return checked_rebalance(
            policy,
            load,
            num_replicas=state.num_physical_experts,
            num_groups=state.model.num_expert_groups,
            num_nodes=num_nodes,
            num_ranks=num_ranks,
            old_physical_to_logical_map=old_map.clone(),
        )
    except MoEProtocolsError:
        raise
    except Exception as exc:
        raise PolicyError(
            f"policy {policy.name!r} failed for model {state.model_name!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


@final
class EplbState(EplbStateView):
    """Expert-parallel load balancing for one or more MoE models on this EP rank.

    Lifecycle (vLLM's): ``add_model`` at load time, ``step()`` after every
    engine step on every EP rank in lockstep, ``rearrange()`` every
    ``config.step_interval`` steps (called by ``step``), ``update_mapping`` /
    ``from_mapping`` to restore a saved placement.

    Differences from vLLM 0.33, on purpose: every non-dummy step is recorded
    into the window (vLLM records only the last ``window_size`` steps of each
    interval, an optimisation omitted here); the first rearrangement happens
    after ``step_interval`` steps (vLLM: after a quarter of it); the window is
    cleared after a placement changes, so it only ever holds load recorded
    under the current placement; rearrangement is synchronous.

    Introspection: the map and window accessors (``physical_to_logical_map()``
    and friends) return copies; :meth:`model_state` returns the live tensors,
    which callers must treat as read-only.

    Across processes (``ep.world_size > 1``): every rank calls the same methods
    in the same order. The window's load is all-reduced, every rank runs the
    (deterministic) policy itself and the ranks compare fingerprints of the
    result before moving anything; expert rows then move over
    ``torch.distributed`` and are committed only when every rank staged them
    (see ``_distributed.py`` and :class:`TransferOptions`).
    """

    def __init__(
        self,
        config: EplbConfig,
        *,
        ep: ExpertParallelContext = _SINGLE_PROCESS,
        policies: PolicyRegistry = DEFAULT_POLICIES,
        device: torch.device | str = "cpu",
        num_ranks: int | None = None,
        num_nodes: int | None = None,
        transfer: TransferOptions = _DEFAULT_TRANSFER,
        integrity: IntegrityMode = "sampled",
    ) -> None:
        """Create an empty state; ``config.policy`` is looked up in ``policies`` now.

        ``num_ranks``/``num_nodes`` are the *placement* topology the policy plans
        for and balancedness is measured over; they default to the EP group's
        (``ep.world_size``/``ep.num_nodes``). ``num_ranks`` may be a multiple of
        ``ep.world_size``: each process then holds the slots of several
        placement ranks, which is how one process simulates (and balances) a
        larger expert-parallel deployment, e.g. the demo's 4 ranks on one CPU.

        ``transfer`` says how weights move between EP ranks (batch size,
        staging device, fault injection for tests); every rank must pass the
        same. In one process it is unused. ``device`` is also where the small
        tensors the ranks agree with live (a GPU for NCCL, the CPU for gloo).

        ``integrity`` says how moved weights are checked against per-expert
        fingerprints (``_integrity.py``): ``"sampled"`` (default) fingerprints
        a bounded sample of each moved row, ``"full"`` every byte of every
        slot of a changed layer, ``"off"`` nothing. Every rank must pass the same.

        Raises:
            EplbConfigError: the policy name is unknown (the message lists the
                known ones), ``device`` is not a torch device, or the placement
                topology does not fit the EP group, or ``integrity`` is not a mode.
        """
        self._integrity: IntegrityMode = checked_integrity(integrity)
        self._tables = FingerprintTables(self._integrity)
        self._num_ranks, self._num_nodes = placement_topology(ep, num_ranks, num_nodes)
        self._policy: RebalancePolicy = _policy_named(config, policies)
        self._device = torch_device(device)
        self._config = config
        self._ep = ep
        self._group = RankGroup(ep, self._device, transfer.phase_hook)
        self._transfer = transfer
        # Not a bound method: a cycle would keep a dropped state's claim alive (_ownership).
        ask = functools.partial(_ask_policy, self._policy)
        self._planner = ModelPlanner(ask, ep, self._num_ranks, self._num_nodes, config.window_size)
        self._models: dict[str, ModelEplbState] = {}
        self._window_step = 0
        self._step = 0
        self._steps_taken = 0
        self._rearrangements = 0
        self._last: RearrangementResult | None = None
        self._planned: dict[str, float] = {}
        self._log = RearrangementLog()
        track_owner(self)

    # ------------------------------------------------------------ introspection

    @property
    def policy(self) -> RebalancePolicy:
        """The rebalancing policy named by ``config.policy``."""
        return self._policy

    def placement(self, model_name: str = "model") -> Placement:
        """The model's current placement as a value that can be saved and restored."""
        state = self.model_state(model_name)
        return Placement(
            physical_to_logical_map=state.physical_to_logical_map,
            num_logical_experts=state.num_logical_experts,
            num_ranks=self._num_ranks,
            num_nodes=self._num_nodes,
            metadata={"model_name": model_name, "policy": self._policy.name},
        )

    def save_placement(self, path: str | os.PathLike[str], model_name: str = "model") -> None:
        """Write the model's current placement to ``path`` (``.json`` or ``.safetensors``)."""
        save_placement(self.placement(model_name), path)

    # ------------------------------------------------------------ registration

    def add_model(self, model: MixtureOfExperts, model_name: str = "model") -> None:
        """Register a MoE model: allocate its EPLB tensors and hand them to ``set_eplb_state``.

        The initial placement is the same on every layer: slot ``p < E`` holds
        expert ``p``, redundant slot ``E + i`` holds expert ``i % E``; the
        model's weights must be laid out that way.

        Raises:
            NotMixtureOfExpertsError: the model does not conform to
                ``MixtureOfExperts`` or has no MoE layers (carries the report).
            EplbConfigError: its redundant or physical counts disagree with the
                config or the EP group, or a count (or an EPLB tensor sized from
                them, the window included) exceeds its limit in
                ``moe_protocols.eplb.limits``.
            EplbOwnershipError: the model's MoE layers are registered with a live
                EPLB state already (this one or another; the message names it).
            EplbStateError: the name is taken, its counts disagree with an
                already registered model, ``set_eplb_state`` failed, or the
                expert weights it exposes do not match its counts.
            EplbConfigError: (several EP ranks) ``transfer.buffer_bytes`` cannot
                hold one expert row of the model.
            EplbStateError: (one process, integrity checks on) a redundant slot
                does not hold the same bytes as its expert. Across ranks this is
                checked at the first rearrangement or ``update_mapping``.
            EplbStateError: a layer's ``get_expert_weights()`` raises, yields
                something that is not a tensor, or more than 256 tensors.
        Nothing is registered when any of these is raised, and the model and its
        layers hold what they held before (see ``_wiring.py``).
        """
        check_registrable(model, model_name, self._models, self._config, self._ep, self._num_ranks)
        state = allocate(model, model_name, self._config.window_size, self._device)
        # Everything above read the model only. From here on the layers hold
        # this state's views: a failure gives them back what they held before.
        wiring = WiringSnapshot.capture(model, state.num_layers)
        try:
            self._wire_new(state)
        except BaseException:
            wiring.restore()
            self._tables.discard(model_name)
            raise
        self._models[model_name] = state

    def _wire_new(self, state: ModelEplbState) -> None:
        """Wire a new model's tensors and check its weights (and, in one process, fingerprint)."""
        wire(state)
        check_expert_weights(state)
        if self._ep.is_distributed:
            try:
                receive_budget(state.model.expert_weights, self._transfer)
            except EplbConfigError as exc:
                raise EplbConfigError(f"model {state.model_name!r}: {exc}") from exc
        elif self._integrity != "off":
            # Across ranks the table needs every rank's slots: built at the first move.
            self._tables.take_local(state)

    def remove_model(self, model_name: str) -> None:
        """Release a registered model: this state stops balancing it and forgets its tensors.

        Its layers keep the views they hold until someone registers them again,
        which is now allowed. Nothing is moved: the model keeps its current
        placement (save it first with :meth:`save_placement` to restore it
        in a new state).

        Raises:
            EplbStateError: no model of that name is registered.
        """
        self.model_state(model_name)
        del self._models[model_name]
        self._planned.pop(model_name, None)
        self._tables.discard(model_name)

    def close(self) -> None:
        """Release every registered model (see :meth:`remove_model`); the state can be reused."""
        self._models.clear()
        self._planned.clear()
        self._tables.clear()

    def __enter__(self) -> EplbState:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def reattach(self, model_name: str = "model") -> None:
        """Hand the model's live EPLB tensors to its layers again, through ``set_eplb_state``.

        For code that lent the layers to something else for a while (the
        profiler does): afterwards the layers record into this state's load
        pass and route by its maps, exactly as before.

        Raises:
            EplbStateError: no model of that name, or ``set_eplb_state`` failed.
        """
        wire(self.model_state(model_name))

    def refresh_fingerprints(self, model_name: str = "model") -> None:
        """Fingerprint the model's experts again, after its weights were legitimately changed.

        The fingerprints are taken once, so a model whose served weights are
        replaced in place (a weight update, e.g. in RL training) must be
        refreshed before its next rearrangement, or the move is refused.
        Every slot of an expert must hold the same bytes. Across ranks this is
        a collective: call it on every rank.

        Raises:
            EplbStateError: no model of that name, or two replicas of an expert differ.
        """
        state = self.model_state(model_name)
        if self._integrity == "off":
            return
        self._tables.refresh(state, self._group)

    # ------------------------------------------------------------ per step

    def step(
        self, is_dummy: bool = False, is_profile: bool = False, log_stats: bool = False
    ) -> None:
        """Account for one engine step; rearrange every ``config.step_interval`` steps.

        Call on every EP rank in lockstep (the same calls in the same order),
        since logging and rearranging use collectives.

        - ``is_profile``: a profiling run; returns without touching any state.
        - ``is_dummy``: an idle rank's padding step; the load pass is zeroed and
          nothing is recorded, but the step counter advances, so all ranks
          rearrange together.
        - otherwise the load pass of every model is copied into the window at
          :attr:`window_step` (circular), then zeroed. Every step is recorded
          (vLLM records only the last ``window_size`` steps of each interval;
          that optimisation is omitted).
        - ``log_stats`` (a runner passes ``config.log_balancedness``): every
          ``config.log_balancedness_interval`` steps, the balancedness of this
          pass (summed over ranks) is logged on rank 0 to the
          ``moe_protocols.eplb`` logger at INFO, as vLLM does.

        The first rearrangement happens after ``step_interval`` steps.

        Raises:
            EplbStateError: no model is registered.
        """
        if is_profile:
            return
        if not self._models:
            raise EplbStateError("EplbState.step() called before any model was registered")
        if is_dummy:
            for state in self._models.values():
                state.expert_load_pass.zero_()
        if log_stats and self._step % self._config.log_balancedness_interval == 0:
            log_pass_balancedness(
                self._models.values(),
                self._ep,
                self._num_ranks,
                self._step,
                self.steps_until_rearrangement,
            )
        if not is_dummy:
            for state in self._models.values():
                state.expert_load_window[self._window_step].copy_(state.expert_load_pass)
                state.expert_load_pass.zero_()
            self._window_step = (self._window_step + 1) % self._config.window_size
        self._step += 1
        self._steps_taken += 1
        if self._step >= self._config.step_interval:
            self._step = 0
            self.rearrange()

    # ------------------------------------------------------------ rearrangement

    def rearrange(self) -> RearrangementResult:
        """Plan a new placement for every model from the window's load, move weights, commit maps.

        Per model: the window is summed and scattered onto logical experts,
        all-reduced over the EP group, and handed to the policy with the current
        placement; the result is validated, every changed slot is staged from
        the old weights, and only when every model staged are the weights and
        maps written (maps in place). The window and load pass are then cleared.
        Call on every EP rank in lockstep (``step`` does).

        Across ranks, before anything moves, the ranks check that they made
        the same number of ``step()`` calls and rearrangements, and that every
        rank computed the same placements (a fingerprint compared with one
        all-reduce); then rows cross ranks and a final vote commits them on
        every rank or on none.

        Every collective has a deadline (``ep.collective_timeout``, else the
        process group's timeout; see ``_deadline.py``): a rank that dies or
        hangs is named by every other rank instead of stalling them.

        Raises:
            EplbStateError: no model is registered; or, across ranks, the ranks
                are out of lockstep, computed different placements or another
                rank failed to plan.
            CollectiveTimeoutError: (an ``EplbStateError``) across ranks, on
                every rank that arrived, when a rank did not arrive at a
                collective before the deadline (it died, hung or its connection
                dropped): ``missing_ranks`` names it, ``phase`` where the group
                broke. The process group is unusable afterwards.
            ExpertLoadError: (an ``EplbStateError``) a layer recorded negative
                load (``layers`` names them).
            EplbStateError: (across ranks, at the first move) a rank's copy of
                a replicated expert holds other bytes than the others' (see
                ``integrity``).
            PolicyError: the policy failed or returned an invalid placement.
            TransferError: staging the weights failed on some rank (``rank``
                and ``layer`` name the first failure), a staged or written row
                does not hold its expert's fingerprint, a weight cannot be
                written in place, or the copy failed part-way (the rows written
                are put back); a ``TransferTimeoutError``
                (also a ``CollectiveTimeoutError``) when a rank went missing in
                the exchange or the commit vote (``rank``: the missing one).
        On any of these, weights, maps, window and counters are unchanged on
        every rank that raises.

        A window without load moves nothing: the result says ``skipped`` and
        why, and a warning is logged once; a layer without load keeps its
        placement (``layers_without_load``).
        """
        if not self._models:
            raise EplbStateError("EplbState.rearrange() called before any model was registered")
        plans = self._plan_all()
        staged = stage_plans(plans, self._group, self._transfer)
        committed = commit(plans, staged, self._group, self._tables)
        results = summarise_all(plans, staged, committed)
        for state in self._models.values():
            _clear_load(state)
        self._window_step = 0
        self._rearrangements += 1
        for summary in results.values():
            if summary.skipped is None:
                self._planned[summary.model_name] = summary.overall_balancedness_after
        result = RearrangementResult(models=results, policy=self._policy.name)
        self._last = result
        if self._ep.rank == 0:
            self._log.log(result)
        return result

    def _plan_all(self) -> list[ModelPlan]:
        """Every model's plan; across ranks, checked to be in lockstep and agreed on first."""
        distributed = self._ep.is_distributed
        if distributed:
            readable, mine = describe(
                self._models, (self._policy.name, self._integrity, self._num_ranks, self._num_nodes)
            )
            self._group.check_lockstep((self._steps_taken, self._rearrangements), readable, mine)
        loads = [window_load(state, self._group) for state in self._models.values()]
        plans: list[ModelPlan] = []
        failure: Exception | None = None
        try:
            for state, load in zip(self._models.values(), loads, strict=True):
                previous = self._planned.get(state.model_name)
                plans.append(self._planner.rearrangement(state, load, previous))
        except Exception as exc:
            if not distributed:
                raise
            failure = exc
        if distributed:
            self._group.check_plans(
                failure,
                lambda: [
                    digest([(p.state.model_name, counts(p.state.model)) for p in plans]),
                    digest([int_rows(p.new_map) for p in plans]),
                    digest([self._layout(p.state) for p in plans]),
                ],
                self._policy.name,
            )
            self._tables.ensure(plans, self._group)
        return plans

    # ------------------------------------------------------------ across ranks

    def _registered_models(self) -> list[tuple[str, MixtureOfExperts]]:
        return [(name, state.model) for name, state in self._models.items()]

    def _layout(self, state: ModelEplbState) -> int:
        return layout_digest_under(state.model.expert_weights, self._transfer)

    # ------------------------------------------------------------ restoring a placement

    def update_mapping(self, model_name: str, physical_to_logical_map: Tensor | Placement) -> None:
        """Move a model to a given placement (e.g. one saved earlier) and commit it in place.

        The map is ``[L, P]`` with ids in ``[0, E)``, every expert replicated at
        least once per layer, and ``P`` a multiple of the EP ranks; a
        :class:`Placement` must also be for ``E`` logical experts and the same
        number of ranks. The weights are moved so the model computes the same
        outputs; the load pass and window of the model are cleared.

        Across ranks every rank must pass the same placement (compared by
        fingerprint before anything moves); rows cross ranks and are committed
        on every rank or on none, as in :meth:`rearrange`.

        Raises:
            EplbStateError: no model of that name; across ranks, also weight
                layouts or transfer options that differ between ranks.
            CollectiveTimeoutError: (an ``EplbStateError``) across ranks, a rank
                did not arrive at the placement agreement, the exchange or the
                commit vote before the deadline (a ``TransferTimeoutError``,
                also a ``TransferError``, in the last two); see :meth:`rearrange`.
            MappingError: the placement is malformed or does not fit the model;
                across ranks, also when another rank rejected its placement or
                the ranks were given different placements.
            TransferError: moving the weights failed (on some rank).
        On any error nothing changes (on any rank).
        """
        failure: Exception | None = None
        plan: ModelPlan | None = None
        try:
            plan = self._planner.restoring(self.model_state(model_name), physical_to_logical_map)
        except Exception as exc:
            if not self._ep.is_distributed:
                raise
            failure = exc
        if self._ep.is_distributed:
            self._group.check_placement(
                failure,
                lambda: (
                    []
                    if plan is None
                    else [digest(int_rows(plan.new_map)), self._layout(plan.state)]
                ),
                model_name,
            )
        # A rank without a plan re-raised its failure in the agreement above.
        assert plan is not None
        self._tables.ensure([plan], self._group)  # one process: every model has its table
        staged = stage_plans([plan], self._group, self._transfer)
        commit([plan], staged, self._group, self._tables)
        _clear_load(plan.state)
        self._planned.pop(model_name, None)

    @classmethod
    def from_mapping(
        cls,
        model: MixtureOfExperts,
        config: EplbConfig,
        physical_to_logical_map: Tensor | Placement,
        *,
        ep: ExpertParallelContext = _SINGLE_PROCESS,
        policies: PolicyRegistry = DEFAULT_POLICIES,
        device: torch.device | str = "cpu",
        model_name: str = "model",
        num_ranks: int | None = None,
        num_nodes: int | None = None,
        transfer: TransferOptions = _DEFAULT_TRANSFER,
        integrity: IntegrityMode = "sampled",
    ) -> EplbState:
        """A new state with ``model`` registered and moved to the given placement.

        Takes every option the constructor takes. Same as ``EplbState(config, ...)``,
        ``add_model(model, model_name)`` and
        ``update_mapping(model_name, physical_to_logical_map)``; raises what they
        raise. When the placement is rejected the model's weights are untouched,
        but it keeps the EPLB views of the discarded state until registered again.
        """
        state = cls(
            config,
            ep=ep,
            policies=policies,
            device=device,
            num_ranks=num_ranks,
            num_nodes=num_nodes,
            transfer=transfer,
            integrity=integrity,
        )
        state.add_model(model, model_name)
        state.update_mapping(model_name, physical_to_logical_map)
        return state

    def __repr__(self) -> str:
        return (
            f"EplbState(models={list(self._models)}, policy={self._policy.name!r}, "
            f"step={self._step}/{self._config.step_interval}, ep={self._ep.rank}/"
            f"{self._ep.world_size}, ranks={self._num_ranks})"
        )


def _clear_load(state: ModelEplbState) -> None:
    # Load recorded under the old placement would be attributed to the wrong
    # experts by the next rearrangement; the window starts afresh.
    state.expert_load_pass.zero_()
    state.expert_load_window.zero_()
