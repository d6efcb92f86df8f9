"""EPLB across processes: the tiny VLM-wrapped MoE model on a gloo EP group.

Each process is one EP rank holding its share of the expert slots. The runner
resolves the MoE language model through the VLM wrapper, registers it with an
``EplbState`` over the group, records load on every forward, and rearranges
every ``--interval`` steps, moving expert weights between the processes.

Run it on one machine (spawns the ranks itself, gloo on loopback)::

    python examples/distributed_eplb.py --ranks 2

``--model own`` serves ``examples/own_moe_vlm.py`` (a plain-torch VLM made
EPLB-ready with ``moe_protocols.building``) instead of the built-in one;
or under ``torchrun`` (one process per rank)::

    torchrun --nproc-per-node 4 examples/distributed_eplb.py

Both use gloo on the CPU: ``ReferenceRunner`` keeps its EPLB maps on the CPU,
so NCCL (GPU tensors) needs an ``EplbState`` built with ``device=`` directly.

Rank 0 prints balancedness before and after each rearrangement, the bytes the
ranks exchanged, and whether the EP group's outputs stayed bit-identical.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import socket
import sys
from datetime import timedelta

import torch
import torch.distributed as dist

from moe_protocols import EplbConfig, ReferenceRunner, RunnerConfig
from moe_protocols.models import tiny_vlm
from moe_protocols.parallel import ExpertParallelContext

VOCAB = 128  # the tiny model's vocabulary


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=2, help="EP ranks to spawn (default 2)")
    parser.add_argument("--steps", type=int, default=24, help="forward steps (default 24)")
    parser.add_argument("--interval", type=int, default=8, help="steps between rearrangements")
    parser.add_argument("--experts", type=int, default=16, help="logical experts (default 16)")
    parser.add_argument("--redundant", type=int, default=4, help="redundant slots (default 4)")
    parser.add_argument(
        "--model",
        choices=("tiny", "own"),
        default="tiny",
        help="tiny: the built-in tiny VLM; own: examples/own_moe_vlm.py, a plain-torch VLM made "
        "EPLB-ready with moe_protocols.building (8 experts; --experts is ignored)",
    )
    return parser.parse_args(argv)


def skewed_batch(step: int) -> torch.Tensor:
    """``[4, 32]`` token ids, Zipf-skewed; the same on every rank (EP ranks share tokens)."""
    ranks = torch.arange(1, VOCAB + 1, dtype=torch.float64)
    probs = ranks.pow(-1.2)
    generator = torch.Generator().manual_seed(step)
    return torch.multinomial(probs, 4 * 32, replacement=True, generator=generator).view(4, 32)


def serve(args: argparse.Namespace) -> None:
    """One EP rank's work; the process group is initialised."""
    ep = ExpertParallelContext.from_process_group()
    runner = ReferenceRunner(
        RunnerConfig(
            enable_eplb=True,
            eplb=EplbConfig(
                window_size=args.interval,
                step_interval=args.interval,
                num_redundant_experts=args.redundant,
            ),
            ep=ep,
        )
    )
    model: torch.nn.Module
    if args.model == "own":
        from own_moe_vlm import build  # this file's folder is on sys.path, in spawned ranks too

        model = build(num_redundant_experts=args.redundant, ep=ep)
    else:
        model = tiny_vlm(ep=ep, num_experts=args.experts, num_redundant_experts=args.redundant)
    runner.load_model(model)
    state = runner.eplb_state
    view = runner.moe_view
    assert state is not None
    assert view is not None

    def record_load(enabled: bool) -> None:
        for layer in view.moe_layers:  # both models' layers have the switch
            setattr(layer, "record_expert_load", enabled)  # noqa: B010  # not a MoELayer member

    def outputs() -> torch.Tensor:
        """Logits for a fixed probe batch, without recording its load."""
        record_load(False)
        try:
            with torch.no_grad():
                logits: torch.Tensor = model(skewed_batch(-1))
            return logits
        finally:
            record_load(True)

    before = outputs()

    seen = 0
    for step in range(args.steps):
        runner.execute_model(skewed_batch(step))
        if state.num_rearrangements > seen:
            seen = state.num_rearrangements
            result = state.last_rearrangement
            assert result is not None
            summary = result[runner.config.model_name]
            sent = torch.tensor([result.bytes_sent])
            ep.all_reduce_(sent)
            if ep.rank == 0:
                print(
                    f"step {step + 1}: balancedness {summary.overall_balancedness_before:.3f} -> "
                    f"{summary.overall_balancedness_after:.3f} (planned), "
                    f"{result.slots_changed} slots changed, "
                    f"{int(sent.item()) / 2**20:.2f} MiB sent between ranks"
                )
    after = outputs()
    same = torch.tensor([int(torch.equal(before, after))])
    ep.all_reduce_(same, op="min")
    if ep.rank == 0:
        print(f"{state.num_rearrangements} rearrangements on {ep.world_size} EP ranks")
        print(f"outputs bit-identical after the moves: {bool(same.item())}")
    if not same.item():
        raise SystemExit(1)


def _spawned(rank: int, world: int, port: int, args: argparse.Namespace) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        serve(args)
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo", timeout=timedelta(seconds=60))
        try:
            serve(args)
        finally:
            dist.destroy_process_group()
        return 0
    port = _free_port()
    context = multiprocessing.get_context("spawn")
    ranks = [
        context.Process(target=_spawned, args=(rank, args.ranks, port, args))
        for rank in range(args.ranks)
    ]
    for process in ranks:
        process.start()
    for process in ranks:
        process.join()
    failed = [rank for rank, process in enumerate(ranks) if process.exitcode != 0]
    if failed:
        print(f"EP ranks {failed} failed", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
