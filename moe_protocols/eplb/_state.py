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

import itertools
import logging
import math
import time
from typing import TYPE_CHECKING, Final, TypeVar, final

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import int_list, int_rows
from moe_protocols.conformance import check_conformance
from moe_protocols.errors import (
    EplbConfigError,
    EplbOwnershipError,
    EplbStateError,
    ExpertLoadError,
    MappingError,
    MoEProtocolsError,
    NotMixtureOfExpertsError,
    PolicyError,
    TransferError,
)
from moe_protocols.parallel import ExpertParallelContext

from . import _limits
from ._deadline import Deadline, Phase, run_phase
from ._distributed import (
    GroupVerdict,
    TransferJob,
    TransferOptions,
    agree,
    digest,
    exchange_expert_weights,
    layout_digest,
    receive_budget,
)
from ._fingerprint import INTEGRITY_MODES, IntegrityMode
from ._integrity import (
    UndoRows,
    aliasing_problem,
    build_table,
    check_staged,
    check_writable,
    check_written,
    slot_digests,
)
from ._mapping_io import Placement, save_placement
from ._maps import compute_logical_maps, initial_placement, max_replicas, validate_placement
from ._metrics import expected_rank_loads, rank_loads_from_physical, slots_changed
from ._ownership import find_owner, track_owner
from ._policy import DEFAULT_POLICIES, PolicyRegistry, RebalancePolicy, check_policy_output
from ._results import (
    BalancednessStats,
    ModelRearrangement,
    RearrangementResult,
    mean_with_data,
    per_layer_with_data,
)
from ._transfer import (
    StagedTransfer,
    TransferPlan,
    TransferStats,
    plan_transfer,
    stage_transfer,
)
from ._wiring import WiringSnapshot

if TYPE_CHECKING:
    import os
    from collections.abc import Callable, Sequence

    from moe_protocols.protocols import MixtureOfExperts

    from ._config import EplbConfig

__all__ = [
    "BalancednessStats",
    "EplbState",
    "ModelEplbState",
    "ModelRearrangement",
    "RearrangementResult",
]

logger: Final = logging.getLogger("moe_protocols.eplb")

_SINGLE_PROCESS: Final = ExpertParallelContext()
_DEFAULT_TRANSFER: Final = TransferOptions()
_T = TypeVar("_T")


@attrs.frozen(eq=False)
class ModelEplbState:
    """The live EPLB tensors of one registered model.

    The model's MoE layers hold views of these tensors, so they are never
    rebound, only written in place by :class:`EplbState`. Treat them as
    read-only: writing into them changes what the layers route to without
    moving any weight.
    """

    model_name: str
    """Name the model was registered under."""
    model: MixtureOfExperts
    """The registered model (for example a ``MoEView``); its expert weights are moved in place."""
    physical_to_logical_map: Tensor
    """``[L, P]`` int64: logical expert held by each physical slot."""
    logical_to_physical_map: Tensor
    """``[L, E, max_replicas]`` int64: physical slots of each expert, ascending, ``-1`` padded."""
    logical_replica_count: Tensor
    """``[L, E]`` int64: replicas of each expert."""
    expert_load_pass: Tensor
    """``[L, P]`` int32: load the layers recorded since the last ``step()``."""
    expert_load_window: Tensor
    """``[W, L, P]`` int32: the load of the last ``W`` recorded steps (circular)."""
    num_local_physical_experts: int
    """Physical slots per EP rank."""

    @property
    def num_layers(self) -> int:
        """MoE layers ``L``."""
        return int(self.physical_to_logical_map.shape[0])

    @property
    def num_physical_experts(self) -> int:
        """Physical slots ``P``."""
        return int(self.physical_to_logical_map.shape[1])

    @property
    def num_logical_experts(self) -> int:
        """Logical experts ``E``."""
        return int(self.logical_replica_count.shape[1])

    @property
    def max_replicas(self) -> int:
        """Last dimension of ``logical_to_physical_map`` (``P - E + 1``)."""
        return int(self.logical_to_physical_map.shape[2])


@attrs.frozen(eq=False)
class _ModelPlan:
    """One model's planned rearrangement, checked and ready to stage."""

    state: ModelEplbState
    old_map: Tensor
    new_map: Tensor
    logical_maps: tuple[Tensor, Tensor]
    summary: ModelRearrangement  # transfer_seconds: planning so far; the rest after the commit
    transfer: TransferPlan  # planned before staging, so a rank that cannot plan tells the others


def _ep_problem(
    model: MixtureOfExperts, config: EplbConfig, ep: ExpertParallelContext
) -> str | None:
    if model.num_redundant_experts != config.num_redundant_experts:
        return (
            f"has num_redundant_experts={model.num_redundant_experts} but the EPLB config "
            f"asks for num_redundant_experts={config.num_redundant_experts}"
        )
    if model.num_physical_experts != ep.world_size * model.num_local_physical_experts:
        return (
            f"has num_physical_experts={model.num_physical_experts}, which is not "
            f"world_size={ep.world_size} x num_local_physical_experts="
            f"{model.num_local_physical_experts}"
        )
    return None


_SHARED_COUNTS: Final = (
    "num_routed_experts",
    "num_redundant_experts",
    "num_physical_experts",
    "num_logical_experts",
    "num_local_physical_experts",
    "num_expert_groups",
)


def _counts(model: MixtureOfExperts) -> dict[str, int]:
    return {name: int(getattr(model, name)) for name in _SHARED_COUNTS}


