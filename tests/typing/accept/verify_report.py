"""mypy must accept this file: the self-test's report is typed down to each check's fields."""

from __future__ import annotations

import torch

from moe_protocols import CheckStatus, VerificationReport, verify_eplb_integration


def failing_layers(model: torch.nn.Module) -> list[tuple[str, int | None, str | None]]:
    report: VerificationReport = verify_eplb_integration(
        model, torch.zeros(1, 4, dtype=torch.long), exact=None, rtol=1e-3
    )
    return [(c.name, c.layer, c.fix) for c in report.checks if c.status is CheckStatus.FAILED]


def with_a_factory(model: object) -> bool:
    return verify_eplb_integration(model, lambda: {"input_ids": torch.zeros(1, 4)}).ok
