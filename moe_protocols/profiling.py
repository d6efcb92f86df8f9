"""Expert-load profiling and placement planning: measure a model's routing, plan where experts go.

``record_expert_load`` runs batches through any model that is or wraps a
``MixtureOfExperts`` (native, VLM-wrapped, or a transformers MoE model through
the hf-experts adapter) and returns the tokens each logical expert received,
``[layers, logical]``. ``plan_placement`` turns such a load window into a
placement for a target deployment (EP ranks, nodes, redundant slots) with any
registered policy and reports the balancedness it would reach next to the
naive contiguous placement. The ``moe-protocols profile`` command is built
from the two (:mod:`moe_protocols.cli._profile`); this module never imports
the command line.

The recorder is deliberately small instead of an ``EplbState``: profiling
needs only the load of a few forwards, whereas ``EplbState`` rearranges (and
moves weights) on its own schedule and keeps a window sized for serving.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING

import attrs
import torch
from torch import Tensor

from moe_protocols.adapters import MoEView
from moe_protocols.eplb import (
    DEFAULT_POLICIES,
    Claim,
    Placement,
    PolicyRegistry,
    balancedness,
    checked_rebalance,
    compute_logical_maps,
    expected_rank_loads,
    find_owner,
    initial_placement,
    max_replicas,
)

# Not on the eplb face (yet): who owns a model's layers, for profiling a live model.
from moe_protocols.errors import (
    EplbConfigError,
    EplbOwnershipError,
    MappingError,
    ModelInputError,
    NotMixtureOfExpertsError,
)

if TYPE_CHECKING:
    from moe_protocols.protocols import MixtureOfExperts

__all__ = [
    "Batch",
    "PlacementPlan",
    "load_skew",
    "plan_placement",
    "record_expert_load",
    "vocabulary_size",
    "weights_device",
]

Batch = Tensor | Mapping[str, object]
"""One forward's input: ``input_ids`` (run as ``model(input_ids=batch)``) or keyword arguments."""


def _resolve(model: object, view: MoEView | None) -> MoEView:
    if view is not None:
        return view
    return MoEView.require(model)


def weights_device(moe: MixtureOfExperts) -> torch.device:
    """The device of the model's first expert weight (CPU for a model without any)."""
    for layer in moe.moe_layers:
        for weight in layer.get_expert_weights():
            return weight.device
    return torch.device("cpu")


def _default_forward(model: object, batch: Batch) -> object:
    if not callable(model):
        raise NotMixtureOfExpertsError(f"{type(model).__name__} is not callable; pass forward=")
    if isinstance(batch, Tensor):
        return model(input_ids=batch)
    return model(**batch)


def _check_batch(batch: Batch, index: int) -> None:
    """A tensor batch is ``input_ids``: ``[batch, sequence]`` integers (a mapping is the user's)."""
    if not isinstance(batch, Tensor):
        return
    if batch.dim() != 2 or batch.dtype.is_floating_point or batch.dtype == torch.bool:
        hint = "; add the batch dimension with ids.unsqueeze(0)" if batch.dim() == 1 else ""
        raise ModelInputError(
            f"batch {index}: input_ids must be a [batch, sequence] integer tensor, got shape "
            f"{tuple(batch.shape)} of {batch.dtype}{hint}"
        )


