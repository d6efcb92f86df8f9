"""Placement files: JSON and safetensors round trips, and every malformed file rejected clearly."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file
from strategies import placement_maps

from moe_protocols.eplb import (
    PLACEMENT_FORMAT,
    Placement,
    compute_logical_maps,
    load_placement,
    max_replicas,
    save_placement,
)
from moe_protocols.errors import MappingError

MAP = [[0, 1, 2, 3, 0, 3], [3, 2, 1, 0, 1, 1]]  # 2 layers, 4 experts, 6 slots over 2 ranks


def placement() -> Placement:
    return Placement(
        physical_to_logical_map=torch.tensor(MAP),
        num_logical_experts=4,
        num_ranks=2,
        num_nodes=1,
        metadata={"model_name": "tiny", "policy": "deepseek"},
    )


def document(**changes: object) -> dict[str, object]:
    doc: dict[str, object] = {
        "format": PLACEMENT_FORMAT,
        "version": 1,
        "num_logical_experts": 4,
        "num_ranks": 2,
        "num_nodes": 1,
        "physical_to_logical_map": MAP,
        "metadata": {"model_name": "tiny"},
    }
    doc.update(changes)
    return doc


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".json", ".safetensors"])
def test_placement_round_trips_through_a_file(tmp_path: Path, suffix: str) -> None:
    path = tmp_path / f"placement{suffix}"
    save_placement(placement(), path)
    loaded = load_placement(path)
    assert loaded == placement()
    assert loaded.physical_to_logical_map.dtype == torch.int64
    assert dict(loaded.metadata) == {"model_name": "tiny", "policy": "deepseek"}


def test_json_file_has_the_documented_layout(tmp_path: Path) -> None:
    path = tmp_path / "placement.json"
    save_placement(placement(), path)
    assert json.loads(path.read_text()) == {
        "format": "moe-protocols.placement",
        "version": 1,
        "num_logical_experts": 4,
        "num_ranks": 2,
        "num_nodes": 1,
        "physical_to_logical_map": MAP,
        "metadata": {"model_name": "tiny", "policy": "deepseek"},
    }


def test_json_without_metadata_loads_with_empty_metadata(tmp_path: Path) -> None:
    doc = document()
    del doc["metadata"]
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    assert dict(load_placement(path).metadata) == {}


def test_saving_replaces_an_existing_file_and_leaves_no_temporary_files(tmp_path: Path) -> None:
    path = tmp_path / "p.safetensors"
    path.write_bytes(b"old contents")
    save_placement(placement(), path)
    assert load_placement(path) == placement()
    assert [p.name for p in tmp_path.iterdir()] == ["p.safetensors"]


def test_placement_copies_the_map_so_later_writes_do_not_leak_in() -> None:
    live = torch.tensor(MAP, dtype=torch.int32)
    saved = Placement(physical_to_logical_map=live, num_logical_experts=4, num_ranks=2)
    live[0, 0] = 3
    assert saved.physical_to_logical_map[0, 0] == 0
    assert saved.physical_to_logical_map.dtype == torch.int64


# --------------------------------------------------------------------------- malformed files

BAD_JSON_DOCUMENTS: dict[str, tuple[object, str]] = {
    "top level is a list": ([1, 2], "top level must be a JSON object"),
    "unknown format": (document(format="vllm.placement"), "field 'format'"),
    "unknown version": (document(version=2), "field 'version'"),
    "version as string": (document(version="1"), "field 'version'"),
    "version as bool": (document(version=True), "field 'version'"),
    "missing map": (
        {k: v for k, v in document().items() if k != "physical_to_logical_map"},
        "missing field",
    ),
    "unknown field": (document(extra=1), "unknown field"),
    "float count": (document(num_logical_experts=4.0), "'num_logical_experts' must be an integer"),
    "bool count": (document(num_ranks=True), "'num_ranks' must be an integer"),
    "wrong num_logical": (document(num_logical_experts=3), "not a logical expert id in \\[0, 3\\)"),
    "map is not a list": (document(physical_to_logical_map="0,1,2"), "list of rows"),
    "empty map": (document(physical_to_logical_map=[]), "list of rows"),
    "non-list row": (document(physical_to_logical_map=[MAP[0], 5]), "row 1 must be a list"),
    "ragged rows": (document(physical_to_logical_map=[MAP[0], MAP[1][:4]]), "ragged"),
    "float id": (
        document(physical_to_logical_map=[MAP[0], [3, 2, 1, 0, 1, 1.0]]),
        "slot 5 must be an integer",
    ),
    "bool id": (
        document(physical_to_logical_map=[[True, *MAP[0][1:]], MAP[1]]),
        "slot 0 must be an integer",
    ),
    "string id": (
        document(physical_to_logical_map=[["0", *MAP[0][1:]], MAP[1]]),
        "slot 0 must be an integer",
    ),
    "id out of range": (
        document(physical_to_logical_map=[MAP[0], [3, 2, 1, 0, 1, 4]]),
        "layer 1, slot 5 holds 4",
    ),
    "negative id": (
        document(physical_to_logical_map=[[-1, *MAP[0][1:]], MAP[1]]),
        "layer 0, slot 0 holds -1",
    ),
    "missing expert": (
        document(physical_to_logical_map=[MAP[0], [3, 2, 1, 1, 1, 1]]),
        "expert 0 has no replica",
    ),
    "slots not divisible by ranks": (document(num_ranks=4), "do not split evenly over 4 EP ranks"),
    "nodes do not divide ranks": (document(num_nodes=3), "num_nodes"),
    "metadata not strings": (
        document(metadata={"k": 1}),
        "'metadata' must be an object of strings",
    ),
    "huge id": (document(physical_to_logical_map=[MAP[0], [3, 2, 1, 0, 1, 2**70]]), "out of range"),
}


@pytest.mark.parametrize("case", sorted(BAD_JSON_DOCUMENTS))
def test_malformed_json_placement_is_rejected_naming_file_and_field(
    tmp_path: Path, case: str
) -> None:
    content, message = BAD_JSON_DOCUMENTS[case]
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(content))
    with pytest.raises(MappingError, match=message) as info:
        load_placement(path)
    assert "bad.json" in str(info.value)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"format": "moe-protocols.placement", "version": 1, "num_lo', "not valid JSON"),
        ("", "not valid JSON"),
        (json.dumps(document()).replace('"metadata": {', '"metadata": {"x": NaN, '), "NaN"),
    ],
)
def test_unparseable_json_is_rejected(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text(text)
    with pytest.raises(MappingError, match=message):
        load_placement(path)


def _write_safetensors(path: Path, tensors: dict[str, torch.Tensor], **metadata: str) -> None:
    header = {
        "format": PLACEMENT_FORMAT,
        "version": "1",
        "num_logical_experts": "4",
        "num_ranks": "2",
        "num_nodes": "1",
        "metadata": "{}",
    }
    header.update(metadata)
    save_file(tensors, str(path), metadata={k: v for k, v in header.items() if v != "<drop>"})


GOOD_TENSORS = {"physical_to_logical_map": torch.tensor(MAP)}
BAD_SAFETENSORS: dict[str, tuple[dict[str, torch.Tensor], dict[str, str], str]] = {
    "float map": (
        {"physical_to_logical_map": torch.tensor(MAP, dtype=torch.float32)},
        {},
        "integer dtype",
    ),
    "bool map": (
        {"physical_to_logical_map": torch.ones(2, 6, dtype=torch.bool)},
        {},
        "integer dtype",
    ),
    "1-D map": ({"physical_to_logical_map": torch.tensor(MAP[0])}, {}, "2 dimensions"),
    "extra tensor": ({**GOOD_TENSORS, "other": torch.zeros(1)}, {}, "exactly one tensor"),
    "wrong tensor name": ({"p2l": torch.tensor(MAP)}, {}, "exactly one tensor"),
    "missing header field": (GOOD_TENSORS, {"num_ranks": "<drop>"}, "missing metadata field"),
    "unknown header field": (GOOD_TENSORS, {"owner": "me"}, "unknown metadata field"),
    "unknown format": (GOOD_TENSORS, {"format": "pickle"}, "field 'format'"),
    "unknown version": (GOOD_TENSORS, {"version": "2"}, "field 'version'"),
    "non-decimal count": (GOOD_TENSORS, {"num_logical_experts": "four"}, "decimal integer"),
    "negative count": (GOOD_TENSORS, {"num_ranks": "-2"}, "decimal integer"),
    "wrong num_logical": (GOOD_TENSORS, {"num_logical_experts": "5"}, "expert 4 has no replica"),
    "bad metadata json": (GOOD_TENSORS, {"metadata": "{oops"}, "not JSON"),
}


@pytest.mark.parametrize("case", sorted(BAD_SAFETENSORS))
def test_malformed_safetensors_placement_is_rejected(tmp_path: Path, case: str) -> None:
    tensors, header, message = BAD_SAFETENSORS[case]
    path = tmp_path / "bad.safetensors"
    _write_safetensors(path, tensors, **header)
    with pytest.raises(MappingError, match=message) as info:
        load_placement(path)
    assert "bad.safetensors" in str(info.value)


def test_corrupt_safetensors_bytes_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.safetensors"
    path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not a header")
    with pytest.raises(MappingError, match="cannot read placement file"):
        load_placement(path)


@pytest.mark.parametrize("name", ["placement.pt", "placement.pkl", "placement", "placement.yaml"])
def test_unknown_suffixes_are_rejected_for_saving_and_loading(tmp_path: Path, name: str) -> None:
    path = tmp_path / name
    with pytest.raises(MappingError, match="unknown suffix"):
        save_placement(placement(), path)
    assert not path.exists()
    path.write_text("{}")
    with pytest.raises(MappingError, match="unknown suffix"):
        load_placement(path)


def test_missing_file_is_a_mapping_error(tmp_path: Path) -> None:
    with pytest.raises(MappingError, match=r"nowhere\.json"):
        load_placement(tmp_path / "nowhere.json")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"physical_to_logical_map": torch.tensor(MAP, dtype=torch.float64)}, "integer dtype"),
        ({"physical_to_logical_map": torch.tensor(MAP).bool()}, "integer dtype"),
        ({"physical_to_logical_map": MAP}, "expected a torch.Tensor"),
        ({"num_logical_experts": 0}, "num_logical_experts must be an int >= 1"),
        ({"num_ranks": True}, "num_ranks must be an int >= 1"),
        ({"num_nodes": 4}, "num_nodes=4 must divide num_ranks=2"),
        ({"metadata": {"k": 3}}, "metadata must map str to str"),
        ({"metadata": ["k"]}, "metadata must be a mapping"),
    ],
)
def test_invalid_placement_values_are_rejected(kwargs: dict[str, object], message: str) -> None:
    fields: dict[str, object] = {
        "physical_to_logical_map": torch.tensor(MAP),
        "num_logical_experts": 4,
        "num_ranks": 2,
        "num_nodes": 1,
    }
    fields.update(kwargs)
    with pytest.raises(MappingError, match=message):
        Placement(**fields)  # type: ignore[arg-type]  # wrong types on purpose


# --------------------------------------------------------------------------- properties


@st.composite
def placements(draw: st.DrawFn) -> Placement:
    num_ranks = draw(st.integers(1, 4))
    slots_per_rank = draw(st.integers(1, 4))
    num_physical = num_ranks * slots_per_rank
    num_logical = draw(st.integers(1, num_physical))
    num_layers = draw(st.integers(1, 4))
    rows = draw(placement_maps(num_layers, num_logical, num_physical))
    divisors = [n for n in range(1, num_ranks + 1) if num_ranks % n == 0]
    return Placement(
        physical_to_logical_map=rows,
        num_logical_experts=num_logical,
        num_ranks=num_ranks,
        num_nodes=draw(st.sampled_from(divisors)),
        metadata=draw(st.dictionaries(st.text(max_size=5), st.text(max_size=5), max_size=2)),
    )


@settings(max_examples=40, deadline=None)
@given(placements(), st.sampled_from([".json", ".safetensors"]))
def test_any_valid_placement_round_trips(original: Placement, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / f"placement{suffix}"
        save_placement(original, path)
        assert load_placement(path) == original


@settings(max_examples=60, deadline=None)
@given(placements())
def test_logical_maps_of_any_valid_placement_invert_it(original: Placement) -> None:
    p2l = original.physical_to_logical_map
    num_logical = original.num_logical_experts
    replicas = max_replicas(num_logical, original.num_physical_experts)
    l2p, count = compute_logical_maps(p2l, num_logical, replicas)
    assert l2p.shape == (original.num_layers, num_logical, replicas)
    for layer in range(original.num_layers):
        for expert in range(num_logical):
            slots = (p2l[layer] == expert).nonzero().flatten().tolist()
            assert int(count[layer, expert]) == len(slots) >= 1
            assert l2p[layer, expert, : len(slots)].tolist() == slots
            assert bool((l2p[layer, expert, len(slots) :] == -1).all())
