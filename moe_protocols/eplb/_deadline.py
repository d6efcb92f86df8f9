"""Deadlines on the collectives of a multi-rank EPLB operation, and naming the rank that is missing.

Every collective that a multi-rank :meth:`EplbState.rearrange` or
``update_mapping`` issues runs in a named *phase* and is waited for at most a
*deadline*: :attr:`ExpertParallelContext.collective_timeout` when set, else
the process group's own timeout (the one given to ``init_process_group`` or
``new_group``), capped at :data:`~moe_protocols.parallel.MAX_COLLECTIVE_TIMEOUT`.

When a collective fails (a peer closed its connection, e.g. because it died,
or the deadline passed), the rank *reports in*: it writes its phase under its
EP rank in the process group's store (``ProcessGroup.get_group_store()``, which
gloo and NCCL groups both have), then waits one more deadline for every other
rank's report. A rank whose report is still missing is named; every rank that
reported raises the same :class:`~moe_protocols.errors.CollectiveTimeoutError`
(a :class:`~moe_protocols.errors.TransferTimeoutError` in the exchange and the
commit vote) with the missing ranks and the earliest phase any rank reported.
A rank still alive but more than one deadline behind counts as missing.

The success path costs nothing but ``async_op=True`` and ``work.wait(timeout)``:
the store is written only after a failure. That relies on a failed group
staying failed (gloo closes its connections, a dead peer never comes back), so
a group reports at most once: replace it, and the dead rank, before the next
rearrangement.

Limits. A rank that dies *inside* the commit vote's all-reduce, after its
vote left, may let some survivors finish the vote (and commit) while others
raise: no all-reduce is atomic. When the store lives in the dead process (a
``tcp://`` rendezvous hosted by rank 0 rather than by an agent), the survivors
cannot name it: ``missing_ranks`` is empty and the message says the store was
unreachable. On NCCL a work past its deadline is abandoned, not aborted;
NCCL's watchdog aborts the communicator at the group's timeout. Only gloo is
tested here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from datetime import timedelta
from typing import TYPE_CHECKING, Final, Literal, TypeAlias, TypeVar, final, get_args

import torch
import torch.distributed as dist

from moe_protocols.errors import CollectiveTimeoutError, MoEProtocolsError, TransferTimeoutError
from moe_protocols.parallel import MAX_COLLECTIVE_TIMEOUT

if TYPE_CHECKING:
    from torch.distributed.distributed_c10d import Store

    from moe_protocols.parallel import ExpertParallelContext

__all__ = ["PHASES", "Deadline", "Phase", "PhaseHook", "deadline", "run_phase"]

Phase: TypeAlias = Literal[
    "lockstep check",
    "load reduce",
    "plan agreement",
    "placement agreement",
    "fingerprint gather",
    "exchange",
    "commit vote",
    "staged check",
    "commit check",
]
"""The phases of a multi-rank EPLB operation that issue collectives, in the order it runs them."""

PHASES: Final[tuple[Phase, ...]] = get_args(Phase)
"""The phases in the order an operation runs them (``update_mapping`` skips the first three)."""

_TRANSFER_PHASES: Final = frozenset({"exchange", "commit vote", "staged check", "commit check"})
_REPORT_KEY: Final = "moe_protocols/eplb/lost/{rank}"
_BROKEN_KEY: Final = "moe_protocols/eplb/broken"
_SLICE_S: Final = 0.1
"""How often a rank still waiting looks whether another one has reported the group broken."""

PhaseHook: TypeAlias = Callable[[Phase, int], None]
"""Test hook ``hook(phase, ep_rank)``, called on every rank before each collective of a phase.