def record_expert_load(
    model: object,
    batches: Iterable[Batch],
    *,
    view: MoEView | None = None,
    forward: Callable[[object, Batch], object] | None = None,
    progress: Callable[[int], None] | None = None,
) -> Tensor:
    """Run ``batches`` through ``model`` and return the tokens each logical expert received.

    Args:
        model: the served object (called for every batch); its MoE model is
            found with ``MoEView`` (default unwrapping steps plus
            ``get_decoder()`` and the hf-experts adapter) unless ``view`` is given.
        batches: ``input_ids`` tensors or keyword-argument mappings.
        view: the already-resolved view of ``model``.
        forward: ``forward(model, batch)``; default ``model(input_ids=batch)``
            for a tensor, ``model(**batch)`` for a mapping.
        progress: called after each batch with the number of batches done
            (e.g. to draw a progress bar).

    Returns:
        ``[layers, logical]`` int64 on CPU: token-expert assignments per
        logical expert over all batches (physical slot counts are summed per
        logical expert).

    The model's layers are lent a private load tensor for the run. A model
    that a live ``EplbState`` balances is profiled under that state's current
    placement (copies of its maps), and its layers are handed back to the
    state afterwards, so the state keeps recording and routing exactly as
    before; a model nobody balances is profiled under the identity placement.
    Adapter hooks are removed afterwards.

    Raises:
        NotMixtureOfExpertsError: no MixtureOfExperts is reachable from ``model``.
        EplbOwnershipError: some, not all, of the model's MoE layers belong to a
            live EPLB state registration of another model.
        ModelInputError: a tensor batch (run as ``input_ids``) is not a 2-D
            ``[batch, sequence]`` integer tensor.
        EplbStateError: a layer's load hook never fired (its block was replaced,
            e.g. by a hub kernel), so its load would read zero.
    """
    moe = _resolve(model, view)
    run = forward if forward is not None else _default_forward
    claim = find_owner(moe)
    physical_to_logical, l2p, count = _borrowed_maps(moe, claim)
    device = weights_device(moe)
    load = torch.zeros(
        moe.num_moe_layers, moe.num_physical_experts, dtype=torch.int64, device=device
    )
    target = moe.model
    try:
        moe.set_eplb_state(
            expert_load_view=load,
            logical_to_physical_map=l2p.to(device),
            logical_replica_count=count.to(device),
        )
        with torch.no_grad():
            for done, batch in enumerate(batches, start=1):
                if forward is None:
                    _check_batch(batch, done - 1)
                run(model, batch)
                if progress is not None:
                    progress(done)
        check = getattr(target, "check_recording", None)
        if callable(check):
            check()
    finally:
        remove = getattr(target, "remove_hooks", None)
        if callable(remove):
            remove()
        if claim is not None:
            claim.owner.reattach(claim.model_name)
    logical = torch.zeros(moe.num_moe_layers, moe.num_logical_experts, dtype=torch.int64)
    physical = load.cpu()
    logical.scatter_add_(
        1, physical_to_logical.clamp(min=0), torch.where(physical_to_logical >= 0, physical, 0)
    )
    return logical


def _borrowed_maps(moe: MoEView, claim: Claim | None) -> tuple[Tensor, Tensor, Tensor]:
    """``(physical_to_logical, logical_to_physical, replica_count)`` to profile ``moe`` with.

    The identity placement for a model nobody balances; the owner's current
    maps (copies) for a model a live EPLB state has registered, since its
    weights sit where that state moved them.
    """
    num_layers = moe.num_moe_layers
    num_logical, num_physical = moe.num_logical_experts, moe.num_physical_experts
    if claim is None:
        p2l = initial_placement(num_layers, num_logical, num_physical)
        l2p, count = compute_logical_maps(p2l, num_logical, max_replicas(num_logical, num_physical))
        return p2l, l2p, count
    owner, name = claim.owner, claim.model_name
    p2l = owner.physical_to_logical_map(name).cpu()
    if len(claim.layers) != num_layers or tuple(p2l.shape) != (num_layers, num_physical):
        raise EplbOwnershipError(
            f"cannot profile {moe.model!r}: MoE layers {list(claim.layers)} of its "
            f"{num_layers} are registered with {claim.describe()}, which is not this model; "
            "profile the model that state registered, or release it first with "
            f"remove_model({name!r})",
            owner_model_name=name,
            layers=claim.layers,
        )
    return p2l, owner.logical_to_physical_map(name), owner.logical_replica_count(name)


