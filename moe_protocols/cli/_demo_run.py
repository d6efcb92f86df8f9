"""The seed scenario, end to end: a VLM-wrapped MoE model served with EPLB on.

``moe-protocols demo`` builds the tiny vision-language model (which does not
implement ``MixtureOfExperts``; its language model does), loads it into the
reference runner with EPLB enabled, and feeds it a skewed synthetic token
stream (token ids drawn from a Zipf law, so a few tokens and hence a few
experts are hot). It reports what a runner operator wants to see: how the
MoE model was found, balancedness before and after every rearrangement,
slots and bytes moved, and that the model's outputs did not change.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

import attrs
import torch

from moe_protocols.adapters import MoEView
from moe_protocols.eplb import BalancednessStats, EplbConfig, EplbState, rank_loads_from_physical
from moe_protocols.models import TinyVLMForConditionalGeneration, tiny_vlm
from moe_protocols.runner import ReferenceRunner, RunnerConfig
from moe_protocols.verification import (
    VerificationReport,
    outputs_difference,
    verify_eplb_integration,
)

if TYPE_CHECKING:
    from typing import TextIO

__all__ = ["DemoOptions", "DemoReport", "RearrangementLine", "run_demo"]


@attrs.frozen
class DemoOptions:
    """Knobs of the demo; the defaults finish in a few seconds on one CPU core."""

    steps: int = attrs.field(default=48, validator=attrs.validators.ge(1))
    batch_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    seq_len: int = attrs.field(default=64, validator=attrs.validators.ge(1))
    num_experts: int = attrs.field(default=16, validator=attrs.validators.ge(2))
    num_redundant_experts: int = attrs.field(default=4, validator=attrs.validators.ge(0))
    num_ranks: int = attrs.field(default=4, validator=attrs.validators.ge(1))
    window_size: int = attrs.field(default=8, validator=attrs.validators.ge(1))
    step_interval: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    zipf_exponent: float = attrs.field(default=1.2, validator=attrs.validators.ge(0.0))
    policy: str = "deepseek"
    seed: int = attrs.field(default=0, validator=attrs.validators.ge(0))


@attrs.frozen
class RearrangementLine:
    """One rearrangement as the demo saw it."""

    step: int
    balancedness_before: float
    balancedness_after: float
    slots_changed: int
    num_slots: int
    bytes_moved: int
    rank_load_before: torch.Tensor
    """``[ranks]`` load of the window before the rearranging step, summed over layers."""


@attrs.frozen
class DemoReport:
    """Everything the demo measured (the CLI prints it; tests assert on it)."""

    trace: str
    rearrangements: tuple[RearrangementLine, ...]
    first_window_balancedness: float
    last_window_balancedness: float
    rank_load_first: torch.Tensor
    rank_load_last: torch.Tensor
    step_balancedness: tuple[float, ...]
    """Per engine step: balancedness (mean over MoE layers of mean/max rank load) of that
    step's measured load, under the placement it ran on."""
    outputs_unchanged: bool
    verification: VerificationReport
    """The self-test run on the model before it was served (``moe-protocols verify``)."""


class _Progress:
    """A text progress bar: redrawn in place on a terminal, milestone lines otherwise."""

    def __init__(self, total: int, out: TextIO, width: int = 30) -> None:
        self._total, self._out, self._width = total, out, width
        self._tty = bool(getattr(out, "isatty", lambda: False)())
        self._last_decile = -1

    def update(self, done: int) -> None:
        filled = self._width * done // self._total
        bar = f"[{'#' * filled}{'.' * (self._width - filled)}] {done}/{self._total} steps"
        if self._tty:
            end = "\n" if done == self._total else ""
            print(f"\r{bar}", end=end, file=self._out, flush=True)
            return
        decile = 10 * done // self._total
        if decile != self._last_decile and (decile % 5 == 0 or done == self._total):
            self._last_decile = decile
            print(bar, file=self._out)

    def interrupt(self) -> None:
        """End the bar's line so other output starts on a fresh one."""
        if self._tty:
            print(file=self._out)


class _TokenStream:
    """Batches of token ids drawn from a Zipf law over the vocabulary (a few tokens are hot)."""

    def __init__(self, vocab_size: int, options: DemoOptions) -> None:
        self._generator = torch.Generator().manual_seed(options.seed)
        ranks = torch.arange(1, vocab_size + 1, dtype=torch.float64)
        weights = ranks.pow(-options.zipf_exponent)
        # Shuffled, so that the hot tokens are not the lowest ids.
        self._probs = weights[torch.randperm(vocab_size, generator=self._generator)]
        self._shape = (options.batch_size, options.seq_len)

    def batch(self) -> torch.Tensor:
        """The next ``[batch, sequence]`` batch of token ids."""
        count = self._shape[0] * self._shape[1]
        ids = torch.multinomial(self._probs, count, replacement=True, generator=self._generator)
        return ids.view(*self._shape)