For fault-injection tests (killing or stalling a rank at a given phase);
leave it ``None`` in production.
"""

_T = TypeVar("_T")


def _group_timeout(group: dist.ProcessGroup | None, device: torch.device) -> timedelta | None:
    """The timeout the group's backend for ``device`` was created with, if torch tells."""
    try:
        pg = group if group is not None else dist.group.WORLD
        # Private but stable since torch 2.0: the backend's options hold the timeout.
        backend = pg._get_backend(device)  # type: ignore[union-attr]  # WORLD may be None: caught
        seconds = float(backend.options._timeout.total_seconds())
        return timedelta(seconds=seconds)
    except Exception:  # no such backend or options, or beyond timedelta's range
        return None


def deadline(ep: ExpertParallelContext, device: torch.device | str = "cpu") -> timedelta:
    """How long one EPLB collective on ``ep`` may take before the rank reports in.

    ``ep.collective_timeout`` when set; else the process group's timeout for
    ``device``'s backend, or torch's default when the group does not say;
    at most :data:`~moe_protocols.parallel.MAX_COLLECTIVE_TIMEOUT` (a group
    created with ``timedelta.max`` would otherwise time out at once).
    """
    if ep.collective_timeout is not None:
        return ep.collective_timeout
    timeout = _group_timeout(ep.group, torch.device(device))
    if timeout is None or timeout <= timedelta(0):
        timeout = dist.default_pg_timeout
    return min(timeout, MAX_COLLECTIVE_TIMEOUT)


class _GroupBroken(RuntimeError):
    """Another rank reported in while this one still waited: the group is broken."""


@final
class Deadline:
    """Waits for the works of one phase, all within one deadline (see the module docstring).

    Called with each ``torch.distributed`` work the phase issued
    (``async_op=True``); returns once it completed, and raises when it
    failed, when the deadline passed, or when another rank has reported the
    group broken (checked every ``_SLICE_S`` while waiting, one store read).
    On gloo the wait is ``work.wait(timeout=...)`` in slices; elsewhere
    (NCCL, whose timed-out wait may abort the communicator) ``is_completed()``
    is polled and ``wait()`` called only once the work is done.
    """

    def __init__(
        self, ep: ExpertParallelContext, limit: timedelta, device: torch.device | str = "cpu"
    ) -> None:
        self.limit = limit
        self._ep = ep
        self._end = time.monotonic() + limit.total_seconds()
        try:
            pg = ep.group if ep.group is not None else dist.group.WORLD
            backend = pg._get_backend(torch.device(device))  # type: ignore[union-attr]  # as above
            self._gloo = backend.name() == "gloo"
        except Exception:
            self._gloo = False

    def all(self, works: Iterable[dist.Work]) -> None:
        """Wait for each of ``works`` in turn (a batch's P2P ops), all within the deadline."""
        for work in works:
            self(work)

    def __call__(self, work: dist.Work) -> None:
        pause = 20e-6
        while True:
            left = self._end - time.monotonic()
            slice_s = max(min(_SLICE_S, left), 0.001)  # 0 would mean "forever" to torch
            if self._gloo:
                try:
                    work.wait(timeout=timedelta(seconds=slice_s))
                    return
                except Exception:
                    if work.is_completed():
                        work.wait()  # returns if it just succeeded, else raises its error
                        return
            else:
                checked = time.monotonic()
                while not work.is_completed() and time.monotonic() - checked < slice_s:
                    time.sleep(pause)
                    pause = min(2 * pause, 0.01)
                if work.is_completed():
                    work.wait()
                    return
            if time.monotonic() >= self._end:
                raise TimeoutError(f"no answer within {self.limit.total_seconds():g} s")
            if _broken(self._ep):
                raise _GroupBroken("another EP rank reported the EP group broken")


