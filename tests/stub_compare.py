"""Compare the annotations of a stub (.pyi) with those of the real source, the part stubtest skips.

stubtest checks that names, parameter names and kinds match the runtime; it
does not compare what the annotations say. This compares them as written:
each annotation in the stub against the same member's annotation in the
module that defines it at run time, after normalising spelling only (quotes
of forward references, ``torch.Tensor`` vs ``Tensor``, a module-level alias
such as ``EPLBPolicyOption = Literal["default"]`` replaced by its value). A
member the source leaves unannotated compares as ``<unannotated>``; a class
compares as ``Protocol`` or ``class``.
"""

from __future__ import annotations

import ast
import importlib
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

UNANNOTATED = "<unannotated>"


class Difference(NamedTuple):
    member: str
    stub: str
    real: str

    def __str__(self) -> str:
        return f"{self.member}: stub says {self.stub}, vLLM says {self.real}"


class _Normaliser(ast.NodeTransformer):
    def __init__(self, aliases: dict[str, ast.expr]) -> None:
        self._aliases = aliases

    def visit_Constant(self, node: ast.Constant) -> ast.AST:
        if isinstance(node.value, str):  # a forward reference: "MoERunner"
            try:
                parsed = ast.parse(node.value, mode="eval").body
            except SyntaxError:
                return node
            normalised: ast.AST = self.visit(parsed)
            return normalised
        return node

    def visit_Subscript(self, node: ast.Subscript) -> ast.AST:
        node.value = self.visit(node.value)
        if isinstance(node.value, ast.Name) and node.value.id == "Literal":
            return node  # Literal["default"] holds values, not forward references
        node.slice = self.visit(node.slice)
        return node

    def visit_Attribute(self, node: ast.Attribute) -> ast.AST:
        return ast.Name(id=node.attr, ctx=ast.Load())  # torch.Tensor -> Tensor

    def visit_Name(self, node: ast.Name) -> ast.AST:
        alias = self._aliases.get(node.id)
        if alias is None:
            return node
        replaced: ast.AST = self.visit(alias)
        return replaced


def normalise(annotation: ast.expr | None, aliases: dict[str, ast.expr] | None = None) -> str:
    """The annotation as a canonical string (``<unannotated>`` for None)."""
    if annotation is None:
        return UNANNOTATED
    copy = ast.parse(ast.unparse(annotation), mode="eval").body
    return ast.unparse(_Normaliser(aliases or {}).visit(copy))


def module_aliases(tree: ast.Module) -> dict[str, ast.expr]:
    """Module-level ``Name = <subscript>`` assignments: the type aliases a source uses."""
    out: dict[str, ast.expr] = {}
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and len(node.targets) == 1
            and isinstance(node.targets[0], ast.Name)
            and isinstance(node.value, ast.Subscript)
        ):
            out[node.targets[0].id] = node.value
    return out


def _signature(node: ast.FunctionDef, aliases: dict[str, ast.expr]) -> str:
    args = node.args
    parts = []
    positional = [*args.posonlyargs, *args.args]
    for arg in positional:
        if arg.arg in ("self", "cls"):
            continue
        parts.append(f"{arg.arg}: {normalise(arg.annotation, aliases)}")
    if args.vararg:
        parts.append(f"*{args.vararg.arg}: {normalise(args.vararg.annotation, aliases)}")
    elif args.kwonlyargs:
        parts.append("*")
    parts += [f"{a.arg}: {normalise(a.annotation, aliases)}" for a in args.kwonlyargs]
    if args.kwarg:
        parts.append(f"**{args.kwarg.arg}: {normalise(args.kwarg.annotation, aliases)}")
    return f"({', '.join(parts)}) -> {normalise(node.returns, aliases)}"


def members(
    body: list[ast.stmt], aliases: dict[str, ast.expr], prefix: str = ""
) -> Iterator[tuple[str, str]]:
    """(qualified name, normalised annotation or signature) for every annotated member.

    Overloads of one function yield one entry each, numbered in order; the
    implementation after ``@overload``\\ s is left out, as in a stub.
    """
    counts: dict[str, int] = {}
    for node in body:
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield prefix + node.target.id, normalise(node.annotation, aliases)
        elif isinstance(node, ast.FunctionDef):
            is_overload = any(normalise(d) == "overload" for d in node.decorator_list)
            name = prefix + node.name
            if is_overload:
                counts[name] = counts.get(name, 0) + 1
                yield f"{name}#{counts[name]}", _signature(node, aliases)
            elif name not in counts:
                yield name, _signature(node, aliases)
        elif isinstance(node, ast.ClassDef):
            # What kind of class, not its exact bases (a stub may shorten the MRO):
            # a Protocol where the host has a concrete class changes assignability.
            protocol = any(normalise(base).startswith("Protocol") for base in node.bases)
            yield prefix + node.name, "Protocol" if protocol else "class"
            yield from members(node.body, aliases, prefix + node.name + ".")


def _real_members(module_name: str, top: str) -> dict[str, str]:
    """The annotated members of the source file that defines ``module_name.top`` at run time."""
    obj = getattr(importlib.import_module(module_name), top, None)
    if obj is None:
        return {}
    source_file = inspect.getsourcefile(obj)
    if source_file is None:
        raise LookupError(f"no source for {module_name}.{top}")
    tree = ast.parse(Path(source_file).read_text())
    return dict(members(tree.body, module_aliases(tree)))


def compare(stub_path: Path, module_name: str) -> list[Difference]:
    """Every member of the stub whose annotation differs from the real one (or is missing)."""
    stub_tree = ast.parse(stub_path.read_text())
    stub_members = dict(members(stub_tree.body, module_aliases(stub_tree)))
    differences = []
    real_cache: dict[str, dict[str, str]] = {}
    for name, stub_annotation in stub_members.items():
        top = name.split(".")[0].split("#")[0]
        if top not in real_cache:
            real_cache[top] = _real_members(module_name, top)
        real = real_cache[top].get(name)
        if real is None:
            differences.append(Difference(name, stub_annotation, "no such annotated member"))
        elif real != stub_annotation:
            differences.append(Difference(name, stub_annotation, real))
    return differences
