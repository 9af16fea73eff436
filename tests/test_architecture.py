"""The import graph points one way: the experiment core knows nothing of MLflow."""

from __future__ import annotations

import subprocess
import sys

CORE = ["data", "models", "optim", "training", "metrics", "plots", "runtime", "preprocess",
        "checkpoints"]


def test_the_experiment_core_imports_neither_mlflow_nor_the_tracking_code() -> None:
    code = (f"import sys\nfor m in {CORE!r}: __import__('fashion_exp.' + m)\n"
            "print(sorted(n for n in sys.modules if n.split('.')[0] == 'mlflow'"
            " or n in ('fashion_exp.tracking', 'fashion_exp.offline')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, env={"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": ""})
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == "[]"


def module_imports() -> dict[str, set[str]]:
    """fashion_exp's modules and the fashion_exp modules each imports, anywhere in it."""
    import ast
    from pathlib import Path

    import fashion_exp

    package = Path(fashion_exp.__file__).parent
    graph: dict[str, set[str]] = {}
    for path in package.glob("*.py"):
        imported: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):  # deferred imports count too
            if isinstance(node, ast.ImportFrom) and node.module == "fashion_exp":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                    "fashion_exp."):
                imported.add(node.module.split(".")[1])
        graph[path.stem] = imported & {p.stem for p in package.glob("*.py")}
    return graph


def test_no_module_imports_itself_through_others() -> None:
    graph = module_imports()
    assert graph["recorder"] and graph["tracking"]  # the parse found imports

    def cycle_from(start: str, node: str, seen: tuple[str, ...]) -> tuple[str, ...] | None:
        for nxt in graph.get(node, ()):
            if nxt == start:
                return (*seen, nxt)
            if nxt not in seen:
                found = cycle_from(start, nxt, (*seen, nxt))
                if found:
                    return found
        return None

    cycles = [c for m in graph if (c := cycle_from(m, m, (m,)))]
    assert cycles == []
