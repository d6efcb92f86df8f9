"""A self-test of a model's EPLB integration: does balancing leave it computing the same thing?

``verify_eplb_integration(model)`` resolves the MoE model with ``MoEView``,
registers it with a private ``EplbState`` and, on the live model (no copy of
it is made), checks what a model author can get silently wrong:

* every MoE layer records ``tokens x top_k`` assignments into its row of the
  load view (or, without a ``top_k`` to read, the same count in two identical
  forwards and in every layer);
* every redundant slot holds the bytes of the logical expert it replicates
  under the initial placement (slot ``p >= E`` holds expert ``p % E``);
* ``update_physical_experts_metadata`` with the current counts changes nothing;
* after two forced moves (a random permutation of the slots, then a change of
  replica counts, both through ``EplbState.update_mapping``) the outputs are
  unchanged and every layer routes and records by the *new* maps (a layer that
  kept copies of the maps instead of the views is named);
* the model is back on its original placement, computing what it computed
  before, when the run ends.

The result is a :class:`VerificationReport` (a value, printable); only
unusable arguments raise (:class:`~moe_protocols.errors.VerificationInputError`).
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Final, TypeGuard, cast, final

import attrs
import torch
from torch import Tensor

from moe_protocols._torch_typed import int_list
from moe_protocols.adapters._view import DEFAULT_MAX_DEPTH, MoEView
from moe_protocols.adapters.hf._probe import TOP_K_ATTRS as _TOP_K_ATTRS
from moe_protocols.adapters.hf._probe import int_attr as _int_attr
from moe_protocols.adapters.hf._probe import text_config as _text_config
from moe_protocols.conformance import check_conformance
from moe_protocols.eplb import EplbConfig, EplbState
from moe_protocols.eplb._maps import compute_logical_maps, initial_placement, max_replicas
from moe_protocols.errors import (
    EplbOwnershipError,
    MoEProtocolsError,
    NotMixtureOfExpertsError,
    VerificationInputError,
)
from moe_protocols.profiling import (
    Batch,
    _default_forward,  # pyright: ignore[reportPrivateUsage]  # shared inside the package
    vocabulary_size,
    weights_device,
)
from moe_protocols.protocols import MixtureOfExperts

if TYPE_CHECKING:
    from torch.utils.hooks import RemovableHandle

    from moe_protocols.eplb._fingerprint import IntegrityMode
    from moe_protocols.eplb._state import ModelEplbState

__all__ = [
    "CheckStatus",
    "VerificationCheck",
    "VerificationReport",
    "outputs_difference",
    "verify_eplb_integration",
]

SampleInputs = Tensor | Mapping[str, object] | Callable[[], object]
"""What ``sample_inputs`` may be: ``input_ids``, forward keywords, or a factory of either."""

_MODEL_NAME: Final = "verify"
_SYNTHETIC_SHAPE: Final = (2, 32)
_NEVER: Final = 2**31 - 1  # step_interval: the private state must never rearrange on its own
_DTYPE_TOLERANCE: Final[Mapping[torch.dtype, tuple[float, float]]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
"""``(rtol, atol)`` per output dtype when outputs cannot be compared bit for bit."""
_LOW_PRECISION: Final = (5e-2, 5e-2)  # other floating dtypes (float8, ...)


_STALE_MAPS: Final = (
    "after the move it still routes by the placement before it: it keeps copies of the maps "
    "handed to set_eplb_state, not the views"
)
_KEEP_VIEWS: Final = (
    "keep the tensors set_eplb_state hands over as they are (no .clone(), .to() or .tolist()); "
    "EPLB updates them in place"
)
_LOGICAL_IDS: Final = "it records load at logical expert ids instead of physical slots"
_LOAD_MOVED: Final = "its load no longer matches the same input's load before the move"
_ROUTE_LIVE: Final = "route logical expert -> physical slot through the live maps on every forward"


class CheckStatus(enum.Enum):
    """Outcome of one check."""

    PASSED = "PASS"
    FAILED = "FAIL"
    SKIPPED = "SKIP"


@attrs.frozen
class VerificationCheck:
    """One check's result; a failure names the layer, what was seen and what to fix."""

    name: str
    """Stable identifier, e.g. ``"load-counts"`` or ``"move-permute:maps"``."""
    status: CheckStatus
    observed: str
    """What was seen (for a skip: why the check could not run)."""
    layer: int | None = None
    """Index of the MoE layer at fault (``moe_layers[layer]``), when one is."""
    layer_path: str | None = None
    """Module path of that layer below the served object, where it can be found."""
    fix: str | None = None
    """What to change in the model (failures only)."""

    @property
    def where(self) -> str | None:
        """``"MoE layer 1 (model.layers.2.ffn)"``, or None for a model-wide result."""
        if self.layer is None:
            return None
        return f"MoE layer {self.layer}" + (f" ({self.layer_path})" if self.layer_path else "")

    def __str__(self) -> str:
        where = self.where
        text = f"{self.status.value}  {self.name}: " + (f"{where}: " if where else "")
        text += self.observed
        if self.fix:
            text += f"\n        fix: {self.fix}"
        return text


