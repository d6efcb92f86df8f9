"""Benchmark the EPLB state: recording overhead, step() cost, and the DeepSeek policy's time.

Run: ``.venv/bin/python benchmarks/bench_eplb.py`` (add ``--quick`` for a fast smoke run).

Four figures, each the median of repeated runs on one CPU thread:

1. forward time of the tiny MoE model with EPLB registered and recording,
   against the same model without EPLB (ratio of medians);
2. ``EplbState.step()`` in microseconds: a plain step (copy the pass into the
   window) and a step that rearranges (policy + weight move + map commit);
3. ``DeepSeekPolicy.rebalance_experts`` on the DeepSeek-V3 shape (58 layers,
   256 logical experts, 288 slots, 32 ranks, 4 nodes, 8 groups) with a seeded
   Zipf-skewed load, with the planned balancedness before and after;
4. the cost of the integrity checks (``EplbState(integrity=...)``): a
   rearranging ``step()`` with the checks off, ``"sampled"`` (the default) and
   ``"full"``, interleaved in one process on the same loads, on the tiny model
   and on one with 6 MiB experts (the goal: ``"sampled"`` adds <= 10 %).
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import TYPE_CHECKING, Final

import torch

from moe_protocols.eplb import (
    DeepSeekPolicy,
    EplbConfig,
    EplbState,
    balancedness,
    expected_rank_loads,
    initial_placement,
)
from moe_protocols.models import TinyMoEConfig, TinyMoEForCausalLM, tiny_moe

if TYPE_CHECKING:
    from collections.abc import Callable

    from moe_protocols.eplb._fingerprint import IntegrityMode

# DeepSeek-V3 / R1 serving shape (vLLM's EPLB docstring example).
DS_LAYERS, DS_EXPERTS, DS_SLOTS, DS_RANKS, DS_NODES, DS_GROUPS = 58, 256, 288, 32, 4, 8


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


def zipf_load(layers: int, experts: int, tokens: int, exponent: float, seed: int) -> torch.Tensor:
    """``[layers, experts]`` token counts, per-layer random order, rank i gets ~1/(i+1)^s."""
    g = torch.Generator().manual_seed(seed)
    rank_weight = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64) ** exponent
    rows: list[torch.Tensor] = []
    for _ in range(layers):
        probs = rank_weight[torch.argsort(torch.randperm(experts, generator=g))]
        rows.append(torch.multinomial(probs, tokens, replacement=True, generator=g))
    return torch.stack([torch.bincount(r, minlength=experts) for r in rows])


def bench_forward(repeats: int) -> tuple[float, float]:
    """Median forward seconds of the tiny model without EPLB and with EPLB recording."""
    tokens = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))

    def forward(model: TinyMoEForCausalLM) -> Callable[[], object]:
        def run() -> object:
            with torch.no_grad():
                return model(tokens)

        return run

    plain = tiny_moe(num_redundant_experts=4)
    recording = tiny_moe(num_redundant_experts=4)
    EplbState(EplbConfig(num_redundant_experts=4, step_interval=10**9)).add_model(recording)
    # Interleave the two so that machine noise hits both alike.
    plain_runs: list[float] = []
    recording_runs: list[float] = []
    for _ in range(5):
        plain_runs.append(median_seconds(forward(plain), repeats // 5 or 1))
        recording_runs.append(median_seconds(forward(recording), repeats // 5 or 1))
    return statistics.median(plain_runs), statistics.median(recording_runs)


def bench_step(repeats: int) -> tuple[float, float]:
    """Median seconds of a plain ``step()`` and of a step that rearranges (tiny model)."""
    model = tiny_moe(num_redundant_experts=4)
    plain = EplbState(EplbConfig(num_redundant_experts=4, step_interval=10**9))
    plain.add_model(model)
    plain_seconds = median_seconds(plain.step, repeats)

    model = tiny_moe(num_redundant_experts=4)
    rearranging = EplbState(EplbConfig(num_redundant_experts=4, window_size=16, step_interval=1))
    rearranging.add_model(model)
    live = rearranging.model_state()
    g = torch.Generator().manual_seed(1)

    def skewed_step() -> None:
        # A fresh skew each time so the placement keeps changing.
        live.expert_load_pass.copy_(
            torch.randint(0, 1000, live.expert_load_pass.shape, generator=g, dtype=torch.int32)
        )
        rearranging.step()

    rearrange_seconds = median_seconds(skewed_step, repeats)
    return plain_seconds, rearrange_seconds


INTEGRITY_SHAPES: Final = {
    "tiny_moe (2 MoE layers, 12 slots, 24 KiB/expert)": TinyMoEConfig(num_redundant_experts=4),
    "wide (2 MoE layers, 20 slots, 6 MiB/expert)": TinyMoEConfig(
        hidden_size=512,
        intermediate_size=1024,
        num_layers=3,
        num_experts=16,
        num_redundant_experts=4,
    ),
}


def bench_integrity(repeats: int, config: TinyMoEConfig) -> dict[str, float]:
    """Median seconds of a rearranging ``step()`` per integrity mode, interleaved.

    Every mode gets its own copy of the model and the same sequence of skewed
    loads, so each plans and moves the same placements.
    """
    modes: tuple[IntegrityMode, ...] = ("off", "sampled", "full")
    steps: dict[str, Callable[[], None]] = {}
    for mode in modes:
        state = EplbState(
            EplbConfig(num_redundant_experts=config.num_redundant_experts, step_interval=1),
            num_ranks=4,
            integrity=mode,
        )
        state.add_model(TinyMoEForCausalLM(config))
        g = torch.Generator().manual_seed(1)

        def step(state: EplbState = state, g: torch.Generator = g) -> None:
            load = state.model_state().expert_load_pass
            load.copy_(torch.randint(0, 1000, load.shape, generator=g, dtype=torch.int32))
            state.step()

        steps[mode] = step
    times: dict[str, list[float]] = {mode: [] for mode in modes}
    for _ in range(repeats):
        for mode in modes:
            started = time.perf_counter()
            steps[mode]()
            times[mode].append(time.perf_counter() - started)
    return {mode: statistics.median(t) for mode, t in times.items()}


def bench_policy(repeats: int) -> tuple[float, float, float, int]:
    """DeepSeekPolicy on DeepSeek-V3's shape: (median s, balancedness before, after, moved)."""
    load = zipf_load(DS_LAYERS, DS_EXPERTS, tokens=200_000, exponent=1.1, seed=0)
    old = initial_placement(DS_LAYERS, DS_EXPERTS, DS_SLOTS)
    policy = DeepSeekPolicy()

    def run() -> torch.Tensor:
        return policy.rebalance_experts(
            load,
            num_replicas=DS_SLOTS,
            num_groups=DS_GROUPS,
            num_nodes=DS_NODES,
            num_ranks=DS_RANKS,
            old_physical_to_logical_map=old,
        )

    seconds = median_seconds(run, repeats, warmup=1)
    new = run()
    before = float(balancedness(expected_rank_loads(old, load, DS_RANKS)).mean())
    after = float(balancedness(expected_rank_loads(new, load, DS_RANKS)).mean())
    return seconds, before, after, int((old != new).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few repeats (smoke run)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    scale = 1 if args.quick else 10

    plain_fwd, recording_fwd = bench_forward(repeats=5 * scale)
    plain_step, rearrange_step = bench_step(repeats=20 * scale)
    policy_seconds, before, after, moved = bench_policy(repeats=2 if args.quick else 10)
    integrity = {
        name: bench_integrity(3 if args.quick else 30, config)
        for name, config in INTEGRITY_SHAPES.items()
    }

    rows = [
        ("tiny_moe forward, no EPLB (ms)", f"{plain_fwd * 1e3:.3f}"),
        ("tiny_moe forward, EPLB recording (ms)", f"{recording_fwd * 1e3:.3f}"),
        ("  ratio recording / no EPLB", f"{recording_fwd / plain_fwd:.3f}"),
        ("step(), no rearrangement (us)", f"{plain_step * 1e6:.1f}"),
        ("step() with rearrangement (us)", f"{rearrange_step * 1e6:.1f}"),
        (
            f"DeepSeekPolicy L={DS_LAYERS} E={DS_EXPERTS} P={DS_SLOTS} R={DS_RANKS} "
            f"N={DS_NODES} G={DS_GROUPS}, Zipf 1.1 (ms)",
            f"{policy_seconds * 1e3:.1f}",
        ),
        ("  planned balancedness before -> after", f"{before:.3f} -> {after:.3f}"),
        ("  slots changed", f"{moved} / {DS_LAYERS * DS_SLOTS}"),
    ]
    for name, seconds in integrity.items():
        off = seconds["off"]
        rows.append((f"rearranging step(), {name}, integrity off (ms)", f"{off * 1e3:.2f}"))
        for mode in ("sampled", "full"):
            rows.append(
                (
                    f"  integrity {mode!r} (ms, overhead)",
                    f"{seconds[mode] * 1e3:.2f} {seconds[mode] / off - 1:+.1%}",
                )
            )
    width = max(len(name) for name, _ in rows)
    print(f"torch {torch.__version__}, 1 thread, medians")
    for name, value in rows:
        print(f"{name:<{width}}  {value:>14}")


if __name__ == "__main__":
    main()
