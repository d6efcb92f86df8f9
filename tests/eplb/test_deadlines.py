"""No silent stall: a rank killed in any phase of a rearrangement is named by every other rank.

One spawned world of gloo processes (see ``_distributed_workers.deadlines``):
two survivors and one victim per case, each case on a 3-rank group of its own
with a 1 s timeout. The victim kills itself with a real ``SIGKILL`` when it
enters the case's phase; the survivors record the error they raised, how long
it took, and whether anything changed.
"""

from __future__ import annotations

import time
from datetime import timedelta
from typing import cast

import pytest
import torch.distributed as dist
from _distributed_workers import (
    DEADLINE_CASES,
    DEADLINE_S,
    DEADLINE_VICTIMS,
    DEADLINE_WORLD,
    DeadlineCase,
    RankResult,
    run_group,
)

from moe_protocols.eplb import TransferOptions
from moe_protocols.eplb._deadline import Deadline, deadline
from moe_protocols.errors import (
    CollectiveTimeoutError,
    EplbConfigError,
    EplbStateError,
    TransferError,
    TransferTimeoutError,
)
from moe_protocols.parallel import MAX_COLLECTIVE_TIMEOUT, ExpertParallelContext

# A survivor's collective fails at once (the victim's sockets close), then it
# waits one deadline for the other ranks' reports; the rest is slack for a busy CI.
BOUND_S = 2 * DEADLINE_S + 4.0


@pytest.fixture(scope="module")
def survivors(tmp_path_factory: pytest.TempPathFactory) -> list[RankResult]:
    return run_group(
        "deadlines",
        DEADLINE_WORLD,
        tmp_path_factory.mktemp("deadlines"),
        timeout_s=150.0,
        killed=DEADLINE_VICTIMS,
    )


@pytest.mark.distributed
@pytest.mark.parametrize("case", DEADLINE_CASES, ids=lambda case: case.name)
def test_a_rank_killed_in_a_phase_is_named_by_every_survivor_who_changes_nothing(
    survivors: list[RankResult], case: DeadlineCase
) -> None:
    assert len(survivors) == 2
    for result in survivors:
        error = result.values[case.name]
        assert isinstance(error, dict), (result.rank, error)
        own, victim = cast("list[int]", result.values[f"{case.name}.ranks"])
        transfer = case.phase in ("exchange", "commit vote")
        assert error["type"] == ("TransferTimeoutError" if transfer else "CollectiveTimeoutError")
        assert error["phase"] == case.phase
        assert error["missing_ranks"] == [victim]
        assert f"EP rank {victim} did not arrive in the {case.phase} phase" in error["message"]
        assert error["message"].startswith(f"EP rank {own}:")
        if transfer:
            assert error["rank"] == victim
        assert result.values[f"{case.name}.changed"] == []
        before, after = cast("list[object]", result.values[f"{case.name}.counters"])
        assert before == after
        assert cast("float", result.values[f"{case.name}.seconds"]) < BOUND_S


def test_the_timeout_errors_keep_the_documented_contract() -> None:
    # rearrange documents EplbStateError for a failed collective and TransferError
    # for the exchange: callers catching those keep working.
    assert issubclass(CollectiveTimeoutError, EplbStateError)
    assert issubclass(TransferTimeoutError, CollectiveTimeoutError)
    assert issubclass(TransferTimeoutError, TransferError)
    error = TransferTimeoutError("x", phase="exchange", missing_ranks=[2, 1], deadline_s=2.0)
    assert (error.rank, error.missing_ranks, error.layer) == (1, (2, 1), None)
    nobody = TransferTimeoutError("x", phase="commit vote", missing_ranks=(), deadline_s=2.0)
    assert nobody.rank is None


@pytest.mark.parametrize(
    "value",
    [
        2.0,
        True,
        "5s",
        timedelta(0),
        timedelta(seconds=-1),
        timedelta(microseconds=999),
        MAX_COLLECTIVE_TIMEOUT + timedelta(seconds=1),
        timedelta.max,
    ],
    ids=repr,
)
def test_a_bad_collective_timeout_is_rejected(value: object) -> None:
    with pytest.raises(EplbConfigError, match="collective_timeout"):
        ExpertParallelContext(collective_timeout=value)  # type: ignore[arg-type]  # deliberately not a timedelta


