# mypy must reject the marked lines (see tests/test_typing.py for the marker syntax).
from __future__ import annotations

from moe_protocols import VerificationReport, verify_eplb_integration


def misuse(report: VerificationReport) -> None:
    report.checks = ()  # E: misc
    verify_eplb_integration(object(), exact="yes")  # E: arg-type
    verify_eplb_integration(object(), None, True)  # E: call-arg
