"""Experts held in physical slots: the layer side of the EPLB contract, ready-made.

``StackedExperts`` holds any number of weight tensors as ``[local_physical,
...]`` parameters, fills redundant slots with replicas of their expert,
implements ``MoELayer`` and routes through the maps EPLB hands it.
``SwiGLUExperts`` adds the forward of the common SwiGLU expert. Built with
``from_module_list`` from an ``nn.ModuleList`` of per-expert modules, the
container keeps that list's checkpoint keys (``experts.3.gate_proj.weight``):
state-dict hooks translate between them and the stacked parameters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from functools import partial
from typing import TYPE_CHECKING, ClassVar, Final, cast

import torch
from torch import Tensor, nn

from moe_protocols._validate import require_int
from moe_protocols.building._routing import route_to_physical, swiglu_experts
from moe_protocols.eplb._maps import (
    compute_logical_maps,
    initial_physical_to_logical_map,
    max_replicas,
)
from moe_protocols.errors import (
    CheckpointError,
    EplbConfigError,
    EplbStateError,
    MappingError,
    ModelInputError,
)
from moe_protocols.layer_views import LayerEplbRows, layer_eplb_rows
from moe_protocols.parallel import ExpertParallelContext

if TYPE_CHECKING:
    from typing_extensions import Self

__all__ = ["SINGLE_PROCESS", "StackedExperts", "SwiGLUExperts"]

SINGLE_PROCESS: Final = ExpertParallelContext()
"""The default EP context: one rank holds every slot."""


def _count(name: str, what: str, value: object, minimum: int) -> int:
    return require_int(value, minimum=minimum, error=EplbConfigError, label=f"{name}: {what}")


def _checked_weights(name: str, weights: object) -> dict[str, Tensor]:
    """The logical weights ``{name: [logical, ...]}``, checked to agree on the expert count.

    Typed ``object``: callers without a type checker pass anything.
    """
    if not isinstance(weights, Mapping) or not weights:
        raise EplbConfigError(
            f"{name}: needs a non-empty mapping of weight name -> [logical_experts, ...] tensor, "
            f"got {weights!r}"
        )
    checked: dict[str, Tensor] = {}
    items = cast("Mapping[object, object]", weights).items()
    for key, tensor in items:
        if not isinstance(key, str) or not key.isidentifier():
            raise EplbConfigError(
                f"{name}: weight names become parameter names and must be identifiers "
                f"(no dots), got {key!r}"
            )
        if not isinstance(tensor, Tensor) or tensor.dim() < 1 or tensor.shape[0] < 1:
            shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor).__name__
            raise EplbConfigError(
                f"{name}: weight {key!r} must be a [logical_experts, ...] tensor with at least "
                f"one expert, got {shape}"
            )
        checked[key] = tensor
    experts = {key: t.shape[0] for key, t in checked.items()}
    if len(set(experts.values())) != 1:
        raise EplbConfigError(
            f"{name}: the weights disagree on the number of logical experts (dim 0): {experts}"
        )
    return checked


class StackedExperts(nn.Module):
    """Routed experts in physical slots (satisfies ``MoELayer``), for any number of weight tensors.

    Each weight ``name`` given as ``[logical, ...]`` becomes a parameter
    ``[local_physical, ...]``: slot ``i`` of this rank is physical slot
    ``rank * local_physical + i`` and, under the initial placement, holds
    logical expert ``p`` for ``p < logical`` and a replica of expert
    ``p % logical`` for each of the ``num_redundant_experts`` extra slots.
    Until ``set_eplb_state`` is called, :meth:`route` uses private maps of
    the initial placement and records nothing.
    """

    EXPERT_KEYS: ClassVar[Mapping[str, str] | None] = None
    """Default ``{stacked name: per-expert key}`` of :meth:`from_module_list` (None: all)."""

    _default_logical_to_physical: Tensor
    _default_replica_count: Tensor

    def __init__(
        self,
        weights: Mapping[str, Tensor],
        *,
        num_redundant_experts: int = 0,
        ep: ExpertParallelContext = SINGLE_PROCESS,
        top_k: int | None = None,
        name: str | None = None,
    ) -> None:
        super().__init__()
        label = name or type(self).__name__
        checked = _checked_weights(label, weights)
        self._check_design(label, checked)
        num_logical = next(iter(checked.values())).shape[0]
        redundant = _count(label, "num_redundant_experts", num_redundant_experts, 0)
        if top_k is not None:
            _count(label, "top_k", top_k, 1)
        num_physical = num_logical + redundant
        if num_physical % ep.world_size != 0:
            raise EplbConfigError(
                f"{label}: {num_physical} physical experts ({num_logical} logical + {redundant} "
                f"redundant) do not split evenly over {ep.world_size} EP ranks"
            )
        self.label = label
        self.ep = ep
        self.top_k = top_k
        self.num_logical_experts = num_logical
        self.num_physical_experts: int = num_physical
        self.num_local_physical_experts: int = num_physical // ep.world_size
        self.record_expert_load = True
        """Whether :meth:`route` records load once EPLB state is set (off: time a forward)."""
        self.weight_names: tuple[str, ...] = tuple(checked)
        self._expert_keys: dict[str, str] = {}
        self._load_prefix: str | None = None
        self._eplb: LayerEplbRows | None = None
        first = ep.rank * self.num_local_physical_experts
        placement = initial_physical_to_logical_map(num_logical, num_physical)
        local = torch.tensor(placement[first : first + self.num_local_physical_experts])
        for key, tensor in checked.items():
            stacked = tensor.detach()[local.to(tensor.device)].contiguous()
            self.register_parameter(key, nn.Parameter(stacked, requires_grad=tensor.requires_grad))
        self._reset_default_maps()

    @classmethod
    def _check_design(cls, label: str, weights: Mapping[str, Tensor]) -> None:
        """Raise ``EplbConfigError`` unless the weights fit this kind of expert (any do here)."""

    # ------------------------------------------------------------ construction

    @classmethod
    def from_module_list(
        cls,
        experts: Iterable[nn.Module],
        keys: Mapping[str, str] | None = None,
        *,
        num_redundant_experts: int = 0,
        ep: ExpertParallelContext = SINGLE_PROCESS,
        top_k: int | None = None,
        name: str | None = None,
    ) -> Self:
        """Stack the parameters of per-expert modules, keeping their checkpoint keys.

        ``keys`` maps each stacked weight name to the parameter name inside one
        expert, e.g. ``{"gate_proj": "gate_proj.weight", ...}`` (default:
        ``EXPERT_KEYS``, or every parameter with dots replaced by ``_``). Every
        parameter and persistent buffer of every expert must be covered, with
        one shape across experts. Put the container where the list was (same
        attribute name): ``state_dict()`` then holds ``experts.<e>.<key>`` per
        logical expert, as the list did, and ``load_state_dict`` accepts a
        checkpoint saved from the plain model (each slot, replicas included,
        is filled from its expert's tensors under the current placement).
        """
        label = name or cls.__name__
        modules: list[object] = list(experts)
        # Structurally, as the project asks: anything with a state_dict() is a module here.
        saves = [getattr(m, "state_dict", None) for m in modules]
        if not modules or not all(callable(save) for save in saves):
            raise EplbConfigError(
                f"{label}.from_module_list: needs a non-empty list of per-expert modules, "
                f"got {[type(m).__name__ for m in modules]}"
            )
        tensors = [dict(cast("nn.Module", m).state_dict(keep_vars=True)) for m in modules]
        chosen = dict(keys or cls.EXPERT_KEYS or {key.replace(".", "_"): key for key in tensors[0]})
        covered = set(chosen.values())
        for index, found in enumerate(tensors):
            extra, absent = sorted(set(found) - covered), sorted(covered - set(found))
            if extra or absent:
                raise EplbConfigError(
                    f"{label}.from_module_list: expert {index} ({type(modules[index]).__name__}) "
                    + (
                        f"has tensors {extra} that no stacked weight takes (pass keys=)"
                        if extra
                        else ""
                    )
                    + ("; " if extra and absent else "")
                    + (f"lacks {absent}" if absent else "")
                )
        stacked: dict[str, Tensor] = {}
        for stacked_name, key in chosen.items():
            shapes = {tuple(t[key].shape) for t in tensors}
            if len(shapes) != 1:
                raise EplbConfigError(
                    f"{label}.from_module_list: {key!r} differs in shape across experts: "
                    f"{sorted(shapes)}"
                )
            stacked[stacked_name] = torch.stack([t[key].detach() for t in tensors])
            stacked[stacked_name].requires_grad_(tensors[0][key].requires_grad)
        container = cls(
            stacked, num_redundant_experts=num_redundant_experts, ep=ep, top_k=top_k, name=name
        )
        container._keep_checkpoint_keys(chosen)
        return container

    def _keep_checkpoint_keys(self, keys: Mapping[str, str]) -> None:
        self._expert_keys = dict(keys)
        # partial(): torch tags each hook with an attribute, which a bound method refuses.
        self.register_state_dict_post_hook(partial(self._save_per_expert))  # type: ignore[no-untyped-call]  # torch leaves these registrars unannotated
        self.register_load_state_dict_pre_hook(partial(self._load_per_expert))  # type: ignore[no-untyped-call]  # as above
        self.register_load_state_dict_post_hook(partial(self._name_missing_per_expert))  # type: ignore[no-untyped-call]  # as above

    # ------------------------------------------------------------ counts and maps

    @property
    def num_redundant_experts(self) -> int:
        """Physical slots beyond one per logical expert."""
        return self.num_physical_experts - self.num_logical_experts

    @property
    def first_slot(self) -> int:
        """The physical slot of this rank's local slot 0."""
        return self.ep.rank * self.num_local_physical_experts

    def _reset_default_maps(self) -> None:
        placement = torch.tensor(
            [initial_physical_to_logical_map(self.num_logical_experts, self.num_physical_experts)],
            device=self.stacked(self.weight_names[0]).device,
        )
        replicas = max_replicas(self.num_logical_experts, self.num_physical_experts)
        l2p, count = compute_logical_maps(placement, self.num_logical_experts, replicas)
        self.register_buffer("_default_logical_to_physical", l2p[0], persistent=False)
        self.register_buffer("_default_replica_count", count[0], persistent=False)

    def _maps(self) -> tuple[Tensor, Tensor]:
        if self._eplb is None:
            return self._default_logical_to_physical, self._default_replica_count
        return self._eplb.logical_to_physical, self._eplb.replica_count

    def local_logical_experts(self) -> list[int]:
        """The logical expert in each local slot under the current maps (-1: empty slot).

        Reads the maps on the host: for checkpoints and tests, not for a forward.
        """
        l2p, count = (t.cpu().to(torch.int64) for t in self._maps())
        held = torch.arange(l2p.shape[1]).unsqueeze(0) < count.unsqueeze(1)
        experts = torch.arange(l2p.shape[0]).unsqueeze(1).expand_as(l2p)
        slots = torch.full((self.num_physical_experts,), -1, dtype=torch.int64)
        slots[l2p[held]] = experts[held]
        first = self.first_slot
        return [int(e) for e in slots[first : first + self.num_local_physical_experts]]

    def stacked(self, name: str) -> Tensor:
        """The stacked ``[local_physical, ...]`` parameter ``name``."""
        param = self._parameters.get(name)  # not get_parameter(): this runs every forward
        if param is None:
            raise EplbConfigError(
                f"{self.label}: no stacked weight {name!r}; has {self.weight_names}"
            )
        return param

    # ------------------------------------------------------------ MoELayer

    def get_expert_weights(self) -> list[Tensor]:
        """Every stacked weight, ``[local_physical, ...]``, as a view of the live parameter."""
        return [self.stacked(n).data for n in self.weight_names]

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        """Keep row ``moe_layer_idx`` of each model-wide EPLB tensor (views, not copies).

        Nothing is kept unless all three fit (``EplbStateError``/``MappingError``)
        and the row's maps send every expert to 1..max_replicas slots in
        ``[0, num_physical)``: checked here, once, so the forward need not check.
        """
        rows = layer_eplb_rows(
            self.label,
            moe_layer_idx,
            expert_load_view,
            logical_to_physical_map,
            logical_replica_count,
            num_logical=self.num_logical_experts,
            num_physical=self.num_physical_experts,
        )
        count = rows.replica_count.to(torch.int64)
        l2p = rows.logical_to_physical.to(torch.int64)
        if bool(((count < 1) | (count > l2p.shape[1])).any()):
            raise MappingError(
                f"{self.label}: logical_replica_count row {moe_layer_idx} gives an expert a "
                f"replica count outside [1, {l2p.shape[1]}]: {[int(c) for c in count]}"
            )
        used = torch.arange(l2p.shape[1], device=l2p.device).unsqueeze(0) < count.unsqueeze(1)
        slots = l2p[used]
        if bool(((slots < 0) | (slots >= self.num_physical_experts)).any()):
            raise MappingError(
                f"{self.label}: logical_to_physical_map row {moe_layer_idx} sends an expert to a "
                f"slot outside [0, {self.num_physical_experts}): {[int(p) for p in slots]}"
            )
        self._eplb = rows

    @property
    def eplb_state_is_set(self) -> bool:
        """Whether ``set_eplb_state`` handed this layer live EPLB views."""
        return self._eplb is not None

    def check_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Raise ``EplbStateError`` unless the container can adopt these counts."""
        if num_local_physical_experts != self.num_local_physical_experts:
            raise EplbStateError(
                f"{self.label}: holds {self.num_local_physical_experts} local expert slots (fixed "
                f"by its weights), cannot change to {num_local_physical_experts}"
            )
        physical = cast("object", num_physical_experts)  # untyped runners may pass anything
        if (
            isinstance(physical, bool)
            or not isinstance(physical, int)
            or physical < self.num_logical_experts
            or num_physical_experts % num_local_physical_experts != 0
        ):
            raise EplbStateError(
                f"{self.label}: num_physical_experts={num_physical_experts!r} must be an int >= "
                f"{self.num_logical_experts} logical experts and a multiple of "
                f"{num_local_physical_experts} local slots"
            )

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Adopt a new physical slot count (elastic EP); this rank's slots and weights stay.

        The runner then hands over EPLB tensors of the new size with
        ``set_eplb_state``; a forward refuses to run until the EP group has
        ``num_physical_experts // num_local_physical_experts`` ranks.
        """
        self.check_physical_experts_metadata(num_physical_experts, num_local_physical_experts)
        if num_physical_experts != self.num_physical_experts:
            self.num_physical_experts = num_physical_experts
            self._eplb = None  # rows of the old size no longer fit
            self._reset_default_maps()

    # ------------------------------------------------------------ forward helpers

    def route(self, logical_ids: Tensor) -> Tensor:
        """Physical slots ``[tokens, top_k]`` serving the router's choices; records the load.

        See :func:`~moe_protocols.building.route_to_physical` (one vectorised
        step, no host syncs). With EP every rank is fed every token and
        counts only the pairs its own slots serve.
        """
        local, world = self.num_local_physical_experts, self.ep.world_size
        if local * world != self.num_physical_experts:
            raise EplbStateError(
                f"{self.label}: {self.num_physical_experts} physical experts do not match "
                f"{world} EP ranks x {local} local slots; run with an EP group of that size"
            )
        if logical_ids.dim() != 2 or (
            self.top_k is not None and logical_ids.shape[1] != self.top_k
        ):
            raise ModelInputError(
                f"{self.label}: logical_ids must be [tokens, top_k="
                f"{self.top_k if self.top_k is not None else 'k'}], got {tuple(logical_ids.shape)}"
            )
        l2p, count = self._maps()
        load = None
        if self._eplb is not None and self.record_expert_load:
            load = self._eplb.expert_load
        first = self.first_slot
        span = (first, first + local) if self.ep.is_distributed else None
        return route_to_physical(logical_ids, l2p, count, load, count_slots=span)

    def local_slots(self, physical: Tensor) -> Tensor:
        """Local slot index of each physical slot id; -1 where the slot lives on another rank."""
        if not self.ep.is_distributed:
            return physical  # one rank holds every slot
        local = physical - self.first_slot
        here = (local >= 0) & (local < self.num_local_physical_experts)
        return torch.where(here, local, torch.full_like(local, -1))

    def compute_slots(self, logical_ids: Tensor, physical: Tensor) -> Tensor:
        """Local slot computing each (token, k) pair; -1 where another rank serves it.

        ``physical`` is :meth:`route`'s result for ``logical_ids``. A pair served
        here is computed by the first local replica of its expert: replicas
        hold the same weights, so the replicas of one expert on one rank are
        one group of rows (one matmul per projection, not one per replica),
        and outputs stay bit-identical (see ``GROUP_ROWS``). The load was
        recorded per serving slot by :meth:`route`, so EPLB still sees how the
        replicas split the tokens. Tensor ops only: no host reads.
        """
        if self.num_physical_experts == self.num_logical_experts:
            return self.local_slots(physical)  # no replicas: each slot is its expert's one
        l2p, count = self._maps()
        if not self.ep.is_distributed:  # one rank holds every replica, the first one too
            return l2p[logical_ids, 0].to(torch.int64)
        local = self.local_slots(physical)
        slots = l2p.to(torch.int64) - self.first_slot
        ranks = torch.arange(l2p.shape[1], device=l2p.device).unsqueeze(0)
        here = (ranks < count.unsqueeze(1)) & (slots >= 0)
        here &= slots < self.num_local_physical_experts
        # argmax gives the first True: the expert's first local replica (garbage, never
        # read, for experts without one: a pair is local only if its expert has one here).
        first_local = slots.gather(1, here.to(torch.int32).argmax(dim=1, keepdim=True))
        return torch.where(local >= 0, first_local.squeeze(1)[logical_ids], local)

    def reduce_over_ranks(self, partial: Tensor) -> Tensor:
        """Sum per-rank partial outputs over the EP group in place (no-op on one rank)."""
        return self.ep.all_reduce_(partial)

    # ------------------------------------------------------------ checkpoint keys

    def _expert_key(self, prefix: str, expert: int, key: str) -> str:
        return f"{prefix}{expert}.{key}"

    def _save_per_expert(
        self, module: nn.Module, state_dict: dict[str, Tensor], prefix: str, local_metadata: object
    ) -> None:
        """Replace each stacked tensor by one tensor per logical expert held here (1st replica)."""
        first_slot: dict[int, int] = {}
        for slot, expert in enumerate(self.local_logical_experts()):
            if expert >= 0:
                first_slot.setdefault(expert, slot)
        stacked = {name: state_dict.pop(prefix + name) for name in self._expert_keys}
        # Expert-major order, as an nn.ModuleList of experts saves them.
        for expert in sorted(first_slot):
            for name, key in self._expert_keys.items():
                row = stacked[name][first_slot[expert]].detach().clone()
                state_dict[self._expert_key(prefix, expert, key)] = row

    def _load_per_expert(
        self,
        module: nn.Module,
        state_dict: dict[str, Tensor],
        prefix: str,
        local_metadata: object,
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """Stack per-expert tensors into the slots' layout under the current placement.

        A checkpoint without any per-expert key of a weight is left alone
        (stacked keys load as usual; missing ones are reported per expert).
        Raises ``CheckpointError``, before this container changes, when some
        experts this rank holds are absent or a tensor's shape does not fit.
        """
        self._load_prefix = prefix
        holds = self.local_logical_experts()
        needed = sorted({e for e in holds if e >= 0})
        built: dict[str, Tensor] = {}
        for name, key in self._expert_keys.items():
            names = {e: self._expert_key(prefix, e, key) for e in range(self.num_logical_experts)}
            if not any(k in state_dict for k in names.values()):
                continue
            absent = [e for e in needed if names[e] not in state_dict]
            if absent:
                raise CheckpointError(
                    f"{self.label} ({prefix or 'root'}): the checkpoint has per-expert "
                    f"{key!r} tensors but lacks those of logical experts {absent} "
                    f"(e.g. {names[absent[0]]!r})"
                )
            current = self.stacked(name)
            for expert in needed:
                tensor = cast("object", state_dict[names[expert]])
                if not isinstance(tensor, Tensor) or tuple(tensor.shape) != tuple(
                    current.shape[1:]
                ):
                    shape = tuple(tensor.shape) if isinstance(tensor, Tensor) else type(tensor)
                    raise CheckpointError(
                        f"{self.label}: checkpoint tensor {names[expert]!r} has shape {shape}, "
                        f"the experts hold {tuple(current.shape[1:])}"
                    )
            rows = [
                state_dict[names[e]].to(current.dtype) if e >= 0 else current[slot].detach()
                for slot, e in enumerate(holds)
            ]
            built[name] = torch.stack([r.to(current.device) for r in rows])
            for k in names.values():
                state_dict.pop(k, None)
        for name, tensor in built.items():
            state_dict[prefix + name] = tensor

    def _name_missing_per_expert(self, module: nn.Module, incompatible: object) -> None:
        """Report a missing stacked weight as the per-expert keys the checkpoint should hold."""
        found: object = getattr(incompatible, "missing_keys", None)
        if self._load_prefix is None or not isinstance(found, list):
            return
        missing = cast("list[str]", found)
        prefix = self._load_prefix
        for name, key in self._expert_keys.items():
            if prefix + name in missing:
                at = missing.index(prefix + name)
                needed = sorted({e for e in self.local_logical_experts() if e >= 0})
                missing[at : at + 1] = [self._expert_key(prefix, e, key) for e in needed]
        self._load_prefix = None


class SwiGLUExperts(StackedExperts):
    """``StackedExperts`` of SwiGLU MLPs: ``down(silu(gate(x)) * up(x))`` per expert.

    Weights ``gate_proj``/``up_proj`` ``[logical, intermediate, hidden]`` and
    ``down_proj`` ``[logical, hidden, intermediate]`` (``nn.Linear`` layout).
    ``forward(hidden, logical_ids, routing_weights)`` routes, records the load
    and computes the experts grouped by expert (replicas on this rank as one group).
    """

    EXPERT_KEYS: ClassVar[Mapping[str, str] | None] = {
        "gate_proj": "gate_proj.weight",
        "up_proj": "up_proj.weight",
        "down_proj": "down_proj.weight",
    }

    @classmethod
    def _check_design(cls, label: str, weights: Mapping[str, Tensor]) -> None:
        """SwiGLU needs ``gate_proj``, ``up_proj`` and ``down_proj`` in ``nn.Linear`` layout."""
        if set(weights) != {"gate_proj", "up_proj", "down_proj"}:
            raise EplbConfigError(
                f"{label}: needs exactly the weights gate_proj, up_proj and down_proj, got "
                f"{sorted(weights)} (map your expert's names with from_module_list(keys=...))"
            )
        gate, up, down = weights["gate_proj"], weights["up_proj"], weights["down_proj"]
        if (
            gate.dim() != 3
            or up.shape != gate.shape
            or down.dim() != 3
            or tuple(down.shape[1:]) != (gate.shape[2], gate.shape[1])
        ):
            raise EplbConfigError(
                f"{label}: expected gate_proj and up_proj [experts, intermediate, hidden] and "
                f"down_proj [experts, hidden, intermediate], got {tuple(gate.shape)}, "
                f"{tuple(up.shape)}, {tuple(down.shape)}"
            )

    def forward(self, hidden: Tensor, logical_ids: Tensor, routing_weights: Tensor) -> Tensor:
        """The experts' output ``[tokens, hidden]`` for ``hidden [tokens, hidden]``.

        ``logical_ids`` and ``routing_weights`` are the router's ``[tokens,
        top_k]`` choices and weights. With EP each rank computes the pairs
        its slots serve and the partial outputs are summed over the group.
        """
        if hidden.dim() != 2 or logical_ids.shape[0] != hidden.shape[0]:
            raise ModelInputError(
                f"{self.label}: hidden must be [tokens, hidden] with one row per row of "
                f"logical_ids, got {tuple(hidden.shape)} and {tuple(logical_ids.shape)}"
            )
        physical = self.route(logical_ids)
        out = swiglu_experts(
            hidden,
            self.compute_slots(logical_ids, physical),
            routing_weights,
            self.stacked("gate_proj"),
            self.stacked("up_proj"),
            self.stacked("down_proj"),
        )
        return self.reduce_over_ranks(out)
