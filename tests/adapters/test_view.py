"""MoEView: resolution through any wrapper chain, the trace, and explicit delegation."""

from __future__ import annotations

import ast
import inspect
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest.mock import MagicMock

import pytest
import torch
from fakes import (
    WRAPPERS,
    CompiledLike,
    DDPLike,
    DecoderWrapper,
    FakeMoELayer,
    FakeMoELM,
    ForwardingPeftLike,
    Gemma4LikeVLM,
    HFStyleVLM,
    NotImplementedVLM,
    OmniLike,
    OneLevelVLM,
    OnlyForwards,
    PeftLike,
    ProxyWrapper,
    SelfReferencing,
    chain,
    dense_lm,
    faulty_lm,
    two_cycle,
)
from hypothesis import given, settings
from hypothesis import strategies as st

import moe_protocols.adapters
from moe_protocols.adapters import (
    DEFAULT_UNWRAP_STEPS,
    HFMoEAdapter,
    MoEView,
    ResolutionTrace,
    TraceOutcome,
    UnwrapStep,
)
from moe_protocols.conformance import check_conformance
from moe_protocols.errors import NotMixtureOfExpertsError, ResolutionConfigError
from moe_protocols.guards import is_mixture_of_experts
from moe_protocols.models import TinyProxyVLMForConditionalGeneration, tiny_proxy_vlm, tiny_vlm
from moe_protocols.models._tiny_moe import TinyMoEBlock
from moe_protocols.protocols import COUNT_MEMBERS as COUNTS
from moe_protocols.protocols import MixtureOfExperts, MoELayer


def outcomes(trace: ResolutionTrace) -> list[TraceOutcome]:
    return [entry.outcome for entry in trace.entries]


def snapshot(objects: list[object]) -> list[dict[str, object]]:
    """Each object's attributes by identity (lists by their items' identities)."""
    return [
        {
            name: tuple(map(id, value)) if isinstance(value, list) else id(value)
            for name, value in vars(obj).items()
        }
        for obj in objects
    ]


# ------------------------------------------------------------------ resolution

ResolutionCase = Callable[[FakeMoELM], tuple[object, str]]

RESOLUTION_CASES: dict[str, ResolutionCase] = {
    "native LM": lambda lm: (lm, "model"),
    "one-level VLM": lambda lm: (OneLevelVLM(lm), "model.get_language_model()"),
    "VLM whose get_language_model raises": lambda lm: (
        NotImplementedVLM(lm),
        "model.language_model",
    ),
    "compiled": lambda lm: (CompiledLike(lm), "model._orig_mod"),
    "DDP": lambda lm: (DDPLike(lm), "model.module"),
    "PEFT": lambda lm: (PeftLike(lm), "model.get_base_model()"),
    "transformers-style VLM": lambda lm: (HFStyleVLM(lm), "model.model.language_model"),
    "omni": lambda lm: (OmniLike(OneLevelVLM(lm)), "model.thinker.get_language_model()"),
    "DDP > compiled > VLM": lambda lm: (
        DDPLike(CompiledLike(OneLevelVLM(lm))),
        "model.module._orig_mod.get_language_model()",
    ),
    "PEFT > DDP > compiled > raising VLM": lambda lm: (
        PeftLike(DDPLike(CompiledLike(NotImplementedVLM(lm)))),
        "model.get_base_model().module._orig_mod.language_model",
    ),
    "Gemma4-like (counts copied, no expert_weights)": lambda lm: (
        Gemma4LikeVLM(lm),
        "model.get_language_model()",
    ),
}


@pytest.mark.parametrize("case", RESOLUTION_CASES.values(), ids=RESOLUTION_CASES.keys())
def test_resolves_to_the_language_model_with_its_path(
    case: ResolutionCase, fake_lm: FakeMoELM
) -> None:
    root, path = case(fake_lm)
    view = MoEView.resolve(root)
    assert view is not None
    assert view.model is fake_lm
    assert view.root is root
    assert view.trace.resolved_path == path


def test_proxy_wrapper_resolves_to_itself(fake_lm: FakeMoELM) -> None:
    proxy = ProxyWrapper(fake_lm)
    view = MoEView.resolve(proxy)
    assert view is not None
    assert view.model is proxy
    assert view.trace.resolved_path == "model"
    assert outcomes(view.trace) == [TraceOutcome.RESOLVED]


