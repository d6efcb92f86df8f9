"""Forward time with expert-load recording vs without, on tiny transformers MoE models.

Builds a tiny random-config Qwen3-MoE and the Qwen3-VL-MoE wrapper offline,
resolves each with ``MoEView`` (the hf-experts adapter), and times forwards
with the load hooks installed against forwards without them, interleaved in
rounds so that drift hits both alike. Prints the medians and their ratio
(goal: <= 1.05). Needs transformers (``pip install 'moe-protocols[hf]'``).

    python benchmarks/bench_hf.py [--tokens 256] [--rounds 15] [--per-round 10]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import TYPE_CHECKING, Final

import attrs
import torch
from torch import Tensor, nn

from moe_protocols._torch_typed import int_list, manual_seed
from moe_protocols.adapters import MoEView
from moe_protocols.eplb._maps import compute_logical_maps, initial_placement, max_replicas
from moe_protocols.models._tiny_hf import tiny_qwen3_moe, tiny_qwen3_vl_moe

if TYPE_CHECKING:
    from collections.abc import Callable, Sequence

GOAL: Final = 1.05
MODELS: Final[dict[str, Callable[[], nn.Module]]] = {
    "qwen3_moe": tiny_qwen3_moe,
    "qwen3_vl_moe (wrapper)": tiny_qwen3_vl_moe,
}


@attrs.frozen
class Result:
    """Median seconds per forward without and with load recording."""

    name: str
    plain_s: float
    recording_s: float
    tokens: int

    @property
    def ratio(self) -> float:
        """Recording time / plain time."""
        return self.recording_s / self.plain_s


def _timed(model: nn.Module, ids: Tensor, count: int) -> list[float]:
    times: list[float] = []
    for _ in range(count):
        start = time.perf_counter()
        model(input_ids=ids)
        times.append(time.perf_counter() - start)
    return times


def bench(
    name: str, build: Callable[[], nn.Module], *, tokens: int, rounds: int, per_round: int
) -> Result:
    """Time ``build()``'s forward on ``tokens`` random ids, with and without recording."""
    model = build()
    view = MoEView.require(model)
    layers, logical = view.num_moe_layers, view.num_logical_experts
    p2l = initial_placement(layers, logical, view.num_physical_experts)
    l2p, count = compute_logical_maps(p2l, logical, max_replicas(logical, logical))
    load = torch.zeros(layers, view.num_physical_experts, dtype=torch.int64)
    remove_hooks = getattr(view.model, "remove_hooks", None)
    assert callable(remove_hooks)
    get_embeddings = getattr(model, "get_input_embeddings", None)
    assert callable(get_embeddings)
    vocab = int(getattr(get_embeddings(), "num_embeddings", 2))
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    plain: list[float] = []
    recording: list[float] = []
    with torch.no_grad():
        _timed(model, ids, 3)  # warm-up: lazy initialisation, allocator
        for _ in range(rounds):
            plain += _timed(model, ids, per_round)
            view.set_eplb_state(
                expert_load_view=load, logical_to_physical_map=l2p, logical_replica_count=count
            )
            recording += _timed(model, ids, per_round)
            remove_hooks()
    recorded_rows = load.sum(dim=1)
    expected = rounds * per_round * tokens * int(getattr(view.model, "top_k", 0))
    assert int_list(recorded_rows) == [expected] * layers, "recording missed tokens"
    return Result(name, statistics.median(plain), statistics.median(recording), tokens)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; exit 0 when every ratio meets the goal, 1 otherwise."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--tokens", type=int, default=256, help="tokens per forward (default 256)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating rounds (default 15)")
    parser.add_argument("--per-round", type=int, default=10, help="forwards per round (default 10)")
    args = parser.parse_args(argv)
    manual_seed(0)
    print(f"{'model':<24} {'tokens':>6} {'plain ms':>9} {'recording ms':>12} {'ratio':>6}")
    ok = True
    for name, build in MODELS.items():
        result = bench(
            name, build, tokens=args.tokens, rounds=args.rounds, per_round=args.per_round
        )
        ok = ok and result.ratio <= GOAL
        print(
            f"{name:<24} {result.tokens:>6} {result.plain_s * 1e3:>9.3f} "
            f"{result.recording_s * 1e3:>12.3f} {result.ratio:>6.3f}"
        )
    print(f"goal: ratio <= {GOAL} ({'met' if ok else 'NOT met'})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
