"""Benchmark the building blocks: what EPLB adds to the forward of an author's MoE layer.

Run: ``.venv/bin/python benchmarks/bench_building.py`` (``--quick`` for a smoke run).

The layer is the MoE feed-forward of ``examples/own_moe_vlm.py`` (8 experts,
top-2, hidden 64, intermediate 96, 2 redundant slots), timed on one CPU
thread, medians of interleaved runs, in thread CPU time:

* **EPLB**: the example's layer registered with an ``EplbState``: router,
  ``route_to_physical`` (replica maps + load recording) and the grouped
  SwiGLU over the 10 slots (replicas on one rank computed as one group, see
  ``StackedExperts.compute_slots``);
* **no EPLB**: the same router and the same grouped SwiGLU on the same 10
  slots, fed the logical ids directly (slot e holds expert e): the same layer
  routing without EPLB. The ratio EPLB / no EPLB is the goal figure (<= 1.05);
* the same without the 2 redundant slots (8 groups): what replicas cost on
  one CPU, where they cannot balance anything;
* the parts of the EPLB forward timed alone (router, routing, experts), to
  say what dominates, and the plain ``nn.ModuleList`` loop of the
  un-adapted example for reference.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from moe_protocols.building import route_to_physical, swiglu_experts
from moe_protocols.eplb import EplbConfig, EplbState

if TYPE_CHECKING:
    from collections.abc import Callable
    from types import ModuleType

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "own_moe_vlm.py"


def load_example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("own_moe_vlm", EXAMPLE)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {EXAMPLE}")
    module = importlib.util.module_from_spec(spec)
    sys.modules["own_moe_vlm"] = module
    spec.loader.exec_module(module)
    return module


def interleaved_times(
    runs: dict[str, Callable[[], object]], rounds: int, per_round: int
) -> tuple[dict[str, float], dict[str, float]]:
    """Median and minimum seconds per call of each run, alternating the runs so that drift
    hits all alike. The minimum is the least disturbed by other processes.

    Thread CPU time, not wall time: torch runs on this one thread, and on a
    shared machine the wall clock also counts the time other processes hold
    the core, which swamps microsecond differences.
    """
    for run in runs.values():
        run()
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            start = time.thread_time()
            for _ in range(per_round):
                run()
            samples[name].append((time.thread_time() - start) / per_round)
    return (
        {name: statistics.median(values) for name, values in samples.items()},
        {name: min(values) for name, values in samples.items()},
    )


class LogicalRouting(nn.Module):
    """The example's layer routing without EPLB: logical ids straight into the slots.

    Same router, same grouped SwiGLU on the same weights (slot e holds expert
    e under the initial placement); no maps, no load recording.
    """

    def __init__(self, router: nn.Module, top_k: int, weights: tuple[Tensor, ...]) -> None:
        super().__init__()
        self.router, self.top_k, self.weights = router, top_k, weights

    def forward(self, hidden: Tensor) -> Tensor:
        scores: Tensor = self.router(hidden)
        weights, ids = scores.softmax(dim=-1).topk(self.top_k, dim=-1)
        weights = weights / weights.sum(dim=-1, keepdim=True)
        return swiglu_experts(hidden, ids, weights, *self.weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="few rounds (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds, per_round = (5, 5) if args.quick else (41, 20)
    example = load_example()

    model = example.build(num_redundant_experts=2)
    plain = example.build(num_redundant_experts=None)
    state = EplbState(EplbConfig(num_redundant_experts=2))
    state.add_model(model.language_model)  # the layers now record into live views
    layer = model.language_model.layers[0].moe
    plain_layer = plain.language_model.layers[0].moe
    experts = layer.experts
    gate, up, down = (experts.stacked(n) for n in ("gate_proj", "up_proj", "down_proj"))
    logical = example.NUM_EXPERTS
    baseline = LogicalRouting(layer.router, example.TOP_K, (gate, up, down))
    unreplicated = LogicalRouting(
        layer.router, example.TOP_K, (gate[:logical], up[:logical], down[:logical])
    )

    print(
        f"Building-blocks benchmark (torch {torch.__version__}, 1 thread, thread CPU time, "
        f"medians of {rounds} interleaved rounds x {per_round} calls)"
    )
    print(
        f"layer: {logical} experts top-{example.TOP_K} in {experts.num_physical_experts} slots, "
        f"hidden {example.HIDDEN}, intermediate {example.INTERMEDIATE}"
    )
    for tokens in (64, 512, 4096):
        hidden = torch.randn(tokens, example.HIDDEN, generator=torch.Generator().manual_seed(0))
        weights, ids = layer.router(hidden).softmax(dim=-1).topk(example.TOP_K, dim=-1)
        live = state.model_state()  # the rows EPLB handed the layer
        l2p, count = live.logical_to_physical_map[0], live.logical_replica_count[0]
        load = live.expert_load_pass[0]

        def without_eplb(hidden: Tensor = hidden) -> Tensor:
            out: Tensor = baseline(hidden)
            return out

        def without_replicas(hidden: Tensor = hidden) -> Tensor:
            out: Tensor = unreplicated(hidden)
            return out

        def with_eplb(hidden: Tensor = hidden) -> Tensor:
            out: Tensor = layer(hidden)
            return out

        def router_only(hidden: Tensor = hidden) -> Tensor:
            scores: Tensor = layer.router(hidden)
            w = scores.softmax(dim=-1).topk(example.TOP_K, dim=-1).values
            return w / w.sum(dim=-1, keepdim=True)

        def routing_only(
            ids: Tensor = ids, l2p: Tensor = l2p, count: Tensor = count, load: Tensor = load
        ) -> Tensor:
            return route_to_physical(ids, l2p, count, load)

        def experts_only(
            hidden: Tensor = hidden, ids: Tensor = ids, weights: Tensor = weights
        ) -> Tensor:
            return swiglu_experts(hidden, ids, weights, gate, up, down)

        def plain_loop(hidden: Tensor = hidden) -> Tensor:
            out: Tensor = plain_layer(hidden)
            return out

        with torch.no_grad():
            medians, minima = interleaved_times(
                {
                    "eplb": with_eplb,
                    "no_eplb": without_eplb,
                    "no_replicas": without_replicas,
                    "router": router_only,
                    "routing": routing_only,
                    "experts": experts_only,
                    "plain": plain_loop,
                },
                rounds,
                per_round,
            )
        state.step()  # empty the pass the runs filled
        us = {name: seconds * 1e6 for name, seconds in medians.items()}
        ratio = medians["eplb"] / medians["no_eplb"]
        best_ratio = minima["eplb"] / minima["no_eplb"]
        total = us["router"] + us["routing"] + us["experts"]
        print(f"\n{tokens} tokens:")
        print(
            f"  forward with EPLB {us['eplb']:9.1f} us | without EPLB {us['no_eplb']:9.1f} us "
            f"| ratio {ratio:.3f} (of minima {best_ratio:.3f}; goal <= 1.05)"
        )
        print(
            f"  the same layer without its 2 redundant slots (8 groups, no EPLB): "
            f"{us['no_replicas']:.1f} us (EPLB forward / this = "
            f"{medians['eplb'] / medians['no_replicas']:.3f})"
        )
        print(
            f"  parts: router {us['router']:.1f} us ({us['router'] / total:.0%}), "
            f"route_to_physical {us['routing']:.1f} us ({us['routing'] / total:.0%}), "
            f"grouped SwiGLU {us['experts']:.1f} us ({us['experts'] / total:.0%})"
        )
        print(
            f"  plain nn.ModuleList loop (the un-adapted example): {us['plain']:.1f} us "
            f"({medians['plain'] / medians['eplb']:.2f}x the EPLB forward)"
        )


if __name__ == "__main__":
    main()