def vllm_one_level_rule(model: object) -> object | None:
    """vLLM 0.33's get_mixture_of_experts_model, with our guard (research/vllm.md 1.3)."""
    if is_mixture_of_experts(model):
        return model
    get_lm = getattr(model, "get_language_model", None)
    if callable(get_lm):
        try:
            inner = get_lm()
        except NotImplementedError:
            return None
        return inner if is_mixture_of_experts(inner) else None
    return None


@pytest.mark.parametrize("case", RESOLUTION_CASES.values(), ids=RESOLUTION_CASES.keys())
def test_agrees_with_vllms_one_level_rule_whenever_that_rule_finds_a_model(
    case: ResolutionCase, fake_lm: FakeMoELM
) -> None:
    root, _ = case(fake_lm)
    expected = vllm_one_level_rule(root)
    view = MoEView.resolve(root)
    if expected is not None:
        assert view is not None
        assert view.model is expected


def test_shallowest_model_wins_and_step_order_breaks_ties() -> None:
    outer_lm, inner_lm = FakeMoELM(), FakeMoELM()
    root = OneLevelVLM(DDPLike(inner_lm))  # inner LM at depth 2
    root.module = outer_lm  # type: ignore[attr-defined]  # another LM at depth 1
    view = MoEView.resolve(root)
    assert view is not None
    assert view.model is outer_lm
    assert view.trace.resolved_path == "model.module"

    tie = DDPLike(FakeMoELM())
    tie._orig_mod = FakeMoELM()  # type: ignore[attr-defined]  # same depth; ._orig_mod is tried first
    view = MoEView.resolve(tie)
    assert view is not None
    assert view.trace.resolved_path == "model._orig_mod"


def test_reference_models_resolve() -> None:
    vlm = tiny_vlm()
    view = MoEView.resolve(vlm)
    assert view is not None
    assert view.model is vlm.language_model
    assert view.trace.resolved_path == "model.get_language_model()"

    proxy = tiny_proxy_vlm()
    view = MoEView.resolve(proxy)
    assert view is not None
    assert view.model is proxy


def test_torch_compiled_vlm_resolves_to_its_language_model() -> None:
    vlm = tiny_vlm()
    compiled = torch.compile(vlm)  # lazy: nothing is compiled until a forward
    view = MoEView.resolve(compiled)
    assert view is not None
    assert view.model is vlm.language_model
    # OptimizedModule forwards attribute reads, so get_language_model() is reached at depth 1.
    assert view.trace.resolved_path == "model.get_language_model()"


def test_vlm_that_raises_records_the_exception_and_goes_on(fake_lm: FakeMoELM) -> None:
    view = MoEView.resolve(NotImplementedVLM(fake_lm))
    assert view is not None
    raised = [e for e in view.trace.entries if e.outcome is TraceOutcome.RAISED]
    assert [(e.step, e.path) for e in raised] == [
        ("get_language_model()", "model.get_language_model()")
    ]
    assert raised[0].detail.startswith("NotImplementedError: No language model found")
    assert "get_language_model(): raised NotImplementedError" in str(view.trace)


# ---------------------------------------------------------- nothing to resolve


def test_dense_model_and_vlm_around_it_resolve_to_none(fake_dense_lm: FakeMoELM) -> None:
    assert MoEView.resolve(fake_dense_lm) is None
    assert MoEView.resolve(OneLevelVLM(fake_dense_lm)) is None


def test_require_on_a_vlm_around_a_dense_model_explains_why() -> None:
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(OneLevelVLM(dense_lm()))
    message = str(info.value)
    assert message.startswith("OneLevelVLM (the served model) is not a MixtureOfExperts")
    assert (
        "-> model.get_language_model() (FakeMoELM): MixtureOfExperts but has "
        "num_moe_layers == 0 (a dense model)" in message
    )
    # .language_model leads to the same dense LM: it is checked once.
    assert [r.path for r in info.value.reports] == ["model", "model.get_language_model()"]
    assert info.value.trace is not None
    assert info.value.trace.resolved_path is None


