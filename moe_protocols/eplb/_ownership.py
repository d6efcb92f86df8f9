"""Who owns a model's MoE layers: at most one live EPLB registration at a time.

A layer keeps the views it was last handed in ``set_eplb_state``. If a second
registration (another ``EplbState``, the same one under another name, a
profiler) hands it other tensors, the first state is *detached*: its window
reads zero forever and its next rearrangement moves weights the layers no
longer route by. Nothing fails; outputs are silently wrong. So every
registration in this library goes through this registry first.

Ownership is found structurally, never stored on the model: an owner lists the
models it has registered, and two models collide when they share a MoE layer
object or an expert weight tensor's storage (two adapters built over the same
transformers model share the weights but not the layer objects). Owners are
held weakly: a state that is garbage collected releases its models.
"""

from __future__ import annotations

import weakref
from typing import TYPE_CHECKING, Final, Protocol

import attrs

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from torch import Tensor

    from moe_protocols.protocols import MixtureOfExperts

__all__ = ["Claim", "LayerOwner", "find_owner", "footprint", "track_owner"]


class LayerOwner(Protocol):
    """An object that registers MoE models and keeps their layers' EPLB views current."""

    def _registered_models(self) -> Iterable[tuple[str, MixtureOfExperts]]:
        """``(model_name, model)`` of every model registered now."""
        ...

    def reattach(self, model_name: str) -> None:
        """Hand the registered model's live EPLB tensors to its layers again."""
        ...

    def physical_to_logical_map(self, model_name: str) -> Tensor:
        """A copy of the registered model's ``[L, P]`` placement."""
        ...

    def logical_to_physical_map(self, model_name: str) -> Tensor:
        """A copy of the registered model's ``[L, E, max_replicas]`` map."""
        ...

    def logical_replica_count(self, model_name: str) -> Tensor:
        """A copy of the registered model's ``[L, E]`` replica counts."""
        ...


@attrs.frozen
class Footprint:
    """What identifies a model's MoE layers: the layer objects and their weights' storage."""

    layer_ids: dict[int, int]
    """``id(layer) -> layer index`` over ``moe_layers``."""
    weight_ptrs: dict[int, int]
    """``data_ptr -> layer index`` over ``expert_weights`` and each layer's
    ``get_expert_weights()`` (0, a tensor without storage, is skipped)."""


def footprint(model: MixtureOfExperts) -> Footprint:
    """The identity of a conforming model's MoE layers (it must have passed conformance)."""
    layer_ids = {id(layer): index for index, layer in enumerate(model.moe_layers)}
    weight_ptrs: dict[int, int] = {}
    # Both sources: an adapter may fill ``expert_weights`` only once registered.
    sources = [
        *enumerate(model.expert_weights),
        *((index, layer.get_expert_weights()) for index, layer in enumerate(model.moe_layers)),
    ]
    for index, tensors in sources:
        for tensor in tensors:
            ptr = int(tensor.data_ptr())
            if ptr != 0:
                weight_ptrs.setdefault(ptr, index)
    return Footprint(layer_ids=layer_ids, weight_ptrs=weight_ptrs)


@attrs.frozen(eq=False)
class Claim:
    """A live registration that holds (some of) a model's MoE layers."""

    owner: LayerOwner
    """The object that registered them (an ``EplbState``)."""
    model_name: str
    """The name they are registered under there."""
    model: MixtureOfExperts
    """The object that was registered (e.g. a ``MoEView``)."""
    layers: tuple[int, ...]
    """Indices, in the *candidate* model's ``moe_layers``, of the layers that overlap."""

    def describe(self) -> str:
        """``EplbState(...) as 'name'``, for error messages."""
        return f"{self.owner!r} under the name {self.model_name!r}"


_OWNERS: Final[weakref.WeakSet[LayerOwner]] = weakref.WeakSet()


def track_owner(owner: LayerOwner) -> None:
    """Make ``owner``'s registrations visible to :func:`find_owner` (held weakly)."""
    _OWNERS.add(owner)


def _owners() -> Iterator[LayerOwner]:
    # A copy: the set may shrink while we iterate (garbage collection).
    yield from list(_OWNERS)


def find_owner(model: MixtureOfExperts, *, ignore: object = None) -> Claim | None:
    """The live registration that holds any of ``model``'s MoE layers, or ``None``.

    ``ignore`` is an owner whose registrations do not count (never used for
    EPLB states: the same state may not hold a layer twice either).
    """
    mine = footprint(model)
    for owner in _owners():
        if owner is ignore:
            continue
        for name, registered in owner._registered_models():  # pyright: ignore[reportPrivateUsage]  # the owner protocol's hook
            theirs = footprint(registered)
            overlap = {mine.layer_ids[i] for i in mine.layer_ids.keys() & theirs.layer_ids.keys()}
            overlap |= {
                mine.weight_ptrs[p] for p in mine.weight_ptrs.keys() & theirs.weight_ptrs.keys()
            }
            if overlap:
                return Claim(owner, name, registered, tuple(sorted(overlap)))
    return None