def run_demo(options: DemoOptions, out: TextIO = sys.stdout) -> DemoReport:
    """Serve the tiny VLM-wrapped MoE model with EPLB on a skewed stream; print, return figures."""
    model = tiny_vlm(
        num_experts=options.num_experts,
        num_redundant_experts=options.num_redundant_experts,
        seed=options.seed,
    )
    config = RunnerConfig(
        enable_eplb=True,
        eplb=EplbConfig(
            window_size=options.window_size,
            step_interval=options.step_interval,
            num_redundant_experts=options.num_redundant_experts,
            policy=options.policy,
        ),
        num_ranks=options.num_ranks,
    )
    # Before load_model: the self-test registers the model with a state of its own.
    verification = verify_eplb_integration(model, seed=options.seed)
    runner = ReferenceRunner(config)
    runner.load_model(model)
    view, state = runner.moe_view, runner.eplb_state
    # load_model with EPLB enabled either registered both or raised.
    assert view is not None
    assert state is not None
    _print_setup(model, view, state, options, verification, out)

    stream = _TokenStream(model.get_language_model().config.vocab_size, options)
    probe = stream.batch()
    with torch.no_grad():
        probe_before = model(probe)
    lines, step_balance = _serve(runner, state, model, stream, options.steps, out)
    last_balance, last_load = _last_window(state, config.model_name, lines)
    with torch.no_grad():
        probe_after = model(probe)
    difference = outputs_difference(probe_before, probe_after, exact=True)
    if lines:
        first_balance, first_load = lines[0].balancedness_before, lines[0].rank_load_before
    else:
        first_balance, first_load = last_balance, last_load
    print(
        f"Balancedness (mean/max rank load, measured): first window {first_balance:.3f}, "
        f"last window {last_balance:.3f} (after {len(lines)} rearrangements)",
        file=out,
    )
    print(
        "Outputs for a fixed probe batch: "
        + (
            "bit-identical before and after"
            if difference is None
            else f"CHANGED (this is a bug): {difference}"
        ),
        file=out,
    )
    return DemoReport(
        trace=str(view.trace),
        rearrangements=tuple(lines),
        first_window_balancedness=first_balance,
        last_window_balancedness=last_balance,
        rank_load_first=first_load,
        rank_load_last=last_load,
        step_balancedness=tuple(step_balance),
        outputs_unchanged=difference is None,
        verification=verification,
    )


def _print_setup(
    model: TinyVLMForConditionalGeneration,
    view: MoEView,
    state: EplbState,
    options: DemoOptions,
    verification: VerificationReport,
    out: TextIO,
) -> None:
    """Print what is served, how its MoE model was found, the EPLB set-up and the self-test."""
    print(f"Served model: {type(model).__name__} (not a MixtureOfExperts itself)", file=out)
    print("Resolution trace:", file=out)
    for trace_line in str(view.trace).splitlines():
        print(f"  {trace_line}", file=out)
    print(
        f"EPLB: {view.num_moe_layers} MoE layers, {view.num_logical_experts} logical experts in "
        f"{view.num_physical_experts} slots over {state.num_ranks} ranks "
        f"({view.num_redundant_experts} redundant), policy {state.policy.name!r}, "
        f"window {options.window_size}, rearrangement every {options.step_interval} steps",
        file=out,
    )
    print(f"Self-test (verify_eplb_integration): {verification.summary}", file=out)
    if not verification.ok:
        print(verification, file=out)


def _serve(
    runner: ReferenceRunner,
    state: EplbState,
    model: TinyVLMForConditionalGeneration,
    stream: _TokenStream,
    steps: int,
    out: TextIO,
) -> tuple[list[RearrangementLine], list[float]]:
    """Run ``steps`` engine steps; return the rearrangements seen and every step's balancedness."""
    name = runner.config.model_name
    lines: list[RearrangementLine] = []
    step_balance: list[float] = []
    progress = _Progress(steps, out)
    for step in range(1, steps + 1):
        ids = stream.batch()
        done_before = state.num_rearrangements
        # The window as it stands before this step: what the next rearrangement plans from.
        window_load = state.balancedness(name).rank_load.sum(dim=0)
        # execute_model() split in two, to read this step's load before the EPLB step folds
        # it into the window: forward, then the step.
        with torch.no_grad():
            model(ids)
        step_load = state.model_state(name).expert_load_pass
        step_balance.append(
            BalancednessStats.from_rank_load(
                name, rank_loads_from_physical(step_load, state.num_ranks).cpu()
            ).overall
        )
        runner.eplb_step()
        if state.num_rearrangements > done_before:
            line = _rearrangement_line(state, name, step, window_load)
            lines.append(line)
            progress.interrupt()
            print(
                f"step {step:4d}: rearranged: balancedness {line.balancedness_before:.3f} -> "
                f"{line.balancedness_after:.3f} (planned), {line.slots_changed}/{line.num_slots} "
                f"slots moved, {line.bytes_moved / 2**20:.2f} MiB",
                file=out,
            )
        progress.update(step)
    return lines, step_balance


def _rearrangement_line(
    state: EplbState, name: str, step: int, window_load: torch.Tensor
) -> RearrangementLine:
    """The rearrangement ``state`` just made at ``step``, planned from ``window_load``."""
    result = state.last_rearrangement
    assert result is not None
    summary = result[name]
    return RearrangementLine(
        step=step,
        balancedness_before=summary.overall_balancedness_before,
        balancedness_after=summary.overall_balancedness_after,
        slots_changed=summary.slots_changed,
        num_slots=summary.old_physical_to_logical_map.numel(),
        bytes_moved=summary.bytes_moved,
        rank_load_before=window_load,
    )


def _last_window(
    state: EplbState, name: str, lines: list[RearrangementLine]
) -> tuple[float, torch.Tensor]:
    """Balancedness and ``[ranks]`` load of the last measured window."""
    stats = state.balancedness(name)
    if stats.total_load == 0 and lines:
        # The run ended on a rearrangement, which clears the window: the last
        # measured window is the one that rearrangement planned from.
        return lines[-1].balancedness_before, lines[-1].rank_load_before
    return stats.overall, stats.rank_load.sum(dim=0)
