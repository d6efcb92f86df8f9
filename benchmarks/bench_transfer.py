"""Benchmark cross-rank expert weight transfer: bytes moved vs the minimum, throughput vs raw P2P.

Run: ``.venv/bin/python benchmarks/bench_transfer.py`` (``--quick`` for a small smoke run).

For 2 and 4 gloo ranks on loopback (one process per rank, one torch thread
each), with Qwen3-30B-A3B-sized experts (hidden 2048, MoE intermediate 768,
bf16: gate+up ``[1536, 2048]`` and down ``[2048, 768]``, 9.0 MiB per expert
row) over a few MoE layers:

1. the placement change is what ``DeepSeekPolicy`` plans for a seeded,
   Zipf-skewed load, starting from the initial placement;
2. **bytes**: what the ranks actually sent (summed over ranks) against the
   minimum the change requires (one row per rank and expert it lacks,
   :func:`remote_fetches_required`); the ratio must be 1.0;
3. **throughput**: ``exchange_expert_weights`` with default options (the
   path a multi-rank ``EplbState.rearrange`` takes: staging, the local copies
   that need staging, batched P2P, one agreement per batch and the commit
   vote; the plan is made before the clock starts) against a raw exchange of
   the same rows between the same rank pairs: one ``dist.batch_isend_irecv``
   of every row, received into freshly allocated tensors, nothing else. Ratio
   = raw time / engine time (1.0 = no overhead; goal >= 0.8), medians of
   interleaved runs in rotating order, each run timed on the slowest rank.
   Also shown: staging in host memory through a two-row receive buffer (the
   ``staging_device`` mode, many small batches), the commit's time (it also
   makes the local copies that need no staging), and the staging memory.

4. **deadlines**: the agreement all-reduce a rearrangement issues (7 int64
   values), as a plain blocking ``dist.all_reduce`` and through ``run_phase``
   with its deadline (phase hook check, the deadline read from the group,
   ``async_op=True`` and ``work.wait(timeout)``), interleaved; and the
   pure-Python part alone. Nothing touches the store unless a rank fails, so
   that is the whole cost per collective.

After the timed runs the last staged transfer is committed and every slot is
checked to hold its new expert (each expert's rows carry its id). Defaults:
4 MoE layers of 32 experts + 8 redundant slots (1.4 GiB of weights over all
ranks); about 30 s on 2 cores.
"""

from __future__ import annotations

import argparse
import multiprocessing
import socket
import statistics
import sys
import time
from datetime import timedelta
from typing import TYPE_CHECKING, Final, TypedDict

import torch
import torch.distributed as dist

from moe_protocols._torch_typed import all_reduce, barrier
from moe_protocols.eplb import (
    DeepSeekPolicy,
    TransferJob,
    TransferOptions,
    initial_placement,
    plan_transfer,
    remote_fetches_required,
)
from moe_protocols.eplb import exchange_expert_weights as exchange
from moe_protocols.eplb._deadline import Deadline, deadline, run_phase
from moe_protocols.parallel import ExpertParallelContext

if TYPE_CHECKING:
    from collections.abc import Callable
    from multiprocessing.queues import Queue

    from moe_protocols.eplb import StagedTransfer

HIDDEN: Final = 2048
MOE_INTERMEDIATE: Final = 768
MiB: Final = 2**20


class Report(TypedDict):
    """What rank 0 sends back (plain values: it crosses a process boundary)."""

    world: int
    layers: int
    slots: int
    row_mib: float
    slots_changed: int
    bytes_sent: int
    bytes_received: int
    minimum: int
    engine_s: float
    raw_s: float
    host_s: float
    commit_s: float
    peak_staging_mib: float
    buffer_mib: float
    local_layer_mib: float
    wrong_rows: int
    repeats: int
    agree_plain_us: float
    agree_deadline_us: float
    deadline_setup_us: float


def zipf_load(layers: int, experts: int, tokens: int, seed: int) -> torch.Tensor:
    """``[layers, experts]`` token counts; per layer a random expert order, weight 1/(i+1)."""
    g = torch.Generator().manual_seed(seed)
    weight = 1.0 / torch.arange(1, experts + 1, dtype=torch.float64)
    rows: list[torch.Tensor] = []
    for _ in range(layers):
        probs = weight[torch.randperm(experts, generator=g)]
        picks = torch.multinomial(probs, tokens, replacement=True, generator=g)
        rows.append(torch.bincount(picks, minlength=experts))
    return torch.stack(rows)


