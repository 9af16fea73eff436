"""trainer.onednn: TensorFlow's oneDNN kernels are chosen before TensorFlow loads."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest

from fashion_exp.core import runtime

# Prints what TensorFlow reports after use_onednn(<arg>) ran before its import.
PROBE = """
import os, sys
from fashion_exp.core import runtime
runtime.use_onednn({arg})
import tensorflow as tf
from tensorflow.python.util import _pywrap_util_port
print(os.environ.get("TF_ENABLE_ONEDNN_OPTS", "unset"), _pywrap_util_port.IsMklEnabled())
"""


def probe(arg: str, env_value: str | None) -> list[str]:
    """Run PROBE in a fresh interpreter with TF_ENABLE_ONEDNN_OPTS set to env_value."""
    env = {k: v for k, v in os.environ.items() if k != runtime.ONEDNN_VAR}
    if env_value is not None:
        env[runtime.ONEDNN_VAR] = env_value
    out = subprocess.run([sys.executable, "-c", PROBE.format(arg=arg)], env=env, check=True,
                         capture_output=True, text=True).stdout
    return out.split()


@pytest.mark.slow  # a fresh interpreter per case
@pytest.mark.parametrize(("arg", "env_value", "expected"), [
    ("True", None, ["1", "True"]),
    ("True", "0", ["1", "True"]),  # the config wins over the environment
    ("False", "1", ["0", "False"]),
    ("None", "1", ["1", "True"]),  # null leaves the environment's choice
])
def test_onednn_setting_reaches_tensorflow(arg, env_value, expected) -> None:
    assert probe(arg, env_value) == expected


def test_setting_after_tensorflow_loaded_warns_and_changes_nothing(monkeypatch, caplog) -> None:
    import tensorflow  # noqa: F401  (loaded, as in a later job of an in-process sweep)

    monkeypatch.setenv(runtime.ONEDNN_VAR, "1")
    with caplog.at_level(logging.WARNING, logger="fashion_exp.core.runtime"):
        runtime.use_onednn(True)  # the same as loaded: silent
        assert not caplog.records
        runtime.use_onednn(False)
    assert os.environ[runtime.ONEDNN_VAR] == "1"
    assert "trainer.onednn=False ignored" in caplog.text
    assert runtime.onednn_state() == "1"
