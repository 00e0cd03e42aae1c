"""Arguments shared by several subcommands: a config file with dotted overrides, and the tracking URI."""

from __future__ import annotations

import argparse

from core.config import Config, load_config


def add_config_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """CONFIG [KEY=VALUE ...] and --tracking-uri."""
    parser.add_argument("config", nargs=None if required else "?",
                        help="run config YAML (e.g. experiments/configs/synthetic-tiny.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. model.attention=sdpa train.lr=1e-4")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's, sqlite:///mlflow.db)")


def config_from_args(args: argparse.Namespace) -> Config:
    """The resolved config named by CONFIG + overrides + --tracking-uri."""
    overrides = list(args.overrides)
    if getattr(args, "tracking_uri", None):
        overrides.append(f"tracking.uri={args.tracking_uri}")
    return load_config(args.config, overrides)
