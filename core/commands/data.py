"""``ctlab data synth | prepare | info``: write a synthetic CT-RATE, fill the preprocessing cache, inspect it."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from core.config import DataConfig, load_config


def _data_config(args: argparse.Namespace) -> DataConfig:
    """The data section of --config + KEY=VALUE overrides, with --root / --cache applied last."""
    overrides = list(args.overrides)
    if args.root:
        overrides.append(f"data.root={args.root}")
    if args.cache:
        overrides.append(f"data.cache_dir={args.cache}")
    return load_config(args.config, overrides).data


def run_synth(args: argparse.Namespace) -> int:
    """Write the synthetic dataset and print what it holds."""
    from core.data.synthetic import synthesize

    summary = synthesize(args.out, train=args.train, valid=args.valid, seed=args.seed, shape=tuple(args.shape),
                         workers=args.workers, progress=not args.no_progress, force=args.force)
    print(f"wrote synthetic CT-RATE to {summary.root} in {summary.seconds:.1f} s: "
          + ", ".join(f"{split} {n} volumes" for split, n in summary.volumes.items()))
    for split, counts in summary.positives.items():
        print(f"{split} positives: " + ", ".join(f"{name} {n}" for name, n in counts.items()))
    return 0


def run_prepare(args: argparse.Namespace) -> int:
    """Preprocess every volume into the cache (resuming, never redoing finished ones) and print the summary."""
    from core.data.cache import prepare

    cfg = _data_config(args)
    summary = prepare(cfg, splits=tuple(args.splits), workers=args.workers, progress=not args.no_progress)
    print(summary.format())
    print(f"done in {summary.seconds:.1f} s; summaries: "
          + ", ".join(str(Path(s.index).parent / Path(s.index).name.replace("index-", "summary-"))
                      for s in summary.splits.values()))
    return 0


def run_info(args: argparse.Namespace) -> int:
    """Print where the cache for these settings is, what it holds and what was skipped."""
    from core.data.cache import cache_path, index_path, load_summary, missing_line

    cfg = _data_config(args)
    folder = cache_path(cfg)
    print(f"data root:  {cfg.root}")
    print(f"cache:      {folder}  (shape {cfg.target_shape}, spacing {cfg.target_spacing} mm, "
          f"HU window {cfg.hu_window}, {cfg.cache_dtype})")
    if folder.is_dir():
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        print(f"size:       {size / 2**20:.1f} MiB")
    for split in args.splits:
        summary = load_summary(cfg, split)
        if summary is None or not index_path(cfg, split).is_file():
            print(f"{split}: not prepared; run `ctlab data prepare --root {cfg.root} --cache {cfg.cache_dir}` "
                  "with the same settings")
            continue
        reasons = ", ".join(f"{r} {n}" for r, n in summary["skipped"].items()) or "none"
        print(f"{split}: {summary['volumes']} volumes; skipped {sum(summary['skipped'].values())}: {reasons}")
        missing = [Path(item["file"]).name for item in summary["skipped_files"] if item["reason"] == "missing_file"]
        if missing:  # a partial download lists thousands: one line, as prepare prints it
            print(f"  {missing_line(missing)}")
        named = [item for item in summary["skipped_files"] if item["reason"] != "missing_file"]
        for item in named[: args.max_files]:
            print(f"  skipped {item['file']}: {item['reason']} {item['detail']}".rstrip())
    others = sorted(p.name for p in Path(cfg.cache_dir).iterdir() if p.is_dir() and p != folder) \
        if Path(cfg.cache_dir).is_dir() else []
    if others:
        print("other prepared settings in this cache folder: " + ", ".join(others))
    return 0


def _add_data_config_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", "-c", help="run config YAML whose data: section to use "
                        "(e.g. experiments/configs/synthetic-tiny.yaml; default: CT-CLIP's preprocessing)")
    parser.add_argument("--root", help="CT-RATE's dataset folder: train_fixed/, valid_fixed/ (v2) or train/, valid/ "
                        "(v1), found by themselves, plus radiology_text_reports/, multi_abnormality_labels/, metadata/")
    parser.add_argument("--cache", help="cache folder (data.cache_dir)")
    parser.add_argument("--splits", type=lambda text: [s for s in text.split(",") if s], default=["train", "valid"],
                        help="comma-separated splits (default: train,valid)")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted config overrides, e.g. data.target_shape=[32,64,64] data.cache_dtype=int16")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``data`` with its ``synth``, ``prepare`` and ``info`` subcommands."""
    parser = subparsers.add_parser("data", help="synthetic CT-RATE, preprocessing cache, cache info",
                                   description="Write a synthetic CT-RATE, preprocess a dataset into the cache, "
                                               "or show what the cache holds.")
    commands = parser.add_subparsers(dest="data_command", metavar="SUBCOMMAND", required=True)

    synth = commands.add_parser("synth", help="write a synthetic CT-RATE (chest phantoms + reports) in its layout",
                                description="Write a seeded synthetic dataset in exactly CT-RATE's folder and CSV "
                                            "layout, with 18-label chest phantoms and matching reports.")
    synth.add_argument("--out", required=True, help="output folder (the dataset root)")
    synth.add_argument("--train", type=int, default=160, help="training volumes (default 160)")
    synth.add_argument("--valid", type=int, default=40, help="validation volumes (default 40)")
    synth.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    synth.add_argument("--shape", type=int, nargs=3, default=[48, 96, 96], metavar=("D", "H", "W"),
                       help="native volume size in voxels (default 48 96 96; the field of view is fixed)")
    synth.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="worker processes")
    synth.add_argument("--force", action="store_true", help="replace a non-empty output folder")
    synth.add_argument("--no-progress", action="store_true", help="no progress bar")
    synth.set_defaults(func=run_synth)

    prep = commands.add_parser("prepare", help="preprocess every volume once into the memory-mapped cache",
                               description="Decode, convert to HU, resample, window and crop/pad every volume "
                                           "into the cache keyed by the preprocessing settings. Resumes an "
                                           "interrupted run; a no-op when the cache is complete. Bad files are "
                                           "skipped with one warning each and listed in the summary.")
    _add_data_config_arguments(prep)
    prep.add_argument("--workers", type=int, default=None,
                      help="worker processes (default: one per CPU; small jobs run in-process)")
    prep.add_argument("--no-progress", action="store_true", help="no progress bar")
    prep.set_defaults(func=run_prepare)

    info = commands.add_parser("info", help="show the cache location, volume counts and skipped files",
                               description="Show where the cache for these settings is, how many volumes each "
                                           "split holds and which inputs were skipped and why.")
    _add_data_config_arguments(info)
    info.add_argument("--max-files", type=int, default=20, help="skipped files to list per split (default 20)")
    info.set_defaults(func=run_info)
