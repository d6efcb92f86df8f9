"""The replacements the plugin installs in vLLM 0.33, one function per seam.

Each takes vLLM's original callable and returns the function that stands in
for it, so the original is called (and its result kept) wherever vLLM already
does the right thing. The seams, and the vLLM symbol each replaces, are listed
in the README ("Using with vLLM").
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Generator
from typing import Any, Final, cast

from moe_protocols.adapters import MoEView
from moe_protocols.errors import NotMixtureOfExpertsError
from moe_protocols.protocols import MODEL_MEMBERS

__all__ = [
    "EPLB_MEMBERS",
    "LOGGER",
    "EplbFacingModel",
    "failing_v1_load_model",
    "failing_v2_register_model",
    "resolving_get_mixture_of_experts_model",
    "suspending_release_cuda_graphs",
    "with_resolved_model",
]

LOGGER: Final = logging.getLogger("vllm.moe_protocols")
"""A child of vLLM's ``vllm`` logger, so our lines appear in vLLM's log, in its format."""

EPLB_MEMBERS: Final = frozenset(MODEL_MEMBERS)
"""The ``MixtureOfExperts`` members (vLLM's protocol and ours have the same ones)."""

_policy_name: list[str] = ["vLLM's default"]


def set_policy_name(name: str) -> None:
    """Record the policy in use, for the health line."""
    _policy_name[0] = name


def _class_name(obj: object) -> str:
    return type(obj).__qualname__


def resolving_get_mixture_of_experts_model(
    vllm_resolve: Callable[[object], Any],
) -> Callable[[object], Any]:
    """Replacement for ``get_mixture_of_experts_model`` as bound in vLLM's runner modules.

    vLLM's rule (the object, then one ``get_language_model()``) runs first and
    its answer is returned unchanged whenever it finds a model; otherwise (also
    when vLLM's rule raised, e.g. a ``get_language_model()`` failing with
    something other than ``NotImplementedError``)
    ``MoEView.resolve`` walks the default unwrap steps and the MoE model it
    finds is returned (the model itself, not a view: vLLM registers, steps and
    rescales that object). When neither finds one: None, or vLLM's exception
    if it raised one, as without the plugin.
    """

    @functools.wraps(vllm_resolve)
    def get_mixture_of_experts_model(model: object) -> Any:
        vllm_error: Exception | None = None
        try:
            found = vllm_resolve(model)
        except Exception as exc:  # vLLM catches only NotImplementedError; the walk records the rest
            vllm_error, found = exc, None
        view = MoEView.resolve(model)
        path = "" if view is None else (view.trace.resolved_path or "")
        if found is not None:
            _health(model, found, path if view is not None and view.model is found else "", "vLLM")
            return found
        if view is None:
            if vllm_error is not None:
                raise vllm_error  # nothing found either way: vLLM's own failure, unchanged
            LOGGER.info(
                "moe-protocols: no MixtureOfExperts model in %s (vLLM's rule and the "
                "moe-protocols walk found none); EPLB policy: %s",
                _class_name(model),
                _policy_name[0],
            )
            return None
        _health(model, view.model, path, "moe-protocols")
        return view.model

    return get_mixture_of_experts_model


def _health(model: object, found: object, path: str, by: str) -> None:
    LOGGER.info(
        "moe-protocols: serving %s; MoE model %s at %s (found by %s); EPLB policy: %s",
        _class_name(model),
        _class_name(found),
        path or "(vLLM's rule)",
        by,
        _policy_name[0],
    )


def _load_failure(model: object, served_name: object) -> NotMixtureOfExpertsError:
    prefix = (
        f"vLLM was started with EPLB enabled (--enable-eplb) for {served_name}, but no "
        "MixtureOfExperts model is reachable from the loaded model; disable EPLB or make "
        "the model implement the protocol. "
    )
    try:
        view = MoEView.require(model)
    except NotMixtureOfExpertsError as exc:
        return NotMixtureOfExpertsError(prefix + str(exc), trace=exc.trace, reports=exc.reports)
    # Only reached when vLLM filtered out a model that does conform.
    return NotMixtureOfExpertsError(
        prefix + f"(the walk finds {view.trace.resolved_path}, but vLLM did not register it)",
        trace=view.trace,
        reports=view.trace.reports,
    )


def failing_v1_load_model(load_model: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap the V1 ``GPUModelRunner.load_model``: EPLB on and no MoE model found fails the load.

    vLLM 0.33 leaves ``_moe_model`` None and fails on the first step with a
    bare assert; this raises ``NotMixtureOfExpertsError`` with the trace instead.
    """

    @functools.wraps(load_model)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        result = load_model(self, *args, **kwargs)
        if self.parallel_config.enable_eplb and self._moe_model is None:
            raise _load_failure(self.get_model(), self.model_config.model)
        return result

    return wrapper


def failing_v2_register_model(register: Callable[..., bool]) -> Callable[..., bool]:
    """Wrap Model Runner V2's ``EPLBController.maybe_register_model`` the same way.

    vLLM 0.33 returns False there and then steps nothing, silently.
    """

    @functools.wraps(register)
    def wrapper(self: Any, model: Any, model_config: Any) -> bool:
        registered = register(self, model, model_config)
        if not registered and self.parallel_config.enable_eplb:
            raise _load_failure(model, model_config.model)
        return registered

    return wrapper


class EplbFacingModel:
    """The served model as vLLM's elastic-EP code should see it.

    ``ElasticEPScalingExecutor`` takes ``model_runner.get_model()`` (the
    top-level wrapper) and calls the ``MixtureOfExperts`` members on it. This
    stands in for that object while those methods run: the members in
    :data:`EPLB_MEMBERS` go to the MoE model vLLM registered with its EPLB
    state; everything else (``modules()``, ``state_dict()``, ...) goes to the
    top-level model, so the non-expert weights sent to a new worker are still
    the whole model's. Attribute forwarding is by name because it stands in
    for an arbitrary ``nn.Module`` whose surface we do not own.
    """

    __slots__ = ("_moe", "_top")

    def __init__(self, top: object, moe: object) -> None:
        object.__setattr__(self, "_top", top)
        object.__setattr__(self, "_moe", moe)

    def __getattr__(self, name: str) -> Any:
        target = self._moe if name in EPLB_MEMBERS else self._top
        return getattr(target, name)

    def __setattr__(self, name: str, value: object) -> None:
        setattr(self._moe if name in EPLB_MEMBERS else self._top, name, value)

    def __repr__(self) -> str:
        return f"EplbFacingModel({_class_name(self._top)} -> {_class_name(self._moe)})"


def _registered_moe_model(runner: Any) -> object | None:
    state = getattr(runner, "eplb_state", None)
    if state is None:
        return None
    model_state = state.model_states.get(runner.model_config.compute_hash())
    return None if model_state is None else model_state.model


_SHADOW: Final = "get_model"


@contextlib.contextmanager
def _get_model_returns(runner: Any, replacement: object) -> Generator[None, None, None]:
    namespace = cast("dict[str, object]", vars(runner))  # vars() of an Any is unknown
    had_own = _SHADOW in namespace
    before = namespace.get(_SHADOW)

    def get_model() -> object:
        return replacement

    get_model.moe_protocols_shadow = True  # type: ignore[attr-defined]  # reason: a marker on our own function
    setattr(runner, _SHADOW, get_model)
    try:
        yield
    finally:
        if had_own:
            setattr(runner, _SHADOW, before)
        else:
            delattr(runner, _SHADOW)


def with_resolved_model(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap an ``ElasticEPScalingExecutor`` method that uses the model's EPLB members.

    While it runs, ``model_runner.get_model()`` returns an
    :class:`EplbFacingModel` over the top-level model and the MoE model
    registered with the EPLB state. When that model *is* the top-level model
    (vLLM's rule found it), nothing changes.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        runner = self.worker.model_runner
        top = runner.get_model()
        moe = _registered_moe_model(runner)
        if moe is None or moe is top:
            return method(self, *args, **kwargs)
        with _get_model_returns(runner, EplbFacingModel(top, moe)):
            return method(self, *args, **kwargs)

    return wrapper


def suspending_release_cuda_graphs(method: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap ``_release_cuda_graphs``: it resets the compile wrapper of the real top-level model."""

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> Any:
        runner = self.worker.model_runner
        namespace = cast("dict[str, object]", vars(runner))  # vars() of an Any is unknown
        shadow = namespace.get(_SHADOW)
        if not getattr(shadow, "moe_protocols_shadow", False):
            return method(self, *args, **kwargs)
        delattr(runner, _SHADOW)
        try:
            return method(self, *args, **kwargs)
        finally:
            setattr(runner, _SHADOW, shadow)

    return wrapper