def load_skew(load: Tensor) -> Tensor:
    """Per layer, hottest expert's load / mean expert load (``[layers]`` float64; 1.0 = uniform).

    A layer without load has skew 1.0.
    """
    if load.dim() != 2:
        raise MappingError(f"load must be [layers, logical], got shape {tuple(load.shape)}")
    values = load.detach().to(device="cpu", dtype=torch.float64)
    mean = values.mean(dim=1)
    return torch.where(mean > 0, values.amax(dim=1) / torch.where(mean > 0, mean, 1.0), 1.0)


def _float_matrix(value: object) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 2:
        raise MappingError(f"expected a [layers, logical] tensor, got {value!r}")
    return value.detach().to(device="cpu", dtype=torch.float64)


def _float_vector(value: object) -> Tensor:
    if not isinstance(value, Tensor) or value.dim() != 1:
        raise MappingError(f"expected a 1-D per-layer tensor, got {value!r}")
    return value.detach().to(device="cpu", dtype=torch.float64)


@attrs.frozen(eq=False)
class PlacementPlan:
    """A planned placement and how balanced it would be, next to the naive contiguous one.

    Balancedness is mean rank load / max rank load under the recorded load
    (1.0 perfect, ``1 / ranks`` worst), each expert's load split evenly over
    its replicas.
    """

    placement: Placement
    """The planned ``physical_to_logical_map [layers, physical]`` and deployment."""
    logical_load: Tensor = attrs.field(converter=_float_matrix)
    """``[layers, logical]`` the load window the plan was computed from."""
    policy: str
    """The policy's registered name."""
    balancedness_per_layer: Tensor = attrs.field(converter=_float_vector)
    """``[layers]`` planned balancedness."""
    naive_balancedness_per_layer: Tensor = attrs.field(converter=_float_vector)
    """``[layers]`` balancedness of the contiguous placement (slot ``p < E`` holds expert ``p``)."""

    @property
    def balancedness(self) -> float:
        """Mean over layers of the planned balancedness."""
        return float(self.balancedness_per_layer.mean())

    @property
    def naive_balancedness(self) -> float:
        """Mean over layers of the contiguous placement's balancedness."""
        return float(self.naive_balancedness_per_layer.mean())

    @property
    def load_skew(self) -> Tensor:
        """``[layers]`` hottest / mean expert load of the recorded window."""
        return load_skew(self.logical_load)

    def __str__(self) -> str:
        p = self.placement
        lines = [
            f"placement for {p.num_ranks} EP rank(s) on {p.num_nodes} node(s), "
            f"{p.num_physical_experts} slots per layer ({p.num_logical_experts} experts + "
            f"{p.num_physical_experts - p.num_logical_experts} redundant), policy {self.policy!r}",
            f"{'layer':>5}  {'load':>9}  {'skew':>6}  {'hottest':>7}  "
            f"{'naive bal':>9}  {'planned bal':>11}",
        ]
        skew = self.load_skew
        for layer in range(p.num_layers):
            row = self.logical_load[layer]
            lines.append(
                f"{layer:>5}  {int(row.sum()):>9}  {float(skew[layer]):>6.2f}  "
                f"{int(row.argmax()):>7}  {float(self.naive_balancedness_per_layer[layer]):>9.3f}  "
                f"{float(self.balancedness_per_layer[layer]):>11.3f}"
            )
        lines.append(
            f"{'all':>5}  {int(self.logical_load.sum()):>9}  {float(skew.mean()):>6.2f}  "
            f"{'':>7}  {self.naive_balancedness:>9.3f}  {self.balancedness:>11.3f}"
        )
        lines.extend(
            [
                "load: token-expert assignments (a token counts once per expert it is routed to)",
                "skew: hottest expert's load / mean expert load (1.00 = uniform)",
                "hottest: id of the hottest expert; naive: expert p in slot p",
                "bal: balancedness, mean / max rank load (1.00 = every rank equally loaded)",
            ]
        )
        return "\n".join(lines)


