"""``ctlab bench``: the command line of the efficiency bench; what each table measures is in
``core.bench.reports``."""

from __future__ import annotations

import argparse

from core.bench.options import OPTIONS
from core.bench.reports import (
    run_data,
    run_encoders,
    run_model,
    run_options,
    run_patch_embed,
    run_train,
    run_zoo,
)


def _timing_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch", type=int, default=2, help="volumes per batch (default: 2)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="timed repeats per config; the median is kept (default: 5)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed repeats first (default: 2)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N (default: auto)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="torch CPU threads (default: torch's); 1 keeps timings steady on a shared machine")
    parser.add_argument("--out", default="reports/bench", help="folder for the .md and .csv (default: reports/bench)")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide progress bars")


def _shape_options(parser: argparse.ArgumentParser, preset: str) -> None:
    parser.add_argument("--preset", default=preset, help=f"encoder preset (default: {preset})")
    parser.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=[32, 64, 64],
                        help="input volume (slices, rows, columns) (default: 32 64 64)")
    parser.add_argument("--text-encoder", default="tiny-random",
                        help="text encoder of the CLIP model (default: tiny-random, for speed)")
    parser.add_argument("--override", action="append", default=[], metavar="KEY=VALUE",
                        help="extra config override, e.g. train.precision=bf16 (repeatable)")


def _zoo_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--encoder", default="ctvit", help="image encoder whose axes are combined (default: ctvit)")
    _shape_options(parser, "tiny")
    _timing_options(parser)


