# mypy must reject the marked lines (see tests/test_typing.py for the marker syntax).
from __future__ import annotations

from moe_protocols import MoEView


def misuse(view: MoEView) -> None:
    view.num_physical_experts = "288"  # E: assignment
    view.num_redundant_experts = 1.5  # E: assignment
    view.update_physical_experts_metadata(num_physical=288, num_local_physical_experts=9)  # E: call-arg
    view.root = object()  # E: misc
