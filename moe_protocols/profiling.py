"""Expert-load profiling and placement planning: measure a model's routing, plan where experts go.

``record_expert_load`` runs batches through any model that is or wraps a
``MixtureOfExperts`` (native, VLM-wrapped, or a transformers MoE model through
the hf-experts adapter) and returns the tokens each logical expert received,
``[layers, logical]``. ``plan_placement`` turns such a load window into a
placement for a target deployment (EP ranks, nodes, redundant slots) with any
registered policy and reports the balancedness it would reach next to the
naive contiguous placement. ``run_profile`` is the ``moe-protocols profile``
command built from the two.

The recorder is deliberately small instead of an ``EplbState``: profiling
needs only the load of a few forwards, whereas ``EplbState`` rearranges (and
moves weights) on its own schedule and keeps a window sized for serving.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Final, TextIO

import attrs
import torch
from torch import Tensor

from moe_protocols.eplb._mapping_io import Placement, save_placement
from moe_protocols.eplb._maps import compute_logical_maps, initial_placement, max_replicas
from moe_protocols.eplb._metrics import balancedness, expected_rank_loads
from moe_protocols.eplb._ownership import Claim, find_owner
from moe_protocols.eplb._policy import DEFAULT_POLICIES, PolicyRegistry
from moe_protocols.errors import (
    EplbConfigError,
    EplbOwnershipError,
    EplbStateError,
    MappingError,
    MoEProtocolsError,
    NotMixtureOfExpertsError,
    PolicyError,
)

if TYPE_CHECKING:
    import argparse

    from moe_protocols.adapters._view import MoEView
    from moe_protocols.protocols import MixtureOfExperts

__all__ = [
    "DEFAULT_PROFILE_FACTORY",
    "PlacementPlan",
    "add_profile_arguments",
    "load_skew",
    "plan_placement",
    "record_expert_load",
    "run_profile",
]

DEFAULT_PROFILE_FACTORY: Final = "moe_protocols.adapters._hf_factories:tiny_qwen3_moe"
"""The model ``moe-protocols profile`` builds when no MODULE:ATTR is given."""

EXIT_OK: Final = 0
EXIT_NOT_MOE: Final = 1
EXIT_USAGE: Final = 2
EXIT_LOAD_ERROR: Final = 3

Batch = Tensor | Mapping[str, object]
"""One forward's input: ``input_ids`` (run as ``model(input_ids=batch)``) or keyword arguments."""


def _resolve(model: object, view: MoEView | None) -> MoEView:
    if view is not None:
        return view
    from moe_protocols.adapters._view import MoEView

    return MoEView.require(model)


def _weights_device(moe: MixtureOfExperts) -> torch.device:
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


def record_expert_load(
    model: object,
    batches: Iterable[Batch],
    *,
    view: MoEView | None = None,
    forward: Callable[[object, Batch], object] | None = None,
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
        EplbStateError: a layer's load hook never fired (its block was replaced,
            e.g. by a hub kernel), so its load would read zero.
    """
    moe = _resolve(model, view)
    run = forward if forward is not None else _default_forward
    claim = find_owner(moe)  # pyright: ignore[reportArgumentType]  # pyright takes no property for a protocol attribute (issue 15)
    physical_to_logical, l2p, count = _borrowed_maps(moe, claim)
    device = _weights_device(moe)  # pyright: ignore[reportArgumentType]  # pyright takes no property for a protocol attribute (issue 15)
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
            for batch in batches:
                run(model, batch)
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
            f"{'layer':>5}  {'tokens':>9}  {'skew':>6}  {'hottest':>7}  "
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
    physical_to_logical = chosen.rebalance_experts(
        load.detach().cpu(), num_physical, groups, num_nodes, num_ranks
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


# ---------------------------------------------------------------- command line


def add_profile_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the ``moe-protocols profile`` arguments to ``parser``."""
    parser.add_argument(
        "target",
        nargs="?",
        default=None,
        metavar="MODULE:ATTR",
        help=f"model factory or object (default: tiny offline Qwen3-MoE {DEFAULT_PROFILE_FACTORY})",
    )
    parser.add_argument("--ranks", type=int, default=4, help="EP ranks to plan for (default 4)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes the ranks span (default 1)")
    parser.add_argument(
        "--redundant", type=int, default=0, help="redundant expert slots per layer (default 0)"
    )
    parser.add_argument(
        "--groups",
        type=int,
        default=None,
        help="expert groups for hierarchical placement (default: the model's)",
    )
    parser.add_argument("--policy", default="deepseek", help="placement policy (default deepseek)")
    parser.add_argument("--tokens", type=int, default=256, help="tokens per batch (default 256)")
    parser.add_argument("--batches", type=int, default=4, help="batches to record (default 4)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the random token ids (default 0)"
    )
    parser.add_argument(
        "--save",
        type=Path,
        default=None,
        metavar="PATH",
        help="write the placement (.json or .safetensors)",
    )


