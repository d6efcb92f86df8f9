"""Multi-process EPLB scenarios for ``tests/eplb/test_distributed.py``, and their harness.

Each scenario runs in one spawned process per EP rank, on gloo over loopback,
and records what it observed (JSON values and tensors) for the parent test to
assert on; the parent compares with a single-process reference. Nothing here
asserts: a scenario only records, so a wrong result shows up as a named
assertion in the parent, and an exception as the worker's traceback.

The parent hosts the rendezvous store, so a rank that exits early (or hangs)
cannot take the store down with it; every worker is joined with a deadline
and stragglers are terminated.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import time
import traceback
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Final, cast

import attrs
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from moe_protocols.eplb import (
    EplbConfig,
    EplbState,
    PolicyRegistry,
    TransferOptions,
    initial_placement,
)
from moe_protocols.errors import MoEProtocolsError
from moe_protocols.models import TinyMoEForCausalLM, tiny_moe
from moe_protocols.parallel import ExpertParallelContext

if TYPE_CHECKING:
    from collections.abc import Callable, Collection

    from moe_protocols.eplb._deadline import Phase

# The model every scenario balances: 16 experts + 8 redundant slots over 3 MoE
# layers: 12 slots per rank on 2 ranks, 6 on 4.
NUM_EXPERTS: Final = 16
NUM_REDUNDANT: Final = 8
NUM_PHYSICAL: Final = NUM_EXPERTS + NUM_REDUNDANT
NUM_MOE_LAYERS: Final = 3
STEP_INTERVAL: Final = 4
GROUP_TIMEOUT_S: Final = 30.0
HANG_TIMEOUT_S: Final = 2.0
DEADLINE_S: Final = 1.0  # the process-group timeout of the deadline scenarios
# Tokens routed to hot experts by each rank, per step (every other expert gets BASE_LOAD).
HOT_EXPERTS: Final = {0: {0: 400, 1: 300}, 1: {5: 500}, 2: {9: 250, 3: 90}, 3: {0: 200, 12: 350}}
BASE_LOAD: Final = 3


ONE_PROCESS: Final = ExpertParallelContext()


def build_model(ep: ExpertParallelContext = ONE_PROCESS) -> TinyMoEForCausalLM:
    """The tiny MoE LM every scenario balances (one process: all slots; else this rank's)."""
    return tiny_moe(ep=ep, num_experts=NUM_EXPERTS, num_redundant_experts=NUM_REDUNDANT)


def eplb_config() -> EplbConfig:
    return EplbConfig(
        num_redundant_experts=NUM_REDUNDANT, step_interval=STEP_INTERVAL, window_size=8
    )


def rank_load(rank: int) -> torch.Tensor:
    """``[L, P]`` int32: the load one rank records per step under the initial placement."""
    load = torch.full((NUM_MOE_LAYERS, NUM_PHYSICAL), BASE_LOAD, dtype=torch.int32)
    for expert, tokens in HOT_EXPERTS[rank % len(HOT_EXPERTS)].items():
        load[:, expert] = tokens  # slot e < E holds expert e initially
    return load


def dummy_step_of(rank: int) -> int:
    """The step (0..2) at which ``rank`` runs a dummy step; the 4th step is always real."""
    return rank % 3


def tokens() -> torch.Tensor:
    """The batch every rank feeds to the EP group (and the reference to one process)."""
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(5))


def shuffled_placement(seed: int) -> torch.Tensor:
    """``[L, P]``: a valid placement that moves primaries and replicas on every layer."""
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(NUM_MOE_LAYERS):
        extra = torch.randint(0, NUM_EXPERTS, (NUM_REDUNDANT,), generator=g)
        row = torch.cat([torch.arange(NUM_EXPERTS), extra])
        rows.append(row[torch.randperm(NUM_PHYSICAL, generator=g)])
    return torch.stack(rows)


# ----------------------------------------------------------------------------- recording


