"""The import graph points one way: the experiment core knows nothing of MLflow, and no module
imports itself through others."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import fashion_exp

PACKAGE = Path(fashion_exp.__file__).parent
# Modules every layer may use: the config (its schemas, its composition) and process plumbing.
SHARED = {"fashion_exp.config", "fashion_exp.schemas", "fashion_exp.paths",
          "fashion_exp.interrupts", "fashion_exp.procs", "fashion_exp.files"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(p): p for p in PACKAGE.rglob("*.py")}
CORE = sorted(m for m in MODULES if m.startswith("fashion_exp.core."))


def imports_of(path: Path) -> set[str]:
    """fashion_exp modules a file imports, anywhere in it (deferred imports count too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("fashion_exp"):
            for alias in node.names:  # `from pkg import module` or `from module import name`
                found.add(f"{node.module}.{alias.name}" if f"{node.module}.{alias.name}" in
                          MODULES else node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("fashion_exp")}
    return found & set(MODULES)


GRAPH = {name: imports_of(path) - {name} for name, path in MODULES.items()}


def test_the_experiment_core_imports_neither_mlflow_nor_the_tracking_code() -> None:
    assert "fashion_exp.core.training" in CORE and "fashion_exp.core.data" in CORE
    code = (f"import sys\nfor m in {CORE!r}: __import__(m)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'mlflow'"
            " or n.startswith('fashion_exp.tracking')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def test_the_core_imports_only_the_core_and_shared_plumbing() -> None:
    outside = {m: sorted(i for i in GRAPH[m] if not i.startswith("fashion_exp.core")
                         and i not in SHARED | {"fashion_exp", "fashion_exp.core"})
               for m in CORE}
    assert {m: found for m, found in outside.items() if found} == {}


def test_nothing_below_the_command_line_imports_an_entry_point() -> None:
    below = [m for m in MODULES if not m.startswith("fashion_exp.cli")]
    assert {m: sorted(i for i in GRAPH[m] if i.startswith("fashion_exp.cli.")) for m in below
            if any(i.startswith("fashion_exp.cli.") for i in GRAPH[m])} == {}


def test_no_module_imports_itself_through_others() -> None:
    assert GRAPH["fashion_exp.tracking.recorder"] and GRAPH["fashion_exp.tracking.store"]

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in GRAPH.get(node, ()):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    cycles = [c for m in GRAPH if (c := cycle_from(m, m, (m,)))]
    assert cycles == []
