"""``ctlab eval CONFIG [KEY=VALUE ...]``: zero-shot evaluation and the linear probe of a trained checkpoint."""

from __future__ import annotations

import argparse
from pathlib import Path

from core.commands._common import add_config_arguments, config_from_args


def run(args: argparse.Namespace) -> int:
    """Load the checkpoint, evaluate on the config's eval split, print macro metrics, write per-label files.

    With ``eval.probe.enabled`` (the default) the linear probe is fitted on the train split's embeddings and
    scored on the eval split's, as at the end of a training run (same seed, precision and settings).
    """
    import torch

    from core.checkpoint import load_checkpoint
    from core.data.cache import prepare
    from core.data.dataset import CachedCTDataset
    from core.distributed import resolve_device
    from core.evaluate import evaluate_zero_shot
    from core.lora import apply_adaptation
    from core.model import build_model
    from core.train import TokenizingCollate, autocast_for, make_loader, probe_readout_final, run_dir_for

    cfg = config_from_args(args)
    checkpoint = Path(args.checkpoint) if args.checkpoint else run_dir_for(cfg) / "checkpoints" / "last.pt"
    device = resolve_device(cfg.train.device)
    model = build_model(cfg)
    apply_adaptation(model, cfg.model)
    model.load_state_dict(load_checkpoint(checkpoint)["model"])
    model.to(device)
    probe = cfg.eval.probe.enabled
    prepare(cfg.data, splits=("train", cfg.eval.split) if probe else (cfg.eval.split,), progress=not args.no_progress)
    dataset = CachedCTDataset(cfg.data, cfg.eval.split)
    loader = make_loader(dataset, cfg.data, cfg.eval.batch_size,
                         TokenizingCollate(model.text_encoder.report_tokenizer), None, device)
    with torch.no_grad(), autocast_for(cfg.train.precision, device):
        result = evaluate_zero_shot(model, loader, cfg.eval, device, progress=not args.no_progress)
    print(f"zero-shot on {cfg.eval.split} ({len(dataset)} volumes, checkpoint {checkpoint}):")
    for name, value in result.metrics.items():
        print(f"  {name:<32} {value:.4f}")
    out = Path(args.out or run_dir_for(cfg) / "eval")
    files = result.write_artifacts(out)
    if probe:
        train_set = CachedCTDataset(cfg.data, "train")
        readout = probe_readout_final(model, train_set, result, cfg, device, progress=not args.no_progress)
        print(f"linear probe, fitted on train ({len(train_set)} volumes), scored on {cfg.eval.split}:")
        for name, value in readout.metrics.items():
            print(f"  {name:<32} {value:.4f}")
        files += readout.write_artifacts(out)
    print("wrote " + ", ".join(str(f) for f in files))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    parser = subparsers.add_parser("eval", help="zero-shot evaluation and linear probe of a config's last checkpoint",
                                   description="Zero-shot classification (CT-CLIP prompts) and retrieval on the "
                                               "eval split, with bootstrap CIs, for a trained configuration; then "
                                               "the linear probe (eval.probe.enabled=false skips it).")
    add_config_arguments(parser)
    parser.add_argument("--checkpoint", help="checkpoint file (default: train.output_dir/<config id>/checkpoints/"
                                             "last.pt)")
    parser.add_argument("--out", help="folder for zeroshot_per_label.csv, zeroshot_predictions.csv, roc.png and "
                                      "probe_per_label.csv, probe_predictions.csv")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=run)