@attrs.define
class Record:
    """What a rank observed: JSON-able values and tensors (saved as safetensors)."""

    values: dict[str, object] = attrs.Factory(dict)
    tensors: dict[str, torch.Tensor] = attrs.Factory(dict)

    def weights(self, key: str, model: TinyMoEForCausalLM) -> None:
        for layer, weights in enumerate(model.expert_weights):
            for k, w in enumerate(weights):
                self.tensors[f"{key}.w{layer}.{k}"] = w.detach().clone().contiguous()

    def error(self, key: str, exc: MoEProtocolsError) -> None:
        self.values[key] = {
            "type": type(exc).__name__,
            "message": str(exc),
            "rank": getattr(exc, "rank", None),
            "layer": getattr(exc, "layer", None),
            "phase": getattr(exc, "phase", None),
            "missing_ranks": list(getattr(exc, "missing_ranks", ())),
        }

    def save(self, directory: Path, rank: int) -> None:
        (directory / f"rank{rank}.json").write_text(json.dumps(self.values))
        save_file(self.tensors, str(directory / f"rank{rank}.safetensors"))


@attrs.frozen
class RankResult:
    """One rank's record, loaded back in the parent."""

    rank: int
    values: dict[str, object]
    tensors: dict[str, torch.Tensor]


def snapshot(state: EplbState) -> dict[str, torch.Tensor]:
    """Every tensor a failed operation must leave untouched: maps, load, weights."""
    tensors: dict[str, torch.Tensor] = {}
    for name in state.model_names:
        live = state.model_state(name)
        tensors[f"{name}.p2l"] = live.physical_to_logical_map
        tensors[f"{name}.l2p"] = live.logical_to_physical_map
        tensors[f"{name}.count"] = live.logical_replica_count
        tensors[f"{name}.pass"] = live.expert_load_pass
        tensors[f"{name}.window"] = live.expert_load_window
        for layer, weights in enumerate(live.model.expert_weights):
            for k, w in enumerate(weights):
                tensors[f"{name}.w{layer}.{k}"] = w
    return {key: t.detach().clone() for key, t in tensors.items()}


def changed_since(state: EplbState, before: dict[str, torch.Tensor]) -> list[str]:
    after = snapshot(state)
    return sorted(key for key in before if not torch.equal(before[key], after[key]))


def attempt(record: Record, key: str, state: EplbState, action: Callable[[], object]) -> None:
    """Run an action expected to fail on every rank; record the error and what changed."""
    before = snapshot(state)
    try:
        action()
    except MoEProtocolsError as exc:
        record.error(key, exc)
    else:
        record.values[key] = None
    record.values[f"{key}.changed"] = changed_since(state, before)


def logits(model: TinyMoEForCausalLM) -> torch.Tensor:
    with torch.no_grad():
        out: torch.Tensor = model(tokens())
    return out


# ----------------------------------------------------------------------------- scenarios


class RankSkewedPolicy:
    """A broken policy for tests: rank 0 and the others compute different placements."""

    name = "rank-skewed"

    def __init__(self, rank: int) -> None:
        self._rank = rank

    def rebalance_experts(
        self,
        weight: torch.Tensor,
        num_replicas: int,
        num_groups: int,
        num_nodes: int,
        num_ranks: int,
        old_physical_to_logical_map: torch.Tensor | None = None,
    ) -> torch.Tensor:
        assert old_physical_to_logical_map is not None
        return old_physical_to_logical_map.roll(1 if self._rank == 0 else 2, dims=1)


@attrs.define
class FaultSwitch:
    """A fault hook that can be armed: raise on one (rank, layer), or block there for a while."""

    fail_at: tuple[int, int] | None = None
    hang_at: tuple[int, int] | None = None
    hang_seconds: float = 0.0

    def __call__(self, rank: int, layer: int) -> None:
        if (rank, layer) == self.hang_at:
            time.sleep(self.hang_seconds)
        if (rank, layer) == self.fail_at:
            raise RuntimeError(f"injected failure on EP rank {rank} at MoE layer {layer}")