def _items_options(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE", help=config_help)
    _timing_options(parser)


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``ctlab bench`` and its tables: zoo (the default), model, train, data, encoders."""
    parser = subparsers.add_parser(
        "bench", help="efficiency bench: params, GFLOPs, peak memory, forward/backward/step time",
        description="Efficiency bench. With no table named, runs `zoo`: every attention × norm × mlp combination "
                    "of one encoder. Times are medians of repeats after a warm-up, alternating across configs.")
    _zoo_options(parser)
    parser.set_defaults(func=run_zoo)
    tables = parser.add_subparsers(dest="table", metavar="TABLE")

    zoo = tables.add_parser("zoo", help="every attention × norm × mlp combination of one encoder (the default)",
                            description="Params, GFLOPs, forward/backward/step ms and peak memory of every "
                                        "attention × norm × mlp combination; writes OUT/zoo.md and .csv.")
    _zoo_options(zoo)
    zoo.set_defaults(func=run_zoo)

    model = tables.add_parser("model", help="one config (or every cell of a matrix)",
                              description="Bench one config file with overrides, or every cell of a matrix YAML "
                                          "(--matrix; the overrides apply to every cell).")
    _items_options(model, "a config YAML, then dotted overrides (model.attention=sdpa ...)")
    model.add_argument("--matrix", metavar="FILE", help="a matrix YAML: bench all its cells side by side")
    model.add_argument("--track", action="store_true",
                       help="also log one run per config to the MLflow experiment 'efficiency' (read by ctlab report)")
    model.add_argument("--tracking-uri", help="MLflow tracking URI for --track (default: sqlite:///mlflow.db)")
    model.set_defaults(func=run_model)

    train = tables.add_parser("train", help="two configs side by side: memory ratio, step speed-up, samples/s",
                              description="Bench CONFIG against --vs BASELINE in one process, repeats alternating; "
                                          "writes OUT/train-<config>-vs-<baseline>.md and .csv.")
    _items_options(train, "a config YAML, then dotted overrides applied to both configs")
    train.add_argument("--vs", required=True, metavar="BASELINE", help="the baseline config YAML")
    train.add_argument("--candidate", action="append", default=[], metavar="KEY=VALUE",
                       help="override applied to CONFIG only, e.g. model.encoder_args.patch_embed=conv (repeatable)")
    train.add_argument("--precision", choices=["fp32", "bf16", "fp16"], help="train CONFIG in this precision")
    train.add_argument("--compile", action="store_true", help="torch.compile CONFIG's image encoder")
    train.add_argument("--grad-checkpointing", action="store_true", help="recompute CONFIG's activations in backward")
    train.add_argument("--data", action="store_true",
                       help="also train both from the real cached DataLoader and report the fraction of step time "
                            "spent waiting on data, per --workers setting (OUT/train-...-data.md)")
    train.add_argument("--workers", type=int, nargs="+", default=[0, 2],
                       help="data.num_workers settings for --data (default: 0 2)")
    train.add_argument("--data-steps", type=int, default=12,
                       help="timed training steps per setting for --data, after 2 untimed ones (default: 12)")
    train.add_argument("--track", action="store_true",
                       help="also log one run per config to the MLflow experiment 'efficiency'")
    train.add_argument("--tracking-uri", help="MLflow tracking URI for --track (default: sqlite:///mlflow.db)")
    train.set_defaults(func=run_train)

    options = tables.add_parser(
        "options", help="baseline vs modern vs each performance option on top (bf16, grad-ckpt, conv-patch, ...)",
        description="SA+GELU+LN, SDPA+SwiGLU+RMS, then SDPA+SwiGLU+RMS with each --options entry and with all of "
                    "them, side by side; says which option pays (memory or speed, read against the modern row). "
                    "With --max-batch (CUDA), also each config alone at the largest batch that fits.")
    options.add_argument("--encoder", default="ctvit", help="image encoder (default: ctvit)")
    _shape_options(options, "tiny")
    _timing_options(options)
    options.add_argument("--options", nargs="+", default=["bf16", "grad-ckpt", "conv-patch"], metavar="OPTION",
                         help=f"options to measure, from: {', '.join(OPTIONS)} (default: bf16 grad-ckpt conv-patch)")
    options.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                         help="precision of the baseline and modern rows (default: fp32; the seed trained fp16)")
    options.add_argument("--extra-baseline", nargs="*", default=[], choices=["fp32", "bf16", "fp16"],
                         metavar="PRECISION", help="also the baseline at these precisions (e.g. fp32)")
    options.add_argument("--max-batch", type=int, default=0, metavar="LIMIT",
                         help="CUDA: also find each config's largest batch up to LIMIT and measure it there")
    options.add_argument("--max-batch-rows", nargs="*", metavar="LABEL",
                         help="rows for --max-batch (default: all rows); e.g. 'SA+GELU+LN' 'SDPA+SwiGLU+RMS +all'")
    options.add_argument("--max-batch-only", action="store_true",
                         help="with --max-batch: skip the side-by-side table, measure only each row's largest batch")
    options.add_argument("--name", help="report file name without extension (default: derived from the settings)")
    options.set_defaults(func=run_options)

    patch = tables.add_parser(
        "patch-embed", help="CT-ViT's patch embedding alone: linear vs conv, time and memory, per precision",
        description="Forward/backward ms, peak memory and bytes kept for backward of CT-ViT's patch embedding, "
                    "patch_embed linear vs conv; cheap enough for CT-CLIP's full 240 x 480 x 480 on a CPU.")
    patch.add_argument("--preset", default="ctclip", help="CT-ViT preset (default: ctclip)")
    patch.add_argument("--shape", type=int, nargs=3, metavar=("D", "H", "W"), default=[240, 480, 480],
                       help="input volume (default: 240 480 480)")
    patch.add_argument("--norm", default="layernorm", help="the pre-norm folded by conv (default: layernorm)")
    patch.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "fp16"],
                       help="autocast precisions (default: fp32 bf16)")
    _timing_options(patch)
    patch.set_defaults(func=run_patch_embed)

    data = tables.add_parser("data", help="the data pipeline's throughput (core.data.bench)",
                             description="Read N items of a split through the data pipeline and report its speed.")
    data.add_argument("items", nargs="*", metavar="CONFIG | KEY=VALUE", help="a config YAML, then dotted overrides")
    data.add_argument("--split", default="train", help="split to read (default: train)")
    data.add_argument("-n", type=int, default=32, help="items to read (default: 32)")
    data.add_argument("--out", default="reports/bench", help="folder for the .md and .csv (default: reports/bench)")
    data.set_defaults(func=run_data)

    encoders = tables.add_parser("encoders", help="every registered image encoder: params, GFLOPs, fwd/bwd ms",
                                 description="Every registered image encoder at one preset (its default when it has "
                                             "no such preset), beside the DCFormer paper's Params and GFLOPs.")
    _shape_options(encoders, "tiny")
    _timing_options(encoders)
    encoders.add_argument("--flops-only", action="store_true",
                          help="params and GFLOPs only, counted on the meta device (no compute, any --shape, "
                               "e.g. the paper's 256 512 512)")
    encoders.set_defaults(func=run_encoders)
