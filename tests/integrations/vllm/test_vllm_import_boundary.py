"""Only ``moe_protocols.integrations.vllm`` imports vLLM, and only when its plugin runs."""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGE = ROOT / "moe_protocols"
PLUGIN = PACKAGE / "integrations" / "vllm"


def _vllm_imports(source: str, filename: str) -> list[str]:
    """``filename:line: module`` for every import of vLLM, static or through importlib."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        elif (
            isinstance(node, ast.Call)
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and ast.unparse(node.func).endswith(("import_module", "__import__"))
        ):
            names = [str(node.args[0].value)]
        found += [
            f"{filename}:{getattr(node, 'lineno', '?')}: {name}"
            for name in names
            if name == "vllm" or name.startswith("vllm.")
        ]
    return found


def test_no_module_outside_the_plugin_imports_vllm() -> None:
    outside = [p for p in sorted(PACKAGE.rglob("*.py")) if PLUGIN not in p.parents]
    assert len(outside) > 10
    problems = [
        line for p in outside for line in _vllm_imports(p.read_text(), str(p.relative_to(ROOT)))
    ]
    assert problems == [], "\n".join(problems)


def test_the_scan_sees_every_kind_of_vllm_import() -> None:
    source = (
        "import vllm\nfrom vllm.config import X\nimport importlib\n"
        "importlib.import_module('vllm.plugins')\nfrom .vllm import y\nimport vllmx\n"
    )
    assert _vllm_imports(source, "m.py") == [
        "m.py:1: vllm",
        "m.py:2: vllm.config",
        "m.py:4: vllm.plugins",
    ]


def test_the_whole_library_imports_with_vllm_unimportable() -> None:
    """Every module, the plugin package included, imports without touching vLLM."""
    script = textwrap.dedent(
        """
        import importlib, pkgutil, sys

        class Block:
            def find_spec(self, name, path=None, target=None):
                if name == "vllm" or name.startswith("vllm."):
                    raise ImportError(f"blocked: {name}")
                return None

        sys.meta_path.insert(0, Block())
        import moe_protocols
        names = [m.name for m in pkgutil.walk_packages(moe_protocols.__path__, "moe_protocols.")]
        for name in names:
            try:
                importlib.import_module(name)
            except ModuleNotFoundError as exc:  # the hf extra may be absent
                if exc.name != "transformers":
                    raise
        assert "moe_protocols.integrations.vllm" in sys.modules
        assert not [m for m in sys.modules if m == "vllm" or m.startswith("vllm.")]
        print(len(names))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert int(done.stdout) > 10
