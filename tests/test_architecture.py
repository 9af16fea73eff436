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
