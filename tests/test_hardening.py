"""Bad input of every class gets a typed error, fast, and leaves nothing half-updated.

One regression test per class of issue 13: registration that is not
all-or-nothing, files that exhaust the process, absurd numbers, hostile
objects. The generated (hypothesis) versions live in ``test_fuzz.py``.
"""

from __future__ import annotations

import json
import os
import struct
import time
from collections.abc import MutableSequence, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import pytest
import torch
from author_models import AuthorMoELM, AuthorVLM
from fakes import FakeMoELM
from snapshots import state_snapshot, wiring_snapshot

import moe_protocols.conformance._bounds as conformance_bounds
from moe_protocols import MoEView, check_conformance
from moe_protocols.eplb import (
    DEFAULT_POLICIES,
    EplbConfig,
    EplbState,
    Placement,
    compute_logical_maps,
    limits,
    load_placement,
    save_placement,
    slots_refetched,
)
from moe_protocols.eplb.analysis import migration_stats
from moe_protocols.eplb.policies import replica_counts
from moe_protocols.eplb.workloads import sample_step_loads
from moe_protocols.errors import (
    EplbConfigError,
    EplbStateError,
    MappingError,
    MoEProtocolsError,
    PlacementFileError,
    PolicyError,
    ResolutionConfigError,
    WorkloadError,
)
from moe_protocols.profiling import plan_placement

if TYPE_CHECKING:
    from torch import Tensor

CONFIG = EplbConfig(num_redundant_experts=4, window_size=4, step_interval=1000)


# ------------------------------------------------------------------ add_model all-or-nothing


def test_a_rejected_add_model_leaves_the_layers_on_the_released_state_they_had() -> None:
    lm = AuthorMoELM(independent_replicas=(1,))
    first = EplbState(CONFIG, num_ranks=4, integrity="off")
    first.add_model(lm)
    first.model_state().expert_load_pass.fill_(7)  # the layers' views hold something to compare
    first.remove_model("model")
    before = wiring_snapshot(lm)
    second = EplbState(CONFIG, num_ranks=4)
    with pytest.raises(EplbStateError, match=r"MoE layer 1, slot 8"):
        second.add_model(lm)  # rejected after wiring: a redundant slot is no replica
    assert wiring_snapshot(lm) == before
    assert second.model_names == ()
    assert all(int(layer.load.sum()) == 7 * 12 for layer in lm.blocks if layer.load is not None)


def test_a_rejected_add_model_leaves_a_never_registered_model_unwired() -> None:
    lm = AuthorMoELM(independent_replicas=(2,))
    before = wiring_snapshot(lm)
    with pytest.raises(EplbStateError, match="MoE layer 2"):
        EplbState(CONFIG, num_ranks=4).add_model(lm)
    assert wiring_snapshot(lm) == before
    assert all(layer.load is None for layer in lm.blocks)


def test_a_rejected_add_model_through_a_view_restores_the_wrapped_model() -> None:
    lm = AuthorMoELM(independent_replicas=(0,))
    view = MoEView.require(AuthorVLM(lm))
    before = wiring_snapshot(lm)
    with pytest.raises(EplbStateError, match="MoE layer 0"):
        EplbState(CONFIG, num_ranks=4).add_model(view)
    assert wiring_snapshot(lm) == before
    assert view.expert_weights is lm.expert_weights


def test_a_set_eplb_state_failing_at_a_later_layer_unwires_the_earlier_ones() -> None:
    lm = AuthorMoELM()

    def refuse(*args: object, **kwargs: object) -> None:
        raise RuntimeError("layer 2 refuses")

    vars(lm.blocks[2])["set_eplb_state"] = refuse  # a failing layer (this instance only)
    before = wiring_snapshot(lm)
    state = EplbState(CONFIG, num_ranks=4)
    with pytest.raises(EplbStateError, match="layer 2 refuses"):
        state.add_model(lm)
    assert wiring_snapshot(lm) == before
    assert lm.blocks[0].l2p is None
    assert state.model_names == ()
    del lm.moe_layers[2].set_eplb_state
    state.add_model(lm)  # the same model registers once fixed
    assert lm.blocks[2].l2p is not None


