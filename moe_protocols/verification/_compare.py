"""Comparing outputs before and after a move: bit for bit, or within the dtype's tolerance."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Final

import attrs
import torch
from torch import Tensor

if TYPE_CHECKING:
    pass
from moe_protocols.verification._inputs import output_tensors

DTYPE_TOLERANCE: Final[Mapping[torch.dtype, tuple[float, float]]] = {
    torch.float64: (1e-7, 1e-9),
    torch.float32: (1e-4, 1e-5),
    torch.float16: (2e-3, 1e-3),
    torch.bfloat16: (2e-2, 1e-2),
}
"""``(rtol, atol)`` per output dtype when outputs cannot be compared bit for bit."""
LOW_PRECISION: Final = (5e-2, 5e-2)  # other floating dtypes (float8, ...)


def same_bits(a: Tensor, b: Tensor) -> bool:
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(as_bytes(a), as_bytes(b))


def as_bytes(tensor: Tensor) -> Tensor:
    return tensor.detach().reshape(-1).contiguous().view(torch.uint8)


@attrs.frozen
class Tolerance:
    exact: bool
    rtol: float | None
    atol: float | None

    def for_dtype(self, dtype: torch.dtype) -> tuple[float, float]:
        default = DTYPE_TOLERANCE.get(dtype, LOW_PRECISION)
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
            if same_bits(ref, out):
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
    tolerance = Tolerance(exact=exact, rtol=rtol, atol=atol)
    return tolerance.difference(output_tensors(reference), output_tensors(outputs))


def bit_identical(reference: Sequence[Tensor], outputs: Sequence[Tensor]) -> bool:
    return len(reference) == len(outputs) and all(
        same_bits(a, b) for a, b in zip(reference, outputs, strict=True)
    )
