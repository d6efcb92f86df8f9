"""What an EPLB state shows of itself: its settings, counters and the maps of its models.

:class:`EplbStateView` is the read-only half of :class:`EplbState`: every
accessor here reads, none writes, and the map accessors return copies.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from moe_protocols.errors import EplbStateError

from ._metrics import rank_loads_from_physical
from ._results import BalancednessStats

if TYPE_CHECKING:
    from torch import Tensor

    from moe_protocols.parallel import ExpertParallelContext

    from ._config import EplbConfig
    from ._fingerprint import IntegrityMode
    from ._results import ModelEplbState, RearrangementResult
    from ._transfer_options import TransferOptions

__all__ = ["EplbStateView"]


class EplbStateView:
    """The read-only accessors of :class:`EplbState` (its base; not built on its own)."""

    _config: EplbConfig
    _num_ranks: int
    _num_nodes: int
    _ep: ExpertParallelContext
    _transfer: TransferOptions
    _device: torch.device
    _integrity: IntegrityMode
    _models: dict[str, ModelEplbState]
    _window_step: int
    _step: int
    _steps_taken: int
    _rearrangements: int
    _last: RearrangementResult | None

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

    @property
    def integrity(self) -> IntegrityMode:
        """How moved weights are checked against the experts' fingerprints."""
        return self._integrity