def rearrange_by_steps(ep: ExpertParallelContext, record: Record, state: EplbState) -> None:
    """Four steps per rank, one of them dummy (at a rank-dependent step); the 4th rearranges."""
    live = state.model_state()
    for step in range(STEP_INTERVAL):
        live.expert_load_pass.copy_(rank_load(ep.rank))
        state.step(is_dummy=step == dummy_step_of(ep.rank))
        record.values[f"rearrangements_after_step{step}"] = state.num_rearrangements
    result = state.last_rearrangement
    assert result is not None  # a harness invariant, not a test assertion
    summary = result["model"]
    record.values["steps_taken"] = state.steps_taken
    record.values["bytes_sent"] = result.bytes_sent
    record.values["bytes_received"] = result.bytes_received
    record.values["bytes_moved"] = result.bytes_moved
    record.tensors["rearranged.old_map"] = summary.old_physical_to_logical_map
    record.tensors["rearranged.new_map"] = summary.new_physical_to_logical_map
    record.tensors["rearranged.live_map"] = state.physical_to_logical_map()


def two_ranks(ep: ExpertParallelContext, record: Record) -> None:
    """Rearrange by steps, restore a placement, and be refused when ranks disagree."""
    model = build_model(ep)
    record.tensors["initial.logits"] = logits(model)
    state = EplbState(eplb_config(), ep=ep)
    state.add_model(model)
    logits(model)
    recorded = state.model_state().expert_load_pass.clone()
    record.tensors["forward.load"] = recorded
    record.tensors["forward.load_sum"] = ep.all_reduce_(recorded.clone())
    rearrange_by_steps(ep, record, state)
    record.weights("rearranged", model)
    record.tensors["rearranged.logits"] = logits(model)

    placement = shuffled_placement(seed=3)
    state.update_mapping("model", placement)
    record.weights("restored", model)
    record.tensors["restored.logits"] = logits(model)

    # Each rank given its own placement: refused everywhere, nothing moves.
    attempt(
        record,
        "different_placements",
        state,
        lambda: state.update_mapping("model", shuffled_placement(seed=100 + ep.rank)),
    )

    # A policy that is not deterministic across ranks: refused before any move.
    other = build_model(ep)
    skewed = EplbState(
        attrs.evolve(eplb_config(), policy=RankSkewedPolicy.name),
        ep=ep,
        policies=PolicyRegistry().with_policy(RankSkewedPolicy(ep.rank)),
    )
    skewed.add_model(other)
    skewed.model_state().expert_load_pass.copy_(rank_load(ep.rank))
    skewed.step()
    attempt(record, "nondeterministic_policy", skewed, skewed.rearrange)

    # Rank 0 takes one more (dummy) step than the others, then all rearrange.
    if ep.rank == 0:
        state.step(is_dummy=True)
    attempt(record, "out_of_lockstep", state, state.rearrange)

    # Rank 1's copy of a replicated expert diverged: every rank refuses to move.
    diverged = build_model(ep)
    checked = EplbState(eplb_config(), ep=ep)
    checked.add_model(diverged)
    if ep.rank == 1:
        with torch.no_grad():
            diverged.expert_weights[0][0][-1].add_(1.0)  # its last slot: a redundant replica
    checked.model_state().expert_load_pass.copy_(rank_load(ep.rank))
    checked.step()
    attempt(record, "diverged_replica", checked, checked.rearrange)

    # Per-step replica dispatch: other slots serve the tokens, the outputs stay the same.
    live = state.model_state()
    live.expert_load_pass.zero_()
    logits(model)
    record.tensors["modulo.load"] = ep.all_reduce_(live.expert_load_pass.clone())
    model.replica_dispatch = "balanced"
    live.expert_load_pass.zero_()
    record.tensors["dispatched.logits"] = logits(model)
    record.tensors["dispatched.load"] = ep.all_reduce_(live.expert_load_pass.clone())
    model.replica_dispatch = "modulo"

    # Rank 1 built its model with two more MoE layers: both ranks refuse, naming rank 1,
    # before any collective whose size depends on the layers (no rank dies by signal).
    rearrange_with_layers(ep, record, 4 if ep.rank == 0 else 6)