def expert_weights(
    placement: torch.Tensor, rank: int, local: int, hidden: int, inter: int
) -> list[list[torch.Tensor]]:
    """This rank's ``[local, ...]`` bf16 gate_up and down rows; every value is the expert id."""
    layers: list[list[torch.Tensor]] = []
    for row in placement:
        experts = row[rank * local : (rank + 1) * local].to(torch.bfloat16)
        w13 = experts.view(-1, 1).repeat(1, 2 * inter * hidden)
        w2 = experts.view(-1, 1).repeat(1, hidden * inter)
        layers.append([w13, w2])
    return layers


def slowest(ep: ExpertParallelContext, run: Callable[[], object]) -> float:
    """Seconds ``run()`` took on the slowest rank (all ranks start together)."""
    barrier()
    start = time.perf_counter()
    run()
    elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
    ep.all_reduce_(elapsed, op="max")
    return float(elapsed)


def worker(
    rank: int, world: int, port: int, args: argparse.Namespace, results: Queue[Report]
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=300),
    )
    try:
        ep = ExpertParallelContext.from_process_group()
        report = measure(ep, args)
        if rank == 0:
            results.put(report)
    finally:
        dist.destroy_process_group()


def per_call_us(run: Callable[[], object], calls: int) -> float:
    """Microseconds per ``run()`` on this rank, over ``calls`` calls."""
    start = time.perf_counter()
    for _ in range(calls):
        run()
    return (time.perf_counter() - start) / calls * 1e6


def deadline_costs(ep: ExpertParallelContext, repeats: int) -> tuple[float, float, float]:
    """Median us per agreement all-reduce, plain and with its deadline; and the setup alone."""
    values = torch.zeros(7, dtype=torch.int64)
    variants: list[Callable[[], object]] = [
        lambda: all_reduce(values, op=dist.ReduceOp.MAX, group=None, async_op=False),
        lambda: run_phase(
            ep, "plan agreement", "benchmarking", lambda wait: ep.all_reduce_(values, wait=wait)
        ),
    ]
    samples: list[list[float]] = [[], []]
    for repeat in range(3 * repeats):
        for i in (repeat % 2, 1 - repeat % 2):
            barrier()
            samples[i].append(per_call_us(variants[i], 200))
    setup = per_call_us(lambda: Deadline(ep, deadline(ep)), 1000)
    return statistics.median(samples[0]), statistics.median(samples[1]), setup