class _ListWeights(AuthorMoELM):
    """A model whose layers hand out a list where a weight tensor belongs."""

    def __init__(self) -> None:
        super().__init__()
        for layer in self.moe_layers:
            layer.get_expert_weights = lambda: [[1.0, 2.0]]  # type: ignore[method-assign,list-item]  # hostile on purpose


def test_a_weight_that_is_a_list_is_a_typed_error_before_anything_is_wired() -> None:
    lm = _ListWeights()
    before = wiring_snapshot(lm)
    with pytest.raises(EplbStateError, match=r"get_expert_weights\(\) item 0 is a list"):
        EplbState(CONFIG, num_ranks=4).add_model(lm)
    assert wiring_snapshot(lm) == before


def test_counts_over_the_limits_are_refused_before_anything_is_allocated() -> None:
    huge = FakeMoELM(num_logical_experts=8)
    huge.num_logical_experts = huge.num_routed_experts = 2**40
    huge.num_physical_experts = 2**40
    with pytest.raises(EplbConfigError, match="num_logical_experts=1099511627776 exceeds"):
        EplbState(EplbConfig()).add_model(huge)
    wide = EplbConfig(window_size=limits.MAX_WINDOW_SIZE)
    lm = AuthorMoELM(num_experts=2048, num_redundant=0, layers=3, hidden=1)
    with pytest.raises(EplbConfigError, match=r"65536 x 3 x 2048 = .* MAX_WINDOW_ENTRIES"):
        EplbState(wide).add_model(lm)
    assert all(layer.load is None for layer in lm.blocks)


def test_a_limit_can_be_raised_by_the_user(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        EplbConfigError, match=r"raise moe_protocols\.eplb\.limits\.MAX_WINDOW_SIZE"
    ):
        EplbConfig(window_size=limits.MAX_WINDOW_SIZE + 1)
    monkeypatch.setattr(limits, "MAX_WINDOW_SIZE", limits.MAX_WINDOW_SIZE + 1)
    assert EplbConfig(window_size=limits.MAX_WINDOW_SIZE).window_size == 65537


# ------------------------------------------------------------------ absurd numbers


@pytest.mark.parametrize("policy", ["deepseek", "migration_aware"])
@pytest.mark.parametrize(
    ("load", "message"),
    [
        (1e308, "total load of inf, over the limit MAX_LAYER_LOAD"),
        (2e299, "total load of 1.6e\\+300"),  # each is fine, their sum is not
        (float("nan"), "non-finite load nan"),
        (float("-inf"), "non-finite load -inf"),
    ],
)
def test_huge_or_non_finite_loads_are_refused_at_the_policy_boundary(
    policy: str, load: float, message: str
) -> None:
    weight = torch.ones(2, 8, dtype=torch.float64)
    weight[1, :] = load
    with pytest.raises(PolicyError, match=message):
        DEFAULT_POLICIES.get(policy).rebalance_experts(weight, 12, 1, 1, 4)