_SIZE_LIMITS: Final = (
    ("num_moe_layers", "MAX_LAYERS"),
    ("num_logical_experts", "MAX_LOGICAL_EXPERTS"),
    ("num_physical_experts", "MAX_PHYSICAL_SLOTS"),
    ("num_expert_groups", "MAX_EXPERT_GROUPS"),
)
_MAX_WEIGHTS_PER_LAYER: Final = 256
"""Weight tensors one MoE layer may expose (real layers have 2 or 3)."""


def _collected_weights(model: MixtureOfExperts, model_name: str) -> list[list[Tensor]]:
    """Every layer's ``get_expert_weights()``, bounded and checked to be tensors.

    Read before anything else touches the weights (the ownership check reads
    their storage), so a layer that yields a list, an endless iterator or
    raises is refused with a typed error, not an ``AttributeError`` or a hang.
    """
    collected: list[list[Tensor]] = []
    layers = model.moe_layers
    for index in range(model.num_moe_layers):
        where = f"model {model_name!r}: moe_layers[{index}].get_expert_weights()"
        try:
            found = list(
                itertools.islice(layers[index].get_expert_weights(), _MAX_WEIGHTS_PER_LAYER + 1)
            )
        except Exception as exc:
            raise EplbStateError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        if len(found) > _MAX_WEIGHTS_PER_LAYER:
            raise EplbStateError(
                f"{where} yields more than {_MAX_WEIGHTS_PER_LAYER} weight tensors"
            )
        for k, weight in enumerate(found):
            if not isinstance(weight, Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
                raise EplbStateError(
                    f"{where} item {k} is a {type(weight).__name__}, not a torch.Tensor"
                )
        collected.append(found)
    return collected


@final
class EplbState:
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
        if integrity not in INTEGRITY_MODES:
            raise EplbConfigError(
                f"EplbState: integrity must be one of {', '.join(map(repr, INTEGRITY_MODES))}, "
                f"got {integrity!r}"
            )
        self._integrity: IntegrityMode = integrity
        self._tables: dict[str, Tensor] = {}
        ranks = ep.world_size if num_ranks is None else num_ranks
        nodes = ep.num_nodes if num_nodes is None else num_nodes
        for name, value in (("num_ranks", ranks), ("num_nodes", nodes)):
            if type(value) is not int or value < 1:
                raise EplbConfigError(f"EplbState: {name} must be an int >= 1, got {value!r}")
            limit = "MAX_RANKS" if name == "num_ranks" else "MAX_NODES"
            _limits.check_count(f"EplbState: {name}", value, limit, EplbConfigError)
        if ranks % ep.world_size != 0:
            raise EplbConfigError(
                f"EplbState: num_ranks={ranks} must be a multiple of the EP group's "
                f"world_size={ep.world_size} (each process holds whole placement ranks)"
            )
        if ranks % nodes != 0:
            raise EplbConfigError(
                f"EplbState: num_nodes={nodes} must divide num_ranks={ranks} "
                "(every node holds the same number of ranks)"
            )
        self._num_ranks, self._num_nodes = ranks, nodes
        try:
            self._policy: RebalancePolicy = policies.get(config.policy)
        except PolicyError as exc:
            raise EplbConfigError(
                f"EplbConfig.policy={config.policy!r} is not a known EPLB policy; "
                f"known policies: {', '.join(policies.names) or '(none)'}"
            ) from exc
        try:
            self._device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise EplbConfigError(
                f"EplbState: device {device!r} is not a torch device: {exc}"
            ) from exc
        self._config = config
        self._ep = ep
        self._transfer = transfer
        self._models: dict[str, ModelEplbState] = {}
        self._window_step = 0
        self._step = 0
        self._steps_taken = 0
        self._rearrangements = 0
        self._last: RearrangementResult | None = None
        self._planned: dict[str, float] = {}
        self._warned: set[tuple[str, tuple[int, ...]]] = set()
        track_owner(self)

    # ------------------------------------------------------------ introspection

    @property
    def config(self) -> EplbConfig:
        """The configuration this state was built with."""
        return self._config

    @property
    def num_ranks(self) -> int:
        """Placement ranks the policy plans for (a multiple of ``ep.world_size``)."""
        return self._num_ranks

    @property
    def num_nodes(self) -> int:
        """Nodes the placement ranks are spread over (hierarchical policies keep groups in one)."""
        return self._num_nodes

    @property
    def ep(self) -> ExpertParallelContext:
        """The EP group this state balances over."""
        return self._ep

    @property
    def transfer_options(self) -> TransferOptions:
        """How weights move between EP ranks."""
        return self._transfer

    @property
    def policy(self) -> RebalancePolicy:
        """The rebalancing policy named by ``config.policy``."""
        return self._policy

    @property
    def device(self) -> torch.device:
        """Device of the EPLB tensors."""
        return self._device

    @property
    def model_names(self) -> tuple[str, ...]:
        """Registered model names, in registration order."""
        return tuple(self._models)

    @property
    def step_counter(self) -> int:
        """Steps since the last rearrangement (vLLM's ``expert_rearrangement_step``)."""
        return self._step

    @property
    def steps_taken(self) -> int:
        """Calls to ``step()`` so far (dummy ones included, profile ones not).

        Equal on every EP rank when the ranks are in lockstep; checked at each
        rearrangement.
        """
        return self._steps_taken

    @property
    def steps_until_rearrangement(self) -> int:
        """Calls to ``step()`` (dummy ones included) before the next rearrangement."""
        return self._config.step_interval - self._step

    @property
    def window_step(self) -> int:
        """Window row the next recorded step is written to."""
        return self._window_step

    @property
    def num_rearrangements(self) -> int:
        """Rearrangements performed so far."""
        return self._rearrangements

    @property
    def last_rearrangement(self) -> RearrangementResult | None:
        """The result of the latest ``rearrange()``, or ``None`` before the first."""
        return self._last

    def model_state(self, model_name: str = "model") -> ModelEplbState:
        """The live EPLB tensors of a model (read-only: the model's layers hold views of them)."""
        try:
            return self._models[model_name]
        except KeyError:
            raise EplbStateError(
                f"no model named {model_name!r} is registered with this EPLB state; "
                f"registered: {list(self._models) or '(none)'}"
            ) from None

    def physical_to_logical_map(self, model_name: str = "model") -> Tensor:
        """A copy of the model's ``[L, P]`` placement (the live one is in :meth:`model_state`)."""
        return self.model_state(model_name).physical_to_logical_map.clone()

    def logical_to_physical_map(self, model_name: str = "model") -> Tensor:
        """A copy of the model's ``[L, E, max_replicas]`` map (``-1`` padded)."""
        return self.model_state(model_name).logical_to_physical_map.clone()

    def logical_replica_count(self, model_name: str = "model") -> Tensor:
        """A copy of the model's ``[L, E]`` replica counts."""
        return self.model_state(model_name).logical_replica_count.clone()

    def expert_load_window(self, model_name: str = "model") -> Tensor:
        """A copy of the model's ``[W, L, P]`` load window."""
        return self.model_state(model_name).expert_load_window.clone()

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
        report = check_conformance(model, path=model_name)
        if not report.ok or not report.is_moe:
            raise NotMixtureOfExpertsError(
                f"cannot register model {model_name!r} with EPLB: it is not a Mixture-of-Experts "
                f"model with MoE layers:\n{report}",
                reports=[report],
            )
        if model_name in self._models:
            raise EplbStateError(f"a model named {model_name!r} is already registered")
        self._check_sizes(model, model_name)
        _collected_weights(model, model_name)  # before find_owner reads their storage
        claim = find_owner(model)
        if claim is not None:
            raise EplbOwnershipError(
                f"cannot register model {model_name!r} with EPLB: its MoE layers "
                f"{list(claim.layers)} are already registered with {claim.describe()}. "
                "Registering them again would hand the layers other tensors and silently "
                "detach that state (its load would read zero and its next rearrangement "
                f"would corrupt outputs). Release them first: remove_model({claim.model_name!r}) "
                "or close() on that state",
                owner_model_name=claim.model_name,
                layers=claim.layers,
            )
        problem = _ep_problem(model, self._config, self._ep)
        if problem is not None:
            raise EplbConfigError(f"model {model_name!r} {problem}")
        if model.num_physical_experts % self._num_ranks != 0:
            raise EplbConfigError(
                f"model {model_name!r} has {model.num_physical_experts} physical expert slots, "
                f"which do not split evenly over the {self._num_ranks} placement ranks"
            )
        counts = _counts(model)
        for other in self._models.values():
            other_counts = _counts(other.model)
            if counts != other_counts:
                diff = {
                    k: (counts[k], other_counts[k]) for k in counts if counts[k] != other_counts[k]
                }
                raise EplbStateError(
                    f"model {model_name!r} disagrees with registered model {other.model_name!r} "
                    f"on {', '.join(f'{k} ({a} vs {b})' for k, (a, b) in diff.items())}; all "
                    "models in one EPLB state must share their expert counts"
                )
        state = self._allocate(model, model_name)
        # Everything above read the model only. From here on the layers hold
        # this state's views: a failure gives them back what they held before.
        wiring = WiringSnapshot.capture(model, state.num_layers)
        try:
            self._wire(state)
            self._check_expert_weights(state)
            if self._ep.is_distributed:
                try:
                    receive_budget(state.model.expert_weights, self._transfer)
                except EplbConfigError as exc:
                    raise EplbConfigError(f"model {model_name!r}: {exc}") from exc
            elif self._integrity != "off":
                # Across ranks the table needs every rank's slots: built at the first move.
                table = self._fingerprint_table(state, self._local_digests(state))
                self._tables[model_name] = table
        except BaseException:
            wiring.restore()
            self._tables.pop(model_name, None)
            raise
        self._models[model_name] = state

    def _check_sizes(self, model: MixtureOfExperts, model_name: str) -> None:
        """Refuse counts over the limits (``_limits``) before anything is allocated for them."""
        what = f"model {model_name!r}: "
        for name, limit in _SIZE_LIMITS:
            _limits.check_count(what + name, int(getattr(model, name)), limit, EplbConfigError)
        layers, logical, physical = (
            model.num_moe_layers,
            model.num_logical_experts,
            model.num_physical_experts,
        )
        for shape, limit in (
            ((layers, physical), "MAX_MAP_ENTRIES"),
            ((layers, logical, physical - logical + 1), "MAX_REPLICA_MAP_ENTRIES"),
            ((self._config.window_size, layers, physical), "MAX_WINDOW_ENTRIES"),
        ):
            _limits.check_product(what + "an EPLB tensor", shape, limit, EplbConfigError)

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
        self._tables.pop(model_name, None)

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
        state = self.model_state(model_name)
        self._wire(state)

    @property
    def integrity(self) -> IntegrityMode:
        """How moved weights are checked against the experts' fingerprints."""
        return self._integrity

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
        table = self._fingerprint_table(state, self._gathered_digests(state))
        self._tables[model_name] = table

    def _local_digests(self, state: ModelEplbState) -> Tensor:
        return slot_digests(state.model.expert_weights, self._integrity)

    def _gathered_digests(self, state: ModelEplbState) -> Tensor:
        """``[L, P]`` fingerprints of every slot of every rank (a collective across ranks)."""
        local = self._local_digests(state)
        if not self._ep.is_distributed:
            return local
        num_local = state.num_local_physical_experts
        everything = torch.zeros(
            state.num_layers, state.num_physical_experts, dtype=torch.int64, device=self._device
        )
        first = self._ep.rank * num_local
        everything[:, first : first + num_local] = local.to(self._device)
        return self._collective(
            "fingerprint gather",
            f"gathering the expert fingerprints of model {state.model_name!r}",
            lambda wait: self._ep.all_reduce_(everything, wait=wait),
        ).cpu()

    @staticmethod
    def _fingerprint_table(state: ModelEplbState, digests: Tensor) -> Tensor:
        return build_table(
            state.model_name,
            digests,
            state.physical_to_logical_map,
            state.num_logical_experts,
            state.num_local_physical_experts,
        )

    def _ensure_tables(self, plans: Sequence[_ModelPlan]) -> None:
        """Across ranks, fingerprint the models that have not been yet (every rank calls it)."""
        if self._integrity == "off":
            return
        for plan in plans:
            name = plan.state.model_name
            if name not in self._tables:
                self._tables[name] = self._fingerprint_table(
                    plan.state, self._gathered_digests(plan.state)
                )

    def _group_failure(self, failure: Exception | None, phase: Phase, what: str) -> int | None:
        """Across ranks, the lowest rank that failed (this one included), or ``None``."""
        if not self._ep.is_distributed:
            return None if failure is None else self._ep.rank
        verdict = self._collective(
            phase,
            what,
            lambda wait: agree(
                self._ep, failed_at=None if failure is None else 0, device=self._device, wait=wait
            ),
        )
        return verdict.failed_rank

    def _commit(
        self, plans: Sequence[_ModelPlan], staged: Sequence[StagedTransfer]
    ) -> list[tuple[TransferStats, float]]:
        """Check the staged rows, commit weights, check what was written, then commit maps.

        Returns each plan's stats and commit seconds. A fingerprint mismatch, a
        weight that cannot be written in place, or a copy that fails part-way,
        on any rank, raises ``TransferError`` on every rank with the weights as
        they were (rows written by the commit are put back) and the maps unchanged.
        """
        pairs = list(zip(plans, staged, strict=True))
        # Before any live byte changes: the staged rows (the undo relies on them)
        # and whether every weight can be written at all.
        self._verify(pairs, self._precheck, "staged check", "checking the staged expert rows")
        undo = [UndoRows.capture(transfer, plan.old_map) for plan, transfer in pairs]
        results: list[tuple[TransferStats, float]] = []
        failure: Exception | None = None
        try:
            for _, transfer in pairs:
                started = time.perf_counter()
                results.append((transfer.commit(), time.perf_counter() - started))
        except Exception as exc:
            failure = TransferError(
                f"EP rank {self._ep.rank}: writing the staged rows into the live expert "
                f"weights failed ({type(exc).__name__}: {exc}); the rows written so far were "
                "put back and nothing was committed",
                rank=self._ep.rank,
            )
            failure.__cause__ = exc
        self._verify(
            pairs,
            self._postcheck,
            "commit check",
            "checking the committed expert rows",
            undo,
            failure,
        )
        for plan, _ in pairs:
            self._commit_maps(plan.state, plan.new_map, plan.logical_maps)
        return results

    def _precheck(self, name: str, transfer: StagedTransfer, new_map: Tensor) -> None:
        check_writable(name, transfer)
        if self._integrity != "off":
            check_staged(name, transfer, self._tables[name], new_map, self._integrity)

    def _postcheck(self, name: str, transfer: StagedTransfer, new_map: Tensor) -> None:
        if self._integrity != "off":
            check_written(name, transfer, self._tables[name], new_map, self._integrity)

    def _verify(
        self,
        pairs: Sequence[tuple[_ModelPlan, StagedTransfer]],
        check: Callable[[str, StagedTransfer, Tensor], None],
        phase: Phase,
        what: str,
        undo: Sequence[UndoRows] = (),
        failure: Exception | None = None,
    ) -> None:
        """Run ``check`` on every transfer and agree across ranks; on any failure put
        ``undo`` back and raise (this rank's error, or one naming the failed rank)."""
        if failure is None:
            try:
                for plan, transfer in pairs:
                    check(plan.state.model_name, transfer, plan.new_map)
            except Exception as exc:
                failure = exc
        try:
            failed_rank = self._group_failure(failure, phase, what)
        except MoEProtocolsError:
            # A peer vanished after the commit: this rank must not keep half a move.
            for rows in undo:
                rows.restore()
            raise
        if failed_rank is None:
            return
        for rows in undo:
            rows.restore()
        if failure is not None:
            raise failure
        raise TransferError(
            f"EP rank {failed_rank} failed while {what} (see its error); EP rank "
            f"{self._ep.rank} committed nothing",
            rank=failed_rank,
        )

    def _registered_models(self) -> list[tuple[str, MixtureOfExperts]]:
        return [(name, state.model) for name, state in self._models.items()]

    @staticmethod
    def _wire(state: ModelEplbState) -> None:
        try:
            state.model.set_eplb_state(
                expert_load_view=state.expert_load_pass,
                logical_to_physical_map=state.logical_to_physical_map,
                logical_replica_count=state.logical_replica_count,
            )
        except Exception as exc:
            raise EplbStateError(
                f"model {state.model_name!r}: set_eplb_state rejected its EPLB tensors: "
                f"{type(exc).__name__}: {exc}"
            ) from exc

    def _allocate(self, model: MixtureOfExperts, model_name: str) -> ModelEplbState:
        num_layers = model.num_moe_layers
        num_logical = model.num_logical_experts
        num_physical = model.num_physical_experts
        p2l = initial_placement(num_layers, num_logical, num_physical)
        l2p, count = compute_logical_maps(p2l, num_logical, max_replicas(num_logical, num_physical))
        device = self._device
        return ModelEplbState(
            model_name=model_name,
            model=model,
            physical_to_logical_map=p2l.to(device),
            logical_to_physical_map=l2p.to(device),
            logical_replica_count=count.to(device),
            expert_load_pass=torch.zeros(
                num_layers, num_physical, dtype=torch.int32, device=device
            ),
            expert_load_window=torch.zeros(
                self._config.window_size, num_layers, num_physical, dtype=torch.int32, device=device
            ),
            num_local_physical_experts=model.num_local_physical_experts,
        )

    @staticmethod
    def _check_expert_weights(state: ModelEplbState) -> None:
        try:
            EplbState._check_weight_layout(state)
        except MoEProtocolsError:
            raise
        except Exception as exc:  # a hostile sequence: its len() or [] raised
            raise EplbStateError(
                f"model {state.model_name!r}: reading expert_weights after set_eplb_state "
                f"raised {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _check_weight_layout(state: ModelEplbState) -> None:
        weights = state.model.expert_weights
        name, local = state.model_name, state.num_local_physical_experts
        if len(weights) != state.num_layers:
            raise EplbStateError(
                f"model {name!r}: after set_eplb_state, expert_weights has {len(weights)} "
                f"layers, expected num_moe_layers={state.num_layers}"
            )
        collected: list[list[Tensor]] = []
        for layer in range(state.num_layers):
            tensors = weights[layer]
            collected.append([])
            if not 0 < len(tensors) <= _MAX_WEIGHTS_PER_LAYER:
                raise EplbStateError(
                    f"model {name!r}: expert_weights[{layer}] holds {len(tensors)} weight "
                    f"tensors; expected 1 to {_MAX_WEIGHTS_PER_LAYER}"
                )
            for k in range(len(tensors)):
                tensor = tensors[k]
                if not isinstance(tensor, Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
                    raise EplbStateError(
                        f"model {name!r}: expert_weights[{layer}][{k}] is a "
                        f"{type(tensor).__name__}, not a torch.Tensor"
                    )
                if tensor.dim() < 1 or tensor.shape[0] != local:
                    raise EplbStateError(
                        f"model {name!r}: expert_weights[{layer}][{k}] has shape "
                        f"{tuple(tensor.shape)}; dim 0 must be the {local} local expert slots"
                    )
                collected[layer].append(tensor)
        problem = aliasing_problem(collected)
        if problem is not None:
            raise EplbStateError(
                f"model {name!r}: {problem}. A move writes every slot in place, so a write to "
                "one slot would change another: give each expert slot its own memory"
            )

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
            self._log_pass_balancedness()
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

    def _log_pass_balancedness(self) -> None:
        for state in self._models.values():
            # A copy: the all-reduce must not add other ranks' load into our pass.
            load = self._ep.all_reduce_(state.expert_load_pass.to(torch.int64))
            rank_load = rank_loads_from_physical(load, self._num_ranks)
            if self._ep.rank != 0:
                continue
            stats = BalancednessStats.from_rank_load(state.model_name, rank_load.cpu())
            if not stats.has_data:
                logger.info(
                    "EPLB step: %d for model %s: no load recorded in this step (no data), "
                    "steps until the next rearrangement: %d",
                    self._step,
                    state.model_name,
                    self.steps_until_rearrangement,
                )
                continue
            logger.info(
                "EPLB step: %d for model %s: avg_tokens=%.2f, max_tokens=%d, "
                "balancedness=%.4f, steps until the next rearrangement: %d",
                self._step,
                state.model_name,
                float(rank_load.double().mean(dim=1).sum()),
                int(rank_load.amax(dim=1).sum()),
                stats.token_weighted,
                self.steps_until_rearrangement,
            )

    def balancedness(self, model_name: str = "model") -> BalancednessStats:
        """Balancedness of the load recorded in the current window, summed over EP ranks.

        Uses the measured per-slot load, so replicas count where they really ran.
        A window without load has no balancedness: the figures are NaN and
        ``has_data`` is False (never a perfect 1.0). An all-reduce: call on
        every EP rank.
        """
        state = self.model_state(model_name)
        physical = self._ep.all_reduce_(state.expert_load_window.sum(dim=0, dtype=torch.int64))
        rank_load = rank_loads_from_physical(physical, self._num_ranks).cpu()
        return BalancednessStats.from_rank_load(model_name, rank_load)

    # ------------------------------------------------------------ rearrangement

    def _window_load(self, state: ModelEplbState) -> Tensor:
        """``[L, P]`` int64 on CPU: the window's load per physical slot, summed over ranks.

        Physical, not logical, so that the realised balancedness can be measured
        per slot and a bad row can be traced to its slot; every rank gets the
        same tensor, so every rank takes the same decisions from it.
        """
        physical = state.expert_load_window.sum(dim=0, dtype=torch.int64)
        return self._collective(
            "load reduce",
            f"all-reducing the expert load of model {state.model_name!r}",
            lambda wait: self._ep.all_reduce_(physical, wait=wait),
        ).cpu()

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
        distributed = self._ep.is_distributed
        if distributed:
            self._check_lockstep()
        loads = [self._window_load(state) for state in self._models.values()]
        plans: list[_ModelPlan] = []
        failure: Exception | None = None
        try:
            for state, load in zip(self._models.values(), loads, strict=True):
                plans.append(self._plan_model(state, load))
        except Exception as exc:
            if not distributed:
                raise
            failure = exc
        if distributed:
            self._agree_on_plans(plans, failure)
            self._ensure_tables(plans)
        staged = self._stage_plans(plans)
        committed = self._commit(plans, staged)

        results: dict[str, ModelRearrangement] = {}
        for plan, transfer, (stats, commit_seconds) in zip(plans, staged, committed, strict=True):
            results[plan.state.model_name] = attrs.evolve(
                plan.summary,
                bytes_moved=stats.bytes_moved,
                layers_changed=stats.layers_changed,
                transfer_seconds=plan.summary.transfer_seconds + transfer.seconds + commit_seconds,
                bytes_sent=stats.bytes_sent,
                bytes_received=stats.bytes_received,
            )
        for state in self._models.values():
            self._clear_load(state)
        self._window_step = 0
        self._rearrangements += 1
        for summary in results.values():
            if summary.skipped is None:
                self._planned[summary.model_name] = summary.overall_balancedness_after
        result = RearrangementResult(models=results, policy=self._policy.name)
        self._last = result
        if self._ep.rank == 0:
            self._log_rearrangement(result)
        return result

    def _warn_once(self, key: tuple[str, tuple[int, ...]], message: str, *args: object) -> None:
        if key in self._warned:
            logger.debug(message, *args)
            return
        self._warned.add(key)
        logger.warning(message, *args)

    def _log_rearrangement(self, result: RearrangementResult) -> None:
        for summary in result.models.values():
            name = summary.model_name
            if summary.skipped is not None:
                self._warn_once(
                    (name, ()), "EPLB did not rearrange model %r: %s", name, summary.skipped
                )
                continue
            if summary.layers_without_load:
                self._warn_once(
                    (name, summary.layers_without_load),
                    "EPLB: MoE layers %s of model %r recorded no load in the window while "
                    "other layers did; their placement is kept. Check that these layers add "
                    "their routed tokens to their row of expert_load_view",
                    list(summary.layers_without_load),
                    name,
                )
            logger.info(
                "EPLB rearranged experts in %.2f s: %s",
                summary.policy_seconds + summary.transfer_seconds,
                summary,
            )

    # ------------------------------------------------------------ across ranks

    def _collective(self, phase: Phase, what: str, run: Callable[[Deadline], _T]) -> _T:
        """Run ``run(deadline)``; a failure names the ranks that did not arrive (see _deadline)."""
        return run_phase(
            self._ep, phase, what, run, device=self._device, hook=self._transfer.phase_hook
        )

    def _descriptor(self) -> tuple[str, int]:
        """What every rank must agree on before a collective whose size depends on it.

        ``(readable, digest)``: the registered models with their shapes and the
        settings the rearrangement depends on.
        """
        models = [
            (
                name,
                state.num_layers,
                state.num_logical_experts,
                state.num_physical_experts,
                state.num_local_physical_experts,
                int(state.expert_load_window.shape[0]),
                [
                    [(tuple(w.shape[1:]), str(w.dtype)) for w in weights]
                    for weights in state.model.expert_weights
                ],
            )
            for name, state in self._models.items()
        ]
        readable = "; ".join(
            f"model {name!r}: {layers} MoE layers, {logical} experts in {physical} slots "
            f"({local} local), window {window}"
            for name, layers, logical, physical, local, window, _ in models
        )
        settings = (self._policy.name, self._integrity, self._num_ranks, self._num_nodes)
        readable += (
            f"; policy {settings[0]!r}, integrity {settings[1]!r}, {settings[2]} placement "
            f"ranks on {settings[3]} nodes"
        )
        return readable, digest(models, settings) + 1  # never 0: 0 means "not this rank's"

    def _check_lockstep(self) -> None:
        """Check that every rank made the same steps and rearrangements, with the same models.

        One all-reduce of a fixed size (``4 + world_size``), before any
        collective whose size depends on the models: ranks whose models or
        settings differ are named by every rank instead of crashing a peer with
        a collective of mismatched size.
        """
        counts = (self._steps_taken, self._rearrangements)
        readable, mine = self._descriptor()
        world, rank = self._ep.world_size, self._ep.rank
        values = torch.tensor(
            [v for c in counts for v in (c, -c)] + [mine if r == rank else 0 for r in range(world)],
            dtype=torch.int64,
            device=self._device,
        )
        self._collective(
            "lockstep check",
            "checking that the EP ranks are in lockstep",
            lambda wait: self._ep.all_reduce_(values, op="max", wait=wait),
        )
        reduced = int_list(values)
        descriptors = reduced[4:]
        if len(set(descriptors)) > 1:
            differ = [r for r in range(world) if descriptors[r] != descriptors[0]]
            raise EplbStateError(
                f"EP ranks {', '.join(map(str, differ))} registered other models, shapes or "
                f"settings than EP rank 0 (EP rank {rank} has: {readable}). Every rank must "
                "register the same models, with the same expert counts, layers, weight "
                "shapes and dtypes, and use the same policy and settings; nothing was changed"
            )
        most_steps, fewest_steps, most_rearr, fewest_rearr = (
            v if i % 2 == 0 else -v for i, v in enumerate(reduced[:4])
        )
        spread: list[str] = []
        if most_steps != fewest_steps:
            spread.append(
                f"between {fewest_steps} and {most_steps} step() calls (EP rank "
                f"{self._ep.rank}: {counts[0]})"
            )
        if most_rearr != fewest_rearr:
            spread.append(
                f"between {fewest_rearr} and {most_rearr} rearrangements (EP rank "
                f"{self._ep.rank}: {counts[1]})"
            )
        if spread:
            raise EplbStateError(
                f"EP ranks are out of lockstep: the EP group made {' and '.join(spread)}. Every "
                "rank must call step() the same number of times, dummy steps included, and "
                "rearrange together; nothing was changed"
            )

    def _transfer_plan(
        self, state: ModelEplbState, old_map: Tensor, new_map: Tensor
    ) -> tuple[TransferPlan, float]:
        """This rank's plan of the weight move, and the seconds planning it took."""
        started = time.perf_counter()
        plan = plan_transfer(
            old_map,
            new_map,
            state.num_local_physical_experts,
            self._ep.rank,
            num_nodes=self._ep.num_nodes,
        )
        return plan, time.perf_counter() - started

    def _layout_digest(self, state: ModelEplbState) -> int:
        weights = state.model.expert_weights
        return layout_digest(weights, receive_budget(weights, self._transfer))

    def _agree(
        self, failure: Exception | None, digests: Sequence[int], phase: Phase, what: str
    ) -> GroupVerdict:
        """One agreement round; this rank's own failure is re-raised as is."""
        verdict = self._collective(
            phase,
            what,
            lambda wait: agree(
                self._ep,
                failed_at=None if failure is None else 0,
                digests=digests,
                device=self._device,
                wait=wait,
            ),
        )
        if failure is not None:
            raise failure
        return verdict

    def _agree_on_plans(self, plans: Sequence[_ModelPlan], failure: Exception | None) -> None:
        """Across ranks: share planning failures and compare what every rank is about to do."""
        digests = [0, 0, 0]
        if failure is None:
            try:
                digests = [
                    digest([(p.state.model_name, _counts(p.state.model)) for p in plans]),
                    digest([int_rows(p.new_map) for p in plans]),
                    digest([self._layout_digest(p.state) for p in plans]),
                ]
            except Exception as exc:
                failure = exc
        verdict = self._agree(failure, digests, "plan agreement", "agreeing on the new placements")
        if verdict.failed_rank is not None:
            raise EplbStateError(
                f"EP rank {verdict.failed_rank} failed to plan the new placements (see its "
                f"error); EP rank {self._ep.rank} changed nothing"
            )
        if not verdict.digests_agree:
            what = [
                (
                    "their registered models (names or expert counts)",
                    "the placements their policies computed from the same all-reduced load "
                    f"(policy {self._policy.name!r} must be deterministic)",
                    "their expert weight layouts or transfer options",
                )[i]
                for i in verdict.mismatched
            ]
            raise EplbStateError(
                f"EP ranks disagree on the rearrangement: {'; '.join(what)} differ across "
                f"ranks. EP rank {self._ep.rank} changed nothing"
            )

    def _stage_plans(self, plans: Sequence[_ModelPlan]) -> list[StagedTransfer]:
        """Stage every plan: local copies in one process, a group-wide exchange across ranks."""
        if not self._ep.is_distributed:
            return [self._stage(p.state, p.transfer) for p in plans]
        jobs = [
            TransferJob(p.state.model_name, p.transfer, p.state.model.expert_weights) for p in plans
        ]
        return list(
            exchange_expert_weights(jobs, self._ep, options=self._transfer, device=self._device)
        )

    # ------------------------------------------------------------ planning

    @staticmethod
    def _check_load(state: ModelEplbState, physical: Tensor) -> None:
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

    def _plan_model(self, state: ModelEplbState, physical: Tensor) -> _ModelPlan:
        """Ask the policy for a new placement of one model; check it, derive maps and figures.

        ``physical`` is the window's ``[L, P]`` load summed over ranks. With no
        load at all, the policy is not called and nothing moves; a layer
        without load keeps its placement (a plan on zeros is a guess).
        """
        self._check_load(state, physical)
        num_ranks, num_nodes = self._num_ranks, self._num_nodes
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
                f"no load was recorded in the window ({self._config.window_size} steps); "
                "are its MoE layers adding their routed tokens to the expert_load_view "
                "handed to set_eplb_state?"
            )
            new_map = old_map.clone()
        else:
            new_map = self._ask_policy(state, load, old_map, num_nodes, num_ranks)
            # A layer that recorded nothing keeps its placement.
            new_map[~has_load] = old_map[~has_load]
        policy_seconds = time.perf_counter() - started
        before = per_layer_with_data(expected_rank_loads(old_map, load, num_ranks), has_load)
        after = per_layer_with_data(expected_rank_loads(new_map, load, num_ranks), has_load)
        realised = rank_loads_from_physical(physical, num_ranks)
        previous = self._planned.get(state.model_name)
        transfer, planning_seconds = self._transfer_plan(state, old_map, new_map)
        summary = ModelRearrangement(
            model_name=state.model_name,
            balancedness_before=before,
            balancedness_after=after,
            overall_balancedness_before=mean_with_data(before),
            overall_balancedness_after=mean_with_data(after),
            slots_changed=slots_changed(old_map, new_map),
            bytes_moved=0,
            layers_changed=0,
            policy_seconds=policy_seconds if skipped is None else 0.0,
            transfer_seconds=planning_seconds,
            old_physical_to_logical_map=old_map,
            new_physical_to_logical_map=new_map,
            total_load=total,
            realised_balancedness=mean_with_data(per_layer_with_data(realised, has_load)),
            previous_planned_balancedness=previous,
            skipped=skipped,
            layers_without_load=(
                () if skipped is not None else tuple(int(i) for i in (~has_load).nonzero()[:, 0])
            ),
        )
        return _ModelPlan(
            state, old_map, new_map, self._logical_maps(state, new_map), summary, transfer
        )

    def _ask_policy(
        self, state: ModelEplbState, load: Tensor, old_map: Tensor, num_nodes: int, num_ranks: int
    ) -> Tensor:
        try:
            proposed = self._policy.rebalance_experts(
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
                f"policy {self._policy.name!r} failed for model {state.model_name!r}: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
        return check_policy_output(
            self._policy.name, proposed, load, state.num_physical_experts, num_ranks
        )

    def _stage(self, state: ModelEplbState, plan: TransferPlan) -> StagedTransfer:
        started = time.perf_counter()
        staged = stage_transfer(plan, state.model.expert_weights)
        return attrs.evolve(staged, seconds=time.perf_counter() - started)

    @staticmethod
    def _logical_maps(state: ModelEplbState, new_map: Tensor) -> tuple[Tensor, Tensor]:
        """``(logical_to_physical_map, logical_replica_count)`` of ``new_map`` on the device."""
        l2p, count = compute_logical_maps(new_map, state.num_logical_experts, state.max_replicas)
        device = state.logical_to_physical_map.device
        return l2p.to(device), count.to(device)

    @staticmethod
    def _commit_maps(
        state: ModelEplbState, new_map: Tensor, logical_maps: tuple[Tensor, Tensor]
    ) -> None:
        # copy_ into the existing tensors: layers (and CUDA graphs) hold their addresses.
        state.physical_to_logical_map.copy_(new_map)
        state.logical_to_physical_map.copy_(logical_maps[0])
        state.logical_replica_count.copy_(logical_maps[1])

    @staticmethod
    def _clear_load(state: ModelEplbState) -> None:
        # Load recorded under the old placement would be attributed to the wrong
        # experts by the next rearrangement; the window starts afresh.
        state.expert_load_pass.zero_()
        state.expert_load_window.zero_()

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
        distributed = self._ep.is_distributed
        failure: Exception | None = None
        plan: _ModelPlan | None = None
        try:
            plan = self._mapping_plan(model_name, physical_to_logical_map)
        except Exception as exc:
            if not distributed:
                raise
            failure = exc
        if distributed:
            digests = [0, 0]
            if plan is not None:
                try:
                    digests = [digest(int_rows(plan.new_map)), self._layout_digest(plan.state)]
                except Exception as exc:
                    failure = exc
            verdict = self._agree(
                failure, digests, "placement agreement", "agreeing on the placement to restore"
            )
            if verdict.failed_rank is not None:
                raise MappingError(
                    f"EP rank {verdict.failed_rank} rejected the placement for model "
                    f"{model_name!r} (see its error); EP rank {self._ep.rank} changed nothing"
                )
            if 0 in verdict.mismatched:
                raise MappingError(
                    f"EP ranks were given different placements for model {model_name!r}; "
                    "every rank must restore the same placement. EP rank "
                    f"{self._ep.rank} changed nothing"
                )
            if not verdict.digests_agree:
                raise EplbStateError(
                    f"EP ranks disagree on the expert weight layout of model {model_name!r} "
                    f"or on their transfer options. EP rank {self._ep.rank} changed nothing"
                )
        # A rank without a plan re-raised its failure in the agreement above.
        assert plan is not None
        if distributed:
            self._ensure_tables([plan])
        staged = self._stage_plans([plan])
        self._commit([plan], staged)
        self._clear_load(plan.state)
        self._planned.pop(model_name, None)

    def _mapping_plan(
        self, model_name: str, physical_to_logical_map: Tensor | Placement
    ) -> _ModelPlan:
        """Check a placement to restore against the model and plan the move to it."""
        state = self.model_state(model_name)
        what = f"placement for model {model_name!r}"
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
            if placement.num_ranks != self._num_ranks:
                raise MappingError(
                    f"{what}: made for {placement.num_ranks} EP ranks, this EPLB state plans "
                    f"for {self._num_ranks}"
                )
            table = placement.physical_to_logical_map
        new_map = validate_placement(
            table,
            num_layers=state.num_layers,
            num_logical=state.num_logical_experts,
            num_physical=state.num_physical_experts,
            num_ranks=self._num_ranks,
            num_nodes=self._num_nodes,
            what=what,
        )
        old_map = state.physical_to_logical_map.to("cpu", copy=True)
        transfer, planning_seconds = self._transfer_plan(state, old_map, new_map)
        # Only the maps matter here; the figures are those of a rearrangement.
        summary = ModelRearrangement(
            model_name=model_name,
            balancedness_before=torch.full((state.num_layers,), math.nan, dtype=torch.float64),
            balancedness_after=torch.full((state.num_layers,), math.nan, dtype=torch.float64),
            overall_balancedness_before=math.nan,
            overall_balancedness_after=math.nan,
            slots_changed=slots_changed(old_map, new_map),
            bytes_moved=0,
            layers_changed=0,
            policy_seconds=0.0,
            transfer_seconds=planning_seconds,
            old_physical_to_logical_map=old_map,
            new_physical_to_logical_map=new_map,
        )
        return _ModelPlan(
            state, old_map, new_map, self._logical_maps(state, new_map), summary, transfer
        )

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
    ) -> EplbState:
        """A new state with ``model`` registered and moved to the given placement.

        Same as ``EplbState(config, ...)``, ``add_model(model, model_name)`` and
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
