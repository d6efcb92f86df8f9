"""Discovery: finding the experts modules of one language model and building its layers.

Experts modules are found by convention (a module's ``experts`` child holding
fused 3-D expert parameters) and by the model's expert-parallel plan
(``_ep_plan`` / ``config.base_model_ep_plan``); each becomes an
``HFMoELayer``, or the reason it cannot be one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Final, cast

import attrs

from moe_protocols._torch_typed import named_modules
from moe_protocols.adapters.hf._layer import HFMoELayer
from moe_protocols.adapters.hf._probe import (
    TOP_K_ATTRS,
    int_attr,
    is_module,
    positional_arity,
    tensor_attr,
    text_config,
)
from moe_protocols.adapters.hf._recording import INDEX_HOOK, SCORES_HOOK
from moe_protocols.adapters.hf._weights import read_layout, weight_views

if TYPE_CHECKING:
    from torch import nn

__all__ = ["HFDiscovery", "discover_hf_moe"]

_ROUTER_ATTRS: Final = ("gate", "router")
"""Attribute names under which a block keeps its router, in the order tried."""

_GROUP_ATTRS: Final = ("num_group", "n_group", "num_expert_groups")
"""Names a router or config uses for the expert groups of group-limited routing."""

_SHARED_ATTRS: Final = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
"""Config names for the experts fused into a block's shared MLP."""

_QUANTIZED_SUFFIXES: Final = ("_scale_inv", "_scale", "_scales", "_blocks", "_zeros", "_qweight")
"""Parameter/buffer name endings that mark quantized experts (FP8, MXFP4, ...)."""

_EP_EXPERTS_VALUE: Final = "ep_dispatch_experts"
_EP_PARAM_SUFFIXES: Final = (".gate_up_proj", ".up_proj", ".down_proj")


@attrs.frozen
class HFDiscovery:
    """What a structural search of a module tree found: MoE layers, or why there are none usable."""

    layers: tuple[HFMoELayer, ...] = ()
    """The usable MoE layers, in module order."""
    problem: str | None = None
    """Why the object cannot be adapted (``None`` when ``layers`` is usable)."""

    @property
    def ok(self) -> bool:
        """Whether an adapter can be built from ``layers``."""
        return self.problem is None and bool(self.layers)


def _ep_plan_patterns(root: nn.Module) -> list[re.Pattern[str]]:
    """Experts-module paths the expert-parallel plan names, as regexes over module paths."""
    plans: list[tuple[str, object]] = [("", getattr(root, "_ep_plan", None))]
    config = getattr(root, "config", None)
    prefix = getattr(root, "base_model_prefix", None)
    base_plan = getattr(config, "base_model_ep_plan", None)
    if isinstance(prefix, str) and prefix:
        base = getattr(root, prefix, None)
        plans.append((f"{prefix}." if base is not None and base is not root else "", base_plan))
    else:
        plans.append(("", base_plan))
    patterns: list[re.Pattern[str]] = []
    for prefix_path, plan in plans:
        if not isinstance(plan, Mapping):
            continue
        for key, value in cast("Mapping[object, object]", plan).items():
            if not isinstance(key, str):
                continue
            path = None
            if value == _EP_EXPERTS_VALUE:
                path = key
            else:
                for suffix in _EP_PARAM_SUFFIXES:
                    if key.endswith(suffix):
                        path = key[: -len(suffix)]
            if path:
                parts = [
                    r"\d+" if p == "*" else re.escape(p) for p in (prefix_path + path).split(".")
                ]
                patterns.append(re.compile(r"\.".join(parts)))
    return patterns


def _holds_expert_projections(module: object) -> bool:
    """Whether ``module`` itself holds fused expert projections (quantized ones included)."""
    if not is_module(module):
        return False
    names = [n for n, _ in module.named_parameters(recurse=False)]
    names += [n for n, _ in module.named_buffers(recurse=False)]
    return any(n.startswith(("gate_up_proj", "up_proj", "down_proj")) for n in names)


def _experts_candidates(root: nn.Module) -> dict[str, tuple[nn.Module, nn.Module | None]]:
    """``experts path -> (experts module, block)`` by convention and by expert-parallel plan."""
    found: dict[str, tuple[nn.Module, nn.Module | None]] = {}
    modules = dict(named_modules(root))
    for name, module in modules.items():
        experts = getattr(module, "experts", None)
        if _holds_expert_projections(experts) and is_module(experts):
            found[f"{name}.experts" if name else "experts"] = (experts, module)
    patterns = _ep_plan_patterns(root)
    if patterns:
        for name, module in modules.items():
            if name in found or not _holds_expert_projections(module):
                continue
            if not any(p.fullmatch(name) for p in patterns):
                continue
            parent = modules.get(name.rpartition(".")[0]) if "." in name else root
            found[name] = (module, parent)
    order = {name: i for i, name in enumerate(modules)}
    return dict(sorted(found.items(), key=lambda item: order[item[0]]))


