"""EPLB as users pay for it: a serving simulator for rebalancing policies and per-step dispatch.

For each shape and load process the simulator serves ``--windows`` load
windows. Window ``w`` has a true mean load per (layer, expert); its steps add
per-step noise and Poisson token sampling. After each window every policy
re-plans on what EPLB recorded in that window (Poisson counts of the window's
true load over all its ``steps_per_window`` steps, with its own previous
placement as the old one), and the plan serves the next
window. References: ``off`` (the initial placement forever), ``oracle``
(``migration_aware`` planning each window on that window's true mean load).
Every policy runs with the even split over replicas (``modulo``, what vLLM's
router approximates), with per-step dispatch
(:func:`moe_protocols.eplb.replica_shares` on each step's own counts, one
solve per layer per step) and with lagged dispatch (shares from the counts of
the last ``recent_steps`` steps, one solve per step for all layers); the two
references run with the even split only.

Cost model (:class:`CostModel`, constants stated in the output):

- a step at perfect balance takes ``step_seconds``; ``moe_share`` of that is
  MoE layers, whose time scales with the slowest rank:
  ``step = step_seconds * ((1 - moe_share) + moe_share * sum_l max_r / sum_l mean_r)``
  over the step's per-(layer, rank) token loads;
- a window is ``steps_per_window`` steps (the sampled steps stand for it);
- a rebalance moves the refetched slots (expert not on that rank before);
  the slowest rank receives ``max_r sum_l slots x expert_bytes`` at
  ``rank_bandwidth`` bytes/s; blocking transfer stalls for that time plus the
  plan's own measured time; overlapped transfer costs ``overlap_penalty`` of
  the transfer time (contention with the steps it overlaps);
- per-step dispatch adds ``dispatch_seconds`` per MoE layer per step (one solve
  and the routing per layer); lagged dispatch adds ``lagged_seconds`` per step
  (one solve for all layers) plus ``routing_seconds`` per layer per step.
  All three are 0 by default (the tables show the balance won, the dispatch
  cost section what it would cost; set them with ``--dispatch-us`` etc.).

Load processes (``LoadProcess``): log-popularity per (layer, expert) drawn
from a base distribution, then a random walk per window (``walk``), per-window
noise that does not persist (``window_noise``), per-step noise
(``step_noise``), an optional regime shift (log-popularities re-permuted in
half the layers at one window) and experts that heat up. Tokens per step are
Poisson with mean ``tokens_per_step x top_k x share`` (the large-batch limit
of independent top-k routing; the "distinct experts per token" constraint and
group-limited routing are not modelled beyond the group walk, which moves
whole expert groups' popularity together).

The policy-time section times ``deepseek``, ``migration_aware`` and vLLM
0.33's ``DefaultEplbPolicy`` on every shape, fresh and after a 0.2 lognormal
drift. Run with the real-vLLM tier's interpreter
(``.venv-vllm/bin/python benchmarks/bench_serving.py``, built by
``scripts/setup-vllm.sh``) it times vLLM's own class, side by side with a NumPy
port of it written here (:func:`vllm_default_numpy`, after the published
algorithm and vLLM's NumPy loop structure), and checks the port places as vLLM
does; without vLLM installed it times the port alone and says so. Placements
are compared with ``deepseek``'s too.

Run ``python benchmarks/bench_serving.py`` (full, < 5 min on one core) or
``--quick`` (< 30 s). ``--markdown FILE`` writes the tables, ``--plot FILE``
the per-window plot.
"""

from __future__ import annotations

import argparse
import importlib
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any, Literal

import attrs
import numpy as np
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moe_protocols._torch_typed import from_numpy
from moe_protocols.eplb._maps import compute_logical_maps, initial_placement
from moe_protocols.eplb._metrics import expected_rank_loads, refetched_per_rank
from moe_protocols.eplb.analysis import duplicate_replicas
from moe_protocols.eplb.dispatch import (
    DEFAULT_DISPATCH_ROUNDS,
    rank_loads_from_shares,
    replica_shares,
)
from moe_protocols.eplb.policies import DeepSeekPolicy, MigrationAwarePolicy, RebalancePolicy
from moe_protocols.eplb.workloads import (
    STANDARD_SHAPES,
    Drift,
    LoadDistribution,
    MoEShape,
    drift_sequence,
)

# ----------------------------------------------------------------- cost model


