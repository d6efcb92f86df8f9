"""Benchmark MoEView: one-time resolution cost, and the cost of reading members through it.

Run: ``.venv/bin/python benchmarks/bench_view.py`` (add ``--quick`` for a fast smoke run).

Figures, each the median of repeated runs on one CPU thread:

1. ``MoEView.resolve`` on the tiny VLM (the LM one step down, via
   ``get_language_model()``) and on a depth-4 chain of ``nn.Module`` wrappers
   shaped like DDP (``.module``) -> torch.compile (``._orig_mod``) -> PEFT
   (``get_base_model()``) -> the VLM -> the LM, in microseconds. This is paid
   once, at load time; it includes a full conformance check of every
   candidate (3 MoE layers here).
2. Reading every ``MixtureOfExperts`` member (``expert_weights``, the eight
   counts, ``moe_layers`` and both bound methods) through the view against
   reading them directly on the language model, and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING

import torch
from torch import nn

from moe_protocols.adapters import MoEView
from moe_protocols.models import tiny_vlm

if TYPE_CHECKING:
    from collections.abc import Callable

    from moe_protocols.protocols import MixtureOfExperts


class DDPLike(nn.Module):
    """Holds the wrapped module as ``.module``, like DistributedDataParallel."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module


class CompiledLike(nn.Module):
    """Holds the original module as ``._orig_mod``, like torch.compile's OptimizedModule."""

    def __init__(self, orig_mod: nn.Module) -> None:
        super().__init__()
        self._orig_mod = orig_mod


class PeftLike(nn.Module):
    """Hands out its base model through ``get_base_model()``, like a PEFT model."""

    def __init__(self, base_model: nn.Module) -> None:
        super().__init__()
        self.base_model = base_model

    def get_base_model(self) -> nn.Module:
        return self.base_model


def median_seconds(run: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    """Median wall time of ``run()`` over ``repeats`` calls, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        run()
    samples: list[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples)


def read_all_members(model: MixtureOfExperts, times: int) -> Callable[[], object]:
    """A loop reading every protocol member of ``model`` ``times`` times."""

    def run() -> object:
        last: object = None
        for _ in range(times):
            last = (
                model.expert_weights,
                model.num_moe_layers,
                model.num_expert_groups,
                model.num_logical_experts,
                model.num_physical_experts,
                model.num_local_physical_experts,
                model.num_routed_experts,
                model.num_shared_experts,
                model.num_redundant_experts,
                model.moe_layers,
                model.set_eplb_state,
                model.update_physical_experts_metadata,
            )
        return last

    return run


def bench_resolve(root: nn.Module, expected_path: str, repeats: int) -> float:
    """Median seconds of one ``MoEView.resolve(root)``; checks where it resolves."""
    view = MoEView.resolve(root)
    if view is None or view.trace.resolved_path != expected_path:
        raise SystemExit(f"resolution went wrong: {view!r}, expected {expected_path}")
    return median_seconds(lambda: MoEView.resolve(root), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repeats (a smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    repeats = 7 if args.quick else 101
    reads = 200 if args.quick else 5_000

    vlm = tiny_vlm()
    depth1 = bench_resolve(vlm, "model.get_language_model()", repeats)
    chain = DDPLike(CompiledLike(PeftLike(tiny_vlm())))
    depth4_path = "model.module._orig_mod.get_base_model().get_language_model()"
    depth4 = bench_resolve(chain, depth4_path, repeats)

    view = MoEView.resolve(vlm)
    assert view is not None
    direct_runs: list[float] = []
    view_runs: list[float] = []
    # Interleave the two so that machine noise hits both alike.
    for _ in range(repeats):
        direct_runs.append(median_seconds(read_all_members(view.model, reads), 1, warmup=0))
        view_runs.append(median_seconds(read_all_members(view, reads), 1, warmup=0))
    direct = statistics.median(direct_runs) / reads
    through_view = statistics.median(view_runs) / reads

    rows = [
        ("resolve, depth 1: VLM -> get_language_model()", f"{depth1 * 1e6:9.1f} us"),
        (
            "resolve, depth 4: .module -> ._orig_mod -> get_base_model() -> get_language_model()",
            f"{depth4 * 1e6:9.1f} us",
        ),
        ("read all 12 protocol members, directly on the LM", f"{direct * 1e6:9.3f} us"),
        ("read all 12 protocol members, through MoEView", f"{through_view * 1e6:9.3f} us"),
        ("ratio through MoEView / direct", f"{through_view / direct:9.2f} x"),
    ]
    width = max(len(label) for label, _ in rows)
    print(f"MoEView benchmark (torch {torch.__version__}, 1 thread, medians of {repeats} runs)")
    for label, value in rows:
        print(f"  {label:<{width}}  {value}")


if __name__ == "__main__":
    main()