def rearrange_with_layers(ep: ExpertParallelContext, record: Record, layers: int) -> None:
    """Register a model of ``layers`` decoder layers (this rank's choice) and rearrange it."""
    uneven = tiny_moe(
        ep=ep, num_experts=NUM_EXPERTS, num_redundant_experts=NUM_REDUNDANT, num_layers=layers
    )
    mismatched = EplbState(eplb_config(), ep=ep)
    mismatched.add_model(uneven)
    mismatched.step()
    attempt(record, "mismatched_layers", mismatched, mismatched.rearrange)


def four_ranks(ep: ExpertParallelContext, record: Record) -> None:
    """Two nodes, one-row batches staged in host memory; a failing rank; a hung rank."""
    ep = ExpertParallelContext.from_process_group(ep.group, num_nodes=2)
    model = build_model(ep)
    record.tensors["initial.logits"] = logits(model)
    row_bytes = sum(
        w[0].numel() * w.element_size() for w in model.moe_layers[0].get_expert_weights()
    )
    record.values["row_bytes"] = row_bytes
    switch = FaultSwitch()
    options = TransferOptions(buffer_bytes=row_bytes, staging_device="cpu", fault_hook=switch)
    state = EplbState(eplb_config(), ep=ep, transfer=options)
    state.add_model(model)
    rearrange_by_steps(ep, record, state)
    record.weights("rearranged", model)
    record.tensors["rearranged.logits"] = logits(model)

    # Rank 2 fails while MoE layer 1 is staged: every rank keeps its old state.
    switch.fail_at = (2, 1)
    placement = shuffled_placement(seed=3)
    attempt(record, "injected_failure", state, lambda: state.update_mapping("model", placement))
    switch.fail_at = None
    # The group is still usable: the same move now succeeds everywhere.
    state.update_mapping("model", placement)
    record.weights("restored", model)
    record.tensors["restored.logits"] = logits(model)

    # Ranks 2 and 3 built their model with more MoE layers (and not the same number):
    # every rank refuses, naming both, before any collective of their size.
    rearrange_with_layers(ep, record, {2: 6, 3: 7}.get(ep.rank, 4))

    # Rank 1 hangs at MoE layer 1 longer than the EPLB group's timeout.
    # cast: torch types new_group with its non-member sentinels; every rank is a member.
    short = cast("dist.ProcessGroup", dist.new_group(timeout=timedelta(seconds=HANG_TIMEOUT_S)))
    hung_ep = ExpertParallelContext.from_process_group(short, num_nodes=2)
    # Longer than the deadline plus the deadline the others wait for its report.
    hang = FaultSwitch(hang_at=(1, 1), hang_seconds=3 * HANG_TIMEOUT_S)
    hung_state = EplbState(eplb_config(), ep=hung_ep, transfer=TransferOptions(fault_hook=hang))
    hung_state.add_model(build_model(hung_ep))
    started = time.monotonic()
    attempt(
        record,
        "hung_peer",
        hung_state,
        lambda: hung_state.update_mapping("model", shuffled_placement(seed=4)),
    )
    record.values["hung_peer.seconds"] = time.monotonic() - started
    # The timeout closed only the EPLB group's connections.
    alive = torch.ones(1)
    dist.all_reduce(alive)
    record.values["default_group_after_hang"] = float(alive)


@attrs.define
class KillAt:
    """A phase hook: SIGKILL this process the ``occurrence``-th time ``rank`` enters ``phase``."""

    phase: Phase
    rank: int
    occurrence: int = 1
    seen: int = 0

    def __call__(self, phase: Phase, rank: int) -> None:
        if (phase, rank) != (self.phase, self.rank):
            return
        self.seen += 1
        if self.seen == self.occurrence:
            os.kill(os.getpid(), signal.SIGKILL)


@attrs.frozen
class DeadlineCase:
    """One rank killed at one phase of a rearrangement (or of ``update_mapping``)."""

    phase: Phase
    occurrence: int = 1
    """Which entry into the phase kills (the exchange enters once per agreement and per P2P)."""
    restore: bool = False
    """Kill in ``update_mapping`` instead of ``rearrange``."""
    override: bool = False
    """Deadline from ``ExpertParallelContext.collective_timeout``; the group's timeout is long."""

    @property
    def name(self) -> str:
        return f"{self.phase.replace(' ', '_')}_{self.occurrence}"


