"""No module under cluster/ or benchmarks/ imports another module's private (underscore) names.

A helper two modules need is public in a module named after what it holds
(cluster/bench/steps.py, for instance); importing `_name` from elsewhere ties a
module to another's internals, and the import tends to hide inside a function
to break an import circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CHECKED = ("cluster", "benchmarks")


def private_imports(source: str) -> list[tuple[int, str, str]]:
    """(line, module, name) of every `from module import _name` in `source`, at any depth."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ImportFrom) and node.module != "__future__":
            module = "." * node.level + (node.module or "")
            found += [(node.lineno, module, a.name) for a in node.names if a.name.startswith("_")]
    return found


def test_the_check_finds_private_names_in_and_out_of_functions():
    source = ("from __future__ import annotations\nfrom a import b, _c\n"
              "def f():\n    from .d import _e as e\n    import _f\n")
    assert private_imports(source) == [(2, "a", "_c"), (4, ".d", "_e")]


def test_no_module_imports_a_private_name_from_another():
    files = sorted(p for folder in CHECKED for p in (ROOT / folder).rglob("*.py"))
    assert any(p.name == "steps.py" for p in files)     # the folders were walked
    offenders = [f"{p.relative_to(ROOT)}:{line}: from {module} import {name}"
                 for p in files for line, module, name in private_imports(p.read_text())]
    assert not offenders, "\n".join(offenders)
