"""A ``MixtureOfExperts`` over a Hugging Face transformers model that does not implement it.

transformers 5.x stores the routed experts of an MoE layer in one *experts
module* holding fused 3-D parameters (``gate_up_proj`` or ``up_proj``, and
``down_proj``, dim 0 = expert), next to a router (``gate`` or ``router``).
This module finds those experts modules structurally -- a child called
``experts``, or a path named by the model's expert-parallel plan
(``_ep_plan`` / ``config.base_model_ep_plan``) -- and builds
:class:`HFMoEAdapter` over them. It never imports transformers and never asks
which class a module is: only attributes, parameter shapes and signatures.

**Expert weight layout.** ``HFMoELayer.get_expert_weights()`` returns views
(never copies) of the live parameters in ``nn.Linear`` orientation, always in
this order::

    gate       [experts, intermediate, hidden]   (absent for non-gated experts)
    up         [experts, intermediate, hidden]
    down       [experts, hidden, intermediate]
    gate_bias  [experts, intermediate]           (these three only when the
    up_bias    [experts, intermediate]            experts have biases; gate_bias
    down_bias  [experts, hidden]                  absent for non-gated experts)

so that expert ``e`` computes ``down[e] @ act(gate[e] @ x + gate_bias[e]) *
(up[e] @ x + up_bias[e]) + down_bias[e]``, where ``act`` is the experts
module's own gate function (see :meth:`HFMoELayer.expert_forward`). Stored
``[E, hidden, 2 * intermediate]`` (transposed) parameters are viewed through
``.transpose``; gate/up interleaved along the fused dimension (GPT-OSS) are
viewed with stride 2.

**Load recording.** Nothing is hooked until ``set_eplb_state``. Then each
layer records the router's real decision on every forward into its row of
``expert_load_view`` (``index_add_`` of ones, ids outside ``[0, E)`` ignored,
no host sync):

* experts modules called as ``experts(hidden, top_k_index, top_k_weights)``
  (every decorated family): a forward pre-hook on the experts module reads
  ``top_k_index [tokens, top_k]``, exactly what the experts compute with;
* experts modules called with one tensor (Llama-4, whose experts run densely
  on pre-scaled copies of every token): a forward hook on the router reads
  its dense ``scores [tokens, E]``; expert ``e`` counts a token when its score
  is non-zero (the router's sigmoid scores are exactly 0 off its top-k).

Hooks are removable (:meth:`HFMoEAdapter.remove_hooks`) and each layer notes
whether its hook fired; :meth:`HFMoEAdapter.check_recording` raises instead of
letting a replaced block (a hub kernel, ``use_kernels=True``) report zeros.

**Which object.** :data:`HF_EXPERTS_STEP` (the last ``MoEView`` step) adapts an
object only when its experts modules belong to one language model (one layer
stack, one expert count and top-k) and no model inside it that a default
unwrapping step reaches (``.model.language_model``, ``.language_model``,
``.thinker``, ``._orig_mod``, ``.module``, ...) holds them all. So a VLM
resolves through its wrapper to the text model, and an omni model whose
thinker and talker differ resolves to the thinker.

transformers routes by logical expert id, so physical slots equal logical
experts: there are no redundant slots and nothing can be re-placed.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterable, Mapping, MutableSequence, Sequence
from typing import TYPE_CHECKING, Final, cast

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import named_modules
from moe_protocols.adapters._forward import fixed
from moe_protocols.adapters._step import UnwrapStep
from moe_protocols.errors import EplbStateError, MappingError, NotMixtureOfExpertsError
from moe_protocols.layer_views import layer_eplb_rows

if TYPE_CHECKING:
    from torch import nn
    from torch.utils.hooks import RemovableHandle
    from typing_extensions import TypeIs

    from moe_protocols.protocols import MoELayer

__all__ = [
    "HF_EXPERTS_STEP",
    "HF_GET_DECODER_STEP",
    "HFDiscovery",
    "HFExpertWeights",
    "HFMoEAdapter",
    "HFMoELayer",
    "discover_hf_moe",
]

_ROUTER_ATTRS: Final = ("gate", "router")
"""Attribute names under which a block keeps its router, in the order tried."""

_TOP_K_ATTRS: Final = ("top_k", "num_experts_per_tok", "top_k_experts", "moe_topk", "moe_k")
"""Names a router, a block or a (text) config uses for the experts chosen per token."""

_GROUP_ATTRS: Final = ("num_group", "n_group", "num_expert_groups")
"""Names a router or config uses for the expert groups of group-limited routing."""

_SHARED_ATTRS: Final = ("n_shared_experts", "num_shared_experts", "moe_num_shared_experts")
"""Config names for the experts fused into a block's shared MLP."""