def test_require_error_names_the_root_every_step_and_what_each_candidate_lacks() -> None:
    lm = faulty_lm()
    del lm.num_redundant_experts
    root = DDPLike(NotImplementedVLM(lm))
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(root)
    message = str(info.value)
    assert message.startswith("DDPLike (the served model)")
    for step in DEFAULT_UNWRAP_STEPS:
        assert step.name in message
    # The walk: DDPLike -> .module -> NotImplementedVLM -> .language_model -> the LM.
    assert "-> model.module (NotImplementedVLM): not MixtureOfExperts: missing expert_weights" in (
        message
    )
    assert "get_language_model(): raised NotImplementedError" in message
    assert "-> model.module.language_model (FakeMoELM): not MixtureOfExperts" in message
    assert "model.module.language_model (FakeMoELM) does not satisfy MixtureOfExperts:" in message
    assert "  - num_redundant_experts: missing" in message
    # Plain wrappers get one line, not twelve "missing" ones.
    assert "  model (DDPLike) has none of the MixtureOfExperts members\n" in message
    reports = info.value.reports
    assert [r.path for r in reports] == ["model", "model.module", "model.module.language_model"]
    assert [r.subject for r in reports] == ["DDPLike", "NotImplementedVLM", "FakeMoELM"]


def test_self_reference_and_two_cycle_terminate() -> None:
    for root in (SelfReferencing(), two_cycle()):
        view = MoEView.resolve(root)
        assert view is None
        with pytest.raises(NotMixtureOfExpertsError) as info:
            MoEView.require(root)
        trace = info.value.trace
        assert trace is not None
        assert TraceOutcome.ALREADY_VISITED in outcomes(trace)
        assert "already visited" in str(trace)


def test_self_reference_is_reported_as_the_object_itself() -> None:
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(SelfReferencing())
    assert ".module: already visited (the object itself)" in str(info.value)


def test_chain_deeper_than_max_depth_is_cut_and_says_so(fake_lm: FakeMoELM) -> None:
    root, path = chain(["ddp"] * 8, fake_lm)  # the LM is at depth 8
    assert MoEView.resolve(root) is None
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(root)
    trace = info.value.trace
    assert trace is not None
    limits = [e for e in trace.entries if e.outcome is TraceOutcome.DEPTH_LIMIT]
    assert len(limits) == 1
    assert "max_depth=6" in limits[0].detail
    assert "depth limit:" in str(trace)
    # the way out is the depth limit, not a new unwrapping step
    message = str(info.value)
    assert "raise the limit (--max-depth N on the command line, max_depth=N in Python" in message
    assert "UnwrapStep(...)" not in message

    view = MoEView.resolve(root, max_depth=8)
    assert view is not None
    assert view.model is fake_lm
    assert view.trace.resolved_path == path


def test_max_depth_zero_checks_only_the_root(fake_lm: FakeMoELM) -> None:
    assert MoEView.resolve(OneLevelVLM(fake_lm), max_depth=0) is None
    view = MoEView.resolve(fake_lm, max_depth=0)
    assert view is not None


def test_mock_walk_is_bounded_by_the_candidate_budget() -> None:
    mock = MagicMock()
    assert MoEView.resolve(mock, max_candidates=20) is None
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(mock, max_candidates=20)
    trace = info.value.trace
    assert trace is not None
    assert len(trace.candidates) == 20
    assert outcomes(trace).count(TraceOutcome.BUDGET_EXHAUSTED) == 1
    assert "max_candidates=20" in str(info.value)


def test_default_budget_bounds_a_mock() -> None:
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(MagicMock())
    assert info.value.trace is not None
    assert len(info.value.trace.candidates) == 256


def test_a_class_given_instead_of_an_instance_is_rejected_not_walked() -> None:
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(OneLevelVLM)
    assert info.value.trace is not None
    assert len(info.value.trace.entries) == 1
    assert "is the class OneLevelVLM itself" in str(info.value)


def test_walk_limits_and_steps_are_validated_up_front(fake_lm: FakeMoELM) -> None:
    with pytest.raises(ValueError, match="max_depth must be >= 0"):
        MoEView.resolve(fake_lm, max_depth=-1)
    with pytest.raises(ValueError, match="max_candidates must be >= 1"):
        MoEView.resolve(fake_lm, max_candidates=0)
    with pytest.raises(TypeError, match="max_depth must be an int"):
        MoEView.resolve(fake_lm, max_depth=2.5)  # type: ignore[call-overload]  # deliberately wrong
    with pytest.raises(TypeError, match=r"steps\[1\] must be an UnwrapStep"):
        MoEView.resolve(fake_lm, steps=(DEFAULT_UNWRAP_STEPS[0], ".decoder"))  # type: ignore[arg-type]  # deliberately wrong


