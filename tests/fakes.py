"""Lightweight fakes of MoE language models and of every wrapping pattern seen in the wild.

Plain Python classes (small tensors only, no ``nn.Module``), importable by any
test: a native MoE LM, a forwarding proxy, VLM wrappers (``get_language_model()``
working or raising ``NotImplementedError``), torch.compile-, DDP-, PEFT- and
omni-style wrappers, a transformers-style ``.model.language_model`` wrapper,
a Gemma4-like wrapper that copies the counts but not the rest, dense models,
self-references and cycles. ``chain`` stacks wrappers by kind, and
``WRAPPERS`` says which path each kind adds, so tests can predict where
resolution ends. ``HOSTILE`` lists objects that conformance checks and guards
must survive, with the fault each report must name.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple
from unittest.mock import MagicMock, NonCallableMagicMock

import numpy as np
import torch
from torch import Tensor

from moe_protocols.conformance import ProblemKind

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator, MutableSequence, Sequence

HIDDEN = 3


class FakeMoELayer:
    """A MoE layer: two weights ``[local_physical, ...]`` and a recorded ``set_eplb_state``."""

    def __init__(self, num_local_physical_experts: int) -> None:
        self.w13 = torch.zeros(num_local_physical_experts, 2 * HIDDEN)
        self.w2 = torch.zeros(num_local_physical_experts, HIDDEN)
        self.eplb_calls: list[dict[str, object]] = []

    def get_expert_weights(self) -> list[Tensor]:
        return [self.w13, self.w2]

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        self.eplb_calls.append(
            {
                "moe_layer_idx": moe_layer_idx,
                "expert_load_view": expert_load_view,
                "logical_to_physical_map": logical_to_physical_map,
                "logical_replica_count": logical_replica_count,
            }
        )


class FakeMoELM:
    """A native MoE language model: every ``MixtureOfExperts`` member is a plain attribute."""

    def __init__(
        self,
        *,
        num_moe_layers: int = 3,
        num_logical_experts: int = 8,
        num_redundant_experts: int = 0,
        ep_size: int = 1,
        num_shared_experts: int = 1,
    ) -> None:
        physical = num_logical_experts + num_redundant_experts
        local = physical // ep_size
        self.moe_layers: Sequence[Any] = [FakeMoELayer(local) for _ in range(num_moe_layers)]
        self.expert_weights: MutableSequence[Sequence[Tensor]] = []
        self.num_moe_layers = num_moe_layers
        self.num_expert_groups = 1
        self.num_logical_experts = num_logical_experts
        self.num_physical_experts = physical
        self.num_local_physical_experts = local
        self.num_routed_experts = num_logical_experts
        self.num_shared_experts = num_shared_experts
        self.num_redundant_experts = num_redundant_experts
        self.set_eplb_state_calls: list[dict[str, Tensor]] = []
        self.metadata_calls: list[dict[str, int]] = []

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        self.set_eplb_state_calls.append(
            {
                "expert_load_view": expert_load_view,
                "logical_to_physical_map": logical_to_physical_map,
                "logical_replica_count": logical_replica_count,
            }
        )
        self.expert_weights = []
        for idx, layer in enumerate(self.moe_layers):
            self.expert_weights.append(list(layer.get_expert_weights()))
            layer.set_eplb_state(
                moe_layer_idx=idx,
                expert_load_view=expert_load_view,
                logical_to_physical_map=logical_to_physical_map,
                logical_replica_count=logical_replica_count,
            )

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        self.metadata_calls.append(
            {
                "num_physical_experts": num_physical_experts,
                "num_local_physical_experts": num_local_physical_experts,
            }
        )
        self.num_physical_experts = num_physical_experts
        self.num_redundant_experts = num_physical_experts - self.num_logical_experts


def dense_lm() -> FakeMoELM:
    """A model that has the members (it inherits the mixin, say) but no MoE layers."""
    return FakeMoELM(num_moe_layers=0, num_logical_experts=0, num_shared_experts=0)


def _forwarded(name: str) -> property:
    def get(self: ProxyWrapper) -> object:
        return getattr(self.language_model, name)

    def put(self: ProxyWrapper, value: object) -> None:
        setattr(self.language_model, name, value)

    return property(get, put, doc=f"Forwarded to the language model's {name}.")


class ProxyWrapper:
    """A wrapper implementing the protocol by forwarding (vLLM's Llama-4 / Qwen3-VL-MoE pattern)."""

    def __init__(self, language_model: FakeMoELM) -> None:
        self.language_model = language_model

    expert_weights = _forwarded("expert_weights")
    moe_layers = _forwarded("moe_layers")
    num_moe_layers = _forwarded("num_moe_layers")
    num_expert_groups = _forwarded("num_expert_groups")
    num_logical_experts = _forwarded("num_logical_experts")
    num_physical_experts = _forwarded("num_physical_experts")
    num_local_physical_experts = _forwarded("num_local_physical_experts")
    num_routed_experts = _forwarded("num_routed_experts")
    num_shared_experts = _forwarded("num_shared_experts")
    num_redundant_experts = _forwarded("num_redundant_experts")

    def get_language_model(self) -> FakeMoELM:
        return self.language_model

    def set_eplb_state(
        self,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        self.language_model.set_eplb_state(
            expert_load_view=expert_load_view,
            logical_to_physical_map=logical_to_physical_map,
            logical_replica_count=logical_replica_count,
        )

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        self.language_model.update_physical_experts_metadata(
            num_physical_experts=num_physical_experts,
            num_local_physical_experts=num_local_physical_experts,
        )


class VisionTower:
    """Stands in for a vision encoder (something that is not the language model)."""

    def __init__(self) -> None:
        self.patch_embed = torch.zeros(4, 4)


class OneLevelVLM:
    """A VLM that holds the LM and hands it out (Kimi-K2.5 around DeepSeek-V2)."""

    def __init__(self, language_model: object) -> None:
        self.vision_tower = VisionTower()
        self.language_model = language_model

    def get_language_model(self) -> object:
        return self.language_model


class NotImplementedVLM:
    """A VLM whose ``get_language_model`` raises, but which keeps the LM as ``.language_model``."""

    def __init__(self, language_model: object) -> None:
        self.vision_tower = VisionTower()
        self.language_model = language_model

    def get_language_model(self) -> object:
        raise NotImplementedError("No language model found in NotImplementedVLM!")


class CompiledLike:
    """torch.compile's OptimizedModule: the original module under ``._orig_mod``."""

    def __init__(self, orig_mod: object) -> None:
        self._orig_mod = orig_mod


class DDPLike:
    """DistributedDataParallel / DataParallel / FSDP1: the wrapped module under ``.module``."""

    def __init__(self, module: object) -> None:
        self.module = module


class PeftLike:
    """A PEFT model: the base model through ``get_base_model()``."""

    def __init__(self, base_model: object) -> None:
        self._base_model = base_model
        self.peft_config = {"default": "lora"}

    def get_base_model(self) -> object:
        return self._base_model


class ForwardingPeftLike:
    """PEFT's real behaviour: attribute reads fall through ``__getattr__`` to the base model."""

    def __init__(self, base_model: object) -> None:
        self._base_model = base_model

    def get_base_model(self) -> object:
        return self._base_model

    def __getattr__(self, name: str) -> object:
        if name == "_base_model":  # not set yet (e.g. during unpickling): no recursion
            raise AttributeError(name)
        return getattr(self._base_model, name)


class OnlyForwards:
    """Forwards every attribute read to a model it offers no unwrapping step for."""

    def __init__(self, target: object) -> None:
        self._target = target

    def __getattr__(self, name: str) -> object:
        if name == "_target":
            raise AttributeError(name)
        return getattr(self._target, name)


class OmniLike:
    """An omni-style model: the part that thinks (and holds the LM) under ``.thinker``."""

    def __init__(self, thinker: object) -> None:
        self.thinker = thinker
        self.talker = VisionTower()


class _VLMCore:
    def __init__(self, language_model: object) -> None:
        self.visual = VisionTower()
        self.language_model = language_model


class HFStyleVLM:
    """A transformers-style VLM: the LM at ``.model.language_model``."""

    def __init__(self, language_model: object) -> None:
        self.model = _VLMCore(language_model)
        self.lm_head = torch.zeros(2, 2)


class Gemma4LikeVLM:
    """Copies its LM's counts and ``moe_layers``, lacks ``expert_weights``/``set_eplb_state``."""

    def __init__(self, language_model: FakeMoELM) -> None:
        self.language_model = language_model
        self.moe_layers = language_model.moe_layers
        self.num_moe_layers = language_model.num_moe_layers
        self.num_expert_groups = language_model.num_expert_groups
        self.num_logical_experts = language_model.num_logical_experts
        self.num_physical_experts = language_model.num_physical_experts
        self.num_local_physical_experts = language_model.num_local_physical_experts
        self.num_routed_experts = language_model.num_routed_experts
        self.num_shared_experts = language_model.num_shared_experts
        self.num_redundant_experts = language_model.num_redundant_experts

    def get_language_model(self) -> FakeMoELM:
        return self.language_model

    def update_physical_experts_metadata(
        self, num_physical_experts: int, num_local_physical_experts: int
    ) -> None:
        self.language_model.update_physical_experts_metadata(
            num_physical_experts=num_physical_experts,
            num_local_physical_experts=num_local_physical_experts,
        )


class DecoderWrapper:
    """Keeps its LM under a name no default step knows (``.decoder``, like Nemotron Parse)."""

    def __init__(self, decoder: object) -> None:
        self.decoder = decoder
        self.encoder = VisionTower()


class SelfReferencing:
    """A wrapper whose ``.module`` and ``get_language_model()`` are itself."""

    def __init__(self) -> None:
        self.module = self

    def get_language_model(self) -> SelfReferencing:
        return self


def two_cycle() -> DDPLike:
    """Two wrappers whose ``.module`` point at each other."""
    first = DDPLike(None)
    second = DDPLike(first)
    first.module = second
    return first


# name -> (wrap function, path suffix the default steps reach its inner object by)
WRAPPERS: dict[str, tuple[Callable[[Any], object], str]] = {
    "vlm": (OneLevelVLM, ".get_language_model()"),
    "not_implemented_vlm": (NotImplementedVLM, ".language_model"),
    "compiled": (CompiledLike, "._orig_mod"),
    "ddp": (DDPLike, ".module"),
    "peft": (PeftLike, ".get_base_model()"),
    "omni": (OmniLike, ".thinker"),
    "hf_style": (HFStyleVLM, ".model.language_model"),
}


def chain(kinds: Sequence[str], inner: object) -> tuple[object, str]:
    """Wrap ``inner`` in ``kinds`` (outermost first); return the root and the path to ``inner``."""
    root = inner
    for kind in reversed(kinds):
        root = WRAPPERS[kind][0](root)
    return root, "model" + "".join(WRAPPERS[kind][1] for kind in kinds)


# ----------------------------------------------------------------- hostile inputs


class Hostile(NamedTuple):
    """An object conformance and the guards must survive, and the fault its report must name."""

    name: str
    build: Callable[[], object]
    member: str
    """The member the report must name (``""``: the object itself)."""
    kind: ProblemKind
    single_fault: bool
    """True when this is the report's only problem (everything else about it is valid)."""


def faulty_lm(**overrides: object) -> FakeMoELM:
    """A valid ``FakeMoELM`` with some members replaced (instance attributes shadow methods)."""
    model = FakeMoELM()
    for name, value in overrides.items():
        setattr(model, name, value)
    return model


def raising_property(exc_type: type[Exception]) -> FakeMoELM:
    """A model whose ``num_physical_experts`` property raises ``exc_type``."""

    class RaisingCount(FakeMoELM):
        @property
        def num_physical_experts(self) -> int:
            raise exc_type("num_physical_experts is not ready")

        @num_physical_experts.setter
        def num_physical_experts(self, value: int) -> None:
            pass

    return RaisingCount()


class AnswersEverything:
    """``__getattr__`` returns 7 for any name."""

    def __getattr__(self, name: str) -> int:
        return 7


class RecursiveGetattr:
    """``__getattr__`` recurses without end (RecursionError)."""

    def __getattr__(self, name: str) -> object:
        return getattr(self, name + "_")


def _unreadable_class(self: object) -> type:
    raise RuntimeError("__class__ is not readable")


class ClassPropertyRaises:
    """Even ``__class__`` raises when read."""

    __class__ = property(_unreadable_class)  # pyright: ignore[reportIncompatibleMethodOverride]  # deliberately hostile


class UnsizedLayers:
    """A sequence-like whose ``__len__`` raises."""

    def __len__(self) -> int:
        raise RuntimeError("length unknown until the first forward")

    def __getitem__(self, index: int) -> object:
        raise IndexError(index)


class NoExpertWeightsLayer:
    """A layer with ``set_eplb_state`` but without ``get_expert_weights``."""

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        pass


class PositionalLayer(FakeMoELayer):
    """A layer whose ``set_eplb_state`` names its first parameter ``layer_idx``."""

    def set_eplb_state(  # pyright: ignore[reportIncompatibleMethodOverride]  # the renamed parameter is the point
        self,
        layer_idx: int,
        expert_load_view: Tensor,
        logical_to_physical_map: Tensor,
        logical_replica_count: Tensor,
    ) -> None:
        pass


def _layers_with(index: int, layer: object) -> list[object]:
    layers: list[object] = [FakeMoELayer(8) for _ in range(3)]
    layers[index] = layer
    return layers


def _renamed_set_eplb_state(
    load_view: Tensor, logical_to_physical_map: Tensor, logical_replica_count: Tensor
) -> None:
    pass


def _extra_required_parameter(
    num_physical_experts: int, num_local_physical_experts: int, rank: int
) -> None:
    pass


def _layers_generator() -> Iterator[FakeMoELayer]:
    return (FakeMoELayer(8) for _ in range(3))


_WT = ProblemKind.WRONG_TYPE
HOSTILE: tuple[Hostile, ...] = (
    Hostile("MagicMock", MagicMock, "num_moe_layers", _WT, False),
    Hostile("NonCallableMagicMock", NonCallableMagicMock, "num_moe_layers", _WT, False),
    Hostile("None", lambda: None, "expert_weights", ProblemKind.MISSING, False),
    Hostile("int", lambda: 42, "num_moe_layers", ProblemKind.MISSING, False),
    Hostile("str", lambda: "DeepseekV2ForCausalLM", "moe_layers", ProblemKind.MISSING, False),
    Hostile("class not instance", lambda: FakeMoELM, "", ProblemKind.NOT_INSTANCE, True),
    Hostile(
        "property raises RuntimeError",
        lambda: raising_property(RuntimeError),
        "num_physical_experts",
        ProblemKind.RAISED,
        True,
    ),
    Hostile(
        "property raises AttributeError",
        lambda: raising_property(AttributeError),
        "num_physical_experts",
        ProblemKind.RAISED,
        True,
    ),
    Hostile(
        "property raises KeyError",
        lambda: raising_property(KeyError),
        "num_physical_experts",
        ProblemKind.RAISED,
        True,
    ),
    Hostile("__getattr__ answers 7", AnswersEverything, "expert_weights", _WT, False),
    Hostile("__getattr__ recurses", RecursiveGetattr, "expert_weights", ProblemKind.RAISED, False),
    Hostile("__class__ raises", ClassPropertyRaises, "num_moe_layers", ProblemKind.MISSING, False),
    Hostile("bool count", lambda: faulty_lm(num_moe_layers=True), "num_moe_layers", _WT, True),
    Hostile(
        "float count",
        lambda: faulty_lm(num_logical_experts=8.0),
        "num_logical_experts",
        _WT,
        True,
    ),
    Hostile(
        "negative count",
        lambda: faulty_lm(num_shared_experts=-1),
        "num_shared_experts",
        ProblemKind.INVALID_VALUE,
        True,
    ),
    Hostile("str count", lambda: faulty_lm(num_expert_groups="1"), "num_expert_groups", _WT, True),
    Hostile(
        "numpy int count",
        lambda: faulty_lm(num_local_physical_experts=np.int64(8)),
        "num_local_physical_experts",
        _WT,
        True,
    ),
    Hostile(
        "tensor count",
        lambda: faulty_lm(num_moe_layers=torch.tensor(3)),
        "num_moe_layers",
        _WT,
        True,
    ),
    Hostile(
        "moe_layers generator",
        lambda: faulty_lm(moe_layers=_layers_generator()),
        "moe_layers",
        _WT,
        True,
    ),
    Hostile(
        "moe_layers __len__ raises",
        lambda: faulty_lm(moe_layers=UnsizedLayers()),
        "moe_layers",
        ProblemKind.RAISED,
        True,
    ),
    Hostile(
        "moe_layers dict",
        lambda: faulty_lm(moe_layers={i: FakeMoELayer(8) for i in range(3)}),
        "moe_layers",
        _WT,
        True,
    ),
    Hostile(
        "method not callable",
        lambda: faulty_lm(set_eplb_state=3),
        "set_eplb_state",
        ProblemKind.NOT_CALLABLE,
        True,
    ),
    Hostile(
        "method with a renamed parameter",
        lambda: faulty_lm(set_eplb_state=_renamed_set_eplb_state),
        "set_eplb_state",
        ProblemKind.BAD_SIGNATURE,
        True,
    ),
    Hostile(
        "method with an extra required parameter",
        lambda: faulty_lm(update_physical_experts_metadata=_extra_required_parameter),
        "update_physical_experts_metadata",
        ProblemKind.BAD_SIGNATURE,
        True,
    ),
    Hostile(
        "expert_weights tuple",
        lambda: faulty_lm(expert_weights=()),
        "expert_weights",
        _WT,
        True,
    ),
    Hostile(
        "expert_weights of non-tensors",
        lambda: faulty_lm(expert_weights=[[1.0, 2.0]] * 3),
        "expert_weights[0][0]",
        _WT,
        False,
    ),
    Hostile(
        "layer lacks get_expert_weights",
        lambda: faulty_lm(moe_layers=_layers_with(0, NoExpertWeightsLayer())),
        "moe_layers[0].get_expert_weights",
        ProblemKind.MISSING,
        True,
    ),
    Hostile(
        "layer set_eplb_state renames a parameter",
        lambda: faulty_lm(moe_layers=_layers_with(1, PositionalLayer(8))),
        "moe_layers[1].set_eplb_state",
        ProblemKind.BAD_SIGNATURE,
        True,
    ),
    Hostile(
        "layer is a class",
        lambda: faulty_lm(moe_layers=_layers_with(2, FakeMoELayer)),
        "moe_layers[2]",
        ProblemKind.NOT_INSTANCE,
        True,
    ),
    Hostile(
        "physical != logical + redundant",
        lambda: faulty_lm(num_redundant_experts=2),
        "invariant",
        ProblemKind.INVARIANT,
        True,
    ),
    Hostile(
        "len(moe_layers) != num_moe_layers",
        lambda: faulty_lm(num_moe_layers=4),
        "invariant",
        ProblemKind.INVARIANT,
        True,
    ),
)
