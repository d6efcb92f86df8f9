"""Hypothesis strategies shared by several test modules."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


@st.composite
def placement_maps(
    draw: st.DrawFn, num_layers: int, num_logical: int, num_physical: int
) -> torch.Tensor:
    """A valid ``[num_layers, num_physical]`` map: each expert once, random replicas, shuffled."""
    rows = []
    for _ in range(num_layers):
        extra = draw(
            st.lists(
                st.integers(0, num_logical - 1),
                min_size=num_physical - num_logical,
                max_size=num_physical - num_logical,
            )
        )
        rows.append(draw(st.permutations(list(range(num_logical)) + extra)))
    return torch.tensor(rows, dtype=torch.int64)
