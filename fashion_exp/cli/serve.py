"""fashion-exp-serve: serve a logged model over HTTP, with a web page to try your own photo.

    fashion-exp-serve                                  the experiment's best run (test accuracy)
    fashion-exp-serve model_uri=runs:/<run_id>/model port=8080
    fashion-exp-serve model_uri=models:/<name>@<alias> tracking.uri=sqlite:////path/mlflow.db

Options are the keys of conf/serve.yaml, given as key=value. Open http://127.0.0.1:8000/ for
the page, /docs for the API; /ping, /version and /invocations speak MLflow's scoring protocol,
/metrics Prometheus'. Served by alias, the model follows the alias when it moves
(follow_seconds). The model is loaded and checked before the port is opened: a URI that names
nothing fails here, in one line, with exit status 2. SIGTERM finishes the requests in flight
(drain_seconds) and exits 0.
"""

from __future__ import annotations

import gc
import logging
import os
import signal
import socket
import sys
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig

from fashion_exp.config import CONF_DIR, ConfigError, compose_checked
from fashion_exp.schemas import ServiceSettings as Settings
from fashion_exp.tracking.store_checks import StoreError, check_store

if TYPE_CHECKING:
    from fashion_exp.serving.loading import StoreModels
    from fashion_exp.serving.models import ServedModel

log = logging.getLogger("fashion_exp")


def check_host(host: str) -> None:
    """ConfigError unless `host` is an address (or a name of one) to listen on."""
    try:
        socket.getaddrinfo(host, None)
    except (socket.gaierror, UnicodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise ConfigError("host", host, f"not an address of this machine ({reason}); use "
                                        "127.0.0.1 or 0.0.0.0") from None


def check_port_free(host: str, port: int) -> None:
    """ConfigError now, rather than a server that dies after loading the model."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError("port", port, f"cannot listen on {host}:{port} ({err.strerror}); "
                                            "choose another port=") from None


def build(cfg: DictConfig) -> tuple[Any, str]:
    """The app for this config and the URI of its default model; ConfigError if none loads."""
    # The store is checked before MLflow and TensorFlow are imported (StoreError); this
    # command only reads it, so a read-only store is fine and nothing is written to it.
    uri = check_store(cfg.tracking.uri, write=False, connect_timeout=cfg.tracking.connect_timeout)
    import mlflow
    import tensorflow as tf

    from fashion_exp.serving import loading, service
    from fashion_exp.tracking import logged_models

    if cfg.threads:
        tf.config.threading.set_intra_op_parallelism_threads(cfg.threads)
    client = mlflow.MlflowClient(uri)
    models = loading.StoreModels(client, cfg.tracking.experiment_name)
    default_uri, default = default_model(cfg, models, uri)
    settings = Settings(**{k: cfg[k] for k in Settings.__dataclass_fields__})
    follow = default_uri if logged_models.is_alias(default_uri) else None
    if follow and settings.follow_seconds:
        log.info("Following %s: checked every %g s <follow_seconds>", follow,
                 settings.follow_seconds)
    samples = (loading.sample_images(cfg.data.dir, cfg.data.verify_checksums) if cfg.samples
               else None)
    app = service.create_app(default, models.resolve, models.load, settings,
                             choices=models.choices, samples=samples, follow=follow)
    return app, default_uri


def default_model(cfg: DictConfig, models: StoreModels, uri: str) -> tuple[str, ServedModel]:
    """The URI and the loaded model of `model_uri`, else of the experiment's best run;
    ConfigError when there is none or it cannot be served (`uri`: the store's)."""
    from fashion_exp.serving.models import ModelUnusable
    from fashion_exp.tracking import logged_models, store

    default_uri = cfg.model_uri or store.best_model_uri(models.client,
                                                        cfg.tracking.experiment_name)
    if default_uri is None:
        raise ConfigError("model_uri", None, "no finished run with a logged model in experiment "
                          f"{cfg.tracking.experiment_name!r} of {uri}: train one first or pass "
                          "model_uri=runs:/<run_id>/model")
    try:
        default = models.load(logged_models.resolve(models.client, default_uri))
    except logged_models.UnknownModel as err:
        raise ConfigError("model_uri", default_uri, f"{err.reason} ({uri})") from None
    except ModelUnusable as err:
        raise ConfigError("model_uri", default_uri, err.reason) from None
    return default_uri, default


def main() -> None:
    """Console-script entry point."""
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(f"{__doc__}\nConfig: {CONF_DIR / 'serve.yaml'}")
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    exit_on_stop_signals()
    try:
        cfg = compose_checked("serve", args, hydra_settings=False)  # no Hydra app here
        check_host(cfg.host)
        if not is_loopback(cfg.host):
            print(f"fashion-exp-serve: warning: host={cfg.host} accepts connections from other "
                  "machines and the service has no authentication: anyone who reaches this "
                  "port can use it", file=sys.stderr, flush=True)
        check_port_free(cfg.host, cfg.port)
        logging.basicConfig(level=cfg.log_level.upper(), format="%(levelname)s %(message)s")
        app, default_uri = build(cfg)
    except ConfigError as err:
        print(f"fashion-exp-serve: {err}", file=sys.stderr)
        sys.exit(2)
    except StoreError as err:
        print(f"fashion-exp-serve: error: {err}", file=sys.stderr)
        sys.exit(2)
    from fashion_exp.serving.connections import limited_protocol

    base = f"http://{f'[{cfg.host}]' if ':' in cfg.host else cfg.host}:{cfg.port}"
    print(f"Serving {default_uri} on {base}/ (page), {base}/docs (API), {base}/invocations "
          "(MLflow scoring protocol)", flush=True)
    protocol = limited_protocol(cfg.max_header_bytes, cfg.header_timeout, cfg.body_timeout)
    # TensorFlow and the model leave millions of long-lived Python objects; a full garbage
    # collection walking them all holds the event loop for ~0.4 s. Frozen, they are skipped.
    gc.collect()
    gc.freeze()
    serve_until_stopped(app, cfg, protocol)


def serve_until_stopped(app: Any, cfg: DictConfig, protocol: type) -> None:
    """Run uvicorn until SIGTERM or Ctrl-C, then drain: the port closes at once, the requests
    in flight get up to drain_seconds to be answered. Exit status 3 if it never started (as
    `uvicorn.run`)."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(
        app, host=cfg.host, port=cfg.port, log_level=cfg.log_level, access_log=False,
        http=protocol, timeout_graceful_shutdown=cfg.drain_seconds))
    server.run()
    if not server.started:
        sys.exit(3)


def exit_on_stop_signals() -> None:
    """SIGTERM exits 0 (a stop that was asked for), Ctrl-C 130, both without a traceback.

    Installed before the model loads. While uvicorn serves, its own handlers take over; once
    it has drained it raises the signal again into these (left at Python's defaults, SIGTERM
    would end the process with status 143 and SIGINT print a KeyboardInterrupt traceback)."""
    def stop(signum: int, _frame: Any) -> None:
        sys.exit(0 if signum == signal.SIGTERM else 130)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it may resolve to any interface
        return False


if __name__ == "__main__":
    main()