@attrs.frozen
class CostModel:
    """How load imbalance, weight transfer and dispatch turn into seconds."""

    step_seconds: float = 0.05
    """One step at perfect balance."""
    moe_share: float = 0.5
    """Fraction of a perfectly balanced step spent in MoE layers."""
    steps_per_window: int = 1000
    """Steps between two rebalances (SGLang's default interval)."""
    rank_bandwidth: float = 50e9
    """Bytes per second one rank receives expert weights at."""
    blocking: bool = True
    """Blocking transfer (stall = transfer + plan time) or overlapped."""
    overlap_penalty: float = 0.1
    """Overlapped transfer: fraction of the transfer time the overlapped steps lose."""
    dispatch_seconds: float = 0.0
    """Per-step dispatch: per MoE layer per step (solve + routing)."""
    lagged_seconds: float = 0.0
    """Lagged dispatch: one solve for all layers, per step."""
    routing_seconds: float = 0.0
    """Lagged dispatch: applying the shares, per MoE layer per step."""
    """Per MoE layer per step, when per-step dispatch is on."""

    def step_times(
        self, rank_load: torch.Tensor, *, dispatch: Literal["none", "per-step", "lagged"] = "none"
    ) -> torch.Tensor:
        """Seconds of each step from its ``[steps, layers, ranks]`` token loads."""
        peak = rank_load.amax(dim=-1).sum(dim=-1).to(torch.float64)
        mean = rank_load.mean(dim=-1).sum(dim=-1).to(torch.float64)
        imbalance = torch.where(mean > 0, peak / torch.where(mean > 0, mean, 1.0), 1.0)
        seconds = self.step_seconds * ((1.0 - self.moe_share) + self.moe_share * imbalance)
        layers = rank_load.shape[-2]
        if dispatch == "per-step":
            seconds = seconds + self.dispatch_seconds * layers
        elif dispatch == "lagged":
            seconds = seconds + self.lagged_seconds + self.routing_seconds * layers
        return seconds

    def window_seconds(self, step_times: torch.Tensor) -> float:
        """A window's serving time: its sampled steps stand for ``steps_per_window`` steps."""
        return self.steps_per_window * float(step_times.mean())

    def transfer_seconds(self, slots_per_rank: torch.Tensor, expert_bytes: int) -> float:
        """Wire time of a rebalance from ``[layers, ranks]`` refetched slots: the busiest rank's."""
        busiest = int(slots_per_rank.sum(dim=0).max()) if slots_per_rank.numel() else 0
        return busiest * expert_bytes / self.rank_bandwidth

    def stall_seconds(self, transfer_seconds: float, plan_seconds: float) -> float:
        """Serving time a rebalance costs."""
        if self.blocking:
            return transfer_seconds + plan_seconds
        return self.overlap_penalty * transfer_seconds


# -------------------------------------------------------------- load process


@attrs.frozen
class LoadProcess:
    """A seeded sequence of window loads; see the module docstring."""

    name: str
    base: LoadDistribution = attrs.field(factory=lambda: LoadDistribution("lognormal", 1.0))
    walk: float = 0.1
    window_noise: float = 0.15
    step_noise: float = 0.1
    shift_at: int | None = None
    heating: int = 0
    heat_rate: float = 0.3
    group_walk: float = 0.05

    def windows(self, shape: MoEShape, num_windows: int, seed: int) -> torch.Tensor:
        """``[windows, layers, experts]`` true mean shares (each layer sums to 1), float64."""
        gen = torch.Generator().manual_seed(seed)
        num_layers, num_experts = shape.num_layers, shape.num_logical
        dims = (num_layers, num_experts)
        log_pop = self.base.sample(num_layers, num_experts, seed=seed).log()
        group_size = num_experts // shape.num_groups
        hot = torch.argsort(torch.rand(dims, generator=gen), dim=1)[:, : self.heating]
        out: list[torch.Tensor] = []
        for window in range(num_windows):
            if window > 0:
                log_pop = log_pop + self.walk * torch.randn(
                    dims, generator=gen, dtype=torch.float64
                )
                groups = torch.randn(
                    num_layers, shape.num_groups, generator=gen, dtype=torch.float64
                )
                log_pop = log_pop + self.group_walk * groups.repeat_interleave(group_size, dim=1)
                if self.heating:
                    log_pop = log_pop.scatter_add(
                        1, hot, torch.full(hot.shape, self.heat_rate, dtype=torch.float64)
                    )
            if window == self.shift_at:
                layers = torch.rand(num_layers, generator=gen) < 0.5
                perm = torch.argsort(torch.rand(dims, generator=gen), dim=1)
                log_pop = torch.where(layers.unsqueeze(1), log_pop.gather(1, perm), log_pop)
            noisy = log_pop + self.window_noise * torch.randn(
                dims, generator=gen, dtype=torch.float64
            )
            load = torch.exp(noisy - noisy.amax(dim=1, keepdim=True))
            out.append(load / load.sum(dim=1, keepdim=True))
        return torch.stack(out)

    def steps(
        self, share: torch.Tensor, *, tokens_per_step: int, top_k: int, num_steps: int, seed: int
    ) -> torch.Tensor:
        """``[steps, layers, experts]`` token counts of sampled steps of a window."""
        gen = torch.Generator().manual_seed(seed)
        noise = torch.randn((num_steps, *share.shape), generator=gen, dtype=torch.float64)
        step_share = share.unsqueeze(0) * torch.exp(self.step_noise * noise)
        step_share = step_share / step_share.sum(dim=-1, keepdim=True)
        return torch.poisson(step_share * float(tokens_per_step * top_k), generator=gen)


PROCESSES: tuple[LoadProcess, ...] = (
    LoadProcess("walk"),
    LoadProcess("shift", shift_at=-1),  # -1: replaced by the middle window
    LoadProcess("heating", heating=4),
)

# ------------------------------------------------------------ the simulation