def test_loads_at_the_limit_still_plan_a_valid_placement() -> None:
    weight = torch.full((2, 8), limits.MAX_LAYER_LOAD / 8, dtype=torch.float64)
    weight[0, 3] = 0.0
    for policy in ("deepseek", "migration_aware"):
        placement = DEFAULT_POLICIES.get(policy).rebalance_experts(weight, 12, 1, 1, 4)
        assert placement.shape == (2, 12)
        assert int(placement.min()) >= 0
        assert int(placement.max()) < 8


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ((2**62, 1, 1, 4), "num_replicas=4611686018427387904 exceeds the limit MAX_PHYSICAL"),
        ((12, 2**40, 1, 4), "num_groups=1099511627776 exceeds the limit MAX_EXPERT_GROUPS"),
        ((12, 1, 1, 2**100), "num_ranks=1267650600228229401496703205376 exceeds"),
    ],
)
def test_absurd_policy_counts_are_refused(args: tuple[int, int, int, int], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        DEFAULT_POLICIES.get("deepseek").rebalance_experts(torch.ones(2, 8), *args)


def test_plan_placement_refuses_huge_loads_and_slot_counts_with_typed_errors() -> None:
    with pytest.raises(PolicyError, match="MAX_LAYER_LOAD"):
        plan_placement(torch.full((2, 8), 1e308, dtype=torch.float64), num_ranks=2)
    with pytest.raises(PolicyError, match="exceeds the limit MAX_PHYSICAL_SLOTS"):
        plan_placement(torch.ones(2, 8), num_ranks=2, num_redundant_experts=2**40)


def test_migration_stats_refuses_an_expert_id_that_would_size_its_histograms() -> None:
    old = torch.tensor([[0, 2**40]])
    with pytest.raises(MappingError, match="exceeds the limit MAX_LOGICAL_EXPERTS"):
        migration_stats(old, torch.tensor([[0, 1]]), 1)


def test_replica_counts_and_sampled_loads_refuse_absurd_sizes() -> None:
    with pytest.raises(PolicyError, match="num_slots=4611686018427387904 exceeds"):
        replica_counts(torch.ones(2, 8), 2**62, 4)
    with pytest.raises(PolicyError, match="cannot place 12 replicas"):
        replica_counts(torch.ones(2, 8), 12, 1)
    with pytest.raises(WorkloadError, match=r"1073741824 x 2 x 8 = .* MAX_WINDOW_ENTRIES"):
        sample_step_loads(torch.ones(2, 8), tokens_per_step=4, top_k=2, num_steps=2**30, seed=0)


def test_a_view_that_claims_a_huge_shape_is_refused_before_it_is_copied() -> None:
    huge = torch.zeros(1, dtype=torch.int64).expand(2**20, 2**20)  # 8 bytes, claims 8 TiB
    with pytest.raises(MappingError, match="layers=1048576 exceeds the limit MAX_LAYERS"):
        Placement(physical_to_logical_map=huge, num_logical_experts=4)
    with pytest.raises(MappingError, match="layers=1048576 exceeds the limit MAX_LAYERS"):
        compute_logical_maps(huge, 4, 4)
    load = torch.zeros(1, dtype=torch.float64).expand(2**20, 2**20)
    with pytest.raises(PolicyError, match="exceeds the limit MAX_LAYERS"):
        DEFAULT_POLICIES.get("deepseek").rebalance_experts(load, 8, 1, 1, 4)
    state = EplbState(CONFIG, num_ranks=4)
    state.add_model(AuthorMoELM())
    before = state_snapshot(state)
    with pytest.raises(MappingError, match="exceeds the limit MAX_LAYERS"):
        state.update_mapping("model", huge)
    assert state_snapshot(state) == before
    with pytest.raises(MappingError, match="exceeds the limit MAX_LOGICAL_EXPERTS"):
        slots_refetched(torch.tensor([[0, 2**40]]), torch.tensor([[0, 1]]), 1)


def test_absurd_state_topologies_are_config_errors() -> None:
    with pytest.raises(EplbConfigError, match="num_ranks=1099511627776 exceeds"):
        EplbState(EplbConfig(), num_ranks=2**40)
    with pytest.raises(EplbConfigError, match="window_size=1000000000000 exceeds"):
        EplbConfig(window_size=10**12)


# ------------------------------------------------------------------ placement files


def _placement() -> Placement:
    return Placement(
        physical_to_logical_map=torch.tensor([[0, 1, 2, 3, 0, 3]]), num_logical_experts=4
    )


def _refused(path: object, match: str, **kwargs: int) -> PlacementFileError:
    started = time.monotonic()
    with pytest.raises(PlacementFileError, match=match) as info:
        load_placement(path, **kwargs)  # type: ignore[arg-type]  # bad paths on purpose
    assert time.monotonic() - started < 2.0
    return info.value


def test_a_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "placement.json"
    os.mkfifo(fifo)
    error = _refused(fifo, "is a FIFO")
    assert error.path == str(fifo)


def test_a_symlink_to_dev_zero_and_a_directory_are_refused(tmp_path: Path) -> None:
    link = tmp_path / "zero.safetensors"
    link.symlink_to("/dev/zero")
    _refused(link, "a character device, not a regular file")
    folder = tmp_path / "folder.json"
    folder.mkdir()
    _refused(folder, "a directory")


@pytest.mark.parametrize("path", [None, 3, b"placement.json", ["placement.json"], ""])
def test_a_path_of_the_wrong_type_is_a_typed_error(path: object) -> None:
    error = _refused(path, "placement path")
    assert isinstance(error, MappingError)


def test_a_file_over_the_size_limit_is_refused_and_the_limit_can_be_raised(
    tmp_path: Path,
) -> None:
    path = tmp_path / "placement.json"
    save_placement(_placement(), path)
    size = path.stat().st_size
    _refused(
        path, f"holds {size} bytes or more, over the limit of {size - 1} bytes", max_bytes=size - 1
    )
    assert load_placement(path, max_bytes=size) == _placement()
    _refused(path, "max_bytes must be an int >= 1", max_bytes=0)


def test_deep_json_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    path = tmp_path / "deep.json"
    path.write_text("[" * 200_000 + "]" * 200_000)
    _refused(path, "nests deeper than 16 levels")
    many = tmp_path / "many.json"
    many.write_text("[" + "[]," * 1_000_000 + "[]]")  # shallow, but a million lists
    _refused(many, "holds 1000002 arrays and objects")
    # An unterminated string of escaped quotes: a backtracking scan would be quadratic.
    escapes = tmp_path / "escapes.json"
    escapes.write_text('"' + '\\"' * 2_000_000)
    _refused(escapes, "not valid JSON")
    nested = tmp_path / "nested_string.json"
    # Brackets inside strings do not count.
    doc = {"format": "[" * 100, "version": 1, "num_logical_experts": 4, "num_ranks": 1}
    doc |= {"num_nodes": 1, "physical_to_logical_map": [[0, 1, 2, 3]]}
    nested.write_text(json.dumps(doc))
    _refused(nested, "field 'format' is '\\[\\[\\[")


def test_safetensors_are_read_from_memory_and_their_header_is_checked(tmp_path: Path) -> None:
    path = tmp_path / "placement.safetensors"
    save_placement(_placement(), path)
    assert load_placement(path) == _placement()
    data = path.read_bytes()
    header = json.loads(data[8 : 8 + struct.unpack("<Q", data[:8])[0]])
    header["physical_to_logical_map"]["shape"] = [2**20, 2**20]
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data[8 + len(text) :])
    _refused(path, "exceeds the limit MAX_LAYERS")
    path.write_bytes(struct.pack("<Q", 2**60) + b"{}")
    _refused(path, "header claims")


