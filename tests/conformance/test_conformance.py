"""check_conformance: a report naming every fault, for any object, without touching it."""

from __future__ import annotations

import pytest
import torch
from fakes import (
    HOSTILE,
    FakeMoELayer,
    FakeMoELM,
    Hostile,
    OneLevelVLM,
    ProxyWrapper,
    dense_lm,
    faulty_lm,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_protocols.conformance import (
    ConformanceReport,
    Problem,
    ProblemKind,
    check_conformance,
    check_layer_conformance,
)
from moe_protocols.models import tiny_moe, tiny_vlm
from moe_protocols.protocols import COUNT_MEMBERS, LAYER_METHODS, MODEL_MEMBERS, MODEL_METHODS

# Written out by hand on purpose: vLLM 0.33's MixtureOfExperts has exactly
# these members, and the lists read off our protocol classes must match it.
ALL_MEMBERS = (
    "expert_weights",
    "num_moe_layers",
    "num_expert_groups",
    "num_logical_experts",
    "num_physical_experts",
    "num_local_physical_experts",
    "num_routed_experts",
    "num_shared_experts",
    "num_redundant_experts",
    "moe_layers",
    "set_eplb_state",
    "update_physical_experts_metadata",
)


def test_member_lists_read_off_the_protocols_match_vllms_members() -> None:
    assert MODEL_MEMBERS == ALL_MEMBERS
    assert tuple(m for m in ALL_MEMBERS if m.startswith("num_")) == COUNT_MEMBERS
    assert dict(MODEL_METHODS) == {
        "set_eplb_state": ("expert_load_view", "logical_to_physical_map", "logical_replica_count"),
        "update_physical_experts_metadata": ("num_physical_experts", "num_local_physical_experts"),
    }
    assert dict(LAYER_METHODS) == {
        "get_expert_weights": (),
        "set_eplb_state": (
            "moe_layer_idx",
            "expert_load_view",
            "logical_to_physical_map",
            "logical_replica_count",
        ),
    }


def faults(report: ConformanceReport) -> set[tuple[str, ProblemKind]]:
    return {(p.member, p.kind) for p in report.problems}


def state_of(obj: object) -> dict[str, object]:
    """Every instance attribute by identity, lists by their items: enough to see any write."""
    return {
        name: (tuple(map(id, value)) if isinstance(value, list) else id(value))
        for name, value in vars(obj).items()
    }


# ------------------------------------------------------------------ conforming


def test_native_moe_lm_conforms_with_its_layer_count(fake_lm: FakeMoELM) -> None:
    report = check_conformance(fake_lm)
    assert report.ok
    assert report.is_moe
    assert report.num_moe_layers == 3
    assert str(report) == "model (FakeMoELM) satisfies MixtureOfExperts (3 MoE layers)"


def test_reference_tiny_moe_conforms() -> None:
    report = check_conformance(tiny_moe())
    assert report.ok, str(report)
    assert report.is_moe


def test_proxy_wrapper_conforms_by_forwarding(fake_lm: FakeMoELM) -> None:
    assert check_conformance(ProxyWrapper(fake_lm)).is_moe


def test_dense_model_conforms_but_is_not_moe(fake_dense_lm: FakeMoELM) -> None:
    report = check_conformance(fake_dense_lm, path="model.get_language_model()")
    assert report.ok
    assert not report.is_moe
    assert report.num_moe_layers == 0
    assert str(report) == (
        "model.get_language_model() (FakeMoELM) satisfies MixtureOfExperts "
        "but has num_moe_layers == 0 (a dense model)"
    )


def test_filled_expert_weights_conform(fake_lm: FakeMoELM) -> None:
    fake_lm.set_eplb_state(
        expert_load_view=torch.zeros(3, 8, dtype=torch.int32),
        logical_to_physical_map=torch.zeros(3, 8, 1, dtype=torch.int64),
        logical_replica_count=torch.ones(3, 8, dtype=torch.int64),
    )
    assert len(fake_lm.expert_weights) == 3
    assert check_conformance(fake_lm).ok


def test_expert_parallel_slice_conforms() -> None:
    # 12 physical slots over 4 ranks: 3 local slots per rank, layers hold [3, ...] weights.
    model = FakeMoELM(num_logical_experts=8, num_redundant_experts=4, ep_size=4)
    assert check_conformance(model).ok


# ---------------------------------------------------------------- not conforming


def test_vlm_wrapper_report_lists_every_missing_member(fake_vlm: OneLevelVLM) -> None:
    report = check_conformance(fake_vlm)
    assert not report.ok
    assert faults(report) == {(m, ProblemKind.MISSING) for m in ALL_MEMBERS}
    assert report.lacks_every_member
    assert report.num_moe_layers is None
    assert not check_conformance(faulty_lm(expert_weights=())).lacks_every_member


def test_reference_vlm_report_names_class_and_path() -> None:
    report = check_conformance(tiny_vlm(), path="served")
    text = str(report)
    assert text.startswith(
        "served (TinyVLMForConditionalGeneration) does not satisfy MixtureOfExperts:\n"
    )
    assert "  - num_redundant_experts: missing" in text.splitlines()


def test_every_problem_is_listed_not_just_the_first() -> None:
    model = faulty_lm(
        num_moe_layers=True,
        num_shared_experts=-2,
        set_eplb_state=None,
        expert_weights=(),
        num_redundant_experts=3,
    )
    assert faults(check_conformance(model)) == {
        ("expert_weights", ProblemKind.WRONG_TYPE),
        ("num_moe_layers", ProblemKind.WRONG_TYPE),
        ("num_shared_experts", ProblemKind.INVALID_VALUE),
        ("set_eplb_state", ProblemKind.NOT_CALLABLE),
        ("invariant", ProblemKind.INVARIANT),  # 8 physical != 8 logical + 3 redundant
    }


def test_problems_follow_protocol_member_order() -> None:
    report = check_conformance(object())
    assert [p.member for p in report.problems] == list(ALL_MEMBERS)


@pytest.mark.parametrize("case", HOSTILE, ids=lambda case: case.name)
def test_hostile_object_gets_a_report_naming_the_fault(case: Hostile) -> None:
    obj = case.build()
    report = check_conformance(obj, path="model.language_model")
    assert not report.ok
    assert not report.is_moe
    assert (case.member, case.kind) in faults(report), str(report)
    if case.single_fault:
        assert len(report.problems) == 1, str(report)
    text = str(report)
    assert text.startswith("model.language_model (")
    assert case.member in text


def test_generator_moe_layers_is_rejected_without_being_consumed() -> None:
    layers = [FakeMoELayer(8) for _ in range(3)]
    generator = iter(layers)
    model = faulty_lm(moe_layers=generator)
    report = check_conformance(model)
    assert ("moe_layers", ProblemKind.WRONG_TYPE) in faults(report)
    assert "iterator" in str(report)
    assert list(generator) == layers  # nothing was taken from it


def test_tuple_and_module_list_like_moe_layers_conform() -> None:
    class LayerList:  # nn.ModuleList-like: __len__ and __getitem__, not a registered Sequence
        def __init__(self, items: list[FakeMoELayer]) -> None:
            self._items = items

        def __len__(self) -> int:
            return len(self._items)

        def __getitem__(self, index: int) -> FakeMoELayer:
            return self._items[index]

    layers = [FakeMoELayer(8) for _ in range(3)]
    assert check_conformance(faulty_lm(moe_layers=tuple(layers))).ok
    assert check_conformance(faulty_lm(moe_layers=LayerList(layers))).ok
    assert check_conformance(faulty_lm(moe_layers=torch.nn.ModuleList())).problems == (
        Problem(
            "invariant", ProblemKind.INVARIANT, "len(moe_layers) (0) must equal num_moe_layers (3)"
        ),
    )


def test_expert_weights_with_wrong_layer_count_or_slot_dim_are_named() -> None:
    model = FakeMoELM()
    model.expert_weights = [[torch.zeros(8, 2)], [torch.zeros(5, 2), torch.zeros(8, 1)]]
    assert faults(check_conformance(model)) == {
        ("expert_weights", ProblemKind.INVARIANT),  # 2 layers of weights, 3 MoE layers
        ("expert_weights[1][0]", ProblemKind.INVARIANT),  # dim 0 is 5, 8 local slots
    }


def test_expert_weights_entries_must_be_sequences_of_tensors() -> None:
    model = FakeMoELM()
    model.expert_weights = [torch.zeros(8, 2), "w13", [torch.zeros(8, 2), torch.tensor(1.0)]]  # type: ignore[list-item]  # deliberately malformed
    assert faults(check_conformance(model)) == {
        ("expert_weights[0]", ProblemKind.WRONG_TYPE),
        ("expert_weights[1]", ProblemKind.WRONG_TYPE),
        ("expert_weights[2][1]", ProblemKind.INVALID_VALUE),
    }


def test_many_identical_layer_faults_are_counted_not_all_printed() -> None:
    model = FakeMoELM(num_moe_layers=40)
    model.moe_layers = [object()] * 40
    report = check_conformance(model)
    layer_problems = [p for p in report.problems if p.member.startswith("moe_layers")]
    assert len(layer_problems) == 13  # 12 listed, then one that counts the other 68
    assert "68 more layer problems" in layer_problems[-1].detail


@pytest.mark.parametrize(
    ("overrides", "detail"),
    [
        ({"num_routed_experts": 6}, "num_routed_experts (6) must equal num_logical_experts (8)"),
        ({"num_local_physical_experts": 0}, "num_local_physical_experts must be > 0"),
        (
            {"num_local_physical_experts": 3},
            "num_physical_experts (8) must be a multiple of num_local_physical_experts (3)",
        ),
    ],
)
def test_count_invariants_are_checked(overrides: dict[str, object], detail: str) -> None:
    model = faulty_lm(**overrides)
    # Layers keep [8, ...] weights; only check the invariant, not the weights.
    model.expert_weights = []
    report = check_conformance(model)
    invariants = [p.detail for p in report.problems if p.member == "invariant"]
    assert any(detail in text for text in invariants), str(report)


def test_invariants_are_skipped_when_a_count_involved_is_invalid() -> None:
    report = check_conformance(faulty_lm(num_logical_experts="8", num_routed_experts=99))
    assert faults(report) == {("num_logical_experts", ProblemKind.WRONG_TYPE)}


def test_check_never_mutates_and_never_calls_the_methods(fake_lm: FakeMoELM) -> None:
    before = state_of(fake_lm)
    layer_states = [state_of(layer) for layer in fake_lm.moe_layers]
    check_conformance(fake_lm)
    check_conformance(OneLevelVLM(fake_lm))
    assert state_of(fake_lm) == before
    assert [state_of(layer) for layer in fake_lm.moe_layers] == layer_states
    assert fake_lm.set_eplb_state_calls == []
    assert fake_lm.metadata_calls == []
    assert all(layer.eplb_calls == [] for layer in fake_lm.moe_layers)


# Mocks record every interaction (inspect.signature compares them with ==), so
# "unchanged" cannot be observed on them; every other hostile object must stay as it was.
NOT_MOCKS = [case for case in HOSTILE if "MagicMock" not in case.name]


@pytest.mark.parametrize("case", NOT_MOCKS, ids=lambda case: case.name)
def test_check_does_not_mutate_hostile_objects(case: Hostile) -> None:
    obj = case.build()
    try:
        before = state_of(obj)
    except TypeError:  # no __dict__: None, int, str
        before = None
    check_conformance(obj)
    if before is not None:
        assert state_of(obj) == before


# ------------------------------------------------------------------ MoE layers


def test_layer_conformance_accepts_a_conforming_layer() -> None:
    report = check_layer_conformance(FakeMoELayer(4), path="model.moe_layers[0]")
    assert report.ok
    assert not report.is_moe  # is_moe is about models
    assert str(report) == "model.moe_layers[0] (FakeMoELayer) satisfies MoELayer"


def test_layer_get_expert_weights_must_take_no_arguments() -> None:
    class NeedsDevice(FakeMoELayer):
        def get_expert_weights(self, device: str) -> list[torch.Tensor]:  # type: ignore[override]  # deliberately incompatible
            return []

    report = check_layer_conformance(NeedsDevice(4), path="layer")
    assert faults(report) == {("get_expert_weights", ProblemKind.BAD_SIGNATURE)}
    assert "with no arguments" in str(report)


def test_uninspectable_builtin_method_is_accepted() -> None:
    layer = FakeMoELayer(4)
    layer.get_expert_weights = {}.copy  # type: ignore[method-assign,assignment]  # a builtin without signature
    assert check_layer_conformance(layer, path="layer").ok


def test_layer_problems_are_folded_into_the_model_report_with_their_index() -> None:
    model = FakeMoELM()
    model.moe_layers = [FakeMoELayer(8), object(), FakeMoELayer(8)]
    report = check_conformance(model)
    assert faults(report) == {
        ("moe_layers[1].get_expert_weights", ProblemKind.MISSING),
        ("moe_layers[1].set_eplb_state", ProblemKind.MISSING),
    }


# ------------------------------------------------------------------- properties


@settings(max_examples=60, deadline=None)
@given(
    num_moe_layers=st.integers(-1, 4),
    logical=st.integers(-1, 12),
    redundant=st.integers(-1, 6),
    physical_delta=st.integers(-1, 1),
    local=st.integers(-1, 12),
    routed_delta=st.integers(-1, 1),
    layers=st.integers(0, 4),
)
def test_report_is_ok_exactly_when_the_counts_satisfy_the_contract(
    num_moe_layers: int,
    logical: int,
    redundant: int,
    physical_delta: int,
    local: int,
    routed_delta: int,
    layers: int,
) -> None:
    physical = logical + redundant + physical_delta
    routed = logical + routed_delta
    model = FakeMoELM(num_moe_layers=layers)
    model.moe_layers = [FakeMoELayer(max(local, 0)) for _ in range(layers)]
    model.num_moe_layers = num_moe_layers
    model.num_logical_experts = logical
    model.num_redundant_experts = redundant
    model.num_physical_experts = physical
    model.num_local_physical_experts = local
    model.num_routed_experts = routed
    counts = (num_moe_layers, logical, redundant, physical, local, routed)
    expected_ok = (
        min(counts) >= 0
        and physical == logical + redundant
        and routed == logical
        and layers == num_moe_layers
        and (local > 0 or num_moe_layers == 0)
        and (local == 0 or physical % local == 0)
    )
    report = check_conformance(model)
    assert report.ok == expected_ok, str(report)
    assert report.is_moe == (expected_ok and num_moe_layers > 0)
    assert report.num_moe_layers == (num_moe_layers if num_moe_layers >= 0 else None)


@settings(max_examples=40, deadline=None)
@given(
    value=st.one_of(
        st.none(),
        st.booleans(),
        st.floats(allow_nan=True),
        st.text(max_size=5),
        st.binary(max_size=5),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
        st.integers(),
    ),
    member=st.sampled_from(ALL_MEMBERS),
)
def test_any_value_in_any_member_gives_a_report_not_an_exception(
    value: object, member: str
) -> None:
    model = faulty_lm(**{member: value})
    report = check_conformance(model)
    assert all(p.member.startswith(member) or p.member == "invariant" for p in report.problems), (
        str(report)
    )
    if type(value) is not int and type(value) is not list:
        assert not report.ok


def test_dense_model_with_valid_counts_is_reported_dense() -> None:
    assert "a dense model" in check_conformance(dense_lm()).summary()
