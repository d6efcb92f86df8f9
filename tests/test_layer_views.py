"""layer_eplb_rows: a MoE layer keeps views of its rows, or learns at once what does not fit."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import Tensor

from moe_protocols import EplbStateError, MappingError, layer_eplb_rows


def _tensors(layers: int = 3, logical: int = 4, physical: int = 6) -> tuple[torch.Tensor, ...]:
    load = torch.zeros(layers, physical, dtype=torch.int32)
    l2p = torch.full((layers, logical, physical - logical + 1), -1, dtype=torch.int64)
    count = torch.ones(layers, logical, dtype=torch.int64)
    return load, l2p, count


def test_rows_are_views_of_the_live_tensors() -> None:
    load, l2p, count = _tensors()
    rows = layer_eplb_rows("layer 1", 1, load, l2p, count, num_logical=4, num_physical=6)
    load[1, 2] = 7
    l2p[1, 0, 0] = 5
    count[1, 3] = 2
    assert int(rows.expert_load[2]) == 7
    assert int(rows.logical_to_physical[0, 0]) == 5
    assert int(rows.replica_count[3]) == 2
    rows.expert_load.add_(1)  # what a layer does when it records
    assert int(load[1].sum()) == 7 + 6
    assert int(load[0].sum()) == 0


@pytest.mark.parametrize(
    ("change", "error", "fragment"),
    [
        (lambda t: (torch.zeros(3, 5), t[1], t[2]), EplbStateError, "[moe_layers, 6]"),
        (lambda t: ([[0] * 6] * 3, t[1], t[2]), EplbStateError, "got list"),
        (lambda t: (t[0].to(torch.bool), t[1], t[2]), EplbStateError, "int32/int64"),
        (lambda t: (t[0], t[1][:, :3], t[2]), MappingError, "logical_to_physical_map"),
        (lambda t: (t[0], t[1][:, :, :0], t[2]), MappingError, "max_replicas >= 1"),
        (lambda t: (t[0], t[1].float(), t[2]), MappingError, "int16/32/64"),
        (lambda t: (t[0], t[1], t[2][:, :2]), MappingError, "logical_replica_count"),
        (lambda t: (t[0], t[1][:1], t[2]), MappingError, "outside the maps' 1 layers"),
    ],
)
def test_misfits_are_named(
    change: Callable[[tuple[Tensor, ...]], tuple[Any, Any, Any]],
    error: type[Exception],
    fragment: str,
) -> None:
    load, l2p, count = change(_tensors())
    with pytest.raises(error) as info:
        layer_eplb_rows("layer 2", 2, load, l2p, count, num_logical=4, num_physical=6)
    assert fragment in str(info.value)
    assert str(info.value).startswith("layer 2:")


@pytest.mark.parametrize("index", [-1, 3, True, 1.0])
def test_layer_index_outside_the_load_rows_is_refused(index: object) -> None:
    load, l2p, count = _tensors()
    with pytest.raises(EplbStateError, match="moe_layer_idx"):
        layer_eplb_rows("layer", index, load, l2p, count, num_logical=4, num_physical=6)  # type: ignore[arg-type]  # deliberately not an int