def _tuple_of_checks(checks: Sequence[VerificationCheck]) -> tuple[VerificationCheck, ...]:
    return tuple(checks)


@attrs.frozen
class VerificationReport:
    """Everything :func:`verify_eplb_integration` checked, in order; ``ok`` when none failed."""

    model: str
    """Class name of the served object."""
    checks: tuple[VerificationCheck, ...] = attrs.field(converter=_tuple_of_checks)
    resolved: str | None = None
    """Where the MoE model was found and its counts; None when none was found."""
    inputs: str | None = None
    """What the forwards were fed."""
    tolerance: str | None = None
    """How outputs were compared (bit-exact, or the allclose tolerances)."""

    @property
    def ok(self) -> bool:
        """True when no check failed (skipped checks do not count against it)."""
        return not self.failures

    @property
    def failures(self) -> tuple[VerificationCheck, ...]:
        """The failed checks."""
        return tuple(c for c in self.checks if c.status is CheckStatus.FAILED)

    @property
    def skipped(self) -> tuple[VerificationCheck, ...]:
        """The checks that could not run, each saying why."""
        return tuple(c for c in self.checks if c.status is CheckStatus.SKIPPED)

    def named(self, name: str) -> tuple[VerificationCheck, ...]:
        """The results of one check (several when it failed on several layers)."""
        return tuple(c for c in self.checks if c.name == name)

    def __str__(self) -> str:
        lines = [f"EPLB integration check of {self.model}"]
        for label, value in (
            ("MoE model", self.resolved),
            ("inputs", self.inputs),
            ("outputs compared", self.tolerance),
        ):
            if value is not None:
                lines.append(f"  {label}: {value}")
        lines.append("")
        lines += [f"  {check}" for check in self.checks]
        lines += ["", self.summary]
        return "\n".join(lines)

    @property
    def summary(self) -> str:
        """The verdict in one line: ``"OK: every check holds (2 skipped)"`` or ``"FAILED: ..."``."""
        failed, skipped = len(self.failures), len(self.skipped)
        tail = f" ({skipped} skipped)" if skipped else ""
        if failed:
            return f"FAILED: {failed} of {len(self.checks)} checks failed{tail}"
        return f"OK: every check holds{tail}"


# ---------------------------------------------------------------- inputs


def is_sample_batch(value: object) -> TypeGuard[Batch]:
    """Whether ``value`` can be fed as it is: a tensor of input_ids or a mapping of keywords."""
    return isinstance(value, (Tensor, Mapping))


def _sample_batch(
    root: object, view: MoEView, sample_inputs: SampleInputs | None, seed: int
) -> tuple[Batch, str]:
    """The batch every forward is fed, and how it was obtained."""
    if sample_inputs is None:
        vocab = vocabulary_size(root) or vocabulary_size(view.model)
        if vocab is None:
            raise VerificationInputError(
                f"verify_eplb_integration: no sample inputs were given and none can be "
                f"synthesised: neither {type(root).__name__} nor {type(view.model).__name__} "
                "tells its vocabulary size (get_input_embeddings() or config.vocab_size); pass "
                "sample_inputs= (a tensor, a mapping of forward keywords, or a factory), or "
                "--inputs MODULE:ATTR on the command line"
            )
        generator = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, vocab, _SYNTHETIC_SHAPE, generator=generator)
        shape = "x".join(map(str, _SYNTHETIC_SHAPE))
        return ids.to(weights_device(view)), (
            f"synthesised input_ids [{shape}] from vocab_size={vocab} (seed {seed})"
        )
    given: object = sample_inputs
    if callable(given) and not isinstance(given, (Tensor, Mapping)):
        try:
            given = given()
        except Exception as exc:
            raise VerificationInputError(
                f"verify_eplb_integration: the sample_inputs factory failed: "
                f"{type(exc).__name__}: {exc}"
            ) from exc
    if isinstance(given, Tensor):
        return given, f"input_ids {list(given.shape)} (given)"
    if isinstance(given, Mapping):
        given = cast("Mapping[object, object]", given)
        if all(isinstance(k, str) for k in given):
            batch = {str(k): v for k, v in given.items()}
            return batch, f"forward keywords {sorted(batch)} (given)"
    raise VerificationInputError(
        "verify_eplb_integration: sample_inputs must be a tensor of input_ids, a mapping of "
        f"forward keyword arguments, or a callable returning one; got {type(given).__name__}"
    )


def _tokens_in(batch: Batch) -> int | None:
    """Tokens a text-only batch sends through every MoE layer (None: cannot tell from it)."""
    if isinstance(batch, Tensor):
        return batch.numel()
    ids = batch.get("input_ids")
    text_only = set(batch) <= {"input_ids", "attention_mask", "position_ids", "token_type_ids"}
    return ids.numel() if isinstance(ids, Tensor) and text_only else None