DEADLINE_CASES: Final = (
    DeadlineCase("lockstep check"),
    DeadlineCase("load reduce", override=True),
    DeadlineCase("plan agreement"),
    DeadlineCase("exchange"),  # before the first batch's agreement
    DeadlineCase("exchange", occurrence=2),  # after it, before posting the batch's rows
    DeadlineCase("commit vote"),
    DeadlineCase("placement agreement", restore=True),
)
DEADLINE_SURVIVORS: Final = (3, 4)
"""Global ranks that survive every case; each case's group adds one victim to them."""
DEADLINE_VICTIMS: Final = (0, 1, 2, 5, 6, 7, 8)
"""Global rank killed in each case: EP rank 0 of its group in the first three, EP rank 2 after."""
DEADLINE_WORLD: Final = len(DEADLINE_SURVIVORS) + len(DEADLINE_VICTIMS)


def eplb_counters(state: EplbState) -> list[object]:
    """The counters a failed rearrangement must leave alone."""
    return [
        state.steps_taken,
        state.step_counter,
        state.window_step,
        state.num_rearrangements,
        state.last_rearrangement is None,
    ]


def _kill_case(index: int, group: dist.ProcessGroup, record: Record) -> None:
    """Run case ``index`` on its 3-rank group; its victim dies, the survivors record the error."""
    case = DEADLINE_CASES[index]
    ranks = sorted({*DEADLINE_SURVIVORS, DEADLINE_VICTIMS[index]})
    timeout = timedelta(seconds=DEADLINE_S) if case.override else None
    ep = ExpertParallelContext.from_process_group(group, collective_timeout=timeout)
    victim = ranks.index(DEADLINE_VICTIMS[index])
    options = TransferOptions(phase_hook=KillAt(case.phase, victim, case.occurrence))
    state = EplbState(eplb_config(), ep=ep, transfer=options)
    state.add_model(build_model(ep))
    if not case.restore:
        for _ in range(STEP_INTERVAL - 1):
            state.model_state().expert_load_pass.copy_(rank_load(ep.rank))
            state.step()
    # All three start the operation together: the deadline is for the victim's death,
    # not for this process's setup.
    ready = group.get_group_store()
    ready.set(f"ready{ep.rank}", "1")
    ready.wait([f"ready{r}" for r in range(ep.world_size)], timedelta(seconds=60))
    counters = eplb_counters(state)
    action: Callable[[], object] = state.rearrange
    if case.restore:
        action = lambda: state.update_mapping("model", shuffled_placement(seed=3))  # noqa: E731
    started = time.monotonic()
    record.values[f"{case.name}.started"] = time.time()
    attempt(record, case.name, state, action)
    record.values[f"{case.name}.seconds"] = time.monotonic() - started
    record.values[f"{case.name}.counters"] = [counters, eplb_counters(state)]
    record.values[f"{case.name}.ranks"] = [ep.rank, victim]


def deadlines(ep: ExpertParallelContext, record: Record) -> None:
    """Each case: a group of the two survivors and one victim, killed at the case's phase."""
    # cast: torch types new_group with its non-member sentinels; a rank uses only
    # the groups it is a member of.
    groups = [
        cast(
            "dist.ProcessGroup",
            dist.new_group(
                sorted({*DEADLINE_SURVIVORS, victim}),
                timeout=timedelta(seconds=60 * DEADLINE_S if case.override else DEADLINE_S),
            ),
        )
        for case, victim in zip(DEADLINE_CASES, DEADLINE_VICTIMS, strict=True)
    ]
    turns = dist.group.WORLD.get_group_store()  # type: ignore[union-attr]  # WORLD is None before init; it is set here
    if ep.rank in DEADLINE_VICTIMS:
        # Wait until the survivors are done with the earlier cases: a collective
        # would otherwise pass its deadline before the phase this rank dies in.
        index = DEADLINE_VICTIMS.index(ep.rank)
        turns.wait([f"turn{index}"], timedelta(seconds=120))
        _kill_case(index, groups[index], record)  # returns only if the kill did not happen
        return
    for index, group in enumerate(groups):
        turns.set(f"turn{index}", "go")
        _kill_case(index, group, record)