# ----------------------------------------------------------------- user steps


def decoder_step() -> UnwrapStep:
    return UnwrapStep(
        ".decoder", lambda obj: getattr(obj, "decoder", None), "Nemotron-Parse-like decoders"
    )


def test_user_step_finds_a_model_the_defaults_cannot(fake_lm: FakeMoELM) -> None:
    root = DDPLike(DecoderWrapper(fake_lm))
    assert MoEView.resolve(root) is None
    view = MoEView.resolve(root, steps=(*DEFAULT_UNWRAP_STEPS, decoder_step()))
    assert view is not None
    assert view.model is fake_lm
    assert view.trace.resolved_path == "model.module.decoder"


def test_user_step_is_local_to_the_call(fake_lm: FakeMoELM) -> None:
    defaults_before = DEFAULT_UNWRAP_STEPS
    MoEView.resolve(DecoderWrapper(fake_lm), steps=(*DEFAULT_UNWRAP_STEPS, decoder_step()))
    assert DEFAULT_UNWRAP_STEPS is defaults_before
    assert ".decoder" not in [step.name for step in DEFAULT_UNWRAP_STEPS]
    assert MoEView.resolve(DecoderWrapper(fake_lm)) is None


def test_user_step_that_raises_is_recorded_not_propagated(fake_lm: FakeMoELM) -> None:
    def explode(obj: object) -> object | None:
        raise RuntimeError("probe failed")

    steps = (UnwrapStep("explode()", explode), *DEFAULT_UNWRAP_STEPS)
    view = MoEView.resolve(OneLevelVLM(fake_lm), steps=steps)
    assert view is not None
    assert view.model is fake_lm
    assert "explode(): raised RuntimeError: probe failed" in str(view.trace)


def test_non_attribute_step_names_show_as_arrows(fake_lm: FakeMoELM) -> None:
    adapter_step = UnwrapStep("my adapter", lambda obj: fake_lm if obj is not fake_lm else None)
    view = MoEView.resolve(object(), steps=(adapter_step,))
    assert view is not None
    assert view.trace.resolved_path == "model -> my adapter"


class _Shell:
    """A wrapper holding ``.module``, which an adapt step could adapt as well as what it wraps."""

    def __init__(self, module: object) -> None:
        self.module = module


def _adapt_shells(fake_lm: FakeMoELM) -> UnwrapStep:
    """An adapt step that 'adapts' any shell to ``fake_lm``, wherever the shell sits."""
    return UnwrapStep(
        "shell adapter",
        lambda obj: fake_lm if isinstance(obj, _Shell) else None,
        kind="adapt",
    )


def test_adapt_step_is_applied_below_the_wrappers_an_unwrap_step_passes(
    fake_lm: FakeMoELM,
) -> None:
    root = _Shell(_Shell(object()))
    steps = (*DEFAULT_UNWRAP_STEPS, _adapt_shells(fake_lm))
    view = MoEView.resolve(root, steps=steps)
    assert view is not None
    assert view.model is fake_lm
    assert view.trace.resolved_path == "model.module -> shell adapter"


def test_descend_step_does_not_make_an_adapt_step_pass_the_object(fake_lm: FakeMoELM) -> None:
    inner = UnwrapStep(".module", lambda obj: getattr(obj, "module", None), kind="descend")
    view = MoEView.resolve(_Shell(_Shell(object())), steps=(inner, _adapt_shells(fake_lm)))
    assert view is not None
    assert view.trace.resolved_path == "model -> shell adapter"


