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

from collections.abc import Callable

from moe_protocols.adapters._view import DEFAULT_MAX_DEPTH, MoEView
from moe_protocols.errors import NotMixtureOfExpertsError, VerificationInputError
from moe_protocols.profiling import (
    Batch,
    _default_forward,  # pyright: ignore[reportPrivateUsage]  # shared inside the package
)
from moe_protocols.verification._compare import Tolerance, outputs_difference
from moe_protocols.verification._inputs import SampleInputs, is_sample_batch, sample_batch
from moe_protocols.verification._report import CheckStatus, VerificationCheck, VerificationReport
from moe_protocols.verification._verifier import Verifier

__all__ = [
    "CheckStatus",
    "SampleInputs",
    "VerificationCheck",
    "VerificationReport",
    "is_sample_batch",
    "outputs_difference",
    "verify_eplb_integration",
]


def _check_arguments(rtol: float | None, atol: float | None, seed: int, max_depth: int) -> None:
    """Refuse unusable tolerances, seeds and depth limits with ``VerificationInputError``."""
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


def _unresolved(model: object, name: str, max_depth: int) -> VerificationReport:
    """The report for a served object in which no ``MixtureOfExperts`` is found."""
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
    _check_arguments(rtol, atol, seed, max_depth)
    name = type(model).__name__
    view = MoEView.resolve(model, max_depth=max_depth)
    if view is None:
        return _unresolved(model, name, max_depth)
    batch, inputs = sample_batch(model, view, sample_inputs, seed)
    tolerance = Tolerance(exact=bool(exact), rtol=rtol, atol=atol)
    verifier = Verifier(
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
