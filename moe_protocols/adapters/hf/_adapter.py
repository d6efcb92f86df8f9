"""``HFMoEAdapter``: ``MixtureOfExperts`` over a transformers MoE model that lacks it."""

from __future__ import annotations

from collections.abc import MutableSequence, Sequence
from typing import TYPE_CHECKING, Final

import torch
from torch import Tensor

from moe_protocols.adapters._forward import fixed
from moe_protocols.adapters.hf._discovery import discover_hf_moe
from moe_protocols.adapters.hf._probe import is_module
from moe_protocols.errors import EplbStateError, NotMixtureOfExpertsError

if TYPE_CHECKING:
    from torch import nn

    from moe_protocols.adapters.hf._layer import HFMoELayer
    from moe_protocols.protocols import MoELayer

__all__ = ["HFMoEAdapter"]

_FIXED_WHY: Final = (
    "transformers routes tokens by logical expert id, so the adapter's counts are fixed"
)


def _transferable(layer: HFMoELayer) -> list[Tensor]:
    # As the protocol's default does: one-byte dtypes (float8) are re-viewed as
    # uint8, since transfer backends move bytes and lack the exotic 8-bit types.
    return [w.view(torch.uint8) if w.element_size() == 1 else w for w in layer.get_expert_weights()]


class HFMoEAdapter:
    """A ``MixtureOfExperts`` over a transformers MoE model that does not implement it.

    Physical slots equal logical experts on one rank: ``num_physical_experts
    == num_local_physical_experts == num_logical_experts``, no redundant
    experts. The counts can be assigned only their current values (the
    protocol declares them settable); :meth:`update_physical_experts_metadata`
    likewise accepts only the unchanged values.
    """

    expert_weights: MutableSequence[Sequence[Tensor]]
    """Per MoE layer, the views of :meth:`HFMoELayer.get_expert_weights`."""

    def __init__(self, module: nn.Module, layers: Sequence[HFMoELayer]) -> None:
        """Wrap ``module`` whose MoE layers are ``layers`` (use :meth:`from_module`)."""
        if not layers:
            raise NotMixtureOfExpertsError(f"{type(module).__name__}: no MoE layers to adapt")
        self._module = module
        self._layers: tuple[HFMoELayer, ...] = tuple(layers)
        first = self._layers[0]
        self._num_experts = first.num_experts
        self._num_groups = first.num_groups
        self._num_shared = first.num_shared_experts
        self._num_layers = len(self._layers)
        self._num_redundant = 0
        self._eplb_set = False
        self.expert_weights = [_transferable(layer) for layer in self._layers]

    @classmethod
    def from_module(cls, module: object) -> HFMoEAdapter:
        """Build the adapter over ``module`` without modifying it.

        Raises:
            NotMixtureOfExpertsError: ``module`` holds no usable transformers MoE
                layers of exactly one language model; the message says why.
        """
        found = discover_hf_moe(module)
        if not found.ok or not is_module(module):
            raise NotMixtureOfExpertsError(
                f"cannot adapt {type(module).__name__} as a transformers MoE model: {found.problem}"
            )
        return cls(module, found.layers)

    def __repr__(self) -> str:
        return (
            f"HFMoEAdapter({type(self._module).__name__}, moe_layers={len(self._layers)}, "
            f"experts={self._num_experts}, top_k={self.top_k}, groups={self._num_groups})"
        )

    # ------------------------------------------------------------ what it wraps

    @property
    def module(self) -> nn.Module:
        """The transformers module the adapter was built over."""
        return self._module

    @property
    def layers(self) -> tuple[HFMoELayer, ...]:
        """The MoE layers, in module order (same objects as :attr:`moe_layers`)."""
        return self._layers

    @property
    def moe_layers(self) -> Sequence[MoELayer]:
        """The MoE layers, one per experts module, in module order."""
        return self._layers

    @moe_layers.setter
    def moe_layers(self, value: Sequence[MoELayer]) -> None:
        # Settable only because the protocol declares a variable: the layers are
        # found in the module tree, so only the same layers may be assigned.
        if len(value) != len(self._layers) or any(
            a is not b for a, b in zip(value, self._layers, strict=False)
        ):
            raise EplbStateError(
                f"{self!r}: moe_layers are the experts modules found in the model and cannot "
                "be replaced"
            )

    @property
    def top_k(self) -> int:
        """Experts chosen per token (the same in every layer)."""
        return self._layers[0].top_k

    # ------------------------------------------------------------ counts
    # Attributes for type checkers (pyright accepts no property for a protocol
    # attribute); each reads a value computed at construction and refuses a
    # different one.

    num_moe_layers: int = fixed("_num_layers", _FIXED_WHY, "MoE layers (experts modules) found.")
    num_expert_groups: int = fixed(
        "_num_groups",
        _FIXED_WHY,
        "Expert groups read from the router (``num_group``); 1 when routing is not grouped.",
    )
    num_logical_experts: int = fixed(
        "_num_experts", _FIXED_WHY, "Experts the router chooses among."
    )
    num_physical_experts: int = fixed(
        "_num_experts", _FIXED_WHY, "Physical slots: equal to the logical experts."
    )
    num_local_physical_experts: int = fixed(
        "_num_experts", _FIXED_WHY, "Slots on this rank: all of them (one rank holds every expert)."
    )
    num_routed_experts: int = fixed(
        "_num_experts", _FIXED_WHY, "Routed experts (equal to the logical experts)."
    )
    num_shared_experts: int = fixed(
        "_num_shared",
        _FIXED_WHY,
        "Shared experts per MoE block (config ``n_shared_experts``, else 1 per shared MLP).",
    )
    num_redundant_experts: int = fixed(
        "_num_redundant", _FIXED_WHY, "Always 0: transformers cannot route to a replica."
    )

    # ------------------------------------------------------------ EPLB

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        """Collect ``expert_weights`` and install every layer's load hook on its row.

        All layers are checked before any hook is installed, so a bad tensor
        leaves the model untouched. Calling again replaces the hooks.

        Raises:
            EplbStateError: ``expert_load_view`` is not ``[num_moe_layers, E]``
                (int32/int64/float) on the experts' device.
            MappingError: the maps are malformed or not the identity placement.
        """
        if isinstance(expert_load_view, Tensor) and expert_load_view.dim() >= 1:  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            rows = expert_load_view.shape[0]
            if rows != len(self._layers):
                raise EplbStateError(
                    f"{self!r}: expert_load_view has {rows} rows but the model has "
                    f"{len(self._layers)} MoE layers"
                )
        recordings = [
            layer._check_eplb_views(  # pyright: ignore[reportPrivateUsage]  # the adapter drives its own layers
                i, expert_load_view, logical_to_physical_map, logical_replica_count
            )
            for i, layer in enumerate(self._layers)
        ]
        self.expert_weights = [_transferable(layer) for layer in self._layers]
        for layer, recording in zip(self._layers, recordings, strict=True):
            layer._install(recording)  # pyright: ignore[reportPrivateUsage]  # the adapter drives its own layers
        self._eplb_set = True

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Accept only the unchanged counts: a transformers model cannot gain or lose slots.

        Raises:
            EplbStateError: either count differs from ``num_logical_experts``.
        """
        if (num_physical_experts, num_local_physical_experts) != (
            self._num_experts,
            self._num_experts,
        ):
            raise EplbStateError(
                f"{self!r}: cannot change to num_physical_experts={num_physical_experts}, "
                f"num_local_physical_experts={num_local_physical_experts}: transformers routes "
                f"every token to the weights at its logical expert id, so physical slots are "
                f"fixed at the {self._num_experts} logical experts, all on this rank"
            )

    def remove_hooks(self) -> None:
        """Remove every load hook; the modules' hook dicts are as before ``set_eplb_state``."""
        for layer in self._layers:
            layer.remove_hooks()
        self._eplb_set = False

    @property
    def hooks_fired(self) -> tuple[bool, ...]:
        """Per MoE layer, whether its hook ran since installation or :meth:`reset_hook_status`."""
        return tuple(layer.hook_fired for layer in self._layers)

    def reset_hook_status(self) -> None:
        """Forget which hooks fired, to check the next forward on its own."""
        for layer in self._layers:
            layer.reset_hook_status()

    def recording_problems(self) -> tuple[str, ...]:
        """Why the recorded load cannot be trusted; empty when every hook fired as expected.

        Call after at least one forward. Reports: no EPLB state set (nothing is
        recorded), layers whose hook never fired (a hub kernel or a custom
        forward replaced the MoE block, so their rows would read zero, not
        "no tokens"), and maps that no longer hold the identity placement.
        """
        if not self._eplb_set:
            return (
                f"{self!r}: set_eplb_state was not called (or its hooks were removed); "
                "nothing is recorded",
            )
        problems: list[str] = []
        silent = [layer.path for layer in self._layers if not layer.hook_fired]
        if silent:
            problems.append(
                f"{self!r}: the load hook of {len(silent)} of {len(self._layers)} MoE layers "
                f"never fired ({', '.join(silent)}): their experts module/router was not called, "
                "e.g. a hub kernel (use_kernels=True) or a custom forward replaced the MoE block; "
                "their load rows are not measurements"
            )
        for layer in self._layers:
            problem = layer.placement_problem()
            if problem is not None:
                problems.append(f"{layer.path}: {problem}")
        return tuple(problems)

    def check_recording(self) -> None:
        """Raise unless the recorded load can be trusted (see :meth:`recording_problems`).

        Raises:
            EplbStateError: listing every problem found.
        """
        problems = self.recording_problems()
        if problems:
            raise EplbStateError("\n".join(problems))


if TYPE_CHECKING:
    from moe_protocols.protocols import MixtureOfExperts

    def _statically_conforms(  # pyright: ignore[reportUnusedFunction]  # a static check, never called
        adapter: HFMoEAdapter, layer: HFMoELayer
    ) -> tuple[MixtureOfExperts, MoELayer]:
        # mypy checks here that the classes satisfy the protocols member for member.
        return adapter, layer