def test_step_kind_is_checked_and_defaults_to_unwrap() -> None:
    assert UnwrapStep(".x", lambda obj: None).kind == "unwrap"
    with pytest.raises(ResolutionConfigError, match=r"UnwrapStep.kind must be one of .*'wrap'"):
        UnwrapStep(".x", lambda obj: None, kind="wrap")  # type: ignore[arg-type]  # the wrong kind on purpose


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "  "}, "UnwrapStep.name must not be empty"),
        ({"name": 3}, "UnwrapStep.name must be a str, got int"),
        ({"probe": "decoder"}, "UnwrapStep.probe must be callable, got str"),
        ({"description": None}, "UnwrapStep.description must be a str, got NoneType"),
    ],
)
def test_a_malformed_step_is_refused_with_a_typed_error(
    kwargs: dict[str, object], message: str
) -> None:
    fields: dict[str, object] = {"name": ".x", "probe": lambda obj: None, **kwargs}
    with pytest.raises(ResolutionConfigError, match=message):
        UnwrapStep(**fields)  # type: ignore[arg-type]  # malformed on purpose


# -------------------------------------------------------------------- the trace


def test_trace_prints_the_walk_one_candidate_per_line(fake_lm: FakeMoELM) -> None:
    view = MoEView.resolve(OneLevelVLM(fake_lm))
    assert view is not None
    assert str(view.trace).splitlines() == [
        "model (OneLevelVLM): not MixtureOfExperts: missing expert_weights; "
        "missing num_moe_layers; missing num_expert_groups (+9 more)",
        "  .language_model: already visited (same object as model.get_language_model())",
        "  not applicable: ._orig_mod, .module, get_base_model(), .model.language_model, .thinker, "
        "get_decoder(), hf-experts adapter",
        "  -> model.get_language_model() (FakeMoELM): MixtureOfExperts (3 MoE layers)",
    ]
    assert [r.path for r in view.trace.reports] == ["model", "model.get_language_model()"]
    assert view.trace.steps == tuple(step.name for step in DEFAULT_UNWRAP_STEPS)


def test_resolution_is_deterministic(fake_lm: FakeMoELM) -> None:
    root = OmniLike(PeftLike(HFStyleVLM(fake_lm)))
    first, second = MoEView.resolve(root), MoEView.resolve(root)
    assert first is not None
    assert second is not None
    assert str(first.trace) == str(second.trace)
    assert first.trace == second.trace


def test_resolution_does_not_mutate_any_object_on_the_way(fake_lm: FakeMoELM) -> None:
    vlm = NotImplementedVLM(fake_lm)
    compiled = CompiledLike(vlm)
    root = PeftLike(DDPLike(compiled))
    objects: list[object] = [root, root._base_model, compiled, vlm, fake_lm, *fake_lm.moe_layers]
    before = snapshot(objects)
    MoEView.resolve(root)
    MoEView.resolve(root, max_depth=1)
    with pytest.raises(NotMixtureOfExpertsError):
        MoEView.require(root, max_depth=2)
    assert snapshot(objects) == before
    assert fake_lm.set_eplb_state_calls == []
    assert fake_lm.metadata_calls == []


@settings(max_examples=40, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(WRAPPERS)), max_size=6))
def test_any_chain_of_wrappers_resolves_to_the_lm_with_the_right_path(kinds: list[str]) -> None:
    lm = FakeMoELM()
    root, path = chain(kinds, lm)
    view = MoEView.resolve(root)
    assert view is not None
    assert view.model is lm
    assert view.trace.resolved_path == path
    assert len(view.trace.candidates) >= len(kinds) + 1


@settings(max_examples=20, deadline=None)
@given(kinds=st.lists(st.sampled_from(sorted(WRAPPERS)), min_size=1, max_size=4))
def test_any_chain_around_a_dense_model_resolves_to_none(kinds: list[str]) -> None:
    root, _ = chain(kinds, dense_lm())
    assert MoEView.resolve(root) is None


# ------------------------------------------------------------------ delegation


@pytest.fixture
def view(fake_vlm: OneLevelVLM) -> MoEView:
    resolved = MoEView.resolve(fake_vlm)
    assert resolved is not None
    return resolved


@pytest.mark.parametrize("name", COUNTS)
def test_reading_and_writing_a_count_goes_to_the_model(
    name: str, view: MoEView, fake_lm: FakeMoELM
) -> None:
    setattr(fake_lm, name, 41)
    assert getattr(view, name) == 41
    setattr(view, name, 42)
    assert getattr(fake_lm, name) == 42
    assert name not in vars(view.root)  # the wrapper itself was not written


