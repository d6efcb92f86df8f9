"""Check an object against the contract and explain every way it falls short.

``check_conformance(obj)`` answers "is this a ``MixtureOfExperts``?" with a
report instead of a bool: it lists every missing member, wrongly typed or
invalid count, badly shaped ``expert_weights`` entry, non-conforming MoE layer,
uncallable method, signature a runner cannot call by keyword, and broken
invariant, so a model author can fix them all at once.

It never raises (whatever ``obj`` is: a mock, a class, ``None``, an object
whose properties raise), never mutates the object, and never calls the
methods it checks: it only reads attributes and inspects signatures.

The member lists (``COUNT_MEMBERS``, ``MODEL_MEMBERS``, ``MODEL_METHODS``,
``LAYER_METHODS``) come from ``moe_protocols.protocols``, read off the classes
there; import them from there.
"""

from __future__ import annotations

from moe_protocols.conformance._check import check_conformance, check_layer_conformance
from moe_protocols.conformance._report import (
    MIXTURE_OF_EXPERTS,
    MOE_LAYER,
    ConformanceReport,
    Problem,
    ProblemKind,
)

__all__ = [
    "MIXTURE_OF_EXPERTS",
    "MOE_LAYER",
    "ConformanceReport",
    "Problem",
    "ProblemKind",
    "check_conformance",
    "check_layer_conformance",
]
