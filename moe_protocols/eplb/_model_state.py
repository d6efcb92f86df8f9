"""Registering a model's live EPLB tensors: checking the model, allocating and wiring them.

Registration reads the model only until everything about it has been checked
(conformance, sizes, ownership, counts); then :func:`allocate` builds its
tensors and :func:`wire` hands them to its layers.
"""

from __future__ import annotations

import itertools
from typing import TYPE_CHECKING, Final

import torch
from torch import Tensor

from moe_protocols.conformance import check_conformance
from moe_protocols.errors import (
    EplbConfigError,
    EplbOwnershipError,
    EplbStateError,
    MoEProtocolsError,
    NotMixtureOfExpertsError,
)

from . import _limits
from ._integrity import aliasing_problem
from ._maps import compute_logical_maps, initial_placement, max_replicas
from ._ownership import find_owner
from ._results import ModelEplbState

if TYPE_CHECKING:
    from collections.abc import Mapping

    from moe_protocols.parallel import ExpertParallelContext
    from moe_protocols.protocols import MixtureOfExperts

    from ._config import EplbConfig

__all__ = [
    "MAX_WEIGHTS_PER_LAYER",
    "SHARED_COUNTS",
    "allocate",
    "check_expert_weights",
    "check_registrable",
    "collected_weights",
    "counts",
    "ep_problem",
    "wire",
]


def ep_problem(
    model: MixtureOfExperts, config: EplbConfig, ep: ExpertParallelContext
) -> str | None:
    """Why ``model`` cannot be balanced over ``ep`` under ``config``, or ``None``."""
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


SHARED_COUNTS: Final = (
    "num_routed_experts",
    "num_redundant_experts",
    "num_physical_experts",
    "num_logical_experts",
    "num_local_physical_experts",
    "num_expert_groups",
)


def counts(model: MixtureOfExperts) -> dict[str, int]:
    """The expert counts every model registered with one state must share."""
    return {name: int(getattr(model, name)) for name in SHARED_COUNTS}


_SIZE_LIMITS: Final = (
    ("num_moe_layers", "MAX_LAYERS"),
    ("num_logical_experts", "MAX_LOGICAL_EXPERTS"),
    ("num_physical_experts", "MAX_PHYSICAL_SLOTS"),
    ("num_expert_groups", "MAX_EXPERT_GROUPS"),
)
MAX_WEIGHTS_PER_LAYER: Final = 256
"""Weight tensors one MoE layer may expose (real layers have 2 or 3)."""


def collected_weights(model: MixtureOfExperts, model_name: str) -> list[list[Tensor]]:
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
                itertools.islice(layers[index].get_expert_weights(), MAX_WEIGHTS_PER_LAYER + 1)
            )
        except Exception as exc:
            raise EplbStateError(f"{where} raised {type(exc).__name__}: {exc}") from exc
        if len(found) > MAX_WEIGHTS_PER_LAYER:
            raise EplbStateError(f"{where} yields more than {MAX_WEIGHTS_PER_LAYER} weight tensors")
        for k, weight in enumerate(found):
            if not isinstance(weight, Tensor):  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
                raise EplbStateError(
                    f"{where} item {k} is a {type(weight).__name__}, not a torch.Tensor"
                )
        collected.append(found)
    return collected


def _check_sizes(model: MixtureOfExperts, model_name: str, window_size: int) -> None:
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
        ((window_size, layers, physical), "MAX_WINDOW_ENTRIES"),
    ):
        _limits.check_product(what + "an EPLB tensor", shape, limit, EplbConfigError)


def check_registrable(
    model: MixtureOfExperts,
    model_name: str,
    registered: Mapping[str, ModelEplbState],
    config: EplbConfig,
    ep: ExpertParallelContext,
    num_ranks: int,
) -> None:
    """Refuse a model that cannot be registered next to ``registered``; reads the model only.

    Raises what :meth:`EplbState.add_model` documents for a model refused
    before anything is allocated for it.
    """
    report = check_conformance(model, path=model_name)
    if not report.ok or not report.is_moe:
        raise NotMixtureOfExpertsError(
            f"cannot register model {model_name!r} with EPLB: it is not a Mixture-of-Experts "
            f"model with MoE layers:\n{report}",
            reports=[report],
        )
    if model_name in registered:
        raise EplbStateError(f"a model named {model_name!r} is already registered")
    _check_sizes(model, model_name, config.window_size)
    collected_weights(model, model_name)  # before find_owner reads their storage
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
    problem = ep_problem(model, config, ep)
    if problem is not None:
        raise EplbConfigError(f"model {model_name!r} {problem}")
    if model.num_physical_experts % num_ranks != 0:
        raise EplbConfigError(
            f"model {model_name!r} has {model.num_physical_experts} physical expert slots, "
            f"which do not split evenly over the {num_ranks} placement ranks"
        )
    _check_shared_counts(model, model_name, registered)


def _check_shared_counts(
    model: MixtureOfExperts, model_name: str, registered: Mapping[str, ModelEplbState]
) -> None:
    mine = counts(model)
    for other in registered.values():
        other_counts = counts(other.model)
        if mine != other_counts:
            diff = {k: (mine[k], other_counts[k]) for k in mine if mine[k] != other_counts[k]}
            raise EplbStateError(
                f"model {model_name!r} disagrees with registered model {other.model_name!r} "
                f"on {', '.join(f'{k} ({a} vs {b})' for k, (a, b) in diff.items())}; all "
                "models in one EPLB state must share their expert counts"
            )


def wire(state: ModelEplbState) -> None:
    """Hand the model's EPLB tensors to its layers through ``set_eplb_state``."""
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


def allocate(
    model: MixtureOfExperts, model_name: str, window_size: int, device: torch.device
) -> ModelEplbState:
    """A model's EPLB tensors in the initial placement, on ``device``, with an empty window."""
    num_layers = model.num_moe_layers
    num_logical = model.num_logical_experts
    num_physical = model.num_physical_experts
    p2l = initial_placement(num_layers, num_logical, num_physical)
    l2p, count = compute_logical_maps(p2l, num_logical, max_replicas(num_logical, num_physical))
    return ModelEplbState(
        model_name=model_name,
        model=model,
        physical_to_logical_map=p2l.to(device),
        logical_to_physical_map=l2p.to(device),
        logical_replica_count=count.to(device),
        expert_load_pass=torch.zeros(num_layers, num_physical, dtype=torch.int32, device=device),
        expert_load_window=torch.zeros(
            window_size, num_layers, num_physical, dtype=torch.int32, device=device
        ),
        num_local_physical_experts=model.num_local_physical_experts,
    )


def check_expert_weights(state: ModelEplbState) -> None:
    """Refuse expert weights that do not match the model's counts or share memory between slots."""
    try:
        _check_weight_layout(state)
    except MoEProtocolsError:
        raise
    except Exception as exc:  # a hostile sequence: its len() or [] raised
        raise EplbStateError(
            f"model {state.model_name!r}: reading expert_weights after set_eplb_state "
            f"raised {type(exc).__name__}: {exc}"
        ) from exc


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
        if not 0 < len(tensors) <= MAX_WEIGHTS_PER_LAYER:
            raise EplbStateError(
                f"model {name!r}: expert_weights[{layer}] holds {len(tensors)} weight "
                f"tensors; expected 1 to {MAX_WEIGHTS_PER_LAYER}"
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
