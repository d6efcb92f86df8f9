"""The vLLM 0.33 plugin: vLLM finds, balances and rescales wrapped MoE models via ``MoEView``.

Installed as the ``vllm.general_plugins`` entry point ``moe_protocols``
(``pip install moe-protocols[vllm]``); vLLM calls :func:`register` in every
process before it loads the model. This is the only package in
moe-protocols that imports vLLM, and it does so inside :func:`register` and
:func:`vllm_policy_class`, never at import time. The seams it patches are
listed in the README ("Using with vLLM").
"""

from __future__ import annotations

from ._plugin import (
    DISABLE_ENV,
    POLICY_ENV,
    SUPPORTED_VLLM,
    is_registered,
    register,
    registered_seams,
    unregister,
)
from ._policy import VLLM_DEFAULT_POLICY, vllm_policy_class
from ._seams import EplbFacingModel

__all__ = [
    "DISABLE_ENV",
    "POLICY_ENV",
    "SUPPORTED_VLLM",
    "VLLM_DEFAULT_POLICY",
    "EplbFacingModel",
    "is_registered",
    "register",
    "registered_seams",
    "unregister",
    "vllm_policy_class",
]
