"""The layering as a test: who may import whom inside ``moe_protocols``.

An AST walk over every module of the package collects its imports of the
package (absolute and relative, at module level and inside functions) and
checks them against the table below, the allowed imports of DESIGN.md's layers
and of the restructure (issue 14). Imports under ``if TYPE_CHECKING:`` are
annotations only: they are exempt from the layering rules and from the cycle
check, since they never run.

Three more rules:

- no function-local import of the package outside ``moe_protocols.cli``
  (a local import is how a cycle hides; the CLI may defer its commands'
  imports to keep ``--help`` fast);
- nothing imports the CLI except ``moe_protocols.__main__``;
- the run-time import graph has no cycle.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Final, NamedTuple

import pytest

ROOT: Final = Path(__file__).resolve().parents[1]
PACKAGE: Final = "moe_protocols"


class Import(NamedTuple):
    """One import of a package module by another."""

    importer: str
    target: str
    line: int
    local: bool
    """Inside a function or class body rather than at module level."""
    type_only: bool
    """Under ``if TYPE_CHECKING:``."""


class Rule(NamedTuple):
    """Modules under ``importer`` must not import modules under any of ``forbidden``."""

    importer: str
    forbidden: tuple[str, ...]
    why: str
    exempt: tuple[str, ...] = ()
    """Importers under ``importer`` the rule does not cover."""


_ENGINE_OUTSIDE: Final = (
    "moe_protocols.adapters",
    "moe_protocols.models",
    "moe_protocols.building",
    "moe_protocols.profiling",
    "moe_protocols.runner",
    "moe_protocols.cli",
    "moe_protocols.verification",
    "moe_protocols.integrations",
)
_ABOVE_BASE: Final = (
    "moe_protocols.conformance",
    "moe_protocols.guards",
    *_ENGINE_OUTSIDE,
    "moe_protocols.eplb",
)

RULES: Final = (
    Rule(
        "moe_protocols.errors",
        ("moe_protocols",),
        "the errors sit below everything (report types only under TYPE_CHECKING)",
    ),
    Rule(
        "moe_protocols.protocols",
        ("moe_protocols",),
        "the contract depends on nothing in the package",
    ),
    *(
        Rule(base, _ABOVE_BASE, "base modules import only errors and each other")
        for base in (
            "moe_protocols._validate",
            "moe_protocols._torch_typed",
            "moe_protocols.parallel",
            "moe_protocols.layer_views",
        )
    ),
    Rule(
        "moe_protocols.conformance",
        ("moe_protocols.guards", *_ENGINE_OUTSIDE, "moe_protocols.eplb"),
        "conformance checks against protocols.py and nothing else",
    ),
    Rule(
        "moe_protocols.eplb",
        _ENGINE_OUTSIDE,
        "the engine is engine-agnostic: it never sees adapters, models or the tools above it",
    ),
    Rule(
        "moe_protocols.eplb",
        ("moe_protocols.eplb.analysis",),
        "the research tools are opt-in: nothing in the engine imports them",
        exempt=("moe_protocols.eplb.analysis", "moe_protocols.eplb.workloads"),
    ),
    Rule(
        "moe_protocols.eplb.policies._",
        ("moe_protocols.eplb.policies.deepseek", "moe_protocols.eplb.policies.migration"),
        "of the policies' shared modules only the registry imports the concrete policies",
        exempt=("moe_protocols.eplb.policies._registry",),
    ),
    Rule(
        "moe_protocols.eplb.policies._contract",
        ("moe_protocols.eplb.policies._registry",),
        "the contract sits below the registry",
    ),
    Rule(
        "moe_protocols.adapters",
        (
            "moe_protocols.eplb",
            "moe_protocols.models",
            "moe_protocols.building",
            "moe_protocols.profiling",
            "moe_protocols.runner",
            "moe_protocols.cli",
            "moe_protocols.verification",
            "moe_protocols.integrations",
        ),
        "resolution needs only the contract",
    ),
    Rule(
        "moe_protocols.adapters",
        ("moe_protocols.adapters.hf",),
        "the generic walk knows no ecosystem; one module assembles the default steps",
        exempt=(
            "moe_protocols.adapters.hf",
            "moe_protocols.adapters._defaults",
        ),
    ),
    Rule(
        "moe_protocols.models",
        (
            "moe_protocols.adapters.hf",
            "moe_protocols.profiling",
            "moe_protocols.runner",
            "moe_protocols.cli",
            "moe_protocols.verification",
            "moe_protocols.integrations",
        ),
        "reference models are written the way an outside author writes one",
        exempt=("moe_protocols.models._tiny_hf",),
    ),
    *(
        Rule(
            face_user,
            tuple(
                f"moe_protocols.{package}._"
                for package in ("adapters", "eplb", "models", "building", "conformance")
            ),
            "library-level tools use the public faces, not another package's private modules",
        )
        for face_user in ("moe_protocols.profiling", "moe_protocols.runner")
    ),
)

CLI: Final = "moe_protocols.cli"
CLI_IMPORTERS: Final = frozenset({"moe_protocols.__main__"})


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules(root: Path) -> dict[str, Path]:
    return {_module_name(path): path for path in sorted((root / PACKAGE).rglob("*.py"))}


def _is_type_checking(test: ast.expr) -> bool:
    return ast.unparse(test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")


def _resolve(importer: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, *([node.module] if node.module else [])])


def collect_imports(source: str, importer: str, is_package: bool, known: set[str]) -> list[Import]:
    """Every import of ``PACKAGE`` in ``source``, resolved to the module it loads."""
    found: list[Import] = []

    def add(target: str, node: ast.stmt, local: bool, type_only: bool) -> None:
        if target == PACKAGE or target.startswith(PACKAGE + "."):
            imp = Import(importer, target, node.lineno, local, type_only)
            if imp not in found:  # ``from x import a, b`` is one import of x
                found.append(imp)

    def visit(body: list[ast.stmt], local: bool, type_only: bool) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    add(alias.name, node, local, type_only)
            elif isinstance(node, ast.ImportFrom):
                module = _resolve(importer, is_package, node)
                for alias in node.names:
                    submodule = f"{module}.{alias.name}"
                    add(submodule if submodule in known else module, node, local, type_only)
            elif isinstance(node, ast.If) and _is_type_checking(node.test):
                visit(node.body, local, True)
                visit(node.orelse, local, type_only)
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(node.body, local or not isinstance(node, ast.ClassDef), type_only)
            else:
                for field in ("body", "orelse", "finalbody", "handlers"):
                    inner = getattr(node, field, None)
                    if isinstance(inner, list):
                        stmts = [s for s in inner if isinstance(s, ast.stmt)]
                        handlers = [h for h in inner if isinstance(h, ast.ExceptHandler)]
                        visit(stmts, local, type_only)
                        for handler in handlers:
                            visit(handler.body, local, type_only)

    visit(ast.parse(source).body, False, False)
    return found


def _under(name: str, prefix: str) -> bool:
    return (
        name == prefix
        or name.startswith(prefix + ".")
        or (prefix.endswith("._") and name.startswith(prefix))
    )


def rule_violations(imports: list[Import]) -> list[str]:
    """One line per import that a rule of ``RULES`` forbids."""
    problems = []
    for imp in imports:
        if imp.type_only:
            continue
        for rule in RULES:
            if not _under(imp.importer, rule.importer):
                continue
            if any(_under(imp.importer, e) for e in rule.exempt):
                continue
            if any(_under(imp.target, f) for f in rule.forbidden) and not _under(
                imp.target, imp.importer
            ):
                problems.append(f"{imp.importer}:{imp.line} imports {imp.target}: {rule.why}")
    return problems


def local_import_violations(imports: list[Import]) -> list[str]:
    """Function-local imports of the package outside the CLI."""
    return [
        f"{imp.importer}:{imp.line} imports {imp.target} inside a function"
        for imp in imports
        if imp.local and not imp.type_only and not _under(imp.importer, CLI)
    ]


def cli_import_violations(imports: list[Import]) -> list[str]:
    """Imports of the CLI from anywhere but ``__main__`` and the CLI itself."""
    return [
        f"{imp.importer}:{imp.line} imports the CLI ({imp.target})"
        for imp in imports
        if _under(imp.target, CLI)
        and not _under(imp.importer, CLI)
        and imp.importer not in CLI_IMPORTERS
    ]


def find_cycles(imports: list[Import]) -> list[list[str]]:
    """Strongly connected components (size > 1, or a self-import) of the run-time graph."""
    graph: dict[str, set[str]] = {}
    for imp in imports:
        if not imp.type_only and imp.target != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.target)
            graph.setdefault(imp.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def connect(node: str) -> None:  # Tarjan; the package graph is shallow
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for succ in sorted(graph[node]):
            if succ not in index:
                connect(succ)
                low[node] = min(low[node], low[succ])
            elif succ in on_stack:
                low[node] = min(low[node], index[succ])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return cycles


def package_imports(root: Path = ROOT) -> list[Import]:
    modules = _modules(root)
    known = set(modules)
    found: list[Import] = []
    for name, path in modules.items():
        found += collect_imports(path.read_text(), name, path.name == "__init__.py", known)
    return found


@pytest.fixture(scope="module")
def imports() -> list[Import]:
    return package_imports()


def test_the_walk_sees_the_whole_package(imports: list[Import]) -> None:
    importers = {imp.importer for imp in imports}
    assert {"moe_protocols.eplb", "moe_protocols.adapters", "moe_protocols.__main__"} <= importers
    assert len(imports) > 100


def test_layers_import_only_what_the_table_allows(imports: list[Import]) -> None:
    assert rule_violations(imports) == []


def test_no_function_local_imports_of_the_package(imports: list[Import]) -> None:
    assert local_import_violations(imports) == []


def test_nothing_imports_the_cli(imports: list[Import]) -> None:
    assert cli_import_violations(imports) == []


def test_no_import_cycles(imports: list[Import]) -> None:
    assert find_cycles(imports) == []


# The checks themselves, on planted sources: each must catch what it exists for.


def _planted(sources: dict[str, str]) -> list[Import]:
    known = set(sources)
    return [
        imp
        for name, source in sources.items()
        for imp in collect_imports(source, name, False, known)
    ]


def test_a_planted_cycle_is_found_even_through_relative_imports() -> None:
    imports = _planted(
        {
            "moe_protocols.eplb._a": "from moe_protocols.eplb._b import x\n",
            "moe_protocols.eplb._b": "from ._c import y\n",
            "moe_protocols.eplb._c": "from . import _a\n",
        }
    )
    assert find_cycles(imports) == [
        ["moe_protocols.eplb._a", "moe_protocols.eplb._b", "moe_protocols.eplb._c"]
    ]


def test_a_type_checking_import_breaks_no_rule_and_makes_no_cycle() -> None:
    imports = _planted(
        {
            "moe_protocols.eplb._a": "from moe_protocols.eplb._b import x\n",
            "moe_protocols.eplb._b": (
                "from typing import TYPE_CHECKING\n"
                "if TYPE_CHECKING:\n"
                "    from moe_protocols.eplb._a import y\n"
                "    from moe_protocols.adapters import MoEView\n"
            ),
        }
    )
    assert find_cycles(imports) == []
    assert rule_violations(imports) == []


def test_a_planted_layer_breach_and_a_local_import_are_reported() -> None:
    imports = _planted(
        {
            "moe_protocols.eplb._state": (
                "def f():\n    from moe_protocols.adapters._view import MoEView\n"
            ),
            "moe_protocols.profiling": "from moe_protocols.eplb._maps import m\n",
            "moe_protocols.runner": "import moe_protocols.cli\n",
        }
    )
    assert [line.split(":")[0] for line in rule_violations(imports)] == [
        "moe_protocols.eplb._state",
        "moe_protocols.profiling",
    ]
    assert local_import_violations(imports) == [
        "moe_protocols.eplb._state:2 imports moe_protocols.adapters._view inside a function"
    ]
    assert cli_import_violations(imports) == [
        "moe_protocols.runner:1 imports the CLI (moe_protocols.cli)"
    ]
