"""Process-wide TensorFlow settings that must be chosen before TensorFlow is imported."""

from __future__ import annotations

import logging
import os
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager

log = logging.getLogger(__name__)

ONEDNN_VAR = "TF_ENABLE_ONEDNN_OPTS"
TF_LOG_VAR = "TF_CPP_MIN_LOG_LEVEL"  # TensorFlow's C++ log level: 1 hides INFO (XLA) lines


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


def verbose() -> bool:
    """Whether the terminal shows everything: hydra.verbose=true (the root logger at DEBUG)."""
    return logging.getLogger().isEnabledFor(logging.DEBUG)


def load_tensorflow() -> None:
    """Import TensorFlow once per process, quietly unless hydra.verbose=true: its C++
    start-up lines (absl, oneDNN, CPU features; printed twice by TF 2.21, before its log
    level applies) are logged at DEBUG instead of written to the terminal, its C++ INFO
    lines (XLA) are off (TF_CPP_MIN_LOG_LEVEL=1 unless set), and its Python warnings (e.g.
    tf.function retracing, harmless when a sweep builds a model per job) are hidden."""
    if "tensorflow" in sys.modules:
        return
    if verbose():
        import tensorflow  # noqa: F401 - everything TensorFlow prints, as it prints it
        return
    os.environ.setdefault(TF_LOG_VAR, "1")
    log.info("Starting TensorFlow (takes a few seconds)")
    with stderr_logged("tensorflow.startup"):
        import tensorflow  # noqa: F401 - loaded here, used by the modules that need it
    logging.getLogger("tensorflow").setLevel(logging.ERROR)


@contextmanager
def stderr_logged(name: str) -> Iterator[None]:
    """What C/C++ code writes to file descriptor 2 meanwhile, logged at DEBUG under `name`."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            text = captured.read().decode(errors="replace")
    for line in text.splitlines():
        logging.getLogger(name).debug("%s", line)