def measure(ep: ExpertParallelContext, args: argparse.Namespace) -> Report:
    world, rank = ep.world_size, ep.rank
    hidden, inter = (256, 96) if args.quick else (HIDDEN, MOE_INTERMEDIATE)
    layers, logical, physical = args.layers, args.experts, args.experts + args.redundant
    local = physical // world
    old = initial_placement(layers, logical, physical)
    load = zipf_load(layers, logical, tokens=50_000, seed=world)
    new = DeepSeekPolicy().rebalance_experts(
        load, physical, 1, 1, world, old_physical_to_logical_map=old
    )
    weights = expert_weights(old, rank, local, hidden, inter)
    row_bytes = sum(w[0].numel() * w.element_size() for w in weights[0])
    plan = plan_transfer(old, new, local, rank)
    job = [TransferJob("bench", plan, weights)]
    host = TransferOptions(staging_device="cpu", buffer_bytes=2 * row_bytes)

    def raw() -> None:
        # The same rows between the same pairs, in one batch: nothing but the bytes.
        ops: list[dist.P2POp] = []
        for layer in plan.layers:
            for t in layer.transfers:
                if t.source_rank == rank:
                    peer = t.destination_rank
                    ops += [
                        dist.P2POp(dist.isend, w[t.source_slot], peer) for w in weights[layer.layer]
                    ]
                elif t.destination_rank == rank:
                    peer = t.source_rank
                    ops += [
                        dist.P2POp(dist.irecv, torch.empty_like(w[0]), peer)
                        for w in weights[layer.layer]
                    ]
        for work in dist.batch_isend_irecv(ops) if ops else []:
            work.wait()

    staged: list[StagedTransfer] = []

    def engine(options: TransferOptions) -> Callable[[], None]:
        def run() -> None:
            staged[:] = exchange(job, ep, options=options)

        return run

    variants = {"engine": engine(TransferOptions()), "raw": raw, "host": engine(host)}
    runs: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(2):
        for run in variants.values():
            run()  # warm-up: connections, allocator
    order = list(variants)
    for repeat in range(args.repeats):
        # Interleaved, and in a rotating order, so machine noise hits every variant alike.
        for name in order[repeat % 3 :] + order[: repeat % 3]:
            runs[name].append(slowest(ep, variants[name]))

    staged[:] = exchange(job, ep)
    (transfer,) = staged
    counts = torch.tensor(
        [transfer.bytes_sent, transfer.bytes_received, transfer.bytes_staged], dtype=torch.int64
    )
    peak_staging = counts[2:].clone()
    ep.all_reduce_(counts)
    ep.all_reduce_(peak_staging, op="max")
    commit_seconds = slowest(ep, transfer.commit)
    wrong = 0
    for layer, tensors in enumerate(weights):
        expected = new[layer, rank * local : (rank + 1) * local].to(torch.bfloat16)
        for w in tensors:
            wrong += int((w[:, 0] != expected).sum() + (w[:, -1] != expected).sum())
    bad = torch.tensor([wrong], dtype=torch.int64)
    ep.all_reduce_(bad)

    plain_us, deadline_us, setup_us = deadline_costs(ep, args.repeats)
    minimum = remote_fetches_required(old, new, local) * row_bytes
    median = {name: statistics.median(samples) for name, samples in runs.items()}
    moved = int(counts[0])
    return {
        "world": world,
        "layers": layers,
        "slots": physical,
        "row_mib": row_bytes / MiB,
        "slots_changed": int((old != new).sum()),
        "bytes_sent": moved,
        "bytes_received": int(counts[1]),
        "minimum": minimum,
        "engine_s": median["engine"],
        "raw_s": median["raw"],
        "host_s": median["host"],
        "commit_s": commit_seconds,
        "peak_staging_mib": int(peak_staging) / MiB,
        "buffer_mib": 2 * row_bytes / MiB,
        "local_layer_mib": local * row_bytes / MiB,
        "wrong_rows": int(bad),
        "repeats": args.repeats,
        "agree_plain_us": plain_us,
        "agree_deadline_us": deadline_us,
        "deadline_setup_us": setup_us,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def run_world(world: int, args: argparse.Namespace) -> Report:
    context = multiprocessing.get_context("spawn")
    results: Queue[Report] = context.Queue()
    port = free_port()
    procs = [
        context.Process(target=worker, args=(rank, world, port, args, results))
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    report = results.get(timeout=600)
    for proc in procs:
        proc.join(60)
        if proc.exitcode != 0:
            raise SystemExit(f"rank {procs.index(proc)} of {world} failed ({proc.exitcode})")
    return report


def show(r: Report) -> None:
    gb = r["bytes_sent"] / 1e9
    engine_s, raw_s, host_s = r["engine_s"], r["raw_s"], r["host_s"]
    minimum = r["minimum"]
    print(
        f"\n{r['world']} gloo ranks: {r['layers']} MoE layers x {r['slots']} slots, "
        f"{r['row_mib']:.2f} MiB per expert row, {r['slots_changed']} slots changed"
    )
    print(
        f"  bytes sent      {r['bytes_sent'] / MiB:10.1f} MiB   received "
        f"{r['bytes_received'] / MiB:.1f} MiB   minimum {minimum / MiB:.1f} MiB   "
        f"ratio {r['bytes_sent'] / minimum if minimum else float('nan'):.3f}"
    )
    print(
        f"  engine          {engine_s * 1e3:10.1f} ms   {gb / engine_s:.2f} GB/s   "
        f"(median of {r['repeats']}, slowest rank)"
    )
    print(f"  raw P2P         {raw_s * 1e3:10.1f} ms   {gb / raw_s:.2f} GB/s")
    print(f"  throughput ratio (raw time / engine time): {raw_s / engine_s:.3f}   (goal >= 0.8)")
    print(
        f"  host staging via a {r['buffer_mib']:.0f} MiB buffer: {host_s * 1e3:.1f} ms, "
        f"ratio {raw_s / host_s:.3f}"
    )
    print(
        f"  memory per rank: staging up to {r['peak_staging_mib']:.1f} MiB (the changed rows; "
        f"one layer of local weights is {r['local_layer_mib']:.1f} MiB); commit "
        f"{r['commit_s'] * 1e3:.1f} ms; wrong rows after commit: {r['wrong_rows']}"
    )
    print(
        f"  agreement all-reduce: {r['agree_plain_us']:.0f} us plain, "
        f"{r['agree_deadline_us']:.0f} us with its deadline (rank 0, median); "
        f"deadline setup alone {r['deadline_setup_us']:.1f} us"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="small experts, few runs (smoke)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32, help="logical experts")
    parser.add_argument("--redundant", type=int, default=8, help="redundant slots")
    parser.add_argument("--repeats", type=int, default=11)
    parser.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
    failed = False
    for world in args.ranks:
        report = run_world(world, args)
        show(report)
        failed |= report["bytes_sent"] != report["minimum"] or report["wrong_rows"] != 0
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
