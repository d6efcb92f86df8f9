"""EPLB configuration: how often to rebalance, over how much history, with which policy."""

from __future__ import annotations

from typing import Final

import attrs

from moe_protocols._validate import Validator, int_field
from moe_protocols.errors import EplbConfigError

from . import _limits

__all__ = ["EplbConfig"]

_NAME: Final = "EplbConfig"


_TYPE: Final = "{label} must be an int, got {type} {value!r}"


def _int_at_least(minimum: int) -> Validator:
    """Validator: an ``int`` (never a ``bool``) that is ``>= minimum``."""
    bound = "> 0" if minimum == 1 else ">= {minimum}"
    return int_field(
        minimum,
        EplbConfigError,
        owner=_NAME,
        template="{label} must be " + bound + ", got {value}",
        type_template=_TYPE,
    )


def _check_window(instance: object, attribute: attrs.Attribute[int], value: object) -> None:
    _int_at_least(1)(instance, attribute, value)
    assert isinstance(value, int)
    _limits.check_count(f"{_NAME}.window_size", value, "MAX_WINDOW_SIZE", EplbConfigError)


def _check_bool(instance: object, attribute: attrs.Attribute[bool], value: object) -> None:
    if not isinstance(value, bool):
        raise EplbConfigError(
            f"{_NAME}.{attribute.name} must be a bool, got {type(value).__name__} {value!r}"
        )


def _check_policy_name(instance: object, attribute: attrs.Attribute[str], value: object) -> None:
    if not isinstance(value, str) or not value.strip():
        raise EplbConfigError(
            f"{_NAME}.{attribute.name} must be a non-empty policy name (str), got {value!r}"
        )


@attrs.frozen
class EplbConfig:
    """Settings of one EPLB state; field for field the meaning of vLLM's ``EPLBConfig``.

    Only the value checks live here. Whether ``policy`` names a known policy is
    checked by ``EplbState`` against its policy registry, and whether
    ``num_redundant_experts`` matches a model is checked when the model is added.
    """

    window_size: int = attrs.field(default=1000, validator=_check_window)
    """Steps of expert load kept in the sliding window that a rearrangement plans on.

    At most ``MAX_WINDOW_SIZE`` (65536, see ``moe_protocols.eplb.limits``)."""

    step_interval: int = attrs.field(default=3000, validator=_int_at_least(1))
    """Steps between two rearrangements (the first one happens after ``step_interval`` steps)."""

    num_redundant_experts: int = attrs.field(default=0, validator=_int_at_least(0))
    """Extra physical slots per model, over all EP ranks, that hold replicas of hot experts.

    Every registered model must have exactly this many (``num_redundant_experts``)."""

    log_balancedness: bool = attrs.field(default=False, validator=_check_bool)
    """Whether the runner asks ``step(log_stats=True)``; logging costs an all-reduce per step."""

    log_balancedness_interval: int = attrs.field(default=1, validator=_int_at_least(1))
    """Log balancedness every this many steps when ``log_stats`` is on."""

    policy: str = attrs.field(default="deepseek", validator=_check_policy_name)
    """Name of the rebalancing policy in the state's ``PolicyRegistry``."""