def test_expert_weights_is_the_models_own_list(view: MoEView, fake_lm: FakeMoELM) -> None:
    assert view.expert_weights is fake_lm.expert_weights
    replacement: list[Sequence[torch.Tensor]] = [[torch.zeros(8, 1)] for _ in range(3)]
    view.expert_weights = replacement
    assert fake_lm.expert_weights is replacement
    view.expert_weights.append([torch.zeros(8, 1)])
    assert len(fake_lm.expert_weights) == 4


def test_moe_layers_is_the_models_own_sequence(view: MoEView, fake_lm: FakeMoELM) -> None:
    assert view.moe_layers is fake_lm.moe_layers
    layers = list(fake_lm.moe_layers)[:2]
    view.moe_layers = layers
    assert fake_lm.moe_layers is layers


def test_set_eplb_state_reaches_the_model_with_the_same_tensors(
    view: MoEView, fake_lm: FakeMoELM
) -> None:
    load = torch.zeros(3, 8, dtype=torch.int32)
    l2p = torch.zeros(3, 8, 1, dtype=torch.int64)
    count = torch.ones(3, 8, dtype=torch.int64)
    view.set_eplb_state(load, l2p, count)
    (call,) = fake_lm.set_eplb_state_calls
    assert call["expert_load_view"] is load
    assert call["logical_to_physical_map"] is l2p
    assert call["logical_replica_count"] is count
    # The model refilled its expert_weights; the view shows the new list.
    assert view.expert_weights is fake_lm.expert_weights
    assert len(view.expert_weights) == 3
    assert check_conformance(view).ok


def test_update_physical_experts_metadata_reaches_the_model(
    view: MoEView, fake_lm: FakeMoELM
) -> None:
    view.update_physical_experts_metadata(num_physical_experts=16, num_local_physical_experts=8)
    assert fake_lm.metadata_calls == [{"num_physical_experts": 16, "num_local_physical_experts": 8}]
    assert view.num_physical_experts == 16
    assert view.num_redundant_experts == 8


def test_view_is_itself_a_conforming_mixture_of_experts(view: MoEView) -> None:
    assert is_mixture_of_experts(view)
    assert isinstance(view, MixtureOfExperts)
    assert check_conformance(view).ok


def test_view_has_no_dynamic_forwarding_and_no_instance_dict(view: MoEView) -> None:
    assert not hasattr(MoEView, "__getattr__")
    assert not hasattr(view, "__dict__")
    with pytest.raises(AttributeError):
        view.vision_tower  # type: ignore[attr-defined]  # not a protocol member: not forwarded  # noqa: B018


def test_root_model_and_trace_are_read_only(view: MoEView, fake_lm: FakeMoELM) -> None:
    for name in ("root", "model", "trace"):
        with pytest.raises(AttributeError):
            setattr(view, name, fake_lm)
    with pytest.raises(AttributeError, match="fixed when the view is built"):
        view._model = FakeMoELM()  # the private field is fixed too


def test_view_cannot_be_built_from_a_failed_trace(fake_lm: FakeMoELM) -> None:
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(dense_lm())
    assert info.value.trace is not None
    with pytest.raises(NotMixtureOfExpertsError, match="successful resolution") as built:
        MoEView(fake_lm, fake_lm, info.value.trace)
    assert built.value.trace is info.value.trace


def test_repr_names_root_path_model_and_counts(view: MoEView) -> None:
    assert repr(view) == (
        "MoEView(root=OneLevelVLM, model=root.get_language_model() -> FakeMoELM, "
        "3 MoE layers, 8 logical / 8 physical experts)"
    )


def test_repr_of_a_view_resolved_at_the_root(fake_lm: FakeMoELM) -> None:
    resolved = MoEView.resolve(fake_lm)
    assert repr(resolved) == (
        "MoEView(root=FakeMoELM, model=root, 3 MoE layers, 8 logical / 8 physical experts)"
    )


class BreaksLater(FakeMoELM):
    """Healthy while it is resolved; its counts raise once ``broken`` is set."""

    broken = False

    @property
    def num_logical_experts(self) -> int:
        if self.broken:
            raise RuntimeError("weights were unloaded")
        return self._logical

    @num_logical_experts.setter
    def num_logical_experts(self, value: int) -> None:
        self._logical = value


