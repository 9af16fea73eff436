"""Command-line flags shared by the tools that read a tracking store (compare, runs)."""

from __future__ import annotations

import argparse

from fashion_exp.schemas import TrackingConfig
from fashion_exp.tracking.store_checks import connect_seconds


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """--experiment, --tracking-uri and --connect-timeout, as the tracking config names them."""
    parser.add_argument("--experiment", default="fashion_exp", help="MLflow experiment name")
    parser.add_argument("--tracking-uri", default=None,
                        help="tracking URI (default: $MLFLOW_TRACKING_URI or the repo's store)")
    parser.add_argument("--connect-timeout", type=connect_seconds,
                        default=TrackingConfig.connect_timeout,
                        help="seconds to wait for the tracking database or server (default: "
                             "%(default)g, as tracking.connect_timeout)")