_QUANTIZED_SUFFIXES: Final = ("_scale_inv", "_scale", "_scales", "_blocks", "_zeros", "_qweight")
"""Parameter/buffer name endings that mark quantized experts (FP8, MXFP4, ...)."""

_EP_EXPERTS_VALUE: Final = "ep_dispatch_experts"
_FIXED_WHY: Final = (
    "transformers routes tokens by logical expert id, so the adapter's counts are fixed"
)
_EP_PARAM_SUFFIXES: Final = (".gate_up_proj", ".up_proj", ".down_proj")

INDEX_HOOK: Final = "experts pre-hook (top_k_index)"
"""How a layer records when its experts module receives the chosen expert ids."""

SCORES_HOOK: Final = "router hook (non-zero scores)"
"""How a layer records when its experts run densely and the router returns ``[T, E]`` scores."""


# ---------------------------------------------------------------- structural probes


def _is_module(obj: object) -> TypeIs[nn.Module]:
    """Whether ``obj`` behaves like a ``torch.nn.Module`` (attribute probes, no class check).

    The methods are looked up on the type, so a mock that answers every
    attribute with another mock is not taken for a module.
    """
    cls = type(obj)
    return all(
        callable(getattr(cls, name, None))
        for name in ("named_modules", "named_parameters", "register_forward_pre_hook")
    )


def _tensor_attr(module: object, name: str) -> Tensor | None:
    value = getattr(module, name, None)
    return value if isinstance(value, Tensor) else None