def _layer_stack(path: str) -> str:
    """The layer list an experts path belongs to: the path before its first numeric component."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:i])
    return ""


def _build_layer(path: str, experts: nn.Module, block: nn.Module | None) -> HFMoELayer | str:
    """One MoE layer, or why this experts module cannot be one."""
    if getattr(experts, "_is_expert_parallel", False) is True:
        return "it is sharded by transformers' expert parallelism (distributed_config ep_size > 1)"
    names = [n for n, _ in experts.named_parameters()] + [n for n, _ in experts.named_buffers()]
    quantized = [n for n in names if n.endswith(_QUANTIZED_SUFFIXES)]
    if quantized:
        return (
            f"its weights are quantized ({', '.join(quantized)}); "
            "only dense floating-point experts are supported"
        )
    fused = tensor_attr(experts, "gate_up_proj")
    if fused is None:
        fused = tensor_attr(experts, "up_proj")
    down = tensor_attr(experts, "down_proj")
    if fused is None or down is None or fused.dim() != 3 or down.dim() != 3:
        return "it has no 3-D gate_up_proj/up_proj and down_proj parameters"
    if not (fused.is_floating_point() and down.is_floating_point()):
        return f"its weights are {fused.dtype}/{down.dtype}, not floating point"
    if fused.shape[0] != down.shape[0]:
        return (
            f"gate_up_proj has {fused.shape[0]} experts but down_proj has {down.shape[0]} "
            "(e.g. zero-compute identity experts without weights)"
        )
    num_experts = int(down.shape[0])
    layout = read_layout(experts, fused, down)
    if isinstance(layout, str):
        return layout
    weights = weight_views(experts, layout)
    if isinstance(weights, str):
        return weights
    router = None
    if block is not None:
        for attr in _ROUTER_ATTRS:
            candidate = getattr(block, attr, None)
            if is_module(candidate):
                router = candidate
                break
    router_weight = tensor_attr(router, "weight") if router is not None else None
    if (
        router_weight is not None
        and router_weight.dim() == 2
        and router_weight.shape[0] != num_experts
    ):
        return f"its router scores {router_weight.shape[0]} experts but it holds {num_experts}"
    top_k = int_attr(router, TOP_K_ATTRS) if router is not None else None
    top_k = top_k or (int_attr(block, TOP_K_ATTRS) if block is not None else None)
    for owner in (experts, block, router):
        if top_k is None and owner is not None:
            top_k = int_attr(text_config(owner), TOP_K_ATTRS)
    if top_k is None or top_k > num_experts:
        return f"no top-k <= {num_experts} found on its router, block or config"
    num_groups = (int_attr(router, _GROUP_ATTRS) if router is not None else None) or 1
    if num_experts % num_groups != 0:
        return f"its router has {num_groups} expert groups, which do not divide {num_experts}"
    arity = positional_arity(getattr(experts, "forward", None))
    if arity is not None and arity < 2:
        # Called with hidden states only (dense experts): the chosen experts are
        # visible only in the router's output.
        if router is None:
            return "its experts are called without expert ids and there is no router to hook"
        rule = SCORES_HOOK
    else:
        rule = INDEX_HOOK
    return HFMoELayer(
        path=path,
        experts=experts,
        router=router,
        num_experts=num_experts,
        top_k=top_k,
        num_groups=num_groups,
        num_shared_experts=_shared_experts(experts, block),
        weights=weights,
        recording_rule=rule,
    )


def _shared_experts(experts: nn.Module, block: nn.Module | None) -> int:
    if block is None:
        return 0
    if not any(is_module(getattr(block, n, None)) for n in ("shared_expert", "shared_experts")):
        return 0
    for owner in (experts, block):
        count = int_attr(text_config(owner), _SHARED_ATTRS)
        if count is not None:
            return count
    return 1


def discover_hf_moe(obj: object) -> HFDiscovery:
    """Find the transformers-style MoE layers of ONE language model below ``obj``.

    Experts modules are found by convention (a module's ``experts`` child
    holding 3-D expert parameters) and by the model's expert-parallel plan.
    The result has a ``problem`` when ``obj`` is not a module, holds no experts
    modules, holds one that cannot be adapted (quantized, sharded, odd shapes),
    or holds experts of more than one language model (several layer stacks, or
    different expert counts / top-k, e.g. an omni model's thinker and talker).
    Nothing is modified.
    """
    if not is_module(obj):
        return HFDiscovery(problem=f"{type(obj).__name__} is not a torch module")
    candidates = _experts_candidates(obj)
    if not candidates:
        return HFDiscovery(problem=f"{type(obj).__name__} holds no transformers experts modules")
    layers: list[HFMoELayer] = []
    for path, (experts, block) in candidates.items():
        layer = _build_layer(path, experts, block)
        if isinstance(layer, str):
            return HFDiscovery(problem=f"experts module {path} ({type(experts).__name__}): {layer}")
        layers.append(layer)
    shapes = sorted({(layer.num_experts, layer.top_k) for layer in layers})
    if len(shapes) > 1:
        return HFDiscovery(
            problem=(
                f"{type(obj).__name__} holds MoE layers with different (experts, top_k): "
                f"{shapes}; EPLB needs one expert count and top-k per model"
            )
        )
    stacks = sorted({_layer_stack(layer.path) for layer in layers})
    if len(stacks) > 1:
        return HFDiscovery(
            problem=(
                f"{type(obj).__name__} holds experts in {len(stacks)} layer stacks "
                f"({', '.join(s or '(root)' for s in stacks)}): more than one language model"
            )
        )
    groups = sorted({layer.num_groups for layer in layers})
    if len(groups) > 1:
        return HFDiscovery(problem=f"its MoE layers use different expert group counts {groups}")
    return HFDiscovery(layers=tuple(layers))