SCENARIOS: Final[dict[str, Callable[[ExpertParallelContext, Record], None]]] = {
    "two_ranks": two_ranks,
    "four_ranks": four_ranks,
    "deadlines": deadlines,
}


# ----------------------------------------------------------------------------- harness


def _worker(scenario: str, rank: int, world: int, port: int, directory: str) -> None:
    """Entry point of one spawned rank."""
    torch.set_num_threads(1)
    out = Path(directory)
    try:
        # TCPStore is public API that torch.distributed imports without re-exporting.
        store = dist.TCPStore(  # type: ignore[attr-defined]  # public, but not re-exported by torch.distributed
            "127.0.0.1", port, is_master=False, timeout=timedelta(seconds=GROUP_TIMEOUT_S)
        )
        dist.init_process_group(
            "gloo",
            store=store,
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=GROUP_TIMEOUT_S),
        )
        try:
            record = Record()
            SCENARIOS[scenario](ExpertParallelContext.from_process_group(), record)
            record.save(out, rank)
        finally:
            dist.destroy_process_group()
    except BaseException:
        (out / f"rank{rank}.error").write_text(traceback.format_exc())
        raise SystemExit(1) from None


class GroupFailed(Exception):
    """A spawned rank crashed or did not finish; carries the workers' tracebacks."""


def run_group(
    scenario: str,
    world: int,
    directory: Path,
    *,
    timeout_s: float = 120.0,
    killed: Collection[int] = (),
) -> list[RankResult]:
    """Run ``scenario`` on ``world`` spawned gloo ranks; return each rank's record.

    The ranks in ``killed`` must die by SIGKILL (the scenario kills them);
    the records of the others are returned, in rank order.

    Raises:
        GroupFailed: a rank raised (its traceback is in the message), exited
            abnormally (or, in ``killed``, did not die by SIGKILL), or the
            group did not finish within ``timeout_s`` (the stragglers are
            terminated).
    """
    directory.mkdir(parents=True, exist_ok=True)
    store = dist.TCPStore(  # type: ignore[attr-defined]  # public, not re-exported
        "127.0.0.1", 0, None, True, timedelta(seconds=GROUP_TIMEOUT_S), wait_for_workers=False
    )
    context = multiprocessing.get_context("spawn")
    procs = [
        context.Process(
            target=_worker, args=(scenario, rank, world, store.port, str(directory)), daemon=True
        )
        for rank in range(world)
    ]
    for proc in procs:
        proc.start()
    deadline = time.monotonic() + timeout_s
    try:
        while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
            if any(p.exitcode not in (None, 0) for r, p in enumerate(procs) if r not in killed):
                break  # one rank failed: the others would only wait for it
            time.sleep(0.05)
    finally:
        stragglers = [rank for rank, p in enumerate(procs) if p.is_alive()]
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
        del store
    problems = []
    for rank, proc in enumerate(procs):
        error = directory / f"rank{rank}.error"
        if error.exists():
            problems.append(f"rank {rank} raised:\n{error.read_text()}")
        elif rank in stragglers:
            problems.append(f"rank {rank} did not finish within {timeout_s} s (terminated)")
        elif rank in killed and proc.exitcode != -signal.SIGKILL:
            problems.append(f"rank {rank} was to die by SIGKILL, exited with code {proc.exitcode}")
        elif rank not in killed and proc.exitcode != 0:
            problems.append(f"rank {rank} exited with code {proc.exitcode}")
    if problems:
        raise GroupFailed(f"scenario {scenario!r} on {world} ranks failed:\n" + "\n".join(problems))
    return [
        RankResult(
            rank,
            json.loads((directory / f"rank{rank}.json").read_text()),
            load_file(str(directory / f"rank{rank}.safetensors")),
        )
        for rank in range(world)
        if rank not in killed
    ]


def initial_map() -> torch.Tensor:
    return initial_placement(NUM_MOE_LAYERS, NUM_EXPERTS, NUM_PHYSICAL)