# ---------------------------------------------------------------- outputs


def _output_tensors(output: object) -> list[Tensor]:
    """Every tensor in a forward's result (tensors, mappings such as ModelOutput, sequences)."""
    if isinstance(output, Tensor):
        return [output.detach().clone()]
    items: list[object]
    if isinstance(output, Mapping):
        items = list(cast("Mapping[object, object]", output).values())
    elif isinstance(output, (list, tuple)):
        items = list(cast("Sequence[object]", output))
    else:
        return []
    return [tensor for item in items for tensor in _output_tensors(item)]


def _same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(_as_bytes(a), _as_bytes(b))


def _as_bytes(tensor: Tensor) -> Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


@attrs.frozen
class _Tolerance:
    exact: bool
    rtol: float | None
    atol: float | None

    def for_dtype(self, dtype: torch.dtype) -> tuple[float, float]:
        default = _DTYPE_TOLERANCE.get(dtype, _LOW_PRECISION)
        return (
            default[0] if self.rtol is None else self.rtol,
            default[1] if self.atol is None else self.atol,
        )

    def describe(self, outputs: Sequence[Tensor], why: str) -> str:
        if self.exact:
            return f"bit-exact ({why})"
        dtypes = sorted({t.dtype for t in outputs if t.is_floating_point()}, key=str)
        parts = [
            f"rtol={rtol:g} atol={atol:g} for {str(d).removeprefix('torch.')}"
            for d in dtypes
            for rtol, atol in (self.for_dtype(d),)
        ]
        return f"allclose {', '.join(parts) or '(no floating outputs: exact)'} ({why})"

    def difference(self, reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> str | None:
        """None when ``outputs`` match ``reference`` under this tolerance, else what differs."""
        if len(reference) != len(outputs):
            return f"the forward returned {len(outputs)} tensors, before {len(reference)}"
        for i, (ref, out) in enumerate(zip(reference, outputs, strict=True)):
            what = f"output tensor {i} {list(ref.shape)} {str(ref.dtype).removeprefix('torch.')}"
            if ref.shape != out.shape or ref.dtype != out.dtype:
                return f"{what} came back as {list(out.shape)} {out.dtype}"
            if _same_bits(ref, out):
                continue
            if not self.exact and ref.is_floating_point():
                rtol, atol = self.for_dtype(ref.dtype)
                if torch.allclose(out, ref, rtol=rtol, atol=atol, equal_nan=True):
                    continue
            differ = int((ref != out).sum())
            diff = (out.double() - ref.double()).abs() if ref.is_floating_point() else None
            worst = "" if diff is None else f", max |diff| {float(diff.nan_to_num(0).max()):.3g}"
            return f"{what}: {differ} of {ref.numel()} elements differ{worst}"
        return None


def outputs_difference(
    reference: object,
    outputs: object,
    *,
    exact: bool = True,
    rtol: float | None = None,
    atol: float | None = None,
) -> str | None:
    """What differs between two forwards' results, or None when they match: the outputs check.

    Results may be tensors, mappings (e.g. a transformers ``ModelOutput``) or
    tuples/lists of them; every tensor inside is compared. ``exact``: bit for
    bit; otherwise ``allclose`` with the per-dtype tolerance (float32: rtol
    1e-4, atol 1e-5; float16/bfloat16 looser) unless ``rtol``/``atol`` are given.
    """
    tolerance = _Tolerance(exact=exact, rtol=rtol, atol=atol)
    return tolerance.difference(_output_tensors(reference), _output_tensors(outputs))


def _bit_identical(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> bool:
    return len(reference) == len(outputs) and all(
        _same_bits(a, b) for a, b in zip(reference, outputs, strict=True)
    )


# ---------------------------------------------------------------- probes


def _layer_paths(root: object, view: MoEView) -> list[str | None]:
    """Module path of every MoE layer below the served object, where it can be found."""
    names: dict[int, str] = {}
    named_modules = getattr(root, "named_modules", None)
    if callable(named_modules):
        try:
            modules = cast("Iterable[tuple[str, object]]", named_modules())
            names = {id(module): name for name, module in modules}
        except Exception:
            names = {}
    paths: list[str | None] = []
    for layer in view.moe_layers:
        path = names.get(id(layer), getattr(layer, "path", None))
        paths.append(path if isinstance(path, str) and path else None)
    return paths


def _top_k(layer: object, model: object) -> int | None:
    """Experts each token is sent to, read from the layer, the model or its (text) config."""
    config = getattr(model, "config", None)
    for source in (layer, model, _text_config(model), config):
        if source is not None and (found := _int_attr(source, _TOP_K_ATTRS)) is not None:
            return found
    return None


def _protocol_default(model: object, method: str) -> bool:
    """Whether ``model`` inherits the protocol's do-nothing body of ``method``."""
    return getattr(type(model), method, None) is getattr(MixtureOfExperts, method)


@final
class _TokenCounter:
    """Counts the tokens each MoE layer is called with (layers that are modules only)."""

    def __init__(self, layers: Sequence[object]) -> None:
        self.tokens: list[int | None] = [None] * len(layers)
        self._handles: list[RemovableHandle] = []
        for i, layer in enumerate(layers):
            register = getattr(layer, "register_forward_pre_hook", None)
            if callable(register):
                self.tokens[i] = 0
                handle = register(self._hook(i), with_kwargs=True)
                self._handles.append(cast("RemovableHandle", handle))

    def _hook(self, index: int) -> Callable[[object, tuple[object, ...], dict[str, object]], None]:
        def count_tokens(_: object, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
            for value in (*args, *kwargs.values()):
                if isinstance(value, Tensor) and value.dim() >= 1:
                    width = value.shape[-1] if value.dim() >= 2 else 1
                    self.tokens[index] = (self.tokens[index] or 0) + value.numel() // width
                    return

        return count_tokens

    def reset(self) -> None:
        self.tokens = [None if t is None else 0 for t in self.tokens]

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def _logical(load: Tensor, physical_to_logical: Tensor, num_logical: int) -> Tensor:
    """``[L, E]`` int64: a ``[L, P]`` load summed onto the logical experts of a placement."""
    out = torch.zeros(load.shape[0], num_logical, dtype=torch.int64)
    out.scatter_add_(1, physical_to_logical.cpu(), load.cpu().to(torch.int64))
    return out


# ---------------------------------------------------------------- the run


@final
class _Verifier:
    """One verification run: the private EPLB state, the reference outputs and the results."""

    def __init__(
        self,
        root: object,
        view: MoEView,
        batch: Batch,
        forward: Callable[[object, Batch], object],
        tolerance: _Tolerance,
        seed: int,
        exact: bool | None,
    ) -> None:
        self.root, self.view, self.batch, self._forward = root, view, batch, forward
        self.tolerance, self.seed, self.exact = tolerance, seed, exact
        self.checks: list[VerificationCheck] = []
        self.paths = _layer_paths(root, view)
        self.num_layers = view.num_moe_layers
        self.num_logical, self.num_physical = view.num_logical_experts, view.num_physical_experts
        self.initial = initial_placement(self.num_layers, self.num_logical, self.num_physical)
        self.reference: list[Tensor] = []
        self.tolerance_reason = ""
        self.reference_load = torch.zeros(0)
        self.state = self._new_state("full")

    def _new_state(self, integrity: IntegrityMode) -> EplbState:
        return EplbState(
            EplbConfig(
                window_size=1,
                step_interval=_NEVER,
                num_redundant_experts=self.view.num_redundant_experts,
            ),
            # layers add their load on the experts' device
            device=weights_device(self.view),
            integrity=integrity,
        )

    # ------------------------------------------------------------ bookkeeping

    def add(
        self,
        name: str,
        status: CheckStatus,
        observed: str,
        *,
        layer: int | None = None,
        fix: str | None = None,
    ) -> None:
        path = None if layer is None else self.paths[layer]
        self.checks.append(VerificationCheck(name, status, observed, layer, path, fix))

    def passed(self, name: str, observed: str) -> None:
        self.add(name, CheckStatus.PASSED, observed)

    def skipped(self, name: str, why: str) -> None:
        self.add(name, CheckStatus.SKIPPED, why)

    def failed(self, name: str, observed: str, fix: str, layer: int | None = None) -> None:
        self.add(name, CheckStatus.FAILED, observed, layer=layer, fix=fix)

    @property
    def live(self) -> ModelEplbState:
        return self.state.model_state(_MODEL_NAME)

    def run_forward(self, name: str, counter: _TokenCounter) -> tuple[list[Tensor], Tensor] | None:
        """Outputs and ``[L, P]`` recorded load of one forward; None (a failure) if it raised."""
        counter.reset()
        try:
            with torch.no_grad():
                output = self._forward(self.root, self.batch)
        except Exception as exc:
            self.failed(
                name,
                f"the forward raised {type(exc).__name__}: {exc}",
                "make the model run on the sample inputs (pass sample_inputs=/--inputs, or "
                "forward= for a model not called as model(input_ids=...))",
            )
            return None
        load = self.live.expert_load_pass.to("cpu", torch.int64, copy=True)
        self.state.step()  # moves the pass into the window and zeroes it
        return _output_tensors(output), load

    def compare_forward(
        self, name: str, counter: _TokenCounter
    ) -> tuple[str | None, Tensor] | None:
        """A forward compared with the reference: ``(what differs or None, its load)``.

        None (and a failure) when the forward raised.
        """
        result = self.run_forward(name, counter)
        if result is None:
            return None
        return self.tolerance.difference(self.reference, result[0]), result[1]

    def check_outputs(
        self, name: str, counter: _TokenCounter, *, changed: str, fix: str, unchanged: str
    ) -> None:
        """One check: a forward's outputs equal the reference's."""
        compared = self.compare_forward(name, counter)
        if compared is None:
            return
        if compared[0] is not None:
            self.failed(name, f"{changed}: {compared[0]}", fix)
        else:
            self.passed(name, unchanged)

    # ------------------------------------------------------------ the checks

    def run(self) -> None:
        report = check_conformance(self.view.model, path=self.view.trace.resolved_path or "model")
        if not report.ok:
            self.failed("counts", str(report), "fix the problems the conformance report lists")
            return
        self.passed(
            "counts",
            f"{self.num_layers} MoE layers, {self.num_logical} logical experts in "
            f"{self.num_physical} physical slots ({self.view.num_redundant_experts} redundant)",
        )
        replicas_ok = self._check_replicas()
        if not replicas_ok:
            # EplbState refuses non-replica slots; register anyway to check the load
            # recording (no move is made, see _why_no_moves).
            self.state = self._new_state("off")
        try:
            self.state.add_model(self.view, _MODEL_NAME)
        except EplbOwnershipError as exc:
            self.failed(
                "register",
                str(exc),
                "verify the model before registering it with your EplbState (or release it "
                "there first); verify never takes layers from a live state",
            )
            return
        except MoEProtocolsError as exc:
            self.failed("register", str(exc), "fix what EplbState.add_model reports")
            return
        self.passed(
            "register",
            f"a private EplbState registered the model (weight integrity checks: "
            f"{self.state.integrity})",
        )
        counter = _TokenCounter(self.view.moe_layers)
        try:
            self._run_registered(counter, replicas_ok)
        finally:
            counter.remove()
            self._restore()
            remove_hooks = getattr(self.view.model, "remove_hooks", None)
            if callable(remove_hooks):
                remove_hooks()
            # Release the layers, so that a serving EplbState may register the model now.
            self.state.remove_model(_MODEL_NAME)

    def _run_registered(self, counter: _TokenCounter, replicas_ok: bool) -> None:
        first = self.run_forward("forward", counter)
        if first is None:
            return
        tokens = list(counter.tokens)
        second = self.run_forward("forward", counter)
        if second is None:
            return
        self.reference, self.reference_load = first[0], first[1]
        comparable = self._check_repeatable(first[0], second[0])
        self._check_load(first[1], second[1], tokens)
        if comparable:
            self._check_metadata(counter)
        else:
            self.skipped("metadata", "outputs cannot be compared (see 'repeatable')")
        why_not = self._why_no_moves(comparable, replicas_ok)
        for name, placement, text in self._moves():
            if why_not is not None or placement is None:
                self.skipped(name, why_not or text)
                continue
            if not self._check_move(name, placement, text, counter):
                break
        self._restore()
        self._check_restored(counter)

    def _check_repeatable(self, first: list[Tensor], second: list[Tensor]) -> bool:
        name = "repeatable"
        if not first:
            self.skipped(name, "the forward returned no tensors; outputs cannot be compared")
            return False
        identical = _bit_identical(first, second)
        exact = identical if self.exact is None else self.exact
        if self.exact is not None:
            self.tolerance_reason = f"exact={self.exact} was asked for"
        else:
            self.tolerance_reason = "two identical forwards were " + (
                "bit-identical" if identical else "not bit-identical"
            )
        self.tolerance = attrs.evolve(self.tolerance, exact=exact)
        difference = self.tolerance.difference(first, second)
        if difference is None:
            how = "bit-identical" if identical else "equal within tolerance, not bit-identical"
            self.passed(name, f"two identical forwards gave {how} outputs")
            return True
        self.failed(
            name,
            f"two identical forwards disagree: {difference}",
            "make the forward deterministic (call model.eval() to turn dropout off; no "
            "random routing noise) or pass exact=False / --tolerant to compare with a tolerance",
        )
        return False

    def _check_load(self, load: Tensor, again: Tensor, tokens: list[int | None]) -> None:
        name, ok = "load-counts", True
        totals = int_list(load.sum(dim=1))
        from_inputs = _tokens_in(self.batch)
        expected: dict[int, str] = {}
        for i in range(self.num_layers):
            # A layer run as layer.forward(...) fires no hook: then count from the inputs.
            total, seen = int(totals[i]), tokens[i] or from_inputs
            if total == 0 and tokens[i] == 0:
                ok = False
                self.failed(
                    name,
                    "recorded no load and was not called by the forward (its forward hooks "
                    "never fired)",
                    "moe_layers must list the modules that run (not copies or stale ones)",
                    layer=i,
                )
                continue
            if total == 0:
                ok = False
                self.failed(
                    name,
                    f"recorded no load for {seen if seen is not None else 'its'} tokens: it "
                    "never writes its row of expert_load_view",
                    "keep row moe_layer_idx of the expert_load_view handed to set_eplb_state (a "
                    "view, not a copy) and add one per (token, chosen expert) at the physical "
                    "slot that served it, on every forward",
                    layer=i,
                )
                continue
            top_k = _top_k(self.view.moe_layers[i], self.view.model)
            if seen is not None and top_k is not None:
                want = seen * top_k
                expected[i] = f"{seen} tokens x top_k {top_k} = {want}"
                if total != want:
                    ok = False
                    self.failed(
                        name,
                        f"recorded {total} token-expert assignments for {expected[i]} "
                        f"({total / want:.2f}x)",
                        "add exactly one per (token, chosen expert): "
                        + (
                            "it counts every assignment twice (recorded in two places, or "
                            "added twice)"
                            if total == 2 * want
                            else "count the router's top-k choices, once each"
                        ),
                        layer=i,
                    )
            if not torch.equal(load[i], again[i]):
                ok = False
                self.failed(
                    name,
                    f"recorded {total} then {int(again[i].sum())} for the same input",
                    "record each forward's assignments into the pass view; do not keep a "
                    "running total of your own",
                    layer=i,
                )
        ok = self._check_layers_agree(name, totals, expected) and ok
        if ok:
            how = (
                next(iter(expected.values())) if len(set(expected.values())) == 1 else "as expected"
            )
            if len(expected) < self.num_layers:
                how = f"{int(totals[0])} assignments each (no top_k to check against)"
            self.passed(
                name,
                f"each of the {self.num_layers} MoE layers recorded {how}, the same in two "
                "identical forwards",
            )

    def _check_layers_agree(
        self, name: str, totals: list[int], expected: Mapping[int, str]
    ) -> bool:
        """Without a top_k to read, layers fed the same tokens must at least count the same."""
        unchecked = [i for i in range(self.num_layers) if i not in expected and totals[i] > 0]
        if len(unchecked) < 2:
            return True
        values = [totals[i] for i in unchecked]
        usual = max(set(values), key=values.count)
        ok = True
        for i in unchecked:
            if totals[i] != usual:
                ok = False
                self.failed(
                    name,
                    f"recorded {totals[i]} assignments where most layers recorded {usual} for "
                    "the same tokens (no top_k attribute found to check against)",
                    "add exactly one per (token, chosen expert); expose top_k (or "
                    "num_experts_per_tok) on the layer so this check can be exact",
                    layer=i,
                )
        return ok

    def _check_replicas(self) -> bool:
        name = "replicas"
        if self.num_physical == self.num_logical:
            self.skipped(name, "no redundant slots (physical == logical)")
            return True
        local = self.view.num_local_physical_experts
        first = self.state.ep.rank * local
        ok = True
        for i, layer in enumerate(self.view.moe_layers):
            tensors = list(layer.get_expert_weights())
            bad: list[int] = []
            for slot in range(max(self.num_logical, first), first + local):
                expert = int(self.initial[i, slot])
                if not first <= expert < first + local:
                    continue  # the original lives on another rank
                if not all(_same_bits(t[slot - first], t[expert - first]) for t in tensors):
                    bad.append(slot)
            if bad:
                ok = False
                slot = bad[0]
                self.failed(
                    name,
                    f"{len(bad)} redundant slot(s) do not hold the bytes of the expert they "
                    f"replicate: slot {slot} should be a copy of logical expert "
                    f"{int(self.initial[i, slot])} (slot {int(self.initial[i, slot])})",
                    "initialise every redundant slot p >= E with a copy of expert p % E (the "
                    "initial placement); EPLB moves replicas as if they were that expert",
                    layer=i,
                )
        if ok:
            self.passed(
                name,
                f"every redundant slot holds the bytes of its expert "
                f"({self.num_physical - self.num_logical} per layer)",
            )
        return ok

    def _check_metadata(self, counter: _TokenCounter) -> None:
        name, method = "metadata", "update_physical_experts_metadata"
        if _protocol_default(self.view.model, method):
            self.skipped(name, f"{method} is not implemented (the protocol's default is used)")
            return
        before = (self.view.num_physical_experts, self.view.num_local_physical_experts)
        try:
            self.view.update_physical_experts_metadata(
                num_physical_experts=before[0], num_local_physical_experts=before[1]
            )
        except NotImplementedError:
            self.skipped(name, f"{method} raises NotImplementedError")
            return
        except Exception as exc:
            self.failed(
                name,
                f"{method}({before[0]}, {before[1]}) with the current counts raised "
                f"{type(exc).__name__}: {exc}",
                "accept the counts the model already has (a runner calls it after every "
                "change of EP size, including none)",
            )
            return
        after = (self.view.num_physical_experts, self.view.num_local_physical_experts)
        if after != before:
            self.failed(
                name,
                f"{method} with the current counts {before} changed them to {after}",
                "adopt exactly the counts passed in",
            )
            return
        self.check_outputs(
            name,
            counter,
            changed=f"outputs changed after {method} with unchanged counts",
            fix="with unchanged counts, keep slots, weights and the EPLB views as they are",
            unchanged=f"{method}{before} accepted; counts and outputs unchanged",
        )

    def _why_no_moves(self, comparable: bool, replicas_ok: bool) -> str | None:
        if not comparable:
            return "outputs cannot be compared (see 'repeatable')"
        if not replicas_ok:
            return "redundant slots are not replicas (see 'replicas'): moving them changes outputs"
        if self.num_physical < 2 or self.num_logical < 2:
            return "one expert or one slot: there is nothing to move"
        permuted = self._shuffled(self.initial)
        l2p, count = compute_logical_maps(
            permuted, self.num_logical, max_replicas(self.num_logical, self.num_physical)
        )
        device = self.live.logical_to_physical_map.device
        try:
            # Offer the model a moved placement; the state hands it its live views back below.
            self.view.set_eplb_state(
                expert_load_view=torch.zeros_like(self.live.expert_load_pass),
                logical_to_physical_map=l2p.to(device),
                logical_replica_count=count.to(device),
            )
        except Exception as exc:
            return f"the model accepts only its initial placement (it refused a moved one): {exc}"
        finally:
            self.state.reattach(_MODEL_NAME)
        return None

    def _shuffled(self, rows: Tensor) -> Tensor:
        """Each layer's row under a random permutation of its slots (never the unchanged row)."""
        generator = torch.Generator().manual_seed(self.seed)
        out = rows.clone()
        for layer in range(rows.shape[0]):
            row = rows[layer, torch.randperm(rows.shape[1], generator=generator)]
            out[layer] = row if not torch.equal(row, self.initial[layer]) else rows[layer].roll(1)
        return out

    def _moves(self) -> list[tuple[str, Tensor | None, str]]:
        """``(check name, placement, what the move does)``; no placement: why it cannot be made."""
        moves: list[tuple[str, Tensor | None, str]] = [
            ("move-permute", self._shuffled(self.initial), "a random permutation of the slots")
        ]
        if self.num_physical == self.num_logical:
            moves.append(
                ("move-replicas", None, "no redundant slots: replica counts cannot change")
            )
        else:
            rows = self.initial.clone()
            rows[:, self.num_logical :] = (
                self.num_logical - 1
            )  # the last expert takes every replica
            moves.append(
                (
                    "move-replicas",
                    self._shuffled(rows),
                    f"giving logical expert {self.num_logical - 1} every redundant slot",
                )
            )
        return moves

    def _check_move(self, name: str, placement: Tensor, what: str, counter: _TokenCounter) -> bool:
        """Move to ``placement``, check outputs and maps; False when the move itself failed."""
        try:
            self.state.update_mapping(_MODEL_NAME, placement)
        except MoEProtocolsError as exc:
            self.failed(
                f"{name}:outputs",
                f"EplbState.update_mapping failed: {exc}",
                "make expert_weights views of the live weights, [local_physical, ...] each",
            )
            return False
        compared = self.compare_forward(f"{name}:outputs", counter)
        if compared is None:
            return False
        difference, load = compared
        if difference is None:
            moved = int((placement != self.initial).sum())
            self.passed(
                f"{name}:outputs",
                f"outputs unchanged after {what} ({moved} of {placement.numel()} slots moved)",
            )
        else:
            self.failed(
                f"{name}:outputs",
                f"outputs changed after {what}: {difference}",
                "route through the maps handed to set_eplb_state on every forward, and expose "
                "every expert tensor (views, not copies) in get_expert_weights(); the :maps "
                "check names a layer that does not follow the maps",
            )
        self._check_follows_maps(name, placement, load, changed=difference is not None)
        return True

    def _check_follows_maps(
        self, name: str, placement: Tensor, load: Tensor, changed: bool
    ) -> None:
        """Each layer's load, read through the new placement, must be the reference load.

        A layer fed other inputs (because an earlier one misrouted) differs too,
        so only a definite diagnosis, or the first layer that differs, fails; the
        layers after it are named in its message.
        """
        name = f"{name}:maps"
        want = _logical(self.reference_load, self.initial, self.num_logical)
        seen = _logical(load, placement, self.num_logical)
        stale = _logical(load, self.initial, self.num_logical)
        slack = 0 if self.tolerance.exact else max(1, int(want.sum()) // (100 * self.num_layers))
        unchecked = [i for i in range(self.num_layers) if int(want[i].sum()) == 0]
        differing = [
            i
            for i in range(self.num_layers)
            if i not in unchecked and int((seen[i] - want[i]).abs().sum()) // 2 > slack
        ]
        found: list[tuple[int, str, str]] = []
        for i in differing:
            if changed and torch.equal(stale[i], want[i]):
                found.append((i, _STALE_MAPS, _KEEP_VIEWS))
            elif not changed and torch.equal(load[i, : self.num_logical], want[i]):
                found.append((i, _LOGICAL_IDS, "add each assignment at the slot that served it"))
        if differing and not found:
            found.append((differing[0], _LOAD_MOVED, _ROUTE_LIVE))
        named = {i for i, _, _ in found}
        for i, observed, fix in found:
            later = [j for j in differing if j > i and j not in named]
            if later and i == found[0][0]:
                observed += f"; MoE layers {later} differ too, possibly fed other inputs by it"
            self.failed(name, observed, fix, layer=i)
        if not found:
            note = f" (not checked, recording no load: {unchecked})" if unchecked else ""
            self.passed(name, f"every MoE layer routes and records by the new maps{note}")

    def _restore(self) -> None:
        """Move the model back to its initial placement (idempotent, called on every exit)."""
        if not self.state.model_names:
            return
        if torch.equal(self.live.physical_to_logical_map.cpu(), self.initial):
            return
        try:
            self.state.update_mapping(_MODEL_NAME, self.initial)
        except MoEProtocolsError as exc:
            self.failed(
                "restore",
                f"moving the experts back to the initial placement failed: {exc}; the model "
                "is left on another placement",
                "rebuild the model; fix what the error names",
            )

    def _check_restored(self, counter: _TokenCounter) -> None:
        name = "restore"
        if not self.reference:
            self.skipped(name, "no reference outputs to compare with")
            return
        self.check_outputs(
            name,
            counter,
            changed="back on the initial placement, outputs differ from the first forward",
            fix="see the failures above",
            unchanged="back on the initial placement, outputs equal the first forward",
        )


def verify_eplb_integration(
    model: object,
    sample_inputs: SampleInputs | None = None,
    *,
    forward: Callable[[object, Batch], object] | None = None,
    exact: bool | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    seed: int = 0,
    max_depth: int = DEFAULT_MAX_DEPTH,
) -> VerificationReport:
    """Check that EPLB can balance ``model`` without changing what it computes; report why not.

    Args:
        model: the served object (native, wrapped, compiled, ...); its MoE
            model is found with ``MoEView.resolve``. It is used in place and
            left on its original placement with its original weights; its
            layers keep views of a private, released EPLB state afterwards, so
            register it with your ``EplbState`` after verifying, not before.
        sample_inputs: ``input_ids`` (run as ``model(input_ids=...)``), a
            mapping of forward keyword arguments, or a no-argument callable
            returning either. Default: random token ids drawn from the
            model's vocabulary (``get_input_embeddings()`` / ``config.vocab_size``).
        forward: ``forward(model, batch)`` for a model called some other way.
        exact: demand bit-identical outputs after moves (True), allow the
            dtype's tolerance (False), or decide from whether two identical
            forwards are bit-identical (None, the default).
        rtol, atol: override the per-dtype allclose tolerances.
        seed: seeds the synthesised inputs and the forced placements.
        max_depth: unwrapping depth limit for ``MoEView.resolve``.

    Raises:
        VerificationInputError: no sample inputs were given and none can be
            synthesised, ``sample_inputs`` is of an unusable kind or its
            factory failed, a tolerance is negative, or ``seed``/``max_depth``
            is not a non-negative int.
    """
    for label, value in (("rtol", rtol), ("atol", atol)):
        if value is not None and not (
            isinstance(value, (int, float))  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            and value >= 0
        ):
            raise VerificationInputError(
                f"verify_eplb_integration: {label} must be a number >= 0, got {value!r}"
            )
    for label, value, end in (("seed", seed, 2**63), ("max_depth", max_depth, 2**31)):
        if (
            isinstance(value, bool)
            or not isinstance(value, int)  # pyright: ignore[reportUnnecessaryIsInstance]  # callers without a checker
            or not 0 <= value < end
        ):
            raise VerificationInputError(
                f"verify_eplb_integration: {label} must be an int in [0, {end}), got {value!r}"
            )
    name = type(model).__name__
    view = MoEView.resolve(model, max_depth=max_depth)
    if view is None:
        try:
            MoEView.require(model, max_depth=max_depth)
            message = "no MixtureOfExperts found"
        except NotMixtureOfExpertsError as exc:
            message = str(exc)
        failure = VerificationCheck(
            "resolve",
            CheckStatus.FAILED,
            message,
            fix="implement MixtureOfExperts on the MoE model (moe_protocols.building does it in "
            "a few lines, see docs/authoring.md), or teach MoEView the wrapper with an UnwrapStep",
        )
        return VerificationReport(model=name, checks=(failure,))
    batch, inputs = _sample_batch(model, view, sample_inputs, seed)
    tolerance = _Tolerance(exact=bool(exact), rtol=rtol, atol=atol)
    verifier = _Verifier(
        model, view, batch, forward or _default_forward, tolerance, seed, exact=exact
    )
    verifier.passed("resolve", f"found at {view.trace.resolved_path} ({type(view.model).__name__})")
    verifier.run()
    resolved = (
        f"{view.trace.resolved_path} ({type(view.model).__name__}): {view.num_moe_layers} MoE "
        f"layers, {view.num_logical_experts} logical experts, {view.num_physical_experts} "
        f"physical slots ({view.num_redundant_experts} redundant)"
    )
    return VerificationReport(
        model=name,
        checks=verifier.checks,
        resolved=resolved,
        inputs=inputs,
        tolerance=verifier.tolerance.describe(verifier.reference, verifier.tolerance_reason)
        if verifier.reference
        else None,
    )
