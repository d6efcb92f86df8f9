"""``HFMoELayer``: one transformers MoE layer (an experts module and its router) as EPLB sees it."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, cast

import attrs
import torch
from torch import Tensor

from moe_protocols.adapters.hf._probe import flag
from moe_protocols.adapters.hf._recording import (
    SCORES_HOOK,
    Recording,
    index_hook,
    placement_problem,
    scores_hook,
)
from moe_protocols.errors import EplbStateError, MappingError
from moe_protocols.layer_views import layer_eplb_rows

if TYPE_CHECKING:
    from torch import nn

    from moe_protocols.adapters.hf._weights import HFExpertWeights

__all__ = ["HFMoELayer"]


@attrs.define(eq=False, repr=False)
class HFMoELayer:
    """One transformers MoE layer (an experts module and its router) as EPLB sees it.

    Implements :class:`~moe_protocols.protocols.MoELayer`. Built by
    :func:`discover_hf_moe`; holds the modules, never copies of them.
    """

    path: str
    """Dotted path of the experts module below the adapter's root module."""
    experts: nn.Module = attrs.field()
    """The experts module (fused 3-D expert parameters)."""
    router: nn.Module | None
    """The router next to it (``gate`` / ``router`` of the block), if any."""
    num_experts: int
    """Routed experts ``E`` (dim 0 of the expert parameters)."""
    top_k: int
    """Experts chosen per token."""
    num_groups: int
    """Expert groups of group-limited routing (1 when routing is not grouped)."""
    num_shared_experts: int
    """Always-on shared experts of the block (not moved by EPLB)."""
    weights: HFExpertWeights
    """Views of the expert weights in the documented layout."""
    recording_rule: str
    """Where the load hook sits: :data:`INDEX_HOOK` or :data:`SCORES_HOOK`."""
    _recording: Recording | None = attrs.field(default=None, init=False)

    def __repr__(self) -> str:
        return (
            f"HFMoELayer({self.path!r}, experts={type(self.experts).__name__}, "
            f"E={self.num_experts}, top_k={self.top_k}, groups={self.num_groups}, "
            f"records={self.recording_rule!r})"
        )

    def get_expert_weights(self) -> Iterable[Tensor]:
        """Views ``[E, ...]`` of the live expert weights, in the module docstring's order."""
        return self.weights.tensors()

    @property
    def is_recording(self) -> bool:
        """Whether a load hook is installed (``set_eplb_state`` was called and not undone)."""
        return self._recording is not None and self._recording.handle is not None

    @property
    def hook_fired(self) -> bool:
        """Whether the load hook ran since it was installed or :meth:`reset_hook_status`."""
        return self._recording is not None and self._recording.fired

    def reset_hook_status(self) -> None:
        """Forget that the hook fired, to check a later forward on its own."""
        if self._recording is not None:
            self._recording.fired = False

    def _check_eplb_views(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> Recording:
        """This layer's rows of the EPLB tensors, or an error naming what does not fit."""
        name, num_experts = f"MoE layer {moe_layer_idx} ({self.path})", self.num_experts
        # transformers models have exactly one physical slot per expert.
        rows = layer_eplb_rows(
            name,
            moe_layer_idx,
            expert_load_view,
            logical_to_physical_map,
            logical_replica_count,
            num_logical=num_experts,
            num_physical=num_experts,
        )
        device = self.weights.down.device
        if device.type != "meta" and rows.expert_load.device != device:
            raise EplbStateError(
                f"{name}: expert_load_view is on {rows.expert_load.device} but the experts are on "
                f"{device}; allocate the load on the model's device"
            )
        recording = Recording(
            row=rows.expert_load,
            logical_to_physical=rows.logical_to_physical,
            replica_count=rows.replica_count,
        )
        problem = placement_problem(recording, num_experts)
        if problem is not None:
            raise MappingError(f"{name}: {problem}")
        return recording

    def _install(self, recording: Recording) -> None:
        self.remove_hooks()
        if self.recording_rule == SCORES_HOOK:
            router = self.router
            if router is None:  # discovery guarantees a router for this rule
                raise EplbStateError(f"{self.path}: no router to hook")
            recording.handle = router.register_forward_hook(
                scores_hook(recording, self.num_experts)
            )
        else:
            recording.handle = self.experts.register_forward_pre_hook(
                index_hook(recording, self.num_experts - 1), with_kwargs=True
            )
        self._recording = recording

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        """Keep row ``moe_layer_idx`` of the EPLB tensors and start recording into it.

        ``expert_load_view [L, E]``, ``logical_to_physical_map [L, E, max_replicas]``
        and ``logical_replica_count [L, E]`` are kept as views. The maps must
        place expert ``e`` in slot ``e`` alone (transformers routes by logical id).
        A previously installed hook is replaced. Nothing changes when a check fails.

        Raises:
            EplbStateError: the load view has the wrong shape, dtype or device.
            MappingError: the maps have the wrong shape or dtype, or are not
                the identity placement.
        """
        self._install(
            self._check_eplb_views(
                moe_layer_idx, expert_load_view, logical_to_physical_map, logical_replica_count
            )
        )

    def remove_hooks(self) -> None:
        """Remove this layer's load hook, if any; the module's hook dicts are as before."""
        if self._recording is not None and self._recording.handle is not None:
            self._recording.handle.remove()
            self._recording.handle = None

    def placement_problem(self) -> str | None:
        """Why the live maps no longer describe where the weights are, or ``None``."""
        if self._recording is None:
            return None
        return placement_problem(self._recording, self.num_experts)

    def expert_forward(self, expert: int, hidden: Tensor) -> Tensor:
        """What expert ``expert`` alone computes for ``hidden [T, H]`` (unweighted), from the views.

        The executable statement of the layout: the gate activation is the
        experts module's own ``_apply_gate`` (fed gate and up in its stored
        order) when it has one, else ``act_fn(gate) * up``.
        """
        if not 0 <= expert < self.num_experts:
            raise IndexError(f"{self.path}: expert {expert} outside [0, {self.num_experts})")
        w = self.weights
        up = torch.nn.functional.linear(
            hidden, w.up[expert], None if w.up_bias is None else w.up_bias[expert]
        )
        act_fn = getattr(self.experts, "act_fn", None)
        if w.gate is None:
            if not callable(act_fn):
                raise EplbStateError(f"{self.path}: non-gated experts without an act_fn")
            inner = cast("Tensor", act_fn(up))
        else:
            gate = torch.nn.functional.linear(
                hidden, w.gate[expert], None if w.gate_bias is None else w.gate_bias[expert]
            )
            apply_gate = getattr(self.experts, "_apply_gate", None)
            if callable(apply_gate):
                interleaved = flag(self.experts, "is_concatenated") is False
                fused = (
                    torch.stack((gate, up), dim=-1).flatten(-2)
                    if interleaved
                    else torch.cat((gate, up), dim=-1)
                )
                inner = cast("Tensor", apply_gate(fused))
            elif callable(act_fn):
                inner = cast("Tensor", act_fn(gate)) * up
            else:
                raise EplbStateError(f"{self.path}: experts have neither _apply_gate nor act_fn")
        return torch.nn.functional.linear(
            inner, w.down[expert], None if w.down_bias is None else w.down_bias[expert]
        )
