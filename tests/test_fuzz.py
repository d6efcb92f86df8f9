"""Generated bad input: malformed placement files, tensors and configs.

Every example asserts the three promises of the error model at once: the
failure is a typed error from ``moe_protocols.errors`` (or the input was in
fact valid and the result is checked), it comes back fast with little memory
(small limits are set, ``tracemalloc`` watches the Python heap), and a
byte-for-byte snapshot of the state (maps, windows, weights, counters and
what the layers hold) is unchanged after the failure.
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Generator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import pytest
import torch
from author_models import AuthorMoELM
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from snapshots import state_snapshot, wiring_snapshot

from moe_protocols import check_conformance
from moe_protocols.eplb import (
    DEFAULT_POLICIES,
    PLACEMENT_FORMAT,
    EplbConfig,
    EplbState,
    Placement,
    limits,
    load_placement,
    save_placement,
)
from moe_protocols.eplb.policies import check_policy_output
from moe_protocols.errors import MoEProtocolsError

if TYPE_CHECKING:
    from hypothesis.strategies import DrawFn, SearchStrategy

_T = TypeVar("_T")

# More examples for a long local run: MOE_PROTOCOLS_FUZZ_EXAMPLES=2000 pytest tests/test_fuzz.py
EXAMPLES = int(os.environ.get("MOE_PROTOCOLS_FUZZ_EXAMPLES", "40"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SECONDS: float = 1.0  # per example: a real failure is refused in milliseconds
HEAP_BYTES: int = 8 * 2**20  # per example, Python allocations while it runs
FILE_BYTES: int = 64 * 2**10  # max_bytes of every load in this module

CONFIG = EplbConfig(num_redundant_experts=4, window_size=4, step_interval=1000)
MAP = [[0, 1, 2, 3, 0, 3], [3, 2, 1, 0, 1, 1]]  # 2 layers, 4 experts, 6 slots on 2 ranks


@pytest.fixture(autouse=True)
def _small_limits(monkeypatch: pytest.MonkeyPatch) -> None:
    """Limits a thousand times smaller: an example over them shows the check, not the RAM."""
    monkeypatch.setattr(limits, "MAX_LAYERS", 64)
    monkeypatch.setattr(limits, "MAX_LOGICAL_EXPERTS", 256)
    monkeypatch.setattr(limits, "MAX_PHYSICAL_SLOTS", 512)
    monkeypatch.setattr(limits, "MAX_MAP_ENTRIES", 4096)
    monkeypatch.setattr(limits, "MAX_REPLICA_MAP_ENTRIES", 2**16)
    monkeypatch.setattr(limits, "MAX_WINDOW_SIZE", 64)
    monkeypatch.setattr(limits, "MAX_WINDOW_ENTRIES", 2**16)


@contextmanager
def bounded() -> Generator[None, None, None]:
    """Fail the example if what runs inside takes over ``SECONDS`` or ``HEAP_BYTES``."""
    tracemalloc.start()
    started = time.monotonic()
    try:
        yield
    finally:
        elapsed = time.monotonic() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert elapsed < SECONDS, f"took {elapsed:.2f} s"
        assert peak < HEAP_BYTES, f"allocated {peak} bytes"


def outcome(call: Callable[[], _T]) -> _T | MoEProtocolsError:
    """The result, or the typed error; any other exception fails the example."""
    with bounded():
        try:
            return call()
        except MoEProtocolsError as exc:
            return exc


# ------------------------------------------------------------------ placement files

json_values: SearchStrategy[object] = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=20,
)


def _document() -> dict[str, object]:
    return {
        "format": PLACEMENT_FORMAT,
        "version": 1,
        "num_logical_experts": 4,
        "num_ranks": 2,
        "num_nodes": 1,
        "physical_to_logical_map": [list(row) for row in MAP],
        "metadata": {"model": "tiny"},
    }


@st.composite
def malformed_documents(draw: DrawFn) -> str:
    """A valid placement document with fields replaced, removed, added, or nested deeply."""
    doc = _document()
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from([*doc.keys(), "extra"]))
        action = draw(st.sampled_from(["replace", "delete", "row", "id", "nest"]))
        if action == "replace":
            doc[key] = draw(json_values)
        elif action == "delete":
            doc.pop(key, None)
        elif action == "row":
            rows = doc.get("physical_to_logical_map")
            if isinstance(rows, list) and rows:
                rows[draw(st.integers(0, len(rows) - 1))] = draw(json_values)
        elif action == "id":
            rows = doc.get("physical_to_logical_map")
            if isinstance(rows, list) and rows and isinstance(rows[0], list) and rows[0]:
                rows[0][0] = draw(
                    st.integers(-(2**80), 2**80) | st.floats() | st.booleans() | st.none()
                )
        else:
            value: object = draw(json_values)
            for _ in range(draw(st.integers(1, 40))):
                value = [value]
            doc[key] = value
    return json.dumps(doc)


@st.composite
def corrupted_bytes(draw: DrawFn, data: bytes) -> bytes:
    """``data`` truncated, grown, or with some bytes overwritten."""
    action = draw(st.sampled_from(["truncate", "flip", "append", "header"]))
    if action == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    if action == "append":
        return data + draw(st.binary(min_size=1, max_size=64))
    if action == "header":
        return struct.pack("<Q", draw(st.integers(0, 2**64 - 1))) + data[8:]
    mutable = bytearray(data)
    for _ in range(draw(st.integers(1, 8))):
        mutable[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(mutable)


def _valid_file(suffix: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"p{suffix}"
        save_placement(Placement(torch.tensor(MAP), num_logical_experts=4, num_ranks=2), path)
        return path.read_bytes()


VALID_JSON = _valid_file(".json")
VALID_SAFETENSORS = _valid_file(".safetensors")


def _check_loaded(result: Placement | MoEProtocolsError, path: Path) -> None:
    if isinstance(result, MoEProtocolsError):
        assert getattr(result, "path", None) == str(path)
        assert str(path) in str(result)
    else:  # the mutation happened to keep a valid placement
        assert result.num_layers >= 1
        assert result.num_physical_experts % result.num_ranks == 0


@FUZZ
@given(text=malformed_documents())
def test_malformed_json_placements_are_typed_errors(tmp_path: Path, text: str) -> None:
    path = tmp_path / "placement.json"
    path.write_text(text)
    _check_loaded(outcome(lambda: load_placement(path, max_bytes=FILE_BYTES)), path)


@FUZZ
@given(data=st.one_of(corrupted_bytes(VALID_JSON), st.binary(max_size=256)))
def test_corrupted_json_bytes_are_typed_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "placement.json"
    path.write_bytes(data)
    _check_loaded(outcome(lambda: load_placement(path, max_bytes=FILE_BYTES)), path)


@FUZZ
@given(data=corrupted_bytes(VALID_SAFETENSORS))
def test_corrupted_safetensors_are_typed_errors(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "placement.safetensors"
    path.write_bytes(data)
    _check_loaded(outcome(lambda: load_placement(path, max_bytes=FILE_BYTES)), path)


@FUZZ
@given(layers=st.integers(1, 200), slots=st.integers(1, 1000), depth=st.integers(0, 3000))
def test_oversized_maps_and_deep_nesting_are_refused_before_they_are_built(
    tmp_path: Path, layers: int, slots: int, depth: int
) -> None:
    doc = _document()
    doc["physical_to_logical_map"] = [[0] * slots] * layers
    del doc["metadata"]
    nested = "[" * depth + "]" * depth if depth else '{"note": "x"}'
    path = tmp_path / "placement.json"
    path.write_text(json.dumps(doc)[:-1] + f', "metadata": {nested}}}')
    assume(path.stat().st_size <= 4 * FILE_BYTES)
    result = outcome(lambda: load_placement(path, max_bytes=4 * FILE_BYTES))
    assert isinstance(result, MoEProtocolsError)  # ids 0 only: never a valid placement


# ------------------------------------------------------------------ policies

counts = st.one_of(
    st.sampled_from([1, 1, 2, 4, 8, 12, 16]),  # often valid, so planning runs too
    st.integers(-3, 40),
    st.sampled_from([2**31, 2**62, 2**100, True, False]),
    st.floats(allow_nan=True),
    st.none(),
    st.text(max_size=3),
)
loads = st.one_of(
    st.floats(min_value=0, max_value=1e6),
    st.sampled_from(
        [0.0, 1e299 / 16, 1e300, 1e308, float("inf"), float("-inf"), float("nan"), -1.0]
    ),
)


@st.composite
def load_tensors(draw: DrawFn) -> object:
    layers, experts = draw(st.integers(0, 4)), draw(st.integers(0, 12))
    values = draw(st.lists(loads, min_size=layers * experts, max_size=layers * experts))
    dtype = draw(st.sampled_from([torch.float64, torch.float32, torch.float16, torch.bool]))
    shape = draw(st.sampled_from([(layers, experts), (layers * experts,), (1, layers, experts)]))
    tensor = torch.tensor(values, dtype=torch.float64).reshape(shape)
    return tensor.to(dtype) if draw(st.booleans()) else draw(st.sampled_from([tensor, values]))


@FUZZ
@given(
    policy=st.sampled_from(["deepseek", "migration_aware"]),
    weight=load_tensors(),
    replicas=counts,
    groups=counts,
    nodes=counts,
    ranks=counts,
)
def test_policies_refuse_bad_loads_and_counts_with_a_policy_error(
    policy: str, weight: object, replicas: object, groups: object, nodes: object, ranks: object
) -> None:
    chosen = DEFAULT_POLICIES.get(policy)
    before = weight.clone() if isinstance(weight, torch.Tensor) else None
    result = outcome(
        lambda: chosen.rebalance_experts(weight, replicas, groups, nodes, ranks)  # type: ignore[arg-type]  # anything goes
    )
    if isinstance(weight, torch.Tensor):
        assert before is not None
        assert torch.equal(weight.nan_to_num(), before.nan_to_num())  # inputs never modified
    event("planned" if isinstance(result, torch.Tensor) else type(result).__name__)
    if isinstance(result, torch.Tensor):  # the inputs were valid: the output must be too
        assert isinstance(weight, torch.Tensor)
        assert isinstance(replicas, int)
        assert isinstance(ranks, int)
        assert math.isfinite(float(weight.double().sum()))
        check_policy_output(policy, result, weight.double(), replicas, ranks)


@FUZZ
@given(
    policy=st.sampled_from(["deepseek", "migration_aware"]),
    values=st.lists(
        st.one_of(
            st.floats(min_value=0, max_value=1e6),
            st.sampled_from([0.0, 5e-324, 1e250, 1e299 / 8]),
        ),
        min_size=16,
        max_size=16,
    ),
    bad=st.none() | st.tuples(st.integers(0, 15), st.sampled_from([1e300, 1e308, math.nan])),
    replicas=st.sampled_from([8, 12, 16]),
    groups=st.sampled_from([1, 2, 4, 3]),
    nodes=st.sampled_from([1, 2]),
    ranks=st.sampled_from([2, 4]),
)
def test_policies_plan_a_valid_placement_or_refuse_for_any_load(
    policy: str,
    values: list[float],
    bad: tuple[int, float] | None,
    replicas: int,
    groups: int,
    nodes: int,
    ranks: int,
) -> None:
    """Counts that fit, loads anywhere from 0 to 1e308: a valid placement or a PolicyError."""
    weight = torch.tensor(values, dtype=torch.float64).view(2, 8)
    if bad is not None:
        weight.view(-1)[bad[0]] = bad[1]
    result = outcome(
        lambda: DEFAULT_POLICIES.get(policy).rebalance_experts(
            weight, replicas, groups, nodes, ranks
        )
    )
    event("planned" if isinstance(result, torch.Tensor) else type(result).__name__)
    if isinstance(result, torch.Tensor):
        check_policy_output(policy, result, weight, replicas, ranks)


@FUZZ
@given(
    window=counts,
    interval=counts,
    redundant=counts,
    flag=st.one_of(st.booleans(), st.integers(0, 1), st.none()),
    policy=st.one_of(st.sampled_from(["deepseek", "", "  ", "nope"]), st.integers(), st.none()),
)
def test_configs_out_of_range_are_config_errors(
    window: object, interval: object, redundant: object, flag: object, policy: object
) -> None:
    def build() -> EplbState:
        config = EplbConfig(
            window_size=window,  # type: ignore[arg-type]  # anything goes
            step_interval=interval,  # type: ignore[arg-type]  # anything goes
            num_redundant_experts=redundant,  # type: ignore[arg-type]  # anything goes
            log_balancedness=flag,  # type: ignore[arg-type]  # anything goes
            policy=policy,  # type: ignore[arg-type]  # anything goes
        )
        return EplbState(config)

    result = outcome(build)
    if isinstance(result, EplbState):
        assert 1 <= result.config.window_size <= limits.MAX_WINDOW_SIZE


# ------------------------------------------------------------------ live state


def registered() -> tuple[EplbState, AuthorMoELM]:
    lm = AuthorMoELM(layers=2, num_experts=8, num_redundant=4, hidden=4)
    state = EplbState(CONFIG, num_ranks=4)
    state.add_model(lm)
    state.model_state().expert_load_pass.fill_(3)
    state.step()  # something in the window to keep
    return state, lm


@st.composite
def bad_maps(draw: DrawFn) -> object:
    """Placements for the registered model (2 layers, 8 experts, 12 slots) that are wrong."""
    layers = draw(st.sampled_from([2, 2, 2, 0, 1, 3, 70]))
    slots = draw(st.sampled_from([12, 12, 12, 0, 8, 11, 16, 600]))
    ids = st.one_of(st.integers(0, 7), st.sampled_from([-1, 8, 2**40, -(2**62)]))
    if layers * slots <= 64:
        flat = draw(st.lists(ids, min_size=layers * slots, max_size=layers * slots))
        tensor = torch.tensor(flat, dtype=torch.int64).reshape(layers, slots)
    else:  # too big to draw id by id: one id everywhere (never a valid placement)
        tensor = torch.full((layers, slots), draw(ids), dtype=torch.int64)
    dtype = draw(st.sampled_from([torch.int64, torch.int32, torch.float32, torch.bool]))
    tensor = tensor.to(dtype)
    kind = draw(st.sampled_from(["tensor", "placement", "list", "none"]))
    if kind == "list":
        return tensor.tolist()
    if kind == "none":
        return None
    if kind == "placement":
        experts = draw(st.sampled_from([8, 8, 4, 9]))
        ranks = draw(st.sampled_from([4, 4, 2, 1]))
        try:
            return Placement(tensor, num_logical_experts=experts, num_ranks=ranks)
        except MoEProtocolsError:
            return tensor
    return tensor


@FUZZ
@given(new_map=bad_maps())
def test_a_refused_update_mapping_changes_no_byte_of_the_state(new_map: object) -> None:
    state, lm = registered()
    before, wiring = state_snapshot(state), wiring_snapshot(lm)
    result = outcome(lambda: state.update_mapping("model", new_map))  # type: ignore[arg-type]  # anything goes
    if isinstance(result, MoEProtocolsError):
        assert state_snapshot(state) == before
        assert wiring_snapshot(lm) == wiring


@st.composite
def broken_counts(draw: DrawFn) -> dict[str, object]:
    names = [
        "num_moe_layers",
        "num_logical_experts",
        "num_physical_experts",
        "num_local_physical_experts",
        "num_routed_experts",
        "num_redundant_experts",
        "num_expert_groups",
    ]
    values = st.one_of(st.integers(-2, 20), st.sampled_from([2**40, 2**100, True, 1.5, "8"]))
    chosen = draw(st.lists(st.sampled_from(names), min_size=1, max_size=3, unique=True))
    return {name: draw(values) for name in chosen}


@FUZZ
@given(changes=broken_counts(), independent=st.booleans())
def test_a_refused_add_model_changes_no_byte_of_the_state_or_the_model(
    changes: dict[str, object], independent: bool
) -> None:
    state, registered_lm = registered()
    other = AuthorMoELM(
        layers=2, num_experts=8, num_redundant=4, hidden=4, independent_replicas=(1,) * independent
    )
    for name, value in changes.items():
        setattr(other, name, value)
    before, wiring = state_snapshot(state), wiring_snapshot(other)
    result = outcome(lambda: state.add_model(other, "draft"))
    if isinstance(result, MoEProtocolsError):
        assert state_snapshot(state) == before
        assert wiring_snapshot(other) == wiring
        assert state.model_names == ("model",)
    else:  # the changes kept a consistent model: it registered next to the first
        assert state.model_names == ("model", "draft")
    assert registered_lm.blocks[0].l2p is not None


@FUZZ
@given(rows=st.lists(st.sampled_from([-1, -(2**31), 0, 5, 2**31 - 1]), min_size=24, max_size=24))
def test_a_rearrangement_refused_for_bad_load_changes_no_byte(rows: list[int]) -> None:
    state, lm = registered()
    assume(min(rows) < -3)  # negative even with the 3 per slot already in the window
    state.model_state().expert_load_pass.copy_(torch.tensor(rows, dtype=torch.int32).view(2, 12))
    state.step()  # into the window the rearrangement reads
    before, wiring = state_snapshot(state), wiring_snapshot(lm)
    result = outcome(state.rearrange)
    assert isinstance(result, MoEProtocolsError)
    assert state_snapshot(state) == before
    assert wiring_snapshot(lm) == wiring


class _Refilling(AuthorMoELM):
    """An author model whose ``set_eplb_state`` refills ``expert_weights`` with what it is told."""

    def __init__(self, refill: list[list[object]]) -> None:
        super().__init__(layers=2, num_experts=8, num_redundant=4, hidden=4)
        self.refill = refill

    def set_eplb_state(
        self,
        expert_load_view: torch.Tensor,
        logical_to_physical_map: torch.Tensor,
        logical_replica_count: torch.Tensor,
    ) -> None:
        super().set_eplb_state(expert_load_view, logical_to_physical_map, logical_replica_count)
        self.expert_weights = self.refill  # type: ignore[assignment]  # hostile on purpose


@st.composite
def hostile_weights(draw: DrawFn, lm: AuthorMoELM) -> list[list[object]]:
    """What a buggy ``set_eplb_state`` might leave in ``expert_weights``: always something wrong."""
    good: list[list[object]] = [list(layer) for layer in lm.expert_weights]
    layer = draw(st.integers(0, len(good) - 1))
    weight = good[layer][0]
    assert isinstance(weight, torch.Tensor)
    bad = draw(
        st.sampled_from(
            [
                "list",
                "scalar",
                "dim0",
                "expanded",
                "shared",
                "empty",
                "too_many",
                "fewer_layers",
                "more_layers",
            ]
        )
    )
    if bad == "list":
        good[layer][0] = weight.tolist()
    elif bad == "scalar":
        good[layer][0] = torch.tensor(1.0)
    elif bad == "dim0":
        good[layer][0] = weight[:-1]
    elif bad == "expanded":
        good[layer][0] = weight[:1].expand_as(weight)
    elif bad == "shared":
        good[layer] = [weight, weight]
    elif bad == "empty":
        good[layer] = []
    elif bad == "too_many":
        columns: list[object] = [weight[:, i : i + 1] for i in range(weight.shape[1])]
        good[layer] = columns * 65
    elif bad == "fewer_layers":
        del good[layer]
    else:
        good.append(good[layer])
    return good


@FUZZ
@given(data=st.data())
def test_a_set_eplb_state_that_leaves_bad_weights_is_undone(data: st.DataObject) -> None:
    state, registered_lm = registered()
    lm = _Refilling([])
    lm.refill = data.draw(hostile_weights(lm))
    before, wiring = state_snapshot(state), wiring_snapshot(lm)
    result = outcome(lambda: state.add_model(lm, "draft"))
    assert isinstance(result, MoEProtocolsError)
    assert state_snapshot(state) == before
    assert wiring_snapshot(lm) == wiring  # expert_weights and every layer's views put back
    assert all(layer.l2p is None for layer in lm.blocks)
    assert registered_lm.blocks[0].l2p is not None


leaves: SearchStrategy[object] = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=4),
    st.builds(torch.zeros, st.sampled_from([(), (12,), (12, 2), (3, 2), (0,)])),
)
structures: SearchStrategy[object] = st.recursive(
    leaves,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=3), inner, max_size=2)
    ),
    max_leaves=12,
)


@FUZZ
@given(weights=structures, layers=structures, count=st.one_of(leaves, st.sampled_from([2, 2**62])))
def test_conformance_of_generated_members_never_raises_and_registration_is_typed(
    weights: object, layers: object, count: object
) -> None:
    lm = AuthorMoELM(layers=2, num_experts=8, num_redundant=4, hidden=4)
    lm.expert_weights = weights  # type: ignore[assignment]  # anything goes
    lm.moe_layers = layers  # type: ignore[assignment]  # anything goes
    lm.num_moe_layers = count  # type: ignore[assignment]  # anything goes
    with bounded():
        report = check_conformance(lm)
    assert not report.is_moe  # no generated layer is a MoELayer (an empty model is dense)
    state = EplbState(CONFIG, num_ranks=4)
    assert isinstance(outcome(lambda: state.add_model(lm)), MoEProtocolsError)
    assert state.model_names == ()