@attrs.define
class Run:
    """One policy's figures over a whole simulation."""

    step_bal: list[float] = attrs.field(factory=list[float])
    step_bal_dispatch: list[float] = attrs.field(factory=list[float])
    window_bal: list[float] = attrs.field(factory=list[float])
    window_seconds: list[float] = attrs.field(factory=list[float])
    window_seconds_dispatch: list[float] = attrs.field(factory=list[float])
    step_bal_lagged: list[float] = attrs.field(factory=list[float])
    window_seconds_lagged: list[float] = attrs.field(factory=list[float])
    refetched: list[float] = attrs.field(factory=list[float])
    bytes_moved: float = 0.0
    stall: float = 0.0
    plan_ms: list[float] = attrs.field(factory=list[float])
    duplicates: int = 0

    @property
    def total(self) -> float:
        return sum(self.window_seconds) + self.stall

    @property
    def total_dispatch(self) -> float:
        return sum(self.window_seconds_dispatch) + self.stall

    @property
    def total_lagged(self) -> float:
        return sum(self.window_seconds_lagged) + self.stall


@attrs.frozen
class Settings:
    num_windows: int = 20
    steps_per_window: int = 1
    """Steps sampled per window to measure it (they stand for ``CostModel.steps_per_window``)."""
    tokens_per_step: int = 8192
    top_k: int = 8
    num_layers: int | None = None
    dispatch_rounds: int = 8
    recent_steps: int = 100
    """Lagged dispatch: steps of counts its shares are computed from."""
    seed: int = 0


def token_weighted(rank_load: torch.Tensor) -> torch.Tensor:
    """Per-step ``sum_l mean_r / sum_l max_r`` of ``[steps, layers, ranks]``."""
    peak = rank_load.amax(dim=-1).sum(dim=-1)
    return rank_load.mean(dim=-1).sum(dim=-1) / peak.clamp_min(1e-12)


def step_rank_loads(
    placement: torch.Tensor,
    steps: torch.Tensor,
    shape: MoEShape,
    *,
    dispatch_rounds: int | None,
    share_load: torch.Tensor | None = None,
) -> torch.Tensor:
    """``[steps, layers, ranks]`` loads of sampled steps on ``placement``, even or dispatched.

    Dispatch splits replicas by shares computed from each step's own counts, or, with
    ``share_load [layers, experts]``, from that one load (e.g. recent steps' counts) for
    every step.
    """
    num_steps, num_layers, num_experts = steps.shape
    if dispatch_rounds is None:
        flat = expected_rank_loads(
            placement.repeat(num_steps, 1), steps.reshape(-1, num_experts), shape.num_ranks
        )
        return flat.view(num_steps, num_layers, shape.num_ranks)
    l2p, count = compute_logical_maps(placement, num_experts, shape.num_physical - num_experts + 1)
    width = int(count.max())
    l2p = l2p[..., :width]
    load = steps.to(torch.float32)
    kw = {"num_physical": shape.num_physical, "num_ranks": shape.num_ranks}
    if share_load is None:
        l2p = l2p.unsqueeze(0).expand(num_steps, -1, -1, -1)
        count = count.unsqueeze(0).expand(num_steps, -1, -1)
        shares = replica_shares(l2p, count, load, num_rounds=dispatch_rounds, **kw)
    else:
        shares = replica_shares(
            l2p, count, share_load.to(torch.float32), num_rounds=dispatch_rounds, **kw
        )
        l2p = l2p.unsqueeze(0).expand(num_steps, -1, -1, -1)
        shares = shares.unsqueeze(0).expand(num_steps, -1, -1, -1)
    return rank_loads_from_shares(l2p, load, shares, **kw).to(torch.float64)


