"""Process-wide TensorFlow settings that must be chosen before TensorFlow is imported."""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"


def use_onednn(enabled: bool | None) -> None:
    """trainer.onednn: turn TensorFlow's oneDNN CPU kernels on or off (null: leave
    TensorFlow's own choice, or the environment's TF_ENABLE_ONEDNN_OPTS).

    TensorFlow reads the variable once, when it loads, and by itself enables oneDNN only on
    CPUs with AVX-512 VNNI or AMX; on an AVX2-only CPU the convnets' training steps ran ~1.6x
    faster with it. A later job of an in-process sweep keeps the first job's kernels.
    """
    if enabled is None:
        return
    wanted = "1" if enabled else "0"
    if "tensorflow" in sys.modules:
        if os.environ.get(ONEDNN_VAR) != wanted:
            log.warning("trainer.onednn=%s ignored: TensorFlow is already loaded in this "
                        "process with %s=%s", enabled, ONEDNN_VAR, os.environ.get(ONEDNN_VAR))
        return
    os.environ[ONEDNN_VAR] = wanted


def onednn_state() -> str:
    """What TensorFlow was loaded with: "1", "0", or "default" (TensorFlow's own choice)."""
    return os.environ.get(ONEDNN_VAR, "default")
