"""Reference runner: the three EPLB code paths a serving runner needs, all through ``MoEView``.

1. load time: resolve the MoE model behind whatever wrapper was served, once;
   with EPLB enabled and nothing to balance, fail *now* with the resolution
   trace (not on the first forward); otherwise register the view with the
   EPLB state;
2. every engine step: run the forward, then ``eplb_step()``;
3. restoring a saved placement: ``setup_eplb_from_mapping()``.

The elastic-EP path (``update_physical_experts_metadata``) also goes through
the view, so it reaches a language model hidden inside a VLM wrapper.
The runner never asks which concrete class the model is.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import attrs
import torch

from moe_protocols.adapters import DEFAULT_UNWRAP_STEPS, MoEView, UnwrapStep
from moe_protocols.eplb import DEFAULT_POLICIES, EplbConfig, EplbState, Placement, PolicyRegistry
from moe_protocols.errors import EplbStateError
from moe_protocols.parallel import ExpertParallelContext

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["ReferenceRunner", "RunnerConfig"]


@attrs.frozen
class RunnerConfig:
    """What the runner is asked to do: serve a model, with or without EPLB."""

    enable_eplb: bool = False
    eplb: EplbConfig = attrs.field(factory=EplbConfig)
    ep: ExpertParallelContext = attrs.field(factory=ExpertParallelContext)
    model_name: str = "model"
    num_ranks: int | None = None
    """Placement ranks EPLB plans for (default: the EP group's size); see ``EplbState``."""
    num_nodes: int | None = None
    """Nodes the placement ranks span (default: the EP group's)."""


class ReferenceRunner:
    """A minimal serving runner wired to EPLB the way a real one should be."""

    def __init__(
        self,
        config: RunnerConfig,
        *,
        steps: Sequence[UnwrapStep] = DEFAULT_UNWRAP_STEPS,
        policies: PolicyRegistry = DEFAULT_POLICIES,
    ) -> None:
        self.config = config
        self._steps = tuple(steps)
        self._policies = policies
        self._model: object | None = None
        self._forward: Callable[..., torch.Tensor] | None = None
        self._moe_view: MoEView | None = None
        self._eplb_state: EplbState | None = None

    @property
    def model(self) -> object:
        """The served object, as it was handed to ``load_model``."""
        if self._model is None:
            raise EplbStateError("no model loaded: call load_model() first")
        return self._model

    @property
    def moe_view(self) -> MoEView | None:
        """The resolved MoE model behind the served object (None for a dense model)."""
        return self._moe_view

    @property
    def eplb_state(self) -> EplbState | None:
        """The EPLB state, when EPLB is enabled and a model is loaded."""
        return self._eplb_state

    def load_model(self, model: Callable[..., torch.Tensor]) -> None:
        """Adopt ``model``: resolve its MoE model once and, with EPLB on, register it.

        With EPLB enabled and no MoE model reachable, raises
        ``NotMixtureOfExpertsError`` carrying the resolution trace, and the
        runner stays unloaded. Resolution happens even with EPLB off (it never
        raises), so the elastic path can use the view.
        """
        view: MoEView | None
        state: EplbState | None = None
        if self.config.enable_eplb:
            view = MoEView.require(model, steps=self._steps)
            state = EplbState(
                self.config.eplb,
                ep=self.config.ep,
                policies=self._policies,
                num_ranks=self.config.num_ranks,
                num_nodes=self.config.num_nodes,
            )
            state.add_model(view, model_name=self.config.model_name)
        else:
            view = MoEView.resolve(model, steps=self._steps)
        self._model, self._forward = model, model
        self._moe_view, self._eplb_state = view, state

    def execute_model(self, *args: object, **kwargs: object) -> torch.Tensor:
        """Run one forward pass (no autograd), then one EPLB step; return the output."""
        if self._forward is None:
            raise EplbStateError("no model loaded: call load_model() first")
        with torch.no_grad():
            output = self._forward(*args, **kwargs)
        self.eplb_step()
        return output

    def eplb_step(self, is_dummy: bool = False, is_profile: bool = False) -> None:
        """Advance EPLB by one engine step (a no-op with EPLB off)."""
        if not self.config.enable_eplb:
            return
        if self._eplb_state is None or self._moe_view is None:
            raise EplbStateError(
                "EPLB is enabled but no MoE model is registered: call load_model() first"
            )
        self._eplb_state.step(
            is_dummy=is_dummy,
            is_profile=is_profile,
            log_stats=self.config.eplb.log_balancedness,
        )

    def setup_eplb_from_mapping(self, placement: Placement | torch.Tensor) -> None:
        """Install a saved expert placement (weights move, maps update in place)."""
        if self._eplb_state is None:
            raise EplbStateError("setup_eplb_from_mapping needs EPLB enabled and a loaded model")
        self._eplb_state.update_mapping(self.config.model_name, placement)

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Elastic EP: push new slot counts to the MoE model, wherever it is wrapped."""
        if self._moe_view is None:
            raise EplbStateError("the loaded model has no MoE model to update")
        self._moe_view.update_physical_experts_metadata(
            num_physical_experts=num_physical_experts,
            num_local_physical_experts=num_local_physical_experts,
        )