def test_safetensors_are_never_memory_mapped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import safetensors
    import safetensors.torch as safetensors_torch

    path = tmp_path / "placement.safetensors"
    save_placement(_placement(), path)

    def mapped(*args: object, **kwargs: object) -> None:
        raise AssertionError("safe_open maps the file: a concurrent writer could SIGBUS us")

    monkeypatch.setattr(safetensors, "safe_open", mapped)
    monkeypatch.setattr(safetensors_torch, "safe_open", mapped)
    monkeypatch.setattr(safetensors_torch, "load_file", mapped)
    assert load_placement(path) == _placement()


def test_save_placement_refuses_what_is_not_a_placement(tmp_path: Path) -> None:
    target = tmp_path / "placement.json"
    with pytest.raises(PlacementFileError, match="expected a Placement, got Tensor"):
        save_placement(torch.zeros(1, 4), target)  # type: ignore[arg-type]  # wrong on purpose
    with pytest.raises(PlacementFileError, match="placement path must be a str"):
        save_placement(_placement(), None)  # type: ignore[arg-type]  # wrong on purpose
    assert not target.exists()


# ------------------------------------------------------------------ hostile objects


class _Endless(MutableSequence[Sequence["Tensor"]]):
    """A sequence that claims one item and never raises IndexError: iteration never ends."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> Sequence[Tensor]:  # type: ignore[override]  # int only
        return self._item(index)

    def _item(self, index: int) -> Sequence[Tensor]:
        return [torch.zeros(8, 2)]

    def __setitem__(self, index: object, value: object) -> None:
        raise NotImplementedError

    def __delitem__(self, index: object) -> None:
        raise NotImplementedError

    def insert(self, index: int, value: object) -> None:
        raise NotImplementedError


class _Huge(_Endless):
    def __len__(self) -> int:
        return 2**62


class _Raising(_Endless):
    def _item(self, index: int) -> Sequence[Tensor]:
        raise RuntimeError("no weights today")


class _RaisingAttributes(FakeMoELM):
    @property
    def num_logical_experts(self) -> int:  # hostile on purpose
        raise ZeroDivisionError("boom")

    @num_logical_experts.setter
    def num_logical_experts(self, value: int) -> None:
        pass


@pytest.mark.parametrize(
    ("weights", "problem"),
    [
        (_Endless(), "holds 1 layers of weights but num_moe_layers is 3"),
        (_Huge(), "holds 4611686018427387904 layers, more than the 4096"),
        (_Raising(), "indexing raised RuntimeError: no weights today"),
        ([[torch.zeros(8, 2)] * 300] * 3, "holds 300 weight tensors, more than the 256"),
        ([[[1.0, 2.0]]] * 3, "must be a torch.Tensor, got list"),
    ],
)
def test_conformance_of_hostile_expert_weights_is_a_failing_check_not_a_hang(
    weights: object, problem: str
) -> None:
    lm = FakeMoELM()
    lm.expert_weights = weights  # type: ignore[assignment]  # hostile on purpose
    started = time.monotonic()
    report = check_conformance(lm)
    assert time.monotonic() - started < 2.0
    assert not report.ok
    assert problem in str(report)
    with pytest.raises(MoEProtocolsError):
        EplbState(EplbConfig()).add_model(lm)


class _Slow(_Endless):
    """4096 layers, each slow to produce."""

    def __len__(self) -> int:
        return 4096

    def _item(self, index: int) -> Sequence[Tensor]:
        time.sleep(0.01)
        return [torch.zeros(8, 2)]


def test_conformance_stops_at_its_time_budget(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(conformance_bounds, "_TIME_BUDGET_S", 0.1)
    lm = FakeMoELM()
    lm.expert_weights = _Slow()
    started = time.monotonic()
    report = check_conformance(lm)
    assert time.monotonic() - started < 1.0  # not the 41 s that reading all of it takes
    assert "checking it took longer than 0.1 s" in str(report)


def test_conformance_of_attributes_that_raise_is_a_failing_check() -> None:
    report = check_conformance(_RaisingAttributes())
    assert "num_logical_experts" in str(report)
    assert "ZeroDivisionError: boom" in str(report)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_depth": -1}, "max_depth must be >= 0"),
        ({"max_depth": True}, "max_depth must be an int, got bool"),
        ({"max_depth": "3"}, "max_depth must be an int, got str"),
        ({"max_depth": 2**62}, "max_depth must be <= 4096"),
        ({"max_candidates": 0}, "max_candidates must be >= 1"),
        ({"steps": None}, "steps must be a sequence of UnwrapStep"),
        ({"steps": [object()]}, r"steps\[0\] must be an UnwrapStep"),
        ({"steps": iter(int, 1)}, "more than 1024 unwrapping steps"),
    ],
)
def test_invalid_resolve_arguments_are_typed_errors(
    kwargs: dict[str, object], message: str
) -> None:
    for call in (MoEView.resolve, MoEView.require):
        with pytest.raises(ResolutionConfigError, match=message) as info:
            call(FakeMoELM(), **kwargs)  # type: ignore[call-overload]  # wrong on purpose
        assert isinstance(info.value, (ValueError, TypeError))  # as before, for old callers
        if kwargs.get("steps") is not None and not isinstance(kwargs["steps"], list):
            break  # the iterator is spent


def test_a_failed_add_model_leaves_a_registered_state_unchanged() -> None:
    state = EplbState(CONFIG, num_ranks=4)
    state.add_model(AuthorMoELM(seed=1), "target")
    before = state_snapshot(state)
    with pytest.raises(EplbStateError):
        state.add_model(AuthorMoELM(seed=2, independent_replicas=(0,)), "draft")
    assert state_snapshot(state) == before
