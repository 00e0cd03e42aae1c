"""``ctlab tune FILE``: TPE search with pruning over declared hyper-parameter spaces."""

from __future__ import annotations

import argparse
from pathlib import Path


def run(args: argparse.Namespace) -> int:
    """Run or join the tuning study and print the best trial."""
    from experiments.launcher import LaunchOptions
    from experiments.tune import load_tune, tune

    spec = load_tune(args.file)
    opts = LaunchOptions(storage=args.storage, tracking_uri=args.tracking_uri, progress=not args.no_progress)
    out = Path(args.out or f"reports/tune/{spec.name}/best.yaml")
    best = tune(spec, opts, out)
    print(f"best trial {best['best_trial']}: {spec.metric}={best['best_value']:.4f} with {best['best_params']}")
    print(f"best config written to {best['config']}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tune`` subcommand."""
    parser = subparsers.add_parser("tune", help="tune hyper-parameters with Optuna TPE + pruning",
                                   description="TPE search over a tuning YAML's space; trials are MLflow child runs.")
    parser.add_argument("file", help="tuning YAML, e.g. experiments/tune-smoke.yaml")
    parser.add_argument("--storage", default="sqlite:///optuna.db", help="Optuna RDB storage (shared by workers)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: the config's)")
    parser.add_argument("--out", help="where to write the best config (default reports/tune/<name>/best.yaml)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