def _vocab_size(model: object) -> int | None:
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


def _build(spec: str | None) -> object:
    from moe_protocols.cli import load_target

    if spec is None:
        from moe_protocols.adapters._hf_factories import tiny_qwen3_moe

        return tiny_qwen3_moe()
    return load_target(spec)


def run_profile(args: argparse.Namespace, out: TextIO) -> int:
    """``moe-protocols profile``: record expert load, plan a placement, print (and save) it.

    Exit codes: 0 success; 1 no MixtureOfExperts in the model; 2 bad
    deployment arguments; 3 the model could not be built (e.g. transformers
    is missing for the default model).
    """
    err = sys.stderr
    for name in ("tokens", "batches"):
        if getattr(args, name) < 1:
            print(f"moe-protocols profile: --{name} must be >= 1", file=err)
            return EXIT_USAGE
    try:
        model = _build(args.target)
    except Exception as exc:  # the factory's own failure, whatever it is, is a load error
        print(f"moe-protocols profile: {exc}", file=err)
        return EXIT_LOAD_ERROR
    try:
        view = _resolve(model, None)
    except NotMixtureOfExpertsError as exc:
        print(str(exc), file=out)
        return EXIT_NOT_MOE
    vocab = _vocab_size(model)
    if vocab is None:
        print(
            f"moe-protocols profile: cannot tell the vocabulary size of {type(model).__name__} "
            "(no get_input_embeddings() or config.vocab_size) to draw token ids",
            file=err,
        )
        return EXIT_LOAD_ERROR
    generator = torch.Generator().manual_seed(args.seed)
    device = _weights_device(view)  # pyright: ignore[reportArgumentType]  # pyright takes no property for a protocol attribute (issue 15)
    batches = [
        torch.randint(0, vocab, (1, args.tokens), generator=generator).to(device)
        for _ in range(args.batches)
    ]
    try:
        load = record_expert_load(model, batches, view=view)
    except EplbStateError as exc:
        print(f"moe-protocols profile: recording failed: {exc}", file=err)
        return EXIT_NOT_MOE
    groups = args.groups if args.groups is not None else view.num_expert_groups
    try:
        plan = plan_placement(
            load,
            num_ranks=args.ranks,
            num_nodes=args.nodes,
            num_redundant_experts=args.redundant,
            num_groups=groups,
            policy=args.policy,
            metadata={"model": type(model).__name__, "source": "moe-protocols profile"},
        )
    except (EplbConfigError, PolicyError) as exc:
        print(f"moe-protocols profile: {exc}", file=err)
        return EXIT_USAGE
    print(
        f"model: {type(model).__name__}, MoE model at: {view.trace.resolved_path or 'model'}",
        file=out,
    )
    print(
        f"MoE layers: {view.num_moe_layers}, experts: {view.num_logical_experts}, "
        f"groups: {view.num_expert_groups}; recorded {args.batches} batch(es) x "
        f"{args.tokens} tokens",
        file=out,
    )
    print(str(plan), file=out)
    print(
        f"balancedness: naive {plan.naive_balancedness:.3f} -> planned {plan.balancedness:.3f}",
        file=out,
    )
    if args.save is not None:
        try:
            save_placement(plan.placement, args.save)
        except (MoEProtocolsError, OSError) as exc:
            print(f"moe-protocols profile: cannot save to {args.save}: {exc}", file=err)
            return EXIT_USAGE
        print(f"saved placement to {args.save}", file=out)
    return EXIT_OK
