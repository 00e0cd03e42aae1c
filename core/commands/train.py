"""``ctlab train CONFIG [KEY=VALUE ...]``: train one configuration and log it to MLflow."""

from __future__ import annotations

import argparse

from core.commands._common import add_config_arguments, config_from_args
from core.stores import resolve_uri


def run(args: argparse.Namespace) -> int:
    """Train, print where the run is, and exit 1 when the run failed (the reason is in MLflow too)."""
    from core.train import NonFiniteLossError, train

    cfg = config_from_args(args)
    try:
        result = train(cfg, resume=args.resume)
    except NonFiniteLossError as err:
        print(f"ctlab train: run FAILED: {err}")
        return 1
    if result.run_id is not None:  # rank 0
        shown = {k: round(v, 4) for k, v in result.metrics.items() if k.startswith("zeroshot_") and "_ci_" not in k}
        print(f"run {result.run_id} FINISHED after {result.step} steps; final loss {result.final_loss:.4f}")
        print(f"zero-shot: {shown}")
        print(f"checkpoints: {result.run_dir}/checkpoints")
        print(f"browse: ctlab ui --tracking-uri {resolve_uri(cfg.tracking.uri)}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``train`` subcommand."""
    parser = subparsers.add_parser(
        "train", help="train one configuration (torchrun --nproc_per_node N -m core.cli train ... for DDP)",
        description="Train one configuration and log params, metrics and artifacts to MLflow.",
    )
    add_config_arguments(parser)
    parser.add_argument("--resume", action="store_true",
                        help="continue from the config's last checkpoint (train.output_dir/<config id>/checkpoints)")
    parser.set_defaults(func=run)