def test_repr_survives_a_model_whose_counts_break_later() -> None:
    model = BreaksLater()
    resolved = MoEView.resolve(DDPLike(model))
    assert resolved is not None
    model.broken = True
    assert repr(resolved) == (
        "MoEView(root=DDPLike, model=root.module -> BreaksLater, counts unreadable: RuntimeError)"
    )


def test_forwarding_wrapper_resolves_to_the_model_behind_it(fake_lm: FakeMoELM) -> None:
    wrapper = ForwardingPeftLike(fake_lm)
    assert is_mixture_of_experts(wrapper)  # every member is readable through __getattr__
    view = MoEView.require(wrapper)
    assert view.model is fake_lm
    assert view.trace.resolved_path == "model.get_base_model()"
    assert "only through __getattr__ forwarding" in str(view.trace)
    view.num_physical_experts = 12  # lands on the model, not on the wrapper
    assert fake_lm.num_physical_experts == 12
    assert "num_physical_experts" not in vars(wrapper)


def test_forwarding_wrapper_with_no_way_in_resolves_to_itself(fake_lm: FakeMoELM) -> None:
    wrapper = OnlyForwards(fake_lm)
    view = MoEView.require(wrapper)
    served: object = view.model  # typed as the protocol; here it is the wrapper itself
    assert served is wrapper
    assert view.trace.resolved_path == "model"
    assert [e.outcome for e in view.trace.candidates] == [TraceOutcome.RESOLVED]


def test_compiled_moe_model_resolves_to_the_original_module() -> None:
    from moe_protocols.models import tiny_moe

    lm = tiny_moe()
    compiled = torch.compile(lm)
    view = MoEView.require(compiled)
    assert view.model is lm
    assert view.trace.resolved_path == "model._orig_mod"


def test_the_trace_lists_objects_reached_but_not_checked_when_the_walk_resolves() -> None:
    from moe_protocols.adapters import TraceOutcome
    from moe_protocols.models import tiny_vlm

    class Compiled(torch.nn.Module):
        """Shaped like torch.compile's wrapper: forwards reads, holds the model as _orig_mod."""

        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self._orig_mod = inner

        def __getattr__(self, name: str) -> Any:
            try:
                return super().__getattr__(name)
            except AttributeError:
                return getattr(self._orig_mod, name)

    vlm = tiny_vlm()
    view = MoEView.require(Compiled(vlm))
    assert view.model is vlm.get_language_model()
    waiting = [e for e in view.trace.entries if e.outcome is TraceOutcome.NOT_CHECKED]
    assert [e.path for e in waiting] == ["model._orig_mod"]
    assert "model._orig_mod (TinyVLMForConditionalGeneration)" in str(view.trace)


def test_a_near_miss_language_model_is_named_in_the_headline(fake_lm: FakeMoELM) -> None:
    del fake_lm.num_redundant_experts  # one member short of the protocol
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(OneLevelVLM(fake_lm))
    headline = str(info.value).splitlines()[0]
    assert headline.startswith("OneLevelVLM (the served model) is not a MixtureOfExperts")
    assert "The closest object inside it, model.get_language_model() (FakeMoELM)" in headline
    assert "missing num_redundant_experts" in headline
    assert "none was found inside it" not in headline


# ------------------------------------------------------------------ layer_type


def test_layer_type_checks_every_layer_and_keeps_the_same_objects(
    fake_vlm: OneLevelVLM, fake_lm: FakeMoELM
) -> None:
    view = MoEView.require(fake_vlm, layer_type=FakeMoELayer)
    assert view.moe_layers is fake_lm.moe_layers
    # A runtime protocol works too; mypy asks for a concrete class there.
    protocol: Any = MoELayer  # Any: mypy refuses an abstract class for type[L]
    assert MoEView.resolve(fake_vlm, layer_type=protocol) is not None