class Span:
    """A duration that is not a ``timedelta`` but says its seconds (as pandas' Timedelta does)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def total_seconds(self) -> float:
        return self.seconds


def test_a_timeout_that_says_its_seconds_is_taken_as_a_timedelta() -> None:
    ep = ExpertParallelContext(collective_timeout=Span(1.5))  # type: ignore[arg-type]  # a duck-typed span, not a timedelta
    assert ep.collective_timeout == timedelta(seconds=1.5)
    with pytest.raises(EplbConfigError, match="between"):
        ExpertParallelContext(collective_timeout=Span(float("nan")))  # type: ignore[arg-type]  # a duck-typed span, not a timedelta


def test_a_bad_phase_hook_is_rejected() -> None:
    with pytest.raises(EplbConfigError, match="phase_hook"):
        TransferOptions(phase_hook=3)  # type: ignore[arg-type]  # deliberately not callable


def test_the_deadline_is_the_override_else_the_groups_timeout_capped() -> None:
    override = timedelta(seconds=3)
    assert deadline(ExpertParallelContext(collective_timeout=override)) == override
    # Without an initialised group torch's default applies.
    assert deadline(ExpertParallelContext(world_size=2)) == dist.default_pg_timeout
    assert deadline(ExpertParallelContext(collective_timeout=MAX_COLLECTIVE_TIMEOUT)) == (
        MAX_COLLECTIVE_TIMEOUT
    )


class FakeWork:
    """A ``dist.Work`` stand-in for the polling path (what NCCL takes): done after some polls."""

    def __init__(self, done_after: int | None, error: Exception | None = None) -> None:
        self.done_after, self.error, self.polls = done_after, error, 0

    def is_completed(self) -> bool:
        self.polls += 1
        return self.done_after is not None and self.polls >= self.done_after

    def wait(self, timeout: timedelta | None = None) -> bool:
        if self.error is not None:
            raise self.error
        return True


def wait_for(work: FakeWork, seconds: float) -> None:
    # No group is initialised, so the wait polls is_completed() as on NCCL.
    Deadline(ExpertParallelContext(world_size=2), timedelta(seconds=seconds))(
        cast("dist.Work", work)
    )


def test_polling_returns_once_the_work_completes() -> None:
    work = FakeWork(done_after=5)
    wait_for(work, 5.0)
    assert work.polls >= 5


def test_polling_raises_the_works_own_error() -> None:
    with pytest.raises(RuntimeError, match="connection reset"):
        wait_for(FakeWork(done_after=2, error=RuntimeError("connection reset")), 5.0)


def test_polling_gives_up_at_the_deadline() -> None:
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"no answer within 0\.3 s"):
        wait_for(FakeWork(done_after=None), 0.3)
    assert 0.3 <= time.monotonic() - started < 2.0


def test_the_deadline_is_read_from_the_process_groups_timeout() -> None:
    dist.init_process_group(
        "gloo",
        store=dist.HashStore(),  # type: ignore[attr-defined]  # torch re-exports it implicitly
        rank=0,
        world_size=1,
        timeout=timedelta(seconds=7),
    )
    try:
        assert deadline(ExpertParallelContext.from_process_group()) == timedelta(seconds=7)
        # cast: torch types new_group with its non-member sentinels; this rank is a member.
        short = cast("dist.ProcessGroup", dist.new_group(timeout=timedelta(seconds=2)))
        assert deadline(ExpertParallelContext.from_process_group(short)) == timedelta(seconds=2)
        # torch's clock overflows on a huge timeout and gives up at once: capped.
        huge = cast("dist.ProcessGroup", dist.new_group(timeout=timedelta(days=10_000)))
        assert deadline(ExpertParallelContext.from_process_group(huge)) == MAX_COLLECTIVE_TIMEOUT
        override = ExpertParallelContext.from_process_group(
            short, collective_timeout=timedelta(milliseconds=250)
        )
        assert deadline(override) == timedelta(milliseconds=250)
    finally:
        dist.destroy_process_group()
