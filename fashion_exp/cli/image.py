"""fashion-exp-image: build a container image of the prediction service with podman.

    fashion-exp-image model_uri=models:/fashion@champion tag=fashion-serve:1
    fashion-exp-image tag=fashion-serve:generic        (serves whatever is in /opt/ml/model)
    podman run --rm -p 127.0.0.1:8080:8080 fashion-serve:1 serve

Options are the keys of conf/image.yaml, given as key=value. The image runs as SageMaker runs
serving images (`<image> serve`, port 8080 or $SAGEMAKER_BIND_TO_PORT, GET /ping, POST
/invocations) and serves fashion-exp-serve's page and /predict too; see docs/deploy.md.
A bad value or a failed build step is reported in one line, with exit status 2.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from fashion_exp.config import CONF_DIR, ConfigError, compose_checked
from fashion_exp.image import build
from fashion_exp.tracking.store_checks import StoreError, check_store

PROG = "fashion-exp-image"


@dataclass
class ImageConfig:
    """conf/image.yaml's schema (the tracking group has its own)."""

    model_uri: str | None = None
    tag: str = "fashion-serve:latest"
    model_tarball: str | None = None
    exclude: list[str] = field(default_factory=list)
    cache_dir: str | None = None
    base_image: str = "localhost/fashion-exp-base:bookworm"
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    podman: str = "podman"
    tracking: dict = field(default_factory=dict)  # checked by the tracking group's schema


def register() -> None:
    """Put ImageConfig in Hydra's ConfigStore as image_schema."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name="image_schema", node=ImageConfig)


def check(cfg) -> None:
    """ConfigError for values the build would trip on later."""
    import re

    if not re.fullmatch(r"[a-z0-9][a-z0-9._/:-]*(:[A-Za-z0-9_.-]{1,128})?", cfg.tag):
        raise ConfigError("tag", cfg.tag, "not an image name: use name:tag, lower-case "
                                          "letters, digits, '.', '_', '-', '/'")
    if cfg.model_tarball and not cfg.model_uri:
        raise ConfigError("model_tarball", cfg.model_tarball, "needs model_uri=: the model to "
                                                              "pack")


def main() -> None:
    """Console-script entry point."""
    args = sys.argv[1:]
    if {"-h", "--help"} & set(args):
        print(f"{__doc__}\nConfig: {CONF_DIR / 'image.yaml'}")
        return
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    register()
    try:
        cfg = compose_checked("image", args, hydra_settings=False)
        check(cfg)
        uri = None
        if cfg.model_uri:
            uri = check_store(cfg.tracking.uri, write=False,
                              connect_timeout=cfg.tracking.connect_timeout)
        cache = Path(cfg.cache_dir or Path.home() / ".cache" / "fashion-exp" / "image")
        built = build.build(cfg.tag, cfg.model_uri, uri, cache.expanduser(), cfg.base_image,
                            cfg.suite, cfg.mirror, list(cfg.exclude), cfg.podman,
                            Path(cfg.model_tarball) if cfg.model_tarball else None)
    except (ConfigError, StoreError, build.ImageError) as err:
        print(f"{PROG}: error: {err}", file=sys.stderr)
        sys.exit(2)
    steps = ", ".join(f"{step} {s:g} s" for step, s in built.seconds.items())
    print(f"Built {built.tag} (image {built.image_id}, {built.size / 1e6:.0f} MB): {steps}")
    print(f"Run it: podman run --rm -p 127.0.0.1:8080:8080 {built.tag} serve")


if __name__ == "__main__":
    main()