def plan_placement(
    load: Tensor,
    *,
    num_ranks: int,
    num_nodes: int = 1,
    num_redundant_experts: int = 0,
    num_groups: int | None = None,
    policy: str = "deepseek",
    policies: PolicyRegistry = DEFAULT_POLICIES,
    metadata: Mapping[str, str] | None = None,
) -> PlacementPlan:
    """Plan a placement of ``E + num_redundant_experts`` slots per layer over ``num_ranks`` ranks.

    Args:
        load: ``[layers, logical]`` recorded load (e.g. from :func:`record_expert_load`).
        num_ranks: EP ranks of the target deployment.
        num_nodes: nodes the ranks are spread over (divides ``num_ranks``).
        num_redundant_experts: extra slots per layer for replicas of hot experts.
        num_groups: expert groups for group-limited routing (default 1).
        policy: name of a policy in ``policies``.
        policies: the policy registry.
        metadata: extra string annotations stored in the placement.

    Raises:
        EplbConfigError: a count is out of range or the slots do not split
            evenly over the ranks.
        PolicyError: the policy is unknown, rejects the problem, or returns a
            bad placement.
    """
    for name, value, least in (
        ("num_ranks", num_ranks, 1),
        ("num_nodes", num_nodes, 1),
        ("num_redundant_experts", num_redundant_experts, 0),
    ):
        if not isinstance(value, int) or isinstance(value, bool) or value < least:  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            raise EplbConfigError(
                f"plan_placement: {name} must be an int >= {least}, got {value!r}"
            )
    if not isinstance(load, Tensor) or load.dim() != 2 or 0 in load.shape:  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
        shape = tuple(load.shape) if isinstance(load, Tensor) else type(load).__name__  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
        raise EplbConfigError(
            f"plan_placement: load must be a non-empty [layers, logical] tensor, got {shape}"
        )
    num_layers, num_logical = (int(n) for n in load.shape)
    num_physical = num_logical + num_redundant_experts
    if num_physical % num_ranks != 0:
        raise EplbConfigError(
            f"plan_placement: {num_logical} experts + {num_redundant_experts} redundant = "
            f"{num_physical} slots per layer do not split evenly over {num_ranks} ranks; "
            "choose --redundant so that experts + redundant is a multiple of the ranks"
        )
    if num_ranks % num_nodes != 0:
        raise EplbConfigError(
            f"plan_placement: num_ranks={num_ranks} is not a multiple of num_nodes={num_nodes}"
        )
    groups = 1 if num_groups is None else num_groups
    chosen = policies.get(policy)
    physical_to_logical = checked_rebalance(
        chosen, load.detach().cpu(), num_physical, groups, num_nodes, num_ranks
    )
    naive = initial_placement(num_layers, num_logical, num_physical)
    notes = {"policy": chosen.name, "tokens": str(int(load.sum()))}
    notes.update(metadata or {})
    placement = Placement(
        physical_to_logical_map=physical_to_logical,
        num_logical_experts=num_logical,
        num_ranks=num_ranks,
        num_nodes=num_nodes,
        metadata=notes,
    )
    return PlacementPlan(
        placement=placement,
        logical_load=load,
        policy=chosen.name,
        balancedness_per_layer=balancedness(
            expected_rank_loads(placement.physical_to_logical_map, load, num_ranks)
        ),
        naive_balancedness_per_layer=balancedness(expected_rank_loads(naive, load, num_ranks)),
    )


def vocabulary_size(model: object) -> int | None:
    """The vocabulary size ``model`` states, or None when it states none.

    Read from ``get_input_embeddings().num_embeddings``, else from
    ``config.get_text_config().vocab_size`` or ``config.vocab_size``.
    """
    get_embeddings = getattr(model, "get_input_embeddings", None)
    if callable(get_embeddings):
        try:
            embeddings = get_embeddings()
        except Exception:
            embeddings = None
        rows = getattr(embeddings, "num_embeddings", None)
        if isinstance(rows, int) and rows > 0:
            return rows
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    for source in (get_text() if callable(get_text) else None, config):
        size = getattr(source, "vocab_size", None)
        if isinstance(size, int) and size > 0:
            return size
    return None
