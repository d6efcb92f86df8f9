"""What a registration may change on a model, captured so a rejected one can put it back.

``set_eplb_state`` hands the model's MoE layers views of new EPLB tensors and
refills ``expert_weights``. When a registration is rejected after that call
(the weights it exposes do not fit, a redundant slot differs from its expert),
the layers must not keep routing by, and recording into, the discarded
state: :meth:`WiringSnapshot.restore` gives them back exactly what they held
before (the previous state's views, or none).

Captured, shallowly: the model's ``expert_weights`` (the object bound and its
items) and, for the model and every MoE layer that has a ``__dict__``, its
instance attributes and the dicts among them (``nn.Module`` keeps buffers,
submodules and hooks in such dicts). That is where ``set_eplb_state`` keeps
what it is handed, in every model of this library, vLLM's layers and the
Hugging Face adapter. State kept elsewhere (a hook installed on a module the
layer wraps) is not; ``EplbState.add_model`` therefore checks what it can
before wiring, so a restore is the rare path.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING, cast

import attrs

if TYPE_CHECKING:
    from moe_protocols.protocols import MixtureOfExperts

__all__ = ["WiringSnapshot"]


def _instance_dict(obj: object) -> dict[str, object] | None:
    try:
        # object.__getattribute__: a hostile __getattr__ is never consulted.
        found = object.__getattribute__(obj, "__dict__")
    except Exception:
        return None
    return cast("dict[str, object]", found) if type(found) is dict else None


@attrs.frozen(eq=False)
class _Attributes:
    """One object's instance attributes, and a copy of every dict among them."""

    live: dict[str, object]
    saved: dict[str, object]
    nested: tuple[tuple[dict[object, object], dict[object, object]], ...]

    @classmethod
    def capture(cls, obj: object) -> _Attributes | None:
        live = _instance_dict(obj)
        if live is None:
            return None
        tables = [cast("dict[object, object]", v) for v in live.values() if isinstance(v, dict)]
        nested = tuple((table, dict(table)) for table in tables)
        return cls(live, dict(live), nested)

    def restore(self) -> None:
        # Unconditionally: comparing would compare tensors by value.
        for table, saved in self.nested:
            table.clear()
            table.update(saved)
        self.live.clear()
        self.live.update(self.saved)


@attrs.frozen(eq=False)
class WiringSnapshot:
    """The parts of a model that ``set_eplb_state`` writes, as they were before a registration."""

    model: MixtureOfExperts
    expert_weights: object
    expert_weights_items: tuple[object, ...] | None
    attributes: tuple[_Attributes, ...]

    @classmethod
    def capture(cls, model: MixtureOfExperts, max_layers: int) -> WiringSnapshot:
        """Snapshot ``model`` (conformance-checked) and its first ``max_layers`` MoE layers."""
        weights: object = model.expert_weights
        items: tuple[object, ...] | None = None
        try:
            if isinstance(weights, list):
                items = tuple(weights)
        except Exception:  # a list subclass whose iteration raises: nothing to copy
            items = None
        layers = model.moe_layers
        objects: list[object] = [model]
        objects += [layers[i] for i in range(min(len(layers), max_layers))]
        captured = (_Attributes.capture(obj) for obj in objects)
        return cls(model, weights, items, tuple(a for a in captured if a is not None))

    def restore(self) -> None:
        """Put back every captured attribute; best effort, never raises."""
        for attributes in self.attributes:
            with contextlib.suppress(Exception):  # a dict subclass that refuses: keep going
                attributes.restore()
        # Best effort: the caller raises the error that made it restore.
        with contextlib.suppress(Exception):
            if self.model.expert_weights is not self.expert_weights:
                self.model.expert_weights = self.expert_weights  # type: ignore[assignment]  # the object it held before, whatever its type
            held: object = self.expert_weights
            if self.expert_weights_items is not None and isinstance(held, list):
                cast("list[object]", held)[:] = self.expert_weights_items
