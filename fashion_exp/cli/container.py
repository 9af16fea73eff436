"""The image's entry point: `<image> serve` serves the MLflow model folder in /opt/ml/model.

SageMaker's serving contract (and what other container platforms expect of such an image):
the platform runs `<image> serve`, extracts the model's `model.tar.gz` into /opt/ml/model,
sends traffic to port 8080 (or to SAGEMAKER_BIND_TO_PORT), probes GET /ping and posts to
/invocations; on SIGTERM the server drains and exits 0 well within SageMaker's 30 s. The
service is fashion-exp-serve's (the same /invocations, /predict, web page), with one model:
the folder's. A folder that holds no usable Keras model stops the container at once with one
line on stderr and exit status 2, rather than a server that answers 500s.

    python -m fashion_exp.cli.container serve    (what the image's ENTRYPOINT runs)
"""

from __future__ import annotations

import gc
import logging
import os
import sys
from types import SimpleNamespace
from typing import Any

from fashion_exp.image.model_folder import MODEL_DIR, MODEL_DIR_ENV, BadModel, load, model_dir

PORT_ENV = "SAGEMAKER_BIND_TO_PORT"  # SageMaker's port for multi-container endpoints
PORT = 8080  # SageMaker's serving port
HOST = "0.0.0.0"  # a container's traffic arrives on its own interface
DRAIN_SECONDS = 20.0  # in-flight requests get this long after SIGTERM (SageMaker allows 30 s)
PROG = "fashion-exp-image"
USAGE = f"usage: <image> serve  (the model is read from {MODEL_DIR} or ${MODEL_DIR_ENV})"

log = logging.getLogger("fashion_exp")


def port() -> int:
    """$SAGEMAKER_BIND_TO_PORT, else 8080; ValueError for a value that is no port."""
    value = os.environ.get(PORT_ENV, "").strip() or str(PORT)
    if not value.isdigit() or not 1 <= int(value) <= 65535:
        raise ValueError(f"{PORT_ENV}={value!r} is not a TCP port: use an integer 1-65535")
    return int(value)


def build_app(default: Any, settings: Any) -> Any:
    """fashion-exp-serve's app for one model: requests may name only that one."""
    from fashion_exp.serving import service
    from fashion_exp.serving.loading import OneModel

    one = OneModel(default)
    return service.create_app(default, one.resolve, one.load, settings, choices=one.choices)


def main(argv: list[str] | None = None) -> None:
    """`serve`: load the model folder, then serve it until SIGTERM (exit 0)."""
    from fashion_exp.cli.serve import exit_on_stop_signals, serve_until_stopped

    args = sys.argv[1:] if argv is None else argv
    if args != ["serve"]:
        print(f"{PROG}: error: unknown command {' '.join(args)!r}: this image only serves. "
              f"{USAGE}", file=sys.stderr)
        sys.exit(2)
    exit_on_stop_signals()
    logging.basicConfig(level="INFO", format="%(levelname)s %(message)s")
    folder = model_dir()
    try:
        listen = port()
        default = load(folder)
    except (BadModel, ValueError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        sys.exit(2)
    from fashion_exp.schemas import ServiceSettings
    from fashion_exp.serving.connections import limited_protocol

    settings = ServiceSettings(follow_seconds=0.0)  # fashion-exp-serve's defaults
    app = build_app(default, settings)
    print(f"Serving {default.ref.uri} from {folder} on {HOST}:{listen} (/ping, /invocations, "
          "/predict, the page at /)", flush=True)
    gc.collect()
    gc.freeze()  # TensorFlow's millions of objects: kept out of full collections
    cfg = SimpleNamespace(host=HOST, port=listen, log_level="info", drain_seconds=DRAIN_SECONDS)
    serve_until_stopped(app, cfg, limited_protocol(
        settings.max_header_bytes, settings.header_timeout, settings.body_timeout))


if __name__ == "__main__":
    main()
