"""``MODULE:ATTR`` targets of the command line: parse them, import them, build the model.

One module for every command (``inspect``, ``verify``, ``demo``,
``profile``), so that each loads user code the same way; it imports nothing
heavy, so the parser can be built without importing torch.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

__all__ = ["TargetLoadError", "describe_exception", "load_target", "show_cause", "split_target"]


class TargetLoadError(Exception):
    """The ``MODULE:ATTR`` target could not be imported or built (exit code 3).

    ``__cause__`` is what user code raised, for ``--traceback``.
    """


def show_cause(exc: TargetLoadError, *, enabled: bool) -> None:
    """With ``--traceback`` (``enabled``), print the traceback of what made the load fail."""
    cause = exc.__cause__
    if enabled and cause is not None:
        traceback.print_exception(cause, file=sys.stderr)


def describe_exception(exc: BaseException) -> str:
    """One line saying what ``exc`` was, for messages (``SystemExit`` named as such)."""
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def split_target(spec: str) -> tuple[str, str]:
    """``(module, attribute path)`` of a ``MODULE:ATTR`` spec; ValueError when malformed."""
    module_part, sep, attr_path = spec.partition(":")
    if not sep or not module_part or not attr_path:
        raise ValueError(
            f"expected MODULE:ATTR (e.g. examples/wrapped_model.py:build), got {spec!r}"
        )
    return module_part, attr_path


def _import(module_part: str) -> object:
    if module_part.endswith(".py") or "/" in module_part:
        path = Path(module_part)
        if not path.is_file():
            raise TargetLoadError(f"no such file: {path}")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        if module_spec is None or module_spec.loader is None:
            raise TargetLoadError(f"cannot import {path}")
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    return importlib.import_module(module_part)


def load_target(spec: str) -> object:
    """Import ``MODULE:ATTR`` (or ``path/to/file.py:ATTR``) and build the model.

    A function or class is called with no arguments (a model factory); any
    other object is the model itself.

    Raises:
        TargetLoadError: the spec is malformed, the module cannot be imported,
            the attribute is missing, or the factory failed (whatever it
            raised, ``SystemExit`` included, is the ``__cause__``).
    """
    try:
        module_part, attr_path = split_target(spec)
    except ValueError as exc:
        raise TargetLoadError(str(exc)) from None
    try:
        target = _import(module_part)
    except TargetLoadError:
        raise
    except (Exception, SystemExit) as exc:
        # SystemExit too: a module that calls sys.exit(0) while importing did not build a model.
        raise TargetLoadError(
            f"importing {module_part!r} failed: {describe_exception(exc)}"
        ) from exc
    for name in attr_path.split("."):
        try:
            target = getattr(target, name)
        except AttributeError:
            raise TargetLoadError(f"{module_part!r} has no attribute {attr_path!r}") from None
        except Exception as exc:  # a module __getattr__ or a property that raises
            raise TargetLoadError(
                f"reading {attr_path!r} from {module_part!r} failed: {describe_exception(exc)}"
            ) from exc
    if inspect.isfunction(target) or inspect.isclass(target):
        factory: Callable[[], object] = target
        try:
            return factory()
        except (Exception, SystemExit) as exc:
            raise TargetLoadError(
                f"building the model with {spec}() failed: {describe_exception(exc)}"
            ) from exc
    return target