def _int_attr(obj: object, names: Iterable[str]) -> int | None:
    for name in names:
        value = getattr(obj, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _text_config(obj: object) -> object | None:
    """``obj.config``, narrowed to its text sub-config when it has one (VLM configs)."""
    config: object | None = getattr(obj, "config", None)
    get_text_config = getattr(config, "get_text_config", None)
    if callable(get_text_config):
        try:
            text: object | None = get_text_config()
        except Exception:
            # Per-layer configs may refuse global reads; fall back to the config itself.
            return config
        return text
    return config


def _positional_arity(function: object) -> int | None:
    """Positional parameters ``function`` accepts; ``None`` when unbounded or unknown."""
    if not callable(function):
        return None
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return None
    count = 0
    for parameter in signature.parameters.values():
        if parameter.kind is inspect.Parameter.VAR_POSITIONAL:
            return None
        if parameter.kind in (
            inspect.Parameter.POSITIONAL_ONLY,
            inspect.Parameter.POSITIONAL_OR_KEYWORD,
        ):
            count += 1
    return count


# ---------------------------------------------------------------- weights


@attrs.frozen(eq=False)
class HFExpertWeights:
    """Views of one MoE layer's routed expert weights in ``nn.Linear`` orientation.

    Writing into any of these writes the live parameter. ``E`` experts,
    ``H`` hidden size, ``I`` per-expert intermediate size.
    """

    gate: Tensor | None
    """``[E, I, H]`` gate projection; ``None`` for non-gated experts."""
    up: Tensor
    """``[E, I, H]`` up projection."""
    down: Tensor
    """``[E, H, I]`` down projection."""
    gate_bias: Tensor | None = None
    """``[E, I]``, when the experts have biases and a gate."""
    up_bias: Tensor | None = None
    """``[E, I]``, when the experts have biases."""
    down_bias: Tensor | None = None
    """``[E, H]``, when the experts have biases."""

    def tensors(self) -> tuple[Tensor, ...]:
        """The present views in the documented order (gate, up, down, then the biases)."""
        order = (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)
        return tuple(t for t in order if t is not None)


@attrs.frozen
class _Layout:
    """How an experts module stores its weights (``use_experts_implementation`` flags)."""

    is_transposed: bool
    is_concatenated: bool
    has_gate: bool
    has_bias: bool


def _flag(module: object, name: str) -> bool | None:
    value = getattr(module, name, None)
    return value if isinstance(value, bool) else None


def _read_layout(experts: nn.Module, fused: Tensor, down: Tensor) -> _Layout | str:
    """The storage layout: the decorator's flags when present, else inferred from shapes."""
    has_gate = _tensor_attr(experts, "gate_up_proj") is not None
    has_bias = any(
        _tensor_attr(experts, name) is not None
        for name in ("gate_up_proj_bias", "up_proj_bias", "down_proj_bias")
    )
    flags = [
        _flag(experts, n) for n in ("is_transposed", "is_concatenated", "has_gate", "has_bias")
    ]
    if all(f is not None for f in flags):
        is_transposed, is_concatenated, flag_gate, flag_bias = (bool(f) for f in flags)
        if flag_gate != has_gate or flag_bias != has_bias:
            return (
                f"its flags say has_gate={flag_gate}, has_bias={flag_bias} but its parameters "
                f"say has_gate={has_gate}, has_bias={has_bias}"
            )
        return _Layout(is_transposed, is_concatenated, has_gate, has_bias)
    # Undecorated experts (Llama-4, Step3p7, ...): the hidden size is the dimension
    # the two projections share. Untransposed: fused [E, m*I, H], down [E, H, I];
    # transposed: fused [E, H, m*I], down [E, I, H]. Both can only hold at once when
    # a size is 0. Gate and up are assumed concatenated (interleaving is invisible
    # in shapes and no undecorated family uses it).
    mult = 2 if has_gate else 1
    _, f1, f2 = fused.shape
    _, d1, d2 = down.shape
    if f2 == d1 and f1 == mult * d2:
        return _Layout(False, True, has_gate, has_bias)
    if f1 == d2 and f2 == mult * d1:
        return _Layout(True, True, has_gate, has_bias)
    return (
        f"fused projection {tuple(fused.shape)} and down_proj {tuple(down.shape)} fit neither "
        "[E, 2I, H]/[E, H, I] nor the transposed [E, H, 2I]/[E, I, H]"
    )


def _weight_views(experts: nn.Module, layout: _Layout) -> HFExpertWeights | str:
    fused = _tensor_attr(experts, "gate_up_proj" if layout.has_gate else "up_proj")
    down = _tensor_attr(experts, "down_proj")
    if fused is None or down is None:
        return "it lacks gate_up_proj/up_proj or down_proj"
    w1 = fused.transpose(1, 2) if layout.is_transposed else fused
    w2 = down.transpose(1, 2) if layout.is_transposed else down
    num_experts, hidden, inter = w2.shape
    width = 2 * inter if layout.has_gate else inter
    if tuple(w1.shape) != (num_experts, width, hidden):
        return (
            f"its fused projection views as {tuple(w1.shape)} but down_proj as {tuple(w2.shape)}; "
            f"expected [{num_experts}, {width}, {hidden}]"
        )
    b1 = _tensor_attr(experts, "gate_up_proj_bias" if layout.has_gate else "up_proj_bias")
    b2 = _tensor_attr(experts, "down_proj_bias")
    if layout.has_bias and (
        b1 is None
        or b2 is None
        or tuple(b1.shape) != (num_experts, width)
        or tuple(b2.shape) != (num_experts, hidden)
    ):
        return f"its biases do not match [{num_experts}, {width}] and [{num_experts}, {hidden}]"
    if not layout.has_gate:
        return HFExpertWeights(None, w1, w2, None, b1, b2)
    if layout.is_concatenated:
        gate, up = w1[:, :inter], w1[:, inter:]
        gate_bias, up_bias = (b1[:, :inter], b1[:, inter:]) if b1 is not None else (None, None)
    else:
        gate, up = w1[:, 0::2], w1[:, 1::2]
        gate_bias, up_bias = (b1[:, 0::2], b1[:, 1::2]) if b1 is not None else (None, None)
    return HFExpertWeights(gate, up, w2, gate_bias, up_bias, b2)


# ---------------------------------------------------------------- recording


@attrs.define(eq=False)
class _Recording:
    """One layer's live EPLB views and its installed hook."""

    row: Tensor
    """``[P]`` this layer's row of ``expert_load_view``."""
    logical_to_physical: Tensor
    """``[E, max_replicas]`` this layer's row of ``logical_to_physical_map``."""
    replica_count: Tensor
    """``[E]`` this layer's row of ``logical_replica_count``."""
    handle: RemovableHandle | None = None
    fired: bool = False


def _index_hook(
    recording: _Recording, last_expert: int
) -> Callable[[nn.Module, tuple[object, ...], dict[str, object]], None]:
    row = recording.row

    def record_chosen_experts(
        module: nn.Module, args: tuple[object, ...], kwargs: dict[str, object]
    ) -> None:
        ids = args[1] if len(args) > 1 else _index_kwarg(kwargs)
        if not isinstance(ids, Tensor) or ids.is_floating_point():
            return
        recording.fired = True
        flat = ids.reshape(-1)
        if flat.device != row.device:
            flat = flat.to(row.device, non_blocking=True)
        # Sentinels (-1 padding, ids >= E marking "not on this rank") are clamped
        # onto a real expert with weight 0: no boolean indexing, so no host sync.
        safe = flat.clamp(0, last_expert)
        row.index_add_(0, safe, (safe == flat).to(row.dtype))

    return record_chosen_experts


def _index_kwarg(kwargs: Mapping[str, object]) -> object:
    for value in kwargs.values():
        if isinstance(value, Tensor) and not value.is_floating_point():
            return value
    return None


def _scores_hook(
    recording: _Recording, num_experts: int
) -> Callable[[nn.Module, tuple[object, ...], object], None]:
    row = recording.row

    def record_nonzero_scores(module: nn.Module, args: tuple[object, ...], output: object) -> None:
        scores = output
        if isinstance(output, tuple) and output:
            scores = cast("tuple[object, ...]", output)[0]
        if not isinstance(scores, Tensor) or scores.shape[-1] != num_experts:
            return
        recording.fired = True
        chosen = (scores.reshape(-1, num_experts) != 0).sum(dim=0, dtype=row.dtype)
        if chosen.device != row.device:
            chosen = chosen.to(row.device, non_blocking=True)
        row.add_(chosen)

    return record_nonzero_scores


# ---------------------------------------------------------------- the layer


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
    _recording: _Recording | None = attrs.field(default=None, init=False)

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
    ) -> _Recording:
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
        recording = _Recording(
            row=rows.expert_load,
            logical_to_physical=rows.logical_to_physical,
            replica_count=rows.replica_count,
        )
        problem = _placement_problem(recording, num_experts)
        if problem is not None:
            raise MappingError(f"{name}: {problem}")
        return recording

    def _install(self, recording: _Recording) -> None:
        self.remove_hooks()
        if self.recording_rule == SCORES_HOOK:
            router = self.router
            if router is None:  # discovery guarantees a router for this rule
                raise EplbStateError(f"{self.path}: no router to hook")
            recording.handle = router.register_forward_hook(
                _scores_hook(recording, self.num_experts)
            )
        else:
            recording.handle = self.experts.register_forward_pre_hook(
                _index_hook(recording, self.num_experts - 1), with_kwargs=True
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
        return _placement_problem(self._recording, self.num_experts)

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
                interleaved = _flag(self.experts, "is_concatenated") is False
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


def _placement_problem(recording: _Recording, num_experts: int) -> str | None:
    expected = torch.arange(num_experts, device=recording.logical_to_physical.device)
    first = recording.logical_to_physical[:, 0].to(torch.int64)
    if not bool((first == expected).all()) or not bool((recording.replica_count == 1).all()):
        return (
            "the EPLB maps place logical experts in other physical slots (or replicate them), "
            "but transformers routes every token to the weights at its logical id: only the "
            "identity placement (slot e holds expert e, one replica) is valid"
        )
    return None


# ---------------------------------------------------------------- discovery


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
    if not _is_module(module):
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
        if _holds_expert_projections(experts) and _is_module(experts):
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
    fused = _tensor_attr(experts, "gate_up_proj")
    if fused is None:
        fused = _tensor_attr(experts, "up_proj")
    down = _tensor_attr(experts, "down_proj")
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
    layout = _read_layout(experts, fused, down)
    if isinstance(layout, str):
        return layout
    weights = _weight_views(experts, layout)
    if isinstance(weights, str):
        return weights
    router = None
    if block is not None:
        for attr in _ROUTER_ATTRS:
            candidate = getattr(block, attr, None)
            if _is_module(candidate):
                router = candidate
                break
    router_weight = _tensor_attr(router, "weight") if router is not None else None
    if (
        router_weight is not None
        and router_weight.dim() == 2
        and router_weight.shape[0] != num_experts
    ):
        return f"its router scores {router_weight.shape[0]} experts but it holds {num_experts}"
    top_k = _int_attr(router, _TOP_K_ATTRS) if router is not None else None
    top_k = top_k or (_int_attr(block, _TOP_K_ATTRS) if block is not None else None)
    for owner in (experts, block, router):
        if top_k is None and owner is not None:
            top_k = _int_attr(_text_config(owner), _TOP_K_ATTRS)
    if top_k is None or top_k > num_experts:
        return f"no top-k <= {num_experts} found on its router, block or config"
    num_groups = (_int_attr(router, _GROUP_ATTRS) if router is not None else None) or 1
    if num_experts % num_groups != 0:
        return f"its router has {num_groups} expert groups, which do not divide {num_experts}"
    arity = _positional_arity(getattr(experts, "forward", None))
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
    if not any(_is_module(getattr(block, n, None)) for n in ("shared_expert", "shared_experts")):
        return 0
    for owner in (experts, block):
        count = _int_attr(_text_config(owner), _SHARED_ATTRS)
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
    if not _is_module(obj):
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


# ---------------------------------------------------------------- the model


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
        if not found.ok or not _is_module(module):
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


# ---------------------------------------------------------------- unwrapping steps


_INNER_MODEL_PATHS: Final = (
    ("get_language_model",),
    ("_orig_mod",),
    ("module",),
    ("get_base_model",),
    ("language_model",),
    ("model", "language_model"),
    ("thinker",),
)
"""Where wrappers keep the model they wrap: the paths ``DEFAULT_UNWRAP_STEPS`` follow."""

_INNER_MODEL_METHODS: Final = frozenset({"get_language_model", "get_base_model"})


def _inner_model(obj: object, layers: Sequence[HFMoELayer]) -> str | None:
    """The path of a wrapped model inside ``obj`` that holds every one of ``layers``, if any."""
    wanted = {id(layer.experts) for layer in layers}
    for names in _INNER_MODEL_PATHS:
        current: object = obj
        for name in names:
            current = getattr(current, name, None)
            if name in _INNER_MODEL_METHODS and callable(current):
                try:
                    current = current()
                except Exception:
                    current = None
            if current is None:
                break
        if current is None or current is obj or not _is_module(current):
            continue
        held = {id(module) for _, module in named_modules(current)}
        if wanted <= held:
            return ".".join(names)
    return None


def _hf_experts_probe(obj: object) -> object | None:
    found = discover_hf_moe(obj)
    if not found.ok or not _is_module(obj):
        return None
    if _inner_model(obj, found.layers) is not None:
        # A wrapper (VLM, torch.compile, DDP, PEFT, omni) whose inner model holds
        # all the experts: decline, so that the walk goes through the wrapper
        # (the default steps reach that model) and the trace shows where the MoE
        # model really is.
        return None
    return HFMoEAdapter(obj, found.layers)


def _get_decoder_probe(obj: object) -> object | None:
    get_decoder = getattr(obj, "get_decoder", None)
    if not callable(get_decoder):
        return None
    decoder = get_decoder()
    return decoder if decoder is not obj and _is_module(decoder) else None


HF_EXPERTS_STEP: Final = UnwrapStep(
    name="hf-experts adapter",
    probe=_hf_experts_probe,
    description=(
        "build an HFMoEAdapter when the object holds transformers-style experts modules "
        "(an 'experts' child or the expert-parallel plan's paths) of one language model; "
        "declines a wrapper whose inner model (reached by a default step: "
        "get_language_model(), ._orig_mod, .module, get_base_model(), .language_model, "
        ".model.language_model, .thinker) holds them all, so the walk goes through it"
    ),
)
"""Adapter step: wrap a transformers MoE model that does not implement ``MixtureOfExperts``."""

HF_GET_DECODER_STEP: Final = UnwrapStep(
    name="get_decoder()",
    probe=_get_decoder_probe,
    description="the decoder a transformers model returns from get_decoder(), when not itself",
)
"""Unwrapping step: transformers' ``get_decoder()`` (VLM -> text model, CausalLM -> base model)."""

if TYPE_CHECKING:
    from moe_protocols.protocols import MixtureOfExperts

    def _statically_conforms(  # pyright: ignore[reportUnusedFunction]  # a static check, never called
        adapter: HFMoEAdapter, layer: HFMoELayer
    ) -> tuple[MixtureOfExperts, MoELayer]:
        # mypy checks here that the classes satisfy the protocols member for member.
        return adapter, layer
