"""How the EP ranks agree before they move anything: fingerprints, votes and the lockstep check.

Every multi-rank ``rearrange`` and ``update_mapping`` starts with agreements:
one all-reduce tells every rank whether any rank failed (and the lowest one),
and whether every rank passed the same digests (fingerprints of what it is
about to do). A rank that failed shares its failure instead of leaving the
others waiting; a rank whose digest differs is named by every rank.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Final, TypeVar

import attrs
import torch

from moe_protocols._torch_typed import int_list
from moe_protocols.errors import EplbStateError, MappingError

from ._deadline import Deadline, Phase, PhaseHook, run_phase

if TYPE_CHECKING:
    from collections.abc import Mapping

    from moe_protocols.parallel import ExpertParallelContext

    from ._results import ModelEplbState

__all__ = ["GroupVerdict", "RankGroup", "agree", "describe", "digest"]

_SHIFT: Final = 32  # verdict code: rank in the high bits, step in the low bits
_T = TypeVar("_T")


def digest(*parts: object) -> int:
    """A 61-bit fingerprint of ``repr(parts)`` (ints, strings, nested lists) for cross-rank checks.

    Fits an int64 with its negation, so ranks compare digests with one MAX all-reduce.
    """
    raw = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(raw, "big") >> 3


@attrs.frozen
class GroupVerdict:
    """What one agreement round established over the EP group."""

    failed_rank: int | None
    """Lowest EP rank that reported a failure, or ``None``."""
    failed_at: int | None
    """The step (caller-defined index) that rank failed at, or ``None``."""
    mismatched: tuple[int, ...] = ()
    """Positions of the digests that differ between ranks."""

    @property
    def digests_agree(self) -> bool:
        """Whether every rank passed the same digests."""
        return not self.mismatched

    @property
    def ok(self) -> bool:
        """No rank failed and every digest agrees."""
        return self.failed_rank is None and self.digests_agree


def agree(
    ep: ExpertParallelContext,
    *,
    failed_at: int | None,
    digests: Sequence[int] = (),
    device: torch.device | str = "cpu",
    wait: Deadline | None = None,
) -> GroupVerdict:
    """One all-reduce: whether any rank failed (and the first one), and whether digests match.

    A collective: call on every rank with the same number of ``digests``.
    ``failed_at`` is this rank's failure step (``0 <= failed_at < 2**32``) or
    ``None``; ``wait`` bounds the wait (``None``: the group's timeout).
    Raises whatever ``torch.distributed`` raises (e.g. a timeout).
    """
    rank, world = ep.rank, ep.world_size
    code = world << _SHIFT if failed_at is None else (rank << _SHIFT) | failed_at
    # MAX of the negated code is MIN of the code: the lowest failing rank wins.
    values = [-code, *digests, *(-d for d in digests)]
    tensor = torch.tensor(values, dtype=torch.int64, device=device)
    ep.all_reduce_(tensor, op="max", wait=wait)
    reduced = int_list(tensor)
    best = -reduced[0]
    n = len(digests)
    highs, lows = reduced[1 : 1 + n], [-v for v in reduced[1 + n :]]
    mismatched = tuple(i for i, (hi, lo) in enumerate(zip(highs, lows, strict=True)) if hi != lo)
    failed_rank = best >> _SHIFT
    if failed_rank >= world:
        return GroupVerdict(None, None, mismatched)
    return GroupVerdict(failed_rank, best & ((1 << _SHIFT) - 1), mismatched)


@attrs.frozen
class RankGroup:
    """The EP group as an EPLB state's collectives see it: the ranks, where they agree, the hook."""

    ep: ExpertParallelContext
    """The EP group."""
    device: torch.device
    """Where the small tensors the ranks agree with live (a GPU for NCCL, the CPU for gloo)."""
    hook: PhaseHook | None = None
    """Fault injection for tests, called before each collective (``TransferOptions.phase_hook``)."""

    def collective(self, phase: Phase, what: str, run: Callable[[Deadline], _T]) -> _T:
        """Run ``run(deadline)``; a failure names the ranks that did not arrive (see _deadline)."""
        return run_phase(self.ep, phase, what, run, device=self.device, hook=self.hook)

    def vote(
        self, failure: Exception | None, phase: Phase, what: str, digests: Sequence[int] = ()
    ) -> GroupVerdict:
        """One agreement round: who failed (this rank included), which digests differ.

        In one process nothing is exchanged: the verdict is this rank's own.
        """
        failed_at = None if failure is None else 0
        if not self.ep.is_distributed:
            return GroupVerdict(None if failure is None else self.ep.rank, failed_at)
        return self.collective(
            phase,
            what,
            lambda wait: agree(
                self.ep, failed_at=failed_at, digests=digests, device=self.device, wait=wait
            ),
        )

    def agree_on(
        self,
        failure: Exception | None,
        compute_digests: Callable[[], list[int]],
        width: int,
        phase: Phase,
        what: str,
    ) -> GroupVerdict:
        """Compare ``compute_digests()`` across ranks; this rank's own failure is re-raised as is.

        A rank that already failed, or fails computing its digests, still takes
        part (with ``width`` zeros), so the others learn of it instead of waiting.
        """
        digests = [0] * width
        if failure is None:
            try:
                digests = compute_digests()
            except Exception as exc:
                failure = exc
        verdict = self.vote(failure, phase, what, digests)
        if failure is not None:
            raise failure
        return verdict

    def check_plans(
        self, failure: Exception | None, compute_digests: Callable[[], list[int]], policy: str
    ) -> None:
        """Share planning failures and compare the three digests of what every rank will do.

        The digests: the registered models, the new placements, the weight
        layouts with the transfer options (``policy`` names the policy).
        """
        verdict = self.agree_on(
            failure, compute_digests, 3, "plan agreement", "agreeing on the new placements"
        )
        if verdict.failed_rank is not None:
            raise EplbStateError(
                f"EP rank {verdict.failed_rank} failed to plan the new placements (see its "
                f"error); EP rank {self.ep.rank} changed nothing"
            )
        if not verdict.digests_agree:
            what = [
                (
                    "their registered models (names or expert counts)",
                    "the placements their policies computed from the same all-reduced load "
                    f"(policy {policy!r} must be deterministic)",
                    "their expert weight layouts or transfer options",
                )[i]
                for i in verdict.mismatched
            ]
            raise EplbStateError(
                f"EP ranks disagree on the rearrangement: {'; '.join(what)} differ across "
                f"ranks. EP rank {self.ep.rank} changed nothing"
            )

    def check_placement(
        self, failure: Exception | None, compute_digests: Callable[[], list[int]], model_name: str
    ) -> None:
        """Share a rejected placement and compare the placement and weight layout digests."""
        verdict = self.agree_on(
            failure,
            compute_digests,
            2,
            "placement agreement",
            "agreeing on the placement to restore",
        )
        if verdict.failed_rank is not None:
            raise MappingError(
                f"EP rank {verdict.failed_rank} rejected the placement for model "
                f"{model_name!r} (see its error); EP rank {self.ep.rank} changed nothing"
            )
        if 0 in verdict.mismatched:
            raise MappingError(
                f"EP ranks were given different placements for model {model_name!r}; "
                "every rank must restore the same placement. EP rank "
                f"{self.ep.rank} changed nothing"
            )
        if not verdict.digests_agree:
            raise EplbStateError(
                f"EP ranks disagree on the expert weight layout of model {model_name!r} "
                f"or on their transfer options. EP rank {self.ep.rank} changed nothing"
            )

    def check_lockstep(self, counts: tuple[int, int], readable: str, mine: int) -> None:
        """Check that every rank made the same steps and rearrangements, with the same models.

        ``counts`` are this rank's ``(steps taken, rearrangements)``; ``readable``
        and ``mine`` describe its models and settings (``mine`` a non-zero
        digest). One all-reduce of a fixed size (``4 + world_size``), before any
        collective whose size depends on the models: ranks whose models or
        settings differ are named by every rank instead of crashing a peer with
        a collective of mismatched size.
        """
        world, rank = self.ep.world_size, self.ep.rank
        values = torch.tensor(
            [v for c in counts for v in (c, -c)] + [mine if r == rank else 0 for r in range(world)],
            dtype=torch.int64,
            device=self.device,
        )
        self.collective(
            "lockstep check",
            "checking that the EP ranks are in lockstep",
            lambda wait: self.ep.all_reduce_(values, op="max", wait=wait),
        )
        reduced = int_list(values)
        descriptors = reduced[4:]
        if len(set(descriptors)) > 1:
            differ = [r for r in range(world) if descriptors[r] != descriptors[0]]
            raise EplbStateError(
                f"EP ranks {', '.join(map(str, differ))} registered other models, shapes or "
                f"settings than EP rank 0 (EP rank {rank} has: {readable}). Every rank must "
                "register the same models, with the same expert counts, layers, weight "
                "shapes and dtypes, and use the same policy and settings; nothing was changed"
            )
        spread = _lockstep_spread(reduced[:4], counts, rank)
        if spread:
            raise EplbStateError(
                f"EP ranks are out of lockstep: the EP group made {' and '.join(spread)}. Every "
                "rank must call step() the same number of times, dummy steps included, and "
                "rearrange together; nothing was changed"
            )


def _lockstep_spread(reduced: list[int], counts: tuple[int, int], rank: int) -> list[str]:
    """What the group's reduced ``(max, -min)`` counts say about ranks out of step."""
    most_steps, fewest_steps, most_rearr, fewest_rearr = (
        v if i % 2 == 0 else -v for i, v in enumerate(reduced)
    )
    spread: list[str] = []
    if most_steps != fewest_steps:
        spread.append(
            f"between {fewest_steps} and {most_steps} step() calls (EP rank {rank}: {counts[0]})"
        )
    if most_rearr != fewest_rearr:
        spread.append(
            f"between {fewest_rearr} and {most_rearr} rearrangements (EP rank {rank}: {counts[1]})"
        )
    return spread


def describe(
    models: Mapping[str, ModelEplbState], settings: tuple[str, str, int, int]
) -> tuple[str, int]:
    """What every rank must agree on before a collective whose size depends on it.

    ``(readable, digest)``: the registered models with their shapes and the
    settings the rearrangement depends on (policy, integrity, ranks, nodes).
    """
    described = [
        (
            name,
            state.num_layers,
            state.num_logical_experts,
            state.num_physical_experts,
            state.num_local_physical_experts,
            int(state.expert_load_window.shape[0]),
            [
                [(tuple(w.shape[1:]), str(w.dtype)) for w in weights]
                for weights in state.model.expert_weights
            ],
        )
        for name, state in models.items()
    ]
    readable = "; ".join(
        f"model {name!r}: {layers} MoE layers, {logical} experts in {physical} slots "
        f"({local} local), window {window}"
        for name, layers, logical, physical, local, window, _ in described
    )
    readable += (
        f"; policy {settings[0]!r}, integrity {settings[1]!r}, {settings[2]} placement "
        f"ranks on {settings[3]} nodes"
    )
    return readable, digest(described, settings) + 1  # never 0: 0 means "not this rank's"
