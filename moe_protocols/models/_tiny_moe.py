"""A tiny DeepSeek-V2-like MoE language model that implements ``MixtureOfExperts`` natively.

It is small enough to run in milliseconds on a CPU, yet does what a real EPLB
target does: routed experts live in physical slots (redundant slots hold real
copies), routing goes logical expert -> replica -> physical slot through the
maps EPLB hands over, the layer records its load, and experts can be moved by
writing into the tensors ``get_expert_weights`` returns. It is also the
template for model authors: the MoE block shows the layer side of the
contract, the LM the model side.

Results do not depend on where an expert lives: every (token, k) pair is
computed by a matmul of one fixed shape at a fixed position in its batch,
whichever slot serves it, so logits are bit-identical before and after EPLB
moves or replicates experts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Final, Literal

import attrs
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_protocols._torch_typed import int_list, int_rows
from moe_protocols.eplb._maps import (
    compute_logical_maps,
    initial_physical_to_logical_map,
    max_replicas,
)
from moe_protocols.eplb.dispatch import balanced_dispatch
from moe_protocols.errors import EplbConfigError, EplbStateError, MappingError
from moe_protocols.layer_views import LayerEplbRows, layer_eplb_rows
from moe_protocols.models._config import ModelConfigError, ModelInputError, TinyMoEConfig
from moe_protocols.parallel import ExpertParallelContext
from moe_protocols.protocols import MixtureOfExperts

if TYPE_CHECKING:
    from collections.abc import MutableSequence, Sequence

    from moe_protocols.protocols import MoELayer

__all__ = [
    "ReplicaDispatch",
    "TinyDenseMLP",
    "TinyMoEBlock",
    "TinyMoEForCausalLM",
    "grouped_topk",
    "tiny_moe",
]

ReplicaDispatch = Literal["modulo", "balanced"]
"""How a block picks among an expert's replicas: ``"modulo"`` (token index modulo the
replica count, as vLLM) or ``"balanced"`` (per-step shares from this step's load,
:func:`moe_protocols.eplb.balanced_dispatch`)."""

_DISPATCH_MODES: Final = ("modulo", "balanced")

SINGLE_PROCESS: Final = ExpertParallelContext()
"""The default EP context: one rank, no ``torch.distributed``."""

# Pairs (token, k) computed per batched matmul. Bounds the gathered expert
# weights to a few MiB; a pair's position inside its chunk depends only on its
# index, never on the placement, which keeps results placement-independent.
_PAIR_CHUNK: Final = 512


def _normal(generator: torch.Generator, *shape: int, std: float) -> nn.Parameter:
    """A parameter drawn from ``N(0, std^2)`` with ``generator`` (never the global RNG)."""
    return nn.Parameter(torch.randn(*shape, generator=generator) * std)


class TinyDenseMLP(nn.Module):
    """A SwiGLU MLP ``[tokens, hidden] -> [tokens, hidden]``: dense FFN and shared experts."""

    def __init__(
        self, hidden_size: int, intermediate_size: int, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.intermediate_size = intermediate_size
        self.gate_up: nn.Parameter = _normal(
            generator, 2 * intermediate_size, hidden_size, std=hidden_size**-0.5
        )
        self.down: nn.Parameter = _normal(
            generator, hidden_size, intermediate_size, std=intermediate_size**-0.5
        )

    def forward(self, hidden: Tensor) -> Tensor:
        gate, up = F.linear(hidden, self.gate_up).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down)


def grouped_topk(
    scores: Tensor, top_k: int, num_expert_groups: int = 1, topk_groups: int = 1
) -> tuple[Tensor, Tensor]:
    """Pick ``top_k`` experts per token, only from the ``topk_groups`` best expert groups.

    ``scores`` is ``[tokens, logical]``; experts are split into
    ``num_expert_groups`` contiguous groups, a group's score is its best expert's
    score (DeepSeek-V2's group-limited routing). With one group this is a plain
    top-k. Returns ``(weights, logical_ids)``, both ``[tokens, top_k]``, weights
    renormalised to sum to 1 per token.
    """
    num_tokens, num_logical = scores.shape
    if num_expert_groups > 1:
        per_group = scores.view(num_tokens, num_expert_groups, num_logical // num_expert_groups)
        best_groups = per_group.amax(dim=-1).topk(topk_groups, dim=-1).indices
        keep = torch.zeros(num_tokens, num_expert_groups, dtype=torch.bool, device=scores.device)
        keep.scatter_(1, best_groups, True)
        keep = keep.repeat_interleave(num_logical // num_expert_groups, dim=1)
        scores = scores.masked_fill(~keep, float("-inf"))
    weights, logical_ids = scores.topk(top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), logical_ids


class TinyMoEBlock(nn.Module):
    """A MoE FFN (satisfies ``MoELayer``): router, routed experts in physical slots, shared expert.

    ``w13`` is ``[local_physical, 2 * intermediate, hidden]`` (gate and up
    projections), ``w2`` is ``[local_physical, hidden, intermediate]``; slot ``i``
    of this rank is physical slot ``rank * local_physical + i``. Until
    ``set_eplb_state`` is called the block routes with private maps of the
    initial placement and records nothing.
    """

    _default_logical_to_physical: Tensor
    _default_replica_count: Tensor

    def __init__(
        self,
        config: TinyMoEConfig,
        *,
        layer_idx: int,
        ep: ExpertParallelContext,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        num_physical = config.num_physical_experts
        if num_physical % ep.world_size != 0:
            raise EplbConfigError(
                f"TinyMoEBlock (decoder layer {layer_idx}): {num_physical} physical experts "
                f"({config.num_experts} logical + {config.num_redundant_experts} redundant) "
                f"do not split evenly over {ep.world_size} EP ranks"
            )
        self.layer_idx = layer_idx
        self.ep = ep
        self.hidden_size: int = config.hidden_size
        self.intermediate_size: int = config.intermediate_size
        self.top_k: int = config.top_k
        self.num_expert_groups: int = config.num_expert_groups
        self.topk_groups: int = config.topk_groups
        self.num_logical_experts: int = config.num_experts
        self.num_physical_experts: int = num_physical
        self.num_local_physical_experts: int = num_physical // ep.world_size
        self.record_expert_load = True
        self.replica_dispatch: ReplicaDispatch = "modulo"
        self._eplb: LayerEplbRows | None = None

        hidden, inter = config.hidden_size, config.intermediate_size
        self.router: nn.Parameter = _normal(generator, config.num_experts, hidden, std=hidden**-0.5)
        # Every rank draws all logical experts so the generator stream, and hence
        # every other weight, is the same on every rank and for any slot count.
        logical_w13 = torch.randn(config.num_experts, 2 * inter, hidden, generator=generator)
        logical_w2 = torch.randn(config.num_experts, hidden, inter, generator=generator)
        placement = initial_physical_to_logical_map(config.num_experts, num_physical)
        first = ep.rank * self.num_local_physical_experts
        local_logical = torch.tensor(
            placement[first : first + self.num_local_physical_experts], dtype=torch.int64
        )
        self.w13: nn.Parameter = nn.Parameter(
            (logical_w13 * hidden**-0.5)[local_logical].contiguous()
        )
        self.w2: nn.Parameter = nn.Parameter((logical_w2 * inter**-0.5)[local_logical].contiguous())
        self.shared_expert: TinyDenseMLP | None = None
        if config.num_shared_experts > 0:
            self.shared_expert = TinyDenseMLP(hidden, config.num_shared_experts * inter, generator)
        self._reset_default_maps()

    def _name(self) -> str:
        return f"TinyMoEBlock (decoder layer {self.layer_idx})"

    def _reset_default_maps(self) -> None:
        placement = torch.tensor(
            [initial_physical_to_logical_map(self.num_logical_experts, self.num_physical_experts)],
            device=self.w13.device,
        )
        replicas = max_replicas(self.num_logical_experts, self.num_physical_experts)
        l2p, count = compute_logical_maps(placement, self.num_logical_experts, replicas)
        self.register_buffer("_default_logical_to_physical", l2p[0], persistent=False)
        self.register_buffer("_default_replica_count", count[0], persistent=False)

    # ----------------------------------------------------------------- MoELayer

    def get_expert_weights(self) -> list[Tensor]:
        """``[w13, w2]`` as ``[local_physical, -1]`` views of the live parameters.

        Writing a row moves an expert into that slot.
        """
        local = self.num_local_physical_experts
        return [self.w13.data.view(local, -1), self.w2.data.view(local, -1)]

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        """Keep row ``moe_layer_idx`` of each model-wide EPLB tensor (views, not copies).

        Shapes: ``expert_load_view [L, physical]``, ``logical_to_physical_map
        [L, logical, max_replicas]``, ``logical_replica_count [L, logical]``.
        Nothing is kept unless all three fit.
        """
        self._eplb = layer_eplb_rows(
            self._name(),
            moe_layer_idx,
            expert_load_view,
            logical_to_physical_map,
            logical_replica_count,
            num_logical=self.num_logical_experts,
            num_physical=self.num_physical_experts,
        )

    @property
    def eplb_state_is_set(self) -> bool:
        """Whether ``set_eplb_state`` handed this layer live EPLB views."""
        return self._eplb is not None

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Adopt a new physical slot count; this rank's slots (and weights) stay as they are.

        The runner hands over EPLB tensors of the new size with
        ``set_eplb_state``; forward refuses to run until the EP group has
        ``num_physical_experts // num_local_physical_experts`` ranks.
        """
        if num_local_physical_experts != self.num_local_physical_experts:
            raise EplbStateError(
                f"{self._name()}: holds {self.num_local_physical_experts} local expert slots, "
                f"cannot change to {num_local_physical_experts}"
            )
        if (
            num_physical_experts < self.num_logical_experts
            or num_physical_experts % num_local_physical_experts != 0
        ):
            raise EplbStateError(
                f"{self._name()}: num_physical_experts={num_physical_experts} must be >= "
                f"{self.num_logical_experts} logical experts and a multiple of "
                f"{num_local_physical_experts} local slots"
            )
        self.num_physical_experts = num_physical_experts
        self._reset_default_maps()

    # ----------------------------------------------------------------- routing

    def route(self, hidden: Tensor) -> tuple[Tensor, Tensor]:
        """Choose experts for ``hidden [tokens, hidden]``.

        Returns ``(weights, logical_ids)``, each ``[tokens, top_k]``; weights are
        renormalised over the chosen experts.
        """
        scores = F.linear(hidden, self.router).float().softmax(dim=-1)
        return grouped_topk(scores, self.top_k, self.num_expert_groups, self.topk_groups)

    def map_to_physical(self, logical_ids: Tensor) -> Tensor:
        """Physical slot serving each choice ``[tokens, top_k]``.

        With ``replica_dispatch == "modulo"`` (the default) the replica is
        ``token % replica_count``: ``token`` is the flat index of the token in
        the batch, so all top-k choices of a token use the same replica index
        (as vLLM's router does). With ``"balanced"`` each expert's choices are
        split over its replicas by this batch's counts so that the largest rank
        load is minimal (:func:`moe_protocols.eplb.balanced_dispatch`); every
        rank sees the same tokens here, so every rank computes the same split.
        """
        if self._eplb is None:
            l2p, count = self._default_logical_to_physical, self._default_replica_count
        else:
            l2p, count = self._eplb.logical_to_physical, self._eplb.replica_count
        replica_count = count[logical_ids]
        if bool(((replica_count < 1) | (replica_count > l2p.shape[1])).any()):
            raise MappingError(
                f"{self._name()}: logical_replica_count gives a chosen expert a replica count "
                f"outside [1, {l2p.shape[1]}]: {int_list(count)}"
            )
        if self.replica_dispatch == "balanced":
            physical = balanced_dispatch(
                logical_ids,
                l2p,
                count,
                num_physical=self.num_physical_experts,
                num_ranks=self.ep.world_size,
            )
        else:
            token = torch.arange(logical_ids.shape[0], device=logical_ids.device).unsqueeze(1)
            physical = l2p[logical_ids, token % replica_count]
        if bool(((physical < 0) | (physical >= self.num_physical_experts)).any()):
            raise MappingError(
                f"{self._name()}: logical_to_physical_map sends a chosen expert to a slot "
                f"outside [0, {self.num_physical_experts}): {int_rows(l2p)}"
            )
        return physical

    def _check_counts(self) -> None:
        local, world = self.num_local_physical_experts, self.ep.world_size
        if local * world != self.num_physical_experts:
            raise EplbStateError(
                f"{self._name()}: {self.num_physical_experts} physical experts do not match "
                f"{world} EP ranks x {local} local slots; run with an EP group of that size"
            )

    # ----------------------------------------------------------------- compute

    def _routed_pair_outputs(self, hidden: Tensor, physical: Tensor) -> Tensor:
        """Output of the expert serving each (token, k) pair: ``[tokens, top_k, hidden]``.

        Pairs whose slot lives on another rank are zero here and filled in by
        the all-reduce: every pair is nonzero on exactly one rank, so the sum
        is exact.
        """
        num_tokens, top_k = physical.shape
        local = physical - self.ep.rank * self.num_local_physical_experts
        is_local = (local >= 0) & (local < self.num_local_physical_experts)
        slots = torch.where(is_local, local, torch.zeros_like(local)).reshape(-1)
        pair_inputs = hidden.repeat_interleave(top_k, dim=0).unsqueeze(-1)  # [pairs, hidden, 1]
        chunks: list[Tensor] = []
        for start in range(0, slots.shape[0], _PAIR_CHUNK):
            chunk = slots[start : start + _PAIR_CHUNK]
            w13 = self.w13.index_select(0, chunk)  # [chunk, 2 * inter, hidden]
            gate_up = torch.bmm(w13, pair_inputs[start : start + _PAIR_CHUNK])
            gate, up = gate_up.squeeze(-1).chunk(2, dim=-1)
            act = (F.silu(gate) * up).unsqueeze(-1)  # [chunk, inter, 1]
            chunks.append(torch.bmm(self.w2.index_select(0, chunk), act).squeeze(-1))
        out = torch.cat(chunks).view(num_tokens, top_k, self.hidden_size)
        if self.ep.is_distributed:
            out = torch.where(is_local.unsqueeze(-1), out, torch.zeros_like(out))
            self.ep.all_reduce_(out)
        return out

    def forward(self, hidden: Tensor) -> Tensor:
        """Apply the block to ``hidden [tokens, hidden]``; record load if EPLB state is set."""
        self._check_counts()
        weights, logical_ids = self.route(hidden)
        physical = self.map_to_physical(logical_ids)
        if self._eplb is not None and self.record_expert_load:
            load = self._eplb.expert_load
            served = physical.reshape(-1)
            if self.ep.is_distributed:
                # Every rank sees every token here; each counts only the pairs its
                # own slots serve, so the load summed over the EP group is exact.
                first = self.ep.rank * self.num_local_physical_experts
                served = served[
                    (served >= first) & (served < first + self.num_local_physical_experts)
                ]
            counts = torch.bincount(served, minlength=load.shape[0])
            load.add_(counts.to(load.dtype))
        pair_out = self._routed_pair_outputs(hidden, physical)
        # Reduce over k in k order: the sum sees the same operands in the same
        # order whatever slots served the pairs.
        out = (pair_out * weights.to(pair_out.dtype).unsqueeze(-1)).sum(dim=1)
        if self.shared_expert is not None:
            out = out + self.shared_expert(hidden)
        return out


class _DecoderLayer(nn.Module):
    """Pre-norm residual block: causal-mean token mixing, then the FFN (dense or MoE)."""

    def __init__(
        self, hidden_size: int, ffn: TinyDenseMLP | TinyMoEBlock, generator: torch.Generator
    ) -> None:
        super().__init__()
        self.mix_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        # A causal running mean lets earlier tokens (e.g. image tokens) reach
        # later ones at O(tokens) cost, without attention.
        self.mix = _normal(generator, hidden_size, hidden_size, std=hidden_size**-0.5)
        self.ffn_norm = nn.RMSNorm(hidden_size, eps=1e-6)
        self.ffn = ffn

    def forward(self, hidden: Tensor) -> Tensor:
        batch, seq, width = hidden.shape
        normed = self.mix_norm(hidden)
        positions = torch.arange(1, seq + 1, device=hidden.device, dtype=hidden.dtype)
        running_mean = normed.cumsum(dim=1) / positions.view(1, seq, 1)
        hidden = hidden + F.linear(running_mean, self.mix)
        ffn_out: Tensor = self.ffn(self.ffn_norm(hidden).reshape(batch * seq, width))
        return hidden + ffn_out.view(batch, seq, width)


class TinyMoEForCausalLM(nn.Module, MixtureOfExperts):
    """A tiny MoE causal LM that natively implements ``MixtureOfExperts``.

    ``forward(input_ids [batch, seq]) -> logits [batch, seq, vocab]``. Layers
    ``0..first_k_dense-1`` are dense, the rest are ``TinyMoEBlock``\\ s. With
    ``ep`` of ``world_size > 1`` each rank holds ``physical // world_size``
    expert slots and the block all-reduces over the EP group; every rank must
    be fed the same tokens, and records the load of the pairs its own slots
    serve (so the load all-reduced by ``EplbState`` is the real load). Set
    ``record_expert_load = False`` to stop load recording (e.g. to time a
    forward without it).
    """

    def __init__(
        self, config: TinyMoEConfig, *, ep: ExpertParallelContext = SINGLE_PROCESS
    ) -> None:
        super().__init__()
        if config.num_physical_experts % ep.world_size != 0:
            raise EplbConfigError(
                f"TinyMoEForCausalLM: {config.num_physical_experts} physical experts "
                f"({config.num_experts} logical + {config.num_redundant_experts} redundant) "
                f"do not split evenly over {ep.world_size} EP ranks"
            )
        self.config = config
        self.ep = ep
        generator = torch.Generator().manual_seed(config.seed)
        hidden = config.hidden_size
        self.embed_tokens: nn.Parameter = _normal(generator, config.vocab_size, hidden, std=1.0)
        layers: list[_DecoderLayer] = []
        blocks: list[TinyMoEBlock] = []
        for idx in range(config.num_layers):
            ffn: TinyDenseMLP | TinyMoEBlock
            if idx < config.first_k_dense:
                ffn = TinyDenseMLP(hidden, config.intermediate_size, generator)
            else:
                ffn = TinyMoEBlock(config, layer_idx=idx, ep=ep, generator=generator)
                blocks.append(ffn)
            layers.append(_DecoderLayer(hidden, ffn, generator))
        self.layers: nn.ModuleList = nn.ModuleList(layers)
        self.norm: nn.RMSNorm = nn.RMSNorm(hidden, eps=1e-6)
        self.lm_head: nn.Parameter = _normal(generator, config.vocab_size, hidden, std=hidden**-0.5)
        self._decoder_layers = layers
        self._moe_blocks = blocks
        self._record_expert_load = True
        self._replica_dispatch: ReplicaDispatch = "modulo"

        # MixtureOfExperts members: plain attributes, read and written by EPLB.
        self.expert_weights: MutableSequence[Sequence[Tensor]] = []
        self.moe_layers: Sequence[MoELayer] = blocks
        self.num_moe_layers: int = len(blocks)
        self.num_expert_groups: int = config.num_expert_groups
        self.num_logical_experts: int = config.num_experts
        self.num_physical_experts: int = config.num_physical_experts
        self.num_local_physical_experts: int = config.num_physical_experts // ep.world_size
        self.num_routed_experts: int = config.num_experts
        self.num_shared_experts: int = config.num_shared_experts
        self.num_redundant_experts: int = config.num_redundant_experts

    @property
    def record_expert_load(self) -> bool:
        """Whether MoE blocks with EPLB state record their load on each forward."""
        return self._record_expert_load

    @record_expert_load.setter
    def record_expert_load(self, enabled: bool) -> None:
        self._record_expert_load = enabled
        for block in self._moe_blocks:
            block.record_expert_load = enabled

    @property
    def replica_dispatch(self) -> ReplicaDispatch:
        """How MoE blocks choose among an expert's replicas (see :data:`ReplicaDispatch`).

        ``"balanced"`` changes only which replica serves a token: replicas hold
        the same weights, so outputs stay the same, and load recording and the
        EPLB maps are untouched. Setting another value raises
        ``ModelConfigError`` and changes nothing.
        """
        return self._replica_dispatch

    @replica_dispatch.setter
    def replica_dispatch(self, mode: ReplicaDispatch) -> None:
        if mode not in _DISPATCH_MODES:
            raise ModelConfigError(
                f"TinyMoEForCausalLM.replica_dispatch must be one of {_DISPATCH_MODES}, "
                f"got {mode!r}"
            )
        self._replica_dispatch = mode
        for block in self._moe_blocks:
            block.replica_dispatch = mode

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        """Adopt a new physical slot count (elastic EP); the local slot count must not change.

        Raises ``EplbStateError`` and changes nothing when the local count
        differs or the physical count cannot hold the logical experts.
        """
        if num_local_physical_experts != self.num_local_physical_experts:
            raise EplbStateError(
                f"TinyMoEForCausalLM: each rank holds {self.num_local_physical_experts} expert "
                f"slots per MoE layer (fixed by its weight tensors); cannot change to "
                f"num_local_physical_experts={num_local_physical_experts}"
            )
        if (
            num_physical_experts < self.num_logical_experts
            or num_physical_experts % num_local_physical_experts != 0
        ):
            raise EplbStateError(
                f"TinyMoEForCausalLM: num_physical_experts={num_physical_experts} must be >= "
                f"num_logical_experts={self.num_logical_experts} and a multiple of "
                f"num_local_physical_experts={num_local_physical_experts}"
            )
        self.num_physical_experts = num_physical_experts
        self.num_redundant_experts = num_physical_experts - self.num_logical_experts
        for block in self._moe_blocks:
            block.update_physical_experts_metadata(num_physical_experts, num_local_physical_experts)

    def embed_input_ids(self, input_ids: Tensor) -> Tensor:
        """Token embeddings ``[batch, seq, hidden]`` of ``input_ids [batch, seq]``."""
        if input_ids.dim() != 2:
            raise ModelInputError(
                f"TinyMoEForCausalLM: input_ids must be [batch, seq], got shape "
                f"{tuple(input_ids.shape)}"
            )
        return F.embedding(input_ids, self.embed_tokens)

    def forward(
        self, input_ids: Tensor | None = None, *, inputs_embeds: Tensor | None = None
    ) -> Tensor:
        """Logits ``[batch, seq, vocab]`` from ``input_ids`` or ``inputs_embeds``.

        ``inputs_embeds`` is ``[batch, seq, hidden]`` (the VLM passes image and text
        embeddings this way).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ModelInputError(
                "TinyMoEForCausalLM: pass exactly one of input_ids and inputs_embeds"
            )
        if input_ids is not None:
            hidden = self.embed_input_ids(input_ids)
        else:
            assert inputs_embeds is not None  # exactly one of the two, checked above
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.hidden_size:
                raise ModelInputError(
                    f"TinyMoEForCausalLM: inputs_embeds must be [batch, seq, "
                    f"{self.config.hidden_size}], got shape {tuple(inputs_embeds.shape)}"
                )
            hidden = inputs_embeds
        for layer in self._decoder_layers:
            hidden = layer(hidden)
        return F.linear(self.norm(hidden), self.lm_head)


def tiny_moe(*, ep: ExpertParallelContext = SINGLE_PROCESS, **overrides: int) -> TinyMoEForCausalLM:
    """Build a ``TinyMoEForCausalLM`` with tiny defaults.

    Keywords override ``TinyMoEConfig`` fields, e.g.
    ``tiny_moe(num_redundant_experts=4, num_expert_groups=2)``.
    """
    return TinyMoEForCausalLM(_config_with(TinyMoEConfig(), overrides), ep=ep)


def _config_with(config: TinyMoEConfig, overrides: dict[str, int]) -> TinyMoEConfig:
    fields = attrs.fields_dict(TinyMoEConfig)
    unknown = sorted(set(overrides) - set(fields))
    if unknown:
        raise ModelConfigError(
            f"TinyMoEConfig has no field(s) {unknown}; fields are {sorted(fields)}"
        )
    return attrs.evolve(config, **overrides)