def run_phase(
    ep: ExpertParallelContext,
    phase: Phase,
    what: str,
    run: Callable[[Deadline], _T],
    *,
    device: torch.device | str = "cpu",
    hook: PhaseHook | None = None,
    layer: int | None = None,
) -> _T:
    """Run one phase's collective, ``run(wait)``; a failure names the ranks that did not arrive.

    ``run`` issues its collectives with ``async_op=True`` and hands each work
    to ``wait`` (a :class:`Deadline`). ``what`` says what the collective does,
    for the message; ``layer`` is the MoE layer a transfer phase was at.
    Errors of this library pass through.

    Raises:
        CollectiveTimeoutError: the collective failed or passed its deadline;
            a :class:`~moe_protocols.errors.TransferTimeoutError` in the
            ``"exchange"`` and ``"commit vote"`` phases.
    """
    if hook is not None:
        hook(phase, ep.rank)
    wait = Deadline(ep, deadline(ep, device), device)
    try:
        return run(wait)
    except MoEProtocolsError:
        raise
    except Exception as exc:
        raise _lost(ep, phase, what, exc, wait.limit, layer) from exc


def _store(ep: ExpertParallelContext) -> Store:
    pg = ep.group if ep.group is not None else dist.group.WORLD
    return pg.get_group_store()  # type: ignore[union-attr]  # WORLD is set once EPLB runs


def _broken(ep: ExpertParallelContext) -> bool:
    """Whether some rank of the group has reported in (a failed store read counts as no)."""
    try:
        return bool(_store(ep).check([_BROKEN_KEY]))
    except Exception:
        return False


def _report_in(
    ep: ExpertParallelContext, phase: Phase, window: timedelta
) -> tuple[tuple[int, ...], Phase, str]:
    """Write this rank's report, wait for the others'; ``(missing, earliest phase, note)``."""
    try:
        store = _store(ep)
        keys = [_REPORT_KEY.format(rank=r) for r in range(ep.world_size)]
        store.set(keys[ep.rank], phase)
        store.set(_BROKEN_KEY, "1")
        with contextlib.suppress(Exception):  # a missing report is what we look for
            store.wait(keys, window)
        present = [r for r in range(ep.world_size) if store.check([keys[r]])]
        phases = {store.get(keys[r]).decode() for r in present}
    except Exception as exc:
        note = (
            f"; the process group's store could not be reached to find out who is missing "
            f"({type(exc).__name__}: {exc})"
        )
        return (), phase, note
    missing = tuple(r for r in range(ep.world_size) if r not in present)
    # PHASES is in running order: the first one reported is the earliest.
    reported: list[Phase] = [p for p in PHASES if p in phases]
    earliest = reported[0] if reported else phase
    return missing, earliest, ""


def _lost(
    ep: ExpertParallelContext,
    phase: Phase,
    what: str,
    cause: Exception,
    limit: timedelta,
    layer: int | None,
) -> CollectiveTimeoutError:
    """The error this rank raises after its collective in ``phase`` failed."""
    rank, seconds = ep.rank, limit.total_seconds()
    missing, group_phase, note = _report_in(ep, phase, limit)
    if missing:
        who = f"EP rank{'s' if len(missing) > 1 else ''} {', '.join(map(str, missing))}"
        verb = "do" if len(missing) > 1 else "does"
        story = (
            f"{who} did not arrive in the {group_phase} phase within the {seconds:g} s deadline "
            f"and {verb} not answer: dead, hung or out of lockstep"
        )
    elif note:
        story = f"the EP group broke in the {group_phase} phase{note}"
    else:
        story = (
            f"the EP group broke in the {group_phase} phase and every other rank reported in, "
            f"so this rank is the one that fell more than the {seconds:g} s deadline behind"
        )
    where = "" if group_phase == phase else f" (this rank was in the {phase} phase)"
    message = (
        f"EP rank {rank}: {story}{where}. This rank was {what} "
        f"({type(cause).__name__}: {cause}). Nothing changed on this rank; the process group "
        "is unusable now: replace it (and the missing ranks) before rearranging again"
    )
    kind = TransferTimeoutError if group_phase in _TRANSFER_PHASES else CollectiveTimeoutError
    return kind(message, phase=group_phase, missing_ranks=missing, deadline_s=seconds, layer=layer)