class OtherLayer:
    """A conforming MoE layer that is not a FakeMoELayer."""

    def __init__(self, num_local_physical_experts: int) -> None:
        self._inner = FakeMoELayer(num_local_physical_experts)

    def get_expert_weights(self) -> list[torch.Tensor]:
        return self._inner.get_expert_weights()

    def set_eplb_state(
        self,
        moe_layer_idx: int,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None: ...


def test_a_layer_of_another_type_is_named_and_nothing_is_built(
    fake_vlm: OneLevelVLM, fake_lm: FakeMoELM
) -> None:
    lm = fake_lm
    layers = list(lm.moe_layers)
    lm.moe_layers = [*layers[:2], OtherLayer(lm.num_local_physical_experts)]
    assert MoEView.resolve(fake_vlm, layer_type=TinyMoEBlock) is None
    with pytest.raises(NotMixtureOfExpertsError, match=r"moe_layers\[0\] is a FakeMoELayer"):
        MoEView.require(fake_vlm, layer_type=TinyMoEBlock)
    with pytest.raises(NotMixtureOfExpertsError) as info:
        MoEView.require(fake_vlm, layer_type=type(layers[0]))
    message = str(info.value)
    assert "OneLevelVLM (the served model)" in message
    assert "at model.get_language_model() (FakeMoELM)" in message
    assert "moe_layers[2] is a OtherLayer instance, not a FakeMoELayer" in message
    assert info.value.trace is not None
    assert lm.moe_layers[:2] == layers[:2]


@pytest.mark.parametrize("bad", ["FakeMoELayer", FakeMoELayer(2), 3], ids=repr)
def test_layer_type_must_be_a_class(fake_vlm: OneLevelVLM, bad: object) -> None:
    for build in (MoEView.resolve, MoEView.require):
        with pytest.raises(ResolutionConfigError, match="layer_type must be a class"):
            build(fake_vlm, layer_type=bad)  # type: ignore[call-overload]  # the misuse under test


def test_view_declares_each_protocol_member_as_the_protocol_does() -> None:
    """The declarations are what type checkers see; the forwarding behind them is
    by name, so the types agree exactly when these strings do."""
    ours = dict(MixtureOfExperts.__annotations__)
    view = {k: v for k, v in MoEView.__annotations__.items() if not k.startswith("_")}
    assert ours.pop("moe_layers") == "Sequence[MoELayer]"
    assert view.pop("moe_layers") == "Sequence[LayerT]"
    assert view == ours
    methods = ("set_eplb_state", "update_physical_experts_metadata")
    for name in methods:
        assert inspect.signature(getattr(MoEView, name)) == inspect.signature(
            getattr(MixtureOfExperts, name)
        )
    assert vars(MoEView)["num_moe_layers"].__doc__ == "The model's ``num_moe_layers``."


@pytest.mark.parametrize("cls", [TinyProxyVLMForConditionalGeneration, HFMoEAdapter])
def test_other_implementations_declare_the_protocols_counts_as_attributes(cls: type) -> None:
    ours = {k: v for k, v in MixtureOfExperts.__annotations__.items() if k != "moe_layers"}
    declared = {k: v for k, v in cls.__annotations__.items() if k in ours}
    assert declared == ours


# ------------------------------------------------------------------ layering


def _package_imports(path: Path) -> set[str]:
    """The ``moe_protocols`` modules that the file at ``path`` imports (type-only ones too)."""
    tree = ast.parse(path.read_text())
    return {
        node.module
        for node in ast.walk(tree)
        if isinstance(node, ast.ImportFrom)
        and node.module is not None
        and node.module.startswith("moe_protocols")
    }


def test_generic_walk_knows_no_ecosystem_and_hf_knows_no_engine() -> None:
    adapters = Path(moe_protocols.adapters.__file__).parent
    for name in ("_walk.py", "_step.py", "_trace.py", "_generic.py", "_forward.py"):
        imported = _package_imports(adapters / name)
        assert not [m for m in imported if m.startswith("moe_protocols.adapters.hf")], name
        assert not [
            m for m in imported if m.startswith(("moe_protocols.eplb", "moe_protocols.models"))
        ]
    for path in sorted((adapters / "hf").glob("*.py")):
        imported = _package_imports(path)
        bad = [m for m in imported if m.startswith(("moe_protocols.eplb", "moe_protocols.models"))]
        assert not bad, path.name
    meeting = [
        path.name
        for path in sorted(adapters.glob("*.py"))
        if path.name != "__init__.py"
        and any(m.startswith("moe_protocols.adapters.hf") for m in _package_imports(path))
    ]
    assert meeting == ["_defaults.py"]
