"""The shared value checks: the typed error, the caller's wording, and bool never a count."""

from __future__ import annotations

import math

import attrs
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moe_protocols._validate import int_field, number_field, require_int, require_number
from moe_protocols.building import StackedExperts
from moe_protocols.eplb import TransferOptions, replica_shares
from moe_protocols.errors import EplbConfigError, MappingError, MoEProtocolsError, PolicyError


@given(value=st.integers(min_value=-5, max_value=5), minimum=st.integers(min_value=-2, max_value=2))
def test_require_int_accepts_exactly_the_ints_at_least_minimum(value: int, minimum: int) -> None:
    if value >= minimum:
        assert require_int(value, minimum=minimum, error=PolicyError, label="x") == value
    else:
        with pytest.raises(PolicyError, match=rf"^x must be an int >= {minimum}, got {value}$"):
            require_int(value, minimum=minimum, error=PolicyError, label="x")


@pytest.mark.parametrize("value", [True, False, 1.0, "1", None, [1]])
def test_require_int_refuses_bools_and_non_ints_with_the_callers_error(value: object) -> None:
    with pytest.raises(EplbConfigError, match="slots must be an int >= 0"):
        require_int(value, minimum=0, error=EplbConfigError, label="slots")


def test_a_separate_type_wording_names_the_type() -> None:
    with pytest.raises(PolicyError, match=r"^n must be an int, got str '3'$"):
        require_int(
            "3",
            minimum=1,
            error=PolicyError,
            label="n",
            template="{label} must be >= {minimum}, got {value}",
            type_template="{label} must be an int, got {type} {value!r}",
        )
    with pytest.raises(PolicyError, match=r"^n must be >= 1, got 0$"):
        require_int(
            0,
            minimum=1,
            error=PolicyError,
            label="n",
            template="{label} must be >= {minimum}, got {value}",
        )


@pytest.mark.parametrize("value", [math.nan, -0.5, True, "0.5", None])
def test_require_number_refuses_nan_negatives_bools_and_non_numbers(value: object) -> None:
    with pytest.raises(PolicyError):
        require_number(value, error=PolicyError, label="tol")


def test_require_number_bounds_and_finiteness() -> None:
    assert require_number(math.inf, error=PolicyError, label="t") == math.inf
    with pytest.raises(PolicyError):
        require_number(math.inf, error=PolicyError, label="t", finite=True)
    assert require_number(1, error=PolicyError, label="f", maximum=1.0) == 1
    with pytest.raises(PolicyError):
        require_number(1.01, error=PolicyError, label="f", maximum=1.0)


@attrs.frozen
class _Settings:
    count: int = attrs.field(default=1, validator=int_field(1, EplbConfigError))
    limit: int | None = attrs.field(
        default=None, validator=int_field(1, EplbConfigError, optional=True)
    )
    share: float = attrs.field(default=0.5, validator=number_field(EplbConfigError, maximum=1.0))


def test_attrs_fields_label_the_owner_and_field() -> None:
    assert _Settings(count=3, limit=None, share=1.0).count == 3
    with pytest.raises(EplbConfigError, match=r"^_Settings\.count must be an int >= 1, got 0$"):
        _Settings(count=0)
    with pytest.raises(EplbConfigError, match=r"^_Settings\.limit must be an int >= 1, got True$"):
        _Settings(limit=True)
    with pytest.raises(MoEProtocolsError, match=r"_Settings\.share"):
        _Settings(share=2.0)


# Callers that moved onto the shared checks keep their error type and their words.


def _dispatch_with_ranks(num_ranks: object) -> None:
    maps = torch.zeros(1, 4, 1, dtype=torch.long)
    replica_shares(
        maps,
        torch.ones(1, 4, dtype=torch.long),
        torch.ones(1, 4),
        num_physical=4,
        num_ranks=num_ranks,  # type: ignore[arg-type]  # the bad input under test
    )


@pytest.mark.parametrize("bad", [0, -1, True, 2.0, "2"])
def test_moved_callers_keep_their_typed_errors_and_messages(bad: object) -> None:
    with pytest.raises(MappingError) as mapping:
        _dispatch_with_ranks(bad)
    assert str(mapping.value) == f"replica dispatch: num_ranks must be an int >= 1, got {bad!r}"
    with pytest.raises(EplbConfigError) as transfer:
        TransferOptions(buffer_bytes=bad)  # type: ignore[arg-type]  # the bad input under test
    assert str(transfer.value) == (
        f"TransferOptions.buffer_bytes must be None or an int >= 1, got {bad!r}"
    )
    with pytest.raises(EplbConfigError) as experts:
        StackedExperts(
            {"w": torch.zeros(4, 2)},
            top_k=bad,  # type: ignore[arg-type]  # the bad input under test
        )
    assert str(experts.value).endswith(f"top_k must be an int >= 1, got {bad!r}")
