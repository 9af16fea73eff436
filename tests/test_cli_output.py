"""What a person sees in the terminal during a sweep and a search: one line per step and per
job, the epochs and the result; no TensorFlow banners, Python warnings or launcher plumbing
(those are in the log file, or shown with hydra.verbose=true)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

TINY = ("debug=fast", "data.limit=600", "tracking.log_model=false", "tracking.figures=false")
NOISE = ["absl::InitializeLog", "oneDNN custom operations", "cpu_feature_guard",
         "rebuild TensorFlow", "XLA", "retracing", "env_set", "FASHION_EXP_OPTUNA_TRIAL",
         "Launching 1 jobs", "A new study created"]
WARNING = re.compile(r"\b\w*Warning: ")  # how Python prints a warning
NUMBER = re.compile(r"(?<![\w.])\d+\.\d+(?:e-?\d+)?")


def terminal(tmp_path: Path, *overrides: str) -> str:
    """stdout and stderr of fashion-exp-train -m, run as a person runs it (no log-level
    variables set)."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TF_CPP_MIN_LOG_LEVEL", "MLFLOW_TRACKING_URI")}
    result = subprocess.run(
        [sys.executable, "-m", "fashion_exp.cli.train", "-m", *TINY, *overrides,
         f"tracking.uri=sqlite:///{tmp_path / 'mlruns' / 'mlflow.db'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def significant_digits(number: str) -> int:
    return len(number.split("e")[0].replace(".", "").lstrip("0"))


def quiet(text: str) -> None:
    """No banner, warning or plumbing; TensorFlow's start announced once per process."""
    assert [n for n in NOISE if n in text] == []
    assert WARNING.findall(text) == []
    assert text.count("Starting TensorFlow") == 1  # one process: TensorFlow loads once


def test_a_sweep_prints_one_line_per_job_and_no_noise(tmp_path) -> None:
    text = terminal(tmp_path, "optimizer.lr=0.01,0.02")
    quiet(text)
    jobs = re.findall(r"#\d+ : (.*)", text)
    assert len(jobs) == 2 and all("optimizer.lr=0.0" in job for job in jobs)
    assert len(re.findall(r"^test_accuracy=", text, re.M)) == 2


def test_a_search_prints_one_short_line_per_trial_and_no_noise(tmp_path) -> None:
    text = terminal(tmp_path, "hparams_search=mlp_optuna", "hydra.sweeper.n_trials=2",
                    "hydra.sweeper.study_name=quiet", "trainer.epochs=2")
    quiet(text)
    trials = re.findall(r"Trial (\d+): (.*)", text)
    assert [n for n, _ in trials] == ["0", "1"]  # counted from 0, as "trial 1" is named
    for _, values in trials:
        assert "optimizer=" in values and "lr=" in values
        assert all(significant_digits(n) <= 4 for n in NUMBER.findall(values)), values
    best = re.search(r"Best value (.*)", text).group(1)
    assert all(significant_digits(n) <= 4 for n in NUMBER.findall(best)), best
    assert "nothing left to run" not in text and "study quiet ends" in text
