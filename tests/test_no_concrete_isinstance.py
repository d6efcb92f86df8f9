"""The rule as a test: the library never asks "which concrete class is this?".

Every ``isinstance``/``issubclass`` in ``moe_protocols`` must test against a
runtime Protocol defined in ``moe_protocols``, a builtin type, a
``collections.abc`` ABC or ``torch.Tensor``. The class argument is evaluated
in the namespace of the module that contains the call, so aliases and tuples
are checked for what they really are.
"""

from __future__ import annotations

import ast
import builtins
import collections.abc
import importlib
from pathlib import Path
from typing import Any

import torch

PACKAGE = Path(__file__).resolve().parents[1] / "moe_protocols"

CALLER_SUPPLIED = frozenset({"layer_type"})
"""Names of parameters through which the *caller* passes the class to test against
(``MoEView.require(model, layer_type=MoERunner)``): the library names no class there."""


def _allowed(cls: object) -> bool:
    if type(cls) is not type and not hasattr(cls, "__mro__"):
        return False
    if getattr(builtins, getattr(cls, "__name__", ""), None) is cls:
        return True
    if getattr(cls, "__module__", None) == "collections.abc":
        return True
    if cls is torch.Tensor:
        return True
    return bool(getattr(cls, "_is_protocol", False)) and str(
        getattr(cls, "__module__", "")
    ).startswith("moe_protocols")


def violations(source: str, namespace: dict[str, Any], filename: str) -> list[str]:
    """Return a line for every isinstance/issubclass whose class argument is not allowed."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            continue
        if node.func.id not in ("isinstance", "issubclass") or len(node.args) != 2:
            continue
        expr = ast.unparse(node.args[1])
        if expr in CALLER_SUPPLIED:
            continue
        where = f"{filename}:{node.lineno}: {node.func.id}(..., {expr})"
        try:
            target = eval(expr, dict(namespace))
        except Exception as exc:
            found.append(f"{where}: cannot resolve the class argument statically ({exc})")
            continue
        classes = target if isinstance(target, tuple) else (target,)
        bad = [c for c in classes if not _allowed(c)]
        if bad:
            found.append(f"{where}: not a moe_protocols Protocol or builtin: {bad}")
    return found


def _modules() -> list[tuple[str, Path]]:
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out.append((".".join(parts), path))
    return out


def test_library_has_no_isinstance_against_concrete_classes() -> None:
    problems = []
    for name, path in _modules():
        module = importlib.import_module(name)
        problems += violations(path.read_text(), vars(module), str(path))
    assert problems == [], "\n".join(problems)


def test_rule_catches_a_concrete_wrapper_check() -> None:
    source = "import torch\ndef f(m):\n    return isinstance(m, torch.nn.Linear)\n"
    assert violations(source, {"torch": torch}, "x.py")


def test_rule_catches_a_tuple_with_one_concrete_class() -> None:
    source = "import torch\ndef f(m):\n    return issubclass(m, (int, torch.nn.Module))\n"
    assert violations(source, {"torch": torch}, "x.py")


def test_rule_accepts_protocols_builtins_and_abcs() -> None:
    from moe_protocols.protocols import MixtureOfExperts

    source = (
        "def f(m):\n    return isinstance(m, (MixtureOfExperts, int, Sequence, torch.Tensor))\n"
    )
    namespace = {
        "MixtureOfExperts": MixtureOfExperts,
        "Sequence": collections.abc.Sequence,
        "torch": torch,
    }
    assert violations(source, namespace, "x.py") == []
