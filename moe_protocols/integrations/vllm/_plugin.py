"""``register()`` / ``unregister()``: install and remove the seams, all or nothing."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import threading
from collections.abc import Callable, MutableMapping
from typing import Any, Final, cast

import attrs

from moe_protocols.eplb import DEFAULT_POLICIES
from moe_protocols.errors import PolicyError

from ._policy import VLLM_DEFAULT_POLICY, vllm_policy_class
from ._seams import (
    LOGGER,
    failing_v1_load_model,
    failing_v2_register_model,
    resolving_get_mixture_of_experts_model,
    set_policy_name,
    suspending_release_cuda_graphs,
    with_resolved_model,
)

__all__ = [
    "DISABLE_ENV",
    "POLICY_ENV",
    "SUPPORTED_VLLM",
    "is_registered",
    "register",
    "registered_seams",
    "unregister",
]

SUPPORTED_VLLM: Final = ">=0.33,<0.34"
"""The vLLM releases the seams were written against and tested with (the ``vllm`` extra)."""
_SUPPORTED_MINOR: Final = (0, 33)

POLICY_ENV: Final = "MOE_PROTOCOLS_VLLM_POLICY"
"""Environment variable naming the EPLB policy vLLM's ``"default"`` runs (unset: vLLM's own)."""

DISABLE_ENV: Final = "MOE_PROTOCOLS_VLLM_DISABLE"
"""Set to 1 to make ``register()`` patch nothing (the plugin stays installed but inert)."""

_RUNNER_V1: Final = "vllm.v1.worker.gpu_model_runner"
_RUNNER_V2_EPLB: Final = "vllm.v1.worker.gpu.eplb_utils"
_ELASTIC: Final = "vllm.distributed.elastic_ep.elastic_execute"
_POLICIES: Final = "vllm.distributed.eplb.policy"
_RESOLVE: Final = "get_mixture_of_experts_model"


@attrs.frozen
class _Patch:
    """One replaced attribute (``owner.name``) or mapping item (``owner[name]``)."""

    where: str
    owner: Any
    name: str
    original: Any
    replacement: Any
    item: bool = False

    def apply(self) -> None:
        if self.item:
            self.owner[self.name] = self.replacement
        else:
            setattr(self.owner, self.name, self.replacement)

    def undo(self) -> None:
        if self.item:
            self.owner[self.name] = self.original
        else:
            setattr(self.owner, self.name, self.original)


_lock = threading.Lock()
_applied: list[_Patch] = []
_warned: list[str] = []


def _installed_vllm_version() -> str:
    return importlib.metadata.version("vllm")


def _supported(version: str) -> bool:
    match = re.match(r"(\d+)\.(\d+)", version)
    return match is not None and (int(match[1]), int(match[2])) == _SUPPORTED_MINOR


def _attr(module: Any, name: str, where: str) -> Any:
    try:
        return getattr(module, name)
    except AttributeError:
        raise LookupError(f"{where} has no attribute {name!r}") from None


def _method_patch(
    module: Any, class_name: str, method: str, wrap: Callable[[Any], Any], where: str
) -> _Patch:
    owner = _attr(module, class_name, where)
    namespace = cast("dict[str, Any]", vars(owner))  # vars() of an Any is unknown to pyright
    original = namespace.get(method)
    if original is None:
        raise LookupError(f"{where}.{class_name} defines no {method!r}")
    return _Patch(f"{where}.{class_name}.{method}", owner, method, original, wrap(original))


def _selected_policy() -> tuple[str, type[Any] | None]:
    """The policy name from the environment, and the vLLM class to install (None: vLLM's)."""
    name = os.environ.get(POLICY_ENV, "").strip()
    if not name or name == VLLM_DEFAULT_POLICY:
        return "vLLM's default", None
    if name not in DEFAULT_POLICIES:
        known = ", ".join(n for n in DEFAULT_POLICIES.names)
        raise PolicyError(
            f"{POLICY_ENV}={name!r} names no moe-protocols EPLB policy; known policies: "
            f"{known} ('{VLLM_DEFAULT_POLICY}' keeps vLLM's own)"
        )
    return name, vllm_policy_class(name)


def _plan(policy_class: type[Any] | None) -> list[_Patch]:
    """Every patch, looked up before any is applied (a missing symbol patches nothing)."""
    v1 = importlib.import_module(_RUNNER_V1)
    v2 = importlib.import_module(_RUNNER_V2_EPLB)
    elastic = importlib.import_module(_ELASTIC)
    plan = [
        _Patch(
            f"{_RUNNER_V1}.{_RESOLVE}",
            v1,
            _RESOLVE,
            original := _attr(v1, _RESOLVE, _RUNNER_V1),
            resolving_get_mixture_of_experts_model(original),
        ),
        _Patch(
            f"{_RUNNER_V2_EPLB}.{_RESOLVE}",
            v2,
            _RESOLVE,
            original := _attr(v2, _RESOLVE, _RUNNER_V2_EPLB),
            resolving_get_mixture_of_experts_model(original),
        ),
        _method_patch(v1, "GPUModelRunner", "load_model", failing_v1_load_model, _RUNNER_V1),
        _method_patch(
            v2, "EPLBController", "maybe_register_model", failing_v2_register_model, _RUNNER_V2_EPLB
        ),
    ]
    for method in ("switch_and_prepare", "transfer_weights"):
        plan.append(
            _method_patch(
                elastic, "ElasticEPScalingExecutor", method, with_resolved_model, _ELASTIC
            )
        )
    plan.append(
        _method_patch(
            elastic,
            "ElasticEPScalingExecutor",
            "_release_cuda_graphs",
            suspending_release_cuda_graphs,
            _ELASTIC,
        )
    )
    if policy_class is not None:
        policies: MutableMapping[str, Any] = _attr(
            importlib.import_module(_POLICIES), "EPLB_POLICIES", _POLICIES
        )
        if VLLM_DEFAULT_POLICY not in policies:
            raise LookupError(f"{_POLICIES}.EPLB_POLICIES has no {VLLM_DEFAULT_POLICY!r}")
        plan.append(
            _Patch(
                f"{_POLICIES}.EPLB_POLICIES[{VLLM_DEFAULT_POLICY!r}]",
                policies,
                VLLM_DEFAULT_POLICY,
                policies[VLLM_DEFAULT_POLICY],
                policy_class,
                item=True,
            )
        )
    return plan


def _warn_once(message: str, *args: object) -> None:
    key = message % args
    if key not in _warned:
        _warned.append(key)
        LOGGER.warning(message, *args)


def register() -> None:
    """The ``vllm.general_plugins`` entry point: install the seams in this process.

    Idempotent (vLLM calls it in every process, possibly more than once).
    Patches nothing, with one warning, when the installed vLLM is outside
    :data:`SUPPORTED_VLLM`, when a symbol a seam needs is missing, or when
    :data:`DISABLE_ENV` is ``1``.

    Raises:
        PolicyError: :data:`POLICY_ENV` names no known policy (vLLM start-up
            fails with the list of known names).
    """
    with _lock:
        if _applied:
            return
        if os.environ.get(DISABLE_ENV, "").strip() == "1":
            _warn_once("moe-protocols: %s=1, the vLLM plugin patches nothing", DISABLE_ENV)
            return
        version = _installed_vllm_version()
        if not _supported(version):
            _warn_once(
                "moe-protocols: vLLM %s is outside the supported range %s; "
                "the plugin patches nothing and vLLM runs unchanged",
                version,
                SUPPORTED_VLLM,
            )
            return
        policy_name, policy_class = _selected_policy()
        try:
            plan = _plan(policy_class)
        except (ImportError, LookupError) as exc:
            _warn_once(
                "moe-protocols: vLLM %s lacks a seam the plugin needs (%s); "
                "the plugin patches nothing and vLLM runs unchanged",
                version,
                exc,
            )
            return
        for patch in plan:
            patch.apply()
        _applied.extend(plan)
        set_policy_name(policy_name)
        LOGGER.info(
            "moe-protocols: vLLM plugin active (vLLM %s): MoE resolution through MoEView "
            "in the V1 and V2 runners, elastic EP on the resolved model, EPLB policy: %s",
            version,
            policy_name,
        )


def unregister() -> None:
    """Undo :func:`register` in this process (restores every original); no-op if not registered."""
    with _lock:
        while _applied:
            _applied.pop().undo()
        set_policy_name("vLLM's default")


def is_registered() -> bool:
    """Whether the seams are installed in this process."""
    return bool(_applied)


def registered_seams() -> tuple[str, ...]:
    """The vLLM symbols currently replaced (``module.name`` or ``module.Class.method``)."""
    return tuple(patch.where for patch in _applied)