Planner = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def simulate(
    shape: MoEShape, process: LoadProcess, settings: Settings, cost: CostModel
) -> dict[str, Run]:
    """Serve ``settings.num_windows`` windows with every policy; see the module docstring."""
    if settings.num_layers is not None:
        shape = attrs.evolve(shape, num_layers=settings.num_layers)
    if process.shift_at == -1:
        process = attrs.evolve(process, shift_at=settings.num_windows // 2)
    truth = process.windows(shape, settings.num_windows, settings.seed)
    steps = [
        process.steps(
            truth[w],
            tokens_per_step=settings.tokens_per_step,
            top_k=settings.top_k,
            num_steps=settings.steps_per_window,
            seed=settings.seed * 1000 + w,
        )
        for w in range(settings.num_windows)
    ]
    # What EPLB records over a window: all its steps' tokens. Per-step noise averages out over
    # that many steps, so the record is the window's true load with Poisson sampling noise.
    gen = torch.Generator().manual_seed(settings.seed + 7)
    window_tokens = float(settings.tokens_per_step * settings.top_k * cost.steps_per_window)
    measured = [torch.poisson(truth[w] * window_tokens, generator=gen) for w in range(len(steps))]
    recent_tokens = float(settings.tokens_per_step * settings.top_k * settings.recent_steps)
    policies: dict[str, RebalancePolicy] = {
        "deepseek": DeepSeekPolicy(),
        "migration_aware": MigrationAwarePolicy(),
    }

    def planner(policy: RebalancePolicy) -> Planner:
        def plan(load: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            return policy.rebalance_experts(
                load, shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_ranks, old
            )

        return plan

    plans: dict[str, tuple[Planner | None, bool]] = {
        "off": (None, False),
        "deepseek": (planner(policies["deepseek"]), False),
        "migration_aware": (planner(policies["migration_aware"]), False),
        "oracle": (planner(policies["migration_aware"]), True),
    }
    runs: dict[str, Run] = {}
    start = initial_placement(shape.num_layers, shape.num_logical, shape.num_physical)
    for name, (plan, oracle) in plans.items():
        run = Run()
        placement = start
        for window in range(settings.num_windows):
            if plan is not None and window > 0:
                load = truth[window] if oracle else measured[window - 1]
                began = time.perf_counter()
                new = plan(load, placement)
                plan_seconds = time.perf_counter() - began
                fetched = refetched_per_rank(placement, new, shape.num_ranks)
                run.refetched.append(float(fetched.sum()) / new.numel())
                run.bytes_moved += float(fetched.sum()) * shape.expert_bytes
                run.stall += cost.stall_seconds(
                    cost.transfer_seconds(fetched, shape.expert_bytes), plan_seconds
                )
                run.plan_ms.append(plan_seconds * 1e3)
                run.duplicates += duplicate_replicas(new, shape.num_ranks)
                placement = new
            even = step_rank_loads(placement, steps[window], shape, dispatch_rounds=None)
            run.step_bal.append(float(token_weighted(even).mean()))
            window_load = expected_rank_loads(placement, truth[window], shape.num_ranks)
            run.window_bal.append(float(token_weighted(window_load.unsqueeze(0))[0]))
            run.window_seconds.append(cost.window_seconds(cost.step_times(even)))
            if plan is None or oracle:
                continue  # references: no dispatch figures (saves run time)
            spread = step_rank_loads(
                placement, steps[window], shape, dispatch_rounds=settings.dispatch_rounds
            )
            run.step_bal_dispatch.append(float(token_weighted(spread).mean()))
            run.window_seconds_dispatch.append(
                cost.window_seconds(cost.step_times(spread, dispatch="per-step"))
            )
            # Lagged dispatch: shares from recent steps' counts (one call per step for all
            # layers), modelled as Poisson counts of the window's load over `recent_steps`.
            recent = torch.poisson(truth[window] * recent_tokens, generator=gen)
            lagged = step_rank_loads(
                placement,
                steps[window],
                shape,
                dispatch_rounds=settings.dispatch_rounds,
                share_load=recent,
            )
            run.step_bal_lagged.append(float(token_weighted(lagged).mean()))
            run.window_seconds_lagged.append(
                cost.window_seconds(cost.step_times(lagged, dispatch="lagged"))
            )
        runs[name] = run
    return runs


# ------------------------------------------------ vLLM's policy, NumPy port


def _np_pack(weight: np.ndarray, num_packs: int) -> tuple[np.ndarray, np.ndarray]:
    """Cardinality-capped LPT per layer, a Python loop with a NumPy argmin per item (as vLLM)."""
    layers, items = weight.shape
    per_pack = items // num_packs
    if per_pack == 1:
        ident = np.tile(np.arange(items, dtype=np.int64), (layers, 1))
        return ident, np.zeros_like(ident)
    order = np.argsort(-weight, axis=-1, kind="stable")
    pack = np.full((layers, items), -1, dtype=np.int64)
    slot = np.full((layers, items), -1, dtype=np.int64)
    for layer in range(layers):
        totals = np.zeros(num_packs, dtype=np.float64)
        filled = np.zeros(num_packs, dtype=np.int64)
        for item in order[layer]:
            target = int(np.argmin(totals))
            pack[layer, item] = target
            slot[layer, item] = filled[target]
            totals[target] += weight[layer, item]
            filled[target] += 1
            if filled[target] == per_pack:
                totals[target] = np.inf
    return pack, slot


def _np_replicate(weight: np.ndarray, num_phy: int) -> tuple[np.ndarray, np.ndarray]:
    """D'Hondt: each extra slot goes to the expert with the largest load per replica."""
    layers, num_log = weight.shape
    phy2log = np.tile(np.arange(num_phy, dtype=np.int64), (layers, 1))
    count = np.ones((layers, num_log), dtype=np.int64)
    rows = np.arange(int(layers))
    for extra in range(num_log, num_phy):
        best = np.argmax(weight / count, axis=-1)
        phy2log[:, extra] = best
        count[rows, best] += 1
    return phy2log, count


def _np_inverse(perm: np.ndarray) -> np.ndarray:
    inv = np.empty_like(perm)
    np.put_along_axis(inv, perm, np.arange(perm.shape[1], dtype=np.int64)[None, :], axis=1)
    return inv


def _np_hierarchical(
    weight: np.ndarray, num_phy: int, groups: int, nodes: int, ranks: int
) -> np.ndarray:
    layers, num_log = weight.shape
    group_size = num_log // groups
    per_rank = num_phy // ranks
    group_pack, group_slot = _np_pack(weight.reshape(layers, groups, group_size).sum(-1), nodes)
    log2mlog = (
        ((group_pack * (groups // nodes) + group_slot) * group_size)[..., None]
        + np.arange(group_size, dtype=np.int64)
    ).reshape(layers, num_log)
    mlog2log = _np_inverse(log2mlog)
    node_weight = np.take_along_axis(weight, mlog2log, axis=1).reshape(-1, num_log // nodes)
    phy2mlog, mcount = _np_replicate(node_weight, num_phy // nodes)
    replica_weight = np.take_along_axis(node_weight / mcount, phy2mlog, axis=1)
    pack, slot = _np_pack(replica_weight, ranks // nodes)
    pphy2phy = _np_inverse(pack * per_rank + slot)
    pphy2mlog = np.take_along_axis(phy2mlog, pphy2phy, axis=1).reshape(layers, nodes, -1)
    pphy2mlog = pphy2mlog + np.arange(0, num_log, num_log // nodes, dtype=np.int64)[None, :, None]
    return np.take_along_axis(mlog2log, pphy2mlog.reshape(layers, -1), axis=1)


def _np_preserve(new: np.ndarray, old: np.ndarray, ranks: int) -> np.ndarray:
    """Per rank: an expert that stays keeps its old slot; newcomers fill the rest in order."""
    layers, num_phy = new.shape
    per_rank = num_phy // ranks
    out = new.copy()
    for rank in range(ranks):
        lo = rank * per_rank
        old_r, new_r = old[:, lo : lo + per_rank], new[:, lo : lo + per_rank]
        used = np.zeros((layers, per_rank), dtype=bool)
        kept = np.zeros((layers, per_rank), dtype=bool)
        for slot in range(per_rank):
            match = (new_r == old_r[:, slot : slot + 1]) & ~used
            hit = match.any(axis=1)
            first = np.argmax(match, axis=1)
            rows = np.nonzero(hit)[0]
            out[rows, lo + slot] = new_r[rows, first[rows]]
            used[rows, first[rows]] = True
            kept[rows, slot] = True
        for layer in range(layers):
            src = np.nonzero(~used[layer])[0]
            dst = np.nonzero(~kept[layer])[0]
            take = min(len(src), len(dst))
            out[layer, lo + dst[:take]] = new_r[layer, src[:take]]
    return out


def vllm_default_numpy(
    weight: torch.Tensor,
    num_replicas: int,
    num_groups: int,
    num_nodes: int,
    num_ranks: int,
    old: torch.Tensor | None = None,
) -> torch.Tensor:
    """vLLM 0.33 ``DefaultEplbPolicy.rebalance_experts`` (phy2log only), ported to NumPy here."""
    load = weight.float().cpu().numpy()
    if num_groups % num_nodes == 0:
        phy2log = _np_hierarchical(load, num_replicas, num_groups, num_nodes, num_ranks)
    else:
        phy2log = _np_hierarchical(load, num_replicas, 1, 1, num_ranks)
    if old is not None:
        phy2log = _np_preserve(phy2log, old.cpu().numpy(), num_ranks)
    return from_numpy(phy2log)


def real_vllm_policy() -> Callable[..., torch.Tensor] | None:
    """vLLM's own ``DefaultEplbPolicy.rebalance_experts`` where vLLM is installed, else None.

    Imported by name: vLLM is optional here, and ``stubs/vllm`` does not describe its policy
    module.
    """
    try:
        module = importlib.import_module("vllm.distributed.eplb.policy.default")
    except ImportError:
        return None
    rebalance: Callable[..., torch.Tensor] = module.DefaultEplbPolicy.rebalance_experts
    return rebalance


@attrs.frozen
class TimeRow:
    shape: str
    load: str
    case: str
    deepseek_ms: float
    new_ms: float
    port_ms: float
    """The NumPy port of vLLM's policy in this file."""
    differing_layers: int
    """Layers where the port's placement is not deepseek's."""
    real_ms: float | None = None
    """vLLM's own DefaultEplbPolicy (None: vLLM not installed)."""
    port_differs_from_real: int | None = None
    """Layers where the port's placement is not vLLM's own."""

    @property
    def vllm_ms(self) -> float:
        """vLLM's time: its own class where installed, else the port's."""
        return self.port_ms if self.real_ms is None else self.real_ms


def _median_ms(call: Callable[[], torch.Tensor], repeats: int) -> tuple[torch.Tensor, float]:
    result = call()
    times: list[float] = []
    for _ in range(repeats):
        began = time.perf_counter()
        result = call()
        times.append((time.perf_counter() - began) * 1e3)
    return result, statistics.median(times)


def time_policies(
    shapes: Sequence[MoEShape], repeats: int, num_layers: int | None
) -> list[TimeRow]:
    """Median plan times of the three policies, fresh and after a 0.2 drift, per shape."""
    rows: list[TimeRow] = []
    ds, new = DeepSeekPolicy(), MigrationAwarePolicy()
    real = real_vllm_policy()
    for shape in shapes:
        layers = num_layers or shape.num_layers
        args = (shape.num_physical, shape.num_groups, shape.num_nodes, shape.num_ranks)
        for dist in (LoadDistribution("lognormal", 1.0), LoadDistribution("zipf", 1.1)):
            w0 = dist.sample(layers, shape.num_logical, seed=11)
            w1 = drift_sequence(w0, Drift("lognormal", 0.2), 1, seed=12)[1]
            old_ds = ds.rebalance_experts(w0, *args)
            old_new = new.rebalance_experts(w0, *args)
            for case, load, o_ds, o_new in (
                ("fresh", w0, None, None),
                ("drift", w1, old_ds, old_new),
            ):
                p_ds, t_ds = _median_ms(partial(ds.rebalance_experts, load, *args, o_ds), repeats)
                _, t_new = _median_ms(partial(new.rebalance_experts, load, *args, o_new), repeats)
                p_v, t_v = _median_ms(partial(vllm_default_numpy, load, *args, o_ds), repeats)
                t_real: float | None = None
                port_vs_real: int | None = None
                if real is not None:
                    p_real, t_real = _median_ms(partial(real, load, *args, o_ds), repeats)
                    port_vs_real = int((p_real != p_v).any(1).sum())
                rows.append(
                    TimeRow(
                        shape.name,
                        dist.name,
                        case,
                        t_ds,
                        t_new,
                        t_v,
                        int((p_ds != p_v).any(1).sum()),
                        t_real,
                        port_vs_real,
                    )
                )
    return rows


class _OpCounter(TorchDispatchMode):
    """Counts the ATen ops a call runs, views excluded: about one GPU kernel each."""

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]  # torch leaves it untyped
        self.ops = 0

    def __torch_dispatch__(
        self,
        func: Any,  # an OpOverload; torch types this dispatch hook loosely
        types: Any,  # see above
        args: Any = (),  # see above
        kwargs: Any = None,  # see above
    ) -> Any:  # see above
        if torch.Tag.view_copy not in getattr(func, "tags", ()) and not func.is_view:
            self.ops += 1
        return func(*args, **(kwargs or {}))


def count_ops(call: Callable[[], torch.Tensor]) -> int:
    """ATen ops (not views) one ``call`` runs."""
    counter = _OpCounter()
    with counter:
        call()
    return counter.ops


def time_dispatch(repeats: int) -> list[tuple[str, float, float]]:
    """Median ms and op count of one layer's dispatch (shares + routing), 8192 x top-8, CPU."""
    from moe_protocols.eplb.dispatch import balanced_dispatch

    out: list[tuple[str, float, float]] = []
    for shape in (STANDARD_SHAPES[1], STANDARD_SHAPES[3]):
        load = LoadDistribution("lognormal", 1.0).sample(1, shape.num_logical, seed=3)
        placement = DeepSeekPolicy().rebalance_experts(
            load, shape.num_physical, 1, 1, shape.num_ranks
        )
        l2p, count = compute_logical_maps(
            placement, shape.num_logical, shape.num_physical - shape.num_logical + 1
        )
        gen = torch.Generator().manual_seed(4)
        ids = torch.multinomial(load[0].float(), 8192 * 8, replacement=True, generator=gen)
        ids = ids.view(8192, 8)
        for width_name, width in (("max_replicas", l2p.shape[-1]), ("trimmed", int(count.max()))):
            call = partial(
                balanced_dispatch,
                ids,
                l2p[0, :, :width],
                count[0],
                num_physical=shape.num_physical,
                num_ranks=shape.num_ranks,
            )
            _, ms = _median_ms(call, repeats)
            out.append((f"{shape.name} ({width_name} = {width})", ms, float(count_ops(call))))
    return out


# ------------------------------------------------------------------- output


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def pct(x: float) -> str:
    return f"{100 * x:+.2f} %"


NAMES = ("off", "deepseek", "migration_aware", "oracle")
EAGER_US = 8.0
"""Projected cost of one small eager PyTorch op on a GPU (CPU dispatch + launch), microseconds."""
GRAPH_US = 2.0
"""Projected cost of one small kernel replayed in a CUDA graph, microseconds."""


def serving_rows(results: dict[tuple[str, str], dict[str, Run]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for (shape, proc), runs in results.items():
        base = runs["deepseek"].total
        for name in NAMES:
            r = runs[name]
            rows.append(
                [
                    shape,
                    proc,
                    name,
                    f"{statistics.mean(r.step_bal):.4f}",
                    f"{statistics.mean(r.step_bal_dispatch):.4f}" if r.step_bal_dispatch else "-",
                    f"{statistics.mean(r.window_bal):.4f}",
                    f"{100 * statistics.mean(r.refetched):.1f} %" if r.refetched else "-",
                    f"{r.bytes_moved / 1e9:.0f}",
                    f"{r.stall:.2f}",
                    f"{r.total:.1f}",
                    pct(r.total / base - 1),
                    f"{r.total_dispatch:.1f}" if r.window_seconds_dispatch else "-",
                    pct(r.total_dispatch / base - 1) if r.window_seconds_dispatch else "-",
                ]
            )
    return rows


def headroom_rows(results: dict[tuple[str, str], dict[str, Run]]) -> list[list[str]]:
    rows: list[list[str]] = []
    for (shape, proc), runs in results.items():
        oracle = runs["oracle"].total
        for name in ("deepseek", "migration_aware"):
            r = runs[name]
            gap = r.total - oracle
            won = r.total - r.total_dispatch
            lag = r.total - r.total_lagged
            rows.append(
                [
                    shape,
                    proc,
                    name,
                    f"{statistics.mean(r.step_bal_lagged):.4f}",
                    pct(gap / r.total),
                    pct(-won / r.total),
                    f"{won / gap:.2f}" if gap > 0 else "n/a",
                    pct(-lag / r.total),
                    f"{lag / gap:.2f}" if gap > 0 else "n/a",
                ]
            )
    return rows


def goals(results: dict[tuple[str, str], dict[str, Run]], times: Sequence[TimeRow]) -> str:
    ratios = {k: v["migration_aware"].total / v["deepseek"].total - 1 for k, v in results.items()}
    worst = max(ratios, key=lambda k: ratios[k])
    median = statistics.median(ratios.values())
    vllm = [(row.new_ms / row.vllm_ms, row) for row in times]
    worst_time = max(vllm, key=lambda item: item[0])
    dups = sum(v["migration_aware"].duplicates for v in results.values())
    recovered: list[float] = []
    lagged: list[float] = []
    for (shape, _proc), runs in results.items():
        if shape.startswith("deepseek-v3") and shape.endswith("/global"):
            r = runs["migration_aware"]
            gap = r.total - runs["oracle"].total
            recovered.append((r.total - r.total_dispatch) / gap if gap > 0 else math.inf)
            lagged.append((r.total - r.total_lagged) / gap if gap > 0 else math.inf)

    def met(ok: bool) -> str:
        return "**met**" if ok else "**not met**"

    if all(row.real_ms is not None for row in times):
        measured_against = (
            "vLLM's own class, installed; its NumPy port here places as vLLM on "
            f"{sum(r.port_differs_from_real == 0 for r in times)} of {len(times)} rows"
        )
    else:
        measured_against = "the NumPy port in this file: vLLM is not installed here"
    lines = [
        f"- migration_aware total time <= deepseek's on every workload and shape: "
        f"{met(ratios[worst] <= 0)} (worst {pct(ratios[worst])}, {worst[0]} {worst[1]})",
        f"- ... and <= -3 % median: {met(median <= -0.03)} (median {pct(median)})",
        f"- policy time <= 0.5x vLLM's DefaultEplbPolicy ({measured_against}): "
        f"{met(worst_time[0] <= 0.5)} (worst {worst_time[0]:.2f}x, {worst_time[1].shape} "
        f"{worst_time[1].load} {worst_time[1].case}); port placements equal deepseek's on "
        f"{sum(r.differing_layers == 0 for r in times)} of {len(times)} rows (the others differ "
        "on a near-tie: the port plans in float32 as vLLM does, deepseek in float64)",
        f"- replicas of one expert sharing a rank in migration_aware plans: {dups}",
        f"- dispatch recovers >= half the oracle headroom of migration_aware on global DeepSeek-V3 "
        f"shapes: {met(bool(recovered) and min(recovered) >= 0.5)} "
        f"(min {min(recovered, default=math.nan):.2f}; lagged shares from the last "
        f"{Settings().recent_steps} steps: min {min(lagged, default=math.nan):.2f})",
    ]
    return "\n".join(lines)


def draw(runs: dict[str, Run], title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True)
    for name, run in runs.items():
        windows = range(len(run.window_seconds))
        (line,) = top.plot(windows, run.window_seconds, label=name)
        bottom.plot(windows, run.step_bal, color=line.get_color(), label=name)
        if run.window_seconds_dispatch:
            top.plot(windows, run.window_seconds_dispatch, linestyle="--", color=line.get_color())
            bottom.plot(windows, run.step_bal_dispatch, linestyle="--", color=line.get_color())
    top.set_ylabel("serving seconds per window")
    bottom.set_ylabel("realised per-step balancedness")
    bottom.set_xlabel("window (dashed: with per-step dispatch)")
    top.set_title(title)
    top.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)  # pyright: ignore[reportUnknownMemberType]  # matplotlib's stub
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (< 30 s)")
    parser.add_argument("--markdown", type=Path, help="write the tables to this file")
    parser.add_argument("--plot", type=Path, help="write the per-window plot (PNG) here")
    parser.add_argument(
        "--overlapped", action="store_true", help="overlapped, not blocking, transfer"
    )
    parser.add_argument(
        "--dispatch-us", type=float, default=0.0, help="per-step dispatch cost per layer-step"
    )
    parser.add_argument(
        "--lagged-us", type=float, default=0.0, help="lagged dispatch: solve cost per step"
    )
    parser.add_argument(
        "--routing-us", type=float, default=0.0, help="lagged dispatch: routing per layer-step"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    began = time.perf_counter()
    cost = CostModel(
        blocking=not args.overlapped,
        dispatch_seconds=args.dispatch_us * 1e-6,
        lagged_seconds=args.lagged_us * 1e-6,
        routing_seconds=args.routing_us * 1e-6,
    )
    if args.quick:
        settings = Settings(num_windows=6, num_layers=6)
        shapes: Sequence[MoEShape] = (STANDARD_SHAPES[1], STANDARD_SHAPES[2])
        repeats = 1
    else:
        settings = Settings()
        shapes = STANDARD_SHAPES
        repeats = 3
    # A window's steps stand for `steps_per_window` real ones; the rebalance cadence is the model's.
    results: dict[tuple[str, str], dict[str, Run]] = {}
    for shape in shapes:
        for process in PROCESSES:
            results[(shape.name, process.name)] = simulate(shape, process, settings, cost)
            print(
                f"  simulated {shape.name} {process.name} ({time.perf_counter() - began:.0f} s)",
                file=sys.stderr,
            )
    times = time_policies(shapes, repeats, settings.num_layers)
    dispatch_times = time_dispatch(max(repeats, 3))
    out = [
        "# EPLB serving simulator",
        "",
        f"Cost model: {cost}. Load: {settings}. Processes: "
        + "; ".join(str(p) for p in PROCESSES)
        + ".",
        "",
        "## Goals",
        "",
        goals(results, times),
        "",
        "## Serving (per policy; ratios are total time vs deepseek)",
        "",
        "`step bal.` = mean per-step token-weighted balancedness (even split / with dispatch); "
        "`window bal.` = on the window's true mean load; `refetched` = mean per rebalance; "
        "`GB` = bytes moved over the run; `stall` = seconds lost to rebalances.",
        "",
        table(
            [
                "shape",
                "process",
                "policy",
                "step bal.",
                "step bal. dispatch",
                "window bal.",
                "refetched",
                "GB",
                "stall s",
                "total s",
                "vs deepseek",
                "total s dispatch",
                "dispatch vs deepseek",
            ],
            serving_rows(results),
        ),
        "",
        "## Oracle headroom and what dispatch wins back",
        "",
        "`headroom` = (policy - oracle) / policy total time, the oracle planning each window on "
        "its true loads (no dispatch); `dispatch` = change of the policy's own total time with "
        "per-step dispatch (shares from the step's own counts, one solve per layer per step); "
        "`recovered` = time it saves / headroom (> 1: more than the oracle plan); `lagged` = "
        "shares from the counts of the last `recent_steps` steps instead (one solve per step for "
        "all layers, before the step), with its per-step balancedness.",
        "",
        table(
            [
                "shape",
                "process",
                "policy",
                "step bal. lagged",
                "headroom",
                "dispatch",
                "recovered",
                "lagged",
                "recovered lagged",
            ],
            headroom_rows(results),
        ),
        "",
        "## Policy time (median ms, one CPU thread)",
        "",
        "`vllm` = vLLM 0.33's own DefaultEplbPolicy (`n/a`: vLLM is not installed in the "
        "interpreter that ran this); `port` = its NumPy port in this file; the ratios are to "
        "`vllm` where it ran, else to the port; `port != vllm` and `port != deepseek` = layers "
        "where the port's placement differs.",
        "",
        table(
            [
                "shape",
                "load",
                "case",
                "deepseek",
                "migration_aware",
                "vllm",
                "port",
                "new / vllm",
                "deepseek / vllm",
                "port != vllm",
                "port != deepseek",
            ],
            [
                [
                    r.shape,
                    r.load,
                    r.case,
                    f"{r.deepseek_ms:.2f}",
                    f"{r.new_ms:.2f}",
                    "n/a" if r.real_ms is None else f"{r.real_ms:.2f}",
                    f"{r.port_ms:.2f}",
                    f"{r.new_ms / r.vllm_ms:.2f}",
                    f"{r.deepseek_ms / r.vllm_ms:.2f}",
                    "n/a" if r.port_differs_from_real is None else str(r.port_differs_from_real),
                    str(r.differing_layers),
                ]
                for r in times
            ],
        ),
        "",
        "## Dispatch cost (one MoE layer, 8192 tokens x top-8, shares + routing, CPU, 1 thread)",
        "",
        f"{DEFAULT_DISPATCH_ROUNDS} rounds. `ops` = ATen ops per call (views excluded), about "
        "one GPU kernel each; all tensors are small (`[experts, width]`, plus one sort of the "
        "65,536 choices), so on a GPU the call is launch-bound. Projection (no GPU here): "
        f"eager at ~{EAGER_US} us per op, in a CUDA graph at ~{GRAPH_US} us per kernel.",
        "",
        table(
            [
                "placement",
                "CPU median ms",
                "ops",
                "GPU eager (projected) ms",
                "GPU CUDA graph (projected) ms",
            ],
            [
                [
                    name,
                    f"{ms:.3f}",
                    f"{ops:.0f}",
                    f"{ops * EAGER_US / 1e3:.2f}",
                    f"{ops * GRAPH_US / 1e3:.2f}",
                ]
                for name, ms, ops in dispatch_times
            ],
        ),
        "",
        f"Run time {time.perf_counter() - began:.0f} s, torch {torch.__version__}.",
    ]
    text = "\n".join(out)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.plot:
        key = next(k for k in results if k[1] == "shift")
        draw(results[key], f"{key[0]}, {key[1]}", args.plot)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
